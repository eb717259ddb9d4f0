"""The per-image overlap core: every GT/prediction overlap of two instance maps in one vectorised pass.

Both label maps are relabelled to sequential ids and paired pixel by pixel; a single ``bincount``
over the paired labels gives every intersection, both area vectors and (from the same pass) the
centroids and per-instance class histograms.  All metrics of :mod:`cellgap.metrics` are read from
the resulting :class:`Overlaps` record, so the image is traversed once per metric suite.

The pass is written with torch: numpy arrays run on the CPU (or on ``device``), CUDA tensors stay
on their GPU.  The small per-instance arrays come back as numpy.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

CLASS_RULES = ("majority", "max")

# Above this many (n_gt+1)·(n_pred+1) bins the pair table is built sparsely (torch.unique) instead of densely.
_DENSE_PAIR_BINS = 1 << 23
# Raw ids index the tables directly while (max_gt+1)·(max_pred+1) ≤ this many times the pixel count.
_RAW_ID_FACTOR = 2
# Relabel through a lookup table when ids are at most this many times the pixel count (else torch.unique).
_LUT_FACTOR = 2


@dataclass
class Overlaps:
    """Everything the metrics need about one GT/prediction pair of instance maps.

    Instances are indexed 0..n-1 in increasing order of their original id (``gt_ids``/``pred_ids``).
    ``pair_gt``/``pair_pred``/``pair_intersection`` list every overlapping (GT, prediction) pair,
    sorted by GT index then prediction index.  ``*_class_pixels`` is the (n, C+1) histogram of the
    class map inside each instance (column 0 = class-map background); ``None`` without class maps.
    ``*_in_region`` marks instances with at least one pixel inside the counting region (all ``True``
    without one).
    """

    shape: tuple[int, int]
    gt_ids: np.ndarray
    pred_ids: np.ndarray
    gt_area: np.ndarray
    pred_area: np.ndarray
    pair_gt: np.ndarray
    pair_pred: np.ndarray
    pair_intersection: np.ndarray
    gt_centroid: np.ndarray
    pred_centroid: np.ndarray
    gt_class_pixels: np.ndarray | None = None
    pred_class_pixels: np.ndarray | None = None
    gt_in_region: np.ndarray | None = None
    pred_in_region: np.ndarray | None = None

    @property
    def n_gt(self) -> int:
        return len(self.gt_ids)

    @property
    def n_pred(self) -> int:
        return len(self.pred_ids)

    @property
    def pair_union(self) -> np.ndarray:
        return self.gt_area[self.pair_gt] + self.pred_area[self.pair_pred] - self.pair_intersection

    @property
    def pair_iou(self) -> np.ndarray:
        """IoU of every overlapping pair, float64 (exact ratio of integer pixel counts)."""
        return self.pair_intersection / self.pair_union

    def gt_classes(self, rule: str = "majority") -> np.ndarray:
        return instance_classes(self.gt_class_pixels, self.n_gt, rule, "gt")

    def pred_classes(self, rule: str = "majority") -> np.ndarray:
        return instance_classes(self.pred_class_pixels, self.n_pred, rule, "pred")


def instance_classes(class_pixels: np.ndarray | None, n: int, rule: str = "majority", what: str = "instance") -> np.ndarray:
    """One class per instance from its class-map histogram.

    ``"majority"``: the most frequent non-background class among the instance's pixels; ties go to
    the lower class id.  ``"max"``: the largest class id present (CISCA's per-class F1, METHOD §10.13).
    An instance whose pixels are all class 0 gets class 0 (unclassified: it belongs to no class).
    Without class maps every instance is class 1 (single-class data).
    """
    if rule not in CLASS_RULES:
        raise ValueError(f"class rule: expected one of {CLASS_RULES}, got {rule!r}")
    if class_pixels is None:
        return np.ones(n, dtype=np.int64)
    counts = class_pixels[:, 1:]
    present = counts > 0
    if rule == "majority":
        cls = counts.argmax(axis=1) + 1  # argmax returns the first maximum: ties → lower id
    else:
        cls = counts.shape[1] - np.argmax(present[:, ::-1], axis=1)
    return np.where(present.any(axis=1), cls, 0).astype(np.int64)


def as_label_tensor(x, name: str, device: torch.device | str | None = None) -> tuple[torch.Tensor, int]:
    """Validate a label map (instance or class ids); return it as a flat integer tensor and its largest id.

    Accepts numpy arrays or torch tensors of shape (H, W), (1, H, W) or (1, 1, H, W).  Integer and
    boolean maps pass; float maps pass only if every value is an integer.  Negative ids, NaN and
    fractional values raise ``ValueError`` naming ``name``.  The tensor is int32 when the ids allow
    (half the memory traffic of int64), int64 otherwise.
    """
    if isinstance(x, torch.Tensor):
        t = x.as_tensor() if hasattr(x, "as_tensor") else x  # MONAI MetaTensor: drop the metadata
        t = t.detach()
        if device is not None:
            t = t.to(device)
        if t.dtype in (torch.uint16, torch.uint32, torch.uint64):  # few torch kernels take these
            t = t.to(torch.int64)
    elif isinstance(x, np.ndarray):
        if x.dtype == np.uint16:
            x = x.astype(np.int32)
        elif x.dtype == np.uint64 or x.dtype == np.uint32:
            if x.size and x.max() > np.iinfo(np.int64).max:
                raise ValueError(f"{name}: ids above 2**63-1 are not supported")
            x = x.astype(np.int64)
        elif x.dtype.kind not in "biuf":
            raise TypeError(f"{name}: expected an integer label map, got dtype {x.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(x)).to(device or "cpu")
    else:
        raise TypeError(f"{name}: expected a numpy array or torch tensor, got {type(x).__name__}")
    shape = tuple(t.shape)
    while t.ndim > 2 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D label map (H, W) or (1, H, W), got shape {shape}")
    if t.is_complex():
        raise TypeError(f"{name}: expected an integer label map, got dtype {t.dtype}")
    if t.dtype == torch.bool:
        t = t.to(torch.int32)
    if t.is_floating_point():
        if t.numel() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name}: label map holds NaN or infinite values; expected integer ids")
        if t.numel() and not bool((t == torch.round(t)).all()):
            raise ValueError(f"{name}: label map holds non-integral values; expected integer ids (0 = background)")
    if t.numel() == 0:
        return t.reshape(-1).to(torch.int32), 0
    lo, hi = torch.aminmax(t)
    lo, hi = int(lo), int(hi)
    if lo < 0:
        raise ValueError(f"{name}: negative ids (min {lo}); expected 0 = background, 1..N = instances")
    if t.dtype in (torch.uint8, torch.int8, torch.int16) and not t.is_floating_point():
        return t.reshape(-1), hi  # small ids (class maps): promoted inside the index arithmetic, no copy
    dtype = torch.int32 if hi < 2**31 - 1 else torch.int64
    return t.reshape(-1).to(dtype), hi


def _sequential(flat: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Relabel to 0..n (0 stays background); returns (relabelled, original ids of 1..n)."""
    if top <= _LUT_FACTOR * flat.numel():
        present = torch.zeros(top + 1, dtype=torch.bool, device=flat.device)
        present[flat.long()] = True
        present[0] = False
        lut = torch.cumsum(present, 0)
        return lut[flat.long()], torch.nonzero(present).reshape(-1)
    ids, inverse = torch.unique(flat, return_inverse=True)
    if ids.numel() and int(ids[0]) == 0:
        return inverse, ids[1:]
    return inverse + 1, ids


@lru_cache(maxsize=4)
def _pixel_coordinates(h: int, w: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of every pixel, float64 (exact sums up to 2**53), cached per image size."""
    rows = torch.arange(h, device=device, dtype=torch.float64).repeat_interleave(w)
    cols = torch.arange(w, device=device, dtype=torch.float64).repeat(h)
    return rows, cols


def _index_space(flat: torch.Tensor, top: int, relabel: bool):
    """Ids used as table indices: the raw ids (dense enough) or sequential ones."""
    if not relabel:
        return flat, top, None
    seq, ids = _sequential(flat, top)
    return seq, len(ids), ids


@contextmanager
def _one_cpu_thread(device: torch.device):
    """Run the CPU pass on one torch thread: its bincounts and gathers are memory-bound, and intra-op
    threads cost more than they save (measured 5-10x slower on 256² tiles on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def instance_overlaps(
    gt,
    pred,
    gt_types=None,
    pred_types=None,
    num_classes: int | None = None,
    count_region: int | None = None,
    device: torch.device | str | None = None,
) -> Overlaps:
    """Match two instance maps in one pass and return their :class:`Overlaps`.

    Args:
        gt, pred: instance maps (H, W) or (1, H, W), 0 = background; ids need not be sequential.
        gt_types, pred_types: optional per-pixel class maps (0 = background, 1..C) of the same shape.
            Give both or neither.
        num_classes: C; class ids above it raise ``ValueError``.  Default: the largest id present.
        count_region: side of the central square whose instances are counted (CoNIC: 224); None = all.
        device: where to compute for numpy inputs (tensors stay on their device unless given).
    """
    target = torch.device(device) if device is not None else (gt.device if isinstance(gt, torch.Tensor) else torch.device("cpu"))
    with _one_cpu_thread(target):
        return _instance_overlaps(gt, pred, gt_types, pred_types, num_classes, count_region, device)


def _instance_overlaps(
    gt,
    pred,
    gt_types=None,
    pred_types=None,
    num_classes: int | None = None,
    count_region: int | None = None,
    device: torch.device | str | None = None,
) -> Overlaps:
    g, g_top = as_label_tensor(gt, "gt instances", device)
    p, p_top = as_label_tensor(pred, "pred instances", device if device is not None else g.device)
    shape = _shape_of(gt)
    if shape != _shape_of(pred):
        raise ValueError(f"shape mismatch: gt instances {shape} vs pred instances {_shape_of(pred)}")
    if (gt_types is None) != (pred_types is None):
        raise ValueError("class maps: give both gt_types and pred_types, or neither")
    h, w = shape
    dev = g.device
    # Raw ids index the tables directly when they are dense enough; otherwise relabel them 1..n.
    raw_bins = (g_top + 1) * (p_top + 1)
    relabel = raw_bins > min(_DENSE_PAIR_BINS, _RAW_ID_FACTOR * g.numel() + 1024)
    g_idx, g_n, g_ids = _index_space(g.to(torch.int32) if g.element_size() < 4 else g, g_top, relabel)
    p_idx, p_n, p_ids = _index_space(p.to(torch.int32) if p.element_size() < 4 else p, p_top, relabel)
    bins = (g_n + 1) * (p_n + 1)
    rows, cols = _pixel_coordinates(h, w, str(dev))
    if bins <= _DENSE_PAIR_BINS:
        key_type = torch.int32 if bins < 2**31 else torch.int64
        key = g_idx.to(key_type) * (p_n + 1) + p_idx.to(key_type)
        table = torch.bincount(key, minlength=bins).reshape(g_n + 1, p_n + 1)
        gt_area = table[1:].sum(1)
        pred_area = table[:, 1:].sum(0)
        nz = torch.nonzero(table[1:, 1:])
        pair_gt, pair_pred = nz[:, 0], nz[:, 1]
        pair_inter = table[1:, 1:][pair_gt, pair_pred]
        # Coordinate sums per pair, then per instance: two weighted passes serve both maps.
        row_sums = torch.bincount(key, weights=rows, minlength=bins).reshape(g_n + 1, p_n + 1)
        col_sums = torch.bincount(key, weights=cols, minlength=bins).reshape(g_n + 1, p_n + 1)
        g_sums = torch.stack([row_sums[1:].sum(1), col_sums[1:].sum(1)], 1)
        p_sums = torch.stack([row_sums[:, 1:].sum(0), col_sums[:, 1:].sum(0)], 1)
    else:  # very many instances: keep only the overlapping pairs
        gt_area = torch.bincount(g_idx, minlength=g_n + 1)[1:]
        pred_area = torch.bincount(p_idx, minlength=p_n + 1)[1:]
        both = (g_idx > 0) & (p_idx > 0)
        keys, pair_inter = torch.unique((g_idx[both].long() - 1) * p_n + (p_idx[both].long() - 1), return_counts=True)
        pair_gt, pair_pred = keys // p_n, keys % p_n
        g_sums = torch.stack([torch.bincount(g_idx, weights=x, minlength=g_n + 1)[1:] for x in (rows, cols)], 1)
        p_sums = torch.stack([torch.bincount(p_idx, weights=x, minlength=p_n + 1)[1:] for x in (rows, cols)], 1)

    # Index space → instances 0..n-1 in id order (drops ids absent from the map).
    g_present, p_present = gt_area > 0, pred_area > 0
    g_ids = (torch.nonzero(g_present).reshape(-1) + 1) if g_ids is None else g_ids
    p_ids = (torch.nonzero(p_present).reshape(-1) + 1) if p_ids is None else p_ids
    g_lut = torch.cumsum(g_present, 0) - 1
    p_lut = torch.cumsum(p_present, 0) - 1

    def centroids(sums, present, area):
        return (sums[present] / area[present][:, None].to(torch.float64)).cpu().numpy().reshape(-1, 2)

    def np_int(t):
        return t.cpu().numpy().astype(np.int64)

    out = Overlaps(
        shape=(h, w),
        gt_ids=np_int(g_ids),
        pred_ids=np_int(p_ids),
        gt_area=np_int(gt_area[g_present]),
        pred_area=np_int(pred_area[p_present]),
        pair_gt=np_int(g_lut[pair_gt]),
        pair_pred=np_int(p_lut[pair_pred]),
        pair_intersection=np_int(pair_inter),
        gt_centroid=centroids(g_sums, g_present, gt_area),
        pred_centroid=centroids(p_sums, p_present, pred_area),
    )

    if gt_types is not None:
        gt_t, gt_t_top = as_label_tensor(gt_types, "gt types", dev)
        pred_t, pred_t_top = as_label_tensor(pred_types, "pred types", dev)
        for name, x in (("gt types", gt_types), ("pred types", pred_types)):
            if _shape_of(x) != shape:
                raise ValueError(f"shape mismatch: {name} {_shape_of(x)} vs instance maps {shape}")
        top = max(gt_t_top, pred_t_top)
        if num_classes is None:
            num_classes = max(top, 1)
        elif top > num_classes:
            which = "gt types" if gt_t_top > num_classes else "pred types"
            raise ValueError(f"{which}: class id {top} above num_classes={num_classes}; expected 0..{num_classes}")
        k = num_classes + 1

        def histogram(idx, n, present, types):
            hist = torch.bincount(idx * k + types, minlength=(n + 1) * k).reshape(n + 1, k)
            return hist[1:][present].cpu().numpy()

        out.gt_class_pixels = histogram(g_idx, g_n, g_present, gt_t)
        out.pred_class_pixels = histogram(p_idx, p_n, p_present, pred_t)

    if count_region is not None:
        if count_region <= 0:
            raise ValueError(f"count_region: expected a positive side length, got {count_region}")
        r0, c0 = max((h - count_region) // 2, 0), max((w - count_region) // 2, 0)
        window = (slice(r0, r0 + count_region), slice(c0, c0 + count_region))

        def in_region(idx, n, present):
            inside = idx.reshape(h, w)[window].reshape(-1)
            return (torch.bincount(inside, minlength=n + 1)[1:][present] > 0).cpu().numpy()

        out.gt_in_region = in_region(g_idx, g_n, g_present)
        out.pred_in_region = in_region(p_idx, p_n, p_present)
    else:
        out.gt_in_region = np.ones(out.n_gt, dtype=bool)
        out.pred_in_region = np.ones(out.n_pred, dtype=bool)
    return out


def _shape_of(x) -> tuple[int, ...]:
    shape = tuple(x.shape)
    while len(shape) > 2 and shape[0] == 1:
        shape = shape[1:]
    return shape
