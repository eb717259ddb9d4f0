"""Score one image: every per-image value and additive count that the dataset metrics are built from.

:func:`score_image` runs the overlap pass once (:func:`cellgap.metrics.matching.instance_overlaps`)
and reads from it the binary scores (PQ, DQ, SQ, AJI, AJI+, Dice), the class-wise PQ counts, the
centroid detection pairs, the HoVer-Net per-class F1 counts and the per-class instance counts.
Nothing here depends on the other images; :mod:`cellgap.metrics.aggregation` combines images.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import classification, detection, instance
from .matching import instance_overlaps
from .protocol import Protocol

SCALARS = ("pq", "dq", "sq", "aji", "aji+", "dice", "mpq")
COUNTS = ("n_gt", "n_pred", "tp", "fp", "fn", "iou_sum", "det_tp", "det_fp", "det_fn", "type_paired", "type_correct")


@dataclass
class ImageScore:
    """One image's scores.  Per-image scores of an image without GT instances are NaN (``empty``)."""

    image_id: str
    tissue: str
    empty: bool
    values: dict[str, float]  # SCALARS (NaN if empty) and COUNTS
    class_pq: np.ndarray  # (C,) per-class PQ, NaN for classes absent from the GT
    pq_counts: np.ndarray  # (C, 4) tp, fp, fn, iou_sum
    f1_counts: np.ndarray  # (C, 5) tp, fp, fn, fp_d, fn_d
    count_gt: np.ndarray  # (C,) instances per class in the counting region
    count_pred: np.ndarray  # (C,)
    extra: dict = field(default_factory=dict)


def score_image(
    gt_instances,
    pred_instances,
    gt_types=None,
    pred_types=None,
    *,
    num_classes: int = 1,
    protocol: Protocol,
    image_id: str = "",
    tissue: str = "",
    device=None,
) -> ImageScore:
    """Score one image.

    Args:
        gt_instances, pred_instances: instance maps (H, W) or (1, H, W), numpy or torch (CUDA stays on GPU).
        gt_types, pred_types: per-pixel class maps 0..C, or both None (single class: every instance is class 1).
            An instance covering several classes takes ``protocol.class_rule`` (pixel majority, ties →
            lower id; or ``"max"``); one covering only class 0 is unclassified (in no class).
        num_classes: C, background excluded.
        protocol: thresholds, radius, class rules, counting region and eps.
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes: expected a positive integer, got {num_classes!r}")
    ov = instance_overlaps(gt_instances, pred_instances, gt_types, pred_types, num_classes=num_classes,
                           count_region=protocol.count_region, device=device)
    where = f"image {image_id!r}" if image_id else "image"
    if ov.gt_class_pixels is None and num_classes > 1:
        raise ValueError(f"{where}: {num_classes} classes need gt_types and pred_types class maps")
    gt_cls = ov.gt_classes(protocol.class_rule)
    pred_cls = ov.pred_classes(protocol.class_rule)
    gt_cls_f1 = ov.gt_classes(protocol.f1_class_rule)

    pq = instance.panoptic_quality(ov, protocol.iou_threshold, protocol.eps)
    pq_counts = classification.class_pq_counts(ov, gt_cls, pred_cls, num_classes, protocol.iou_threshold)
    class_pq = classification.image_class_pq(pq_counts, protocol.eps)
    pair_g, pair_p = detection.pair_centroids(ov.gt_centroid, ov.pred_centroid, protocol.detection_radius)
    f1_counts = classification.type_f1_counts(gt_cls_f1, pred_cls, pair_g, pair_p, num_classes)

    empty = ov.n_gt == 0
    nan = float("nan")
    values = {
        "pq": nan if empty else pq["pq"],
        "dq": nan if empty else pq["dq"],
        "sq": nan if empty else pq["sq"],
        "aji": nan if empty else instance.aji(ov),
        "aji+": nan if empty else instance.aji_plus(ov),
        "dice": nan if empty else instance.dice(ov),
        "mpq": nan if empty or np.isnan(class_pq).all() else float(np.nanmean(class_pq)),
        "n_gt": ov.n_gt,
        "n_pred": ov.n_pred,
        "tp": pq["tp"],
        "fp": pq["fp"],
        "fn": pq["fn"],
        "iou_sum": pq["iou_sum"],
        "det_tp": len(pair_g),
        "det_fp": ov.n_pred - len(pair_g),
        "det_fn": ov.n_gt - len(pair_g),
        "type_paired": len(pair_g),
        "type_correct": int((gt_cls_f1[pair_g] == pred_cls[pair_p]).sum()),
    }
    return ImageScore(
        image_id=str(image_id),
        tissue=str(tissue),
        empty=bool(empty),
        values=values,
        class_pq=class_pq,
        pq_counts=pq_counts,
        f1_counts=f1_counts,
        count_gt=classification.class_counts(gt_cls, ov.gt_in_region, num_classes),
        count_pred=classification.class_counts(pred_cls, ov.pred_in_region, num_classes),
    )

