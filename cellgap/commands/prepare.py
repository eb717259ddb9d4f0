"""``cellgap prepare`` (also ``scripts/prepare_data.py``): download and/or convert a dataset into cellgap's
prepared layout.

Examples::

    cellgap prepare folder --raw ~/my_tiles --out data/my_tiles --class-names tumour,immune --magnification 40
    cellgap prepare pannuke --raw ~/data/pannuke_raw --out data/pannuke --download
    cellgap prepare pannuke --raw ~/Downloads/fold_1.zip --archives ~/Downloads --out data/pannuke
    cellgap prepare conic --raw ~/data/conic --out data/conic
    cellgap prepare cytodark0 --raw ~/data/cytodark0 --out data/cytodark0_20x --download --magnification 20
    cellgap prepare synthetic --out data/synthetic
    cellgap prepare pannuke --raw ~/data/pannuke_raw --out data/pannuke --pack

``--pack`` also writes the uncompressed memory-mapped copy ``<out>/packed`` that ``LoadTiled`` reads
≈25× faster, with each tile's contour levels computed once (``cellgap.data.packed``; 9 bytes per pixel
on disk). An existing prepared folder is packed with ``python -c "from cellgap.data.packed import pack_dataset; pack_dataset('data/pannuke', overwrite=True)"``.

Prints the prepared folder, its protocols and the split sizes. ``folder``: a file that cannot be converted is
named with the reason (``FAILED <file>: <reason>``), the others are converted, the failures are listed in
``<out>/dataset.json`` (``extra.conversion_failures``) and the exit status is 3 (1: an error, nothing written).
"""

from __future__ import annotations

import argparse
import inspect
import signal
import sys
from pathlib import Path

from ..data.packed import pack_dataset
from ..data.prepared import check_replaceable, read_dataset_info, read_manifest
from ..data.registry import DATASETS, get, prepare_dataset
from ..data.splits import split_sizes
from ..failures import BatchFailures
from ..locking import OutputLockedError

PARTIAL = 3  # exit status: the prepared folder is complete but some files could not be converted (1: nothing written)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0]
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n\n", 1)[1]
    parser.add_argument("dataset", choices=sorted(DATASETS), help="which dataset")
    parser.add_argument("--raw", help="folder of native files, a local archive, or a URL (base URL or the archive's URL)")
    parser.add_argument("--out", required=True, help="prepared dataset folder to write")
    parser.add_argument("--download", action="store_true", help="fetch the official files into --raw first (resumable)")
    parser.add_argument("--raw-dir", help="where downloads/extractions go when --raw is a URL or an archive (default <out>_raw)")
    parser.add_argument("--archives", nargs="+", help="local copies of the release files (or folders holding them)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing prepared folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--pack", action="store_true",
                        help="also write <out>/packed, the uncompressed memory-mapped tiles LoadTiled reads fastest")
    group = parser.add_argument_group("conversion options (only those that apply to the dataset)")
    group.add_argument("--protocol", help="default protocol written to the split column (pannuke: official1|official2|"
                                          "official3|cisca; conic: cisca; cytodark0: area_holdout|zenodo)")
    group.add_argument("--seed", type=int, help="seed of generated splits (default 5, as in CISCA)")
    group.add_argument("--cisca-folds", help="the study's folds.csv, to reproduce its exact split (pannuke, conic)")
    group.add_argument("--folds", help="PanNuke folds to convert, e.g. 1,2,3")
    group.add_argument("--magnification", help="cytodark0: 20 or 40; folder: the tiles' magnification")
    group.add_argument("--mpp", type=float, help="folder: pixel size in µm/pixel")
    group.add_argument("--class-names", help="folder: comma-separated class names in class-id order")
    group.add_argument("--name", help="folder: dataset name")
    group.add_argument("--min-cell-size", type=int, help="folder: minimum cell size of post-processing (pixels)")
    group.add_argument("--stain-kind", choices=("he", "ihc", "nissl", "fluorescence", "other"),
                       help="folder: the stain (default he); the H&E stain jitter applies to he only (docs/datasets.md)")
    group.add_argument("--empty-policy", choices=("skip", "nan"), help="folder: images without cells in metrics")
    group.add_argument("--split-csv", help="folder: split file (id,split[,tissue]); default <raw>/split.csv if present")
    group.add_argument("--tile-size", type=int, help="cytodark0/folder: also write non-overlapping tiles (0: none)")
    group.add_argument("--metadata", help="cytodark0: CSV name,area overriding the built-in area table")
    group.add_argument("--workers", type=int, help="writer threads (default 2)")
    group.add_argument("--n-train", type=int, help="synthetic: training tiles")
    group.add_argument("--n-val", type=int, help="synthetic: validation tiles")
    group.add_argument("--n-test", type=int, help="synthetic: test tiles")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="prepare_data.py")
    add_arguments(parser)
    return parser.parse_args(argv)


def conversion_options(args: argparse.Namespace) -> dict:
    options = {"protocol": args.protocol, "seed": args.seed, "cisca_folds": args.cisca_folds, "mpp": args.mpp,
               "name": args.name, "min_cell_size": args.min_cell_size, "empty_policy": args.empty_policy,
               "stain_kind": args.stain_kind,
               "split_csv": args.split_csv, "metadata": args.metadata, "workers": args.workers,
               "n_train": args.n_train, "n_val": args.n_val, "n_test": args.n_test}
    if args.folds:
        options["folds"] = tuple(int(k) for k in args.folds.split(","))
    if args.magnification:
        options["magnification"] = float(args.magnification.lower().rstrip("x"))
        if options["magnification"].is_integer():
            options["magnification"] = int(options["magnification"])
    if args.class_names:
        options["class_names"] = tuple(n.strip() for n in args.class_names.split(",") if n.strip())
    if args.tile_size is not None:
        options["tile_size"] = args.tile_size or None
    return {k: v for k, v in options.items() if v is not None or k == "tile_size"}


def _stop(signum, frame):
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C: the conversion removes its partial output


def main(argv=None) -> int:
    return run(parse_args(argv))


def run(args: argparse.Namespace) -> int:
    previous = signal.signal(signal.SIGTERM, _stop)  # a scheduler's time limit or `kill`
    try:
        return _prepare(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _prepare(args: argparse.Namespace) -> int:
    entry = get(args.dataset)
    options = conversion_options(args)
    accepted = set(inspect.signature(entry.convert).parameters)
    unknown = sorted(k for k in options if k not in accepted)
    if unknown:
        flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
        print(f"error: {flags} do(es) not apply to {args.dataset}", file=sys.stderr)
        return 2
    if entry.needs_raw and not args.raw:
        print(f"error: {args.dataset} needs --raw (a folder, an archive or a URL)", file=sys.stderr)
        return 2
    out = Path(args.out)
    inputs = [p for p in (args.raw, args.raw_dir, *(args.archives or ())) if p and "://" not in str(p)]
    for given in inputs:  # writing the prepared folder over the files it is made from can only lose them
        if Path(given).expanduser().resolve() == out.resolve() or out.resolve() in Path(given).expanduser().resolve().parents:
            print(f"error: --out {out} holds the input {given}; choose an --out folder of its own", file=sys.stderr)
            return 2
    if args.overwrite and out.exists():
        try:
            check_replaceable(out, inputs)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    status = 0
    try:
        out = prepare_dataset(args.dataset, args.raw, args.out, download=args.download, raw_dir=args.raw_dir,
                              archives=args.archives, overwrite=args.overwrite, progress=not args.no_progress, **options)
    except BatchFailures as e:  # the prepared folder is complete without the files named
        print(f"error: {e}", file=sys.stderr)
        out, status = e.output, PARTIAL
    except (ValueError, TypeError, OSError, OutputLockedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.pack:
        try:
            print(f"packed: {pack_dataset(out, overwrite=True)}")
        except (ValueError, OSError) as e:
            print(f"error: packing {out}: {e}", file=sys.stderr)
            return 1
    info = read_dataset_info(out)
    rows = read_manifest(out)
    print(f"{Path(out)}: {info.name}, {len(rows)} tiles, {info.num_classes} class(es) {list(info.class_names)}, "
          f"{info.magnification}x / {info.mpp} µm/px, min cell size {info.cell_size} px, empty-image policy {info.empty_policy!r}")
    columns = [c for c in rows[0] if c == "split" or c.startswith("split_")] if rows else []
    for column in columns:
        sizes = split_sizes(r[column] for r in rows)
        print(f"  {column}: " + ", ".join(f"{k} {v}" for k, v in sizes.items()))
    return status

