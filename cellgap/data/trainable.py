"""Whether a training split can feed the training loop, checked before training and at every epoch.

A dataset whose images are smaller than the training crop, or that holds no annotated cell, would "train"
on nothing; an epoch that runs zero steps (a loader that drops its only, incomplete batch) makes ignite warn
and carry on. Both stop here with the reason and the fix instead.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from ignite.engine import Engine, Events

from .native import read_label_image


class UntrainableDataError(ValueError):
    """The training split cannot give a single training crop."""


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of an image file from its header (no pixel data read)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image file missing")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                shape = tif.series[0].shape
                axes = tif.series[0].axes
            return int(shape[axes.index("Y")]), int(shape[axes.index("X")])
        from PIL import Image

        with Image.open(path) as im:
            width, height = im.size
        return height, width
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: cannot read the image header ({error})") from None


def check_trainable(datalist: Sequence[Mapping], crop_size: int | None, split: str = "train") -> list[Mapping]:
    """Return ``datalist`` unchanged if it can give training crops, else raise :class:`UntrainableDataError`.

    Every image must be at least ``crop_size`` on both sides (a smaller one cannot be batched with the
    crops of the others), and at least one label map must hold a cell (labels are read until one does).
    """
    if not datalist:
        raise UntrainableDataError(f"the {split!r} split has no images; add images to it or choose another split")
    if crop_size is not None:
        small = []
        for item in datalist:
            height, width = image_size(item["image"])
            if min(height, width) < crop_size:
                small.append((item["image"], height, width))
        if small:
            path, height, width = small[0]
            smallest = min(min(h, w) for _, h, w in small)
            fit = (smallest // 32) * 32
            hint = (f"train with a smaller crop (--crop {fit}, a multiple of 32) or " if fit >= 32 else "") + \
                   "use larger images"
            raise UntrainableDataError(
                f"{len(small)} of {len(datalist)} {split!r} image(s) are smaller than the training crop "
                f"{crop_size}×{crop_size}, e.g. {path} ({height}×{width}); {hint}")
    for item in datalist:
        label = item.get("label")
        if label and np.any(read_label_image(label) > 0):
            return list(datalist)
    raise UntrainableDataError(
        f"none of the {len(datalist)} {split!r} label map(s) holds an annotated cell (all pixels 0), e.g. "
        f"{datalist[0].get('label')}; a model cannot learn cells from them: check that labels/ holds instance maps "
        "(0 = background, 1..N = cells)")


class EpochStepsCheck:
    """Stop training with an error when an epoch runs zero steps (ignite only warns and goes on)."""

    def __init__(self) -> None:
        self._start = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        # not at DATALOADER_STOP_ITERATION: ignite fires it at the start of an epoch whose loader is renewed
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._stopped)
        engine.add_event_handler(Events.COMPLETED, self._stopped)

    def _started(self, engine: Engine) -> None:
        if not engine.state.epoch_length:
            raise RuntimeError(self._message(engine))

    def _epoch_started(self, engine: Engine) -> None:
        self._start = engine.state.iteration

    def _stopped(self, engine: Engine) -> None:
        if engine.state.iteration == self._start:
            raise RuntimeError(self._message(engine))

    @staticmethod
    def _message(engine: Engine) -> str:
        loader = engine.state.dataloader
        size = len(loader.dataset) if hasattr(loader, "dataset") and hasattr(loader.dataset, "__len__") else "?"
        batch = getattr(loader, "batch_size", "?")
        return (f"training epoch {engine.state.epoch} ran zero steps: the loader gave no batch ({size} training "
                f"tile(s), batch size {batch}); draw the epoch's crops with cellgap.data.sampling.training_sampler "
                "(the bundles' train#sampler) or lower the batch size")


__all__ = ["EpochStepsCheck", "UntrainableDataError", "check_trainable", "image_size"]
