"""Evaluation reports: per-image CSV, per-class and per-tissue tables, summary JSON with the protocol.

``write_reports(folder, table, protocol)`` writes, each file atomically:

* ``per_image.csv`` — one row per image with every per-image score and count; it holds everything
  needed to rebuild the :class:`ScoreTable` (:func:`read_per_image_csv`), so two saved runs can be
  compared later with :mod:`cellgap.metrics.statistics`.
* ``per_class.csv`` — per class: pooled PQ+/DQ+/SQ+ (CoNIC), image-mean PQ (PanNuke), HoVer-Net
  F1/precision/recall, count R², instance numbers.
* ``per_tissue.csv`` — every headline metric computed on each tissue's images.
* ``summary.json`` — headline metrics, per-class metrics, the protocol (split, averaging,
  empty-image policy, magnification, radius …), how each metric is averaged, and bootstrap
  confidence intervals over images.
"""

from __future__ import annotations

import csv
import io
import math
import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_text, write_json
from .aggregation import KEY_METRICS, ScoreTable, per_tissue, summarize
from .classification import F1_COUNTS, PQ_COUNTS
from .protocol import Protocol
from .scoring import COUNTS, SCALARS
from .statistics import bootstrap_ci

PER_IMAGE = "per_image.csv"
PER_CLASS = "per_class.csv"
PER_TISSUE = "per_tissue.csv"
SUMMARY = "summary.json"

AVERAGING = {
    "pq": "mean over images of per-image binary PQ (IoU > 0.5 unique matching)",
    "dq": "mean over images of per-image DQ",
    "sq": "mean over images of per-image SQ (0 for an image without true positive)",
    "bpq_image": "mean over images of per-image binary PQ (= pq)",
    "bpq_tissue": "per-image binary PQ, mean per tissue, then mean over tissues (PanNuke bPQ); _sd = sample sd over tissues",
    "mpq_image": "per-image mPQ (nan-mean over classes present in the GT), mean over images",
    "mpq_tissue": "per-image mPQ, mean per tissue, then mean over tissues (PanNuke mPQ); _sd = sample sd over tissues",
    "bpq": "bpq_tissue or bpq_image, as protocol.averaging says",
    "mpq": "mpq_tissue or mpq_image, as protocol.averaging says",
    "mpq+": "per class TP, FP, FN, ΣIoU pooled over images, PQ+ per class, mean over classes (CoNIC)",
    "aji": "mean over images of per-image AJI (largest-IoU pairing, reuse allowed)",
    "aji+": "mean over images of per-image AJI+ (one-to-one maximum-IoU matching)",
    "dice": "mean over images of per-image binary foreground Dice",
    "f1d": "centroid Hungarian matching then radius cut per image; TP, FP, FN pooled over images",
    "type_accuracy": "fraction of detection pairs whose classes agree, pooled over images",
    "f1/<class>": "HoVer-Net per-class F1 (weights 2,2,1,1) on detection pairs, counts pooled over images",
    "r2": "mean over classes of per-class count R² over images (counts in protocol.count_region)",
    "pq/<class>": "per-image class PQ (NaN when the class is absent from the GT), mean over images",
}


def _fmt(v) -> str:
    if isinstance(v, (str, np.str_)):
        return str(v)
    v = float(v)
    if math.isnan(v):
        return "nan"
    return repr(int(v)) if v.is_integer() and abs(v) < 2**53 else repr(v)


def _csv_text(header: list[str], rows: list[list]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([[_fmt(v) if not isinstance(v, bool) else str(v) for v in row] for row in rows])
    return buf.getvalue()


def _per_image_header(class_names) -> list[str]:
    header = ["id", "tissue", "empty_gt", *SCALARS, *COUNTS]
    for name in class_names:
        header += [f"pq/{name}", *(f"{k}/{name}" for k in PQ_COUNTS), *(f"f1_{k}/{name}" for k in F1_COUNTS),
                   f"count_gt/{name}", f"count_pred/{name}"]
    return header


def per_image_rows(table: ScoreTable) -> tuple[list[str], list[list]]:
    header = _per_image_header(table.class_names)
    rows = []
    for i in range(len(table)):
        row = [table.ids[i], table.tissues[i], bool(table.empty[i])]
        row += [table.scalars[k][i] for k in SCALARS + COUNTS]
        for c in range(len(table.class_names)):
            row += [table.class_pq[i, c], *table.pq_counts[i, c], *table.f1_counts[i, c], table.count_gt[i, c], table.count_pred[i, c]]
        rows.append(row)
    return header, rows


def read_per_image_csv(path: str | os.PathLike, class_names=None) -> ScoreTable:
    """Rebuild a :class:`ScoreTable` from a ``per_image.csv`` written by :func:`write_reports`."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        rows = list(reader)
    if class_names is None:
        class_names = [h.split("/", 1)[1] for h in fields if h.startswith("count_gt/")]
    expected = _per_image_header(class_names)
    missing = [h for h in expected if h not in fields]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing[:5]}{'…' if len(missing) > 5 else ''}; not a cellgap per-image report?")
    n, c = len(rows), len(class_names)

    def num(row, key, line):
        try:
            return float(row[key])
        except ValueError:
            raise ValueError(f"{path}: line {line}: column {key!r} holds {row[key]!r}, expected a number") from None

    def grid(keys):
        return np.array([[[num(r, k.format(name), i + 2) for k in keys] for name in class_names] for i, r in enumerate(rows)]).reshape(n, c, len(keys))

    table = ScoreTable(
        ids=np.array([r["id"] for r in rows], dtype=object),
        tissues=np.array([r["tissue"] for r in rows], dtype=object),
        empty=np.array([r["empty_gt"] == "True" for r in rows], dtype=bool),
        scalars={k: np.array([num(r, k, i + 2) for i, r in enumerate(rows)]) for k in SCALARS + COUNTS},
        class_pq=grid(["pq/{}"])[..., 0],
        pq_counts=grid([k + "/{}" for k in PQ_COUNTS]),
        f1_counts=grid(["f1_" + k + "/{}" for k in F1_COUNTS]),
        count_gt=grid(["count_gt/{}"])[..., 0],
        count_pred=grid(["count_pred/{}"])[..., 0],
        class_names=tuple(class_names),
    )
    table.check()
    return table


PER_CLASS_COLUMNS = ("pq+", "dq+", "sq+", "pq", "f1", "precision", "recall", "r2", "n_gt", "n_pred")
PER_TISSUE_COLUMNS = ("n_images", "n_empty", "pq", "dq", "sq", "mpq_image", "mpq+", "aji", "aji+", "dice", "f1d", "r2")


def write_reports(
    folder: str | os.PathLike,
    table: ScoreTable,
    protocol: Protocol,
    *,
    bootstrap: int = 1000,
    ci_metrics=KEY_METRICS,
    confidence: float = 0.95,
    seed: int = 0,
    extra: dict | None = None,
) -> dict[str, Path]:
    """Write the four report files into ``folder`` (created if needed) and return their paths.

    ``bootstrap`` = number of resamples over images for the confidence intervals (0 = none);
    intervals are stratified by tissue when ``protocol.averaging == "tissue"``.  ``extra`` is
    stored under ``"run"`` in the summary (e.g. encoder, checkpoint, epoch).
    """
    folder = Path(folder)
    if len(table) == 0:
        raise ValueError(f"{folder}: no scored images to report")
    summary = summarize(table, protocol)
    paths = {k: folder / f for k, f in (("per_image", PER_IMAGE), ("per_class", PER_CLASS), ("per_tissue", PER_TISSUE), ("summary", SUMMARY))}

    atomic_write_text(paths["per_image"], _csv_text(*per_image_rows(table)))
    class_rows = [[name, *(summary[f"{m}/{name}"] for m in PER_CLASS_COLUMNS)] for name in table.class_names]
    atomic_write_text(paths["per_class"], _csv_text(["class", *PER_CLASS_COLUMNS], class_rows))
    tissues = per_tissue(table, protocol)
    tissue_rows = [[t, *(m[k] for k in PER_TISSUE_COLUMNS)] for t, m in tissues.items()]
    atomic_write_text(paths["per_tissue"], _csv_text(["tissue", *PER_TISSUE_COLUMNS], tissue_rows))

    headline = {k: v for k, v in summary.items() if "/" not in k}
    per_class = {name: {m: summary[f"{m}/{name}"] for m in PER_CLASS_COLUMNS} for name in table.class_names}
    doc = {
        "protocol": protocol.to_json(),
        "class_names": list(table.class_names),
        "metrics": headline,
        "per_class": per_class,
        "averaging": AVERAGING,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if bootstrap:
        metrics = [m for m in ci_metrics if m in summary and math.isfinite(summary[m])]
        doc["confidence_intervals"] = {
            "method": "percentile bootstrap over images" + (", stratified by tissue" if protocol.averaging == "tissue" else ""),
            "n_resamples": bootstrap, "confidence": confidence, "seed": seed,
            "metrics": bootstrap_ci(table, protocol, metrics, n_resamples=bootstrap, confidence=confidence, seed=seed,
                                    stratify_by_tissue=protocol.averaging == "tissue"),
        }
    if extra:
        doc["run"] = extra
    write_json(paths["summary"], doc)
    return paths
