"""A run of the study grid on disk (one encoder × split): its id and folder, its ``cell.json`` record, when it counts as
done, its test results."""

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
    """What makes a run's numbers: a run finished under other settings is never reused or mixed."""
    key = {"dataset": plan.dataset, "split": asdict(split), "encoder": encoder, "weights": plan.encoder_weights[encoder],
           "overrides": plan.overrides, "min_cell_sizes": plan.min_cell_sizes}
    text = json.dumps(jsonable(key), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def is_done(record: dict | None, cell: Path, fingerprint: str) -> bool:
    return bool(record and record.get("status") == "done" and record.get("fingerprint") == fingerprint
                and (cell / "eval_test" / "per_image.csv").is_file() and (cell / "eval_test" / "summary.json").is_file())


@dataclass
class RunResult:
    """The test results of one finished run."""

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


def _load_result(run_folder: Path, record: dict, encoder: str, split: str) -> RunResult:
    """A finished run's test results; ValueError naming the file that cannot be read."""
    from ..metrics.report import read_per_image_csv

    path = run_folder / "eval_test" / "summary.json"
    summary = read_json(path)
    if summary is None or not isinstance(summary.get("metrics"), dict) or not isinstance(summary.get("protocol"), dict):
        raise ValueError(f"{path.relative_to(run_folder)} unreadable or without metrics/protocol")
    tables = {}
    for name in ("per_image", "per_class", "per_tissue"):
        path = run_folder / "eval_test" / f"{name}.csv"
        try:
            if name == "per_image":
                read_per_image_csv(path, summary.get("class_names"))
            else:
                tables[name] = _csv_rows(path)
        except (OSError, ValueError, UnicodeDecodeError, csv.Error) as e:
            raise ValueError(f"{path.relative_to(run_folder)}: {e}") from None
    return RunResult(encoder, split, record, run_folder, summary, tables["per_class"], tables["per_tissue"])


def load_runs(study_dir: Path, plan: StudyPlan) -> tuple[dict[tuple[str, str], RunResult], list[dict]]:
    """(encoder, split) → results of every finished run, and the state of every run of the grid: done, running
    (another job holds it), failed, todo (never run, or under other options), changed (finished under other
    options), corrupt (finished, but a file of its results cannot be read: reported, the others merged)."""
    from .grid import grid_runs, run_state

    done, statuses = {}, []
    for run in grid_runs(study_dir, plan):
        state = run_state(run, plan)
        status, detail = state.state, state.detail
        if status == "done":
            try:
                done[(run.encoder, run.split.name)] = _load_result(run.folder, state.record, run.encoder, run.split.name)
            except ValueError as e:
                status, detail = "corrupt", str(e)
        statuses.append({"encoder": run.encoder, "split": run.split.name, "status": status, "detail": detail,
                         "record": state.record or {}})
    return done, statuses


def missing_splits(plan: StudyPlan, done: dict, encoders: list[str]) -> dict[str, list[str]]:
    """Encoder → the grid's splits it has no finished run of (empty when complete)."""
    return {e: [s.name for s in plan.splits if (e, s.name) not in done] for e in encoders}


def runs_of(done: dict[tuple[str, str], RunResult], encoder: str) -> list[RunResult]:
    """The finished runs of one encoder, in grid order."""
    return [c for k, c in done.items() if k[0] == encoder]
