"""Whole-slide throughput of `cellgap segment` on this machine's CPU (docs/benchmarks.md, "Whole slides").

    python scripts/benchmark_slide.py --side 3072 --tissue 0.6 --json slide_benchmark.json

A synthetic OME-TIFF slide (level 0 at 0.25 µm/px, two levels, tissue inside an ellipse on glass) is segmented
twice with the default settings: with a model trained at 0.5 µm/px (read from level 1) and at 0.25 µm/px (level 0).
The network is the demo network (``convnext_atto`` encoder + the demo decoder, random weights: the cost of a
real forward pass); because a random network finds no cells, the cells handed to post-processing come from
``StainThresholdNet`` on the same tile, so post-processing and writing see a realistic cell density.

Reported per run: seconds per mm² of tissue, peak RSS (this process during the run, and the largest
post-processing process; the loader workers share the main process's pages), the shares of
read / network / post-processing / writing (read and post-processing summed over their processes), and the
streaming efficiency: slide throughput over the per-tile bound 1 / (network + post-processing per tile), both
measured in the same run (≥ 80 % means streaming costs little beyond doing each tile once).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cellgap.cli import DEMO_DECODER, DEMO_ENCODER  # noqa: E402
from cellgap.decoder import DEFAULT_DECODER as BUNDLE_DEFAULT_DECODER  # noqa: E402
from cellgap.network import CellGapNet  # noqa: E402
from cellgap.slide.run import LoadedModel, SlideOptions, postprocess_pool, segment_slide  # noqa: E402
from cellgap.slide.synthetic import StainThresholdNet, synthetic_slide, write_slide  # noqa: E402


class DemoCostNet(torch.nn.Module):
    """The demo network's forward pass (its cost), with StainThresholdNet's outputs (real cells)."""

    def __init__(self, num_classes: int = 2, encoder: str = DEMO_ENCODER, decoder: dict | None = None):
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.network = CellGapNet(encoder, num_classes=num_classes, encoder_weights=None, allow_random_encoder=True,
                                      decoder=DEMO_DECODER if decoder is None else decoder).eval()
        self.cells = StainThresholdNet(num_classes)

    def forward(self, x):
        self.network(x)
        return self.cells(x)


def peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM: its own, unlike ru_maxrss, which keeps a forking parent's from before exec)."""
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return round(int(status["VmHWM"].split()[0]) / 1024)


def reset_peak_rss() -> None:
    """Start VmHWM again from the current RSS (Linux ≥ 4.0), so each run reports its own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def cpu_name() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        info = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in lines if ":" in line)}
        return f"{info.get('Model name', platform.processor())}, {info.get('CPU(s)', '?')} CPUs"
    except OSError:
        return platform.processor()


def run(slide: Path, out: Path, model_mpp: float, options: SlideOptions, encoder: str = DEMO_ENCODER,
        decoder: dict | None = None) -> dict:
    meta = {"encoder": encoder, "class_names": ["class1", "class2"], "magnification": round(10 / model_mpp),
            "mpp": model_mpp, "min_cell_size": 20 if model_mpp >= 0.35 else 80, "encoder_weights_id": "random"}
    network = DemoCostNet(encoder=encoder, decoder=decoder).to(options.device)
    model = LoadedModel(network, meta, checkpoint="demo (random weights)", checkpoint_sha256="benchmark")
    pool = postprocess_pool(options.postprocess_workers)
    try:
        if pool is not None:  # start the pool's processes before the clock (a cohort pays it once)
            list(pool.map(abs, range(pool._max_workers)))
        reset_peak_rss()
        summary = segment_slide(slide, out, model, options, pool=pool)
        peak = peak_rss_mib()
        child_peak = max(pool.map(peak_rss_mib_of_worker, range(pool._max_workers))) if pool is not None else 0
    finally:
        if pool is not None:
            pool.shutdown()
    t = summary["timings"]
    tiles = t["tiles_run"]
    parts = {"read": t["read_s"], "network": t["network_s"], "postprocessing": t["postprocess_s"], "writing": t["write_s"]}
    total = sum(parts.values())
    per_tile = (t["network_s"] + t["postprocess_s"]) / tiles
    return {"model_mpp": model_mpp, "level": summary["processing"]["level"], "tiles": tiles, "cells": summary["cells"],
            "tissue_mm2": summary["tissue_mm2"], "wall_s": t["wall_s"], "s_per_mm2": summary["s_per_mm2"],
            "shares": {k: round(v / total, 3) for k, v in parts.items()},
            "network_s_per_tile": round(t["network_s"] / tiles, 3), "postprocess_s_per_tile": round(t["postprocess_s"] / tiles, 3),
            "streaming_efficiency": round(per_tile * tiles / t["wall_s"], 3),
            "peak_rss_mib": peak, "peak_child_rss_mib": child_peak}


def peak_rss_mib_of_worker(_: int) -> float:
    return peak_rss_mib()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=3072, help="level-0 side of the synthetic slide (0.25 µm/px)")
    parser.add_argument("--tissue", type=float, default=0.6, help="fraction of the slide covered by tissue")
    parser.add_argument("--mpp", type=float, nargs="+", default=[0.5, 0.25], help="model resolutions to run")
    parser.add_argument("--tile-size", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--postprocess-workers", type=int, default=None)
    parser.add_argument("--encoder", default=DEMO_ENCODER,
                        help="encoder (random weights: the cost of its forward pass), e.g. uni or convnext_b_22k on a GPU")
    parser.add_argument("--bundle-decoder", action="store_true", help="the bundles' full-width decoder instead of the demo's")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    results = {"machine": cpu_name() if args.device == "cpu" else torch.cuda.get_device_name(), "encoder": args.encoder, "date": time.strftime("%Y-%m-%d"), "torch_threads": torch.get_num_threads(),
               "slide": {"side": args.side, "level0_mpp": 0.25, "tissue": args.tissue}, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        slide = write_slide(Path(tmp) / "bench.ome.tif", synthetic_slide(args.side, args.side, seed=5, tissue=args.tissue),
                            0.25, kind="ome", levels=2)
        for mpp in args.mpp:
            options = SlideOptions(tile_size=args.tile_size, batch_size=args.batch_size, workers=args.workers,
                                   postprocess_workers=args.postprocess_workers, overwrite=True, device=args.device)
            decoder = BUNDLE_DEFAULT_DECODER if args.bundle_decoder else None
            results["runs"].append(run(slide, Path(tmp) / f"out_{mpp}", mpp, options, args.encoder, decoder))
            print(json.dumps(results["runs"][-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print("| model µm/px | level | tiles | cells | tissue mm² | s/mm² | read / network / post / write | net s/tile | post s/tile | streaming | peak RSS MiB (child) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results["runs"]:
        s = r["shares"]
        print(f"| {r['model_mpp']} | {r['level']} | {r['tiles']} | {r['cells']} | {r['tissue_mm2']:.2f} | {r['s_per_mm2']:.1f} | "
              f"{s['read']:.0%} / {s['network']:.0%} / {s['postprocessing']:.0%} / {s['writing']:.0%} | {r['network_s_per_tile']} | "
              f"{r['postprocess_s_per_tile']} | {r['streaming_efficiency']:.0%} | {r['peak_rss_mib']} ({r['peak_child_rss_mib']}) |")
    print(f"machine: {results['machine']}; encoder {args.encoder}; {results['date']}")


if __name__ == "__main__":
    main()
