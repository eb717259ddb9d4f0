"""Per-class metrics: class-wise PQ (mPQ, mPQ+), HoVer-Net per-class F1 and instance counts (R²).

Every instance carries one class (see :func:`cellgap.metrics.matching.instance_classes`: pixel
majority, ties → lower id; or the largest id, ``"max"``).  The class-c instance map is then the
set of class-c instances with all their pixels, so its overlaps are a subset of the binary ones:
class-wise PQ is read from the binary IoU > 0.5 pairs whose two instances are both class c, with no
further pass over the image.  (CoNIC and MONAI mask the instance map pixel by pixel with the class
map; for class maps consistent with the instance map — one class per instance — both agree.)
"""

from __future__ import annotations

import numpy as np

from .instance import matched_pairs
from .matching import Overlaps

PQ_COUNTS = ("tp", "fp", "fn", "iou_sum")
F1_COUNTS = ("tp", "fp", "fn", "fp_d", "fn_d")


def _per_class(values: np.ndarray, num_classes: int, weights=None) -> np.ndarray:
    """Sum ``weights`` (or count) per class 1..C; class 0 (unclassified) is dropped."""
    return np.bincount(values, weights=weights, minlength=num_classes + 1)[1 : num_classes + 1].astype(np.float64)


def class_pq_counts(ov: Overlaps, gt_cls: np.ndarray, pred_cls: np.ndarray, num_classes: int, iou_threshold: float = 0.5) -> np.ndarray:
    """(C, 4) array of per-class [tp, fp, fn, iou_sum] for one image."""
    g, p, iou = matched_pairs(ov, iou_threshold)
    same = gt_cls[g] == pred_cls[p]
    tp = _per_class(gt_cls[g][same], num_classes)
    iou_sum = _per_class(gt_cls[g][same], num_classes, iou[same])
    n_gt = _per_class(gt_cls, num_classes)
    n_pred = _per_class(pred_cls, num_classes)
    return np.stack([tp, n_pred - tp, n_gt - tp, iou_sum], axis=-1)


def pq_from_counts(tp, fp, fn, iou_sum, eps: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pq, dq, sq) from counts of any shape; NaN where there is nothing to score (tp = fp = fn = 0).

    ``eps`` is added to the DQ and SQ denominators (CISCA 1e-6); SQ without a true positive is 0.
    """
    tp, fp, fn, iou_sum = (np.asarray(a, dtype=np.float64) for a in (tp, fp, fn, iou_sum))
    den = tp + 0.5 * fp + 0.5 * fn + eps
    some = (tp + fp + fn) > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        dq = np.where(some, tp / np.where(den > 0, den, 1), np.nan)
        sq = np.where(some, np.where(tp + eps > 0, iou_sum / np.where(tp + eps > 0, tp + eps, 1), 0.0), np.nan)
    return dq * sq, dq, sq


def image_class_pq(counts: np.ndarray, eps: float = 0.0) -> np.ndarray:
    """Per-class PQ of one image, PanNuke style: NaN for classes absent from the GT (FPs of them ignored)."""
    pq, _, _ = pq_from_counts(*counts.T, eps=eps)
    n_gt = counts[:, 0] + counts[:, 2]
    return np.where(n_gt > 0, pq, np.nan)


def type_f1_counts(gt_cls: np.ndarray, pred_cls: np.ndarray, pair_gt: np.ndarray, pair_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, 5) array of per-class [tp, fp, fn, fp_d, fn_d] of one image, from detection pairs.

    Among paired instances whose GT or prediction is class c: tp = both c, fp = prediction c but GT
    not, fn = GT c but prediction not.  fp_d / fn_d = unpaired predictions / GT instances of class c.
    """
    g, p = gt_cls[pair_gt], pred_cls[pair_pred]
    same = g == p
    tp = _per_class(g[same], num_classes)
    fp = _per_class(p[~same], num_classes)
    fn = _per_class(g[~same], num_classes)
    gt_free = np.ones(len(gt_cls), bool)
    gt_free[pair_gt] = False
    pred_free = np.ones(len(pred_cls), bool)
    pred_free[pair_pred] = False
    return np.stack([tp, fp, fn, _per_class(pred_cls[pred_free], num_classes), _per_class(gt_cls[gt_free], num_classes)], axis=-1)


def type_f1_scores(counts: np.ndarray) -> dict[str, np.ndarray]:
    """HoVer-Net per-class F1, precision and recall from pooled (…, 5) counts [tp, fp, fn, fp_d, fn_d].

    F1 = 2TP / (2TP + 2FP + 2FN + FP_d + FN_d) (HoVer-Net weights 2,2,1,1; TN is always 0 because
    pairs are first restricted to "GT or prediction is c"); P = TP / (TP + 2FP + FP_d);
    R = TP / (TP + 2FN + FN_d).  NaN where a denominator is 0.
    """
    tp, fp, fn, fpd, fnd = (counts[..., k] for k in range(5))

    def div(a, b):
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(b > 0, a / np.where(b > 0, b, 1), np.nan)

    return {
        "f1": div(2 * tp, 2 * tp + 2 * fp + 2 * fn + fpd + fnd),
        "precision": div(tp, tp + 2 * fp + fpd),
        "recall": div(tp, tp + 2 * fn + fnd),
    }


def class_counts(cls: np.ndarray, in_region: np.ndarray, num_classes: int) -> np.ndarray:
    """Number of instances of each class 1..C inside the counting region."""
    return _per_class(cls[in_region], num_classes)


def r2_score(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Coefficient of determination along axis 0 (one value per column), as ``sklearn.metrics.r2_score``
    with ``multioutput="raw_values"``: 1 − SS_res/SS_tot; when SS_tot = 0 it is 1 for a perfect fit
    and 0 otherwise; NaN with no rows."""
    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    if len(y_true) == 0:
        return np.full(y_true.shape[1:], np.nan)
    ss_res = ((y_true - y_pred) ** 2).sum(0)
    ss_tot = ((y_true - y_true.mean(0)) ** 2).sum(0)
    return r2_from_sums(ss_res, ss_tot)


def r2_from_sums(ss_res, ss_tot) -> np.ndarray:
    ss_res, ss_tot = np.asarray(ss_res, np.float64), np.asarray(ss_tot, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        r2 = 1 - ss_res / np.where(ss_tot > 0, ss_tot, 1)
    return np.where(ss_tot > 0, r2, np.where(ss_res > 0, 0.0, 1.0))
