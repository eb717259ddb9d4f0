"""The runs of a study grid (one run = one encoder × split, trained, tuned on val and tested): their ids, their
state on disk (done / running / failed / todo / changed), choosing some with ``--only``, and the check that
refuses to mix runs finished under other options with this command's."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..atomic import jsonable
from ..locking import lock_is_live, read_lock
from .cells import CELL_FILE, is_done, read_json, run_dir, run_fingerprint, run_id
from .plan import SplitSpec, StudyPlan

STATES = ("done", "running", "failed", "todo", "changed")


class OptionsChangedError(ValueError):
    """Runs of this grid were finished under other options than this command's."""


class UnknownRunError(ValueError):
    """An ``--only`` id that is not a run of this grid."""


@dataclass(frozen=True)
class GridRun:
    """One run of the grid: an encoder trained, tuned and tested on one split."""

    id: str
    split: SplitSpec
    encoder: str
    folder: Path


def grid_runs(study_dir: Path, plan: StudyPlan) -> list[GridRun]:
    """Every run of the grid, in the order a sequential study runs them (split by split)."""
    return [GridRun(run_id(plan.dataset, s.name, e), s, e, run_dir(study_dir, plan.dataset, s.name, e))
            for s in plan.splits for e in plan.encoders]


def select_runs(runs: list[GridRun], only: list[str] | None) -> list[GridRun]:
    """The runs ``--only`` names (all without it), in grid order; an unknown id is refused with the valid ones."""
    if not only:
        return list(runs)
    by_id = {r.id: r for r in runs}
    unknown = [i for i in only if i not in by_id]
    if unknown:
        shown = ", ".join(list(by_id)[:12]) + (" …" if len(by_id) > 12 else "")
        raise UnknownRunError(f"--only: {', '.join(map(repr, unknown))} not a run of this grid; its runs are {shown} "
                              f"(the same options with --list prints them all)")
    wanted = set(only)
    return [r for r in runs if r.id in wanted]


def settings_of(plan: StudyPlan, split: SplitSpec, encoder: str) -> dict:
    """The options that make a run's numbers (what its fingerprint hashes), as recorded in its ``cell.json``."""
    return jsonable({"dataset": plan.dataset, "split": {"name": split.name, "protocol": split.protocol,
                                                        "data_seed": split.data_seed},
                     "encoder": encoder, "weights": plan.encoder_weights[encoder], "overrides": plan.overrides,
                     "min_cell_sizes": plan.min_cell_sizes})


def _recorded_settings(record: dict) -> dict:
    """A record's settings; records written before ``settings`` was stored give what they have."""
    if isinstance(record.get("settings"), dict):
        return record["settings"]
    return {"weights": (record.get("encoder_weights") or {}).get("value"), "overrides": record.get("overrides") or {}}


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict) and value:
        out = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def settings_difference(recorded: dict, current: dict) -> list[str]:
    """``option: finished value → this command's value`` for every option that differs."""
    old, new = _flatten(recorded), _flatten(current)
    out = []
    for k in dict.fromkeys([*old, *new]):
        a, b = old.get(k, "(unset)"), new.get(k, "(unset)")
        if json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            out.append(f"{k}: {json.dumps(a, default=str)} → {json.dumps(b, default=str)}")
    return out


@dataclass
class RunState:
    run: GridRun
    state: str  # one of STATES
    detail: str = ""
    record: dict | None = None


def run_state(run: GridRun, plan: StudyPlan) -> RunState:
    """Where one run stands: a live lock means running (another job); then its ``cell.json``."""
    owner = read_lock(run.folder)
    if lock_is_live(owner):
        return RunState(run, "running", f"{owner.get('what', '?')}: pid {owner.get('pid')} on {owner.get('host')} "
                                        f"since {owner.get('started')}", read_json(run.folder / CELL_FILE))
    path = run.folder / CELL_FILE
    record = read_json(path)
    if record is None:
        if path.exists():
            return RunState(run, "failed", f"{path.name} unreadable (rerunning the run rewrites it)")
        return RunState(run, "todo")
    fingerprint = run_fingerprint(plan, run.split, run.encoder)
    status = record.get("status", "?")
    if record.get("fingerprint") != fingerprint:
        if status == "done":
            diff = settings_difference(_recorded_settings(record), settings_of(plan, run.split, run.encoder))
            return RunState(run, "changed", "; ".join(diff) or "settings differ", record)
        return RunState(run, "todo", f"earlier attempt under other options ({status})", record)
    if is_done(record, run.folder, fingerprint):
        return RunState(run, "done", "", record)
    if status == "done":
        return RunState(run, "failed", "marked done but its test results are missing", record)
    error = (record.get("error") or {})
    if status == "running":
        return RunState(run, "failed", "interrupted (no live job holds it)", record)
    return RunState(run, "failed", f"{status} in {error.get('stage', '?')}: "
                                   f"{(error.get('message') or '').splitlines()[0][:200] if error.get('message') else ''}",
                    record)


def grid_states(study_dir: Path, plan: StudyPlan) -> list[RunState]:
    return [run_state(r, plan) for r in grid_runs(study_dir, plan)]


def check_options(states: list[RunState]) -> None:
    """Refuse a command whose options differ from those the grid's finished runs were made with."""
    changed = [s for s in states if s.state == "changed"]
    if not changed:
        return
    lines = [f"  {s.run.id}: {s.detail}" for s in changed[:8]] + (["  …"] if len(changed) > 8 else [])
    raise OptionsChangedError(
        f"{len(changed)} finished run(s) of this grid were made with other options; their results would be mixed with "
        f"this command's:\n" + "\n".join(lines) + "\nRerun with the options they were made with, use another study folder, "
        "or add --rerun-changed to rerun those runs under the new options (their results are replaced).")
