"""Time the synthetic tile generator (target: about 30 ms per 256² tile) and the prepared-dataset writer.

    python scripts/benchmark_synthetic.py [--tiles 60] [--size 256] [--repeats 3]

Reports per-tile wall-clock and CPU time (median and 90th percentile over tiles, best of ``--repeats``
passes, since other work on a shared machine inflates single passes), the number of cells per tile, and
the machine's load average so that figures from a busy machine can be recognised.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from cellgap.data.synthetic import generate_tile, prepare_synthetic


def time_tiles(seeds: range, size: int, magnification: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    wall, cpu, cells = [], [], []
    for seed in seeds:
        w0, c0 = time.perf_counter(), time.process_time()
        tile = generate_tile(seed, size=size, magnification=magnification)
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
        cells.append(int(tile.label.max()))
    return np.array(wall) * 1e3, np.array(cpu) * 1e3, cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=60)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    print(f"machine: {platform.machine()}, {os.cpu_count()} logical CPUs, load average before {os.getloadavg()[0]:.1f}")
    generate_tile(0, size=args.size)  # imports and caches warm
    print("| magnification | tile | wall ms median / p90 | CPU ms median / p90 | cells per tile median (min–max) |")
    print("|---|---|---|---|---|")
    for magnification in (40, 20):
        passes = [time_tiles(range(args.tiles), args.size, magnification) for _ in range(args.repeats)]
        wall, cpu, cells = min(passes, key=lambda p: float(np.median(p[0])))
        print(f"| {magnification}x | {args.size}² | {np.median(wall):.1f} / {np.percentile(wall, 90):.1f} "
              f"| {np.median(cpu):.1f} / {np.percentile(cpu, 90):.1f} | {int(np.median(cells))} ({min(cells)}–{max(cells)}) |")

    with tempfile.TemporaryDirectory() as tmp:
        n = args.tiles
        w0 = time.perf_counter()
        prepare_synthetic(Path(tmp) / "synthetic", n_train=n, n_val=0, n_test=0, size=args.size, progress=False)
        per_tile = (time.perf_counter() - w0) / n * 1e3
    print(f"prepare_synthetic at 40x (generate + PNG/TIFF write): {per_tile:.1f} ms per tile over {n} tiles")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
