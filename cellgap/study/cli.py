"""Command-line wiring of the study (``scripts/run_study.py`` and ``cellgap study``): options → :func:`run_study`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .results import write_results
from .runner import StudyReport, run_study


def _json_arg(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a plain string value


def add_study_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The study's options, added to ``parser``."""
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
    """Run the grid the options describe, or with ``--results-only`` rewrite only its results."""
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
