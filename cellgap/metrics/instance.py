"""Binary instance-segmentation metrics of one image, read from its :class:`Overlaps` (METHOD §5).

* PQ/DQ/SQ: a GT and a predicted instance pair iff IoU > 0.5 (such pairs are unique);
  DQ = TP / (TP + FP/2 + FN/2), SQ = ΣIoU / TP, PQ = DQ·SQ.
* AJI (MoNuSeg / HoVer-Net "fast AJI"): each GT instance takes the prediction of largest IoU
  (reuse allowed, IoU = 0 drops the pair); AJI = Σ∩ / (Σ∪ + unpaired GT area + unused prediction area).
* AJI+: as AJI with a one-to-one matching that maximises the summed IoU (pairs with IoU > 0).
* Dice: binary foreground Dice, 2|G∩P| / (|G| + |P|).

Conventions: ratios are exact (``eps`` = 0) unless ``eps`` is given, which is added to the DQ and
SQ denominators as CISCA (1e-6) and cellseg-metrics (1e-8) do.  A ratio whose denominator is 0
is 0 when the image has cells on either side, and NaN when both maps are empty (nothing to score).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .matching import Overlaps, instance_overlaps


def _ratio(num: float, den: float, empty: bool) -> float:
    if empty:
        return float("nan")
    return float(num / den) if den > 0 else 0.0


def matched_pairs(ov: Overlaps, iou_threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The unique (GT index, prediction index, IoU) pairs with IoU > ``iou_threshold`` (≥ 0.5).

    Below 0.5 a GT instance may exceed the threshold with several predictions and the matching is
    no longer unique; peers then disagree (Hungarian on IoU vs on the pair count), so it is refused.
    """
    if not 0.5 <= iou_threshold < 1:
        raise ValueError(f"iou_threshold: expected a value in [0.5, 1) so that matches are unique, got {iou_threshold}")
    iou = ov.pair_iou
    keep = iou > iou_threshold
    return ov.pair_gt[keep], ov.pair_pred[keep], iou[keep]


def panoptic_quality(ov: Overlaps, iou_threshold: float = 0.5, eps: float = 0.0) -> dict[str, float]:
    """PQ, DQ, SQ and their counts (tp, fp, fn, iou_sum) for one image.

    Both maps empty: pq/dq/sq are NaN.  ``eps`` is added to the DQ and SQ denominators (default: exact).
    """
    _, _, iou = matched_pairs(ov, iou_threshold)
    tp = len(iou)
    fp, fn = ov.n_pred - tp, ov.n_gt - tp
    iou_sum = float(iou.sum())
    empty = ov.n_gt == 0 and ov.n_pred == 0
    dq = _ratio(tp, tp + 0.5 * fp + 0.5 * fn + eps, empty)
    sq = _ratio(iou_sum, tp + eps, empty)
    return {"pq": dq * sq, "dq": dq, "sq": sq, "tp": tp, "fp": fp, "fn": fn, "iou_sum": iou_sum}


def aji_from_pairs(ov: Overlaps, pair_index: np.ndarray) -> float:
    """Σ∩ / (Σ∪ + unpaired GT area + unused prediction area) for the chosen pairs (indices into the pair list)."""
    gt_idx, pred_idx = ov.pair_gt[pair_index], ov.pair_pred[pair_index]
    inter = ov.pair_intersection[pair_index]
    union = ov.gt_area[gt_idx] + ov.pred_area[pred_idx] - inter
    used_gt = np.zeros(ov.n_gt, bool)
    used_gt[gt_idx] = True
    used_pred = np.zeros(ov.n_pred, bool)
    used_pred[pred_idx] = True
    total_union = union.sum() + ov.gt_area[~used_gt].sum() + ov.pred_area[~used_pred].sum()
    return _ratio(inter.sum(), total_union, ov.n_gt == 0 and ov.n_pred == 0)


def aji(ov: Overlaps) -> float:
    """Aggregated Jaccard Index: each GT takes its largest-IoU prediction (ties → lower prediction id)."""
    return aji_from_pairs(ov, largest_iou_pairs(ov))


def largest_iou_pairs(ov: Overlaps) -> np.ndarray:
    """For each GT instance with an overlap, the pair of largest IoU (ties → lower prediction id)."""
    order = np.lexsort((ov.pair_pred, -ov.pair_iou, ov.pair_gt))
    first = np.ones(len(order), bool)
    first[1:] = ov.pair_gt[order][1:] != ov.pair_gt[order][:-1]
    return order[first]


def max_iou_matching(ov: Overlaps) -> np.ndarray:
    """Indices into the pair list of a one-to-one matching that maximises the summed IoU.

    Zero-IoU pairs never help, so the problem splits into the connected components of the overlap
    graph; components with one pair are matched directly and only the others go to
    ``scipy.optimize.linear_sum_assignment`` (which the full dense problem would need otherwise).
    """
    n_pairs = len(ov.pair_gt)
    if n_pairs == 0:
        return np.zeros(0, np.int64)
    # A pair whose GT and prediction overlap nothing else is its own component: take it directly.
    lone = (np.bincount(ov.pair_gt, minlength=ov.n_gt)[ov.pair_gt] == 1) & (np.bincount(ov.pair_pred, minlength=ov.n_pred)[ov.pair_pred] == 1)
    chosen = [np.flatnonzero(lone)]
    rest = np.flatnonzero(~lone)
    if len(rest) == 0:
        return chosen[0]
    graph = coo_matrix((np.ones(len(rest)), (ov.pair_gt[rest], ov.n_gt + ov.pair_pred[rest])), shape=(ov.n_gt + ov.n_pred,) * 2)
    _, comp = connected_components(graph, directed=False)
    # Every other pair shares its GT or prediction with another: components of two or more pairs.
    comps = comp[ov.pair_gt[rest]]
    order = np.argsort(comps, kind="stable")
    multi, comps = rest[order], comps[order]
    iou = ov.pair_iou
    # Row/column of each pair inside its component's small IoU matrix, for all components at once.
    _, g_rank = np.unique(comps.astype(np.int64) * ov.n_gt + ov.pair_gt[multi], return_inverse=True)
    _, p_rank = np.unique(comps.astype(np.int64) * ov.n_pred + ov.pair_pred[multi], return_inverse=True)
    starts = np.r_[0, np.flatnonzero(np.diff(comps)) + 1]
    ends = np.r_[starts[1:], len(multi)]
    g_count = np.maximum.reduceat(g_rank, starts) - np.minimum.reduceat(g_rank, starts) + 1
    p_count = np.maximum.reduceat(p_rank, starts) - np.minimum.reduceat(p_rank, starts) + 1
    # A star (one GT or one prediction in the component) keeps only its best pair.
    is_star = (g_count == 1) | (p_count == 1)
    star = np.repeat(is_star, ends - starts)
    if star.any():
        order = np.lexsort((-iou[multi[star]], comps[star]))
        first = np.r_[True, np.diff(comps[star][order]) != 0]
        chosen.append(multi[star][order][first])
    for a, b in zip(starts[~is_star], ends[~is_star]):
        rows, cols = g_rank[a:b] - g_rank[a:b].min(), p_rank[a:b] - p_rank[a:b].min()
        weights = np.zeros((rows.max() + 1, cols.max() + 1))
        weights[rows, cols] = iou[multi[a:b]]
        r, c = linear_sum_assignment(weights, maximize=True)
        slot = np.full(weights.shape, -1)
        slot[rows, cols] = multi[a:b]
        picked = slot[r, c]
        chosen.append(picked[picked >= 0])
    return np.sort(np.concatenate(chosen))


def aji_plus(ov: Overlaps) -> float:
    """AJI+: AJI with a one-to-one matching of maximum summed IoU (pairs with IoU > 0)."""
    return aji_from_pairs(ov, max_iou_matching(ov))


def dice(ov: Overlaps) -> float:
    """Binary foreground Dice; every foreground∩foreground pixel lies in exactly one overlapping pair."""
    total = ov.gt_area.sum() + ov.pred_area.sum()
    return _ratio(2 * ov.pair_intersection.sum(), total, total == 0)


def instance_metrics(gt, pred, iou_threshold: float = 0.5, eps: float = 0.0) -> dict[str, float]:
    """PQ, DQ, SQ, AJI, AJI+ and Dice of two instance maps (numpy or torch, CPU or CUDA)."""
    ov = instance_overlaps(gt, pred)
    out = panoptic_quality(ov, iou_threshold, eps)
    out.update(aji=aji(ov), aji_plus=aji_plus(ov), dice=dice(ov))
    return out
