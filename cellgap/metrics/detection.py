"""Centroid detection matching (HoVer-Net / CoNIC convention, METHOD §5 and §10.15).

GT and predicted centroids (row, col; the mean pixel position, as ``regionprops``) are paired by a
Hungarian assignment that minimises the summed Euclidean distance over *all* centroids; pairs
farther apart than the radius are dropped afterwards.  The radius is 12 px at 40x and 6 px at 20x:
take it from ``cellgap.magnification.profile_for(...).detection_radius``.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist


def check_radius(radius: float) -> float:
    if isinstance(radius, bool) or not isinstance(radius, (int, float, np.floating, np.integer)) or not math.isfinite(radius) or radius <= 0:
        raise ValueError(f"detection radius: expected a positive number of pixels, got {radius!r}")
    return float(radius)


def pair_centroids(gt_xy: np.ndarray, pred_xy: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices (gt, pred) of the centroid pairs kept after the Hungarian assignment and the radius cut.

    The assignment is done first, without the radius, and pairs with distance > ``radius`` are
    removed after (so a far pair can occupy a centroid that a nearer, unassigned one could have used).
    """
    radius = check_radius(radius)
    gt_xy = np.asarray(gt_xy, dtype=np.float64).reshape(-1, 2)
    pred_xy = np.asarray(pred_xy, dtype=np.float64).reshape(-1, 2)
    if len(gt_xy) == 0 or len(pred_xy) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    dist = cdist(gt_xy, pred_xy)
    rows, cols = linear_sum_assignment(dist)
    keep = dist[rows, cols] <= radius
    return rows[keep].astype(np.int64), cols[keep].astype(np.int64)


def detection_counts(gt_xy: np.ndarray, pred_xy: np.ndarray, radius: float) -> dict[str, int]:
    """TP, FP and FN of one image's centroid matching (pool them over images before taking ratios)."""
    g, _ = pair_centroids(gt_xy, pred_xy, radius)
    tp = len(g)
    return {"tp": tp, "fp": len(np.asarray(pred_xy).reshape(-1, 2)) - tp, "fn": len(np.asarray(gt_xy).reshape(-1, 2)) - tp}

