"""Glue between the CISCA network and MONAI's Ignite engines: batch preparation, gradient clipping and the
training loop's wait for data (checkpoints: :mod:`cellgap.checkpoint`)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from monai.engines import PrepareBatch
from monai.engines.utils import IterationEvents

from .data.augmentation import INTENSITY_MAX

TARGET_KEYS = ("contour_target", "distance_target", "weight_mask", "type_target")
# A batch's bytes are page-faulted into fresh shared memory by the loader worker and again by the trainer
# (≈1 ms per 256² tile, docs/benchmarks.md), so the bundles' workers send these targets as float16 (relative
# rounding ≤ 2.4e-4, far below that of the bf16 the network computes in) and the image as 8-bit 0..255.
HALF_PRECISION_KEYS = ("distance_target", "weight_mask")
logger = logging.getLogger(__name__)


class PrepareCISCABatch(PrepareBatch):
    """``(image, targets)`` for MONAI engines.

    Training batches (with the CISCA targets) give a dict of targets for the loss.  Evaluation batches
    give the instance map ``label`` itself, so that it stays available to post-processing and metrics
    under ``label`` (MONAI evaluators store the targets as ``output["label"]``); inference gives None.

    ``photometric``: a batch transform of images in 0..255 (``cellgap.data.device_augmentation.
    BatchPhotometricAugmentation``) applied on the device, after which the image is scaled to 0..1: the
    training pipeline then leaves the photometric steps and the scaling out (bundles:
    ``photometric_on_device``).

    Floating-point image and targets come out as float32 whatever they travelled as (the bundles' training
    loader sends :data:`HALF_PRECISION_KEYS` as float16). A uint8 image is an 8-bit image in 0..255 (the
    bundles' training loader sends it so) and comes out as float32 in 0..1; a floating-point image is taken
    as it is, in 0..1 (0..255 when ``photometric`` is given).

    ``dense_targets``: computes ``distance_target`` and ``weight_mask`` on the device from the batch's relabelled
    ``label`` (``cellgap.targets.DenseTargets``; bundles: ``targets_on_device``), for batches sent without them.
    """

    def __init__(self, photometric: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 dense_targets: Callable[[torch.Tensor], dict] | None = None) -> None:
        self.photometric = photometric
        self.dense_targets = dense_targets

    def __call__(self, batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
        if "image" not in batchdata:
            raise KeyError(f"batch has no 'image'; keys: {sorted(batchdata)}")
        image = batchdata["image"].to(device=device, non_blocking=non_blocking)
        if self.photometric is not None:
            image = self.photometric(image.float()) / INTENSITY_MAX
        else:
            image = scaled_image(image)
        targets = {k: _float32(batchdata[k].to(device=device, non_blocking=non_blocking)) for k in TARGET_KEYS if k in batchdata}
        if self.dense_targets is not None:
            if "label" not in batchdata:
                raise KeyError(f"dense_targets: the batch has no 'label' to compute the distance maps and weight mask from; "
                               f"keys: {sorted(batchdata)}")
            targets.update(self.dense_targets(torch.as_tensor(batchdata["label"]).to(device=device, non_blocking=non_blocking)))
        if targets:
            return image, targets
        return image, batchdata.get("label")


def scaled_image(image: torch.Tensor) -> torch.Tensor:
    """A float32 image in 0..1: an 8-bit (uint8) image is divided by 255, a floating-point one taken as it is."""
    if image.dtype == torch.uint8:
        return image.float() / INTENSITY_MAX
    return image.float()


def _float32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float() if tensor.is_floating_point() else tensor  # integer class maps stay as they are


class GradientClipping:
    """Clip decoder gradients after each backward pass (before the optimizer step).

    ``mode="global"`` (default) clips the norm of all gradients together, as PyTorch users expect;
    ``mode="per_tensor"`` clips every parameter tensor separately, as Keras ``clipnorm`` does in the
    reference (METHOD.md §10.7).  ``max_norm=None`` disables clipping.
    """

    def __init__(self, parameters, max_norm: float | None = 1e-3, mode: str = "global"):
        if mode not in ("global", "per_tensor"):
            raise ValueError(f"gradient clipping mode: expected 'global' or 'per_tensor', got {mode!r}")
        self.parameters = [p for p in parameters if p.requires_grad]
        self.max_norm = max_norm
        self.mode = mode

    def attach(self, engine: Engine) -> None:
        if self.max_norm is not None:
            engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        scaler = getattr(engine, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            # MONAI's AMP trainer fires this event before scaler.step: clip the true gradients, not the scaled ones.
            scaler.unscale_(engine.optimizer)
        if self.mode == "global":
            torch.nn.utils.clip_grad_norm_(self.parameters, self.max_norm)
        else:
            for p in self.parameters:
                if p.grad is not None:
                    torch.nn.utils.clip_grad_norm_([p], self.max_norm)


class DataWait:
    """Share of each training epoch's wall time the loop spent waiting for its next batch, as the trainer's
    metric ``data_wait_share`` (0..1): the stats handlers print it and write it to TensorBoard.

    The bundles' trainer synchronises with the GPU every iteration (the logged loss), so on a GPU this wait
    is idle time of the card. Above ``warn_above`` on a CUDA device a warning names the remedies. Attach it
    before the ValidationHandler, so that the epoch's time ends before validation starts.
    """

    METRIC = "data_wait_share"

    def __init__(self, warn_above: float = 0.1) -> None:
        if isinstance(warn_above, bool) or not isinstance(warn_above, (int, float)) or not 0 <= warn_above <= 1:
            raise ValueError(f"warn_above: expected a share in 0..1, got {warn_above!r}")
        self.warn_above = float(warn_above)
        self.epoch_start = self.batch_start = 0.0
        self.waited = 0.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.GET_BATCH_STARTED, self._batch_requested)
        engine.add_event_handler(Events.GET_BATCH_COMPLETED, self._batch_received)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)

    def _epoch_started(self, engine: Engine) -> None:
        self.waited = 0.0
        self.epoch_start = time.perf_counter()

    def _batch_requested(self, engine: Engine) -> None:
        self.batch_start = time.perf_counter()

    def _batch_received(self, engine: Engine) -> None:
        self.waited += time.perf_counter() - self.batch_start

    def _epoch_completed(self, engine: Engine) -> None:
        share = self.waited / max(time.perf_counter() - self.epoch_start, 1e-9)
        engine.state.metrics[self.METRIC] = share
        device = getattr(engine.state, "device", None)
        if share > self.warn_above and device is not None and torch.device(device).type == "cuda":
            workers = getattr(getattr(engine, "data_loader", None), "num_workers", "?")
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank = f"rank {torch.distributed.get_rank()}, " if distributed else ""  # each rank has its own loader
            logger.warning(f"{rank}epoch {engine.state.epoch}: the training loop waited for data {share:.0%} of the time "
                           f"(num_workers {workers}); more loader workers, a packed dataset (prepare_data.py --pack) "
                           f"or photometric_on_device / targets_on_device true would keep the GPU busy")


IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")


def image_files(folder: str | os.PathLike) -> list[str]:
    """Sorted image files (png, tif, tiff, jpg) directly inside ``folder``; an error if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"input_dir {folder}: not a folder; expected a folder of RGB tiles ({', '.join(IMAGE_SUFFIXES)})")
    files = sorted(str(p) for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"input_dir {folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    from .data.loading import tile_id

    seen: dict[str, str] = {}
    for f in files:
        if tile_id(f) in seen:
            raise ValueError(f"input_dir {folder}: {Path(seen[tile_id(f)]).name} and {Path(f).name} would write the same "
                             f"outputs ({tile_id(f)}_*); rename one")
        seen[tile_id(f)] = f
    return files
