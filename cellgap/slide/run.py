"""Segmenting one slide by streaming: tiles are read lazily by loader workers, batched through the network on the
device (bf16 autocast on CUDA), and post-processed in a pool of CPU processes while the next batches run.

Memory stays bounded by the batch, the loader's prefetch and the tiles in flight in the pool, never the slide.
Every finished tile is journalled (``<slide>/.journal/tile_*.npz``, written atomically), so a run killed even with
``kill -9`` resumes from its finished tiles; the final outputs are then written from the journal in tile order,
so they are the same whatever the order or the number of runs that produced the tiles.

Output folder states (``<out>/<slide name>/``): ``run.json`` names the run (slide, checkpoint, settings); a folder
holding another run is refused unless ``overwrite``; ``summary.json`` is written last and marks the slide finished.
"""

from __future__ import annotations

import concurrent.futures as futures
import hashlib
import json
import multiprocessing
import os
import shutil
import time
import warnings
from collections import deque
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..atomic import write_json
from ..locking import output_lock
from .cells import PostProcessing, TileCells, init_worker, process_tile, record_name
from .reader import Resolution, Slide, choose_resolution, read_processing_region
from .tiling import DEFAULT_TILE, Tile, TileGrid, margin_for
from .tissue import tissue_mask
from .writers import SlideWriters

RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"
JOURNAL = ".journal"
FORMAT_VERSION = 1


class OutputInUseError(RuntimeError):
    """The slide's output folder holds another run's outputs."""


@dataclass
class SlideOptions:
    """How a slide is run. Fields in :meth:`identity` change the outputs; the others only the speed."""

    mpp: float | None = None  # level-0 µm/px override
    roi: tuple[int, int, int, int] | None = None  # level-0 x, y, w, h
    tile_size: int = DEFAULT_TILE
    margin: int | None = None  # processing px; None: the largest expected cell (tiling.margin_for)
    gzip: bool = False
    labels: bool = False
    thumbnail_side: int = 2048
    batch_size: int = 4
    workers: int = 2  # loader worker processes
    postprocess_workers: int | None = None  # None: half the CPUs; 0: in this process
    device: str = "cpu"
    overwrite: bool = False
    progress: bool = True

    def identity(self) -> dict:
        return {k: v for k, v in asdict(self).items()
                if k in ("mpp", "roi", "tile_size", "margin", "gzip", "labels", "thumbnail_side")}


@dataclass
class LoadedModel:
    """A network and its checkpoint meta (``class_names``, ``mpp`` or ``magnification``, ``min_cell_size`` …)."""

    network: torch.nn.Module
    meta: dict
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None

    @property
    def mpp(self) -> float:
        mpp = self.meta.get("mpp")
        if mpp:
            return float(mpp)
        return 10.0 / float(str(self.meta["magnification"]).lower().rstrip("x"))


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def slide_name(path: str | os.PathLike) -> str:
    """The output folder name of a slide: its file name without the image suffix."""
    name = Path(path).name
    for suffix in (".ome.tiff", ".ome.tif", ".tiff", ".tif", ".svs", ".ndpi", ".mrxs", ".png", ".jpg", ".jpeg"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


class TileDataset(Dataset):
    """Tiles read on demand; each worker process opens the slide itself (file handles are not shared)."""

    def __init__(self, slide_path: str, mpp: float | None, resolution: Resolution, grid: TileGrid, tiles: list[Tile]):
        self.slide_path, self.mpp, self.resolution, self.grid, self.tiles = slide_path, mpp, resolution, grid, tiles
        self._slide, self._pid = None, None

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, i: int):
        start = time.perf_counter()
        if self._slide is None or self._pid != os.getpid():
            self._slide, self._pid = Slide(self.slide_path, mpp=self.mpp), os.getpid()
        tile = self.tiles[i]
        rgb = read_processing_region(self._slide, self.resolution, tile.x, tile.y, tile.size)
        x0, y0, x1, y1 = self.grid.inside(tile)
        if (x0, y0, x1, y1) != (0, 0, tile.size, tile.size):
            # past the slide's edge: mirror the image, as the bundle's sliding-window inferer pads
            rgb = np.pad(rgb[y0:y1, x0:x1], ((y0, tile.size - y1), (x0, tile.size - x1), (0, 0)), mode="symmetric")
        image = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)
        return i, image, time.perf_counter() - start


def _identity(slide: Slide, model: LoadedModel, options: SlideOptions) -> dict:
    stat = slide.path.stat()
    return {"format": FORMAT_VERSION, "slide": str(slide.path.resolve()), "slide_bytes": stat.st_size,
            "slide_mtime_ns": stat.st_mtime_ns, "checkpoint_sha256": model.checkpoint_sha256,
            "encoder": model.meta.get("encoder"), "class_names": list(model.meta.get("class_names", [])),
            "model_mpp": model.mpp, "options": options.identity()}


def _prepare_folder(folder: Path, identity: dict, overwrite: bool) -> str:
    """'new', 'resume' or 'finished'; clears the folder for ``overwrite``; refuses another run's folder."""
    run_file, summary = folder / RUN_FILE, folder / SUMMARY_FILE
    previous = json.loads(run_file.read_text()) if run_file.is_file() else None
    if previous is not None and previous != identity and not overwrite:
        changed = sorted(k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k))
        raise OutputInUseError(f"{folder}: holds another run (differs in {', '.join(changed)}); use another --out, "
                               f"or --overwrite to replace it")
    if previous is None and any(p.name not in (".cellgap.lock",) for p in folder.iterdir()) and not overwrite:
        raise OutputInUseError(f"{folder}: not empty and not a cellgap slide run (no {RUN_FILE}); use another --out, "
                               f"or --overwrite to replace its contents")
    if overwrite and (previous != identity or not summary.is_file()):
        for p in folder.iterdir():
            if p.name == ".cellgap.lock":
                continue
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        previous = None
    if previous is not None and summary.is_file():
        return "finished"
    write_json(run_file, identity)
    return "resume" if previous is not None else "new"


def _versions() -> dict:
    import monai
    import tifffile

    from .. import __version__

    versions = {"cellgap": __version__, "torch": torch.__version__, "monai": monai.__version__, "tifffile": tifffile.__version__}
    try:
        import openslide

        versions.update({"openslide": getattr(openslide, "__library_version__", None), "openslide-python": openslide.__version__})
    except ImportError:
        pass
    return versions


@dataclass
class _Timings:
    read_s: float = 0.0  # summed over loader workers (runs beside the network)
    network_s: float = 0.0
    postprocess_s: float = 0.0  # summed over post-processing processes
    write_s: float = 0.0  # tile journal (in the post-processing processes) + final outputs
    finalise_s: float = 0.0
    wall_s: float = 0.0
    tiles_run: int = 0
    extra: dict = field(default_factory=dict)


class LazyPool:
    """A post-processing pool started on first use (a cohort of finished slides never starts one); ``None`` for 0."""

    def __init__(self, processes: int | None):
        self.processes, self._pool = processes, None

    def get(self):
        if self._pool is None and self.processes != 0:
            self._pool = postprocess_pool(self.processes)
        return self._pool

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


def postprocess_pool(processes: int | None):
    """A pool of post-processing processes (spawned: no inherited torch threads or file handles); None for 0."""
    if processes is None:
        processes = max(1, (os.cpu_count() or 2) // 2)
    if processes <= 0:
        return None
    return futures.ProcessPoolExecutor(max_workers=processes, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=init_worker)


def segment_slide(path: str | os.PathLike, out_dir: str | os.PathLike, model: LoadedModel, options: SlideOptions,
                  pool: futures.Executor | LazyPool | None = None, rank: int = 0) -> dict:
    """Segment one slide into ``out_dir/<slide name>/``; returns its summary (``status`` new / resumed / skipped)."""
    start = time.perf_counter()
    slide = Slide(path, mpp=options.mpp)
    resolution = choose_resolution(slide, model.mpp)
    folder = Path(out_dir) / slide_name(path)
    identity = _identity(slide, model, options)
    folder.mkdir(parents=True, exist_ok=True)
    with output_lock(folder, f"cellgap segment {slide.path.name}"):
        state = _prepare_folder(folder, identity, options.overwrite)
        if state == "finished":
            summary = json.loads((folder / SUMMARY_FILE).read_text())
            return {**summary, "status": "skipped"}
        return _run(slide, resolution, folder, identity, model, options, pool, rank, state, start)


def _run(slide: Slide, resolution: Resolution, folder: Path, identity: dict, model: LoadedModel, options: SlideOptions,
         pool, rank: int, state: str, start: float) -> dict:
    from tqdm import tqdm

    warned: list[str] = []
    thumbnail, thumb_down = slide.thumbnail(options.thumbnail_side)
    tissue = tissue_mask(thumbnail, thumb_down, slide.mpp, roi=options.roi)
    tissue.save(folder / "tissue.png")
    width0, height0 = slide.dimensions
    width, height = int(round(width0 / resolution.downsample)), int(round(height0 / resolution.downsample))
    margin = options.margin if options.margin is not None else margin_for(resolution.mpp)
    grid = TileGrid(width, height, options.tile_size, margin)
    d = resolution.downsample
    selected = [t for t in grid if tissue.any_in(t.core[0] * d, t.core[1] * d, t.core[2] * d, t.core[3] * d)]
    if not selected:
        message = (f"{slide.path}: no tissue found{' inside --roi' if options.roi else ''}; the outputs are empty "
                   f"(see {folder / 'tissue.png'})")
        warnings.warn(message, stacklevel=3)
        warned.append(message)
    journal = folder / JOURNAL
    journal.mkdir(exist_ok=True)
    done = {t.index for t in selected if (journal / record_name(t.index)).is_file()}
    todo = [t for t in selected if t.index not in done]
    timings = _Timings()
    setup = PostProcessing(grid=grid, downsample=d, mpp=resolution.mpp, magnification=10.0 / model.mpp,
                           min_cell_size=model.meta.get("min_cell_size"), journal=str(journal))
    cells = sum(len(TileCells.load(journal / record_name(i))) for i in done)
    bar = tqdm(total=len(selected), initial=len(done), unit="tile", desc=slide_name(slide.path)[:24],
               disable=not options.progress, dynamic_ncols=True, smoothing=0.1)
    bar.set_postfix(cells=cells)
    if todo:
        pool = pool.get() if isinstance(pool, LazyPool) else pool
        cells += _stream(slide, resolution, todo, model, options, setup, pool, timings, bar)
    bar.close()

    t = time.perf_counter()
    summary = _finalise(slide, resolution, folder, grid, selected, model, options, thumbnail, thumb_down, tissue)
    timings.finalise_s = time.perf_counter() - t
    timings.write_s += timings.finalise_s
    timings.wall_s = time.perf_counter() - start
    tissue_mm2 = tissue.area_um2(slide.mpp) / 1e6
    summary.update({
        "status": {"new": "done", "resume": "resumed"}[state], "rank": rank, "warnings": warned,
        "tiles": {"grid": len(grid), "tissue": len(selected), "run_now": len(todo), "from_journal": len(done),
                  "size": grid.tile, "margin": grid.margin, "core": grid.core},
        "tissue_mm2": round(tissue_mm2, 4),
        "timings": {k: round(v, 3) for k, v in asdict(timings).items() if k != "extra"},
        "s_per_mm2": round(timings.wall_s / tissue_mm2, 3) if tissue_mm2 > 0 and not done else None,
    })
    write_json(folder / SUMMARY_FILE, summary)  # last: marks the slide finished
    shutil.rmtree(journal, ignore_errors=True)
    return summary


def _stream(slide: Slide, resolution: Resolution, todo: list[Tile], model: LoadedModel, options: SlideOptions,
            setup: PostProcessing, pool, timings: _Timings, bar) -> int:
    from ..data.dataloader import ForkSafeDataLoader

    device = torch.device(options.device)
    dataset = TileDataset(str(slide.path), options.mpp, resolution, setup.grid, todo)
    loader = ForkSafeDataLoader(dataset, batch_size=options.batch_size, shuffle=False, num_workers=options.workers,
                                pin_memory=device.type == "cuda", persistent_workers=False)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    in_flight: deque = deque()
    limit = 2 * (getattr(pool, "_max_workers", 1) or 1) + options.batch_size
    cells = 0

    def collect(result: dict) -> None:
        nonlocal cells
        cells += result["cells"]
        timings.postprocess_s += result["postprocess_s"]
        timings.write_s += result["write_s"]
        bar.update(1)
        bar.set_postfix(cells=cells)

    network = model.network
    for indices, images, read_s in loader:
        timings.read_s += float(read_s.sum())
        t = time.perf_counter()
        with torch.inference_mode(), autocast:
            out = network(images.to(device, non_blocking=True).float().div_(255.0))
        contour = torch.softmax(out["contour"].float(), dim=1).half().cpu().numpy()
        distance = out["distance"].float().half().cpu().numpy()
        types = torch.softmax(out["type"].float(), dim=1).half().cpu().numpy() if "type" in out else None
        timings.network_s += time.perf_counter() - t
        timings.tiles_run += len(indices)
        for j, i in enumerate(indices.tolist()):
            args = (setup, todo[i], contour[j], distance[j], None if types is None else types[j])
            if pool is None:
                collect(process_tile(*args))
                continue
            in_flight.append(pool.submit(process_tile, *args))
            while len(in_flight) >= limit or (in_flight and in_flight[0].done()):
                collect(in_flight.popleft().result())
    while in_flight:
        collect(in_flight.popleft().result())
    return cells


def _finalise(slide: Slide, resolution: Resolution, folder: Path, grid: TileGrid, selected: list[Tile],
              model: LoadedModel, options: SlideOptions, thumbnail: np.ndarray, thumb_down: float, tissue) -> dict:
    journal = folder / JOURNAL
    missing = [t.index for t in selected if not (journal / record_name(t.index)).is_file()]
    if missing:
        raise RuntimeError(f"{folder}: tiles {missing[:5]}… have no journal record after the run; run the same command again")
    class_names = list(model.meta.get("class_names", []))
    writers = SlideWriters(folder, class_names, slide.mpp, thumbnail, thumb_down, gzip_geojson=options.gzip,
                           labels_shape=(grid.height, grid.width) if options.labels else None,
                           labels_chunk=min(grid.core, 2048), name=slide_name(slide.path))
    try:
        for tile in selected:
            writers.add(TileCells.load(journal / record_name(tile.index)))
        writers.close()
    except BaseException:
        writers.abort()
        raise
    outputs = writers.commit()
    width0, height0 = slide.dimensions
    return {
        "finished": True, "slide": str(slide.path), "name": slide_name(slide.path), "backend": slide.backend,
        "vendor": slide.vendor, "dimensions": [width0, height0],
        "levels": [[lv.width, lv.height, round(lv.downsample, 4)] for lv in slide.levels],
        "mpp": slide.mpp, "mpp_source": slide.mpp_source, "objective_power": slide.objective_power,
        "processing": {"level": resolution.level, "scale": resolution.scale, "mpp": resolution.mpp,
                       "downsample": resolution.downsample, "size": [grid.width, grid.height]},
        "roi": list(options.roi) if options.roi else None,
        "cells": writers.count, "cells_per_class": writers.per_class, "cut_cells": writers.cut,
        "outputs": {**outputs, "tissue": "tissue.png", "summary": SUMMARY_FILE},
        "checkpoint": model.checkpoint, "checkpoint_sha256": model.checkpoint_sha256,
        "encoder": model.meta.get("encoder"), "encoder_weights_id": model.meta.get("encoder_weights_id"),
        "class_names": class_names, "model_mpp": model.mpp, "versions": _versions(),
    }
