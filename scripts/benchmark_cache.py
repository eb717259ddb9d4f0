"""Decoder epoch time from the embedding cache against on-the-fly encoder features, for ViT-L/16.

    python scripts/benchmark_cache.py --size 128 --tiles 8 --epochs 2 --threads 1
    python scripts/benchmark_cache.py --disk-table          # cache bytes per tile for every registry encoder

The encoder is the registry's ViT-L/16 at full depth and width (24 blocks, 1024 channels) with random
weights (speed does not depend on the weight values), built for ``--size``² tiles.  Samples (image and
CISCA targets of synthetic tiles) are prepared once and kept in memory, so an epoch measures what the
cache changes: the encoder forward pass (on the fly) against reading and checking the cached maps, plus
the decoder's forward and backward pass and the optimizer step, through a MONAI ``SupervisedTrainer``.

For each decoder (the bundles' default widths and a light one) it reports wall and CPU seconds per
epoch (median over the timed epochs, after a warm-up epoch), the speed-up, and FLOPs counted with
``torch.utils.flop_counter.FlopCounterMode``: the encoder's forward pass and the decoder's training step
per tile.  (encoder + decoder) / decoder FLOPs bounds the speed-up the cache can give.  It also reports
how far the loss computed from a float16 cache lies from the float32 on-the-fly loss.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch
from ignite.engine import Events
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedTrainer
from monai.transforms import Compose, SelectItemsd
from torch.utils.flop_counter import FlopCounterMode

from cellgap.bundle import train_config
from cellgap.cache import CachedFeaturesd, EmbeddingCache, PrepareCachedCISCABatch, ViewSpec, bytes_per_row, fill_cache
from cellgap.data.augmentation import ClipIntensityd
from cellgap.data.loading import LoadTiled
from cellgap.data.prepared import datalist
from cellgap.data.synthetic import prepare_synthetic
from cellgap.decoder import CISCADecoder
from cellgap.encoders import ENCODERS, FrozenEncoder, get_encoder_spec
from cellgap.losses import CISCALoss
from cellgap.network import CellGapNet
from cellgap.targets import CISCATargetsd
from cellgap.training import TARGET_KEYS

NUM_CLASSES = 3  # the synthetic dataset's classes
DEFAULT_DECODER = train_config(get_encoder_spec("vit_l16_21k"))["decoder"]  # the bundles' decoder widths
LIGHT_DECODER = {"widths": [16, 16, 32, 64, 128, 256], "head_features": 32, "head_width": 16, "norm": None}
LIGHTER_DECODER = {"widths": [8, 8, 16, 32, 64, 128], "head_features": 16, "head_width": 8, "norm": None}


def vit_l(size: int):
    spec = get_encoder_spec("vit_l16_21k")
    return replace(spec, kwargs={**spec.kwargs, "img_size": size})  # fixed position embeddings: build for the tile


def build_samples(root: Path, tiles: int, size: int) -> list[dict]:
    data = datalist(prepare_synthetic(root, n_train=tiles, n_val=0, n_test=0, size=size, progress=False), "train")
    spec = ViewSpec("clean", augmentation={"crop_size": size})
    pipeline = Compose([LoadTiled(num_classes=NUM_CLASSES), spec.augmentation_transform(),
                        CISCATargetsd(magnification=40, num_classes=NUM_CLASSES),
                        ClipIntensityd("image", 0.0, 255.0, dtype="uint8"),
                        SelectItemsd(["id", "view", "image", *TARGET_KEYS])])
    return data, [pipeline(item) for item in data]


def epoch_times(net: CellGapNet, samples: list[dict], cache: EmbeddingCache | None, batch_size: int, epochs: int) -> dict:
    """Median wall and CPU seconds per epoch (after one warm-up epoch) and the encoder calls per epoch."""
    transform = CachedFeaturesd(cache) if cache is not None else None
    loader = DataLoader(Dataset(samples, transform), batch_size=batch_size, shuffle=False, num_workers=0)
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=epochs + 1, train_data_loader=loader, network=net,
                                optimizer=torch.optim.Adam(net.decoder.parameters(), lr=1e-4),
                                loss_function=CISCALoss(num_classes=NUM_CLASSES),
                                prepare_batch=PrepareCachedCISCABatch(encoder=net.encoder), decollate=False)
    marks, walls, cpus = {}, [], []
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: marks.update(wall=time.perf_counter(), cpu=time.process_time()))

    def stop(engine):
        walls.append(time.perf_counter() - marks["wall"])
        cpus.append(time.process_time() - marks["cpu"])

    trainer.add_event_handler(Events.EPOCH_COMPLETED, stop)
    calls = []
    hook = net.encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        trainer.run()
    finally:
        hook.remove()
    return {"wall": statistics.median(walls[1:]), "cpu": statistics.median(cpus[1:]), "walls": walls[1:],
            "encoder_calls_per_epoch": len(calls) / (epochs + 1)}


def flops(net: CellGapNet, sample: dict) -> tuple[float, float]:
    """GFLOPs per tile: encoder forward, decoder training step (forward + loss + backward)."""
    image = sample["image"].as_tensor()[None] if hasattr(sample["image"], "as_tensor") else sample["image"][None]
    targets = {k: torch.as_tensor(sample[k])[None] for k in TARGET_KEYS}
    with FlopCounterMode(display=False) as counter:
        features = net.encoder(image)
    encoder = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        CISCALoss(num_classes=NUM_CLASSES)(net.decode(image, features), targets).backward()
    net.decoder.zero_grad(set_to_none=True)
    return encoder / 1e9, counter.get_total_flops() / 1e9


def fp16_loss_gap(net: CellGapNet, samples: list[dict], cache: EmbeddingCache) -> float:
    """Largest relative difference between the loss from float16 cached maps and the float32 on-the-fly loss."""
    loss = CISCALoss(num_classes=NUM_CLASSES)
    gaps = []
    with torch.no_grad():
        for sample in samples:
            image = torch.as_tensor(sample["image"])[None]
            targets = {k: torch.as_tensor(sample[k])[None] for k in TARGET_KEYS}
            cached = [t[None] for t in cache.read_tensors(cache.row(sample["id"], sample["view"]))]
            exact = loss(net(image), targets).item()
            gaps.append(abs(loss(net(image, features=cached), targets).item() - exact) / abs(exact))
    return max(gaps)


def disk_table(tile: int) -> None:
    print("| encoder | maps (channels × grid²) | MB per tile, float16 | GB per 10k tiles |\n|---|---|---|---|")
    for key, spec in ENCODERS.items():
        with warnings.catch_warnings(), torch.device("meta"):  # geometry only: no memory, no weights
            warnings.simplefilter("ignore")
            encoder = FrozenEncoder(spec, weights=None, allow_random=True)
        geometry = [(c, tile // r, tile // r) for c, r in zip(encoder.channels, encoder.reductions)]
        size = bytes_per_row(geometry, "float16")
        maps = ", ".join(f"{c}×{h}²" for c, h, _ in geometry)
        print(f"| {key} | {maps} | {size / 2**20:.2f} | {size * 1e4 / 2**30:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128, help="tile side (the full ViT-L is built for it)")
    parser.add_argument("--tiles", type=int, default=8, help="tiles per epoch")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per run (after one warm-up epoch)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared machine)")
    parser.add_argument("--decoders", default="default,light", help="comma-separated: default, light, lighter")
    parser.add_argument("--workdir", type=Path, default=None, help="dataset and cache folder (default: a temporary one)")
    parser.add_argument("--disk-table", action="store_true", help="print cache bytes per 256² tile per encoder and exit")
    args = parser.parse_args()
    if args.disk_table:
        disk_table(256)
        return
    torch.set_num_threads(args.threads)
    if args.workdir is None:
        with tempfile.TemporaryDirectory(prefix="cellgap_cache_bench_") as workdir:
            run(args, Path(workdir))
    else:
        run(args, args.workdir)


def run(args: argparse.Namespace, workdir: Path) -> None:
    data, samples = build_samples(workdir / "synthetic", args.tiles, args.size)
    decoders = {"default": DEFAULT_DECODER, "light": LIGHT_DECODER, "lighter": LIGHTER_DECODER}
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), "
          f"{datetime.date.today()}; ViT-L/16 full size at {args.size}², random weights; {args.tiles} tiles, batch {args.batch_size}")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = CellGapNet(vit_l(args.size), num_classes=NUM_CLASSES, encoder_weights=None, allow_random_encoder=True)
    cache = EmbeddingCache.for_encoder(workdir / "cache", net, None, data, ViewSpec("clean", augmentation={"crop_size": args.size}),
                                       dataset_id="benchmark", dtype="float16", weights_seed=0)
    cache.clear()
    start = time.perf_counter()
    fill_cache(net.encoder, data, cache, batch_size=args.batch_size, progress=False)
    fill_seconds = time.perf_counter() - start
    rows = []
    for name in args.decoders.split(","):
        torch.manual_seed(0)
        net.decoder = CISCADecoder(net.encoder.channels, net.encoder.reductions, num_classes=NUM_CLASSES, **decoders[name])
        if not rows:
            gap = fp16_loss_gap(net, samples, cache)
        initial = {k: v.clone() for k, v in net.decoder.state_dict().items()}
        encoder_gflop, decoder_gflop = flops(net, samples[0])
        results = {}
        for mode, source in (("on the fly", None), ("cache", cache)):
            net.decoder.load_state_dict(initial)
            results[mode] = epoch_times(net, samples, source, args.batch_size, args.epochs)
        params = sum(p.numel() for p in net.decoder.parameters()) / 1e6
        rows.append((name, params, encoder_gflop, decoder_gflop, results))
        print(f"{name}: {results}", flush=True)
    print(f"\nfill: {fill_seconds:.1f} s for {args.tiles} tiles; cache {cache.disk_bytes / 2**20:.1f} MB; "
          f"float16 cache vs float32 on-the-fly loss: max relative difference {gap:.2e}\n")
    print("| decoder | params | encoder fwd GFLOP/tile | decoder train GFLOP/tile | FLOP bound | epoch on the fly wall / CPU s "
          "| epoch from cache wall / CPU s | speed-up wall / CPU |\n|---|---|---|---|---|---|---|---|")
    for name, params, e, d, r in rows:
        fly, cached = r["on the fly"], r["cache"]
        print(f"| {name} | {params:.2f} M | {e:.1f} | {d:.1f} | {(e + d) / d:.2f}× | {fly['wall']:.1f} / {fly['cpu']:.1f} "
              f"| {cached['wall']:.1f} / {cached['cpu']:.1f} | {fly['wall'] / cached['wall']:.2f}× / {fly['cpu'] / cached['cpu']:.2f}× |")
    assert all(r["cache"]["encoder_calls_per_epoch"] == 0 for *_, r in rows)
    encoder_gflop = rows[0][2]
    print(f"\nencoder forward {encoder_gflop:.1f} GFLOP per tile: a 5× bound needs a decoder step of ≤ {encoder_gflop / 4:.1f} GFLOP")


if __name__ == "__main__":
    main()
