"""Uncertainty over images: bootstrap confidence intervals and paired tests between two runs.

Resampling works on whole images (the unit the study samples), and every replicate recomputes the
metric exactly as the protocol defines it — pooled metrics are re-pooled, tissue means re-averaged —
through the weighted sums of :mod:`cellgap.metrics.aggregation`, so thousands of replicates cost a
few matrix products.

* :func:`bootstrap_ci` — percentile intervals, optionally stratified by tissue (each tissue keeps
  its number of images, as the tissue-averaged metrics assume).
* :func:`paired_bootstrap` — both runs resampled with the *same* images; interval of the difference
  and a two-sided p-value for "no difference" (the shifted bootstrap distribution).
* :func:`paired_permutation_test` — under "no difference" the two runs' scores of one image are
  exchangeable: swap them at random per image; two-sided Monte-Carlo p-value (1 + #≥)/(1 + P).
"""

from __future__ import annotations

import numpy as np

from .aggregation import ScoreTable, aggregate_sums, canonical_metric, image_features, weighted_sums
from .protocol import Protocol

_CHUNK = 512  # replicates per matrix product, to bound memory


def bootstrap_weights(n: int, n_resamples: int, rng: np.random.Generator, strata: np.ndarray | None = None) -> np.ndarray:
    """(n_resamples, n) image multiplicities of bootstrap resamples (within each stratum if given)."""
    if strata is None:
        return rng.multinomial(n, np.full(n, 1.0 / n), size=n_resamples).astype(np.float64)
    weights = np.zeros((n_resamples, n))
    for s in np.unique(strata):
        idx = np.flatnonzero(strata == s)
        weights[:, idx] = rng.multinomial(len(idx), np.full(len(idx), 1.0 / len(idx)), size=n_resamples)
    return weights


def _check(metric: str, value: float, what: str) -> None:
    if not np.isfinite(value):
        raise ValueError(f"{what}: metric {metric!r} is NaN on the full data (nothing to resample); "
                         "check the protocol's empty-image policy and that the images have cells of every class")


def _metric_names(table: ScoreTable, protocol: Protocol, metrics) -> tuple[list[str], dict]:
    plain = aggregate_sums(weighted_sums(image_features(table, protocol), np.ones((1, len(table)))), table.class_names, protocol)
    names = [canonical_metric(m) for m in (metrics if metrics is not None else plain)]
    unknown = [m for m in names if m not in plain]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {sorted(plain)}")
    return names, plain


def bootstrap_ci(
    table: ScoreTable,
    protocol: Protocol,
    metrics=None,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    stratify_by_tissue: bool = False,
) -> dict[str, dict[str, float]]:
    """Percentile bootstrap intervals over images: metric → {value, low, high, se}.

    Replicates where a metric is undefined (NaN, e.g. no image of a class drawn) are left out.
    """
    if len(table) == 0:
        raise ValueError("bootstrap_ci: no scored images")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence: expected a value in (0, 1), got {confidence}")
    names, plain = _metric_names(table, protocol, metrics)
    feats = image_features(table, protocol)
    rng = np.random.default_rng(seed)
    strata = table.tissues if stratify_by_tissue else None
    reps = {m: [] for m in names}
    for start in range(0, n_resamples, _CHUNK):
        w = bootstrap_weights(len(table), min(_CHUNK, n_resamples - start), rng, strata)
        values = aggregate_sums(weighted_sums(feats, w), table.class_names, protocol)
        for m in names:
            reps[m].append(values[m])
    alpha = (1 - confidence) / 2
    out = {}
    for m in names:
        r = np.concatenate(reps[m])
        r = r[np.isfinite(r)]
        value = float(plain[m][0])
        if len(r) == 0 or not np.isfinite(value):
            out[m] = {"value": value, "low": float("nan"), "high": float("nan"), "se": float("nan")}
            continue
        low, high = np.quantile(r, [alpha, 1 - alpha])
        out[m] = {"value": value, "low": float(low), "high": float(high), "se": float(r.std(ddof=1)) if len(r) > 1 else float("nan")}
    return out


def _paired_setup(table_a: ScoreTable, table_b: ScoreTable, protocol: Protocol, metric: str):
    metric = canonical_metric(metric)
    if table_a.class_names != table_b.class_names:
        raise ValueError("paired comparison: the runs have different class names")
    b = table_b.aligned_with(table_a)
    if not np.array_equal(b.tissues, table_a.tissues):
        raise ValueError("paired comparison: the same image ids carry different tissues in the two runs")
    names, plain_a = _metric_names(table_a, protocol, [metric])
    fa, fb = image_features(table_a, protocol), image_features(b, protocol)
    va = float(plain_a[metric][0])
    vb = float(aggregate_sums(weighted_sums(fb, np.ones((1, len(b)))), b.class_names, protocol)[metric][0])
    _check(metric, va, "run A")
    _check(metric, vb, "run B")
    return metric, fa, fb, va, vb


def paired_bootstrap(
    table_a: ScoreTable,
    table_b: ScoreTable,
    protocol: Protocol,
    metric: str = "pq",
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    stratify_by_tissue: bool = False,
) -> dict:
    """Difference A − B of a metric on the same images, its bootstrap interval and two-sided p-value."""
    metric, fa, fb, va, vb = _paired_setup(table_a, table_b, protocol, metric)
    n = len(table_a)
    rng = np.random.default_rng(seed)
    strata = table_a.tissues if stratify_by_tissue else None
    diffs = []
    for start in range(0, n_resamples, _CHUNK):
        w = bootstrap_weights(n, min(_CHUNK, n_resamples - start), rng, strata)
        a = aggregate_sums(weighted_sums(fa, w), table_a.class_names, protocol)[metric]
        b = aggregate_sums(weighted_sums(fb, w), table_a.class_names, protocol)[metric]
        diffs.append(a - b)
    d = np.concatenate(diffs)
    d = d[np.isfinite(d)]
    delta = va - vb
    alpha = (1 - confidence) / 2
    low, high = np.quantile(d, [alpha, 1 - alpha])
    # Two-sided test of "no difference": how often the centred bootstrap difference is as extreme.
    extreme = np.abs(d - delta) >= abs(delta) - 1e-12
    return {"metric": metric, "a": va, "b": vb, "difference": delta, "low": float(low), "high": float(high),
            "p_value": float((1 + extreme.sum()) / (1 + len(d))), "n_images": n, "n_resamples": len(d),
            "confidence": confidence, "method": "paired bootstrap over images" + (" (stratified by tissue)" if strata is not None else "")}


def paired_permutation_test(
    table_a: ScoreTable,
    table_b: ScoreTable,
    protocol: Protocol,
    metric: str = "pq",
    n_permutations: int = 5000,
    seed: int = 0,
) -> dict:
    """Two-sided paired permutation test: swap the two runs' results per image at random."""
    metric, fa, fb, va, vb = _paired_setup(table_a, table_b, protocol, metric)
    n = len(table_a)
    rng = np.random.default_rng(seed)
    total_a = {k: v.sum(0) for k, v in fa.items()}
    total_b = {k: v.sum(0) for k, v in fb.items()}
    delta = va - vb
    count, done = 0, 0
    while done < n_permutations:
        k = min(_CHUNK, n_permutations - done)
        swap = rng.integers(0, 2, size=(k, n)).astype(np.float64)
        moved = {key: swap @ (fb[key] - fa[key]) for key in fa}
        a = aggregate_sums({key: total_a[key] + moved[key] for key in fa}, table_a.class_names, protocol)[metric]
        b = aggregate_sums({key: total_b[key] - moved[key] for key in fa}, table_a.class_names, protocol)[metric]
        d = a - b
        count += int((np.abs(d[np.isfinite(d)]) >= abs(delta) - 1e-12).sum())
        done += k
    return {"metric": metric, "a": va, "b": vb, "difference": delta, "p_value": float((1 + count) / (1 + n_permutations)),
            "n_images": n, "n_permutations": n_permutations, "method": "paired permutation test over images (random swaps)"}


def across_splits(summaries: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean ± sample sd of each metric over splits (PanNuke: the 3 official splits)."""
    if not summaries:
        raise ValueError("across_splits: no summaries")
    keys = [k for k in summaries[0] if all(k in s for s in summaries)]
    out = {}
    for k in keys:
        x = np.array([s[k] for s in summaries], dtype=np.float64)
        out[k] = {"mean": float(np.mean(x)), "sd": float(np.std(x, ddof=1)) if len(x) > 1 else float("nan"), "n_splits": len(x)}
    return out
