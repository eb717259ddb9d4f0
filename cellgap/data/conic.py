"""CoNIC challenge patches (Lizard, colon): 4,981 H&E tiles of 256² at 20x, 6 nucleus classes.

Native files (CoNIC challenge data)::

    images.npy       (N, 256, 256, 3) uint8 RGB
    labels.npy       (N, 256, 256, 2) uint16: channel 0 instance ids, channel 1 class ids 0..6
    patch_info.csv   one patch name per row, ``<cohort>_<image>-<patch>`` (e.g. ``crag_14-0019``)
    counts.csv       per-patch counts of each class in the central 224² (only its row count is checked)

Classes in the model's order (METHOD.md §6.2): 1 Neutrophil, 2 Epithelial, 3 Lymphocyte,
4 Plasma, 5 Eosinophil, 6 Connective — the native class ids, unchanged.

Protocol ``cisca`` (the default, METHOD.md §6.2): split by *source image* (name before ``-``),
stratified by cohort (prefix before ``_``: consep, crag, dpath, glas, pannuke), 80/20 then 90/10,
seeded.  Empty-GT images are excluded from metrics (policy ``"skip"``).  The manifest's ``tissue``
column holds the cohort; ``source`` the source image.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from . import splits as splitting
from .download import Source, fetch_sources
from .native import (
    add_tiles,
    as_uint8_rgb,
    check_instance_map,
    class_counts,
    iter_npy_chunks,
    open_npy,
    sequential,
)
from .prepared import DatasetInfo, PreparedWriter
from .registry import DATASETS

# The dataset's facts live in its registry entry (cellgap.data.registry); the names below are kept for the converter.
SPEC = DATASETS["conic"]
NAME = SPEC.name
CLASS_NAMES = SPEC.class_names
(MAGNIFICATION, MPP), = SPEC.mpp.items()
MIN_CELL_SIZE = SPEC.min_cell_size[MAGNIFICATION]
LICENCE = "CC BY-NC-SA 4.0"
FILES = ("images.npy", "labels.npy", "patch_info.csv", "counts.csv")

# The challenge distributes these four files from a Google Drive folder linked on
# https://conic-challenge.grand-challenge.org (folder id 1il9jG7uA4-ebQ_lNmXbbF2eOK9uNwheb, as
# used by torch-em); Drive folders cannot be fetched with plain urllib and no direct HTTP mirror
# could be confirmed, so the URLs are left to the user (a base URL, or local copies).
_NOTE = ("CoNIC patches are distributed via the challenge site https://conic-challenge.grand-challenge.org "
         "(Google Drive folder); download images.npy, labels.npy, patch_info.csv and counts.csv yourself.")
SOURCES = tuple(Source(name, None, None, extract=False, note=_NOTE) for name in FILES)

PROTOCOLS = {p.name: {"empty_policy": p.empty_policy, "description": p.description} for p in SPEC.protocols}
DEFAULT_PROTOCOL = SPEC.default_protocol

_NAME_PATTERN = re.compile(r"^([A-Za-z0-9]+)_([^-]+)-(\d+)$")


def dataset_info(protocol: str = DEFAULT_PROTOCOL) -> DatasetInfo:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol: expected one of {sorted(PROTOCOLS)}, got {protocol!r}")
    return DatasetInfo(
        name=NAME, class_names=CLASS_NAMES, magnification=MAGNIFICATION, mpp=MPP, min_cell_size=MIN_CELL_SIZE,
        empty_policy=PROTOCOLS[protocol]["empty_policy"], tissue_label="cohort",
        description=f"CoNIC challenge patches (Lizard, colon), 256² tiles at 20x; split = {PROTOCOLS[protocol]['description']}",
        extra={"protocol": protocol,
               "protocols": {p: {"column": f"split_{p}", "default": p == protocol, **v} for p, v in PROTOCOLS.items()},
               "licence": LICENCE, "source": "https://conic-challenge.grand-challenge.org",
               "count_region": 224},
    )


def download(raw_dir: str | os.PathLike, urls: str | Mapping[str, str] | None = None, archives=None,
             progress: bool = True) -> Path:
    """Fetch the four CoNIC files into ``raw_dir`` from ``urls`` (a base URL or a mapping) or local copies."""
    return fetch_sources(SOURCES, raw_dir, urls=urls, archives=archives, progress=progress)


def find_file(raw_dir: Path, name: str, required: bool = True) -> Path | None:
    """``raw_dir/name`` if present, else the single copy anywhere below (downloads/ excluded)."""
    if not raw_dir.is_dir():
        raise FileNotFoundError(f"{raw_dir}: raw CoNIC folder missing; expected {', '.join(FILES)}")
    direct = raw_dir / name
    if direct.is_file():
        return direct
    hits = [p for p in raw_dir.rglob(name) if "downloads" not in p.relative_to(raw_dir).parts[:-1]]
    if len(hits) > 1:
        raise ValueError(f"{raw_dir}: several {name} files: {[str(h) for h in hits]}; keep one")
    if not hits:
        if required:
            raise FileNotFoundError(f"{raw_dir}: {name} missing; expected the CoNIC files {', '.join(FILES)}")
        return None
    return hits[0]


def read_patch_names(path: Path, n: int) -> list[str]:
    """Patch names from ``patch_info.csv`` (header row optional), checked against the pattern and count."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if rows and not _NAME_PATTERN.match(rows[0][0].strip()):
        rows = rows[1:]  # header
    names = [r[0].strip() for r in rows]
    if len(names) != n:
        raise ValueError(f"{path}: {len(names)} patch names but images.npy/labels.npy hold {n} patches; expected one per patch")
    for i, name in enumerate(names):
        if not _NAME_PATTERN.match(name):
            raise ValueError(f"{path}, patch {i}: name {name!r} is not of the form <cohort>_<image>-<patch> (e.g. crag_14-0019)")
    if len(set(names)) != len(names):
        dup = next(x for x in names if names.count(x) > 1)
        raise ValueError(f"{path}: patch name {dup!r} appears more than once")
    return names


def _count_rows(path: Path) -> int:
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    return len(rows) - 1  # header


def convert(raw_dir: str | os.PathLike, out_dir: str | os.PathLike, protocol: str = DEFAULT_PROTOCOL,
            seed: int = splitting.CISCA_SEED, cisca_folds: str | os.PathLike | None = None, overwrite: bool = False,
            progress: bool = True, chunk: int = 64, workers: int = 2) -> Path:
    """Convert the CoNIC files into the prepared layout at ``out_dir``; return ``out_dir``.

    Tile ids are the patch names.  Instance ids are renumbered 1..N per tile; class ids must lie in
    0..6.  ``cisca_folds``: the study's ``folds.csv`` to reproduce its exact split.  On any error
    nothing is left at ``out_dir``.
    """
    raw_dir = Path(raw_dir)
    images_path, labels_path = find_file(raw_dir, "images.npy"), find_file(raw_dir, "labels.npy")
    images = open_npy(images_path, "RGB patches of shape (N, H, W, 3)", ndim=4, last_dim=3)
    labels = open_npy(labels_path, "labels of shape (N, H, W, 2): instance ids, class ids", ndim=4, last_dim=2)
    if images.dtype.kind not in "uif":
        raise ValueError(f"{images_path}: dtype {images.dtype}; expected uint8 RGB")
    if labels.dtype.kind not in "ui":
        raise ValueError(f"{labels_path}: dtype {labels.dtype}; expected integer instance and class ids (uint16 in the release)")
    if len(images) != len(labels):
        raise ValueError(f"tile counts disagree: {images_path} has {len(images)}, {labels_path} has {len(labels)}")
    if not len(images):  # would otherwise give an empty dataset without a word
        raise ValueError(f"no patches: {images_path} and {labels_path} hold 0 patches; expected at least one")
    if images.shape[1:3] != labels.shape[1:3]:
        raise ValueError(f"image size {images.shape[1:3]} ({images_path}) differs from label size {labels.shape[1:3]} ({labels_path})")
    names = read_patch_names(find_file(raw_dir, "patch_info.csv"), len(images))
    counts_path = find_file(raw_dir, "counts.csv", required=False)
    if counts_path is not None and _count_rows(counts_path) != len(images):
        raise ValueError(f"{counts_path}: {_count_rows(counts_path)} rows but {len(images)} patches; expected one row per patch")

    cohorts = [n.split("_", 1)[0] for n in names]
    sources = [n.split("-", 1)[0] for n in names]
    if cisca_folds is not None:
        given = splitting.read_split_csv(cisca_folds, names)
        split = np.array([given[n] for n in names])
    else:
        split = splitting.grouped_split(sources, cohorts, seed=seed)
    info = dataset_info(protocol)
    extra_columns = ("source", "source_file", "source_index", "magnification", "mpp", "n_cells", "class_counts", "split_cisca")
    rel = images_path.relative_to(raw_dir).as_posix()

    def items():
        label_chunks = iter_npy_chunks(labels_path, chunk)
        for start, image_block in iter_npy_chunks(images_path, chunk):
            _, label_block = next(label_chunks)
            for j in range(len(image_block)):
                i = start + j
                image = as_uint8_rgb(image_block[j], f"{images_path}, index {i}")
                instances, classes = label_block[j, ..., 0], label_block[j, ..., 1]
                # Signed labels: a negative id would wrap to a large class id or be taken for background.
                if instances.size and instances.min() < 0:
                    raise ValueError(f"{labels_path}, index {i}: negative instance id {int(instances.min())}; "
                                     "expected 0 (background) or a positive cell id")
                if classes.size and classes.min() < 0:
                    raise ValueError(f"{labels_path}, index {i}: negative class id {int(classes.min())}; "
                                     f"expected 0 (background) to {len(CLASS_NAMES)} ({', '.join(CLASS_NAMES)})")
                if classes.size and classes.max() > len(CLASS_NAMES):
                    raise ValueError(f"{labels_path}, index {i}: unknown class id {int(classes.max())}; "
                                     f"expected 0 (background) to {len(CLASS_NAMES)} ({', '.join(CLASS_NAMES)})")
                check_instance_map(instances, f"{labels_path}, index {i}")
                label = sequential(instances)
                classes = classes.astype(np.uint8)
                counts = class_counts(label, classes, len(CLASS_NAMES))
                yield {"tile_id": names[i], "image": image, "label": label, "classes": classes, "tissue": cohorts[i],
                       "split": split[i], "source": sources[i], "source_file": rel, "source_index": i,
                       "magnification": MAGNIFICATION, "mpp": MPP, "n_cells": int(label.max()),
                       "class_counts": ";".join(str(int(x)) for x in counts), "split_cisca": split[i]}

    with PreparedWriter(out_dir, info, overwrite=overwrite, extra_columns=extra_columns) as writer:
        add_tiles(writer, tqdm(items(), total=len(images), desc="CoNIC", unit="tile", disable=not progress), workers=workers)
    return Path(out_dir)
