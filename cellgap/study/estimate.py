"""A plan before the bill (``--dry-run``): per run and in total, the training steps, the FLOPs of a training step, the
GPU hours at a given throughput, and the disk the embedding cache would take; nothing runs, nothing is written."""

from __future__ import annotations

import math
import sys
from functools import cache
from pathlib import Path

from ..network import COST_TILE, network_cost
from .bundles import bundle_defaults, bundle_root
from .grid import select_runs
from .plan import StudyPlan

# Tiles/s of a bundle's training step with data on one H100 80GB HBM3 (docs/benchmarks.md, "Training throughput (GPU)",
# runs 1–2 of 2026-11-28, batch 32, 256² tiles, full decoder).
H100_TILES_PER_SECOND = {"vit_l16_21k": 272.9, "uni": 255.2, "virchow2": 207.6, "dinov2_vitl14": 249.4,
                         "convnext_b_22k": 276.2, "swinv2_b_22k": 200.8, "vit_r50_hybrid_21k": 241.2, "uni2_h": 243.8,
                         "prov_gigapath": 199.7, "h_optimus_0": 197.4}
CACHE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


def throughput_table(items: list[str] | None) -> dict[str, float]:
    """``--tiles-per-second`` values (``N`` for every encoder, ``ENCODER=N`` for one) over the H100 defaults."""
    table = dict(H100_TILES_PER_SECOND)
    for item in items or []:
        key, sep, value = str(item).rpartition("=")
        try:
            rate = float(value)
        except ValueError:
            rate = float("nan")
        if not math.isfinite(rate) or rate <= 0:
            raise ValueError(f"--tiles-per-second {item!r}: expected a positive number of tiles/s, as N or ENCODER=N")
        if sep:
            table[key.strip()] = rate
        else:
            table = {k: rate for k in table} | {"*": rate}
    return table


@cache
def _encoder_cost(encoder: str, num_classes: int, decoder_json: str, reduced: bool) -> dict:
    import json

    return network_cost(encoder, num_classes, json.loads(decoder_json), reduced)


@cache
def _feature_elements(encoder: str, reduced: bool, side: int) -> int:
    """Values of the four cached feature maps of one ``side``² tile (encoder built on the meta device)."""
    import warnings

    import torch

    from ..encoders import FrozenEncoder

    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        enc = FrozenEncoder(encoder, weights=None, allow_random=True, reduced=reduced)
    return sum(c * math.ceil(side / r) ** 2 for c, r in zip(enc.channels, enc.reductions))


def _split_sizes(plan: StudyPlan, split, settings: dict) -> tuple[dict[str, int], list[str]]:
    """Tiles of train/val/test of a split, and the dataset's class names."""
    if plan.dataset == "synthetic":
        synthetic = settings.get("synthetic") or {}
        return {s: int(synthetic.get(f"n_{s}", 0)) for s in ("train", "val", "test")}, ["tumour", "lymphocyte", "stromal"]
    from ..data import registry
    from ..data.prepared import datalist, read_dataset_info

    info = read_dataset_info(plan.dataset_dir)
    column = registry.protocol_of(info, split.protocol)["column"]
    return {s: len(datalist(plan.dataset_dir, s, column)) for s in ("train", "val", "test")}, list(info.class_names)


def estimate(plan: StudyPlan, study_dir: Path, tiles_per_second: list[str] | None = None,
             only: list[str] | None = None) -> dict:
    """Per run: tiles, steps, GFLOPs per step, GPU hours, cache bytes; and the totals."""
    from .grid import grid_runs

    rates = throughput_table(tiles_per_second)
    rows = []
    for run in select_runs(grid_runs(study_dir, plan), only):
        defaults = bundle_defaults(bundle_root(run.encoder, plan, study_dir))
        settings = {**defaults, **plan.overrides}
        if plan.dataset == "synthetic":
            settings["synthetic"] = {**(defaults.get("synthetic") or {}), **(plan.overrides.get("synthetic") or {})}
        sizes, class_names = _split_sizes(plan, run.split, settings)
        batch = int(settings.get("batch_size") or 4)
        epochs = int(settings.get("epochs") or 1)
        per_epoch = int(settings.get("epoch_length") or math.ceil(sizes["train"] / batch))
        steps = epochs * per_epoch
        side = int(settings.get("train_crop_size") if isinstance(settings.get("train_crop_size"), int)
                   else settings.get("tile_size") or COST_TILE)
        reduced = bool(settings.get("reduced_encoder", False))
        decoder = settings.get("decoder") if isinstance(settings.get("decoder"), dict) else None
        import json

        cost = _encoder_cost(run.encoder, len(class_names), json.dumps(decoder, sort_keys=True), reduced)
        scale = (side / COST_TILE) ** 2  # FLOPs grow with the pixels (convolutions, and ViT tokens to first order)
        forward = cost["gflops"] * scale
        # A training step: the frozen encoder forward, the decoder forward and its backward (≈ twice the forward).
        step_gflops = batch * (cost["encoder_gflops"] + 3 * (cost["gflops"] - cost["encoder_gflops"])) * scale
        interval = int(settings.get("val_interval") or 1)
        eval_tiles = sizes["val"] * math.ceil(epochs / interval) + sizes["val"] + sizes["test"]  # val epochs, select, test
        given = any(str(i).partition("=")[0].strip() in (run.encoder,) or "=" not in str(i) for i in tiles_per_second or [])
        if run.encoder in rates or "*" in rates:
            rate = rates.get(run.encoder, rates.get("*"))
            rate_note = "given" if given else "H100 (docs/benchmarks.md)"
        else:
            rate, rate_note = min(H100_TILES_PER_SECOND.values()), "slowest H100 figure (none for this encoder)"
        hours = (steps * batch + eval_tiles) / rate / 3600
        mode = settings.get("cache_mode", "off")
        views = 1 if mode in ("off", "clean") else int(settings.get("cache_views") or 1)
        per_row = _feature_elements(run.encoder, reduced, side) * CACHE_BYTES.get(settings.get("cache_dtype", "float16"), 2)
        rows.append({"run": run.id, "encoder": run.encoder, "split": run.split.name, "train_tiles": sizes["train"],
                     "val_tiles": sizes["val"], "test_tiles": sizes["test"], "batch_size": batch, "epochs": epochs,
                     "steps": steps, "forward_gflops_per_tile": forward, "train_gflops_per_step": step_gflops,
                     "tiles_per_second": rate, "throughput": rate_note, "gpu_hours": hours, "cache_mode": mode,
                     "cache_bytes": sizes["train"] * views * per_row if mode != "off" else 0,
                     "cache_bytes_if_clean": sizes["train"] * per_row})
    total = {"runs": len(rows), "steps": sum(r["steps"] for r in rows), "gpu_hours": sum(r["gpu_hours"] for r in rows),
             "cache_bytes": sum(r["cache_bytes"] for r in rows),
             "cache_bytes_if_clean": sum(r["cache_bytes_if_clean"] for r in rows)}
    return {"runs": rows, "total": total}


def print_estimate(plan: StudyPlan, study_dir: Path, tiles_per_second: list[str] | None = None,
                   only: list[str] | None = None, out=None) -> dict:
    """``--dry-run``'s table."""
    out = out or sys.stdout
    result = estimate(plan, Path(study_dir), tiles_per_second, only)
    header = ("run", "steps", "GFLOP/step", "tiles/s", "GPU h", "cache GB")
    lines = [header]
    for r in result["runs"]:
        cache_text = f"{r['cache_bytes'] / 1e9:.2f}" if r["cache_mode"] != "off" else f"off ({r['cache_bytes_if_clean'] / 1e9:.2f} if clean)"
        lines.append((r["run"], str(r["steps"]), f"{r['train_gflops_per_step']:.1f}", f"{r['tiles_per_second']:g}",
                      f"{r['gpu_hours']:.2f}", cache_text))
    t = result["total"]
    lines.append(("total", str(t["steps"]), "", "", f"{t['gpu_hours']:.2f}",
                  f"{t['cache_bytes'] / 1e9:.2f}" + (f" ({t['cache_bytes_if_clean'] / 1e9:.2f} if clean)" if not t["cache_bytes"] else "")))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip(), file=out)
    for r in result["runs"]:
        if r["throughput"].startswith("slowest"):
            print(f"# {r['run']}: no H100 figure for {r['encoder']}; the slowest one ({r['tiles_per_second']:g} tiles/s) "
                  f"is used: pass --tiles-per-second {r['encoder']}=N", file=out)
    print("\n# steps: epochs × iterations per epoch (an upper bound: early stopping may end sooner); GFLOP/step: batch × "
          "(encoder forward + 3 × decoder forward) at the training crop, from network_cost; GPU h: training tiles plus "
          "one validation pass per val_interval, the selection pass and the test pass, all at the training throughput; "
          "tiles/s: --tiles-per-second, else the H100 figures of docs/benchmarks.md; cache: the four feature maps "
          "of every training tile (× views) in the bundle's cache_dtype.", file=out)
    return result
