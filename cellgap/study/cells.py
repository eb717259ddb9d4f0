"""A grid cell on disk: its id and folder, its ``cell.json`` record, when it counts as done, its test results."""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..atomic import jsonable
from .plan import SplitSpec, StudyPlan

CELL_FILE = "cell.json"
# Headline metrics of the tables, in order (keys of the evaluation's summary.json).
HEADLINE_METRICS = ("pq", "bpq", "mpq", "mpq+", "aji", "dice", "f1d", "dq", "sq", "aji+", "r2")


def run_id(dataset: str, split: str, encoder: str) -> str:
    return f"{dataset}/{split}/{encoder}"


def run_dir(study_dir: Path, dataset: str, split: str, encoder: str) -> Path:
    return study_dir / "cells" / dataset / split / encoder


def read_json(path: Path) -> dict | None:
    """A JSON object, or None where the file is missing, unreadable or holds something else."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def run_fingerprint(plan: StudyPlan, split: SplitSpec, encoder: str) -> str:
    """What makes a cell's numbers: a changed setting reruns the cell instead of reusing stale results."""
    key = {"dataset": plan.dataset, "split": asdict(split), "encoder": encoder, "weights": plan.encoder_weights[encoder],
           "overrides": plan.overrides, "min_cell_sizes": plan.min_cell_sizes}
    text = json.dumps(jsonable(key), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def is_done(record: dict | None, cell: Path, fingerprint: str) -> bool:
    return bool(record and record.get("status") == "done" and record.get("fingerprint") == fingerprint
                and (cell / "eval_test" / "per_image.csv").is_file() and (cell / "eval_test" / "summary.json").is_file())


@dataclass
class RunResult:
    """The test results of one finished cell."""

    encoder: str
    split: str
    record: dict
    folder: Path
    summary: dict
    per_class: list[dict]
    per_tissue: list[dict]

    @property
    def metrics(self) -> dict:
        return self.summary["metrics"]


def _csv_rows(path: Path) -> list[dict]:
    """The rows of a CSV file; none where the evaluation wrote no such table."""
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def load_runs(study_dir: Path, plan: StudyPlan) -> tuple[dict[tuple[str, str], RunResult], list[dict]]:
    """(encoder, split) → results of every finished cell, and the status of every cell of the grid."""
    done, statuses = {}, []
    for split in plan.splits:
        for encoder in plan.encoders:
            cell = run_dir(study_dir, plan.dataset, split.name, encoder)
            record = read_json(cell / CELL_FILE)
            fingerprint = run_fingerprint(plan, split, encoder)
            status = "missing" if record is None else record.get("status", "?")
            if record is not None and record.get("fingerprint") != fingerprint:
                status = f"stale ({status}; other settings)"
            statuses.append({"encoder": encoder, "split": split.name, "status": status, "record": record or {}})
            if is_done(record, cell, fingerprint):
                summary = read_json(cell / "eval_test" / "summary.json")
                done[(encoder, split.name)] = RunResult(encoder, split.name, record, cell, summary,
                                                         _csv_rows(cell / "eval_test" / "per_class.csv"),
                                                         _csv_rows(cell / "eval_test" / "per_tissue.csv"))
    return done, statuses


def runs_of(done: dict[tuple[str, str], RunResult], encoder: str) -> list[RunResult]:
    """The finished cells of one encoder, in grid order."""
    return [c for k, c in done.items() if k[0] == encoder]
