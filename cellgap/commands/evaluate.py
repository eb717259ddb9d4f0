"""``cellgap evaluate``: the metrics reports of a trained run folder on one split of its dataset.

Example::

    cellgap evaluate runs/my_uni --split test

Runs the bundle's ``train.json`` + ``evaluate.json`` with what ``RUN_DIR/run.json`` recorded and writes
per-image, per-class and per-tissue metrics and a summary with the protocol to
``RUN_DIR/runs/eval_<split>/`` (docs/metrics.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .bundle_run import CommandError, bundle_for, known_encoder, run_bundle, say
from .run_folder import MODEL, read_run, run_overrides

EXAMPLE = "example: cellgap evaluate runs/my_uni --split test"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0]
    parser.epilog = EXAMPLE
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by `cellgap train`")
    parser.add_argument("--split", default="test", help="split of the run's dataset to evaluate (default test)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the confidence intervals (0: none)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the first GPU if any)")
    parser.add_argument("--workers", type=int, default=None, help="data-loader worker processes (default: the run's)")


def run(args: argparse.Namespace) -> dict:
    run_dir = Path(args.run_dir).expanduser()
    try:
        record = read_run(run_dir)
    except (OSError, ValueError) as error:
        raise CommandError(str(error)) from None
    if not (run_dir / MODEL).is_file():
        raise CommandError(f"{run_dir / MODEL}: missing; the run has not saved a model yet (finish it with "
                           f"`cellgap train ... --out {run_dir} --resume`)")
    if args.bootstrap < 0:
        raise CommandError(f"--bootstrap {args.bootstrap}: expected 0 or more resamples")
    encoder = known_encoder(record["encoder"])
    overrides = {**record["options"], **run_overrides(run_dir), "eval_split": args.split, "bootstrap": args.bootstrap}
    if args.workers is not None:
        overrides["num_workers"] = args.workers
    if args.device is not None:
        overrides["device"] = f"$torch.device({args.device!r})"
        overrides["amp"] = args.device.startswith("cuda")
    say(f"evaluating {run_dir / MODEL} on the {args.split!r} split of {record['dataset_dir']}")
    run_bundle(bundle_for(encoder, run_dir), ["train.json", "evaluate.json"], overrides)
    out = run_dir / "runs" / f"eval_{args.split}"
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    metrics = summary.get("metrics", summary)
    shown = "  ".join(f"{k} {metrics[k]:.3f}" for k in ("pq", "bpq", "mpq+", "f1d")
                      if isinstance(metrics.get(k), (int, float)))
    say(f"{args.split}: {shown}\nreports: {out}")
    return {"reports": str(out), "metrics": metrics}
