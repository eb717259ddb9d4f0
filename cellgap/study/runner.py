"""Running the grid: every run (one encoder × split) trained, its minimum cell size chosen on val, tested; resumable.

A run goes through three stages in its encoder's bundle — train, select (:mod:`.selection`), evaluate — and
``cell.json`` is written atomically after each.  A run that raises is recorded as ``"failed"`` and the grid
goes on; a rerun skips runs done with unchanged settings, resumes a run interrupted after training at the
selection stage, a run interrupted during training from its last epoch's ``models/last.pt``, and restarts
anything else cleanly.  Each run holds its folder's lock while it runs; under
``torchrun`` each rank runs its share of the runs.
"""

from __future__ import annotations

import gc
import math
import os
import shutil
import socket
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np

from ..atomic import write_json
from ..checkpoint import LAST
from ..encoders import get_encoder_spec
from ..locking import OutputLockedError, output_lock
from .bundles import bundle_root, error_chain, quiet_warnings, run_bundle, run_overrides
from .grid import check_options, grid_states, select_runs, settings_of
from .min_cell_size import select_min_cell_size, set_checkpoint_min_cell_size
from .plan import STUDY_FILE, SplitSpec, StudyPlan, encoder_list, resolve_splits, weights_kind, weights_table
from .provenance import now, versions
from .results import write_results
from .runs import HEADLINE_METRICS, RUN_RECORD, is_done, read_json, run_dir, run_fingerprint, run_id


@dataclass
class StudyReport:
    """What one :func:`run_study` call did."""

    study_dir: Path
    results_dir: Path
    ran: list[str]
    skipped: list[str]
    failed: list[str]
    runs: dict[str, dict]
    busy: list[str] = field(default_factory=list)  # runs skipped because another job held them


def _log_selection(run_folder: Path, selection: dict, test_metrics: dict) -> None:
    """Candidate scores and test metrics as TensorBoard scalars beside the training run."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional for the numbers themselves
        return
    writer = SummaryWriter(log_dir=str(run_folder / "runs" / "study"))
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


def _run_one(plan: StudyPlan, study_dir: Path, split: SplitSpec, encoder: str, previous: dict | None, resume: bool,
             say: Callable[[str], None], device: str | None = None, launch: dict | None = None) -> dict:
    run_folder = run_dir(study_dir, plan.dataset, split.name, encoder)
    fingerprint = run_fingerprint(plan, split, encoder)
    checkpoint = run_folder / "models" / "model.pt"
    prev_stages = (previous or {}).get("stages", {})
    reuse_train = bool(resume and previous and previous.get("fingerprint") == fingerprint
                       and prev_stages.get("train", {}).get("done") and checkpoint.is_file())
    history = list((previous or {}).get("history", []))
    if previous:
        history.append({k: previous.get(k) for k in ("status", "attempt", "started", "finished", "fingerprint")}
                       | {"error": (previous.get("error") or {}).get("message")})
    # a training stopped part-way (killed, or failed after an epoch) under the same settings continues from its
    # resume state: the bundle's TrainingCheckpoints loads models/last.pt (resume is on by default)
    resume_train = bool(not reuse_train and resume and previous and previous.get("fingerprint") == fingerprint
                        and not prev_stages.get("train", {}).get("done") and (run_folder / "models" / LAST).is_file())
    if not reuse_train:
        for sub in ("select_val", "eval_test") if resume_train else ("models", "runs", "select_val", "eval_test"):
            shutil.rmtree(run_folder / sub, ignore_errors=True)
    weights = plan.encoder_weights[encoder]
    record = {
        "status": "running", "run": run_id(plan.dataset, split.name, encoder), "encoder": encoder,
        "domain": get_encoder_spec(encoder).domain, "dataset": plan.dataset, "split": split.name,
        "protocol": split.protocol, "data_seed": split.data_seed, "training_seed": plan.overrides.get("seed", 0),
        "encoder_weights": {"kind": weights_kind(weights), "value": weights},
        "random_weights": weights == "random", "reduced_encoder": bool(plan.overrides.get("reduced_encoder", False)),
        "fingerprint": fingerprint, "settings": settings_of(plan, split, encoder), "overrides": plan.overrides, "attempt": int((previous or {}).get("attempt", 0)) + 1,
        "started": now(), "finished": None, "stages": {"train": prev_stages.get("train", {})} if reuse_train else {},
        "timings": dict((previous or {}).get("timings", {})) if reuse_train else {},
        "paths": {"cell": str(run_folder.relative_to(study_dir)), "checkpoint": "models/model.pt", "tensorboard": "runs",
                  "selection": "select_val", "evaluation": "eval_test"},
        "versions": versions(), "history": history,
        "worker": {"host": socket.gethostname(), "pid": os.getpid(), "device": device or "bundle default", **(launch or {})},
    }
    path = run_folder / RUN_RECORD
    write_json(path, record)
    stage = "setup"
    start = time.time()
    try:
        root = bundle_root(encoder, plan, study_dir)
        record["bundle"] = root.name
        overrides = run_overrides(plan, split, encoder, run_folder, root)
        if device is not None:  # this rank's own device (torchrun), not part of the run's settings
            overrides["device"] = f"$torch.device('{device}')"
        if plan.dataset == "synthetic":
            stage = "data"
            _prepare_synthetic(Path(plan.dataset_dir), split, overrides["synthetic"])
        if reuse_train:
            say(f"  train: reusing the finished training ({checkpoint.relative_to(study_dir)})")
        else:
            stage = "train"
            t = time.time()
            if resume_train:
                say(f"  train: resuming the interrupted training from {(run_folder / 'models' / LAST).relative_to(study_dir)}")
                record["stages"]["train"] = {"resumed_from": f"models/{LAST}"}
            run_bundle(root, ["train.json"], {**overrides, "resume": resume_train})
            if not checkpoint.is_file():
                raise RuntimeError(f"training finished without writing {checkpoint} (did a validation epoch run?)")
            record["timings"]["train_s"] = round(time.time() - t, 2)
            record["stages"]["train"] = {**record["stages"].get("train", {}), "done": True, "finished": now()}
            write_json(path, record)

        stage = "select"
        t = time.time()
        with quiet_warnings():
            selection = select_min_cell_size(root, overrides, run_folder, plan.min_cell_sizes)
        set_checkpoint_min_cell_size(checkpoint, selection["chosen"], selection["metric"])
        record["min_cell_size"] = selection
        record["timings"]["select_s"] = round(time.time() - t, 2)
        record["stages"]["select"] = {"done": True, "finished": now()}
        write_json(path, record)
        say(f"  min cell size {selection['chosen']} px (best {selection['metric']} on {selection['n_images']} val images "
            f"over {selection['candidates']})")

        stage = "evaluate"
        t = time.time()
        run_bundle(root, ["train.json", "evaluate.json"],
                    {**overrides, "eval_split": "test", "min_cell_size": selection["chosen"],
                     "bootstrap": plan.eval_bootstrap, "eval_dir": str(run_folder / "eval_test")})
        summary = read_json(run_folder / "eval_test" / "summary.json")
        if summary is None:
            raise RuntimeError(f"evaluation wrote no {run_folder / 'eval_test' / 'summary.json'}")
        record["timings"]["evaluate_s"] = round(time.time() - t, 2)
        record["stages"]["evaluate"] = {"done": True, "finished": now()}
        record["test"] = {"split": "test", "metrics": {k: summary["metrics"].get(k) for k in HEADLINE_METRICS},
                          "n_images": summary["metrics"].get("n_images"), "protocol": summary.get("protocol"),
                          "class_names": summary.get("class_names")}
        _log_selection(run_folder, selection, summary["metrics"])
        record["status"] = "done"
    except Exception as e:  # one run's crash must not stop the grid
        record["status"] = "failed"
        chain = error_chain(e)
        record["error"] = {"stage": stage, "type": type(e).__name__, "message": chain[-1], "chain": chain,
                           "traceback": traceback.format_exc(limit=20)}
        say(f"  FAILED in {stage}: {chain[-1].splitlines()[0][:300]}")
    except KeyboardInterrupt:
        record["status"] = "interrupted"
        record["error"] = {"stage": stage, "type": "KeyboardInterrupt", "message": "interrupted"}
        raise
    finally:
        record["finished"] = now()
        record["timings"]["total_s"] = round(time.time() - start, 2)  # this attempt (a reused training not included)
        write_json(path, record)
        _release_memory()
    return record


def _prepare_synthetic(root: Path, split: SplitSpec, params: dict, patience_s: float = 3600) -> None:
    """Generate a split's synthetic data once, even when several jobs start its runs at the same moment (the
    first takes the data folder's lock and writes it; the others wait, then find it made)."""
    from ..data import registry

    deadline = time.time() + patience_s
    while True:
        try:
            with output_lock(root, "study synthetic data"):
                registry.prepare_dataset("synthetic", None, root / split.name, progress=False, **params)
            return
        except OutputLockedError:
            if time.time() > deadline:
                raise
            time.sleep(0.5)


def _release_memory() -> None:
    """Drop what a finished or crashed stage left behind (a CUDA OOM in one run must not starve the next)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def launch_rank() -> tuple[int, int, int]:
    """(rank, world size, local rank) of a ``torchrun`` launch; (0, 1, 0) for a plain process."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = int(os.environ.get("RANK", "0") or 0)
    return rank, world, int(os.environ.get("LOCAL_RANK", str(rank)) or rank)


def rank_device(local_rank: int) -> str:
    """Each rank's own device: ``cuda:LOCAL_RANK`` where there are GPUs, else the CPU."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return f"cuda:{local_rank % torch.cuda.device_count()}"
    return "cpu"


def wait_for_every_rank() -> None:
    """Block until every rank of the launch got here (a gloo barrier, joined only after the training is over so
    that no bundle sees an initialised process group and takes itself for a multi-GPU training)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=timedelta(days=30))  # ranks may finish days apart
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()


def make_plan(
    study_dir: str | Path,
    encoders: str | Sequence[str] | None = None,
    dataset: str = "synthetic",
    dataset_dir: str | Path | None = None,
    splits: Sequence[str | int] | str | int | None = None,
    overrides: Mapping | None = None,
    encoder_weights: str | Path | Mapping[str, str] | None = "hub",
    min_cell_sizes: Sequence[int] | None = None,
    *,
    gap_metrics: Sequence[str] | None = None,
    bootstrap: int = 2000,
    permutations: int = 5000,
    confidence: float = 0.95,
    seed: int = 0,
    eval_bootstrap: int = 1000,
    bundles_dir: str | Path | None = None,
) -> StudyPlan:
    """The grid the arguments describe, checked (ValueError naming the argument); nothing is written."""
    study_dir = Path(study_dir).expanduser().resolve()
    enc = encoder_list(encoders)
    if overrides is not None and not isinstance(overrides, Mapping):
        raise TypeError(f"overrides: expected a dict of bundle config overrides, got {type(overrides).__name__}")
    overrides = dict(overrides or {})
    for reserved in ("bundle_root", "ckpt_dir", "output_dir", "dataset", "dataset_dir", "protocol", "encoder",
                     "encoder_weights", "allow_random_encoder", "eval_split", "eval_dir", "min_cell_size"):
        if reserved in overrides:
            raise ValueError(f"overrides: {reserved!r} is set by the study runner per run; use the run_study arguments")
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
    weights = weights_table(enc, encoder_weights)
    return StudyPlan(dataset=str(dataset).lower(), dataset_dir=str(dataset_dir), encoders=enc, splits=split_specs,
                     overrides=overrides, encoder_weights=weights,
                     min_cell_sizes=sorted({int(c) for c in min_cell_sizes}) if min_cell_sizes is not None else None,
                     gap_metrics=list(gap_metrics) if gap_metrics is not None else None, bootstrap=bootstrap,
                     permutations=permutations, confidence=confidence, seed=seed, eval_bootstrap=eval_bootstrap,
                     bundles_dir=str(Path(bundles_dir).resolve()) if bundles_dir is not None else None)


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
    only: Sequence[str] | None = None,
    rerun_changed: bool = False,
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
        overrides: bundle config overrides for every stage of every run (``epochs``, ``batch_size``,
            ``decoder``, ``reduced_encoder``, ``synthetic`` …).
        encoder_weights: ``"hub"``, ``"random"`` (tests/demos only; flagged in every table), a local
            folder/file, or a dict encoder → one of these (key ``"*"`` sets the default).
        min_cell_sizes: candidates for the minimum cell size (None: METHOD §4 grid for the magnification).
        resume: skip runs already done with the same settings; False reruns every run.
        gap_metrics: metrics of the gap table (default mPQ+ and bPQ for multi-class data, PQ and F1 for one class).
        bootstrap, permutations, confidence, seed: paired statistics of the gap table.
        eval_bootstrap: bootstrap resamples of each run's own test confidence intervals.
        bundles_dir: folder of bundles (default the committed ``bundles/``).
        only: run ids (``dataset/split/encoder``) to run, the others left alone; the results are then not
            written (``--results-only`` merges them once every job is over).
        rerun_changed: rerun the runs finished under other options instead of refusing the command.
        log: progress printer (default ``print``).

    Under ``torchrun`` (``WORLD_SIZE`` > 1) each rank runs its share of the runs (every WORLD_SIZE-th, from its
    RANK) on its own device, and rank 0 writes the results once every rank is done.  Each run holds its
    folder's lock while it runs: a run another job holds is skipped (and refused when named with ``only``).
    """
    say = log or (lambda text: print(text, flush=True))
    plan = make_plan(study_dir, encoders, dataset, dataset_dir, splits, overrides, encoder_weights, min_cell_sizes,
                     gap_metrics=gap_metrics, bootstrap=bootstrap, permutations=permutations, confidence=confidence,
                     seed=seed, eval_bootstrap=eval_bootstrap, bundles_dir=bundles_dir)
    study_dir = Path(study_dir).expanduser().resolve()
    states = grid_states(study_dir, plan)
    if resume and not rerun_changed:
        check_options(states)
    selected = select_runs([s.run for s in states], list(only) if only else None)
    if only:
        held = [s for s in states if s.run in selected and s.state == "running"]
        if held:
            raise OutputLockedError("; ".join(f"run {s.run.id} is being run by another job ({s.detail})" for s in held)
                                    + ": wait for it to finish, or leave it out of --only")
    for key, value in plan.encoder_weights.items():
        if weights_kind(value) == "local" and not Path(value).expanduser().exists():
            say(f"warning: encoder_weights[{key!r}] = {value} does not exist; its runs will fail")
    rank, world, local_rank = launch_rank()
    device = rank_device(local_rank) if world > 1 else None
    share = selected[rank::world]
    study_dir.mkdir(parents=True, exist_ok=True)
    write_json(study_dir / STUDY_FILE, {**plan.to_json(), "written": now()})
    if rank == 0 and any(w == "random" for w in plan.encoder_weights.values()):
        say("!" * 100 + "\nRANDOM ENCODER WEIGHTS for " + ", ".join(k for k, w in plan.encoder_weights.items() if w == "random")
            + ": their numbers test the pipeline, not the encoders.\n" + "!" * 100)
    if world > 1:
        say(f"rank {rank}/{world} on {device}: {len(share)} of the {len(selected)} run(s)")

    ran, skipped, failed, busy, records = [], [], [], [], {}
    for k, run in enumerate(share, 1):
        try:
            with output_lock(run.folder, f"study run {run.id}"):
                previous = read_json(run.folder / RUN_RECORD)
                fingerprint = run_fingerprint(plan, run.split, run.encoder)
                if resume and is_done(previous, run.folder, fingerprint):
                    say(f"[{k}/{len(share)}] {run.id}: done earlier, skipped")
                    skipped.append(run.id)
                    records[run.id] = previous
                    continue
                why = "new" if previous is None else ("settings changed" if previous.get("fingerprint") != fingerprint
                                                      else f"retrying ({previous.get('status')})")
                say(f"[{k}/{len(share)}] {run.id}: {why}")
                record = _run_one(plan, study_dir, run.split, run.encoder, previous, resume, say, device,
                                  {"rank": rank, "world_size": world})
        except OutputLockedError as e:
            say(f"[{k}/{len(share)}] {run.id}: skipped, another job runs it ({e})")
            busy.append(run.id)
            continue
        records[run.id] = record
        ran.append(run.id)
        if record["status"] != "done":
            failed.append(run.id)
    results = study_dir / "results"
    if world > 1:
        wait_for_every_rank()
    if only:
        say(f"study: {len(ran)} run(s) run, {len(skipped)} skipped, {len(failed)} failed; results not written "
            "(--results-only merges the finished runs)")
    elif rank == 0:
        results = write_results(study_dir, plan, log=say)
        say(f"study: {len(ran)} run(s) run, {len(skipped)} skipped, {len(failed)} failed → {results}")
    return StudyReport(study_dir, results, ran, skipped, failed, records, busy)
