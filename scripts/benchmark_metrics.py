"""Benchmark the cellgap evaluation suite against cellseg-metrics and MONAI, per 256² tile and on a 2048² tile.

Per 256² tile (PanNuke-like: ~40 touching cells, 5 classes) each implementation computes what it can of
the suite, and the values they share are checked to agree:

* cellgap: everything — PQ/DQ/SQ, AJI, AJI+, Dice, class-wise PQ counts (mPQ, mPQ+), centroid
  detection and HoVer-Net per-class F1 counts, per-class counts (R²);
* cellseg-metrics: binary PQ/DQ/SQ, AJI, Dice and class-wise PQ (panoptic_quality on class-masked maps);
* MONAI: binary PQ counts (compute_panoptic_quality) and class-wise PQ counts (PanopticQualityMetric).

Times are CPU process time (all threads) and wall time, median over tiles of the best of ``--repeat``
runs.  On a CUDA machine cellgap is also timed with the tiles already on the GPU.

    python scripts/benchmark_metrics.py [--tiles 20] [--write]   # --write updates "## Metrics" in docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import numpy as np
import torch
from benchmarks_doc import write_section

from cellgap.metrics import Protocol, instance, score_image
from cellgap.metrics.matching import instance_overlaps
from cellgap.testing.synthetic_pairs import perturb, perturb_classes, random_classes, random_instances

NUM_CLASSES = 5
PROTOCOL = Protocol.pannuke()


def make_tile(side: int, n_cells: int, seed: int, radius=(4.0, 10.0)):
    rng = np.random.default_rng(seed)
    gt = random_instances((side, side), n_cells, rng, radius=radius)
    pred = perturb(gt, rng, n_false=max(1, n_cells // 30), n_specks=max(1, n_cells // 100))
    gc = random_classes(gt, NUM_CLASSES, rng)
    return gt, pred, gc, perturb_classes(pred, gc, NUM_CLASSES, rng)


def ours(gt, pred, gc, pc):
    return score_image(gt, pred, gc, pc, num_classes=NUM_CLASSES, protocol=PROTOCOL)


def cellseg_suite(gt, pred, gc, pc):
    import cellseg_metrics as cs
    from cellseg_metrics.binary_metrics import dice_coef, get_stats

    out = dict(cs.panoptic_quality(gt, pred))
    out["aji"] = cs.aggregated_jaccard_index(gt, pred)
    out["dice"] = dice_coef(*get_stats((gt > 0).astype(np.uint8), (pred > 0).astype(np.uint8)))
    out["class_pq"] = [cs.panoptic_quality(gt * (gc == c), pred * (pc == c))["pq"] for c in range(1, NUM_CLASSES + 1)]
    return out


def monai_suite(gt, pred, gc, pc):
    from monai.metrics import PanopticQualityMetric, compute_panoptic_quality

    g, p = torch.as_tensor(gt.astype(np.int64)), torch.as_tensor(pred.astype(np.int64))
    binary = compute_panoptic_quality(p, g, output_confusion_matrix=True)
    metric = PanopticQualityMetric(num_classes=NUM_CLASSES, return_confusion_matrix=True)
    classes = metric(y_pred=torch.stack([p, torch.as_tensor(pc.astype(np.int64))])[None],
                     y=torch.stack([g, torch.as_tensor(gc.astype(np.int64))])[None])
    return {"binary": binary, "classes": classes[0]}


def timed(fn, args, repeat: int, sync=None):
    best_cpu = best_wall = float("inf")
    for _ in range(repeat):
        c, w = time.process_time(), time.perf_counter()
        result = fn(*args)
        if sync:
            sync()
        best_cpu = min(best_cpu, time.process_time() - c)
        best_wall = min(best_wall, time.perf_counter() - w)
    return result, best_cpu, best_wall


def check_agreement(tile, mine, cs, mo) -> bool:
    """The shared values agree: counts exactly, ratios up to each reference's documented epsilon/float32."""
    gt, pred, gc, pc = tile
    v = mine.values
    assert [int(x) for x in mo["binary"][:3]] == [v["tp"], v["fp"], v["fn"]], "MONAI binary counts"
    assert abs(float(mo["binary"][3]) - v["iou_sum"]) <= 1e-5 * max(v["tp"], 1), "MONAI ΣIoU (float32)"
    np.testing.assert_array_equal(mo["classes"][:, :3].numpy(), mine.pq_counts[:, :3], err_msg="MONAI class counts")
    for key in ("pq", "dq", "sq", "dice"):
        assert abs(cs[key] - v[key]) < 1e-6, f"cellseg {key}"
    ov = instance_overlaps(gt, pred, gc, pc, num_classes=NUM_CLASSES)
    for c in range(NUM_CLASSES):
        sub = instance.panoptic_quality(instance_overlaps(gt * (gc == c + 1), pred * (pc == c + 1)))
        assert abs(cs["class_pq"][c] - (0.0 if np.isnan(sub["pq"]) else sub["pq"])) < 1e-6, "cellseg class PQ"
    assert ov.n_gt == v["n_gt"]
    # AJI: cellseg pairs each GT with its largest *intersection* (cellgap: largest IoU, as HoVer-Net).
    return abs(cs["aji"] - v["aji"]) >= 1e-6


def run(args) -> str:
    # One torch thread for every implementation (cellgap's CPU pass uses one anyway): on a shared 2-core
    # machine intra-op threads make small-tensor torch code several times slower, MONAI's included.
    torch.set_num_threads(1)
    tiles = [make_tile(256, args.cells, seed) for seed in range(args.tiles)]
    n_cells = statistics.median(len(np.unique(t[0])) - 1 for t in tiles)
    rows = {}
    for name, fn in (("cellgap", ours), ("cellseg-metrics 0.2.0", cellseg_suite), ("MONAI 1.6.1", monai_suite)):
        fn(*tiles[0])  # warm-up (imports, caches)
        cpu, wall, results = [], [], []
        for t in tiles:
            r, c, w = timed(fn, t, args.repeat)
            cpu.append(c)
            wall.append(w)
            results.append(r)
        rows[name] = (statistics.median(cpu), statistics.median(wall), results)
    aji_differs = sum(check_agreement(t, mine, cs, mo) for t, mine, cs, mo in
                      zip(tiles, rows["cellgap"][2], rows["cellseg-metrics 0.2.0"][2], rows["MONAI 1.6.1"][2]))

    big = make_tile(2048, args.big_cells, 12345, radius=(5.0, 14.0))
    big_cells = len(np.unique(big[0])) - 1
    ours(*big)
    _, big_cpu, big_wall = timed(ours, big, args.repeat)

    gpu_lines = []
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        gpu_tiles = [tuple(torch.as_tensor(a).to(dev) for a in t) for t in tiles]
        ours(*gpu_tiles[0])
        gpu_wall = statistics.median(timed(ours, t, args.repeat, torch.cuda.synchronize)[2] for t in gpu_tiles)
        gbig = tuple(torch.as_tensor(a).to(dev) for a in big)
        ours(*gbig)
        _, _, gbig_wall = timed(ours, gbig, args.repeat, torch.cuda.synchronize)
        gpu_lines = [f"| cellgap on {torch.cuda.get_device_name(0)} (tiles already on the GPU) | — | "
                     f"{gpu_wall * 1e3:.2f} | — | 2048² with {big_cells} cells: {gbig_wall:.3f} s wall |"]

    ours_cpu = rows["cellgap"][0]
    lines = [
        f"Run {datetime.date.today().isoformat()} on the 2-core CPU dev machine ({platform.processor() or platform.machine()}, "
        f"torch {torch.__version__.split('+')[0]} on 1 thread for every implementation), `python scripts/benchmark_metrics.py`. "
        "Other engineers' jobs shared the two cores, so wall times are noisy; CPU process time is the steadier figure.",
        "",
        f"Per 256² tile ({args.tiles} synthetic PanNuke-like tiles, median {n_cells:.0f} cells, {NUM_CLASSES} classes; "
        f"median over tiles of the best of {args.repeat} runs). Shared values agree on every tile "
        "(counts exactly; ratios up to each reference's epsilon / float32), except AJI where cellseg-metrics pairs by "
        f"largest intersection instead of largest IoU: different on {aji_differs} of {args.tiles} tiles.",
        "",
        "| implementation | what it computes | CPU ms / tile | wall ms / tile | cellgap is faster by (CPU) |",
        "|---|---|---|---|---|",
        f"| cellgap | full suite: PQ/DQ/SQ, AJI, AJI+, Dice, class PQ counts, detection + per-class F1, counts | "
        f"{ours_cpu * 1e3:.2f} | {rows['cellgap'][1] * 1e3:.2f} | — |",
    ]
    for name, what in (("cellseg-metrics 0.2.0", "binary PQ/DQ/SQ, AJI, Dice, class-wise PQ"),
                       ("MONAI 1.6.1", "binary PQ counts, class-wise PQ counts")):
        cpu, wall, _ = rows[name]
        lines.append(f"| {name} | {what} | {cpu * 1e3:.2f} | {wall * 1e3:.2f} | {cpu / ours_cpu:.0f}× |")
    lines += gpu_lines
    lines += ["", f"2048² tile with {big_cells} cells, full suite on CPU: {big_cpu:.3f} s CPU, {big_wall:.3f} s wall "
              "(target < 1 s)."]
    if not gpu_lines:
        lines.append("No GPU on this machine; the GPU path (CUDA tensors in, same code) is covered by "
                     "tests/test_metrics_inputs.py when a device is present.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", type=int, default=20)
    parser.add_argument("--cells", type=int, default=45, help="cells painted per 256² tile (some are overwritten)")
    parser.add_argument("--big-cells", type=int, default=2300, help="cells painted on the 2048² tile")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="update the Metrics section of docs/benchmarks.md")
    args = parser.parse_args()
    text = run(args)
    print(text)
    if args.write:
        write_section("Metrics", text)


if __name__ == "__main__":
    main()
