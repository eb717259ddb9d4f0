"""The study runner: encoders × dataset × splits, each grid cell trained, tuned on val, tested, summarised.

One call (or ``cellgap study`` / ``scripts/run_study.py``) runs the whole grid and writes a results
folder.  Layout of ``study_dir``::

    study.json                                   the grid (encoders, dataset, splits, overrides, test settings)
    cells/<dataset>/<split>/<encoder>/cell.json  status, chosen minimum cell size, candidate scores, timings, protocol
                                     models/     decoder checkpoint (its meta carries the chosen minimum cell size)
                                     runs/       TensorBoard run of the training (+ the val selection scalars)
                                     select_val/ per-candidate reports on the validation split
                                     eval_test/  test reports of the bundle's evaluate config (per image/class/tissue)
    results/                                     tables, gap statistics, figures, protocol.json, README.md

A grid cell (encoder, split) runs in three stages, each through the encoder's MONAI bundle:

1. **train** — ``configs/train.json`` (TensorBoard run in ``runs/``);
2. **select** — the network runs once over the *validation* tiles and every candidate minimum cell size
   post-processes the same outputs (one evaluator pass, one metric per candidate); the best candidate by
   mPQ+ (multi-class) or PQ + detection F1 (single class) is kept (METHOD.md §4, "Choosing T_small");
3. **evaluate** — ``configs/train.json`` + ``configs/evaluate.json`` on the *test* split with the chosen size.

``cell.json`` is written atomically after every stage.  A cell that raises is recorded as ``"failed"`` with
its error and the grid goes on.  A rerun skips ``"done"`` cells whose settings are unchanged and retries the
others; a cell interrupted after training resumes at the selection stage, anything else restarts cleanly.

Splits are protocol names of the prepared dataset (PanNuke ``official1 official2 official3``, ``cisca`` …);
for the synthetic dataset they are data seeds (``seed0``, ``seed1`` …, or plain integers), each a freshly
generated dataset.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import hashlib
import io
import json
import math
import platform
import re
import shutil
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import __version__
from .atomic import atomic_write_text, jsonable, write_json
from .encoders import ENCODERS, EXTRA_ENCODERS, STUDY_ENCODERS, get_encoder_spec
from .network import COST_TILE, network_cost

# METHOD.md §4 "Choosing T_small": the reference grid of minimum cell sizes per magnification profile.
# (Belongs beside the other magnification constants; kept here until MagnificationProfile carries it.)

# Headline metrics of the tables, in order (keys of the evaluation's summary.json).
HEADLINE_METRICS = ("pq", "bpq", "mpq", "mpq+", "aji", "dice", "f1d", "dq", "sq", "aji+", "r2")
METRIC_LABELS = {"pq": "PQ", "bpq": "bPQ", "mpq": "mPQ", "mpq+": "mPQ+", "aji": "AJI", "dice": "Dice", "f1d": "F1 (det.)",
                 "dq": "DQ", "sq": "SQ", "aji+": "AJI+", "r2": "R²"}
BAR_METRICS = ("pq", "bpq", "mpq", "mpq+", "aji", "dice", "f1d")
CLASS_METRICS = ("f1", "pq", "pq+")  # HoVer-Net F1, image-mean PQ (PanNuke), pooled PQ+ (CoNIC)
TISSUE_METRICS = ("pq", "mpq_image")  # per tissue: bPQ and mPQ of that tissue's images
STATUSES = ("running", "done", "failed", "interrupted")
CELL_FILE = "cell.json"
STUDY_FILE = "study.json"
WEIGHTS_RANDOM = ("random", "none")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_CANDIDATE_KEYS = ("pred_instances", "pred_types", "pred_cells")


# --------------------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SplitSpec:
    """One split of the grid: a protocol of the prepared dataset, or a seed of the synthetic dataset."""

    name: str
    protocol: str | None = None
    data_seed: int | None = None


@dataclass
class StudyPlan:
    """Everything that defines a study; stored as ``study.json``."""

    dataset: str
    dataset_dir: str
    encoders: list[str]
    splits: list[SplitSpec]
    overrides: dict = field(default_factory=dict)
    encoder_weights: dict = field(default_factory=dict)
    min_cell_sizes: list[int] | None = None
    gap_metrics: list[str] | None = None
    bootstrap: int = 2000
    permutations: int = 5000
    confidence: float = 0.95
    seed: int = 0
    eval_bootstrap: int = 1000
    bundles_dir: str | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> StudyPlan:
        data = dict(data)
        data["splits"] = [SplitSpec(**s) for s in data["splits"]]
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class StudyReport:
    """What one :func:`run_study` call did."""

    study_dir: Path
    results_dir: Path
    ran: list[str]
    skipped: list[str]
    failed: list[str]
    cells: dict[str, dict]


def _encoder_list(encoders: str | Sequence[str] | None) -> list[str]:
    groups = {"study": list(STUDY_ENCODERS), "extra": list(EXTRA_ENCODERS), "all": list(STUDY_ENCODERS) + list(EXTRA_ENCODERS)}
    if encoders is None:
        return list(STUDY_ENCODERS)
    if isinstance(encoders, str):
        encoders = [encoders]
    out: list[str] = []
    for name in encoders:
        for key in groups.get(str(name), [str(name)]):
            if key not in ENCODERS:
                raise ValueError(f"encoders: {key!r} is not in the registry; expected keys of {sorted(ENCODERS)} "
                                 f"or a group {sorted(groups)}")
            if key not in out:
                out.append(key)
    if not out:
        raise ValueError("encoders: the grid needs at least one encoder")
    return out


def _weights_table(encoders: list[str], encoder_weights) -> dict[str, str]:
    """Encoder → "hub", "random" or a local path (str)."""
    if encoder_weights is None or isinstance(encoder_weights, (str, Path)):
        default = "hub" if encoder_weights is None else str(encoder_weights)
        table = {}
    elif isinstance(encoder_weights, Mapping):
        unknown = sorted(set(encoder_weights) - set(encoders) - {"*"})
        if unknown:
            raise ValueError(f"encoder_weights: {unknown} not in the grid's encoders {encoders}")
        default = str(encoder_weights.get("*", "hub"))
        table = {str(k): str(v) for k, v in encoder_weights.items() if k != "*"}
    else:
        raise TypeError(f"encoder_weights: expected 'hub', 'random', a path, or a dict encoder → one of those; "
                        f"got {type(encoder_weights).__name__}")
    out = {}
    for key in encoders:
        value = table.get(key, default).strip()
        if not value:
            raise ValueError(f"encoder_weights[{key!r}]: empty; expected 'hub', 'random' or a local folder/file")
        out[key] = "random" if value.lower() in WEIGHTS_RANDOM else value
    return out


def _weights_kind(value: str) -> str:
    return "random" if value == "random" else "hub" if value == "hub" else "local"


def _weights_overrides(value: str) -> dict:
    if value == "random":
        return {"encoder_weights": "none", "allow_random_encoder": True}
    return {"encoder_weights": value if value == "hub" else str(Path(value).expanduser()), "allow_random_encoder": False}


def _synthetic_seed(name) -> int | None:
    text = str(name).strip().lower()
    match = re.fullmatch(r"(?:seed)?(\d+)", text)
    return int(match.group(1)) if match else None


def resolve_splits(dataset: str, dataset_dir: str | Path | None, splits) -> list[SplitSpec]:
    """The grid's splits, checked against the dataset (ValueError naming the split and what exists).

    Synthetic: data seeds (``seed0`` or ``0``), default ``[seed0]``.  Prepared datasets: protocol names
    recorded in their ``dataset.json``; default the official protocols if there are any (PanNuke), else the
    dataset's default protocol.
    """
    from .data import registry

    entry = registry.get(dataset)
    if isinstance(splits, (str, int)):
        splits = [splits]
    if entry.name == "synthetic":
        names = list(splits) if splits else ["seed0"]
        out = []
        for name in names:
            seed = _synthetic_seed(name)
            if seed is None:
                raise ValueError(f"splits: {name!r} — the synthetic dataset's splits are data seeds such as 'seed0' or 0")
            out.append(SplitSpec(f"seed{seed}", None, seed))
    else:
        if dataset_dir is None:
            raise ValueError(f"dataset_dir: the {entry.name} study needs the prepared dataset folder "
                             f"(python scripts/prepare_data.py {entry.name} ... --out <folder>)")
        from .data.prepared import read_dataset_info

        info = read_dataset_info(dataset_dir)
        table = info.extra.get("protocols", {}) if isinstance(info.extra, dict) else {}
        default = info.extra.get("protocol") if isinstance(info.extra, dict) else None
        if not splits:
            official = sorted(p for p in table if p.startswith("official"))
            splits = official or [default or "default"]
        out = []
        for name in splits:
            name = str(name)
            protocol = None if name == "default" else name
            try:
                registry.protocol_of(info, protocol)
            except ValueError as e:
                raise ValueError(f"splits: {name!r} is not a protocol of the dataset at {dataset_dir}: {e}") from None
            out.append(SplitSpec(name, protocol, None))
    names = [s.name for s in out]
    for name in names:
        if not _SAFE_NAME.match(name):
            raise ValueError(f"splits: {name!r} cannot name a folder; use letters, digits, '_', '-' and '.'")
    if len(set(names)) != len(names):
        raise ValueError(f"splits: repeated split in {names}")
    return out


def default_min_cell_sizes(magnification: int) -> list[int]:
    """METHOD.md §4 candidate minimum cell sizes for a magnification (via its reference profile)."""
    from .magnification import profile_for

    return list(profile_for(magnification=magnification).min_cell_size_candidates)


def selection_metric(num_classes: int) -> str:
    """What picks the minimum cell size on val: mPQ+ for multi-class data, PQ + detection F1 for one class."""
    return "mpq+" if num_classes > 1 else "pq+f1d"


def selection_score(metrics: Mapping[str, float], num_classes: int) -> float:
    if num_classes > 1:
        return float(metrics["mpq+"])
    return float(metrics["pq"]) + float(metrics["f1d"])


def _cell_id(dataset: str, split: str, encoder: str) -> str:
    return f"{dataset}/{split}/{encoder}"


def _cell_dir(study_dir: Path, dataset: str, split: str, encoder: str) -> Path:
    return study_dir / "cells" / dataset / split / encoder


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def versions() -> dict:
    """Versions of the software that produced a number, and the device it ran on."""
    import monai
    import timm
    import torch

    out = {"cellgap": __version__, "python": platform.python_version(), "torch": torch.__version__, "monai": monai.__version__,
           "timm": timm.__version__, "numpy": np.__version__, "platform": platform.platform()}
    for name in ("ignite", "skimage", "scipy"):
        module = sys.modules.get(name)
        if module is None:
            try:
                module = __import__(name)
            except ImportError:
                continue
        out[name] = getattr(module, "__version__", "?")
    out["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return out


# --------------------------------------------------------------------------------------------------
# Running one grid cell through the bundle
# --------------------------------------------------------------------------------------------------
class CandidateOutput:
    """``output_transform`` of a :class:`~cellgap.metrics.handlers.CellMetrics` that scores one candidate
    minimum cell size: it exposes ``pred_instances_min<size>`` (etc.) as ``pred_instances``."""

    def __init__(self, min_cell_size: int):
        self.suffix = candidate_suffix(min_cell_size)

    def _one(self, item: Mapping) -> dict:
        out = dict(item)
        for key in _CANDIDATE_KEYS:
            if key + self.suffix in item:
                out[key] = item[key + self.suffix]
        return out

    def __call__(self, output):
        if isinstance(output, Mapping):
            return self._one(output)
        return [self._one(item) for item in output]


def candidate_suffix(min_cell_size: int) -> str:
    return f"_min{int(min_cell_size)}"


def _bundle_root(encoder: str, plan: StudyPlan, study_dir: Path) -> Path:
    from .bundle import bundle_name, write_bundle

    if plan.bundles_dir:
        root = Path(plan.bundles_dir) / bundle_name(encoder)
        if not (root / "configs" / "train.json").is_file():
            raise FileNotFoundError(f"bundles_dir: {root} has no configs/train.json (scripts/build_bundles.py writes bundles)")
        return root
    committed = Path(__file__).resolve().parents[1] / "bundles" / bundle_name(encoder)
    if (committed / "configs" / "train.json").is_file():
        return committed
    return write_bundle(encoder, study_dir / "bundles")  # installed package without a checkout


def _bundle_defaults(root: Path) -> dict:
    return json.loads((root / "configs" / "train.json").read_text(encoding="utf-8"))


@contextlib.contextmanager
def _quiet_warnings():
    """MONAI's config-security notice and the random-encoder warning, once per stage, add nothing here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*arbitrary code.*|.*any `\"_target_\"` value.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*RANDOMLY INITIALISED.*")
        yield


def _run_bundle(root: Path, configs: list[str], overrides: dict) -> None:
    from monai.bundle import run

    with _quiet_warnings():
        run(config_file=[str(root / "configs" / c) for c in configs], meta_file=str(root / "configs" / "metadata.json"),
            logging_file=str(root / "configs" / "logging.conf"), **overrides)


def _cell_overrides(plan: StudyPlan, split: SplitSpec, encoder: str, cell: Path, root: Path) -> dict:
    """Bundle overrides of one cell: where things go, which data and split, which weights, the user's settings."""
    out = dict(plan.overrides)
    out.update({"bundle_root": str(root), "ckpt_dir": str(cell / "models"), "output_dir": str(cell / "runs"),
                "dataset": plan.dataset})
    out.update(_weights_overrides(plan.encoder_weights[encoder]))
    if plan.dataset == "synthetic":
        synthetic = dict(plan.overrides.get("synthetic") or _bundle_defaults(root).get("synthetic") or {})
        synthetic["seed"] = split.data_seed
        out["synthetic"] = synthetic
        out["dataset_dir"] = str(Path(plan.dataset_dir) / split.name)
        out["protocol"] = None
    else:
        out["dataset_dir"] = str(plan.dataset_dir)
        out["protocol"] = split.protocol
    return out


def _fingerprint(plan: StudyPlan, split: SplitSpec, encoder: str) -> str:
    """What makes a cell's numbers: a changed setting reruns the cell instead of reusing stale results."""
    key = {"dataset": plan.dataset, "split": asdict(split), "encoder": encoder, "weights": plan.encoder_weights[encoder],
           "overrides": plan.overrides, "min_cell_sizes": plan.min_cell_sizes}
    text = json.dumps(jsonable(key), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _error_chain(error: BaseException) -> list[str]:
    """Every message of an exception chain, outermost first (MONAI wraps the cause in 'Failed to …')."""
    texts, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        texts.append(f"{type(error).__name__}: {error}".strip())
        error = error.__cause__ or error.__context__
    return texts


def _select_min_cell_size(root: Path, overrides: dict, cell: Path, candidates: list[int] | None) -> dict:
    """Run the trained network once over the validation split; score every candidate minimum cell size."""
    from monai.bundle import ConfigParser

    from .metrics.aggregation import summarize

    parser = evaluator = None
    try:
        parser = ConfigParser()
        parser.read_config([str(root / "configs" / "train.json"), str(root / "configs" / "evaluate.json")])
        parser.update({**overrides, "eval_split": "val"})
        magnification = parser.get_parsed_content("magnification")
        num_classes = int(parser.get_parsed_content("num_classes"))
        sizes = sorted({int(c) for c in candidates}) if candidates else default_min_cell_sizes(magnification)
        if any(c < 1 for c in sizes):
            raise ValueError(f"min_cell_sizes: expected positive pixel counts, got {sizes}")

        post = parser.get("validate#postprocessing#transforms")
        at = [i for i, t in enumerate(post) if isinstance(t, dict) and str(t.get("_target_", "")).endswith("CISCAPostProcessingd")]
        if len(at) != 1:
            raise ValueError(f"bundle {root.name}: expected one CISCAPostProcessingd in validate#postprocessing, found {len(at)}")
        base = post[at[0]]
        variants = [{**base, "min_cell_size": c, "instance_key": "pred_instances" + candidate_suffix(c),
                     "type_key": "pred_types" + candidate_suffix(c), "cells_key": "pred_cells" + candidate_suffix(c)}
                    for c in sizes]
        parser["validate#postprocessing#transforms"] = post[: at[0]] + variants + post[at[0] + 1:]

        metric_cfg = dict(parser.get("validate#key_metric#val_key_metric"))
        metrics = {f"min_cell_size_{c}": {**metric_cfg, "prefix": f"min_cell_size_{c}/",
                                           "output_transform": {"_target_": "cellgap.study.CandidateOutput", "min_cell_size": c}}
                   for c in sizes}
        names = list(metrics)
        parser["validate#key_metric"] = {names[0]: metrics[names[0]]}
        parser["validate#evaluator#additional_metrics"] = {n: metrics[n] for n in names[1:]}
        loaders = [h for h in parser.get("validate#handlers") if isinstance(h, dict) and h.get("_target_") == "CheckpointLoader"]
        if not loaders:
            raise ValueError(f"bundle {root.name}: configs/evaluate.json has no CheckpointLoader in validate#handlers")
        parser["validate#handlers"] = [loaders[0], {"_target_": "cellgap.metrics.handlers.MetricsReportSaver",
                                                    "output_dir": str(cell / "select_val"), "bootstrap": 0}]
        evaluator = parser.get_parsed_content("validate#evaluator")
        evaluator.run()
        details = getattr(evaluator.state, "cell_metrics", {}) or {}
        scores, ids, protocol = [], None, None
        for c, name in zip(sizes, names):
            info = details.get(name)
            if info is None or info["table"] is None:
                raise RuntimeError(f"min-cell-size selection: no validation image was scored for candidate {c}")
            summary = summarize(info["table"], info["protocol"])
            score = selection_score(summary, num_classes)
            scores.append({"min_cell_size": c, "score": score, **{m: summary.get(m) for m in HEADLINE_METRICS}})
            ids = [str(i) for i in info["table"].ids]
            protocol = info["protocol"].to_json()
    finally:
        del parser, evaluator  # free the network before the next stage
        gc.collect()
    finite = [s for s in scores if math.isfinite(s["score"])]
    if not finite:
        raise RuntimeError(f"min-cell-size selection: every candidate scored NaN on the validation split ({sizes}); "
                           "does the validation split hold annotated cells?")
    best = max(finite, key=lambda s: s["score"])  # ties: the smaller size (candidates are ascending, max keeps the first)
    return {"chosen": best["min_cell_size"], "candidates": sizes, "metric": selection_metric(num_classes),
            "split": "val", "protocol_split": protocol.get("split") if protocol else None, "n_images": len(ids or []),
            "image_ids": ids, "scores": scores, "magnification": magnification, "num_classes": num_classes}


def _set_checkpoint_min_cell_size(path: Path, size: int, metric: str) -> None:
    """Store the chosen size in the checkpoint meta, so inference with this decoder uses it."""
    import torch

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    ckpt["meta"]["min_cell_size"] = int(size)
    ckpt["meta"]["min_cell_size_selection"] = f"best {metric} on the validation split"
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(ckpt, tmp)
    tmp.replace(path)


def _log_selection(cell: Path, selection: dict, test_metrics: dict) -> None:
    """Candidate scores and test metrics as TensorBoard scalars beside the training run."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional for the numbers themselves
        return
    writer = SummaryWriter(log_dir=str(cell / "runs" / "study"))
    try:
        for s in selection["scores"]:
            if s["score"] is not None and math.isfinite(s["score"]):
                writer.add_scalar(f"select_val/{selection['metric']}", s["score"], s["min_cell_size"])
        for k in HEADLINE_METRICS:
            v = test_metrics.get(k)
            if isinstance(v, (int, float)) and math.isfinite(v):
                writer.add_scalar(f"test/{k}", v, selection["chosen"])
    finally:
        writer.close()


def _run_cell(plan: StudyPlan, study_dir: Path, split: SplitSpec, encoder: str, previous: dict | None, resume: bool,
              say: Callable[[str], None]) -> dict:
    cell = _cell_dir(study_dir, plan.dataset, split.name, encoder)
    fingerprint = _fingerprint(plan, split, encoder)
    checkpoint = cell / "models" / "model.pt"
    prev_stages = (previous or {}).get("stages", {})
    reuse_train = bool(resume and previous and previous.get("fingerprint") == fingerprint
                       and prev_stages.get("train", {}).get("done") and checkpoint.is_file())
    history = list((previous or {}).get("history", []))
    if previous:
        history.append({k: previous.get(k) for k in ("status", "attempt", "started", "finished", "fingerprint")}
                       | {"error": (previous.get("error") or {}).get("message")})
    if not reuse_train:
        for sub in ("models", "runs", "select_val", "eval_test"):
            shutil.rmtree(cell / sub, ignore_errors=True)
    weights = plan.encoder_weights[encoder]
    record = {
        "status": "running", "cell": _cell_id(plan.dataset, split.name, encoder), "encoder": encoder,
        "domain": get_encoder_spec(encoder).domain, "dataset": plan.dataset, "split": split.name,
        "protocol": split.protocol, "data_seed": split.data_seed, "training_seed": plan.overrides.get("seed", 0),
        "encoder_weights": {"kind": _weights_kind(weights), "value": weights},
        "random_weights": weights == "random", "reduced_encoder": bool(plan.overrides.get("reduced_encoder", False)),
        "fingerprint": fingerprint, "overrides": plan.overrides, "attempt": int((previous or {}).get("attempt", 0)) + 1,
        "started": _now(), "finished": None, "stages": {"train": prev_stages.get("train", {})} if reuse_train else {},
        "timings": dict((previous or {}).get("timings", {})) if reuse_train else {},
        "paths": {"cell": str(cell.relative_to(study_dir)), "checkpoint": "models/model.pt", "tensorboard": "runs",
                  "selection": "select_val", "evaluation": "eval_test"},
        "versions": versions(), "history": history,
    }
    path = cell / CELL_FILE
    write_json(path, record)
    stage = "setup"
    start = time.time()
    try:
        root = _bundle_root(encoder, plan, study_dir)
        record["bundle"] = root.name
        overrides = _cell_overrides(plan, split, encoder, cell, root)
        if reuse_train:
            say(f"  train: reusing the finished training ({checkpoint.relative_to(study_dir)})")
        else:
            stage = "train"
            t = time.time()
            _run_bundle(root, ["train.json"], overrides)
            if not checkpoint.is_file():
                raise RuntimeError(f"training finished without writing {checkpoint} (did a validation epoch run?)")
            record["timings"]["train_s"] = round(time.time() - t, 2)
            record["stages"]["train"] = {"done": True, "finished": _now()}
            write_json(path, record)

        stage = "select"
        t = time.time()
        with _quiet_warnings():
            selection = _select_min_cell_size(root, overrides, cell, plan.min_cell_sizes)
        _set_checkpoint_min_cell_size(checkpoint, selection["chosen"], selection["metric"])
        record["min_cell_size"] = selection
        record["timings"]["select_s"] = round(time.time() - t, 2)
        record["stages"]["select"] = {"done": True, "finished": _now()}
        write_json(path, record)
        say(f"  min cell size {selection['chosen']} px (best {selection['metric']} on {selection['n_images']} val images "
            f"over {selection['candidates']})")

        stage = "evaluate"
        t = time.time()
        _run_bundle(root, ["train.json", "evaluate.json"],
                    {**overrides, "eval_split": "test", "min_cell_size": selection["chosen"],
                     "bootstrap": plan.eval_bootstrap, "eval_dir": str(cell / "eval_test")})
        summary = _read_json(cell / "eval_test" / "summary.json")
        if summary is None:
            raise RuntimeError(f"evaluation wrote no {cell / 'eval_test' / 'summary.json'}")
        record["timings"]["evaluate_s"] = round(time.time() - t, 2)
        record["stages"]["evaluate"] = {"done": True, "finished": _now()}
        record["test"] = {"split": "test", "metrics": {k: summary["metrics"].get(k) for k in HEADLINE_METRICS},
                          "n_images": summary["metrics"].get("n_images"), "protocol": summary.get("protocol"),
                          "class_names": summary.get("class_names")}
        _log_selection(cell, selection, summary["metrics"])
        record["status"] = "done"
    except Exception as e:  # one cell's crash must not stop the grid
        record["status"] = "failed"
        chain = _error_chain(e)
        record["error"] = {"stage": stage, "type": type(e).__name__, "message": chain[-1], "chain": chain,
                           "traceback": traceback.format_exc(limit=20)}
        say(f"  FAILED in {stage}: {chain[-1].splitlines()[0][:300]}")
    except KeyboardInterrupt:
        record["status"] = "interrupted"
        record["error"] = {"stage": stage, "type": "KeyboardInterrupt", "message": "interrupted"}
        raise
    finally:
        record["finished"] = _now()
        record["timings"]["total_s"] = round(time.time() - start, 2)  # this attempt (a reused training not included)
        write_json(path, record)
        _release_memory()
    return record


def _release_memory() -> None:
    """Drop what a finished or crashed stage left behind (a CUDA OOM in one cell must not starve the next)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _is_done(record: dict | None, cell: Path, fingerprint: str) -> bool:
    return bool(record and record.get("status") == "done" and record.get("fingerprint") == fingerprint
                and (cell / "eval_test" / "per_image.csv").is_file() and (cell / "eval_test" / "summary.json").is_file())


# --------------------------------------------------------------------------------------------------
# The public entry point
# --------------------------------------------------------------------------------------------------
def run_study(
    study_dir: str | Path,
    encoders: str | Sequence[str] | None = None,
    dataset: str = "synthetic",
    dataset_dir: str | Path | None = None,
    splits: Sequence[str | int] | str | int | None = None,
    overrides: Mapping | None = None,
    encoder_weights: str | Path | Mapping[str, str] | None = "hub",
    min_cell_sizes: Sequence[int] | None = None,
    resume: bool = True,
    *,
    gap_metrics: Sequence[str] | None = None,
    bootstrap: int = 2000,
    permutations: int = 5000,
    confidence: float = 0.95,
    seed: int = 0,
    eval_bootstrap: int = 1000,
    bundles_dir: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> StudyReport:
    """Run the grid encoders × splits on one dataset and write ``<study_dir>/results/``.

    Args:
        study_dir: folder of the study (created); holds ``study.json``, ``cells/`` and ``results/``.
        encoders: registry keys, or the groups ``"study"`` (default), ``"extra"``, ``"all"``.
        dataset: ``synthetic``, ``pannuke``, ``conic``, ``cytodark0`` or ``folder``.
        dataset_dir: the prepared dataset (required except for synthetic, which is generated under
            ``<dataset_dir or study_dir/data>/<split>``).
        splits: protocol names (e.g. ``["official1", "official2", "official3"]``), or data seeds for synthetic.
        overrides: bundle config overrides for every stage of every cell (``epochs``, ``batch_size``,
            ``decoder``, ``reduced_encoder``, ``synthetic`` …).
        encoder_weights: ``"hub"``, ``"random"`` (tests/demos only; flagged in every table), a local
            folder/file, or a dict encoder → one of these (key ``"*"`` sets the default).
        min_cell_sizes: candidates for the minimum cell size (None: METHOD §4 grid for the magnification).
        resume: skip cells already done with the same settings; False reruns every cell.
        gap_metrics: metrics of the gap table (default mPQ+ and bPQ for multi-class data, PQ and F1 for one class).
        bootstrap, permutations, confidence, seed: paired statistics of the gap table.
        eval_bootstrap: bootstrap resamples of each cell's own test confidence intervals.
        bundles_dir: folder of bundles (default the committed ``bundles/``).
        log: progress printer (default ``print``).
    """
    say = log or (lambda text: print(text, flush=True))
    study_dir = Path(study_dir).expanduser().resolve()
    enc = _encoder_list(encoders)
    if overrides is not None and not isinstance(overrides, Mapping):
        raise TypeError(f"overrides: expected a dict of bundle config overrides, got {type(overrides).__name__}")
    overrides = dict(overrides or {})
    for reserved in ("bundle_root", "ckpt_dir", "output_dir", "dataset", "dataset_dir", "protocol", "encoder",
                     "encoder_weights", "allow_random_encoder", "eval_split", "eval_dir", "min_cell_size"):
        if reserved in overrides:
            raise ValueError(f"overrides: {reserved!r} is set by the study runner per cell; use the run_study arguments")
    for name, value, low in (("bootstrap", bootstrap, 1), ("permutations", permutations, 1), ("eval_bootstrap", eval_bootstrap, 0)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name}: expected an integer ≥ {low}, got {value!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence: expected a value in (0, 1), got {confidence}")
    if min_cell_sizes is not None:
        if isinstance(min_cell_sizes, (int, str)) or not all(isinstance(c, (int, np.integer)) and c >= 1 for c in min_cell_sizes) \
                or not len(min_cell_sizes):
            raise ValueError(f"min_cell_sizes: expected a list of positive pixel counts, got {min_cell_sizes!r}")
    if dataset == "synthetic":
        dataset_dir = Path(dataset_dir).expanduser().resolve() if dataset_dir is not None else study_dir / "data"
    elif dataset_dir is not None:
        dataset_dir = Path(dataset_dir).expanduser().resolve()
    split_specs = resolve_splits(dataset, dataset_dir, splits)
    weights = _weights_table(enc, encoder_weights)
    for key, value in weights.items():
        if _weights_kind(value) == "local" and not Path(value).expanduser().exists():
            say(f"warning: encoder_weights[{key!r}] = {value} does not exist; its cells will fail")
    plan = StudyPlan(dataset=str(dataset).lower(), dataset_dir=str(dataset_dir), encoders=enc, splits=split_specs,
                     overrides=overrides, encoder_weights=weights,
                     min_cell_sizes=sorted({int(c) for c in min_cell_sizes}) if min_cell_sizes is not None else None,
                     gap_metrics=list(gap_metrics) if gap_metrics is not None else None, bootstrap=bootstrap,
                     permutations=permutations, confidence=confidence, seed=seed, eval_bootstrap=eval_bootstrap,
                     bundles_dir=str(Path(bundles_dir).resolve()) if bundles_dir is not None else None)
    study_dir.mkdir(parents=True, exist_ok=True)
    write_json(study_dir / STUDY_FILE, {**plan.to_json(), "written": _now()})
    if any(w == "random" for w in weights.values()):
        say("!" * 100 + "\nRANDOM ENCODER WEIGHTS for " + ", ".join(k for k, w in weights.items() if w == "random")
            + ": their numbers test the pipeline, not the encoders.\n" + "!" * 100)

    ran, skipped, failed, records = [], [], [], {}
    total = len(enc) * len(split_specs)
    k = 0
    for split in split_specs:
        for encoder in enc:
            k += 1
            cell = _cell_dir(study_dir, plan.dataset, split.name, encoder)
            cid = _cell_id(plan.dataset, split.name, encoder)
            previous = _read_json(cell / CELL_FILE)
            fingerprint = _fingerprint(plan, split, encoder)
            if resume and _is_done(previous, cell, fingerprint):
                say(f"[{k}/{total}] {cid}: done earlier, skipped")
                skipped.append(cid)
                records[cid] = previous
                continue
            why = "new" if previous is None else ("settings changed" if previous.get("fingerprint") != fingerprint
                                                  else f"retrying ({previous.get('status')})")
            say(f"[{k}/{total}] {cid}: {why}")
            record = _run_cell(plan, study_dir, split, encoder, previous, resume, say)
            records[cid] = record
            ran.append(cid)
            if record["status"] != "done":
                failed.append(cid)
    results = write_results(study_dir, plan, log=say)
    say(f"study: {len(ran)} cell(s) run, {len(skipped)} skipped, {len(failed)} failed → {results}")
    return StudyReport(study_dir, results, ran, skipped, failed, records)


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------
def _read_csv_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _num(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _fmt_mean_sd(stats: dict | None, digits: int = 3) -> str:
    if not stats or not math.isfinite(stats.get("mean", float("nan"))):
        return "—"
    sd = stats.get("sd", float("nan"))
    return f"{stats['mean']:.{digits}f} ± {sd:.{digits}f}" if math.isfinite(sd) else f"{stats['mean']:.{digits}f}"


def _csv_value(v) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, (float, np.floating)):
        return "nan" if not math.isfinite(float(v)) else repr(float(v))
    return "" if v is None else str(v)


def _write_table(results: Path, stem: str, title: str, header_lines: list[str], columns: list[str], rows: list[list],
                 md_columns: list[str] | None = None, md_rows: list[list] | None = None, notes: list[str] | None = None) -> None:
    """``<stem>.csv`` (``#`` header lines, then the table) and ``<stem>.md`` (title, header lines, table)."""
    buf = io.StringIO()
    for line in header_lines:
        buf.write(f"# {line}\n")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([[_csv_value(v) for v in row] for row in rows])
    atomic_write_text(results / f"{stem}.csv", buf.getvalue())
    md_columns = md_columns or columns
    md_rows = md_rows if md_rows is not None else [[_fmt(v) if isinstance(v, float) else _csv_value(v) for v in r] for r in rows]
    lines = [f"# {title}", ""] + [f"{line}  " for line in header_lines] + [""]
    if md_rows:
        lines += ["| " + " | ".join(md_columns) + " |", "|" + "---|" * len(md_columns)]
        lines += ["| " + " | ".join(str(v) for v in r) + " |" for r in md_rows]
    else:
        lines.append("(no finished grid cell)")
    if notes:
        lines += [""] + notes
    atomic_write_text(results / f"{stem}.md", "\n".join(lines) + "\n")


@dataclass
class _CellResult:
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


def _load_done(study_dir: Path, plan: StudyPlan) -> tuple[dict[tuple[str, str], _CellResult], list[dict]]:
    done, statuses = {}, []
    for split in plan.splits:
        for encoder in plan.encoders:
            cell = _cell_dir(study_dir, plan.dataset, split.name, encoder)
            record = _read_json(cell / CELL_FILE)
            fingerprint = _fingerprint(plan, split, encoder)
            status = "missing" if record is None else record.get("status", "?")
            if record is not None and record.get("fingerprint") != fingerprint:
                status = f"stale ({status}; other settings)"
            statuses.append({"encoder": encoder, "split": split.name, "status": status, "record": record or {}})
            if _is_done(record, cell, fingerprint):
                summary = _read_json(cell / "eval_test" / "summary.json")
                per_class = _read_csv_rows(cell / "eval_test" / "per_class.csv") if (cell / "eval_test" / "per_class.csv").is_file() else []
                per_tissue = _read_csv_rows(cell / "eval_test" / "per_tissue.csv") if (cell / "eval_test" / "per_tissue.csv").is_file() else []
                done[(encoder, split.name)] = _CellResult(encoder, split.name, record, cell, summary, per_class, per_tissue)
    return done, statuses


def _encoder_label(encoder: str, plan: StudyPlan) -> str:
    tags = []
    if plan.encoder_weights.get(encoder) == "random":
        tags.append("RANDOM WEIGHTS")
    if plan.overrides.get("reduced_encoder") and get_encoder_spec(encoder).reduced_kwargs:
        tags.append("reduced")
    return f"{encoder} [{', '.join(tags)}]" if tags else encoder


def _protocol_line(plan: StudyPlan, done: dict, info: dict) -> str:
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
            f"{first.get('detection_radius', '?')} px; minimum cell size chosen per cell on val "
            f"({', '.join(map(str, sizes)) or '—'} px); mean ± sd over splits (see protocol.json)")


def _random_line(plan: StudyPlan) -> list[str]:
    random = [e for e in plan.encoders if plan.encoder_weights.get(e) == "random"]
    if not random:
        return []
    return [f"WARNING: RANDOM ENCODER WEIGHTS for {', '.join(random)} — these numbers test the pipeline, "
            "they say nothing about the encoders."]


def _dataset_info(plan: StudyPlan, done: dict) -> dict:
    from .data.prepared import read_dataset_info

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
    from .metrics.statistics import across_splits

    keys = list(values)
    n = max((len(v) for v in values.values()), default=0)
    if n == 0:
        return {}
    summaries = [{k: values[k][i] for k in keys if i < len(values[k])} for i in range(n)]
    return across_splits(summaries)


def write_results(study_dir: str | Path, plan: StudyPlan | None = None, log: Callable[[str], None] | None = None) -> Path:
    """(Re)write ``<study_dir>/results/`` from the finished cells of the grid in ``study.json``."""
    say = log or (lambda text: print(text, flush=True))
    study_dir = Path(study_dir).resolve()
    if plan is None:
        data = _read_json(study_dir / STUDY_FILE)
        if data is None:
            raise FileNotFoundError(f"{study_dir / STUDY_FILE}: no study here (run_study writes it)")
        plan = StudyPlan.from_json(data)
    results = study_dir / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "figures").mkdir(exist_ok=True)
    done, statuses = _load_done(study_dir, plan)
    info = _dataset_info(plan, done)
    head = [_protocol_line(plan, done, info), *_random_line(plan)]
    written = {}

    # Grid status: every cell, finished or not.
    rows = []
    for s in statuses:
        r = s["record"]
        sel = r.get("min_cell_size", {})
        err = (r.get("error") or {}).get("message", "")
        rows.append([s["encoder"], s["split"], s["status"], sel.get("chosen"), sel.get("metric"), r.get("attempt"),
                     *(r.get("timings", {}).get(k) for k in ("train_s", "select_s", "evaluate_s", "total_s")),
                     (r.get("error") or {}).get("stage", ""), err.splitlines()[0][:300] if err else ""])
    _write_table(results, "cells", "Grid cells", head, ["encoder", "split", "status", "min_cell_size", "selection_metric",
                 "attempts", "train_s", "select_s", "evaluate_s", "total_s", "failed_stage", "error"], rows)
    written["cells"] = "every grid cell: status, chosen minimum cell size, timings, error of failed cells"

    # One row per finished cell.
    rows = [[c.encoder, c.split, plan.encoder_weights[c.encoder], c.record.get("min_cell_size", {}).get("chosen"),
             c.metrics.get("n_images"), *(c.metrics.get(m) for m in HEADLINE_METRICS)] for c in done.values()]
    _write_table(results, "per_cell", "Test metrics per grid cell", head,
                 ["encoder", "split", "weights", "min_cell_size", "n_images", *HEADLINE_METRICS], rows)
    written["per_cell"] = "test metrics of every finished cell (encoder × split)"

    encoders = [e for e in plan.encoders if any(k[0] == e for k in done)]
    summary_stats: dict[str, dict] = {}
    for e in encoders:
        cells = [c for k, c in done.items() if k[0] == e]
        summary_stats[e] = _mean_sd_table({m: [_num(c.metrics.get(m)) for c in cells] for m in HEADLINE_METRICS})
    rows, md_rows = [], []
    for e in encoders:
        st = summary_stats[e]
        n = len([k for k in done if k[0] == e])
        rows.append([e, get_encoder_spec(e).domain, plan.encoder_weights[e], n,
                     *(x for m in HEADLINE_METRICS for x in (st[m]["mean"], st[m]["sd"]))])
        md_rows.append([_encoder_label(e, plan), get_encoder_spec(e).domain, n, *(_fmt_mean_sd(st[m]) for m in HEADLINE_METRICS)])
    _write_table(results, "summary", "Test metrics per encoder (mean ± sd over splits)", head,
                 ["encoder", "domain", "weights", "n_splits", *(f"{m}_{s}" for m in HEADLINE_METRICS for s in ("mean", "sd"))],
                 rows, ["encoder", "domain", "splits", *(METRIC_LABELS[m] for m in HEADLINE_METRICS)], md_rows)
    written["summary"] = "encoder × metric, mean ± sample sd over splits of each split's test value"

    class_names = list(info.get("class_names") or [])
    class_stats = _per_group_stats(done, encoders, "per_class", "class", CLASS_METRICS)
    _write_group_tables(results, "per_class", "Per-class test metrics (mean ± sd over splits)", head, plan, encoders,
                        class_stats, class_names, CLASS_METRICS, "class",
                        {"f1": "HoVer-Net F1", "pq": "PQ (image mean)", "pq+": "PQ+ (pooled)"})
    written["per_class"] = "encoder × class: HoVer-Net F1, image-mean PQ, pooled PQ+ (mean ± sd over splits)"
    tissues = sorted({r["tissue"] for c in done.values() for r in c.per_tissue})
    tissue_stats = _per_group_stats(done, encoders, "per_tissue", "tissue", TISSUE_METRICS)
    tissue_label = info.get("tissue_label") or "tissue"
    _write_group_tables(results, "per_tissue", f"Per-{tissue_label} test metrics (mean ± sd over splits)", head, plan,
                        encoders, tissue_stats, tissues, TISSUE_METRICS, tissue_label.replace(" ", "_"),
                        {"pq": "bPQ", "mpq_image": "mPQ"})
    written["per_tissue"] = f"encoder × {tissue_label}: bPQ and mPQ of that {tissue_label}'s test images"

    gap_metrics = [_canonical(m) for m in (plan.gap_metrics or (("mpq+", "bpq") if len(class_names) > 1 else ("pq", "f1d")))]
    gap_rows, gap_notes = _gap_table(plan, done, encoders, summary_stats, gap_metrics)
    _write_gap(results, head, gap_rows, gap_notes, plan)
    written["gap"] = "each pathology encoder vs the best general-purpose one: difference, paired bootstrap CI, permutation p"

    cost = _costs(results, plan, encoders, len(class_names) or 1)
    _figures(results, plan, encoders, summary_stats, class_stats, class_names, tissue_stats, tissues, cost, head, tissue_label)
    _protocol_json(results, plan, done, statuses, info, gap_metrics, cost)
    _readme(results, plan, head, written, statuses, done)
    say(f"results: {results}")
    return results


def _canonical(metric: str) -> str:
    from .metrics.aggregation import canonical_metric

    return canonical_metric(metric)


def _per_group_stats(done: dict, encoders: list[str], attr: str, key: str, metrics) -> dict:
    """encoder → group → metric → {mean, sd, n_splits}, from each cell's per_class/per_tissue CSV."""
    out = {}
    for e in encoders:
        cells = [c for k, c in done.items() if k[0] == e]
        groups = sorted({r[key] for c in cells for r in getattr(c, attr)})
        out[e] = {}
        for g in groups:
            values = {m: [] for m in metrics}
            for c in cells:
                row = next((r for r in getattr(c, attr) if r[key] == g), None)
                for m in metrics:
                    values[m].append(_num(row.get(m)) if row else float("nan"))
            out[e][g] = _mean_sd_table(values)
    return out


def _write_group_tables(results, stem, title, head, plan, encoders, stats, groups, metrics, key, labels) -> None:
    rows = []
    for e in encoders:
        for g in groups:
            st = stats[e].get(g, {})
            rows.append([e, g, plan.encoder_weights[e], *(x for m in metrics for x in (st.get(m, {}).get("mean", float("nan")),
                                                                                          st.get(m, {}).get("sd", float("nan"))))])
    columns = ["encoder", key, "weights", *(f"{m}_{s}" for m in metrics for s in ("mean", "sd"))]
    md_lines = []
    for m in metrics:
        md_lines += ["", f"## {labels[m]}", "", "| encoder | " + " | ".join(groups) + " |", "|" + "---|" * (len(groups) + 1)]
        for e in encoders:
            md_lines.append(f"| {_encoder_label(e, plan)} | " + " | ".join(_fmt_mean_sd(stats[e].get(g, {}).get(m)) for g in groups) + " |")
    buf = io.StringIO()
    for line in head:
        buf.write(f"# {line}\n")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([[_csv_value(v) for v in r] for r in rows])
    atomic_write_text(results / f"{stem}.csv", buf.getvalue())
    text = [f"# {title}", ""] + [f"{line}  " for line in head] + (md_lines if groups else ["", "(no finished grid cell)"])
    atomic_write_text(results / f"{stem}.md", "\n".join(text) + "\n")


# --------------------------------------------------------------------------------------------------
# The gap table: paired statistics on the same test images
# --------------------------------------------------------------------------------------------------
def _cell_table_and_protocol(cell: _CellResult, split: str):
    from .metrics.protocol import Protocol
    from .metrics.report import read_per_image_csv

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
    from .metrics.aggregation import aggregate_sums, canonical_metric, image_features, weighted_sums
    from .metrics.statistics import bootstrap_weights

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


def _gap_table(plan: StudyPlan, done: dict, encoders: list[str], summary_stats: dict, metrics: list[str]):
    from .metrics.statistics import paired_bootstrap, paired_permutation_test

    rows, notes = [], []
    general = [e for e in encoders if get_encoder_spec(e).domain == "general"]
    pathology = [e for e in encoders if get_encoder_spec(e).domain == "pathology"]
    if not general or not pathology:
        notes.append("No gap table: the finished cells need at least one general-purpose and one pathology encoder "
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
                ta, protocol = _cell_table_and_protocol(done[(e, s)], s)
                tb, _ = _cell_table_and_protocol(done[(best, s)], s)
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
            if pairs:
                pooled = pooled_paired_statistics(pairs, metric, plan.bootstrap, plan.permutations, plan.confidence, plan.seed)
                rows.append([metric, e, best, "all (mean over splits)", pooled["a"], pooled["b"], pooled["difference"],
                             pooled["low"], pooled["high"], pooled["p_bootstrap"], pooled["p_permutation"],
                             pooled["n_images"], pooled["n_splits"]])
    return rows, notes


GAP_COLUMNS = ["metric", "encoder", "reference", "split", "encoder_value", "reference_value", "difference", "ci_low",
               "ci_high", "p_bootstrap", "p_permutation", "n_images", "n_splits"]


def _write_gap(results: Path, head: list[str], rows: list[list], notes: list[str], plan: StudyPlan) -> None:
    conf = int(round(plan.confidence * 100))
    md = [[r[0], _encoder_label(r[1], plan), _encoder_label(r[2], plan), r[3], _fmt(r[4]), _fmt(r[5]), f"{r[6]:+.3f}",
           f"[{_fmt(r[7])}, {_fmt(r[8])}]", _fmt(r[9], 4), _fmt(r[10], 4), r[11]] for r in rows]
    explain = [
        f"difference = encoder − reference (best general-purpose encoder by the mean over splits of the metric); "
        f"{conf}% CI: paired percentile bootstrap over test images ({plan.bootstrap} resamples, the same images for both, "
        f"stratified by tissue where the metric averages over tissues); p_bootstrap: two-sided, from the centred bootstrap "
        f"distribution; p_permutation: two-sided paired permutation test ({plan.permutations} random swaps of the two "
        f"encoders' results per image). Row 'all (mean over splits)': the mean over splits of the per-split differences "
        f"(= difference of the summary means), resampled/permuted within every split.",
    ]
    _write_table(results, "gap", "Gap: pathology encoders vs the best general-purpose encoder", head,
                 GAP_COLUMNS, rows,
                 ["metric", "encoder", "reference", "split", "encoder", "reference", "difference", f"{conf}% CI",
                  "p (bootstrap)", "p (permutation)", "images"], md, notes=explain + notes)


# --------------------------------------------------------------------------------------------------
# Cost: parameters and GFLOPs per 256² tile
# --------------------------------------------------------------------------------------------------
def _costs(results: Path, plan: StudyPlan, encoders: list[str], num_classes: int) -> dict:
    """Per encoder cost, cached in ``results/cost.json`` (keyed by everything that changes it)."""
    path = results / "cost.json"
    cache = _read_json(path) or {}
    out = {}
    for e in encoders:
        try:
            root = _bundle_root(e, plan, results.parent)
            defaults = _bundle_defaults(root)
        except (FileNotFoundError, json.JSONDecodeError):
            defaults = {}
        settings = {"encoder": e, "num_classes": num_classes, "tile": COST_TILE,
                    "decoder": plan.overrides.get("decoder", defaults.get("decoder")),
                    "reduced": bool(plan.overrides.get("reduced_encoder", False)),
                    "num_contour_classes": plan.overrides.get("num_contour_classes", defaults.get("num_contour_classes", 3)),
                    "num_distance_maps": plan.overrides.get("num_distance_maps", defaults.get("num_distance_maps", 4))}
        key = json.dumps(settings, sort_keys=True)
        if key not in cache:
            try:
                cache[key] = {**settings, **network_cost(e, num_classes, settings["decoder"], settings["reduced"],
                                                         settings["num_contour_classes"], settings["num_distance_maps"])}
            except Exception as err:  # the cost figure must not stop the results
                cache[key] = {**settings, "error": _error_chain(err)[-1].splitlines()[0]}
        out[e] = cache[key]
    write_json(path, cache)
    return out


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------
def _figures(results, plan, encoders, summary_stats, class_stats, class_names, tissue_stats, tissues, cost, head,
             tissue_label) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    figures = results / "figures"
    warn = " — RANDOM ENCODER WEIGHTS" if _random_line(plan) else ""
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
        ax.bar(x, means, width, yerr=sds, capsize=2, label=_encoder_label(e, plan), color=shades(i % 10), edgecolor="0.2",
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
        ax.set_yticks(range(len(encoders)), [_encoder_label(e, plan) for e in encoders], fontsize=8)
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
            ax.annotate(_encoder_label(e, plan), (xs[e], pq["mean"]), fontsize=7, xytext=(-4 if right else 4, 4),
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


# --------------------------------------------------------------------------------------------------
# protocol.json and README.md
# --------------------------------------------------------------------------------------------------
def _protocol_json(results: Path, plan: StudyPlan, done: dict, statuses: list[dict], info: dict, gap_metrics, cost) -> None:
    from .data import registry
    from .metrics.report import AVERAGING

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
    cells = {}
    for st in statuses:
        r = st["record"]
        sel = r.get("min_cell_size", {})
        cells[f"{st['split']}/{st['encoder']}"] = {
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
            "chosen_on": "the validation split of each grid cell, never test",
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
        "cells": cells,
        "versions": versions(),
        "created": _now(),
    }
    write_json(results / "protocol.json", doc)


def _readme(results: Path, plan: StudyPlan, head: list[str], written: dict, statuses: list[dict], done: dict) -> None:
    failed = [s for s in statuses if s["status"] != "done"]
    lines = ["# Study results", "", *[f"{line}  " for line in head], "",
             f"Grid: {len(plan.encoders)} encoder(s) × {len(plan.splits)} split(s) of `{plan.dataset}`; "
             f"{len(done)} cell(s) finished, {len(failed)} not.", ""]
    if failed:
        lines += ["**Cells without results** (see `cells.md`; rerun the study to retry them):", ""]
        lines += [f"- {s['split']}/{s['encoder']}: {s['status']}"
                  + (f" — {(s['record'].get('error') or {}).get('message', '').splitlines()[0][:200]}"
                     if (s["record"].get("error") or {}).get("message") else "") for s in failed]
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
        "magnification, detection radius, minimum cell size per cell, seeds, versions |",
        "",
        "CSV files start with `#` lines naming the protocol; read them with `pandas.read_csv(path, comment='#')`.",
        "Per-cell details (checkpoint, TensorBoard run, candidate scores on val, per-image test scores) live in "
        "`../cells/<dataset>/<split>/<encoder>/`.",
    ]
    atomic_write_text(results / "README.md", "\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------------
# Command line (scripts/run_study.py and `cellgap study`)
# --------------------------------------------------------------------------------------------------
def _json_arg(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a plain string value


def add_study_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("study_dir", help="folder of the study (cells/ and results/ go there)")
    parser.add_argument("--encoders", nargs="+", default=["study"],
                        help="registry keys or groups: study (default), extra, all; e.g. convnext_b_22k uni")
    parser.add_argument("--dataset", default="synthetic", help="synthetic | pannuke | conic | cytodark0 | folder")
    parser.add_argument("--dataset-dir", help="prepared dataset folder (scripts/prepare_data.py); synthetic: where to generate")
    parser.add_argument("--splits", nargs="+", help="protocol names (pannuke: official1 official2 official3) or synthetic seeds")
    parser.add_argument("--weights", action="append", default=[], metavar="ENCODER=SPEC",
                        help="encoder weights: hub, random (tests only) or a local folder/file; ENCODER may be '*' "
                             "(default for all); repeat per encoder")
    parser.add_argument("--random-weights", action="store_true", help="every encoder with random weights (pipeline tests)")
    parser.add_argument("--reduced-encoders", action="store_true", help="small same-family encoders (pipeline tests)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--epoch-length", type=int, help="iterations per epoch (default: the whole training list)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--num-workers", type=int)
    parser.add_argument("--decoder", help='decoder widths as JSON, e.g. \'{"widths": [16,16,32,48,64,96], "head_features": 24, '
                                          '"head_width": 16, "norm": "batch"}\'')
    parser.add_argument("--synthetic", help='synthetic generator options as JSON, e.g. \'{"n_train": 64, "n_val": 16, '
                                            '"n_test": 32, "magnification": 40}\'')
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any bundle override (VALUE parsed as JSON when it is JSON), e.g. --set tile_size=256")
    parser.add_argument("--min-cell-sizes", type=int, nargs="+", help="candidates (default: METHOD §4 grid for the magnification)")
    parser.add_argument("--gap-metrics", nargs="+", help="metrics of the gap table (default mpq+ bpq, or pq f1d for one class)")
    parser.add_argument("--bootstrap", type=int, default=2000, help="paired bootstrap resamples of the gap table")
    parser.add_argument("--permutations", type=int, default=5000, help="permutations of the gap table's paired test")
    parser.add_argument("--eval-bootstrap", type=int, default=1000, help="bootstrap resamples of each cell's test CIs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the gap statistics")
    parser.add_argument("--no-resume", action="store_true", help="rerun every cell, even finished ones")
    parser.add_argument("--results-only", action="store_true", help="only rewrite results/ from the finished cells")
    return parser


def run_study_from_args(args: argparse.Namespace) -> StudyReport | Path:
    if args.results_only:
        return write_results(args.study_dir)
    overrides: dict = {}
    for name in ("epochs", "epoch_length", "batch_size", "learning_rate", "num_workers"):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    if args.reduced_encoders:
        overrides["reduced_encoder"] = True
    for name in ("decoder", "synthetic"):
        text = getattr(args, name)
        if text:
            value = _json_arg(text)
            if not isinstance(value, dict):
                raise ValueError(f"--{name}: expected a JSON object, got {text!r}")
            overrides[name] = value
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        overrides[key.strip()] = _json_arg(value)
    weights: dict[str, str] = {"*": "random"} if args.random_weights else {}
    for item in args.weights:
        key, sep, value = item.partition("=")
        if not sep:
            key, value = "*", item
        weights[key.strip()] = value.strip()
    return run_study(args.study_dir, args.encoders, args.dataset, args.dataset_dir, args.splits, overrides,
                     weights or "hub", args.min_cell_sizes, resume=not args.no_resume, gap_metrics=args.gap_metrics,
                     bootstrap=args.bootstrap, permutations=args.permutations, seed=args.seed,
                     eval_bootstrap=args.eval_bootstrap)
