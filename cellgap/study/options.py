"""Command-line wiring of the study (``scripts/run_study.py`` and ``cellgap study``): options → :func:`run_study`."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from .grid import STATES, grid_states
from .results import write_results
from .runner import StudyReport, make_plan, run_study


def _json_arg(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a plain string value


def add_study_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The study's options, added to ``parser``."""
    parser.add_argument("study_dir", help="folder of the study (its runs in cells/, and results/)")
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
    parser.add_argument("--eval-bootstrap", type=int, default=1000, help="bootstrap resamples of each run's test CIs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the gap statistics")
    parser.add_argument("--no-resume", action="store_true", help="rerun every run, even finished ones")
    parser.add_argument("--rerun-changed", action="store_true",
                        help="rerun the runs finished under other options (default: refuse to mix them)")
    jobs = parser.add_argument_group("one run per job (docs/study.md: Slurm, GNU parallel, torchrun)")
    jobs.add_argument("--list", action="store_true",
                      help="print every run of the grid (id, encoder, dataset, split, state) and the command of each unfinished one")
    jobs.add_argument("--only", nargs="+", metavar="RUN_ID", help="run only these runs (ids from --list); results not written")
    jobs.add_argument("--results-only", action="store_true",
                      help="only rewrite results/ from the finished runs (the missing ones are named and marked)")
    jobs.add_argument("--dry-run", action="store_true",
                      help="print training steps, FLOPs per step, GPU hours and embedding-cache disk per run; run nothing")
    jobs.add_argument("--tiles-per-second", action="append", default=[], metavar="[ENCODER=]N",
                      help="training throughput for --dry-run (default: the H100 figures of docs/benchmarks.md); repeatable")
    parser.set_defaults(study_parser=parser)
    return parser


# Options that choose what a command does, not which grid: left out of the per-run commands --list prints.
_ACTION_OPTIONS = {"list", "only", "results_only", "dry_run", "tiles_per_second", "help"}


def _absolute_weights(item: str) -> str:
    """``[ENCODER=]PATH`` with an existing local PATH made absolute (a job may start in another folder)."""
    key, sep, value = str(item).partition("=")
    if not sep:
        key, value = "", key
    path = Path(value).expanduser()
    if value not in ("hub", "random", "none") and path.exists():
        value = str(path.resolve())
    return f"{key}{sep}{value}"


def command_line(args: argparse.Namespace, only: list[str] | None = None) -> str:
    """The shell command that runs this grid (the runs ``only`` names), rebuilt from the parsed options; folders
    absolute so that it runs from any directory (a Slurm job, another shell)."""
    parser: argparse.ArgumentParser = args.study_parser
    words = ["python", "-m", "cellgap.study"]
    for action in parser._actions:  # argparse has no public iterator over its options
        if action.dest in _ACTION_OPTIONS or action.dest == "study_parser":
            continue
        value = getattr(args, action.dest, None)
        if action.dest in ("study_dir", "dataset_dir") and value is not None:
            value = str(Path(value).expanduser().resolve())
        if not action.option_strings:
            words.append(str(value))
            continue
        if value is None or value == action.default or value == []:
            continue
        flag = action.option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):
            words.append(flag)
        elif isinstance(action, argparse._AppendAction):
            for item in value:
                words += [flag, _absolute_weights(item) if action.dest == "weights" else str(item)]
        elif isinstance(value, list):
            words += [flag, *map(str, value)]
        else:
            words += [flag, str(value)]
    if only:
        words += ["--only", *only]
    return shlex.join(words)


def _study_kwargs(args: argparse.Namespace) -> dict:
    """run_study's arguments from the options."""
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
    return {"study_dir": args.study_dir, "encoders": args.encoders, "dataset": args.dataset, "dataset_dir": args.dataset_dir,
            "splits": args.splits, "overrides": overrides, "encoder_weights": weights or "hub",
            "min_cell_sizes": args.min_cell_sizes, "gap_metrics": args.gap_metrics, "bootstrap": args.bootstrap,
            "permutations": args.permutations, "seed": args.seed, "eval_bootstrap": args.eval_bootstrap}


def list_runs(args: argparse.Namespace, out=None) -> list:
    """``--list``: every run of the grid with its state, and the command of each unfinished one."""
    out = out or sys.stdout
    plan = make_plan(**_study_kwargs(args))
    study_dir = Path(args.study_dir).expanduser().resolve()
    states = grid_states(study_dir, plan)
    rows = [(s.run.id, s.run.encoder, plan.dataset, s.run.split.name, s.state) for s in states]
    widths = [max(len(r[i]) for r in [("run", "encoder", "dataset", "split", "state"), *rows]) for i in range(5)]
    for r in [("run", "encoder", "dataset", "split", "state"), *rows]:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip(), file=out)
    counts = {k: sum(s.state == k for s in states) for k in STATES}
    print(f"\n{len(states)} run(s): " + ", ".join(f"{n} {k}" for k, n in counts.items() if n), file=out)
    for s in states:
        if s.detail:
            print(f"# {s.run.id} ({s.state}): {s.detail}", file=out)
    todo = [s for s in states if s.state in ("todo", "failed")]
    if todo:
        print("\n# the command of each unfinished run (one per job):", file=out)
        for s in todo:
            print(command_line(args, [s.run.id]), file=out)
    if counts["changed"]:
        print("\n# 'changed' runs were finished under other options: rerun with those options, or add --rerun-changed",
              file=out)
    return states


def run_study_from_args(args: argparse.Namespace) -> StudyReport | Path | list:
    """Run the grid the options describe; ``--list``, ``--dry-run`` and ``--results-only`` do what they say instead."""
    if args.list:
        return list_runs(args)
    if args.dry_run:
        from .estimate import print_estimate

        return print_estimate(make_plan(**_study_kwargs(args)), Path(args.study_dir).expanduser().resolve(),
                              args.tiles_per_second, only=args.only)
    if args.results_only:
        return write_results(args.study_dir)
    kwargs = _study_kwargs(args)
    return run_study(**kwargs, resume=not args.no_resume, only=args.only, rerun_changed=args.rerun_changed)


def run_and_report(args: argparse.Namespace) -> int:
    """Run the study the parsed options describe and report as a command line does: 0 when every chosen run
    finished, 1 when one failed or another job held it, 2 for options that cannot run (named in the message)."""
    from ..locking import OutputLockedError

    try:
        outcome = run_study_from_args(args)
    except (ValueError, FileNotFoundError, OutputLockedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if isinstance(outcome, StudyReport) and (outcome.failed or outcome.busy):
        if outcome.failed:
            print(f"{len(outcome.failed)} run(s) failed: {', '.join(outcome.failed)}; see their cell.json "
                  f"(and {Path(outcome.results_dir) / 'runs.md'} once the results are written)", file=sys.stderr)
        if outcome.busy:
            print(f"{len(outcome.busy)} run(s) held by another job, not run here: {', '.join(outcome.busy)}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None, prog: str = "python -m cellgap.study") -> int:
    """``python -m cellgap.study`` (and under ``torchrun``); exit status as :func:`run_and_report`."""
    parser = add_study_arguments(argparse.ArgumentParser(prog=prog, description="the encoders × splits study (docs/study.md)"))
    return run_and_report(parser.parse_args(argv))
