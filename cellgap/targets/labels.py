"""Instance maps as the target code reads them: the input check and compact id ranges."""

from __future__ import annotations

import numpy as np
import torch


def instance_map(label, name: str = "label") -> np.ndarray:
    """Return ``label`` as a 2-D integer numpy array, or raise naming ``name`` and what was expected."""
    if isinstance(label, torch.Tensor):
        label = label.detach().cpu().numpy()
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (H, W) instance map, got shape {label.shape}")
    if label.dtype == bool:
        return label.astype(np.int32)
    if label.dtype.kind in "iu":
        if label.dtype.kind == "i" and label.size and label.min() < 0:
            raise ValueError(f"{name}: expected an instance map with ids ≥ 0 (0 = background), found negative id {label.min()}")
        return label
    if label.dtype.kind == "f":
        with np.errstate(invalid="ignore"):  # NaN, inf and out-of-range values fail the check below
            ints = label.astype(np.int32)
        # Compared in the label's own float dtype (exact for int32 values): no float64 temporaries.
        if label.size and ints.min() >= 0 and np.array_equal(ints.astype(label.dtype), label):
            return ints
        if not np.all(np.isfinite(label)):
            raise ValueError(f"{name}: expected an integer-valued instance map, found NaN or infinite values")
        if not np.array_equal(label, np.round(label)):
            raise ValueError(
                f"{name}: expected an integer-valued instance map, found non-integer values (e.g. interpolated labels)"
            )
        if label.size and label.min() < 0:
            raise ValueError(f"{name}: expected an instance map with ids ≥ 0 (0 = background), found negative id {label.min()}")
        return label.astype(np.int64)
    raise TypeError(f"{name}: expected an integer instance map, got dtype {label.dtype}")


def compact_ids(label: np.ndarray) -> tuple[np.ndarray, int]:
    """Map the ids of ``label`` to a small non-negative range, so that per-id arrays stay short.

    Returns (map with ids in 0..n, n). Consecutive maps (the usual case) pass through unchanged.
    """
    top = int(label.max()) if label.size else 0
    if top <= 4 * label.size + 16:
        return label, top
    return dense_ids(label)


def dense_ids(label: np.ndarray) -> tuple[np.ndarray, int]:
    """Renumber the ids of ``label`` to 0..n in increasing order (0 stays 0)."""
    ids, inverse = np.unique(label, return_inverse=True)
    if ids[0] != 0:
        inverse = inverse + 1
    inverse = inverse.reshape(label.shape)
    return inverse, int(inverse.max())


def small_id_dtype(label: np.ndarray) -> np.ndarray:
    top = int(label.max()) if label.size else 0
    for dtype in (np.uint8, np.uint16, np.uint32):
        if top < np.iinfo(dtype).max:
            return label.astype(dtype, copy=False)
    return label.astype(np.uint64, copy=False)
