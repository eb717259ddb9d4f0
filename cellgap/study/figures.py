"""The figures of the results folder: metric bars, per-class and per-tissue heatmaps, cost vs accuracy.

Each figure is built by its own function (returning the matplotlib Figure, so tests can measure its text) and
saved by :func:`write_figures`.  Names go into legends or onto categorical axes, never next to points, so they
cannot overprint each other however close the results; numeric axes pick a log or a linear scale by the spread of
their values so that tick labels stay few and readable.
"""

from __future__ import annotations

import math

import numpy as np

from ..encoders import get_encoder_spec
from ..network import COST_TILE
from .tables import METRIC_LABELS, encoder_label, random_weights_warning

BAR_METRICS = ("pq", "bpq", "mpq", "mpq+", "aji", "dice", "f1d")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def subtitle_of(plan, missing=None) -> str:
    warn = " — RANDOM ENCODER WEIGHTS" if random_weights_warning(plan) else ""
    incomplete = " — INCOMPLETE (encoders tagged 'k of n splits')" if missing and any(missing.values()) else ""
    return f"{plan.dataset}, test split, mean ± sd over {len(plan.splits)} split(s){warn}{incomplete}"


def metrics_bars(plan, encoders, summary_stats, missing=None):
    """Headline metrics per encoder, error bars = sd over splits, hatched bars = pathology encoders."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(BAR_METRICS) * max(1, len(encoders)) / 2), 4))
    width = 0.8 / len(encoders)
    shades = plt.get_cmap("tab10")
    for i, e in enumerate(encoders):
        means = [summary_stats[e][m]["mean"] for m in BAR_METRICS]
        sds = [summary_stats[e][m]["sd"] if math.isfinite(summary_stats[e][m]["sd"]) else 0 for m in BAR_METRICS]
        x = np.arange(len(BAR_METRICS)) + (i - (len(encoders) - 1) / 2) * width
        ax.bar(x, means, width, yerr=sds, capsize=2, label=encoder_label(e, plan, missing), color=shades(i % 10),
               edgecolor="0.2", linewidth=0.5, hatch="//" if get_encoder_spec(e).domain == "pathology" else None)
    ax.set_xticks(np.arange(len(BAR_METRICS)), [METRIC_LABELS[m] for m in BAR_METRICS])
    ax.set_ylim(0, 1)
    ax.set_ylabel("score")
    ax.set_title(f"Test metrics per encoder\n{subtitle_of(plan, missing)}", fontsize=9)
    # Below the axes: however many encoders, the legend never covers a bar.
    ax.legend(fontsize=7, ncol=2, title="hatched: pathology", title_fontsize=7, loc="upper center",
              bbox_to_anchor=(0.5, -0.1))
    return fig


def heatmap(plan, encoders, stats, groups, metric, title, xlabel, missing=None):
    """Encoder × group (class, tissue) means, one number per square of the image, groups as vertical tick labels."""
    plt = _pyplot()
    data = np.array([[stats[e].get(g, {}).get(metric, {}).get("mean", np.nan) for g in groups] for e in encoders])
    fig, ax = plt.subplots(figsize=(max(4, 0.7 * len(groups) + 3), 0.5 * len(encoders) + 2))
    im = ax.imshow(data, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(groups)), groups, rotation=90, fontsize=8)
    ax.set_yticks(range(len(encoders)), [encoder_label(e, plan, missing) for e in encoders], fontsize=8)
    for i in range(len(encoders)):
        for j in range(len(groups)):
            if math.isfinite(data[i, j]):
                ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if data[i, j] < 0.5 else "black")
    ax.set_xlabel(xlabel)
    fig.colorbar(im, ax=ax)
    ax.set_title(f"{title}\n{subtitle_of(plan, missing)}", fontsize=9)
    return fig


def readable_axis(axis, values, log_allowed: bool = True) -> None:
    """A log axis where the values spread over more than a factor 3 (if allowed), else a linear one; at most 5
    ticks, plain numbers without offset, so that labels never collide (near-equal values gave ``112.46112.47…``)."""
    import matplotlib.ticker as ticker

    finite = [v for v in values if math.isfinite(v) and (v > 0 or not log_allowed)]
    if log_allowed and len(finite) > 1 and max(finite) / min(finite) > 3:
        axis.axes.set_xscale("log") if axis.axis_name == "x" else axis.axes.set_yscale("log")
        axis.set_major_locator(ticker.LogLocator(base=10, subs=(1, 2, 5), numticks=6))
        axis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        axis.set_minor_locator(ticker.NullLocator())
    else:
        axis.set_major_locator(ticker.MaxNLocator(nbins=4, min_n_ticks=2))
        formatter = ticker.ScalarFormatter(useOffset=False)
        formatter.set_scientific(False)
        axis.set_major_formatter(formatter)
        axis.set_minor_locator(ticker.NullLocator())
        if finite:
            low, high = min(finite), max(finite)
            pad = max((high - low) * 0.3, abs(high) * 2e-4, 1e-9)  # equal values: a window of ±0.02 %
            axis.axes.set_xlim(low - pad, high + pad) if axis.axis_name == "x" else axis.axes.set_ylim(low - pad, high + pad)


def cost_vs_accuracy(plan, encoders, summary_stats, cost, missing=None):
    """Test PQ against encoder parameters and GFLOPs per tile; one marker per encoder, named in a shared legend."""
    plt = _pyplot()
    shades = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    costed = [e for e in encoders if "gflops" in cost.get(e, {})]
    handles = []
    for ax, x_of in ((axes[0], lambda c: c["encoder_params"] / 1e6), (axes[1], lambda c: c["gflops"])):
        xs = {e: x_of(cost[e]) for e in costed}
        for i, e in enumerate(costed):
            pq = summary_stats[e]["pq"]
            sd = pq["sd"] if math.isfinite(pq["sd"]) else 0
            pathology = get_encoder_spec(e).domain == "pathology"
            handle = ax.errorbar([xs[e]], [pq["mean"]], yerr=[sd], fmt=MARKERS[i % len(MARKERS)], capsize=3,
                                 color=shades(i % 10), markerfacecolor="none" if pathology else shades(i % 10),
                                 label=encoder_label(e, plan, missing) + (" (pathology)" if pathology else ""))
            if ax is axes[0]:
                handles.append(handle)
        readable_axis(ax.xaxis, list(xs.values()))
        ax.grid(alpha=0.3)
    spans = [(s["mean"], s["sd"] if math.isfinite(s["sd"]) else 0) for s in (summary_stats[e]["pq"] for e in costed)]
    readable_axis(axes[0].yaxis, [m + k * sd for m, sd in spans for k in (-1, 1)], log_allowed=False)  # error bars inside
    axes[0].set_xlabel("frozen encoder parameters (millions)")
    axes[1].set_xlabel(f"GFLOPs per {COST_TILE}² tile (encoder + decoder)")
    axes[0].set_ylabel("PQ (test)")
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(3, len(handles)), fontsize=7,
                   bbox_to_anchor=(0.5, -0.02 - 0.045 * math.ceil(len(handles) / 3)), frameon=False)
    fig.suptitle(f"Cost vs accuracy (filled: general-purpose, open: pathology)\n{subtitle_of(plan, missing)}", fontsize=9)
    fig.tight_layout()
    return fig


def write_figures(results, plan, encoders, summary_stats, class_stats, class_names, tissue_stats, tissues, cost,
                  tissue_label, missing=None) -> None:
    """``results/figures/*.png`` from the over-splits statistics of the tables."""
    plt = _pyplot()
    figures = results / "figures"

    def save(fig, name):
        fig.savefig(figures / name, dpi=120, bbox_inches="tight")
        plt.close(fig)

    if not encoders:
        return
    save(metrics_bars(plan, encoders, summary_stats, missing), "metrics_bars.png")
    if class_names:
        save(heatmap(plan, encoders, class_stats, class_names, "f1", "Per-class F1 (HoVer-Net)", "class", missing),
             "per_class_heatmap.png")
    if tissues:
        save(heatmap(plan, encoders, tissue_stats, tissues, "pq", f"bPQ per {tissue_label}", tissue_label, missing),
             "per_tissue_heatmap.png")
    save(cost_vs_accuracy(plan, encoders, summary_stats, cost, missing), "cost_vs_accuracy.png")
