"""How the results tables look: labels, number formats, and the writer of each ``<stem>.csv`` + ``<stem>.md`` pair."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_text
from ..encoders import get_encoder_spec
from .plan import StudyPlan

METRIC_LABELS = {"pq": "PQ", "bpq": "bPQ", "mpq": "mPQ", "mpq+": "mPQ+", "aji": "AJI", "dice": "Dice", "f1d": "F1 (det.)",
                 "dq": "DQ", "sq": "SQ", "aji+": "AJI+", "r2": "R²"}
NO_CELL = "(no finished run)"


def num(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def fmt_mean_sd(stats: dict | None, digits: int = 3) -> str:
    if not stats or not math.isfinite(stats.get("mean", float("nan"))):
        return "—"
    sd = stats.get("sd", float("nan"))
    return f"{stats['mean']:.{digits}f} ± {sd:.{digits}f}" if math.isfinite(sd) else f"{stats['mean']:.{digits}f}"


def csv_value(v) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, (float, np.floating)):
        return "nan" if not math.isfinite(float(v)) else repr(float(v))
    return "" if v is None else str(v)


def encoder_label(encoder: str, plan: StudyPlan, missing: dict[str, list[str]] | None = None) -> str:
    """The encoder's name, tagged where its numbers need a caveat (random weights, reduced model, splits missing)."""
    tags = []
    if plan.encoder_weights.get(encoder) == "random":
        tags.append("RANDOM WEIGHTS")
    if plan.overrides.get("reduced_encoder") and get_encoder_spec(encoder).reduced_kwargs:
        tags.append("reduced")
    if missing and missing.get(encoder):
        n = len(plan.splits)
        tags.append(f"{n - len(missing[encoder])} of {n} splits")
    return f"{encoder} [{', '.join(tags)}]" if tags else encoder


def incomplete_notes(missing: dict[str, list[str]], n_splits: int) -> list[str]:
    """The footnote of a table whose encoders lack runs: their numbers are over fewer splits than the grid's."""
    lines = [f"- {e}: {n_splits - len(m)} of {n_splits} splits; missing {', '.join(m)}" for e, m in missing.items() if m]
    if not lines:
        return []
    return ["† INCOMPLETE: means and sds of these encoders are over their finished splits only, not comparable with "
            "the others' (run the missing runs, then `--results-only`):", *lines]


def random_weights_warning(plan: StudyPlan) -> list[str]:
    """The header line that flags encoders run with random weights; none when every encoder had real weights."""
    random = [e for e in plan.encoders if plan.encoder_weights.get(e) == "random"]
    if not random:
        return []
    return [f"WARNING: RANDOM ENCODER WEIGHTS for {', '.join(random)} — these numbers test the pipeline, "
            "they say nothing about the encoders."]


def _write_csv(path: Path, header_lines: list[str], columns: list[str], rows: list[list]) -> None:
    """``#`` header lines, then the table."""
    buf = io.StringIO()
    for line in header_lines:
        buf.write(f"# {line}\n")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([[csv_value(v) for v in row] for row in rows])
    atomic_write_text(path, buf.getvalue())


def _markdown_head(title: str, header_lines: list[str]) -> list[str]:
    return [f"# {title}", ""] + [f"{line}  " for line in header_lines]  # two spaces: a Markdown line break


def write_table(results: Path, stem: str, title: str, header_lines: list[str], columns: list[str], rows: list[list],
                md_columns: list[str] | None = None, md_rows: list[list] | None = None, notes: list[str] | None = None) -> None:
    """``<stem>.csv`` (``#`` header lines, then the table) and ``<stem>.md`` (title, header lines, table)."""
    _write_csv(results / f"{stem}.csv", header_lines, columns, rows)
    md_columns = md_columns or columns
    md_rows = md_rows if md_rows is not None else [[fmt(v) if isinstance(v, float) else csv_value(v) for v in r] for r in rows]
    lines = _markdown_head(title, header_lines) + [""]
    if md_rows:
        lines += ["| " + " | ".join(md_columns) + " |", "|" + "---|" * len(md_columns)]
        lines += ["| " + " | ".join(str(v) for v in r) + " |" for r in md_rows]
    else:
        lines.append(NO_CELL)
    if notes:
        lines += [""] + notes
    atomic_write_text(results / f"{stem}.md", "\n".join(lines) + "\n")


def write_group_tables(results, stem, title, head, plan, encoders, stats, groups, metrics, key, labels, missing=None) -> None:
    """Encoder × group (class, tissue) tables: one long CSV, and one Markdown table per metric."""
    rows = []
    for e in encoders:
        for g in groups:
            st = stats[e].get(g, {})
            rows.append([e, g, plan.encoder_weights[e], ";".join((missing or {}).get(e, [])), *(x for m in metrics for x in (st.get(m, {}).get("mean", float("nan")),
                                                                                          st.get(m, {}).get("sd", float("nan"))))])
    columns = ["encoder", key, "weights", "missing_splits", *(f"{m}_{s}" for m in metrics for s in ("mean", "sd"))]
    md_lines = []
    for m in metrics:
        md_lines += ["", f"## {labels[m]}", "", "| encoder | " + " | ".join(groups) + " |", "|" + "---|" * (len(groups) + 1)]
        for e in encoders:
            md_lines.append(f"| {encoder_label(e, plan, missing)} | " + " | ".join(fmt_mean_sd(stats[e].get(g, {}).get(m)) for g in groups) + " |")
    _write_csv(results / f"{stem}.csv", head, columns, rows)
    notes = incomplete_notes(missing or {}, len(plan.splits))
    text = _markdown_head(title, head) + (md_lines if groups else ["", NO_CELL]) + ([""] + notes if notes else [])
    atomic_write_text(results / f"{stem}.md", "\n".join(text) + "\n")
