"""The figures of the results folder: metric bars, per-class and per-tissue heatmaps, cost vs accuracy."""

from __future__ import annotations

import math

import numpy as np

from ..encoders import get_encoder_spec
from ..network import COST_TILE
from .tables import METRIC_LABELS, encoder_label, random_weights_warning

BAR_METRICS = ("pq", "bpq", "mpq", "mpq+", "aji", "dice", "f1d")


def write_figures(results, plan, encoders, summary_stats, class_stats, class_names, tissue_stats, tissues, cost,
                  tissue_label) -> None:
    """``results/figures/*.png`` from the over-splits statistics of the tables."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    figures = results / "figures"
    warn = " — RANDOM ENCODER WEIGHTS" if random_weights_warning(plan) else ""
    subtitle = f"{plan.dataset}, test split, mean ± sd over {len(plan.splits)} split(s){warn}"
    colors = {"general": "#4C72B0", "pathology": "#DD8452"}

    def save(fig, name):
        fig.savefig(figures / name, dpi=120, bbox_inches="tight")
        plt.close(fig)

    if not encoders:
        return
    # 1. Metric bars with error bars.
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(BAR_METRICS) * max(1, len(encoders)) / 2), 4))
    width = 0.8 / len(encoders)
    shades = plt.get_cmap("tab10")
    for i, e in enumerate(encoders):
        means = [summary_stats[e][m]["mean"] for m in BAR_METRICS]
        sds = [summary_stats[e][m]["sd"] if math.isfinite(summary_stats[e][m]["sd"]) else 0 for m in BAR_METRICS]
        x = np.arange(len(BAR_METRICS)) + (i - (len(encoders) - 1) / 2) * width
        ax.bar(x, means, width, yerr=sds, capsize=2, label=encoder_label(e, plan), color=shades(i % 10), edgecolor="0.2",
               linewidth=0.5, hatch="//" if get_encoder_spec(e).domain == "pathology" else None)
    ax.set_xticks(np.arange(len(BAR_METRICS)), [METRIC_LABELS[m] for m in BAR_METRICS])
    ax.set_ylim(0, 1)
    ax.set_ylabel("score")
    ax.set_title(f"Test metrics per encoder\n{subtitle}", fontsize=9)
    ax.legend(fontsize=7, ncol=2, title="hatched: pathology", title_fontsize=7)
    save(fig, "metrics_bars.png")

    def heatmap(stats, groups, metric, name, title, xlabel):
        if not groups:
            return
        data = np.array([[stats[e].get(g, {}).get(metric, {}).get("mean", np.nan) for g in groups] for e in encoders])
        fig, ax = plt.subplots(figsize=(max(4, 0.7 * len(groups) + 3), 0.5 * len(encoders) + 2))
        im = ax.imshow(data, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(groups)), groups, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(encoders)), [encoder_label(e, plan) for e in encoders], fontsize=8)
        for i in range(len(encoders)):
            for j in range(len(groups)):
                if math.isfinite(data[i, j]):
                    ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if data[i, j] < 0.5 else "black")
        ax.set_xlabel(xlabel)
        fig.colorbar(im, ax=ax)
        ax.set_title(f"{title}\n{subtitle}", fontsize=9)
        save(fig, name)

    heatmap(class_stats, class_names, "f1", "per_class_heatmap.png", "Per-class F1 (HoVer-Net)", "class")
    heatmap(tissue_stats, tissues, "pq", "per_tissue_heatmap.png", f"bPQ per {tissue_label}", tissue_label)

    # 4. Cost vs accuracy.
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    costed = [e for e in encoders if "gflops" in cost.get(e, {})]
    for ax, x_of in ((axes[0], lambda c: c["encoder_params"] / 1e6), (axes[1], lambda c: c["gflops"])):
        xs = {e: x_of(cost[e]) for e in costed}
        middle = float(np.median(list(xs.values()))) if xs else 0.0
        for e in costed:
            pq = summary_stats[e]["pq"]
            sd = pq["sd"] if math.isfinite(pq["sd"]) else 0
            ax.errorbar([xs[e]], [pq["mean"]], yerr=[sd], fmt="o", capsize=3, color=colors[get_encoder_spec(e).domain])
            right = xs[e] > middle  # labels point inwards so that they stay inside the axes
            ax.annotate(encoder_label(e, plan), (xs[e], pq["mean"]), fontsize=7, xytext=(-4 if right else 4, 4),
                        textcoords="offset points", ha="right" if right else "left")
    axes[0].set_xlabel("frozen encoder parameters (millions)")
    axes[1].set_xlabel(f"GFLOPs per {COST_TILE}² tile (encoder + decoder)")
    axes[0].set_ylabel("PQ (test)")
    for ax in axes:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1, 2, 5)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.margins(x=0.35, y=0.15)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Cost vs accuracy (blue: general-purpose, orange: pathology)\n{subtitle}", fontsize=9)
    save(fig, "cost_vs_accuracy.png")
