"""Time the synthetic tile generator (target: about 30 ms per 256² tile) and the prepared-dataset writer.

    python scripts/benchmark_synthetic.py [--tiles 60] [--size 256] [--repeats 3]

Reports per-tile wall-clock and CPU time (median and 90th percentile over tiles, best of ``--repeats``
passes, since other work on a shared machine inflates single passes), the number of cells per tile, and
the machine's load average so that figures from a busy machine can be recognised.

Also reports how hard the tiles are: the binary PQ of a classical pipeline with no learning
(hematoxylin channel, Otsu threshold, distance-transform watershed) on held-out seeds.  It should sit
well below what a trained decoder reaches, and well above zero.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from cellseg_metrics import panoptic_quality
from scipy import ndimage
from skimage.color import rgb2hed
from skimage.feature import peak_local_max
from skimage.filters import threshold_otsu
from skimage.segmentation import watershed

from cellgap.data.synthetic import generate_tile, prepare_synthetic, tile_seed
from cellgap.magnification import profile_for


def time_tiles(seeds: range, size: int, magnification: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    wall, cpu, cells = [], [], []
    for seed in seeds:
        w0, c0 = time.perf_counter(), time.process_time()
        tile = generate_tile(seed, size=size, magnification=magnification)
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
        cells.append(int(tile.label.max()))
    return np.array(wall) * 1e3, np.array(cpu) * 1e3, cells


def classical_pq(seeds: range, size: int, magnification: int) -> float:
    """Mean binary PQ of hematoxylin + Otsu + distance watershed over the tiles that have cells."""
    profile = profile_for(magnification=magnification)
    spacing = max(2, int(round(4 / profile.mpp)))  # peaks at least ~4 µm apart
    scores = []
    for seed in seeds:
        tile = generate_tile(seed, size=size, magnification=magnification)
        if tile.label.max() == 0:
            continue
        haem = ndimage.gaussian_filter(rgb2hed(tile.image)[..., 0], 1.0)
        foreground = ndimage.binary_fill_holes(haem > threshold_otsu(haem))
        distance = ndimage.distance_transform_edt(foreground)
        peaks = peak_local_max(distance, min_distance=spacing, labels=ndimage.label(foreground)[0], exclude_border=False)
        markers = np.zeros(tile.label.shape, dtype=np.int32)
        markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
        predicted = watershed(-distance, markers, mask=foreground)
        sizes = np.bincount(predicted.ravel())
        predicted[sizes[predicted] < profile.default_min_cell_size] = 0
        scores.append(panoptic_quality(tile.label, predicted)["pq"])
    return float(np.mean(scores))


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
    held_out = range(tile_seed(0, "test", 0), tile_seed(0, "test", 0) + args.tiles)
    for magnification in (40, 20):
        pq = classical_pq(held_out, args.size, magnification)
        print(f"difficulty, {magnification}x: classical H-threshold + watershed binary PQ {pq:.3f} over {args.tiles} test-split tiles")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
