"""Training throughput (tiles/s) and model FLOPs utilisation (MFU) of every bundle's training step.

    python scripts/benchmark_training.py                       # on a GPU: every registry encoder
    python scripts/benchmark_training.py --encoders vit_l16_21k,uni --steps 20
    python scripts/benchmark_training.py --device cpu --reduced --steps 2 --warmup 1 --tile 64 --threads 1 \
        --encoders convnext_atto,vit_l16_21k                      # CPU smoke test (its figures mean nothing)
    bash scripts/device_benchmark.sh                              # on a lent GPU machine: see its header

Each encoder's network, loss, optimizer, gradient clipping, AMP settings, batch preparation and training
transforms come from the bundle's own train.json (``cellgap.bundle.train_config``, the generator of the
committed configs) read by MONAI's ``ConfigParser``; the step is MONAI's ``SupervisedTrainer`` iteration that
the bundle runs (forward under bf16 autocast on CUDA, CISCALoss, backward through the GradScaler the trainer
makes when AMP is on, the bundle's gradient clipping, Adam/AMSGrad step).  Only these differ from a bundle
run: random encoder weights (pretrained weights cannot be downloaded on the GPU machine; the values of the
weights do not change the speed), C = 5 cell classes (PanNuke's; the synthetic tiles use 3 of them), the
batch size and the number of loader workers.

Per encoder:
- FLOPs of one training step per tile, counted with ``torch.utils.flop_counter.FlopCounterMode`` around one
  real trainer iteration (encoder forward + decoder forward + loss + decoder backward; the frozen encoder has
  no backward), checked against ``cellgap.network.network_cost`` (forward, meta device).
- "compute only": training steps on one batch kept on the device (real tiles and targets from the bundle's
  pipeline); the median step period after warm-up gives tiles/s, and
  MFU = training-step FLOPs per tile × tiles/s ÷ the card's bf16 matmul rate measured in the same run
  (8192³ ``torch.matmul``, median of timed repeats; on a CPU: float32, smaller, and said so).
- "with data": the same steps fed by the bundle's training pipeline (synthetic tiles on disk → LoadTiled →
  cisca_augmentations → CISCATargetsd → scaling) through its DataLoader with ``--workers`` worker processes
  and pinned memory; tiles/s = tiles ÷ wall-clock seconds over the timed steps.  GPU busy = compute-only
  step time ÷ with-data step time: the share of the with-data step the GPU spends on the step's own work
  (100 % = the pipeline costs nothing).  "data wait" is the share of the wall time the training loop
  spent waiting for the next batch (the trainer synchronises with the GPU every step, in GradScaler.step,
  so a wait of the loop is idle time of the GPU).
  With ``--photometric-on-device`` the bundle's ``photometric_on_device`` is on: the workers run only the
  spatial steps and the targets, and the photometric steps run on the batch inside the step (both phases).
- For ``vit_l16_21k``, a row "from embedding cache": the decoder-only step the bundle runs with
  ``cache_mode`` clean/views (``PrepareCachedCISCABatch``: ``network(image, features=...)``), fed with
  float16 encoder maps of the batch kept on the device (compute only).

Also recorded per encoder: whether the bundle's loss, built on the CPU as the config builds it, runs on the
device's outputs (``bundle_loss_on_device``; the benchmark then moves it to the device); that the step changed
the decoder and left the encoder alone, and the RMS size of the decoder's update per step (with AMP, a check
that the bundle's clipping handler sees unscaled gradients: scaled ones give updates ~1e-8 of normal); peak
GPU memory.

A Markdown table is printed last; the full record goes to ``--out`` (JSON, written atomically after every
encoder, so a run stopped by ``--time-budget`` or killed keeps what it measured).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
from ignite.engine import Events
from monai.bundle import ConfigParser
from monai.engines import SupervisedTrainer
from torch.utils.flop_counter import FlopCounterMode

from cellgap.atomic import write_json
from cellgap.bundle import train_config
from cellgap.cache import PrepareCachedCISCABatch
from cellgap.encoders import DEMO_ENCODER, ENCODERS, get_encoder_spec
from cellgap.network import network_cost
from cellgap.training import TARGET_KEYS, scaled_image

NUM_CLASSES = 5  # PanNuke's C
# The encoders the issue cares most about first, so that a time budget cuts the least important ones.
PRIORITY = ("vit_l16_21k", "uni", "virchow2", "dinov2_vitl14", "convnext_b_22k", "swinv2_b_22k", "vit_r50_hybrid_21k",
            "uni2_h", "prov_gigapath", "h_optimus_0")
CACHE_ROW_ENCODER = "vit_l16_21k"
TRAINER_ARGS = ("device", "network", "loss_function", "optimizer", "prepare_batch", "inferer", "amp", "amp_kwargs",
                "decollate")


def default_encoders() -> list[str]:
    rest = [k for k in ENCODERS if k not in PRIORITY and not ENCODERS[k].demo and k != DEMO_ENCODER]
    return [k for k in PRIORITY if k in ENCODERS] + rest


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoders", default=",".join(default_encoders()),
                   help="comma-separated registry keys, in the order to run (default: all but the CPU demo encoder, "
                        "most important first)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--batch-size", type=int, default=None, help="tiles per step (default: 32 on CUDA, 2 on CPU); "
                   "halved on CUDA out-of-memory")
    p.add_argument("--steps", type=int, default=20, help="timed compute-only steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--data-steps", type=int, default=None,
                   help="timed steps fed by the data pipeline (default: max(steps, 3 × workers), so that the timed "
                        "window spans several rounds of the workers)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader worker processes (default: CPU count)")
    p.add_argument("--tile", type=int, default=256, help="tile side (synthetic tiles and training crops)")
    p.add_argument("--tiles", type=int, default=32, help="synthetic tiles written to disk (the pipeline cycles through them)")
    p.add_argument("--reduced", action="store_true", help="tiny same-family encoders (CPU smoke test)")
    p.add_argument("--decoder", type=json.loads, default=None,
                   help="decoder arguments as JSON, replacing the bundle's (CPU smoke tests only; default: the bundle's)")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="cuDNN autotuner on, determinism off (NOT the bundle's setting, which is set_determinism's: "
                        "deterministic, no autotuner); to measure what determinism costs")
    p.add_argument("--photometric-on-device", action="store_true",
                   help="the bundle's photometric_on_device: stain, blur/noise, contrast and colour steps on the batch on "
                        "the device (in the step's time) instead of in the loader workers; no embedding-cache row")
    p.add_argument("--targets-on-device", action="store_true",
                   help="the bundle's targets_on_device: distance maps and weight mask computed on the batch on the device "
                        "(in the step's time) instead of in the loader workers; no embedding-cache row")
    p.add_argument("--no-cache-row", action="store_true", help="skip the ViT-L 'from embedding cache' row")
    p.add_argument("--matmul-size", type=int, default=None, help="side of the square matmul that measures the peak "
                   "rate (default: 8192 on CUDA, 1024 on CPU)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds: start no encoder (and no with-data phase) that would likely end after it; the table "
                        "covers what was measured")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the main process (default: torch's)")
    p.add_argument("--out", type=Path, default=Path("runs/benchmark_training.json"))
    p.add_argument("--workdir", type=Path, default=None, help="synthetic tiles and bundle root (default: a temporary folder)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Clocks


class Clock:
    """Marks on the device's timeline: CUDA events on a GPU (no synchronisation per mark), host time on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def seconds(self, start, end) -> float:
        return start.elapsed_time(end) / 1e3 if self.cuda else end - start


def matmul_rate(device: torch.device, size: int, repeats: int = 20, warmup: int = 5) -> dict:
    """The card's dense matmul rate: bf16 on CUDA, float32 on a CPU (median of timed repeats, random data)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    out = torch.empty(size, size, device=device, dtype=dtype)
    clock = Clock(device)
    if device.type == "cpu":
        repeats, warmup = 5, 1
    for _ in range(warmup):
        torch.matmul(a, b, out=out)
    marks = []
    for _ in range(repeats):
        start = clock.mark()
        torch.matmul(a, b, out=out)
        marks.append((start, clock.mark()))
    clock.sync()
    seconds = statistics.median(clock.seconds(s, e) for s, e in marks)
    del a, b, out
    return {"tflops": 2 * size**3 / seconds / 1e12, "dtype": str(dtype).replace("torch.", ""), "size": size,
            "median_ms": seconds * 1e3, "repeats": repeats,
            "note": "bf16 torch.matmul, random data" if device.type == "cuda" else
                    "CPU: float32 torch.matmul (no bf16 matrix unit); MFU is relative to this rate"}


# ----------------------------------------------------------------------------------------------
# The bundle's components


def bundle_parser(key: str, args: argparse.Namespace, device: torch.device, workdir: Path, batch: int, workers: int,
                  repeats: int) -> ConfigParser:
    """The bundle's train.json for ``key`` with the benchmark's overrides (random weights, C = 5, batch, workers)."""
    parser = ConfigParser(train_config(get_encoder_spec(key)))
    parser.update({
        "bundle_root": str(workdir / "bundle"),
        "device": f"$torch.device('{device}')",
        "amp": device.type == "cuda",
        "encoder_weights": "none",
        "allow_random_encoder": True,
        "reduced_encoder": bool(args.reduced),
        "photometric_on_device": bool(args.photometric_on_device),
        "targets_on_device": bool(args.targets_on_device),
        "tile_size": args.tile,
        "dataset_dir": str(workdir / "synthetic"),
        "synthetic": {"n_train": args.tiles, "n_val": 0, "n_test": 0, "seed": 0, "magnification": 40, "size": args.tile,
                      "progress": False},
        "num_classes": NUM_CLASSES,
        **({"decoder": args.decoder} if args.decoder is not None else {}),
        "embedding_cache": None,  # what cache_mode "off" gives; spares the loader's parse a CPU build of the network
        "batch_size": batch,
        "num_workers": workers,
        # the 32 tiles on disk, cycled: one pass of the loader covers the warm-up and the timed steps
        "train#datalist": f"$@data.datalist(@train_split) * {repeats}",
    })
    return parser


def clipping_handler_id(parser: ConfigParser) -> str:
    for i, handler in enumerate(parser["train"]["handlers"]):
        if str(handler.get("_target_", "")).endswith("GradientClipping"):
            return f"train#handlers#{i}"
    raise KeyError("the bundle's train#handlers hold no GradientClipping handler")


def make_trainer(parts: dict, data, steps: int, prepare_batch=None) -> SupervisedTrainer:
    """The bundle's SupervisedTrainer (same network, loss, optimizer, AMP, batch preparation and clipping) over
    ``data`` for ``steps`` iterations."""
    kwargs = {k: parts[k] for k in TRAINER_ARGS}
    if prepare_batch is not None:
        kwargs["prepare_batch"] = prepare_batch
    return SupervisedTrainer(max_epochs=1, epoch_length=steps, train_data_loader=data, train_handlers=[parts["clipping"]],
                             **kwargs)


def timed_run(trainer: SupervisedTrainer, warmup: int, clock: Clock) -> dict:
    """Run the trainer; per-step times and the wall clock over the steps after ``warmup``."""
    starts, ends, waits, marks = [], [], [], {}

    def get_batch_started(engine):
        marks["get"] = time.perf_counter()

    def get_batch_completed(engine):
        if engine.state.iteration >= warmup:  # fetching batch iteration + 1
            waits.append(time.perf_counter() - marks["get"])

    def warm(engine):
        if engine.state.iteration == warmup:
            clock.sync()
            marks["wall"] = time.perf_counter()

    trainer.add_event_handler(Events.GET_BATCH_STARTED, get_batch_started)
    trainer.add_event_handler(Events.GET_BATCH_COMPLETED, get_batch_completed)
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: starts.append(clock.mark()))
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: ends.append(clock.mark()))
    trainer.add_event_handler(Events.ITERATION_COMPLETED, warm)
    if warmup == 0:
        clock.sync()
        marks["wall"] = time.perf_counter()
    trainer.run()
    clock.sync()
    wall = time.perf_counter() - marks["wall"]
    steps = [clock.seconds(s, e) for s, e in zip(starts[warmup:], ends[warmup:])]
    periods = [clock.seconds(starts[i], starts[i + 1]) for i in range(warmup, len(starts) - 1)]
    timed = len(starts) - warmup
    return {"steps": timed, "step_s_median": statistics.median(steps), "period_s_median": statistics.median(periods or steps),
            "wall_s": wall, "wall_s_per_step": wall / timed, "data_wait_s": sum(waits),
            "loss": float(trainer.state.output["loss"].detach().float().item())}


def count_flops(parts: dict, batch: dict, prepare_batch=None) -> dict:
    """GFLOPs per tile: one trainer iteration (the training step) and the forward pass alone (encoder part too)."""
    b = batch["image"].shape[0]
    network = parts["network"]
    with FlopCounterMode(display=False) as counter:
        make_trainer(parts, [batch], 1, prepare_batch).run()
    step = counter.get_total_flops()
    inputs = (prepare_batch or parts["prepare_batch"])(batch, parts["device"])
    image, kwargs = inputs[0], (inputs[3] if len(inputs) == 4 else {})
    with FlopCounterMode(display=False) as counter, torch.no_grad(), \
            torch.autocast("cuda", **parts["amp_kwargs"], enabled=bool(parts["amp"])):
        network(image, **kwargs)
    forward = counter.get_total_flops()
    encoder = sum(counter.get_flop_counts().get(f"{type(network).__name__}.encoder", {}).values())
    return {"train_step": step / b / 1e9, "forward": forward / b / 1e9, "encoder_forward": encoder / b / 1e9,
            "decoder_forward": (forward - encoder) / b / 1e9, "decoder_backward_and_loss": (step - forward) / b / 1e9}


def loss_device_check(parts: dict, batch: dict) -> str:
    """Does the bundle's loss, built as the config builds it (on the CPU), run on the device's outputs?"""
    loss = parts["loss_function"]
    device = parts["device"]
    if all(t.device == device for t in loss.buffers()) or device.type == "cpu":
        return "ok"
    image, targets = parts["prepare_batch"](batch, device)[:2]
    try:
        with torch.no_grad(), torch.autocast("cuda", **parts["amp_kwargs"], enabled=bool(parts["amp"])):
            loss(parts["network"](image), targets)
        return "ok"
    except RuntimeError as e:
        return f"FAILS: {str(e).splitlines()[0]} (loss buffers on {sorted({str(t.device) for t in loss.buffers()})}); " \
               f"the benchmark moves the loss to {device}"


def snapshot(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def changes(before: list[torch.Tensor], module: torch.nn.Module) -> tuple[bool, float]:
    """(any parameter changed, RMS of the change over all elements)."""
    diffs = [(p.detach().float() - b.float()) for b, p in zip(before, module.parameters())]
    total = sum(d.numel() for d in diffs)
    rms = math.sqrt(sum(float((d**2).sum()) for d in diffs) / max(total, 1))
    return any(bool((d != 0).any()) for d in diffs), rms


def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# One encoder


def compute_only(parts: dict, batch: dict, args, clock: Clock, prepare_batch=None) -> dict:
    network = parts["network"]
    before_dec, before_enc = snapshot(network.decoder), snapshot(network.encoder)
    steps = args.warmup + args.steps
    result = timed_run(make_trainer(parts, [batch] * steps, steps, prepare_batch), args.warmup, clock)
    changed, rms = changes(before_dec, network.decoder)
    enc_changed, _ = changes(before_enc, network.encoder)
    b = batch["image"].shape[0]
    result.update(tiles_per_s=b / result["period_s_median"], tiles_per_s_wall=b / result["wall_s_per_step"],
                  decoder_changed=changed, decoder_update_rms_per_step=rms / steps, encoder_unchanged=not enc_changed)
    return result


def device_batch(batch: dict, size: int, device: torch.device) -> dict:
    return {k: v[:size].to(device) for k, v in batch.items()}


def bench_encoder(key: str, args, device: torch.device, workdir: Path, cpu_batch: dict, clock: Clock, rate: dict,
                  deadline: float | None, workers: int, repeats: int) -> list[dict]:
    started = time.perf_counter()
    batch_size = cpu_batch["image"].shape[0]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    parser = bundle_parser(key, args, device, workdir, batch_size, workers, repeats)
    with warnings.catch_warnings(), torch.device(device):
        warnings.filterwarnings("ignore", message=".*RANDOMLY INITIALISED.*")
        network = parser.get_parsed_content("network")  # built on the device: fast random init of large encoders
        parser.get_parsed_content("initialize")  # set_determinism, set_track_meta(False), (cache fill: off)
    if args.cudnn_benchmark:  # not the bundle's setting: set_determinism turns cuDNN's autotuner off
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True
    parts = {k: parser.get_parsed_content(f"train#trainer#{k}") for k in TRAINER_ARGS}
    parts["clipping"] = parser.get_parsed_content(clipping_handler_id(parser))
    assert parts["network"] is network and parts["optimizer"].param_groups[0]["params"][0] is next(network.decoder.parameters())
    row = {"encoder": key, "source": "on the fly", "display_name": network.encoder.spec.display_name,
           "random_encoder_weights": network.encoder.random_weights, "reduced": bool(args.reduced),
           "encoder_params_m": sum(p.numel() for p in network.encoder.parameters()) / 1e6,
           "decoder_params_m": sum(p.numel() for p in network.decoder.parameters()) / 1e6,
           "build_s": time.perf_counter() - started}
    small = device_batch(cpu_batch, min(2, batch_size), device)
    row["bundle_loss_on_device"] = loss_device_check(parts, small)
    parts["loss_function"].to(device)
    row["gflops"] = count_flops(parts, small)
    cost = network_cost(key, NUM_CLASSES, decoder=parser.get_parsed_content("decoder"), reduced=bool(args.reduced),
                        tile=args.tile)
    row["gflops"]["network_cost_forward"] = cost["gflops"]
    row["gflops"]["forward_vs_network_cost"] = row["gflops"]["forward"] / cost["gflops"] - 1

    # compute only, halving the batch on CUDA out-of-memory
    b = batch_size
    while True:
        try:
            batch = device_batch(cpu_batch, b, device)
            row["compute_only"] = compute_only(parts, batch, args, clock)
            break
        except torch.OutOfMemoryError:
            if b == 1:
                raise
        # out of the except block, so that the failed step's tensors (held by the traceback) can be freed
        batch = None
        parts["optimizer"].zero_grad(set_to_none=True)
        free_device_memory()
        print(f"  {key}: out of memory at batch {b}; halving", flush=True)
        b //= 2
    row["batch"] = b
    row["mfu"] = row["gflops"]["train_step"] * 1e9 * row["compute_only"]["tiles_per_s"] / (rate["tflops"] * 1e12)
    row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    rows = [row]

    # the same steps fed by the bundle's data pipeline
    compute_s = time.perf_counter() - started - row["build_s"]
    if deadline is not None and time.perf_counter() + 2 * compute_s + 10 > deadline:
        row["with_data"] = {"skipped": "time budget"}
    else:
        try:
            row["with_data"] = with_data(parts, key, args, device, workdir, b, workers, repeats, clock)
            row["gpu_busy"] = row["compute_only"]["period_s_median"] / row["with_data"]["wall_s_per_step"]
            row["mfu_with_data"] = row["mfu"] * row["with_data"]["tiles_per_s"] / row["compute_only"]["tiles_per_s"]
        except Exception as e:  # keep the compute-only numbers
            row["with_data"] = {"error": failure(key + " with data", e)}
            free_device_memory()

    # no cache row with the photometric steps on the device: the bundle refuses that pair (cache_mode must be off)
    if key == CACHE_ROW_ENCODER and not args.no_cache_row and not args.photometric_on_device and not args.targets_on_device:
        try:
            rows.append(cache_row(parts, batch, args, clock, rate))
        except Exception as e:
            failure(key + " from embedding cache", e)
            free_device_memory()
    row["seconds"] = time.perf_counter() - started
    del batch, small, parts, network, parser
    free_device_memory()
    return rows


def with_data(parts: dict, key: str, args, device: torch.device, workdir: Path, b: int, workers: int, repeats: int,
              clock: Clock) -> dict:
    """The compute-only steps again, fed by the bundle's DataLoader (batch ``b``, ``workers`` processes, pinned memory)."""
    data_warmup = args.warmup + 2 * workers  # the batches the workers prefetch (prefetch_factor 2) are used up first
    data_steps = args.data_steps or max(args.steps, 3 * workers)
    loader = bundle_parser(key, args, device, workdir, b, workers, repeats).get_parsed_content("train#dataloader")
    needed = data_warmup + data_steps
    if len(loader) < needed:
        raise RuntimeError(f"data loader has {len(loader)} batches, {needed} needed")
    result = timed_run(make_trainer(parts, loader, needed), data_warmup, clock)
    result.update(tiles_per_s=b / result["wall_s_per_step"], warmup_steps=data_warmup,
                  data_wait_share=result["data_wait_s"] / result["wall_s"])
    return result


def failure(what: str, error: BaseException) -> str:
    """Print the traceback (the log is all a one-call GPU session brings back) and return a one-line reason."""
    print(f"{what}: FAILED\n{traceback.format_exc()}", flush=True)
    return f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"


def cache_row(parts: dict, batch: dict, args, clock: Clock, rate: dict) -> dict:
    """The bundle's decoder-only step from the embedding cache (float16 maps, as cache_dtype), kept on the device."""
    network = parts["network"]
    b = batch["image"].shape[0]
    with torch.no_grad():
        features = [f.to(torch.float16) for f in network.forward_features(scaled_image(batch["image"]))]
    cached = {**batch, "features": features, "features_ok": torch.ones(b, dtype=torch.bool)}
    prepare = PrepareCachedCISCABatch(encoder=network.encoder)  # what train_prepare_batch is with cache_mode on
    calls = []
    hook = network.encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        row = {"encoder": CACHE_ROW_ENCODER, "source": "embedding cache", "batch": b,
               "gflops": count_flops(parts, {k: (v[:2] if k != "features" else [f[:2] for f in v]) for k, v in cached.items()},
                                     prepare)}
        calls.clear()
        row["compute_only"] = compute_only(parts, cached, args, clock, prepare)
    finally:
        hook.remove()
    row["encoder_calls"] = len(calls)
    row["mfu"] = row["gflops"]["train_step"] * 1e9 * row["compute_only"]["tiles_per_s"] / (rate["tflops"] * 1e12)
    row["with_data"] = {"skipped": "not measured: compute only (the from-cache pipeline reads float16 maps from a "
                                   "memory map on top of the tile pipeline)"}
    return row


# ----------------------------------------------------------------------------------------------
# Report


def environment(device: torch.device, workers: int) -> dict:
    import monai
    import timm

    env = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "timm": timm.__version__,
           "monai": monai.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
           "device": str(device), "workers": workers}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(card=torch.cuda.get_device_name(device), memory_gib=props.total_memory / 2**30,
                   multiprocessors=props.multi_processor_count, cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())
    else:
        env["card"] = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads)"
    return env


def fmt(value, spec: str, scale: float = 1.0) -> str:
    return "—" if value is None else format(scale * value, spec)


def table(record: dict) -> str:
    env, rate = record["environment"], record["matmul"]
    lines = [f"# {env['card']}; {env['date']}; torch {env['torch']}, timm {env['timm']}, MONAI {env['monai']}; "
             f"matmul {rate['tflops']:.3g} TFLOP/s ({rate['dtype']}, {rate['size']}³)",
             f"# RANDOM encoder weights (speed does not depend on them)"
             f"{'; REDUCED encoders (smoke test)' if record['settings']['reduced'] else ''}"
             f"{'; decoder NOT the bundle one: ' + json.dumps(record['settings']['decoder_override']) if record['settings']['decoder_override'] else ''}; "
             f"tile {record['settings']['tile']}², C = {NUM_CLASSES}; {record['settings']['steps']} timed steps after "
             f"{record['settings']['warmup']}; {env['workers']} loader workers; photometric steps "
             f"{'on the device' if record['settings'].get('photometric_on_device') else 'in the loader workers'}; distance maps "
             f"and weight mask {'on the device' if record['settings'].get('targets_on_device') else 'in the loader workers'}; cuDNN deterministic "
             f"{record['settings'].get('cudnn_deterministic')}, autotuner {record['settings'].get('cudnn_benchmark')}",
             "",
             "| encoder | batch | train-step GFLOP/tile | tiles/s compute-only | MFU % | tiles/s with data | GPU busy % "
             "| data wait % |",
             "|---|---|---|---|---|---|---|---|"]
    for row in record["rows"]:
        name = row["encoder"] + (" (from embedding cache)" if row["source"] == "embedding cache" else "")
        data = row.get("with_data", {})
        lines.append(f"| {name} | {row['batch']} | {row['gflops']['train_step']:.1f} | "
                     f"{row['compute_only']['tiles_per_s']:.1f} | {100 * row['mfu']:.1f} | "
                     f"{fmt(data.get('tiles_per_s'), '.1f')} | {fmt(row.get('gpu_busy'), '.0f', 100)} | "
                     f"{fmt(data.get('data_wait_share'), '.0f', 100)} |")
    for skip in record["skipped"]:
        lines.append(f"| {skip['encoder']} | skipped: {skip['reason']} | | | | | | |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    args = parse_args(argv)
    t0 = time.perf_counter()
    deadline = t0 + args.time_budget if args.time_budget else None
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
        device = torch.device("cuda", torch.cuda.current_device())
    if args.threads:
        torch.set_num_threads(args.threads)
    encoders = [k.strip() for k in args.encoders.split(",") if k.strip()]
    for key in encoders:
        get_encoder_spec(key)  # unknown keys fail now, not after minutes of work
    workers = os.cpu_count() if args.workers is None else args.workers
    batch_size = args.batch_size or (32 if device.type == "cuda" else 2)
    clock = Clock(device)

    env = environment(device, workers)
    print(f"# {env['card']}, torch {env['torch']}; encoders: {', '.join(encoders)}; RANDOM encoder weights", flush=True)
    rate = matmul_rate(device, args.matmul_size or (8192 if device.type == "cuda" else 1024))
    print(f"matmul: {rate['tflops']:.3g} TFLOP/s ({rate['dtype']}, {rate['size']}³)", flush=True)

    data_warmup = args.warmup + 2 * workers
    data_steps = args.data_steps or max(args.steps, 3 * workers)
    repeats = math.ceil((data_warmup + data_steps) * batch_size / args.tiles) + 1
    record = {"benchmark": "training step throughput and MFU (scripts/benchmark_training.py)", "environment": env,
              "matmul": rate, "rows": [], "skipped": [], "complete": False,
              "settings": {"encoders": encoders, "batch_size": batch_size, "steps": args.steps, "warmup": args.warmup,
                           "data_steps": data_steps, "data_warmup": data_warmup, "tile": args.tile, "tiles_on_disk": args.tiles,
                           "num_classes": NUM_CLASSES, "reduced": bool(args.reduced), "decoder_override": args.decoder,
                           "photometric_on_device": bool(args.photometric_on_device),
                           "targets_on_device": bool(args.targets_on_device), "random_encoder_weights": True,
                           "time_budget_s": args.time_budget,
                           "bundle_defaults": {k: train_config(get_encoder_spec(encoders[0]))[k]
                                               for k in ("batch_size", "num_workers", "learning_rate", "grad_clip_norm")}}}

    with tempfile.TemporaryDirectory(prefix="cellgap_train_bench_") as tmp:
        workdir = args.workdir or Path(tmp)
        # One batch of the bundle's training pipeline, reused (sliced) by every encoder's compute-only steps.
        loader = bundle_parser(encoders[0], args, device, workdir, batch_size, workers, repeats).get_parsed_content(
            "train#dataloader")
        cpu_batch = {k: torch.as_tensor(v) for k, v in next(iter(loader)).items() if k in ("image", "label", *TARGET_KEYS)}
        del loader
        print(f"data ready after {time.perf_counter() - t0:.1f} s", flush=True)
        durations = []
        for i, key in enumerate(encoders):
            now = time.perf_counter()
            if deadline is not None and durations and now + 1.5 * max(durations) > deadline:
                record["skipped"].append({"encoder": key, "reason": "time budget"})
                print(f"{key}: skipped (time budget)", flush=True)
                continue
            try:
                rows = bench_encoder(key, args, device, workdir, cpu_batch, clock, rate, deadline, workers, repeats)
            except KeyboardInterrupt:  # `timeout --signal=INT`: keep what was measured and print the table
                record["skipped"] += [{"encoder": k, "reason": "interrupted"} for k in encoders[i:]]
                print("interrupted: reporting what was measured", flush=True)
                break
            except Exception as e:  # one encoder failing must not lose the others' numbers
                record["skipped"].append({"encoder": key, "reason": failure(key, e)})
                free_device_memory()
                continue
            durations.append(time.perf_counter() - now)
            record["rows"] += rows
            record["settings"].update(cudnn_deterministic=torch.backends.cudnn.deterministic,
                                      cudnn_benchmark=torch.backends.cudnn.benchmark)
            for row in rows:
                co = row["compute_only"]
                print(f"{row['encoder']} ({row['source']}): batch {row['batch']}, {row['gflops']['train_step']:.1f} GFLOP/tile, "
                      f"{co['tiles_per_s']:.1f} tiles/s compute-only, MFU {100 * row['mfu']:.1f} %"
                      + (f", {row['with_data']['tiles_per_s']:.1f} tiles/s with data" if "tiles_per_s" in row.get("with_data", {}) else "")
                      + f"; loss {co['loss']:.3f}", flush=True)
            record["elapsed_s"] = time.perf_counter() - t0
            write_json(args.out, record)
    record["complete"] = not record["skipped"]
    record["elapsed_s"] = time.perf_counter() - t0
    record["table"] = table(record)
    write_json(args.out, record)
    print(f"\nwritten {args.out} after {record['elapsed_s']:.0f} s\n")
    print(record["table"], flush=True)
    return record


if __name__ == "__main__":
    main(sys.argv[1:])
