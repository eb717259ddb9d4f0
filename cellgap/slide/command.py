"""``cellgap segment``: whole slides, images and folders of either → cells (GeoJSON for QuPath, tables, overlays).

A thin front over :func:`segment_slides`, which the bundle's ``configs/segment.json`` calls too.  A cohort (several
inputs or folders) is run slide by slide; finished slides are skipped; under ``torchrun`` the slides are sharded
over the ranks (``torch.distributed``), so each is done by exactly one process.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import warnings
from pathlib import Path

from .reader import SLIDE_SUFFIXES, is_slide_file
from .run import LazyPool, LoadedModel, OutputInUseError, SlideOptions, file_sha256, segment_slide, slide_name
from .tiling import DEFAULT_TILE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="slides or images (SVS, NDPI, MRXS, OME-TIFF, TIFF, PNG, JPEG), folders of them, or "
                             "text files listing one per line (@list.txt)")
    parser.add_argument("--model", required=True,
                        help="a bundle folder, a checkpoint file, or a run folder of `cellgap train` / `cellgap demo`")
    parser.add_argument("--out", required=True, help="output folder; each slide gets OUT/<slide name>/")
    parser.add_argument("--encoder-weights", default=None,
                        help="encoder weights: 'hub' (default) or a local folder/file; not needed when the checkpoint stores its encoder")
    parser.add_argument("--mpp", type=float, default=None, help="level-0 µm per pixel, for slides that record none (overrides the file)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda when available)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2, help="tile-reading loader processes")
    parser.add_argument("--postprocess-workers", type=int, default=None,
                        help="post-processing processes (default: half the CPUs; 0: in the main process)")
    parser.add_argument("--tile-size", type=int, default=DEFAULT_TILE, help="tile side in processing pixels (multiple of 32)")
    parser.add_argument("--margin", type=int, default=None,
                        help="tile overlap on each side in processing pixels (multiple of 32; default: the largest expected cell, 30 µm)")
    parser.add_argument("--roi", default=None, help="x,y,w,h in level-0 pixels: segment only this rectangle")
    parser.add_argument("--gzip", action="store_true", help="write cells.geojson.gz")
    parser.add_argument("--labels", action="store_true", help="also write the instance labels as labels.zarr")
    parser.add_argument("--overwrite", action="store_true", help="replace an output folder that holds another run")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def collect_inputs(inputs: list[str]) -> list[Path]:
    """Slides from files, folders (their slide files, sorted) and @lists; an error for anything else."""
    found: list[Path] = []
    for item in inputs:
        if item.startswith("@"):
            listing = Path(item[1:])
            if not listing.is_file():
                raise FileNotFoundError(f"{item}: no such list file")
            found += collect_inputs([line.strip() for line in listing.read_text().splitlines() if line.strip() and not line.startswith("#")])
            continue
        path = Path(item)
        if path.is_dir():
            slides = sorted(p for p in path.iterdir() if p.is_file() and is_slide_file(p))
            if not slides:
                raise FileNotFoundError(f"{path}: a folder without slides ({', '.join(SLIDE_SUFFIXES)})")
            found += slides
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such slide, image or folder")
    names: dict[str, Path] = {}
    for p in found:
        other = names.setdefault(slide_name(p), p)
        if other != p:
            raise ValueError(f"{other} and {p} would write the same output folder {slide_name(p)}/; rename one or run them separately")
    return found


def _distributed() -> tuple[int, int, bool]:
    """(rank, world size, whether this call joined the process group); joins it when started by torchrun."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        joined = not dist.is_initialized()
        if joined:
            import torch

            dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        return dist.get_rank(), dist.get_world_size(), joined
    return 0, 1, False


def load(model: str, encoder_weights: str | None, device: str) -> LoadedModel:
    """The network of ``--model`` (a checkpoint file, a bundle folder or a run folder), rebuilt from its checkpoint
    alone with the encoder it was trained with (``cellgap.checkpoint.load_network``)."""
    import torch

    from ..checkpoint import load_network, model_file

    path = model_file(model)
    network, meta = load_network(path, encoder_weights=encoder_weights, device=device)
    network.prepare_layout(torch.device(device))
    return LoadedModel(network=network, meta=meta, checkpoint=str(path), checkpoint_sha256=file_sha256(path))


def segment_slides(inputs: str | list[str], model: str | LoadedModel, out: str, encoder_weights: str | None = None,
                   device: str | None = None, options: SlideOptions | None = None) -> list[dict]:
    """Segment every slide of ``inputs`` (one path or a list) into ``out``; this rank's summaries (finished
    slides: status 'skipped')."""
    import torch

    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    options = options or SlideOptions()
    options.device = device or options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rank, world, joined = _distributed()
    if world > 1 and options.device.startswith("cuda") and ":" not in options.device:
        options.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    slides = collect_inputs(list(inputs))
    mine = slides[rank::world]
    loaded = model if isinstance(model, LoadedModel) else load(model, encoder_weights, options.device)
    summaries = []
    pool = LazyPool(options.postprocess_workers)
    try:
        for path in mine:
            try:
                summary = segment_slide(path, out, loaded, options, pool=pool, rank=rank)
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise OSError(e.errno, f"{path}: the disk of {out} is full ({e}); free space and run the same "
                                           f"command again: finished tiles are kept and the run resumes") from None
                raise
            summaries.append(summary)
            print(one_line(summary), flush=True)
    finally:
        pool.shutdown()
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # every rank's slides are finished before any rank reports the cohort done
        if joined:
            dist.destroy_process_group()
    return summaries


def one_line(summary: dict) -> str:
    timings = summary.get("timings") or {}
    rate = summary.get("s_per_mm2")
    return (f"{summary.get('name')}: {summary.get('status')}, {summary.get('cells')} cells in "
            f"{summary.get('tiles', {}).get('tissue')} tiles at {summary.get('processing', {}).get('mpp', 0):.3f} µm/px "
            f"(level {summary.get('processing', {}).get('level')}), {timings.get('wall_s', 0):.1f} s"
            + (f", {rate:.2f} s/mm² of tissue" if rate else "")
            + (f", {summary['cut_cells']} cells cut by tile edges" if summary.get("cut_cells") else ""))


def run(args: argparse.Namespace) -> list[dict]:
    from ..encoders import EncoderWeightsError
    from .tissue import parse_roi

    options = SlideOptions(mpp=args.mpp, roi=parse_roi(args.roi), tile_size=args.tile_size, margin=args.margin, gzip=args.gzip,
                           labels=args.labels, batch_size=args.batch_size, workers=args.workers,
                           postprocess_workers=args.postprocess_workers, overwrite=args.overwrite,
                           progress=not args.no_progress)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pretrained.*")
            return segment_slides(args.inputs, args.model, args.out, encoder_weights=args.encoder_weights,
                                  device=args.device, options=options)
    except (OutputInUseError, FileNotFoundError, ValueError, EncoderWeightsError) as e:
        print(f"cellgap segment: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
