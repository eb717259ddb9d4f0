"""The study's figures stay legible for near-equal and for widely spread results: no two tick labels of an axis
and no two encoder labels overlap once rendered (measured with matplotlib's renderer), and near-equal costs
get distinct, readable ticks."""

import itertools

import matplotlib
import pytest

from cellgap.study.figures import cost_vs_accuracy, heatmap, metrics_bars
from cellgap.study.plan import SplitSpec, StudyPlan

matplotlib.use("Agg")

ENCODERS = ["convnext_b_22k", "swinv2_b_22k", "vit_r50_hybrid_21k", "vit_l16_21k", "dinov2_vitl14", "uni", "virchow2",
            "prov_gigapath", "uni2_h", "h_optimus_0"]
METRICS = ("pq", "bpq", "mpq", "mpq+", "aji", "dice", "f1d", "dq", "sq", "aji+", "r2")


def _results(spread: str):
    """Summary statistics, per-class statistics and costs: every encoder near-equal, or spread over decades."""
    near = spread == "near"
    stats, cost, classes = {}, {}, {}
    for i, e in enumerate(ENCODERS):
        pq = 0.5012 + 1e-5 * i if near else 0.1 + 0.07 * i
        stats[e] = {m: {"mean": pq, "sd": 0.001 if near else 0.02} for m in METRICS}
        cost[e] = ({"encoder_params": 86.9e6 + 1e4 * i, "gflops": 112.46 + 0.01 * i} if near else
                   {"encoder_params": 3.4e6 * 1.9 ** i, "gflops": 99.5 * 1.25 ** i})
        classes[e] = {c: {"f1": {"mean": pq, "sd": 0.0}} for c in ("neoplastic", "inflammatory", "connective", "dead", "epithelial")}
    return stats, cost, classes


def _plan():
    return StudyPlan("pannuke", "data", list(ENCODERS), [SplitSpec(f"official{k}", f"official{k}") for k in (1, 2, 3)],
                     encoder_weights={e: "hub" for e in ENCODERS})


def _boxes(fig, texts):
    renderer = fig.canvas.get_renderer()
    return [(t.get_text(), t.get_window_extent(renderer)) for t in texts if t.get_visible() and t.get_text().strip()]


def _assert_apart(boxes, what):
    for (a, ba), (b, bb) in itertools.combinations(boxes, 2):
        assert not ba.overlaps(bb), f"{what}: {a!r} and {b!r} overlap"


def _tick_labels(fig, axis):
    low, high = sorted(axis.get_view_interval())
    ticks = [t for t in axis.get_major_ticks() if low - 1e-12 <= t.get_loc() <= high + 1e-12]
    return _boxes(fig, [t.label1 for t in ticks])


@pytest.mark.parametrize("spread", ["near", "wide"])
def test_every_figure_keeps_its_labels_apart(spread):
    stats, cost, classes = _results(spread)
    plan = _plan()
    missing = {e: (["official3"] if e == "uni" else []) for e in ENCODERS}  # one encoder incomplete: longer label
    figures = {"cost": cost_vs_accuracy(plan, ENCODERS, stats, cost, missing),
               "bars": metrics_bars(plan, ENCODERS, stats, missing),
               "heatmap": heatmap(plan, ENCODERS, classes, list(classes["uni"]), "f1", "F1", "class", missing)}
    for name, fig in figures.items():
        fig.canvas.draw()
        for ax in fig.axes:
            for axis in (ax.xaxis, ax.yaxis):
                labels = _tick_labels(fig, axis)
                _assert_apart(labels, f"{name} {spread}: {axis.axis_name} tick labels")
                texts = [t for t, _ in labels]
                assert len(set(texts)) == len(texts), f"{name} {spread}: repeated tick labels {texts}"
        legends = [lg for lg in [*fig.legends, *(ax.get_legend() for ax in fig.axes)] if lg is not None]
        names = [b for lg in legends for b in _boxes(fig, lg.get_texts())]
        if name != "heatmap":  # (a heatmap's texts are its cell values, one per cell)
            names += [b for ax in fig.axes for b in _boxes(fig, ax.texts)]  # labels placed beside points
        _assert_apart(names, f"{name} {spread}: encoder labels")
        if name != "heatmap":
            assert len(names) == len(ENCODERS), f"{name}: every encoder is named once"
        matplotlib.pyplot.close(fig)
    # The cost axes of near-equal encoders: several distinct ticks, each short enough to read.
    fig = cost_vs_accuracy(plan, ENCODERS, stats, cost, missing)
    fig.canvas.draw()
    for ax in fig.axes:
        labels = [t for t, _ in _tick_labels(fig, ax.xaxis)]
        assert 2 <= len(labels) <= 8 and all(len(t) <= 8 for t in labels), labels
    matplotlib.pyplot.close(fig)
