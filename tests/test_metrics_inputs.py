"""The overlap core on every input path (dtypes, id layouts, table strategies, devices) and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellgap.metrics import Protocol, ScoreTable, canonical_metric, score_image
from cellgap.metrics import matching as matching_module
from cellgap.metrics.matching import instance_overlaps
from cellgap.testing.synthetic_pairs import perturb, random_classes, random_instances, relabel_randomly


def brute_force(gt, pred):
    """Reference pair table with explicit loops over instances."""
    g_ids = [i for i in np.unique(gt) if i]
    p_ids = [i for i in np.unique(pred) if i]
    pairs = {}
    for a, g in enumerate(g_ids):
        for b, p in enumerate(p_ids):
            inter = int(((gt == g) & (pred == p)).sum())
            if inter:
                pairs[(a, b)] = inter
    return g_ids, p_ids, pairs


def assert_matches_brute_force(gt, pred, ov):
    g_ids, p_ids, pairs = brute_force(gt, pred)
    assert ov.gt_ids.tolist() == g_ids and ov.pred_ids.tolist() == p_ids
    assert ov.gt_area.tolist() == [int((gt == g).sum()) for g in g_ids]
    assert ov.pred_area.tolist() == [int((pred == p).sum()) for p in p_ids]
    assert dict(zip(zip(ov.pair_gt.tolist(), ov.pair_pred.tolist()), ov.pair_intersection.tolist())) == pairs
    for k, g in enumerate(g_ids):
        rr, cc = np.nonzero(gt == g)
        np.testing.assert_allclose(ov.gt_centroid[k], [rr.mean(), cc.mean()], rtol=0, atol=1e-12)


@pytest.fixture
def pair():
    rng = np.random.default_rng(3)
    gt = random_instances((80, 72), 20, rng)
    return gt, perturb(gt, rng)


def test_dense_raw_id_path(pair):
    gt, pred = pair
    assert_matches_brute_force(gt, pred, instance_overlaps(gt, pred))


def test_lut_relabel_path_and_unique_relabel_path(pair):
    rng = np.random.default_rng(0)
    gt, pred = relabel_randomly(pair[0], rng, high=9000), relabel_randomly(pair[1], rng, high=9000)
    assert_matches_brute_force(gt, pred, instance_overlaps(gt, pred))  # ids ≤ 2·pixels: lookup table
    big_gt = np.where(gt > 0, gt.astype(np.int64) * 10**9, 0)  # ids far above the pixel count: torch.unique
    assert_matches_brute_force(big_gt, pred, instance_overlaps(big_gt, pred))


def test_sparse_pair_table_path(pair, monkeypatch):
    monkeypatch.setattr(matching_module, "_DENSE_PAIR_BINS", 16)
    gt, pred = pair
    assert_matches_brute_force(gt, pred, instance_overlaps(gt, pred))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.int32, np.uint32, np.int64, np.uint64, np.float32, np.float64])
def test_dtypes_and_shapes_give_identical_overlaps(pair, dtype):
    gt, pred = pair
    gt, pred = gt % 250, pred % 250  # fit uint8
    ref = instance_overlaps(gt, pred)
    ov = instance_overlaps(gt.astype(dtype)[None], torch.as_tensor(pred.astype(np.int64))[None, None])
    for field in ("gt_ids", "pred_ids", "gt_area", "pred_area", "pair_gt", "pair_pred", "pair_intersection", "gt_centroid"):
        np.testing.assert_array_equal(getattr(ov, field), getattr(ref, field))


def test_bool_maps_and_monai_metatensor():
    from monai.data import MetaTensor

    gt = np.zeros((8, 8), bool)
    gt[2:5, 2:5] = True
    ov = instance_overlaps(gt, MetaTensor(torch.as_tensor(gt.astype(np.int32))[None]))
    assert ov.pair_intersection.tolist() == [9]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_give_the_same_overlaps(pair):
    gt, pred = pair
    gc = random_classes(gt, 3, np.random.default_rng(0))
    ref = instance_overlaps(gt, pred, gc, gc[::-1].copy(), num_classes=3, count_region=40)
    ov = instance_overlaps(torch.as_tensor(gt).cuda(), torch.as_tensor(pred).cuda(), torch.as_tensor(gc).cuda(),
                           torch.as_tensor(gc[::-1].copy()).cuda(), num_classes=3, count_region=40)
    for field in ("gt_ids", "pred_ids", "pair_gt", "pair_pred", "pair_intersection", "gt_class_pixels", "gt_in_region"):
        np.testing.assert_array_equal(getattr(ov, field), getattr(ref, field))
    np.testing.assert_allclose(ov.gt_centroid, ref.gt_centroid, atol=1e-9)


# --- bad input -------------------------------------------------------------------------------

def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"shape mismatch: gt instances \(4, 4\) vs pred instances \(4, 5\)"):
        instance_overlaps(np.zeros((4, 4), int), np.zeros((4, 5), int))
    with pytest.raises(ValueError, match="gt types"):
        instance_overlaps(np.zeros((4, 4), int), np.zeros((4, 4), int), np.zeros((3, 4), int), np.zeros((4, 4), int))
    with pytest.raises(ValueError, match="2-D label map"):
        instance_overlaps(np.zeros((2, 4, 4), int), np.zeros((2, 4, 4), int))


def test_float_labels_must_be_integral_and_finite():
    ok = np.zeros((4, 4), np.float32)
    ok[1, 1] = 3.0
    assert instance_overlaps(ok, ok).gt_ids.tolist() == [3]
    bad = ok.copy()
    bad[0, 0] = 0.5
    with pytest.raises(ValueError, match="pred instances: label map holds non-integral values"):
        instance_overlaps(ok, bad)
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="gt instances: label map holds NaN"):
        instance_overlaps(bad, ok)


def test_negative_labels_and_wrong_types_are_refused():
    neg = np.zeros((4, 4), np.int32)
    neg[0, 0] = -2
    with pytest.raises(ValueError, match=r"gt instances: negative ids \(min -2\)"):
        instance_overlaps(neg, np.zeros((4, 4), np.int32))
    with pytest.raises(TypeError, match="numpy array or torch tensor"):
        instance_overlaps([[0, 1]], np.zeros((1, 2), int))
    with pytest.raises(TypeError, match="integer label map"):
        instance_overlaps(np.array([["a"]]), np.array([["b"]]))


def test_class_maps_out_of_range_or_missing():
    gt = np.ones((4, 4), np.int32)
    cls = np.full((4, 4), 5, np.uint8)
    with pytest.raises(ValueError, match=r"gt types: class id 5 above num_classes=3"):
        instance_overlaps(gt, gt, cls, np.ones_like(cls), num_classes=3)
    with pytest.raises(ValueError, match="give both gt_types and pred_types"):
        instance_overlaps(gt, gt, cls, None)
    with pytest.raises(ValueError, match="image 'x': 3 classes need gt_types and pred_types"):
        score_image(gt, gt, num_classes=3, protocol=Protocol(magnification=40), image_id="x")


def test_instance_spanning_classes_takes_the_documented_rule_in_scoring():
    gt = np.zeros((6, 6), np.int32)
    gt[1:5, 1:5] = 1
    gc = np.zeros((6, 6), np.uint8)
    gc[1:5, 1:5] = 1
    gc[1:3, 1:5] = 2  # 8 px of class 2, 8 px of class 1 → tie: majority gives 1, max gives 2
    pc = np.where(gt > 0, 2, 0).astype(np.uint8)
    majority = score_image(gt, gt, gc, pc, num_classes=2, protocol=Protocol(magnification=40))
    max_rule = score_image(gt, gt, gc, pc, num_classes=2, protocol=Protocol(magnification=40, class_rule="max"))
    assert majority.count_gt.tolist() == [1, 0] and max_rule.count_gt.tolist() == [0, 1]


def test_nan_scores_and_counts_in_a_table_are_refused():
    p = Protocol(magnification=40)
    gt = np.zeros((6, 6), np.int32)
    gt[1:3, 1:3] = 1
    s = score_image(gt, gt, protocol=p, image_id="img7")
    s.values["pq"] = float("nan")
    with pytest.raises(ValueError, match="image 'img7': score 'pq' is NaN although its GT has cells"):
        ScoreTable.from_scores([s], ["cell"])
    s.values["pq"], s.values["tp"] = 1.0, float("nan")
    with pytest.raises(ValueError, match="image 'img7': count 'tp' is not finite"):
        ScoreTable.from_scores([s], ["cell"])
    with pytest.raises(ValueError, match="scored with 1 classes, table has 2"):
        ScoreTable.from_scores([score_image(gt, gt, protocol=p)], ["a", "b"])


def test_protocol_validation_and_radius_from_magnification():
    assert Protocol(magnification=40).detection_radius == 12.0
    assert Protocol(magnification="20x").detection_radius == 6.0
    assert Protocol(mpp=0.25).detection_radius == 12.0
    assert Protocol.conic().count_region == 224 and Protocol.pannuke().empty_policy == "nan"
    assert Protocol.cisca().empty_policy == "skip" and Protocol.cisca().f1_class_rule == "max"
    with pytest.raises(ValueError, match="give magnification, mpp or detection_radius"):
        Protocol()
    with pytest.raises(ValueError, match="empty_policy"):
        Protocol(magnification=40, empty_policy="zero")
    with pytest.raises(ValueError, match="iou_threshold"):
        Protocol(magnification=40, iou_threshold=0.3)
    with pytest.raises(ValueError, match="class_rule"):
        Protocol(magnification=40, class_rule="mode")
    with pytest.raises(ValueError, match="detection_radius"):
        Protocol(detection_radius=float("nan"))


def test_protocol_for_a_prepared_dataset():
    from cellgap.data.prepared import DatasetInfo

    info = DatasetInfo(name="d", class_names=("a", "b"), magnification=20, mpp=0.5, empty_policy="nan")
    p = Protocol.for_dataset(info, preset="pannuke", split="test")
    assert (p.detection_radius, p.empty_policy, p.split, p.name) == (6.0, "nan", "test", "pannuke")
    with pytest.raises(ValueError, match="preset"):
        Protocol.for_dataset(info, preset="lizard")


def test_metric_name_aliases():
    assert canonical_metric("mPQ+") == "mpq+" and canonical_metric("mpq_plus") == "mpq+"
    assert canonical_metric("AJI_plus") == "aji+" and canonical_metric("F1_d") == "f1d"


def test_component_wise_aji_plus_matching_reaches_the_dense_hungarian_optimum():
    from scipy.optimize import linear_sum_assignment

    from cellgap.metrics.instance import max_iou_matching

    rng = np.random.default_rng(11)
    for _ in range(30):
        gt = random_instances((64, 64), 15, rng)
        pred = perturb(gt, rng, grow=1)  # grown cells overlap their neighbours: many multi-pair components
        ov = instance_overlaps(gt, pred)
        k = max_iou_matching(ov)
        assert len(set(ov.pair_gt[k])) == len(k) == len(set(ov.pair_pred[k]))  # one-to-one
        dense = np.zeros((ov.n_gt, ov.n_pred))
        dense[ov.pair_gt, ov.pair_pred] = ov.pair_iou
        r, c = linear_sum_assignment(dense, maximize=True)
        assert ov.pair_iou[k].sum() == pytest.approx(dense[r, c].sum(), abs=1e-12)
