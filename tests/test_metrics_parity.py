"""Parity of cellgap.metrics with two independent implementations on 240 generated label-map pairs:
cellseg-metrics (PyPI) and MONAI's compute_panoptic_quality / PanopticQualityMetric.

Where the definitions coincide the values agree to 1e-9 (integer counts exactly); where they differ
by convention, each test rebuilds the reference value from our exact quantities *plus that
convention* (epsilon smoothing, float32 IoU, empty maps → 0, largest-intersection AJI pairing,
per-pixel class masking) and shows it matches.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

cellseg = pytest.importorskip("cellseg_metrics")
from cellseg_metrics import binary_metrics as cs_binary  # noqa: E402
from monai.metrics import PanopticQualityMetric, compute_panoptic_quality  # noqa: E402

from cellgap.metrics import instance  # noqa: E402
from cellgap.metrics.matching import instance_overlaps  # noqa: E402
from cellgap.testing.synthetic_pairs import (  # noqa: E402
    perturb,
    perturb_classes,
    random_classes,
    random_instances,
    relabel_randomly,
)

N_CLASSES = 4
CS_EPS = 1e-8  # cellseg-metrics' default epsilon (IoU, DQ, SQ and AJI denominators)
MONAI_SMOOTH = 1e-6  # MONAI's smooth_numerator (added to PQ/SQ/RQ denominators)


def _cases() -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """(name, gt, pred, gt_classes, pred_classes); class maps consistent with the instance maps."""
    rng = np.random.default_rng(1234)
    cases = []
    for k in range(216):
        side = int(rng.choice([48, 64, 80]))
        n = int(rng.integers(1, 16))
        gt = random_instances((side, side), n, rng, radius=(1.5, 8.0))  # touching, tiny and overwritten cells
        pred = perturb(gt, rng, p_drop=0.1, p_split=0.15, p_merge=0.15, n_false=int(rng.integers(0, 4)),
                       n_specks=int(rng.integers(0, 3)))
        if k % 3 == 0:  # non-sequential ids on both sides
            gt, pred = relabel_randomly(gt, rng), relabel_randomly(pred, rng)
        gt_cls = random_classes(gt, N_CLASSES, rng)
        cases.append((f"random{k}", gt, pred, gt_cls, perturb_classes(pred, gt_cls, N_CLASSES, rng)))
    empty = np.zeros((64, 64), np.int32)
    some = random_instances((64, 64), 6, rng)
    specks = np.zeros((64, 64), np.int32)
    specks[rng.integers(0, 64, 12), rng.integers(0, 64, 12)] = np.arange(1, 13)  # single-pixel cells
    halo = specks.copy()
    halo[np.nonzero(specks)] = 0
    shifted = np.roll(specks, 1, axis=1)
    touching = np.zeros((64, 64), np.int32)
    touching[10:30, 10:20], touching[10:30, 20:30], touching[10:30, 30:40] = 5, 9, 200
    merged = np.where(touching > 0, 3, 0).astype(np.int32)
    split = touching.copy()
    split[10:20, 10:40] = np.where(split[10:20, 10:40] > 0, split[10:20, 10:40] + 1000, 0)
    for name, g, p in [("both empty", empty, empty), ("gt empty", empty, some), ("pred empty", some, empty),
                       ("identical", some, some), ("single pixels", specks, specks), ("single pixels shifted", specks, shifted),
                       ("touching vs merged", touching, merged), ("merged vs touching", merged, touching),
                       ("touching vs split", touching, split), ("split vs touching", split, touching),
                       ("ids 1 and 2**20", np.where(some > 0, some + 2**20, 0).astype(np.int64), some)]:
        for rep in range(2):
            gc = random_classes(g, N_CLASSES, rng)
            cases.append((f"{name}#{rep}", g, p, gc, perturb_classes(p, gc, N_CLASSES, rng)))
    return cases


CASES = _cases()


def _monai(gt, pred, **kwargs):
    return compute_panoptic_quality(torch.as_tensor(pred.astype(np.int64)), torch.as_tensor(gt.astype(np.int64)), **kwargs)


@pytest.fixture(scope="module")
def refs():
    """Each reference run once per case (they loop over instances in Python and dominate the test time)."""
    import cellseg_metrics.functional as csf

    out = []
    for _, gt, pred, _, _ in CASES:
        r = {"stats": cellseg.pairwise_pixel_stats(gt, pred), "pq": cellseg.panoptic_quality(gt, pred),
             "aji": cellseg.aggregated_jaccard_index(gt, pred), "monai_cm": _monai(gt, pred, output_confusion_matrix=True),
             "monai_pq": float(_monai(gt, pred, metric_name="pq"))}
        original = csf.iou_score
        csf.iou_score = lambda tp, fp, fn: cs_binary.iou_score(tp, fp, fn, eps=0.0)  # every epsilon off
        try:
            with np.errstate(invalid="ignore", divide="ignore"):  # its SQ is 0/0 without a match
                r["pq_no_eps"] = csf.panoptic_quality(gt, pred, eps=0.0)
        finally:
            csf.iou_score = original
        out.append(r)
    return out


def test_there_are_at_least_200_cases_covering_the_edge_cases():
    assert len(CASES) >= 200
    names = " ".join(c[0] for c in CASES)
    for needed in ("both empty", "gt empty", "pred empty", "single pixels", "touching vs merged", "touching vs split"):
        assert needed in names
    assert sum(len(np.unique(c[1])) > 1 and np.unique(c[1])[-1] > 1000 for c in CASES) > 50  # non-sequential ids


def test_pair_table_equals_cellseg_pairwise_pixel_stats_exactly(refs):
    for (name, gt, pred, _, _), ref in zip(CASES, refs):
        ov = instance_overlaps(gt, pred)
        stats = ref["stats"]
        if not stats:  # cellseg returns [] if either map is empty
            assert ov.n_gt == 0 or ov.n_pred == 0, name
            continue
        tp, fp, fn = stats
        inter = np.zeros((ov.n_gt, ov.n_pred))
        inter[ov.pair_gt, ov.pair_pred] = ov.pair_intersection
        union = np.zeros_like(inter)
        union[ov.pair_gt, ov.pair_pred] = ov.pair_union
        np.testing.assert_array_equal(inter, tp, err_msg=name)
        np.testing.assert_array_equal(union, tp + fp + fn, err_msg=name)


def _cellseg_convention_pq(ov) -> dict:
    """Our PQ recomputed with cellseg's conventions: IoU = ∩/(∪+eps), eps in DQ/SQ, 0 for an empty side."""
    if ov.n_gt == 0 or ov.n_pred == 0:
        return {"pq": 0.0, "dq": 0.0, "sq": 0.0}
    iou = ov.pair_intersection / (ov.pair_union + CS_EPS)
    iou = iou[iou > 0.5]
    tp = len(iou)
    fp, fn = ov.n_pred - tp, ov.n_gt - tp
    dq = tp / (tp + 0.5 * fp + 0.5 * fn + CS_EPS)
    sq = iou.sum() / (tp + CS_EPS)
    return {"pq": dq * sq, "dq": dq, "sq": sq}


def test_pq_dq_sq_match_cellseg_and_differ_only_by_its_epsilon_and_empty_map_conventions(refs):
    max_gap = 0.0
    for (name, gt, pred, _, _), r in zip(CASES, refs):
        ov = instance_overlaps(gt, pred)
        ref = r["pq"]
        expected = _cellseg_convention_pq(ov)
        ours = instance.panoptic_quality(ov)
        for key in ("pq", "dq", "sq"):
            assert ref[key] == pytest.approx(expected[key], abs=1e-12), (name, key)
            if ov.n_gt == 0 and ov.n_pred == 0:
                assert np.isnan(ours[key]), name  # ours: nothing to score; cellseg: 0
            elif ov.n_gt and ov.n_pred:
                max_gap = max(max_gap, abs(ours[key] - ref[key]))
            else:
                assert ours[key] == ref[key] == 0.0, name
    assert max_gap < 1e-6  # the epsilon's whole effect


def test_pq_equals_cellseg_to_1e9_with_its_epsilon_switched_off(refs):
    # cellseg's IoU epsilon is a default argument of iou_score; with every epsilon at 0 the definitions coincide.
    for (name, gt, pred, _, _), r in zip(CASES, refs):
        ov = instance_overlaps(gt, pred)
        if ov.n_gt == 0 or ov.n_pred == 0:
            continue
        ref = r["pq_no_eps"]
        ours = instance.panoptic_quality(ov)
        for key in ("pq", "dq", "sq"):
            ref_value = ref[key] if np.isfinite(ref[key]) else 0.0  # 0/0 SQ without a match: ours defines 0
            assert ours[key] == pytest.approx(ref_value, abs=1e-9), (name, key)


def _cellseg_convention_aji(ov) -> float:
    """AJI with cellseg's pairing: each GT takes *every* prediction of largest intersection; eps in the denominator."""
    if ov.n_gt == 0 or ov.n_pred == 0:
        return 0.0
    inter = ov.pair_intersection
    best = np.zeros(ov.n_gt)
    np.maximum.at(best, ov.pair_gt, inter)
    chosen = np.flatnonzero(inter == best[ov.pair_gt])
    g, p = ov.pair_gt[chosen], ov.pair_pred[chosen]
    union = (ov.gt_area[g] + ov.pred_area[p] - inter[chosen]).sum()
    union += ov.gt_area[np.setdiff1d(np.arange(ov.n_gt), g)].sum() + ov.pred_area[np.setdiff1d(np.arange(ov.n_pred), p)].sum()
    return inter[chosen].sum() / (union + CS_EPS)


def test_aji_matches_cellseg_where_largest_intersection_is_largest_iou_and_otherwise_by_its_pairing_rule(refs):
    same_pairing = differs = 0
    for (name, gt, pred, _, _), r in zip(CASES, refs):
        ov = instance_overlaps(gt, pred)
        ref = r["aji"]
        assert ref == pytest.approx(_cellseg_convention_aji(ov), abs=1e-12), name
        if ov.n_gt == 0:
            continue
        ours = instance.aji(ov)
        if ov.n_pred == 0:
            assert ours == ref == 0.0
            continue
        # Same pairing (largest intersection unique and also largest IoU for every GT): equal up to eps.
        by_iou = instance.largest_iou_pairs(ov)
        inter = ov.pair_intersection
        best = np.zeros(ov.n_gt)
        np.maximum.at(best, ov.pair_gt, inter)
        by_inter = np.flatnonzero(inter == best[ov.pair_gt])
        if np.array_equal(np.sort(by_iou), by_inter):
            same_pairing += 1
            g, p = ov.pair_gt[by_iou], ov.pair_pred[by_iou]
            total = (ov.pair_union[by_iou].sum() + ov.gt_area[np.setdiff1d(np.arange(ov.n_gt), g)].sum()
                     + ov.pred_area[np.setdiff1d(np.arange(ov.n_pred), p)].sum())
            assert ours == pytest.approx(ref * (total + CS_EPS) / total, abs=1e-9), name
        else:
            differs += 1
            assert ours == pytest.approx(instance.aji_from_pairs(ov, by_iou), abs=0)
    assert same_pairing > 100 and differs > 5  # both situations are exercised


def test_binary_dice_matches_cellseg_dice_coef_up_to_its_epsilon():
    for name, gt, pred, _, _ in CASES:
        ov = instance_overlaps(gt, pred)
        ref = cs_binary.dice_coef(*cs_binary.get_stats((gt > 0).astype(np.uint8), (pred > 0).astype(np.uint8)))
        total = ov.gt_area.sum() + ov.pred_area.sum()
        ours = instance.dice(ov)
        if total == 0:
            assert np.isnan(ours) and ref == 0.0, name
        else:
            assert ours * total / (total + CS_EPS) == pytest.approx(ref, abs=1e-12), name


def test_pq_counts_equal_monai_and_its_iou_sum_is_our_iou_in_float32(refs):
    for (name, gt, pred, _, _), r in zip(CASES, refs):
        ov = instance_overlaps(gt, pred)
        ref = r["monai_cm"]
        ours = instance.panoptic_quality(ov)
        assert [int(ref[0]), int(ref[1]), int(ref[2])] == [ours["tp"], ours["fp"], ours["fn"]], name
        # MONAI's pairwise IoU table is float32: the same IoUs rounded to float32 and summed in float32.
        _, _, iou = instance.matched_pairs(ov)
        assert float(ref[3]) == float(torch.as_tensor(iou, dtype=torch.float32).sum()), name
        assert abs(float(ref[3]) - ours["iou_sum"]) <= 1e-6 * max(ours["tp"], 1), name


def test_pq_equals_monai_formula_with_its_smoothing(refs):
    for (name, gt, pred, _, _), r in zip(CASES, refs):
        ov = instance_overlaps(gt, pred)
        cm = r["monai_cm"]
        ref = {"pq": r["monai_pq"], "rq": float(cm[0]) / (float(cm[0]) + 0.5 * float(cm[1]) + 0.5 * float(cm[2]) + MONAI_SMOOTH)}
        ours = instance.panoptic_quality(ov)
        tp, fp, fn = ours["tp"], ours["fp"], ours["fn"]
        _, _, iou = instance.matched_pairs(ov)
        iou_sum32 = float(torch.as_tensor(iou, dtype=torch.float32).sum())
        den = tp + 0.5 * fp + 0.5 * fn
        # MONAI: PQ = ΣIoU/(TP + FP/2 + FN/2 + s) — the same as DQ·SQ when s = 0.
        assert ref["pq"] == pytest.approx(iou_sum32 / (den + MONAI_SMOOTH), rel=1e-6, abs=1e-7), name
        assert ref["rq"] == pytest.approx(tp / (den + MONAI_SMOOTH), rel=1e-6, abs=1e-7), name
        if den > 0:
            assert ours["pq"] == pytest.approx(ours["iou_sum"] / den, abs=1e-12), name
            assert ours["pq"] == pytest.approx(ref["pq"], abs=2e-6), name
        else:
            assert np.isnan(ours["pq"]) and ref["pq"] == 0.0, name  # both maps empty: NaN vs smoothed 0


def _monai_pooled(cases, class_key=3):
    metric = PanopticQualityMetric(num_classes=N_CLASSES, return_confusion_matrix=True, reduction="sum_batch")
    for _, gt, pred, gc, pc in cases:
        y = torch.as_tensor(np.stack([gt, gc]).astype(np.int64))[None]
        y_pred = torch.as_tensor(np.stack([pred, pc]).astype(np.int64))[None]
        metric(y_pred=y_pred, y=y)
    return metric.aggregate().numpy()


def test_class_pq_counts_pooled_equal_monai_panoptic_quality_metric():
    from cellgap.metrics.classification import class_pq_counts

    cases = CASES[::2]  # MONAI scores every class of every image separately: half the cases keep this test quick
    pooled = np.zeros((N_CLASSES, 4))
    pooled32 = np.zeros(N_CLASSES, np.float32)
    for _, gt, pred, gc, pc in cases:
        ov = instance_overlaps(gt, pred, gc, pc, num_classes=N_CLASSES)
        gcls, pcls = ov.gt_classes(), ov.pred_classes()
        counts = class_pq_counts(ov, gcls, pcls, N_CLASSES)
        pooled += counts
        g, p, iou = instance.matched_pairs(ov)
        for c in range(N_CLASSES):
            sel = (gcls[g] == c + 1) & (pcls[p] == c + 1)
            pooled32[c] += np.float32(torch.as_tensor(iou[sel], dtype=torch.float32).sum())
    ref = _monai_pooled(cases)
    np.testing.assert_array_equal(ref[:, :3], pooled[:, :3])  # TP, FP, FN per class: exact
    np.testing.assert_allclose(ref[:, 3], pooled[:, 3], rtol=1e-6)  # ΣIoU: float32 in MONAI
    np.testing.assert_allclose(ref[:, 3], pooled32, rtol=1e-6)


def test_inconsistent_class_maps_differ_from_monai_exactly_by_the_majority_rule():
    """MONAI masks instances pixel by pixel with the class map; cellgap gives each instance its majority
    class.  Painting each instance with its majority class first makes the two identical."""
    rng = np.random.default_rng(7)
    cases, painted = [], []
    for k in range(20):
        gt = random_instances((96, 96), 15, rng)
        pred = perturb(gt, rng)
        gc = random_classes(gt, N_CLASSES, rng)
        noisy = gc.copy()
        flip = (rng.random(gt.shape) < 0.2) & (gt > 0)
        noisy[flip] = rng.integers(1, N_CLASSES + 1, size=int(flip.sum()))  # instances with several classes
        pc = perturb_classes(pred, gc, N_CLASSES, rng)
        cases.append((f"noisy{k}", gt, pred, noisy, pc))
        ov = instance_overlaps(gt, pred, noisy, pc, num_classes=N_CLASSES)
        lut = np.zeros(int(gt.max()) + 1, np.uint8)
        lut[ov.gt_ids] = ov.gt_classes("majority")
        painted.append((f"painted{k}", gt, pred, lut[gt], pc))
    from cellgap.metrics.classification import class_pq_counts

    ours = sum(class_pq_counts(ov, ov.gt_classes(), ov.pred_classes(), N_CLASSES)
               for ov in (instance_overlaps(g, p, gc, pc, num_classes=N_CLASSES) for _, g, p, gc, pc in cases))
    ref_noisy = _monai_pooled(cases)
    ref_painted = _monai_pooled(painted)
    np.testing.assert_array_equal(ref_painted[:, :3], ours[:, :3])
    assert not np.array_equal(ref_noisy[:, :3], ours[:, :3])  # the convention matters on such maps
