"""Benchmark what the study runner adds on top of training: the gap statistics at PanNuke scale, counting
parameters and GFLOPs of every encoder, and (``--grid``) the CI grid stage by stage.

* Gap statistics: per-image score tables of PanNuke's size (3 official splits, 2,722 + 2,722 + 2,656 test
  images, 5 classes, 19 tissues; random but valid scores: the cost does not depend on the values); per
  split a paired bootstrap and a paired permutation test, then the split-stratified pooled statistics.
* Cost: ``cellgap.network.network_cost`` of every registry encoder with the bundles' full decoder on the
  meta device (parameters as run, GFLOPs per 256² tile); the table is also a result in itself.
* ``--grid``: the 2 encoders × 2 splits synthetic grid of tests/test_study.py, wall time per stage.

    python scripts/benchmark_study.py [--bootstrap 2000] [--permutations 5000] [--grid] [--write]
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from benchmarks_doc import write_section

from cellgap.encoders import ENCODERS
from cellgap.metrics import Protocol, ScoreTable
from cellgap.metrics.scoring import COUNTS, SCALARS
from cellgap.metrics.statistics import paired_bootstrap, paired_permutation_test
from cellgap.network import network_cost
from cellgap.study import pooled_paired_statistics

SECTION = "Study runner"
PANNUKE_TEST = (2722, 2722, 2656)  # test images of official splits 1, 2, 3
CLASSES = ("neoplastic", "inflammatory", "connective", "dead", "epithelial")


def random_table(n: int, rng: np.random.Generator, ids: list[str], tissues: np.ndarray, gt: dict | None = None) -> ScoreTable:
    """A valid PanNuke-sized score table; ``gt`` fixes the ground-truth columns so two tables can be paired."""
    c = len(CLASSES)
    scalars = {k: rng.uniform(0.3, 0.9, n) for k in SCALARS}
    counts = {k: rng.integers(0, 40, n).astype(float) for k in COUNTS}
    class_pq = np.where(rng.uniform(size=(n, c)) < 0.3, np.nan, rng.uniform(0.2, 0.8, (n, c)))
    pq_counts = rng.integers(0, 10, (n, c, 4)).astype(float)
    f1_counts = rng.integers(0, 10, (n, c, 5)).astype(float)
    count_gt = gt["count_gt"] if gt else rng.integers(0, 20, (n, c)).astype(float)
    empty = gt["empty"] if gt else rng.uniform(size=n) < 0.05
    for k in SCALARS:
        scalars[k][empty] = np.nan
    class_pq[empty] = np.nan
    return ScoreTable(np.array(ids, dtype=object), tissues, empty, {**scalars, **counts}, class_pq, pq_counts, f1_counts,
                      count_gt, rng.integers(0, 20, (n, c)).astype(float), CLASSES)


def gap_benchmark(bootstrap: int, permutations: int) -> list[str]:
    rng = np.random.default_rng(0)
    protocol = Protocol.pannuke()
    pairs = []
    for split, n in enumerate(PANNUKE_TEST):
        ids = [f"s{split}_im{i}" for i in range(n)]
        tissues = np.array([f"tissue{i % 19}" for i in range(n)], dtype=object)
        a = random_table(n, rng, ids, tissues)
        b = random_table(n, rng, ids, tissues, gt={"count_gt": a.count_gt, "empty": a.empty})
        pairs.append((a, b, protocol))
    lines = [f"Gap statistics on PanNuke-sized tables (3 splits, {sum(PANNUKE_TEST):,} test images, 5 classes, 19 "
             f"tissues; {bootstrap} bootstrap resamples, {permutations} permutations), wall seconds:", "",
             "| metric | per-split paired bootstrap (3 splits) | per-split permutation test (3 splits) | pooled over splits "
             "(bootstrap + permutation) | one encoder pair, total |", "|---|---|---|---|---|"]
    for metric in ("mpq+", "bpq", "pq"):
        t = time.perf_counter()
        for a, b, p in pairs:
            paired_bootstrap(a, b, p, metric, n_resamples=bootstrap, stratify_by_tissue=True)
        boot = time.perf_counter() - t
        t = time.perf_counter()
        for a, b, p in pairs:
            paired_permutation_test(a, b, p, metric, n_permutations=permutations)
        perm = time.perf_counter() - t
        t = time.perf_counter()
        pooled_paired_statistics(pairs, metric, bootstrap, permutations)
        pooled = time.perf_counter() - t
        lines.append(f"| {metric} | {boot:.1f} | {perm:.1f} | {pooled:.1f} | {boot + perm + pooled:.1f} |")
    return lines


def cost_benchmark() -> list[str]:
    import json as _json

    decoder = _json.loads((Path(__file__).resolve().parents[1] / "bundles" / "cisca_uni" / "configs" / "train.json")
                          .read_text())["decoder"]
    lines = ["", f"Encoder cost with the bundles' full decoder (`{decoder['widths']}`), 5 classes, one 256² tile, counted "
             "with `FlopCounterMode` on the meta device (multiply-add = 2 FLOPs; encoder blocks after the last tap pruned):", "",
             "| encoder | domain | encoder params (M) | decoder params (M) | encoder GFLOPs | total GFLOPs | count time (s) |",
             "|---|---|---|---|---|---|---|"]
    for key, spec in ENCODERS.items():
        t = time.perf_counter()
        c = network_cost(key, num_classes=5, decoder=decoder)
        lines.append(f"| {key} | {spec.domain} | {c['encoder_params'] / 1e6:.1f} | {c['decoder_params'] / 1e6:.2f} | "
                     f"{c['encoder_gflops']:.1f} | {c['gflops']:.1f} | {time.perf_counter() - t:.1f} |")
    return lines


def grid_benchmark() -> list[str]:
    from cellgap.study import run_study

    tiny = {"widths": [8, 8, 8, 16, 16, 16], "head_features": 8, "head_width": 8, "norm": None}
    overrides = {"epochs": 1, "epoch_length": 1, "batch_size": 2, "val_batch_size": 2, "decoder": tiny, "tile_size": 64,
                 "sw_batch_size": 2, "num_workers": 0, "reduced_encoder": True,
                 "synthetic": {"n_train": 2, "n_val": 2, "n_test": 3, "magnification": 40, "size": 64}}
    folder = Path(tempfile.mkdtemp(prefix="cellgap_study_bench_"))
    try:
        t = time.perf_counter()
        run_study(folder, ["convnext_atto", "uni"], "synthetic", None, ["seed0", "seed1"], overrides, "random",
                  bootstrap=100, permutations=100, eval_bootstrap=0, log=lambda text: None)
        total = time.perf_counter() - t
        t = time.perf_counter()
        run_study(folder, ["convnext_atto", "uni"], "synthetic", None, ["seed0", "seed1"], overrides, "random",
                  bootstrap=100, permutations=100, eval_bootstrap=0, log=lambda text: None)
        rerun = time.perf_counter() - t
        rows = []
        for cell in sorted((folder / "cells").rglob("cell.json")):
            r = json.loads(cell.read_text())
            rows.append(f"| {r['split']}/{r['encoder']} | " + " | ".join(f"{r['timings'][k]:.1f}" for k in
                                                                          ("train_s", "select_s", "evaluate_s", "total_s")) + " |")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return ["", "The CI grid of tests/test_study.py (2 encoders × 2 synthetic splits, random weights, tiny decoder, 64² "
            f"tiles, one training iteration): {total:.0f} s for the whole call (grid + results), {rerun:.0f} s for a rerun "
            "that skips every finished cell and rewrites the results. Wall seconds per cell:", "",
            "| cell | train | select (val, 7 candidates) | evaluate (test) | total |", "|---|---|---|---|---|", *rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--permutations", type=int, default=5000)
    parser.add_argument("--grid", action="store_true", help="also time the CI grid stage by stage")
    parser.add_argument("--write", action="store_true", help=f"update the '{SECTION}' section of docs/benchmarks.md")
    args = parser.parse_args()
    lines = [f"`scripts/benchmark_study.py --bootstrap {args.bootstrap} --permutations {args.permutations}"
             f"{' --grid' if args.grid else ''}` — 2-core CPU dev machine, {datetime.date.today().isoformat()}, shared with "
             "other engineers' jobs (wall times vary by ±30 % or more between runs).", ""]
    lines += gap_benchmark(args.bootstrap, args.permutations)
    lines += cost_benchmark()
    if args.grid:
        lines += grid_benchmark()
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()
