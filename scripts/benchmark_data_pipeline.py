"""Throughput of the training data pipeline on one CPU core: load + augment + targets + 8-bit image.

    python scripts/benchmark_data_pipeline.py --tiles 32 --repeats 5

Writes a prepared dataset of synthetic tiles (``cellgap.data.synthetic``) to a temporary folder with
``PreparedWriter`` (256² tiles, and 1024² and 2048² tiles read with a random 256² crop as for CytoDArk0), then
times, per tile, on one thread and without workers:

* load — ``cellgap.data.loading.LoadTiled`` + ``cellgap.targets.ContourLevelsd`` as in the bundles:
  from the prepared files (PNG + two zlib TIFFs; the tile's contour levels computed), and from the
  dataset's packed copy (``cellgap.data.packed``: uncompressed, memory-mapped, levels stored);
* augment — ``cisca_augmentations`` on tiles already in memory (levels moved along), with a per-step profile;
* targets — ``cellgap.targets.CISCATargetsd`` on augmented tiles, with the moved levels and recomputing them;
* full — load + augment + targets + the image rounded to 8 bits, as the bundles' training loaders run it
  (files, packed), and the same in a DataLoader worker process, batches collated into shared memory;
* loader share with ``photometric_on_device`` — load + the spatial steps + targets (the photometric steps
  run on the training batch instead); and the worker row with ``targets_on_device`` (the distance maps and
  weight mask computed on the training batch instead); and these batch steps' own cost per tile on this CPU
  and, when there is one, on the CUDA device;
* cached tiles — the same without loading, as with a CacheDataset that keeps the loaded tiles.

CPU time of this process is the figure that survives other jobs on the machine; wall time is what a
loader worker sees. Each row gives the median of ``--repeats`` timed passes over the tiles and the CPU of
the fastest pass (on a shared host busy neighbours make some passes take up to twice as long).
Target: ≥ 150 tiles/s per core (≤ 6.7 ms per tile) for 256² tiles and for 256² crops from large tiles; the
lines after the table say, per tile size, whether the median pass meets it, only the fastest pass, or neither.
"""

from __future__ import annotations

import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")  # one core: no BLAS or OpenMP threads either

import argparse  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from monai.data import DataLoader, Dataset, set_track_meta  # noqa: E402
from monai.transforms import CastToTyped, Compose, OneOf, SelectItemsd  # noqa: E402

from cellgap.data.augmentation import ClipIntensityd, cisca_augmentations  # noqa: E402
from cellgap.data.device_augmentation import BatchPhotometricAugmentation  # noqa: E402
from cellgap.data.loading import LoadTiled  # noqa: E402
from cellgap.data.packed import pack_dataset  # noqa: E402
from cellgap.data.prepared import PreparedWriter, datalist  # noqa: E402
from cellgap.data.synthetic import generate_tile, synthetic_info  # noqa: E402
from cellgap.targets import CONTOUR_LEVELS_KEY, CISCATargetsd, ContourLevelsd, DenseTargets  # noqa: E402
from cellgap.training import HALF_PRECISION_KEYS, TARGET_KEYS  # noqa: E402

TARGET_TILES_PER_S = 150  # issue #4: load + augment + targets per CPU core


def _sizes(text: str) -> tuple[int, ...]:
    parts = text.split(",")
    sizes = tuple(int(part) for part in parts if part.strip().isdigit())
    if len(sizes) != len(parts) or min(sizes) < 256:
        raise argparse.ArgumentTypeError(f"expected comma-separated tile sides ≥ 256, e.g. 256,1024; got {text!r}")
    return sizes


def write_dataset(root: Path, tiles: int, size: int, magnification: int, seed: int, pack: bool = False) -> list[dict]:
    with PreparedWriter(root, synthetic_info(magnification)) as writer:
        for index in range(tiles):
            tile = generate_tile(seed + index, size=size, magnification=magnification)
            writer.add(f"tile{index:04d}", tile.image, tile.label, tile.classes, tissue=tile.tissue, split="train")
    if pack:
        pack_dataset(root)
    return datalist(root, "train")


def timed(function, items: list, passes: int) -> tuple[float, float, float]:
    """Milliseconds per item over ``passes`` passes through ``items`` (after one warm-up call): wall and CPU
    of the median pass, and CPU of the fastest. Other tenants of a shared host slow some passes by up to
    half; the median says what a worker sees, the fastest pass what the code itself costs."""
    function(items[0])
    walls, cpus = [], []
    for _ in range(passes):
        wall, cpu = time.perf_counter(), time.process_time()
        for item in items:
            function(item)
        walls.append((time.perf_counter() - wall) / len(items) * 1e3)
        cpus.append((time.process_time() - cpu) / len(items) * 1e3)
    return float(np.median(walls)), float(np.median(cpus)), min(cpus)


def worker_timed(transform, items: list, passes: int, samples: int = 256, batch_size: int = 8) -> tuple[float, float, float]:
    """Milliseconds per tile of a DataLoader worker process, as the bundles' training loaders run it (a fresh
    worker each epoch, batches collated into shared memory): wall of the epoch and the worker's CPU (from
    ``os.times`` once it has been joined), median pass and fastest, over ``samples`` tiles (``items`` repeated).
    A worker's start costs ≈60–90 ms of CPU on the dev machine: 256 tiles spread it as an epoch does (a PanNuke
    fold of 2,656 tiles over 4 workers gives each ≈660)."""
    data = (items * -(-samples // len(items)))[:samples]
    loader = DataLoader(Dataset(data, transform), batch_size=batch_size, num_workers=1)
    walls, cpus = [], []
    for _ in range(passes + 1):  # the first pass warms up the parent's side
        wall, children = time.perf_counter(), os.times()
        for _batch in loader:
            pass
        after = os.times()
        walls.append((time.perf_counter() - wall) / samples * 1e3)
        cpus.append((after.children_user + after.children_system - children.children_user - children.children_system)
                    / samples * 1e3)
    return float(np.median(walls[1:])), float(np.median(cpus[1:])), min(cpus[1:])


def step_name(transform) -> str:
    if isinstance(transform, OneOf):
        return "OneOf[" + ", ".join(type(t).__name__ for t in transform.transforms[:-1]) + "]"
    return type(transform).__name__


def step_profile(steps: list, samples: list[dict], repeats: int) -> list[tuple[str, float]]:
    """Mean CPU ms per tile spent in each step (probabilities included: what a step costs on average)."""
    spent = np.zeros(len(steps))
    for _ in range(repeats):
        for sample in samples:
            data = dict(sample)
            for index, step in enumerate(steps):
                start = time.process_time()
                data = step(data)
                spent[index] += time.process_time() - start
    return [(step_name(s), t / (repeats * len(samples)) * 1e3) for s, t in zip(steps, spent)]


def batch_step_report(title: str, step, batch: torch.Tensor, repeats: int) -> str:
    """Per-tile cost of a step on a training batch, on this CPU (one thread) and, when there is one, on CUDA."""
    lines = [f"{title}, batch of {len(batch)} 256² tiles, per tile:"]
    step(batch)
    cpu = time.process_time()
    for _ in range(repeats):
        step(batch)
    lines.append(f"  CPU, one thread: {(time.process_time() - cpu) / (repeats * len(batch)) * 1e3:.2f} ms CPU")
    if torch.cuda.is_available():
        on_device = batch.cuda()
        step(on_device)
        torch.cuda.synchronize()
        wall = time.perf_counter()
        for _ in range(10 * repeats):
            step(on_device)
        torch.cuda.synchronize()
        lines.append(f"  {torch.cuda.get_device_name()}: {(time.perf_counter() - wall) / (10 * repeats * len(batch)) * 1e3:.3f} ms wall")
    return "\n".join(lines)


def report(name: str, wall: float, cpu: float, fastest: float) -> str:
    return f"| {name} | {wall:.1f} | {cpu:.1f} | {fastest:.1f} | {1e3 / cpu:.0f} |"


def verdict(name: str, cpu: float, fastest: float) -> str:
    """Whether a tile size meets the target: on the median pass, on the fastest pass only (a busy host), or not."""
    limit = 1e3 / TARGET_TILES_PER_S
    outcome = "met" if cpu <= limit else "met on the fastest pass only" if fastest <= limit else "NOT met"
    return f"  {name}: {cpu:.1f} ms median pass ({1e3 / cpu:.0f} tiles/s), {fastest:.1f} ms fastest ({1e3 / fastest:.0f}): {outcome}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", type=int, default=48, help="256² tiles (the 1024² set has a quarter, the 2048² set an eighth as many)")
    parser.add_argument("--sizes", type=_sizes, default=(256, 1024, 2048),
                        help="tile sides of the sets, comma-separated; tiles larger than 256 are read with a 256² crop")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes over the tiles")
    parser.add_argument("--worker-tiles", type=int, default=256,
                        help="tiles per pass of the DataLoader worker rows (0 leaves those rows out)")
    parser.add_argument("--magnification", type=int, default=40)
    parser.add_argument("--stain", default="pannuke", help="stain statistics of the LAB jitter")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.worker_tiles < 0:
        parser.error(f"--worker-tiles: expected a number of tiles ≥ 0, got {args.worker_tiles}")
    torch.set_num_threads(1)

    print(f"machine: {platform.machine()} cpu_count={os.cpu_count()}, torch threads=1, "
          f"load average {' / '.join(f'{x:.1f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory() as folder:
        sets = {}
        for size in args.sizes:  # a large tile gets a random 256² crop, as CytoDArk0's images
            name = "256² tiles" if size == 256 else f"{size}² tiles → 256² crop"
            sets[name] = write_dataset(Path(folder) / f"tiles{size}", max(1, args.tiles * 256 // size), size,
                                       args.magnification, args.seed + size // 1024 * 10**6, pack=True)
        num_classes = len(synthetic_info(args.magnification).class_names)
        keys = ("image", "label", "classes", CONTOUR_LEVELS_KEY)  # as the bundles' train.json
        load = Compose([LoadTiled(keys, num_classes=num_classes, packed=False), ContourLevelsd(magnification=args.magnification)])
        load_packed = Compose([LoadTiled(keys, num_classes=num_classes), ContourLevelsd(magnification=args.magnification)])
        targets = CISCATargetsd(magnification=args.magnification)
        targets_off = CISCATargetsd(magnification=args.magnification, dense_targets=False)  # bundles: targets_on_device
        eight_bit = ClipIntensityd("image", 0.0, 255.0, dtype="uint8")  # as the bundles' train.json
        transport = [SelectItemsd(("image", *TARGET_KEYS)), CastToTyped(HALF_PRECISION_KEYS, dtype=torch.float16)]
        transport_label = [SelectItemsd(("image", "contour_target", "type_target", "label"))]
        rows = ["| stage | wall ms/tile | CPU ms/tile | CPU ms/tile, fastest pass | tiles/s per core (CPU) |",
                "|---|---|---|---|---|"]
        profiles, batches, verdicts = {}, [], []
        for track_meta in (True, False):
            set_track_meta(track_meta)
            meta = "MetaTensor" if track_meta else "track_meta(False)"
            for name, items in sets.items():
                steps = cisca_augmentations(stain_stats=args.stain, crop_size=256)
                augment = Compose(steps).set_random_state(args.seed)
                full = Compose([load, *steps, targets, eight_bit]).set_random_state(args.seed)
                full_packed = Compose([load_packed, *steps, targets, eight_bit]).set_random_state(args.seed)
                load_augment = Compose([load_packed, *steps]).set_random_state(args.seed)
                cached = Compose([*steps, targets, eight_bit]).set_random_state(args.seed)
                # Rows that read the dataset first, while this process holds no decoded tiles, as a loader
                # worker: holding the in-memory copies below (≈150 MB of 2048² tiles) slowed them by ≈20 %.
                rows.append(report(f"{name}, {meta}: load (files) + contour levels computed", *timed(load, items, args.repeats)))
                rows.append(report(f"{name}, {meta}: load (packed) + contour levels read", *timed(load_packed, items, args.repeats)))
                rows.append(report(f"{name}, {meta}: load (packed) + augment", *timed(load_augment, items, args.repeats)))
                rows.append(report(f"{name}, {meta}: **full** (load files+augment+targets+8-bit)",
                                   *timed(full, items, args.repeats)))
                full_packed_times = timed(full_packed, items, args.repeats)
                rows.append(report(f"{name}, {meta}: **full** (load packed+augment+targets+8-bit)", *full_packed_times))
                if not track_meta:  # the bundles' setting: the figure the target is about
                    verdicts.append(verdict(name, *full_packed_times[1:]))
                    if args.worker_tiles > 0:
                        worker = Compose([load_packed, *steps, targets, eight_bit, *transport]).set_random_state(args.seed)
                        rows.append(report(f"{name}, {meta}: full, in a DataLoader worker (batches of 8 collated into shared "
                                           "memory as the bundles send them; the worker's CPU)",
                                           *worker_timed(worker, items, args.repeats, samples=args.worker_tiles)))
                        worker = Compose([load_packed, *steps, targets_off, eight_bit, *transport_label]).set_random_state(args.seed)
                        rows.append(report(f"{name}, {meta}: full less the distance maps and weight mask (targets_on_device), "
                                           "in a DataLoader worker", *worker_timed(worker, items, args.repeats, samples=args.worker_tiles)))
                    spatial = cisca_augmentations(stain_stats=args.stain, crop_size=256, photometric=False)
                    loader_share = Compose([load_packed, *spatial, targets, eight_bit]).set_random_state(args.seed)
                    rows.append(report(f"{name}, {meta}: **loader share, photometric steps on the device** "
                                       "(load packed+spatial steps+targets+8-bit)", *timed(loader_share, items, args.repeats)))
                loaded = [load(item) for item in items]
                augmented = [augment(sample) for sample in loaded]
                recompute = [{k: v for k, v in sample.items() if k != CONTOUR_LEVELS_KEY} for sample in augmented]
                rows.append(report(f"{name}, {meta}: augment (in memory)", *timed(augment, loaded, args.repeats)))
                rows.append(report(f"{name}, {meta}: targets (moved contour levels)", *timed(targets, augmented, args.repeats)))
                rows.append(report(f"{name}, {meta}: targets recomputing the contour levels",
                                   *timed(targets, recompute, args.repeats)))
                rows.append(report(f"{name}, {meta}: cached tiles (augment+targets+8-bit)", *timed(cached, loaded, args.repeats)))
                if not track_meta:
                    profiles[name] = step_profile(cisca_augmentations(stain_stats=args.stain, crop_size=256), loaded,
                                                  args.repeats)
                    if name.startswith("256"):
                        spatial_steps = Compose(spatial).set_random_state(args.seed)
                        moved = [targets_off(spatial_steps(s)) for s in loaded]
                        batches.append(("batch photometric step (BatchPhotometricAugmentation)",
                                        BatchPhotometricAugmentation(stain_stats=args.stain, seed=0),
                                        torch.stack([m["image"] for m in moved])))
                        batches.append(("distance maps and weight mask on the batch (DenseTargets)", DenseTargets(),
                                        torch.stack([m["label"] for m in moved])))
                del loaded, augmented, recompute  # the next set's reading rows run without them
        print("\n".join(rows))
        print(f"\ntarget ≥ {TARGET_TILES_PER_S} tiles/s per core (≤ {1e3 / TARGET_TILES_PER_S:.1f} ms CPU per tile), "
              "full pipeline from the pack, track_meta(False):")
        print("\n".join(verdicts))
        for title, step, batch in batches:
            print("\n" + batch_step_report(title, step, batch, args.repeats))
        for name, profile in profiles.items():
            print(f"\naugmentation steps, {name}, track_meta(False), mean CPU ms per tile (probabilities included):")
            for step, ms in profile:
                print(f"  {ms:6.2f}  {step}")
    print(f"\nload average after the run {' / '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
