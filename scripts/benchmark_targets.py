"""Time CISCATargetsd (all CISCA training targets) on crowded synthetic tiles, on one CPU core.

    python scripts/benchmark_targets.py --magnification 40 --size 256 --tiles 200

Tiles are random ellipses painted over each other (later ones on top), so most cells touch.
Prints ms/tile for the whole transform and for each target, as CPU time of the best pass and
wall time of the median pass. Aim: ≤ 3 ms/tile for 256² at 40x (targets alone; docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cellgap.magnification import profile_for  # noqa: E402
from cellgap.targets import CISCATargetsd, contour_levels, distance_maps, weight_mask  # noqa: E402
from cellgap.testing.fixtures import overlapping_ellipses  # noqa: E402


def time_per_tile(function, tiles, repeats: int) -> str:
    """ms per tile: CPU time of this process (best pass) and wall time (median pass).

    The best CPU pass is the figure that survives other jobs sharing the machine; the median
    wall pass is closer to what a busy data-loader worker sees.
    """
    function(tiles[0])  # warm-up (caches, imports)
    cpu, wall = [], []
    for _ in range(repeats):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        for tile in tiles:
            function(tile)
        cpu.append((time.process_time() - start_cpu) / len(tiles) * 1e3)
        wall.append((time.perf_counter() - start_wall) / len(tiles) * 1e3)
    return f"{min(cpu):6.2f} ms/tile CPU (best of {repeats})  {np.median(wall):6.2f} ms/tile wall (median)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--magnification", default="40")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--tiles", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-cells", type=int, default=50)
    parser.add_argument("--max-cells", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    profile = profile_for(magnification=args.magnification)
    rng = np.random.default_rng(args.seed)
    # Cell radius scales with magnification: nuclei of ~6-12 px radius at 40x, half at 20x.
    scale = profile.magnification / 40
    radius = (6 * scale, 12 * scale)
    labels = [
        overlapping_ellipses(rng, args.size, int(rng.integers(args.min_cells, args.max_cells + 1)), radius) for _ in range(args.tiles)
    ]
    cells = [len(np.unique(x)) - 1 for x in labels]
    samples = [{"label": torch.from_numpy(x[None].astype(np.float32))} for x in labels]
    transform = CISCATargetsd(magnification=args.magnification)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {platform.machine()} cpu_count={os.cpu_count()} load={load:.1f}, torch threads=1")
    print(
        f"{args.tiles} tiles of {args.size}² at {profile.name}, {min(cells)}-{max(cells)} visible cells (mean {np.mean(cells):.0f})"
    )
    print(f"contour_levels   {time_per_tile(lambda x: contour_levels(x, profile), labels, args.repeats):s}")
    print(f"distance_maps    {time_per_tile(distance_maps, labels, args.repeats):s}")
    print(f"weight_mask      {time_per_tile(weight_mask, labels, args.repeats):s}")
    print(f"CISCATargetsd    {time_per_tile(transform, samples, args.repeats):s} (relabel + all targets + tensors)")


if __name__ == "__main__":
    main()
