"""Class-balanced oversampling of training tiles (METHOD.md §6.5), as a seeded torch ``Sampler``.

The reference duplicates training tiles that hold rare classes and then samples uniformly with
replacement from the duplicated list (§8). Drawing with probability proportional to each tile's
*expected* number of copies gives the same sampling distribution without the random duplicates:

1. Count each tile's instances per class; an instance's class is the largest class id inside it.
2. The "extra" classes are all present classes except the most frequent one (by total instances).
3. Extra class c gets ``n_c ∝ sqrt(total / count_c)`` copies, scaled so that the largest n_c equals
   the number of tiles, then multiplied by ``multipliers`` given in ascending-count order
   (PanNuke (1, 1, 1, 1), CoNIC (1.6, 1.6, 0.9, 0.9, 0.9): :data:`OVERSAMPLING_PRESETS`).
4. The n_c copies go to tiles with probability ∝ the tile's count of c, clipped at the
   ``clip_percentile``-th percentile of that count over the tiles that hold c (over all tiles the
   cap would be 0 for a class found in fewer than 1.5 % of them).
5. A tile's weight = 1 + Σ_c n_c · p_c(tile): its expected number of entries in the duplicated list.

:class:`ClassBalancedSampler` draws ``num_samples`` indices (default: the duplicated list's length)
with these weights, or uniformly when ``balance=False`` — one switch for a config.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import tifffile
import torch
from torch.utils.data import Sampler

from ..targets import instance_classes
from .registry import DATASETS

# the datasets' presets, from their registry entries
OVERSAMPLING_PRESETS: dict[str, dict] = {name: dict(spec.oversampling) for name, spec in DATASETS.items() if spec.oversampling}


def instance_class_counts(label: np.ndarray, classes: np.ndarray | None, num_classes: int) -> np.ndarray:
    """Instances per class of one tile, shape (num_classes,) for classes 1..C.

    An instance's class is the largest class id inside it (METHOD.md §6.5); instances whose pixels
    all have class 0 are not counted. ``classes=None``: single-class tile, every instance is class 1.
    Accepts (H, W) or (1, H, W) maps.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes: expected a positive integer, got {num_classes!r}")
    label = np.asarray(label)
    label = label[0] if label.ndim == 3 and label.shape[0] == 1 else label
    if classes is None:
        counts = np.zeros(num_classes, dtype=np.int64)
        counts[0] = np.count_nonzero(np.unique(label))
        return counts
    classes = np.asarray(classes)
    classes = classes[0] if classes.ndim == 3 and classes.shape[0] == 1 else classes
    per_instance = np.fromiter(instance_classes(label, classes, rule="max").values(), dtype=np.int64)
    if per_instance.size and per_instance.max() > num_classes:
        raise ValueError(f"classes: found class id {per_instance.max()}, expected ids in 0..{num_classes} (num_classes)")
    return np.bincount(per_instance, minlength=num_classes + 1)[1:]


def dataset_class_counts(items: Sequence[Mapping], num_classes: int, label_key: str = "label",
                         class_key: str = "classes") -> np.ndarray:
    """(N, num_classes) instance counts of every tile of a datalist (``cellgap.data.prepared.datalist``).

    ``item[label_key]`` / ``item[class_key]`` are TIFF paths or arrays; an empty or missing class
    entry means a single-class tile.
    """
    counts = np.zeros((len(items), num_classes), dtype=np.int64)
    for index, item in enumerate(items):
        if label_key not in item:
            raise ValueError(f"items[{index}]: no {label_key!r} entry (keys: {sorted(item)})")
        label = _read_map(item[label_key], f"items[{index}][{label_key!r}]")
        source = item.get(class_key)
        classes = None if source is None or (isinstance(source, str) and not source) else _read_map(
            source, f"items[{index}][{class_key!r}]")
        if classes is not None and np.squeeze(classes).shape != np.squeeze(label).shape:
            raise ValueError(f"items[{index}][{class_key!r}]: shape {classes.shape} does not match the label map {label.shape}")
        counts[index] = instance_class_counts(np.squeeze(label), None if classes is None else np.squeeze(classes), num_classes)
    return counts


def _read_map(source, where: str) -> np.ndarray:
    if isinstance(source, (str, os.PathLike)):
        try:
            return tifffile.imread(source)
        except (OSError, ValueError, tifffile.TiffFileError) as error:
            raise ValueError(f"{where}: cannot read {source!s} as a TIFF map ({error})") from None
    if isinstance(source, torch.Tensor):
        return source.detach().cpu().numpy()
    return np.asarray(source)


def oversampling_weights(class_counts, multipliers: Sequence[float] | None = None,
                         clip_percentile: float = 98.5) -> np.ndarray:
    """Expected number of copies of each tile in the oversampled list (≥ 1), from (N, C) instance counts.

    ``multipliers``: one factor per extra class in ascending-count order (None: all 1).
    ``clip_percentile``: per-class cap on a tile's count when drawing copies (100: no cap).
    """
    counts = np.asarray(class_counts)
    if counts.ndim != 2 or counts.shape[0] == 0 or counts.shape[1] == 0:
        raise ValueError(f"class_counts: expected an (N tiles, C classes) array, got shape {counts.shape}")
    if not np.issubdtype(counts.dtype, np.number) or not np.all(np.isfinite(counts)) or (counts < 0).any():
        raise ValueError("class_counts: expected non-negative finite instance counts")
    if not (isinstance(clip_percentile, (int, float)) and 0 < clip_percentile <= 100):
        raise ValueError(f"clip_percentile: expected a percentile in (0, 100], got {clip_percentile!r}")
    counts = counts.astype(np.float64)
    tiles = counts.shape[0]
    totals = counts.sum(axis=0)
    present = np.flatnonzero(totals > 0)
    extra = present[present != np.argmax(totals)] if present.size else present
    extra = extra[np.argsort(totals[extra], kind="stable")]  # ascending count: rarest first
    if multipliers is None:
        multipliers = np.ones(extra.size)
    else:
        multipliers = np.asarray(multipliers, dtype=np.float64)
        if multipliers.ndim != 1 or multipliers.size != extra.size or (multipliers < 0).any():
            raise ValueError(
                f"multipliers: expected {extra.size} non-negative factors (one per class except the most frequent, "
                f"rarest first), got {multipliers.tolist()}"
            )
    weights = np.ones(tiles)
    if extra.size == 0:
        return weights
    copies = tiles * np.sqrt(totals[extra].min() / totals[extra]) * multipliers  # largest = number of tiles
    for c, n_c in zip(extra, copies):
        column = counts[:, c]
        cap = np.percentile(column[column > 0], clip_percentile)
        share = np.minimum(column, cap)
        weights += n_c * share / share.sum()
    return weights


class ClassBalancedSampler(Sampler[int]):
    """Seeded sampler of training-tile indices, class-balanced as in METHOD.md §6.5 (switchable).

    Args:
        class_counts: (N, C) instances per tile and class (:func:`dataset_class_counts`).
        balance: True draws ∝ :func:`oversampling_weights`; False draws uniformly (the reference's
            sampling without oversampling).
        multipliers, clip_percentile: see :func:`oversampling_weights` (:data:`OVERSAMPLING_PRESETS`).
        num_samples: indices per epoch over all replicas; default: the oversampled list's length
            (round of the summed weights), N when not balanced.
        replacement: draw with replacement (the reference does); without it, more draws than tiles are whole
            permutations one after another (every tile once per pass, as a re-iterated shuffled loader).
        seed: the draw of epoch e uses seed + e; the epoch advances at every iteration unless
            :meth:`set_epoch` sets it (the DistributedSampler convention).
        num_replicas, rank: for data-parallel training every rank makes the same draw and keeps
            every num_replicas-th index from position rank (the draw is padded to a multiple).
    """

    def __init__(self, class_counts, balance: bool = True, multipliers: Sequence[float] | None = None,
                 clip_percentile: float = 98.5, num_samples: int | None = None, replacement: bool = True,
                 seed: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        counts = np.asarray(class_counts)
        if counts.ndim != 2 or counts.shape[0] == 0:
            raise ValueError(f"class_counts: expected an (N tiles, C classes) array, got shape {counts.shape}")
        tiles = counts.shape[0]
        if balance:
            weights = oversampling_weights(counts, multipliers, clip_percentile)
        else:
            weights = np.ones(tiles)
        if num_samples is None:
            num_samples = int(round(weights.sum()))
        if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
            raise ValueError(f"num_samples: expected a positive integer, got {num_samples!r}")
        if isinstance(num_replicas, bool) or not isinstance(num_replicas, (int, np.integer)) or num_replicas < 1:
            raise ValueError(f"num_replicas: expected a positive integer, got {num_replicas!r}")
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < num_replicas:
            raise ValueError(f"rank: expected an integer in 0..{num_replicas - 1}, got {rank!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"seed: expected an integer, got {seed!r}")
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.balance = bool(balance)
        self.num_samples = int(num_samples)
        self.replacement = bool(replacement)
        self.seed = int(seed)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.epoch = 0

    @property
    def probabilities(self) -> np.ndarray:
        """Probability of each tile at every draw."""
        return (self.weights / self.weights.sum()).numpy()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def state_dict(self) -> dict:
        """What a resumed training needs to draw the next epoch as an uninterrupted one would (cellgap.checkpoint)."""
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        per_rank = len(self)
        total = per_rank * self.num_replicas
        if self.replacement:
            draw = torch.multinomial(self.weights, total, replacement=True, generator=generator)
        elif self.num_samples <= len(self.weights):
            draw = torch.multinomial(self.weights, self.num_samples, replacement=False, generator=generator)
            draw = torch.cat([draw, draw[: total - self.num_samples]])  # pad so every rank gets as many
        else:  # more draws than tiles: whole permutations one after another, each tile once per pass
            passes = math.ceil(total / len(self.weights))
            draw = torch.cat([torch.multinomial(self.weights, len(self.weights), replacement=False, generator=generator)
                              for _ in range(passes)])[:total]
        return iter(draw[self.rank :: self.num_replicas].tolist())


def training_sampler(datalist: Sequence[Mapping], batch_size: int, epoch_length: int | None = None,
                     num_classes: int = 1, balanced: bool = False, preset: str | None = None,
                     seed: int = 0) -> ClassBalancedSampler:
    """The training loader's sampler: ``epoch_length`` full batches per epoch whatever the dataset's size.

    ``epoch_length`` None: one pass over the tiles (``len // batch_size`` batches, at least one), or the
    oversampled list's length when ``balanced``. Fewer tiles than the epoch needs are drawn again in
    further seeded permutations (a single large image gives every crop of the epoch; every tile is seen once
    per pass, as a re-iterated shuffled loader would); otherwise a seeded permutation (uniform) or :func:`oversampling_weights` draws (``balanced``, with ``preset``'s multipliers from
    :data:`OVERSAMPLING_PRESETS`). The draw is a multiple of ``batch_size``, so the loader's
    ``drop_last`` never drops a batch: an epoch never runs zero steps.
    """
    tiles = len(datalist)
    if tiles == 0:
        raise ValueError("training datalist: no tiles; the training split of the dataset is empty")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    if epoch_length is not None and (isinstance(epoch_length, bool) or not isinstance(epoch_length, (int, np.integer))
                                     or epoch_length < 1):
        raise ValueError(f"epoch_length: expected a positive number of steps or None (one pass), got {epoch_length!r}")
    if balanced:
        counts = dataset_class_counts(datalist, num_classes)
        options = OVERSAMPLING_PRESETS.get(preset or "", {})
        per_epoch = int(round(oversampling_weights(counts, **options).sum()))
    else:
        counts, options, per_epoch = np.ones((tiles, 1)), {}, tiles
    steps = int(epoch_length) if epoch_length is not None else max(1, per_epoch // int(batch_size))
    draws = steps * int(batch_size)
    return ClassBalancedSampler(counts, balance=bool(balanced), num_samples=draws,
                                replacement=bool(balanced), seed=seed, **options)


__all__ = [
    "OVERSAMPLING_PRESETS",
    "ClassBalancedSampler",
    "training_sampler",
    "dataset_class_counts",
    "instance_class_counts",
    "oversampling_weights",
]
