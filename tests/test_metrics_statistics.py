"""Aggregation by weights, bootstrap intervals, paired tests and report files."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from cellgap.metrics import Protocol, ScoreTable, aggregate, per_tissue, score_image, summarize
from cellgap.metrics.report import read_per_image_csv, write_reports
from cellgap.metrics.statistics import (
    across_splits,
    bootstrap_ci,
    bootstrap_weights,
    paired_bootstrap,
    paired_permutation_test,
)
from cellgap.testing.synthetic_pairs import perturb, perturb_classes, random_classes, random_instances

CLASSES = ("neo", "inf", "con")
PROTOCOL = Protocol.pannuke(split="test")


def make_run(n=24, seed=0, quality=1.0, empty_every=7, run_seed=None):
    """(gt list, table) of n images over 3 tissues; quality < 1 damages the predictions more."""
    rng = np.random.default_rng(seed)
    pred_rng = np.random.default_rng(run_seed if run_seed is not None else seed + 100)
    scores = []
    for i in range(n):
        gt = random_instances((64, 64), 0 if i % empty_every == 3 else int(rng.integers(3, 12)), rng)
        gc = random_classes(gt, len(CLASSES), rng)
        p_drop = 0.1 if quality >= 1 else 0.5
        pred = perturb(gt, pred_rng, p_drop=p_drop, p_split=0.1 / quality, n_false=1)
        pc = perturb_classes(pred, gc, len(CLASSES), pred_rng, p_wrong=0.2 / quality)
        scores.append(score_image(gt, pred, gc, pc, num_classes=len(CLASSES), protocol=PROTOCOL,
                                  image_id=f"img{i}", tissue=f"t{i % 3}"))
    return ScoreTable.from_scores(scores, CLASSES)


@pytest.fixture(scope="module")
def run_a():
    return make_run()


@pytest.fixture(scope="module")
def run_b():
    return make_run(quality=0.5)


def assert_same_metrics(x: dict, y: dict):
    assert x.keys() == y.keys()
    for k in x:
        a, b = float(np.asarray(x[k]).reshape(-1)[0]), float(np.asarray(y[k]).reshape(-1)[0])
        assert (np.isnan(a) and np.isnan(b)) or a == pytest.approx(b, rel=1e-9, abs=1e-12), k


@pytest.mark.parametrize("policy", ["nan", "skip"])
def test_integer_weights_equal_the_explicitly_resampled_table(run_a, policy):
    protocol = PROTOCOL.with_(empty_policy=policy)
    rng = np.random.default_rng(5)
    weights = bootstrap_weights(len(run_a), 3, rng)
    values = aggregate(run_a, protocol, weights)
    for b in range(3):
        rows = np.repeat(np.arange(len(run_a)), weights[b].astype(int))
        explicit = summarize(run_a.subset(rows), protocol)
        assert_same_metrics({k: v[b] for k, v in values.items()}, explicit)


def test_per_tissue_equals_summarizing_each_tissue_alone(run_a):
    tables = per_tissue(run_a, PROTOCOL)
    assert sorted(tables) == ["t0", "t1", "t2"]
    for t, metrics in tables.items():
        assert_same_metrics(metrics, summarize(run_a.subset(np.flatnonzero(run_a.tissues == t)), PROTOCOL))


def test_tissue_average_is_the_mean_of_tissue_means(run_a):
    s = summarize(run_a, PROTOCOL)
    means = [per_tissue(run_a, PROTOCOL)[t]["pq"] for t in ("t0", "t1", "t2")]
    assert s["bpq"] == s["bpq_tissue"] == pytest.approx(np.mean(means))
    assert s["bpq_tissue_sd"] == pytest.approx(np.std(means, ddof=1))
    assert s["pq"] == pytest.approx(np.nanmean(run_a.scalars["pq"]))


def test_bootstrap_interval_brackets_the_value_and_is_reproducible(run_a):
    ci = bootstrap_ci(run_a, PROTOCOL, ["pq", "mpq+", "f1d", "r2", "bpq"], n_resamples=300, seed=1)
    for m, c in ci.items():
        assert c["low"] <= c["value"] <= c["high"], m
        assert c["high"] - c["low"] > 0, m
    assert ci == bootstrap_ci(run_a, PROTOCOL, ["pq", "mpq+", "f1d", "r2", "bpq"], n_resamples=300, seed=1)
    strat = bootstrap_ci(run_a, PROTOCOL, ["bpq"], n_resamples=200, stratify_by_tissue=True)
    assert strat["bpq"]["low"] <= strat["bpq"]["value"] <= strat["bpq"]["high"]
    with pytest.raises(ValueError, match="unknown metric"):
        bootstrap_ci(run_a, PROTOCOL, ["pqq"])


def test_stratified_weights_keep_each_tissue_size():
    strata = np.array(["a"] * 5 + ["b"] * 3)
    w = bootstrap_weights(8, 50, np.random.default_rng(0), strata)
    assert (w[:, :5].sum(1) == 5).all() and (w[:, 5:].sum(1) == 3).all()


def test_paired_tests_find_no_difference_between_identical_runs(run_a):
    boot = paired_bootstrap(run_a, run_a, PROTOCOL, "pq", n_resamples=200)
    perm = paired_permutation_test(run_a, run_a, PROTOCOL, "mpq+", n_permutations=200)
    assert boot["difference"] == 0 and boot["p_value"] == 1.0
    assert perm["difference"] == 0 and perm["p_value"] == 1.0


def test_paired_tests_detect_a_clearly_worse_run(run_a, run_b):
    for metric in ("pq", "mpq+", "f1d"):
        boot = paired_bootstrap(run_a, run_b, PROTOCOL, metric, n_resamples=500)
        perm = paired_permutation_test(run_a, run_b, PROTOCOL, metric, n_permutations=500)
        assert boot["difference"] > 0 and boot["low"] > 0, metric
        assert boot["p_value"] < 0.05 and perm["p_value"] < 0.05, metric
        assert boot["difference"] == pytest.approx(summarize(run_a, PROTOCOL)[metric] - summarize(run_b, PROTOCOL)[metric])


def test_permutation_p_value_agrees_with_full_enumeration():
    a = make_run(n=8, seed=3, empty_every=100)
    b = make_run(n=8, seed=3, empty_every=100, run_seed=999)
    for metric in ("pq", "mpq+"):
        observed = summarize(a, PROTOCOL)[metric] - summarize(b, PROTOCOL)[metric]
        extreme = 0
        for swap in itertools.product([0, 1], repeat=8):
            rows_a = [b if s else a for s in swap]
            rows_b = [a if s else b for s in swap]
            mix_a = ScoreTable.concat([t.subset([i]) for i, t in enumerate(rows_a)])
            mix_b = ScoreTable.concat([t.subset([i]) for i, t in enumerate(rows_b)])
            d = summarize(mix_a, PROTOCOL)[metric] - summarize(mix_b, PROTOCOL)[metric]
            extreme += abs(d) >= abs(observed) - 1e-12
        exact = extreme / 256
        mc = paired_permutation_test(a, b, PROTOCOL, metric, n_permutations=4000, seed=2)["p_value"]
        assert mc == pytest.approx(exact, abs=0.03), metric


def test_paired_comparison_refuses_different_images(run_a):
    with pytest.raises(ValueError, match="different images"):
        paired_bootstrap(run_a, run_a.subset(np.arange(5)), PROTOCOL)
    other_gt = make_run(n=4, seed=42)  # same ids img0..img3, other images
    with pytest.raises(ValueError, match="different ground truth"):
        paired_permutation_test(run_a.subset(np.arange(4)), other_gt, PROTOCOL)


def test_nan_key_metric_in_paired_test_is_an_error():
    gt = np.zeros((8, 8), np.int32)
    table = ScoreTable.from_scores([score_image(gt, gt, protocol=PROTOCOL, image_id="e")], ["cell"])
    with pytest.raises(ValueError, match="metric 'pq' is NaN on the full data"):
        paired_bootstrap(table, table, PROTOCOL, "pq")


def test_across_splits_mean_and_sd():
    out = across_splits([{"mpq": 0.5}, {"mpq": 0.6}, {"mpq": 0.7}])
    assert out["mpq"]["mean"] == pytest.approx(0.6) and out["mpq"]["sd"] == pytest.approx(0.1)


def test_reports_are_written_and_round_trip(run_a, tmp_path):
    paths = write_reports(tmp_path / "eval", run_a, PROTOCOL, bootstrap=100, extra={"encoder": "toy"})
    assert {p.name for p in (tmp_path / "eval").iterdir()} == {"per_image.csv", "per_class.csv", "per_tissue.csv", "summary.json"}
    back = read_per_image_csv(paths["per_image"])
    assert back.class_names == CLASSES and back.ids.tolist() == run_a.ids.tolist()
    assert_same_metrics(summarize(back, PROTOCOL), summarize(run_a, PROTOCOL))
    doc = json.loads(paths["summary"].read_text())
    assert doc["protocol"]["name"] == "pannuke" and doc["protocol"]["empty_policy"] == "nan"
    assert doc["protocol"]["detection_radius"] == 12.0 and doc["protocol"]["split"] == "test"
    assert doc["metrics"]["pq"] == pytest.approx(summarize(run_a, PROTOCOL)["pq"])
    assert set(doc["per_class"]) == set(CLASSES) and doc["run"]["encoder"] == "toy"
    ci = doc["confidence_intervals"]["metrics"]["mpq+"]
    assert ci["low"] <= ci["value"] <= ci["high"]
    assert "mpq+" in doc["averaging"]
    lines = paths["per_tissue"].read_text().splitlines()
    assert lines[0].startswith("tissue,n_images") and len(lines) == 4
    assert paths["per_class"].read_text().splitlines()[0].startswith("class,pq+,dq+,sq+,pq,f1")


def test_report_reader_names_a_bad_cell(run_a, tmp_path):
    paths = write_reports(tmp_path, run_a, PROTOCOL, bootstrap=0)
    text = paths["per_image"].read_text().splitlines()
    header = text[0].split(",")
    row = text[1].split(",")
    row[header.index("tp")] = "oops"
    paths["per_image"].write_text("\n".join([text[0], ",".join(row), *text[2:]]) + "\n")
    with pytest.raises(ValueError, match=r"line 2: column 'tp' holds 'oops'"):
        read_per_image_csv(paths["per_image"])
