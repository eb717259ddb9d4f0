"""The results folder of a study: tables, gap table, figures, ``cost.json``, ``protocol.json`` and its README,
(re)written from the finished runs; statistics over splits are mean and sample sd of each split's test value."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..atomic import atomic_write_text, write_json
from ..encoders import get_encoder_spec
from ..locking import output_lock
from ..network import COST_TILE
from .cells import HEADLINE_METRICS, load_runs, missing_splits, read_json, runs_of
from .cost import encoder_costs
from .figures import write_figures
from .gap import gap_table, write_gap
from .plan import STUDY_FILE, StudyPlan
from .provenance import now, versions
from .tables import (
    METRIC_LABELS,
    csv_value,
    encoder_label,
    fmt,
    fmt_mean_sd,
    incomplete_notes,
    num,
    random_weights_warning,
    write_group_tables,
    write_table,
)

CLASS_METRICS = ("f1", "pq", "pq+")  # HoVer-Net F1, image-mean PQ (PanNuke), pooled PQ+ (CoNIC)
TISSUE_METRICS = ("pq", "mpq_image")  # per tissue: bPQ and mPQ of that tissue's images


def write_results(study_dir: str | Path, plan: StudyPlan | None = None, log: Callable[[str], None] | None = None) -> Path:
    """(Re)write ``<study_dir>/results/`` from the finished runs of the grid in ``study.json``."""
    say = log or (lambda text: print(text, flush=True))
    study_dir = Path(study_dir).resolve()
    if plan is None:
        data = read_json(study_dir / STUDY_FILE)
        if data is None:
            raise FileNotFoundError(f"{study_dir / STUDY_FILE}: no study here (run_study writes it)")
        plan = StudyPlan.from_json(data)
    results = study_dir / "results"
    with output_lock(results, "study results"):
        return _write_results(study_dir, plan, results, say)


def _write_results(study_dir: Path, plan: StudyPlan, results: Path, say: Callable[[str], None]) -> Path:
    (results / "figures").mkdir(exist_ok=True)
    done, statuses = load_runs(study_dir, plan)
    info = _dataset_info(plan, done)
    head = [_protocol_line(plan, done, info), *random_weights_warning(plan)]
    written = {}
    absent = [s for s in statuses if s["status"] != "done"]
    if absent:
        say(f"results: {len(done)} of {len(statuses)} run(s) finished; missing: "
            + ", ".join(f"{s['split']}/{s['encoder']} ({s['status']})" for s in absent))
    for s in statuses:
        if s["status"] == "corrupt":
            say(f"results: run {s['split']}/{s['encoder']} is corrupt, left out: {s['detail']}")

    # Grid status: every run, finished or not.
    rows = []
    for s in statuses:
        r = s["record"]
        sel = r.get("min_cell_size", {})
        err = (r.get("error") or {}).get("message", "") if s["status"] == "failed" else ""
        err = err or (s["detail"] if s["status"] != "done" else "")
        rows.append([s["encoder"], s["split"], s["status"], sel.get("chosen"), sel.get("metric"), r.get("attempt"),
                     *(r.get("timings", {}).get(k) for k in ("train_s", "select_s", "evaluate_s", "total_s")),
                     (r.get("error") or {}).get("stage", ""), err.splitlines()[0][:300] if err else ""])
    write_table(results, "runs", "Grid runs", head, ["encoder", "split", "status", "min_cell_size", "selection_metric",
                "attempts", "train_s", "select_s", "evaluate_s", "total_s", "failed_stage", "error"], rows)
    written["runs"] = "every run of the grid: status, chosen minimum cell size, timings, error of failed or corrupt runs"

    # One row per run of the grid; the unfinished ones say so instead of dropping out.
    rows = []
    for s in statuses:
        c = done.get((s["encoder"], s["split"]))
        if c is None:
            rows.append([s["encoder"], s["split"], s["status"], plan.encoder_weights[s["encoder"]], None, None,
                         *(float("nan") for _ in HEADLINE_METRICS)])
        else:
            rows.append([c.encoder, c.split, "done", plan.encoder_weights[c.encoder],
                         c.record.get("min_cell_size", {}).get("chosen"), c.metrics.get("n_images"),
                         *(c.metrics.get(m) for m in HEADLINE_METRICS)])
    md_rows = [[r[0], r[1], r[2], *(("MISSING",) * (len(r) - 3) if r[2] != "done" else
                                   (fmt(v) if isinstance(v, float) else csv_value(v) for v in r[3:]))] for r in rows]
    write_table(results, "per_run", "Test metrics per run (encoder × split)", head,
                ["encoder", "split", "status", "weights", "min_cell_size", "n_images", *HEADLINE_METRICS], rows,
                md_rows=md_rows)
    written["per_run"] = "test metrics of every run (encoder × split); unfinished runs are listed as MISSING"

    encoders = [e for e in plan.encoders if any(k[0] == e for k in done)]
    missing = missing_splits(plan, done, encoders)
    notes = incomplete_notes(missing, len(plan.splits))
    summary_stats = {e: _mean_sd_table({m: [num(c.metrics.get(m)) for c in runs_of(done, e)] for m in HEADLINE_METRICS})
                     for e in encoders}
    rows, md_rows = [], []
    for e in encoders:
        st = summary_stats[e]
        n = len(runs_of(done, e))
        rows.append([e, get_encoder_spec(e).domain, plan.encoder_weights[e], n, ";".join(missing[e]),
                     *(x for m in HEADLINE_METRICS for x in (st[m]["mean"], st[m]["sd"]))])
        md_rows.append([encoder_label(e, plan, missing), get_encoder_spec(e).domain,
                        f"{n} of {len(plan.splits)}" + (" †" if missing[e] else ""),
                        *(fmt_mean_sd(st[m]) for m in HEADLINE_METRICS)])
    write_table(results, "summary", "Test metrics per encoder (mean ± sd over splits)", head,
                ["encoder", "domain", "weights", "n_splits", "missing_splits",
                 *(f"{m}_{s}" for m in HEADLINE_METRICS for s in ("mean", "sd"))],
                rows, ["encoder", "domain", "splits", *(METRIC_LABELS[m] for m in HEADLINE_METRICS)], md_rows, notes=notes)
    written["summary"] = "encoder × metric, mean ± sample sd over splits of each split's test value (incomplete encoders marked)"

    class_names = list(info.get("class_names") or [])
    class_stats = _per_group_stats(done, encoders, "per_class", "class", CLASS_METRICS)
    write_group_tables(results, "per_class", "Per-class test metrics (mean ± sd over splits)", head, plan, encoders,
                       class_stats, class_names, CLASS_METRICS, "class",
                       {"f1": "HoVer-Net F1", "pq": "PQ (image mean)", "pq+": "PQ+ (pooled)"}, missing)
    written["per_class"] = "encoder × class: HoVer-Net F1, image-mean PQ, pooled PQ+ (mean ± sd over splits)"
    tissues = sorted({r["tissue"] for c in done.values() for r in c.per_tissue})
    tissue_stats = _per_group_stats(done, encoders, "per_tissue", "tissue", TISSUE_METRICS)
    tissue_label = info.get("tissue_label") or "tissue"
    write_group_tables(results, "per_tissue", f"Per-{tissue_label} test metrics (mean ± sd over splits)", head, plan,
                       encoders, tissue_stats, tissues, TISSUE_METRICS, tissue_label.replace(" ", "_"),
                       {"pq": "bPQ", "mpq_image": "mPQ"}, missing)
    written["per_tissue"] = f"encoder × {tissue_label}: bPQ and mPQ of that {tissue_label}'s test images"

    from ..metrics.aggregation import canonical_metric

    gap_metrics = [canonical_metric(m) for m in (plan.gap_metrics or (("mpq+", "bpq") if len(class_names) > 1 else ("pq", "f1d")))]
    gap_rows, gap_notes = gap_table(plan, done, encoders, summary_stats, gap_metrics)
    write_gap(results, head, gap_rows, gap_notes, plan, missing)
    written["gap"] = "each pathology encoder vs the best general-purpose one: difference, paired bootstrap CI, permutation p"

    cost = encoder_costs(results, plan, encoders, len(class_names) or 1)
    write_figures(results, plan, encoders, summary_stats, class_stats, class_names, tissue_stats, tissues, cost, tissue_label,
                  missing)
    _protocol_json(results, plan, done, statuses, info, gap_metrics, cost)
    _readme(results, plan, head, written, statuses, done)
    say(f"results: {results}")
    return results


def _protocol_line(plan: StudyPlan, done: dict, info: dict) -> str:
    """The first header line of every table: the protocol its numbers were computed under."""
    protocols = [c.summary.get("protocol", {}) for c in done.values()]
    first = protocols[0] if protocols else {}
    policies = sorted({p.get("empty_policy", "?") for p in protocols}) or ["?"]
    averaging = sorted({p.get("averaging", "?") for p in protocols}) or ["?"]
    split_text = ", ".join(s.name + (f" (protocol {s.protocol})" if s.protocol and s.protocol != s.name else "") for s in plan.splits)
    mag = info.get("magnification")
    mpp = info.get("mpp")
    sizes = sorted({c.record.get("min_cell_size", {}).get("chosen") for c in done.values()} - {None})
    return (f"Protocol: dataset {plan.dataset}, test split of {split_text}; empty-image policy {'/'.join(policies)}; "
            f"bPQ/mPQ averaging {'/'.join(averaging)}; {mag}x ({mpp} µm/px); detection radius "
            f"{first.get('detection_radius', '?')} px; minimum cell size chosen per run on val "
            f"({', '.join(map(str, sizes)) or '—'} px); mean ± sd over splits (see protocol.json)")


def _dataset_info(plan: StudyPlan, done: dict) -> dict:
    """Name, classes, magnification of the dataset; from the finished runs where the dataset folder is gone."""
    from ..data.prepared import read_dataset_info

    root = Path(plan.dataset_dir) / plan.splits[0].name if plan.dataset == "synthetic" else Path(plan.dataset_dir)
    try:
        info = read_dataset_info(root)
        return {"name": info.name, "class_names": list(info.class_names), "magnification": info.magnification,
                "mpp": info.mpp, "tissue_label": info.tissue_label, "description": info.description,
                "empty_policy_default": info.empty_policy}
    except (FileNotFoundError, ValueError):
        first = next(iter(done.values()), None)
        prot = first.summary.get("protocol", {}) if first else {}
        return {"name": plan.dataset, "class_names": first.summary.get("class_names") if first else None,
                "magnification": prot.get("magnification"), "mpp": prot.get("mpp"), "tissue_label": "tissue"}


def _mean_sd_table(values: dict[str, list[float]]) -> dict[str, dict]:
    """Metric → mean and sd over splits, from metric → one value per split."""
    from ..metrics.statistics import across_splits

    keys = list(values)
    n = max((len(v) for v in values.values()), default=0)
    if n == 0:
        return {}
    summaries = [{k: values[k][i] for k in keys if i < len(values[k])} for i in range(n)]
    return across_splits(summaries)


def _per_group_stats(done: dict, encoders: list[str], attr: str, key: str, metrics) -> dict:
    """encoder → group → metric → {mean, sd, n_splits}, from each run's per_class/per_tissue CSV."""
    out = {}
    for e in encoders:
        cells = runs_of(done, e)
        groups = sorted({r[key] for c in cells for r in getattr(c, attr)})
        out[e] = {}
        for g in groups:
            values = {m: [] for m in metrics}
            for c in cells:
                row = next((r for r in getattr(c, attr) if r[key] == g), None)
                for m in metrics:
                    values[m].append(num(row.get(m)) if row else float("nan"))
            out[e][g] = _mean_sd_table(values)
    return out


def _protocol_json(results: Path, plan: StudyPlan, done: dict, statuses: list[dict], info: dict, gap_metrics, cost) -> None:
    from ..data import registry
    from ..metrics.report import AVERAGING

    splits = []
    for s in plan.splits:
        entry = {"name": s.name, "protocol": s.protocol, "data_seed": s.data_seed}
        if plan.dataset != "synthetic":
            try:
                entry.update(registry.protocol_of(plan.dataset_dir, s.protocol))
            except (ValueError, FileNotFoundError):
                pass
        metric_protocols = [c.summary.get("protocol") for k, c in done.items() if k[1] == s.name]
        entry["metric_protocol"] = metric_protocols[0] if metric_protocols else None
        splits.append(entry)
    runs = {}
    for st in statuses:
        r = st["record"]
        sel = r.get("min_cell_size", {})
        runs[f"{st['split']}/{st['encoder']}"] = {
            "status": st["status"], "encoder_weights": r.get("encoder_weights"), "random_weights": r.get("random_weights"),
            "reduced_encoder": r.get("reduced_encoder"), "min_cell_size": sel.get("chosen"),
            "min_cell_size_candidates": sel.get("candidates"), "selection_metric": sel.get("metric"),
            "selection_split": sel.get("split"), "selection_images": sel.get("n_images"),
            "test_images": (r.get("test") or {}).get("n_images"), "training_seed": r.get("training_seed"),
            "data_seed": r.get("data_seed"), "bundle": r.get("bundle"), "versions": r.get("versions")}
    doc = {
        "what": "the exact protocol of every number in this folder",
        "dataset": {**info, "dataset_dir": plan.dataset_dir},
        "splits": splits,
        "evaluation": {"split": "test (of each split)", "averaging": AVERAGING,
                       "over_splits": "mean and sample sd (ddof=1) over splits of each split's test value; sd omitted with one split"},
        "min_cell_size_selection": {
            "chosen_on": "the validation split of each run, never test",
            "metric": "mPQ+ for multi-class data, PQ + detection F1 for one class (METHOD.md §4)",
            "candidates": plan.min_cell_sizes or "METHOD.md §4 grid for the magnification: 20x 17–32 step 3, 40x 50–80 step 5",
            "how": "one network pass over the validation tiles; each candidate post-processes the same outputs"},
        "training": {"overrides": plan.overrides, "encoder_weights": plan.encoder_weights,
                     "random_weights": [e for e, w in plan.encoder_weights.items() if w == "random"]},
        "gap": {"metrics": gap_metrics, "reference": "the best general-purpose encoder by the mean over splits of each metric",
                "bootstrap_resamples": plan.bootstrap, "permutations": plan.permutations, "confidence": plan.confidence,
                "seed": plan.seed},
        "cost": {"how": f"torch.utils.flop_counter.FlopCounterMode on one {COST_TILE}² tile, multiply-add = 2 FLOPs",
                 "per_encoder": cost},
        "runs": runs,
        "versions": versions(),
        "created": now(),
    }
    write_json(results / "protocol.json", doc)


def _readme(results: Path, plan: StudyPlan, head: list[str], written: dict, statuses: list[dict], done: dict) -> None:
    failed = [s for s in statuses if s["status"] != "done"]
    lines = ["# Study results", "", *[f"{line}  " for line in head], "",
             f"Grid: {len(plan.encoders)} encoder(s) × {len(plan.splits)} split(s) of `{plan.dataset}`; "
             f"{len(done)} run(s) finished, {len(failed)} not.", ""]
    if failed:
        lines += ["**Runs without results** (see `runs.md`; rerun the study, or their `--only` jobs, to retry them; "
                  "tables mark the encoders they leave incomplete):", ""]
        lines += [f"- {s['split']}/{s['encoder']}: {s['status']}"
                  + (f" — {(s['record'].get('error') or {}).get('message', '').splitlines()[0][:200]}"
                     if (s["record"].get("error") or {}).get("message") else f" — {s['detail'][:200]}" if s.get("detail") else "")
                  for s in failed]
        lines.append("")
    lines += ["| file | what it holds |", "|---|---|"]
    for stem, what in written.items():
        lines.append(f"| `{stem}.csv`, `{stem}.md` | {what} |")
    lines += [
        "| `figures/metrics_bars.png` | headline metrics per encoder, bars = mean, error bars = sd over splits |",
        "| `figures/per_class_heatmap.png` | per-class HoVer-Net F1, encoder × class |",
        "| `figures/per_tissue_heatmap.png` | bPQ per tissue / brain area, encoder × group |",
        f"| `figures/cost_vs_accuracy.png` | test PQ vs frozen-encoder parameters and GFLOPs per {COST_TILE}² tile |",
        "| `cost.json` | parameters and GFLOPs per encoder (cache; FlopCounterMode) |",
        "| `protocol.json` | the exact protocol of every number: dataset, splits, empty-image policy, averaging, "
        "magnification, detection radius, minimum cell size per run, seeds, versions |",
        "",
        "CSV files start with `#` lines naming the protocol; read them with `pandas.read_csv(path, comment='#')`.",
        "Per-run details (checkpoint, TensorBoard run, candidate scores on val, per-image test scores) live in "
        "`../cells/<dataset>/<split>/<encoder>/`.",
    ]
    atomic_write_text(results / "README.md", "\n".join(lines) + "\n")
