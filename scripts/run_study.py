"""Run the encoder study: every encoder × split trained, its minimum cell size chosen on val, tested, summarised.

Examples::

    # PanNuke, the three official splits, the eight study encoders (gated ones from local folders)
    python scripts/run_study.py runs/study_pannuke --dataset pannuke --dataset-dir data/pannuke \\
        --splits official1 official2 official3 --weights uni=/models/uni --weights virchow2=/models/virchow2 \\
        --weights prov_gigapath=/models/prov-gigapath

    # a quick offline check of the whole pipeline: two small encoders, random weights, synthetic data
    python scripts/run_study.py runs/study_smoke --encoders convnext_atto uni --reduced-encoders --random-weights \\
        --splits seed0 seed1 --epochs 2 --set tile_size=64 --synthetic '{"n_train": 8, "n_val": 4, "n_test": 8, "size": 64}'

Rerunning the same command continues where it stopped: finished runs are skipped, failed or half-finished
ones are retried.  `--list` prints every run and the command of each unfinished one (one job per run), `--only`
runs some, `--dry-run` prints what the grid would cost, `--results-only` rewrites results/ from the finished
runs.  See docs/study.md.
"""

from __future__ import annotations

import argparse
import sys

from cellgap.study import add_study_arguments
from cellgap.study.options import run_and_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_arguments(parser)
    return run_and_report(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
