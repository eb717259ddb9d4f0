"""Hand-computed golden cases for every metric (values worked out in the comments)."""

from __future__ import annotations

import numpy as np
import pytest

from cellgap.metrics import Protocol, ScoreTable, instance, score_image, summarize
from cellgap.metrics.classification import r2_score, type_f1_counts, type_f1_scores
from cellgap.metrics.detection import detection_counts, pair_centroids
from cellgap.metrics.matching import instance_classes, instance_overlaps


def strip(*values):
    return np.array([values], dtype=np.int32)


def test_pq_dq_sq_aji_dice_on_a_strip():
    # g1 cols 0-3, g2 cols 5-8, g3 cols 10-11; p7 cols 0-2, p5 cols 5-9, p9 cols 14-15.
    gt = strip(1, 1, 1, 1, 0, 2, 2, 2, 2, 0, 3, 3, 0, 0, 0, 0)
    pred = strip(7, 7, 7, 0, 0, 5, 5, 5, 5, 5, 0, 0, 0, 0, 9, 9)
    m = instance.instance_metrics(gt, pred)
    # IoU(g1,p7) = 3/4, IoU(g2,p5) = 4/5; TP 2, FP 1 (p9), FN 1 (g3).
    assert (m["tp"], m["fp"], m["fn"]) == (2, 1, 1)
    assert m["dq"] == pytest.approx(2 / 3)
    assert m["sq"] == pytest.approx((0.75 + 0.8) / 2)
    assert m["pq"] == pytest.approx(2 / 3 * 0.775)
    # AJI = (3 + 4) / (4 + 5 + |g3| 2 + |p9| 2); AJI+ takes the same pairs here.
    assert m["aji"] == pytest.approx(7 / 13)
    assert m["aji_plus"] == pytest.approx(7 / 13)
    # Dice: |G| = 10, |P| = 10, |G∩P| = 7.
    assert m["dice"] == pytest.approx(0.7)


def test_aji_reuses_a_prediction_and_aji_plus_does_not_and_iou_of_exactly_half_is_no_match():
    # g1 cols 0-3, g2 cols 4-7; p5 covers both (8 px), p6 cols 8-9 overlaps nothing.
    gt = strip(1, 1, 1, 1, 2, 2, 2, 2, 0, 0)
    pred = strip(5, 5, 5, 5, 5, 5, 5, 5, 6, 6)
    m = instance.instance_metrics(gt, pred)
    assert m["aji"] == pytest.approx((4 + 4) / (8 + 8 + 2))  # both GT take p5; p6 unused
    assert m["aji_plus"] == pytest.approx(4 / (8 + 4 + 2))  # one-to-one: g2 and p6 unpaired
    assert (m["tp"], m["pq"]) == (0, 0.0)  # IoU = 0.5 exactly is not > 0.5


def test_aji_plus_maximises_the_summed_iou_not_greedily():
    # g1 = cols 0-5 (6 px), g2 = cols 6-9 (4 px); p1 = cols 0-6 (7 px), p2 = cols 7-12 (6 px).
    # IoU(g1,p1) = 6/7, IoU(g2,p1) = 1/10, IoU(g2,p2) = 3/7.  Best one-to-one: g1-p1, g2-p2.
    gt = strip(1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 0, 0, 0)
    pred = strip(1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2)
    assert instance.instance_metrics(gt, pred)["aji_plus"] == pytest.approx((6 + 3) / (7 + 7))


def test_detection_assigns_first_then_cuts_at_the_radius():
    # GT at x=0 and x=10, predictions at x=9 and x=30, radius 6.  The Hungarian assignment minimises
    # 9 + 20 = 29 (A-P, B-Q) over 30 + 1 = 31 (A-Q, B-P); both assigned pairs exceed 6 px → no TP,
    # although B-P alone would be 1 px apart (HoVer-Net convention, METHOD §10.15).
    gt = [[0, 0], [0, 10]]
    pred = [[0, 9], [0, 30]]
    assert detection_counts(gt, pred, 6) == {"tp": 0, "fp": 2, "fn": 2}
    g, p = pair_centroids(gt, pred, 9)  # radius 9 keeps A-P only
    assert (g.tolist(), p.tolist()) == ([0], [0])
    assert detection_counts(gt, [[0, 5], [0, 16]], 6) == {"tp": 2, "fp": 0, "fn": 0}  # 5 and 6 px: ≤ radius counts
    assert detection_counts([], pred, 6) == {"tp": 0, "fp": 2, "fn": 0}


def test_centroids_are_mean_pixel_positions():
    gt = np.zeros((10, 10), np.int32)
    gt[2:5, 3:7] = 4  # rows 2..4, cols 3..6 → (3, 4.5)
    gt[8, 8] = 9
    ov = instance_overlaps(gt, gt)
    np.testing.assert_allclose(ov.gt_centroid, [[3.0, 4.5], [8.0, 8.0]])


def test_hovernet_per_class_f1_formula():
    # GT classes [1,1,2,2,1], predicted [1,2,2,1,2,2]; pairs (0,0) 1-1, (1,1) 1-2, (2,2) 2-2, (3,3) 2-1;
    # GT 4 (class 1) and predictions 4, 5 (class 2) unpaired.
    counts = type_f1_counts(np.array([1, 1, 2, 2, 1]), np.array([1, 2, 2, 1, 2, 2]), np.arange(4), np.arange(4), 2)
    # class 1: tp 1, fp 1 (pair 3), fn 1 (pair 1), fp_d 0, fn_d 1; class 2: tp 1, fp 1, fn 1, fp_d 2, fn_d 0.
    np.testing.assert_array_equal(counts, [[1, 1, 1, 0, 1], [1, 1, 1, 2, 0]])
    s = type_f1_scores(counts)
    np.testing.assert_allclose(s["f1"], [2 / (2 + 2 + 2 + 0 + 1), 2 / (2 + 2 + 2 + 2 + 0)])
    np.testing.assert_allclose(s["precision"], [1 / (1 + 2 + 0), 1 / (1 + 2 + 2)])
    np.testing.assert_allclose(s["recall"], [1 / (1 + 2 + 1), 1 / (1 + 2 + 0)])


def test_instance_class_rules_majority_ties_lower_and_max():
    hist = np.array([[0, 2, 2, 1], [5, 0, 0, 0], [0, 0, 1, 3]])  # columns: class 0..3
    np.testing.assert_array_equal(instance_classes(hist, 3, "majority"), [1, 0, 3])
    np.testing.assert_array_equal(instance_classes(hist, 3, "max"), [3, 0, 3])
    gt = strip(1, 1, 1, 1, 1)
    cls = strip(1, 2, 2, 1, 3)
    ov = instance_overlaps(gt, gt, cls, cls, num_classes=3)
    assert ov.gt_classes("majority").tolist() == [1] and ov.gt_classes("max").tolist() == [3]


def _golden_images():
    """Three images, two tissues, classes 1..3 (see test_mpq_mpq_plus_bpq_tissue_r2 for the numbers)."""
    z = [0] * 5
    a = dict(gt=strip(1, 1, 1, 0, 2, 2, 2, 0, 0, 0, 0, *z), gc=strip(1, 1, 1, 0, 2, 2, 2, 0, 0, 0, 0, *z),
             pred=strip(4, 4, 4, 0, 0, 0, 0, 0, 6, 6, 0, *z), pc=strip(1, 1, 1, 0, 0, 0, 0, 0, 3, 3, 0, *z))
    b = dict(gt=strip(1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, *z), gc=strip(1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, *z),
             pred=strip(0, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, *z), pc=strip(0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, *z))
    c = dict(gt=strip(0, 0, 3, 3, 3, 0, 0, 0, 0, 0, 0, *z), gc=strip(0, 0, 2, 2, 2, 0, 0, 0, 0, 0, 0, *z),
             pred=strip(0, 0, 8, 8, 8, 0, 0, 0, 0, 0, 0, *z), pc=strip(0, 0, 2, 2, 2, 0, 0, 0, 0, 0, 0, *z))
    empty = dict(gt=strip(*[0] * 16), gc=strip(*[0] * 16), pred=strip(*[0] * 14, 5, 5), pc=strip(*[0] * 14, 1, 1))
    return [("A", "t1", a), ("B", "t2", b), ("C", "t2", c), ("D", "t2", empty)]


def _table(protocol, images):
    scores = [score_image(d["gt"], d["pred"], d["gc"], d["pc"], num_classes=3, protocol=protocol, image_id=i, tissue=t)
              for i, t, d in images]
    return ScoreTable.from_scores(scores, ["one", "two", "three"])


def test_mpq_mpq_plus_bpq_tissue_r2():
    protocol = Protocol(magnification=20, empty_policy="skip", averaging="tissue")
    s = summarize(_table(protocol, _golden_images()[:3]), protocol)
    # Per-image class PQ: A: c1 = 1 (perfect), c2 = 0 (missed), c3 = NaN (absent from GT; its FP ignored)
    # → mPQ_A = 0.5; B: c1 = IoU 3/5 = 0.6 → 0.6; C: c2 = 1 → 1.
    assert s["mpq_image"] == pytest.approx((0.5 + 0.6 + 1) / 3)
    assert s["mpq_tissue"] == pytest.approx((0.5 + (0.6 + 1) / 2) / 2)  # t1 0.5, t2 0.8
    assert s["mpq"] == s["mpq_tissue"]
    assert s["mpq_tissue_sd"] == pytest.approx(np.std([0.5, 0.8], ddof=1))
    assert s["pq/one"] == pytest.approx((1 + 0.6) / 2) and s["pq/two"] == pytest.approx(0.5)
    assert np.isnan(s["pq/three"])
    # mPQ+ (pooled): c1 TP 2, ΣIoU 1.6 → 0.8; c2 TP 1 FN 1 → (1/1.5)·1; c3 FP 1 → 0.
    assert s["pq+/one"] == pytest.approx(0.8) and s["pq+/two"] == pytest.approx(2 / 3) and s["pq+/three"] == 0
    assert s["mpq+"] == pytest.approx((0.8 + 2 / 3 + 0) / 3)
    # Binary PQ per image: A TP1 FP1 FN1 → 0.5; B 0.6; C 1.  bPQ tissue: (0.5 + 0.8) / 2.
    assert s["pq"] == pytest.approx(0.7) and s["bpq_tissue"] == pytest.approx(0.65) and s["bpq"] == s["bpq_tissue"]
    # Counts: c1 y = [1,1,0], ŷ = [1,1,0] → R² 1; c2 y = [1,0,1], ŷ = [0,0,1] → 1 − 1/(6/9) = −0.5;
    # c3 y = [0,0,0], ŷ = [1,0,0] → constant truth, imperfect fit → 0 (sklearn's convention).
    assert (s["r2/one"], s["r2/two"], s["r2/three"]) == pytest.approx((1.0, -0.5, 0.0))
    assert s["r2"] == pytest.approx(1 / 6)
    # Detection (radius 6 at 20x): A pairs g1-p4 (0 px) and g2-p6 (3.5 px, classes 2 vs 3); B and C one pair each.
    assert s["f1d"] == 1.0 and s["type_accuracy"] == pytest.approx(3 / 4)


def test_empty_gt_policy_skip_vs_nan():
    images = _golden_images()  # D: empty GT with one false positive of class 1
    skip = Protocol(magnification=20, empty_policy="skip")
    nan = Protocol(magnification=20, empty_policy="nan")
    s_skip, s_nan = summarize(_table(skip, images), skip), summarize(_table(nan, images), nan)
    assert (s_skip["n_images"], s_nan["n_images"], s_nan["n_empty"]) == (3, 4, 1)
    assert s_skip["pq"] == s_nan["pq"] == pytest.approx(0.7)  # per-image scores of D are NaN either way
    assert s_skip["f1d"] == 1.0 and s_nan["f1d"] == pytest.approx(8 / 9)  # D's FP counts only under "nan"
    assert (s_nan["precision_d"], s_nan["recall_d"]) == pytest.approx((4 / 5, 1.0))  # TP 4, FP 1, FN 0
    assert s_nan["pq+/one"] == pytest.approx(2 / 2.5 * 0.8)
    assert np.isnan(_table(nan, images).scalars["pq"][3])


def test_count_region_counts_only_instances_touching_the_central_square():
    gt = np.zeros((256, 256), np.int32)
    gt[0:5, 0:5] = 1  # outside the central 224² (offset 16)
    gt[100:110, 100:110] = 2
    gt[10:20, 10:20] = 3  # straddles the border: counted
    inside = score_image(gt, gt, protocol=Protocol(magnification=20, count_region=224))
    whole = score_image(gt, gt, protocol=Protocol(magnification=20))
    assert inside.count_gt.tolist() == [2] and whole.count_gt.tolist() == [3]


def test_r2_score_matches_hand_values():
    np.testing.assert_allclose(r2_score(np.array([[3.0], [5.0], [7.0]]), np.array([[2.0], [5.0], [8.0]])), [1 - 2 / 8])
    np.testing.assert_allclose(r2_score(np.array([[1.0], [1.0]]), np.array([[1.0], [1.0]])), [1.0])


def test_eps_reproduces_ciscas_smoothed_pq():
    gt = strip(1, 1, 1, 1, 0, 2, 2, 2, 2, 0, 3, 3, 0, 0, 0, 0)
    pred = strip(7, 7, 7, 0, 0, 5, 5, 5, 5, 5, 0, 0, 0, 0, 9, 9)
    m = instance.instance_metrics(gt, pred, eps=1e-6)
    assert m["dq"] == pytest.approx(2 / (3 + 1e-6), abs=1e-15)
    assert m["sq"] == pytest.approx(1.55 / (2 + 1e-6), abs=1e-15)
