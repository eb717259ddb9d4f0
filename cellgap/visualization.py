"""Overlays of predicted cells on the input image: for TensorBoard and as PNG files."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from PIL import Image
from skimage.segmentation import find_boundaries

from .atomic import atomic_write_bytes

# Outline colours per class (1..); class 0 is never drawn.  Cycled when there are more classes.
CLASS_COLOURS = np.array([[255, 255, 0], [0, 255, 0], [0, 160, 255], [255, 0, 255], [255, 128, 0], [0, 255, 255],
                          [255, 255, 255], [160, 0, 255]], dtype=np.uint8)


def _hwc_uint8(image) -> np.ndarray:
    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = np.moveaxis(arr, 0, -1)
    if arr.dtype != np.uint8:
        scale = 255.0 if arr.max() <= 1.0 + 1e-6 else 1.0
        arr = np.clip(arr * scale, 0, 255).round().astype(np.uint8)
    return arr


def overlay(image, instances, types=None) -> np.ndarray:
    """RGB uint8 H×W×3: the image with each instance's outline in its class colour (yellow if no class)."""
    rgb = _hwc_uint8(image).copy()
    inst = np.asarray(instances.detach().cpu() if isinstance(instances, torch.Tensor) else instances).squeeze()
    cls = None if types is None else np.asarray(types.detach().cpu() if isinstance(types, torch.Tensor) else types).squeeze()
    edges = find_boundaries(inst, mode="inner") & (inst > 0)
    colour_index = (cls[edges].astype(np.int64) - 1) if cls is not None else np.zeros(int(edges.sum()), np.int64)
    rgb[edges] = CLASS_COLOURS[np.maximum(colour_index, 0) % len(CLASS_COLOURS)]
    return rgb


def save_png(path: str | os.PathLike, rgb: np.ndarray) -> Path:
    """Write a PNG atomically."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return atomic_write_bytes(path, buffer.getvalue())


class OverlayHandler:
    """At the end of each evaluation epoch, draw the last batch's predicted cells over the input images.

    Writes them to TensorBoard (``log_dir``; tag ``overlay/<i>``, step = ``global_step()`` if given, e.g.
    the trainer's epoch) and/or as PNG files into ``png_dir``.  Expects the evaluator's decollated
    output items to hold ``image`` (3,H,W in [0,1]), ``pred_instances`` and ``pred_types``.
    """

    def __init__(self, log_dir: str | None = None, png_dir: str | None = None, max_images: int = 4, global_step=None,
                 tag: str = "overlay"):
        self.log_dir, self.png_dir = log_dir, png_dir
        self.max_images = max_images
        self.global_step = global_step
        self.tag = tag
        self._writer = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        batch = engine.state.batch if isinstance(engine.state.batch, list) else [engine.state.batch]
        step = self.global_step() if callable(self.global_step) else engine.state.epoch
        for i, (item, sample) in enumerate(zip(outputs, batch)):
            if i >= self.max_images:
                break
            image = item.get("image", sample.get("image"))
            if image is None or "pred_instances" not in item:
                continue
            rgb = overlay(image, item["pred_instances"], item.get("pred_types"))
            if self.log_dir is not None:
                if self._writer is None:
                    from torch.utils.tensorboard import SummaryWriter

                    self._writer = SummaryWriter(log_dir=self.log_dir)
                self._writer.add_image(f"{self.tag}/{i}", rgb, global_step=step, dataformats="HWC")
            if self.png_dir is not None:
                name = str(sample.get("id") or i)
                save_png(Path(self.png_dir) / f"{self.tag}_{name}.png", rgb)
        if self._writer is not None:
            self._writer.flush()
