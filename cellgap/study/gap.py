"""The gap table: each pathology encoder vs the best general-purpose one, with paired statistics on the same
test images — per split, and pooled over splits (:func:`pooled_paired_statistics`)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..encoders import get_encoder_spec
from .cells import RunResult
from .plan import StudyPlan
from .tables import encoder_label, fmt, incomplete_notes, write_table

GAP_COLUMNS = ["metric", "encoder", "reference", "split", "encoder_value", "reference_value", "difference", "ci_low",
               "ci_high", "p_bootstrap", "p_permutation", "n_images", "n_splits"]


def _run_table_and_protocol(cell: RunResult):
    """A finished run's per-image test scores and the metric protocol they were computed with."""
    from ..metrics.protocol import Protocol
    from ..metrics.report import read_per_image_csv

    table = read_per_image_csv(cell.folder / "eval_test" / "per_image.csv", cell.summary.get("class_names"))
    fields = {k: v for k, v in cell.summary["protocol"].items() if k in Protocol.__dataclass_fields__}
    return table, Protocol(**fields)


def pooled_paired_statistics(pairs, metric: str, n_resamples: int = 2000, n_permutations: int = 5000,
                             confidence: float = 0.95, seed: int = 0) -> dict:
    """Difference A − B of a metric averaged over splits, with a split-stratified paired bootstrap interval and a
    paired permutation p-value.

    ``pairs``: one ``(table_a, table_b, protocol)`` per split, both tables scoring the same test images.  The
    statistic is the mean over splits of each split's metric difference (what the summary's mean ± sd compares);
    bootstrap replicates resample images within every split with the same draw for A and B; a permutation swaps
    A's and B's results of an image at random, in every split.  (The per-split tests of
    :mod:`cellgap.metrics.statistics` work on one table pair; this one keeps the splits apart.)
    """
    # The statistics module's building blocks: every metric is a function of weighted per-image column sums.
    from ..metrics.aggregation import aggregate_sums, canonical_metric, image_features, weighted_sums
    from ..metrics.statistics import bootstrap_weights

    metric = canonical_metric(metric)
    if not pairs:
        raise ValueError("pooled_paired_statistics: no split to compare")
    rng = np.random.default_rng(seed)
    splits = []
    for a, b, protocol in pairs:
        b = b.aligned_with(a)
        fa, fb = image_features(a, protocol), image_features(b, protocol)
        ones = np.ones((1, len(a)))
        va = float(aggregate_sums(weighted_sums(fa, ones), a.class_names, protocol)[metric][0])
        vb = float(aggregate_sums(weighted_sums(fb, ones), a.class_names, protocol)[metric][0])
        splits.append({"a": a, "protocol": protocol, "fa": fa, "fb": fb, "va": va, "vb": vb,
                       "total_a": {k: v.sum(0) for k, v in fa.items()}, "total_b": {k: v.sum(0) for k, v in fb.items()},
                       "moved": {k: fb[k] - fa[k] for k in fa}})
    delta = float(np.mean([s["va"] - s["vb"] for s in splits]))
    chunk = 512  # replicates per matrix product, to bound memory

    def metric_of(sums, s):
        return aggregate_sums(sums, s["a"].class_names, s["protocol"])[metric]

    diffs = []
    for start in range(0, n_resamples, chunk):
        k = min(chunk, n_resamples - start)
        d = np.zeros(k)
        for s in splits:
            strata = s["a"].tissues if s["protocol"].averaging == "tissue" else None
            w = bootstrap_weights(len(s["a"]), k, rng, strata)
            d += metric_of(weighted_sums(s["fa"], w), s) - metric_of(weighted_sums(s["fb"], w), s)
        diffs.append(d / len(splits))
    d = np.concatenate(diffs)
    d = d[np.isfinite(d)]
    alpha = (1 - confidence) / 2
    low, high = (np.quantile(d, [alpha, 1 - alpha]) if len(d) else (float("nan"), float("nan")))
    p_boot = float((1 + (np.abs(d - delta) >= abs(delta) - 1e-12).sum()) / (1 + len(d)))
    count = 0
    for start in range(0, n_permutations, chunk):
        k = min(chunk, n_permutations - start)
        d = np.zeros(k)
        for s in splits:
            swap = rng.integers(0, 2, size=(k, len(s["a"]))).astype(np.float64)
            moved = weighted_sums(s["moved"], swap)  # what A gains (and B loses) from the swapped images
            d += (metric_of({key: s["total_a"][key] + moved[key] for key in moved}, s)
                  - metric_of({key: s["total_b"][key] - moved[key] for key in moved}, s))
        d /= len(splits)
        count += int((np.abs(d[np.isfinite(d)]) >= abs(delta) - 1e-12).sum())
    return {"metric": metric, "a": float(np.mean([s["va"] for s in splits])), "b": float(np.mean([s["vb"] for s in splits])),
            "difference": delta, "low": float(low), "high": float(high), "p_bootstrap": p_boot,
            "p_permutation": float((1 + count) / (1 + n_permutations)), "n_splits": len(splits),
            "n_images": int(sum(len(s["a"]) for s in splits)), "confidence": confidence}


def gap_table(plan: StudyPlan, done: dict, encoders: list[str], summary_stats: dict, metrics: list[str]):
    """Rows of :data:`GAP_COLUMNS` (every split, then the mean over splits), and notes on what was not compared."""
    from ..metrics.statistics import paired_bootstrap, paired_permutation_test

    rows, notes = [], []
    general = [e for e in encoders if get_encoder_spec(e).domain == "general"]
    pathology = [e for e in encoders if get_encoder_spec(e).domain == "pathology"]
    if not general or not pathology:
        notes.append("No gap table: the finished runs need at least one general-purpose and one pathology encoder "
                     f"(general: {general or 'none'}; pathology: {pathology or 'none'}).")
        return rows, notes
    split_names = [s.name for s in plan.splits]
    for metric in metrics:
        means = {e: summary_stats[e].get(metric, {}).get("mean", float("nan")) for e in general}
        finite = {e: v for e, v in means.items() if math.isfinite(v)}
        if not finite:
            notes.append(f"{metric}: no general-purpose encoder has a finite mean; skipped.")
            continue
        best = max(finite, key=finite.get)  # ties: the first in the grid's order
        for e in pathology:
            common = [s for s in split_names if (e, s) in done and (best, s) in done]
            if not common:
                notes.append(f"{metric}: {e} and {best} share no finished split.")
                continue
            pairs = []
            for s in common:
                ta, protocol = _run_table_and_protocol(done[(e, s)])
                tb, _ = _run_table_and_protocol(done[(best, s)])
                stratified = protocol.averaging == "tissue"
                try:
                    boot = paired_bootstrap(ta, tb, protocol, metric, n_resamples=plan.bootstrap, confidence=plan.confidence,
                                            seed=plan.seed, stratify_by_tissue=stratified)
                    perm = paired_permutation_test(ta, tb, protocol, metric, n_permutations=plan.permutations, seed=plan.seed)
                except ValueError as err:
                    notes.append(f"{metric}, {e} vs {best}, split {s}: {err}")
                    continue
                rows.append([metric, e, best, s, boot["a"], boot["b"], boot["difference"], boot["low"], boot["high"],
                             boot["p_value"], perm["p_value"], boot["n_images"], 1])
                pairs.append((ta, tb, protocol))
            left_out = [s for s in split_names if s not in common]
            if left_out:
                notes.append(f"{metric}, {e} vs {best}: INCOMPLETE, the row 'all' averages "
                             f"{len(common)} of {len(split_names)} splits; no run of both on {', '.join(left_out)}.")
            if pairs:
                pooled = pooled_paired_statistics(pairs, metric, plan.bootstrap, plan.permutations, plan.confidence, plan.seed)
                label = "all (mean over splits)" if not left_out else f"all (mean over {len(common)} of {len(split_names)} splits)"
                rows.append([metric, e, best, label, pooled["a"], pooled["b"], pooled["difference"],
                             pooled["low"], pooled["high"], pooled["p_bootstrap"], pooled["p_permutation"],
                             pooled["n_images"], pooled["n_splits"]])
    return rows, notes


def write_gap(results: Path, head: list[str], rows: list[list], notes: list[str], plan: StudyPlan,
              missing: dict[str, list[str]] | None = None) -> None:
    conf = int(round(plan.confidence * 100))
    md = [[r[0], encoder_label(r[1], plan, missing), encoder_label(r[2], plan, missing), r[3], fmt(r[4]), fmt(r[5]), f"{r[6]:+.3f}",
           f"[{fmt(r[7])}, {fmt(r[8])}]", fmt(r[9], 4), fmt(r[10], 4), r[11]] for r in rows]
    explain = [
        f"difference = encoder − reference (best general-purpose encoder by the mean over splits of the metric); "
        f"{conf}% CI: paired percentile bootstrap over test images ({plan.bootstrap} resamples, the same images for both, "
        f"stratified by tissue where the metric averages over tissues); p_bootstrap: two-sided, from the centred bootstrap "
        f"distribution; p_permutation: two-sided paired permutation test ({plan.permutations} random swaps of the two "
        f"encoders' results per image). Row 'all (mean over splits)': the mean over splits of the per-split differences "
        f"(= difference of the summary means), resampled/permuted within every split.",
    ]
    write_table(results, "gap", "Gap: pathology encoders vs the best general-purpose encoder", head,
                GAP_COLUMNS, rows,
                ["metric", "encoder", "reference", "split", "encoder", "reference", "difference", f"{conf}% CI",
                 "p (bootstrap)", "p (permutation)", "images"], md,
                notes=explain + notes + incomplete_notes(missing or {}, len(plan.splits)))
