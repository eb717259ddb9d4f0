"""The run folder that ``cellgap train`` writes and ``cellgap evaluate`` / ``cellgap segment --model`` read::

    RUN_DIR/run.json        what the model was trained with: encoder, dataset, options (bundle overrides)
    RUN_DIR/models/model.pt the selected (or, without validation, the last) decoder checkpoint
    RUN_DIR/models/last.pt  the resume state (written by the checkpoint code, docs/guarantees.md)
    RUN_DIR/runs/           TensorBoard logs, evaluation reports (eval_<split>/), held-out validation tiles
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .. import __version__
from ..atomic import write_json

RUN_FILE = "run.json"
MODEL = Path("models") / "model.pt"
RESUME_STATE = Path("models") / "last.pt"


def run_overrides(run_dir: Path) -> dict:
    """The folder-dependent bundle overrides of a run folder."""
    return {"ckpt_dir": str(run_dir / "models"), "output_dir": str(run_dir / "runs")}


def write_run(run_dir: str | os.PathLike, encoder: str, dataset: str, dataset_dir: str | os.PathLike,
              options: dict) -> Path:
    """Record what a run is trained with (atomically) in ``RUN_DIR/run.json``."""
    run_dir = Path(run_dir)
    return write_json(run_dir / RUN_FILE, {"encoder": encoder, "dataset": dataset,
                                           "dataset_dir": str(Path(dataset_dir).resolve()), "options": options,
                                           "cellgap_version": __version__})


def read_run(run_dir: str | os.PathLike) -> dict:
    """The record of a run folder; FileNotFoundError / ValueError naming ``run.json`` and the fix."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; {run_dir} is not a run folder written by `cellgap train` "
                                "(train one with `cellgap train DATA_DIR --encoder NAME --out RUN_DIR`)")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    missing = [k for k in ("encoder", "dataset", "dataset_dir", "options") if k not in record]
    if not isinstance(record, dict) or missing:
        raise ValueError(f"{path}: missing field(s) {missing}; expected encoder, dataset, dataset_dir, options")
    return record


__all__ = ["MODEL", "RESUME_STATE", "RUN_FILE", "read_run", "run_overrides", "write_run"]
