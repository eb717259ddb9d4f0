"""Named builders of the bundles' training, evaluation and inference workflows.

The bundle configs (``bundles/*/configs/*.json``, rendered by :mod:`cellgap.bundle`) hold options,
``@`` references and ``_target_`` entries; what used to be written there as expressions (cache-mode
switches, keys chosen by flags, handler lists, event registration) lives here, where ruff, the import
graph and the tests see it.  Every builder takes plain options and returns the MONAI / ignite object
the config names, so ``python -m monai.bundle run`` overrides stay what they were.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch
from monai.transforms import Compose, Identityd, ScaleIntensityRanged

#: the post-processing outputs a candidate minimum cell size writes under its own suffix
CANDIDATE_KEYS = ("pred_instances", "pred_types", "pred_cells")


def path_in(folder, name: str, subfolder: str | None = None) -> str:
    """``folder/name`` (``folder/name/subfolder``): where a bundle keeps models, runs, data and caches."""
    return os.path.join(folder, name, *([subfolder] if subfolder else []))


# --------------------------------------------------------------------------------------------------
# devices and processes
# --------------------------------------------------------------------------------------------------
def default_device() -> torch.device:
    """The first GPU when there is one, else the CPU."""
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


def distributed_device() -> torch.device:
    """This process's GPU under torchrun (``LOCAL_RANK``), else the CPU."""
    return torch.device(f"cuda:{os.environ['LOCAL_RANK']}") if torch.cuda.is_available() else torch.device("cpu")


def distributed_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def is_not_rank0() -> bool:
    """True in every process but the first of a distributed run: those log and save nothing."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_rank() > 0


def init_distributed(backend: str, device: torch.device) -> bool:
    """Join the torchrun process group (once) and bind this process to its GPU."""
    dist = torch.distributed
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(device)
    return True


def end_distributed() -> bool:
    """Every rank leaves its last collective before any tears the group down (one rank of the two-process
    gloo test aborted at teardown once in ≈15 runs without the barrier)."""
    dist = torch.distributed
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return True


def distributed_network(network: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``network`` on ``device`` in its training layout, wrapped for data-parallel training."""
    module = network.to(device).prepare_layout(device)
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=[device] if torch.cuda.is_available() else None)


def unwrapped(network: torch.nn.Module) -> torch.nn.Module:
    """The network inside a DistributedDataParallel wrapper (the network itself otherwise)."""
    return network.module if isinstance(network, torch.nn.parallel.DistributedDataParallel) else network


# --------------------------------------------------------------------------------------------------
# embedding cache and augmentation views
# --------------------------------------------------------------------------------------------------
def view_spec(cache_mode: str, cache_views: int, seed: int, stain_stats, crop_size: int, prob_scale: float):
    """How training augments and what the cache holds: ``clean`` is one unaugmented view per tile."""
    from .cache import ViewSpec

    clean = cache_mode == "clean"
    return ViewSpec(mode=cache_mode, num_views=1 if clean else cache_views, seed=seed,
                    augmentation={"stain_stats": stain_stats, "crop_size": crop_size, "prob_scale": 0.0 if clean else prob_scale})


def embedding_cache(cache_mode: str, cache_dir, network, encoder_weights, datalist, view_spec, dataset_id: str,
                    dtype: str = "float16"):
    """The embedding cache of the frozen encoder for ``cache_mode`` ``clean`` or ``views``; None for ``off``."""
    if cache_mode == "off":
        return None
    from .cache import EmbeddingCache

    return EmbeddingCache.for_encoder(cache_dir, network, encoder_weights, datalist, view_spec, dataset_id=dataset_id,
                                      dtype=dtype)


def fill_embedding_cache(cache, network, datalist, view_spec, num_classes: int) -> bool:
    """Fill the cache's missing rows with the encoder's maps before training (nothing without a cache)."""
    if cache is None:
        return True
    from .cache import default_fill_transform, fill_cache

    fill_cache(unwrapped(network).encoder, datalist, cache, transform=default_fill_transform(view_spec, num_classes))
    return True


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------
def train_preprocessing(num_classes: int, magnification, num_contour_classes: int, view_spec,
                        photometric_on_device: bool = False, targets_on_device: bool = False, cache=None) -> Compose:
    """Load → contour levels → augmentation (or a cached view) → targets → 8-bit image → the keys the batch needs.

    Images travel as uint8 (half the bytes of float16 through the workers' shared memory) and the float
    targets as float16; :class:`cellgap.training.PrepareCISCABatch` restores 0..1 and float32 on the device.
    With ``targets_on_device`` the workers send the relabelled instance map instead of the distance maps and
    weight mask (:class:`cellgap.targets.DenseTargets` computes them on the batch)."""
    from monai.transforms import CastToTyped, SelectItemsd

    from .cache import CACHE_KEYS, CachedFeaturesd
    from .data.augmentation import ClipIntensityd
    from .data.loading import LoadTiled
    from .targets import CISCATargetsd, ContourLevelsd
    from .training import HALF_PRECISION_KEYS

    keys = ["image", "contour_target", "type_target"]
    keys += ["label"] if targets_on_device else ["distance_target", "weight_mask"]
    keys += list(CACHE_KEYS) if cache is not None else []
    return Compose([
        LoadTiled(keys=["image", "label", "classes", "contour_levels"], num_classes=num_classes),
        ContourLevelsd(magnification=magnification),
        view_spec.augmentation_transform(photometric=not photometric_on_device),
        CISCATargetsd(magnification=magnification, num_contour_classes=num_contour_classes, num_classes=num_classes,
                      dense_targets=not targets_on_device),
        ClipIntensityd(keys="image", low=0.0, high=255.0, dtype="uint8"),
        CachedFeaturesd(cache) if cache is not None else Identityd("image"),
        SelectItemsd(keys=keys),
        CastToTyped(keys=list(HALF_PRECISION_KEYS), dtype=torch.float16, allow_missing_keys=targets_on_device),
    ])


def eval_preprocessing(num_classes: int | None = None, keys: Sequence[str] | None = None) -> Compose:
    """Load a tile (with its labels when ``keys`` is None) and scale the image to 0..1."""
    from .data.loading import LoadTiled

    load = LoadTiled(num_classes=num_classes) if keys is None else LoadTiled(keys=list(keys), num_classes=num_classes)
    return Compose([load, ScaleIntensityRanged(keys="image", a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0, clip=True)])


class TrainedFor:
    """What the decoder checkpoint at ``path`` was trained for (read once): the facts evaluation and inference
    need, and what rebuilds its network (decoder architecture, encoder weights; a random encoder is stored in it)."""

    def __init__(self, path):
        from .checkpoint import decoder_config, default_encoder_weights, read_checkpoint

        checkpoint = read_checkpoint(path)
        self.meta = checkpoint["meta"]
        self.class_names = list(self.meta["class_names"])
        self.num_classes = len(self.class_names)
        self.magnification = self.meta["magnification"]
        self.mpp = self.meta.get("mpp")
        self.min_cell_size = self.meta["min_cell_size"]
        self.decoder = decoder_config(checkpoint)
        self.reduced_encoder = bool(self.meta.get("reduced_encoder", False))
        self.num_contour_classes = int(self.meta.get("num_contour_classes", 3))
        self.num_distance_maps = int(self.meta.get("num_distance_maps", 4))
        self.encoder_weights = default_encoder_weights(checkpoint)
        self.random_encoder = self.encoder_weights == "none"


def image_datalist(folder) -> list[dict]:
    """One item per RGB tile of ``folder`` (inference input)."""
    from .training import image_files

    return [{"image": f} for f in image_files(folder)]


def train_and_validation(data, train_split: str, val_split: str, validation: bool, val_fraction: float, seed: int,
                         holdout_dir, tile_size: int, crop_size: int) -> tuple[list[dict], list[dict]]:
    """(training items, validation items): the dataset's splits, or a seeded share of the training images held
    out when it has no validation split (``cellgap.data.splits.holdout_validation``); the training items are
    checked to give at least one crop with a cell before anything trains."""
    from .data.splits import holdout_validation
    from .data.trainable import check_trainable

    train, val = holdout_validation(data, train_split, val_split, validation=validation, fraction=val_fraction, seed=seed,
                                    holdout_dir=holdout_dir, tile_side=max(tile_size, crop_size), crop_side=crop_size)
    return check_trainable(train, crop_size, train_split), val


def evaluation_datalist(data, split: str, train_split: str, val_split: str, validation: bool, val_fraction: float,
                        seed: int, holdout_dir, tile_size: int, crop_size: int) -> list[dict]:
    """The items evaluated on ``split``: for the validation split of a dataset without one, the same held-out
    share training validated on (the study tunes the minimum cell size on it); otherwise the split itself."""
    if split == val_split and validation:
        from .data.splits import holdout_validation

        return holdout_validation(data, train_split, val_split, validation=True, fraction=val_fraction, seed=seed,
                                  holdout_dir=holdout_dir, tile_side=max(tile_size, crop_size), crop_side=crop_size)[1]
    return data.datalist(split)


def data_loader(dataset, batch_size: int, device: torch.device, num_workers: int = 0, sampler=None,
                train: bool = False):
    """A fork-safe MONAI loader; training shuffles (unless a sampler orders the tiles) and drops the last
    incomplete batch; memory is pinned for a GPU."""
    from .data.dataloader import ForkSafeDataLoader

    return ForkSafeDataLoader(dataset, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler,
                              num_workers=num_workers, drop_last=train, pin_memory=device.type == "cuda")


def train_prepare_batch(cache_mode: str, network, cache, photometric_on_device: bool, targets_on_device: bool,
                        stain_stats, prob_scale: float, seed: int):
    """How a training batch reaches the network: the image (with the photometric steps on the device when
    asked), or the cached encoder maps; dense targets computed on the device when asked."""
    from .targets import DenseTargets

    dense_targets = DenseTargets() if targets_on_device else None
    if cache_mode != "off":
        from .cache import PrepareCachedCISCABatch

        return PrepareCachedCISCABatch(encoder=network.encoder, cache=cache, dense_targets=dense_targets)
    from .data.device_augmentation import BatchPhotometricAugmentation
    from .training import PrepareCISCABatch

    photometric = (BatchPhotometricAugmentation(stain_stats=stain_stats, prob_scale=prob_scale, seed=seed)
                   if photometric_on_device else None)
    return PrepareCISCABatch(photometric=photometric, dense_targets=dense_targets)


# --------------------------------------------------------------------------------------------------
# post-processing and metrics (one candidate per minimum cell size when the study selects it)
# --------------------------------------------------------------------------------------------------
def candidate_suffix(min_cell_size: int) -> str:
    return f"_min{int(min_cell_size)}"


class CandidateOutput:
    """``output_transform`` of a :class:`~cellgap.metrics.handlers.CellMetrics` that scores one candidate
    minimum cell size: it exposes ``pred_instances_min<size>`` (etc.) as ``pred_instances``."""

    def __init__(self, min_cell_size: int):
        self.suffix = candidate_suffix(min_cell_size)

    def _one(self, item: Mapping) -> dict:
        out = dict(item)
        for key in CANDIDATE_KEYS:
            if key + self.suffix in item:
                out[key] = item[key + self.suffix]
        return out

    def __call__(self, output):
        if isinstance(output, Mapping):
            return self._one(output)
        return [self._one(item) for item in output]


def default_key_metric(num_classes: int) -> str:
    """The scalar that selects the checkpoint and stops early: mPQ+ for multi-class data, else PQ."""
    return "mpq+" if num_classes > 1 else "pq"


def _candidates(min_cell_size_candidates) -> list[int] | None:
    if min_cell_size_candidates is None:
        return None
    sizes = sorted({int(c) for c in min_cell_size_candidates})
    if not sizes or sizes[0] < 1:
        raise ValueError(f"min_cell_size_candidates: expected positive pixel counts, got {list(min_cell_size_candidates)}")
    return sizes


def validation_postprocessing(magnification, min_cell_size: int, num_classes: int,
                              min_cell_size_candidates: Sequence[int] | None = None) -> Compose:
    """Cells from the network's maps, and the ground truth kept beside them for the metrics.

    ``min_cell_size_candidates``: post-process the same outputs once per candidate size, each under
    its own keys (``pred_instances_min<size>`` …), for the study's choice of the minimum cell size."""
    from monai.transforms import CopyItemsd

    from .postprocessing import CISCAPostProcessingd

    sizes = _candidates(min_cell_size_candidates)
    if sizes is None:
        cells = [CISCAPostProcessingd(magnification=magnification, min_cell_size=min_cell_size, num_classes=num_classes,
                                      pred_key="pred")]
    else:
        cells = [CISCAPostProcessingd(magnification=magnification, min_cell_size=c, num_classes=num_classes, pred_key="pred",
                                      **dict(zip(("instance_key", "type_key", "cells_key"),
                                                 (k + candidate_suffix(c) for k in CANDIDATE_KEYS))))
                 for c in sizes]
    return Compose([*cells, CopyItemsd(keys=["label", "classes"], names=["gt_instances", "gt_types"])])


def cell_metrics(class_names, key_metric: str, data, split: str, prefix: str = "val_",
                 min_cell_size_candidates: Sequence[int] | None = None, name: str = "val_key_metric") -> dict:
    """The evaluator's metrics on ``split`` of ``data`` (a :class:`~cellgap.data.selection.DatasetSelection`),
    under its metric protocol: ``{name: CellMetrics}``; with candidates one ``min_cell_size_<size>`` each
    (prefix ``min_cell_size_<size>/``), the first of them the key metric."""
    from .metrics.handlers import CellMetrics

    protocol = data.metric_protocol(split)

    sizes = _candidates(min_cell_size_candidates)
    if sizes is None:
        return {name: CellMetrics(class_names=class_names, key_metric=key_metric, protocol=protocol, prefix=prefix)}
    return {f"min_cell_size_{c}": CellMetrics(class_names=class_names, key_metric=key_metric, protocol=protocol,
                                              prefix=f"min_cell_size_{c}/", output_transform=CandidateOutput(c))
            for c in sizes}


# --------------------------------------------------------------------------------------------------
# handlers and the training run
# --------------------------------------------------------------------------------------------------
def training_loss(output: Mapping):
    """The loss of a training step's (not decollated) output, for the loss loggers."""
    return output["loss"]


class LearningRateWriter:
    """``epoch_event_writer`` of a TensorBoardStatsHandler: the optimizer's learning rate once per epoch."""

    def __init__(self, optimizer: torch.optim.Optimizer, tag: str = "learning_rate"):
        self.optimizer, self.tag = optimizer, tag

    def __call__(self, engine, writer) -> None:
        writer.add_scalar(self.tag, self.optimizer.param_groups[0]["lr"], engine.state.epoch)


class HandlerGroup:
    """Several ignite / MONAI handlers that a config enables or disables as one (``self.handlers``, attached in order)."""

    handlers: list

    def attach(self, engine) -> None:
        for handler in self.handlers:
            handler.attach(engine)


class TrainingLogs(HandlerGroup):
    """The trainer's logs as one handler: the loss per epoch (console) and per iteration (TensorBoard), the
    learning rate per epoch, and a progress bar per epoch (loss, steps/s, ETA); ``attach`` registers them in that order."""

    def __init__(self, log_dir, optimizer: torch.optim.Optimizer):
        from monai.handlers import StatsHandler, TensorBoardStatsHandler

        from .monitoring import EpochProgressBar

        self.handlers = [
            StatsHandler(tag_name="train_loss", iteration_log=False, output_transform=training_loss),
            TensorBoardStatsHandler(log_dir=log_dir, tag_name="train_loss", output_transform=training_loss),
            TensorBoardStatsHandler(log_dir=log_dir, iteration_log=False, epoch_event_writer=LearningRateWriter(optimizer)),
            EpochProgressBar(),
        ]


class ValidationLogs(HandlerGroup):
    """The validator's logs as one handler: the metrics (console and TensorBoard), a short line with the key
    metric and the best so far, and overlays of ``max_images`` validation tiles."""

    def __init__(self, log_dir, key_metric: str = "", max_images: int = 4):
        from monai.handlers import StatsHandler, TensorBoardStatsHandler

        from .monitoring import ValidationLine
        from .visualization import OverlayHandler

        self.handlers = [StatsHandler(iteration_log=False), ValidationLine(name=f"key metric {key_metric}" if key_metric else ""),
                         TensorBoardStatsHandler(log_dir=log_dir, iteration_log=False),
                         OverlayHandler(log_dir=log_dir, max_images=max_images)]


def run_training(early_stop, trainer, distributed: bool = False) -> int:
    """Tie early stopping to the trainer, stop on a NaN loss (single process: a rank stopping alone would
    leave the others waiting), train; returns the iterations run (a distributed run prints them per rank)."""
    from ignite.engine import Events
    from ignite.handlers import TerminateOnNan

    early_stop.set_trainer(trainer=trainer)
    if not distributed:
        trainer.add_event_handler(Events.ITERATION_COMPLETED, TerminateOnNan())
    trainer.run()
    if distributed:
        # one string, one write: the ranks share stdout, and print's separate pieces interleave
        print(f"rank {torch.distributed.get_rank()} trained {trainer.state.iteration} iterations", flush=True)
    return trainer.state.iteration
