"""PanNuke (Gamper et al. 2019/2020): 7,901 H&E tiles of 256², 40x, 19 tissues, 5 nucleus classes.

Native layout (one zip per fold from the TIA Centre, Warwick)::

    Fold 1/images/fold1/images.npy   (N, 256, 256, 3) RGB, stored as float64 0..255
    Fold 1/images/fold1/types.npy    (N,) tissue name per tile
    Fold 1/masks/fold1/masks.npy     (N, 256, 256, 6): channels 0–4 instance ids of Neoplastic,
                                     Inflammatory, Connective, Dead, Epithelial; channel 5 background

The converter finds these files under the raw folder whatever the outer folder names are (any
parent folder named like ``Fold 1``, ``fold1`` or ``fold_1``).

**Instance map rule.**  Each (channel, id) pair is one cell; the channels' own ids are kept rather
than summed (summing ids of different channels can merge two touching cells or give one cell two
values).  A pixel claimed by cells of more than one channel goes to the *smaller* cell (fewer
pixels), ties to the lower channel index, so that a small cell is never swallowed by a larger
overlapping one.  Ids are then renumbered 1..N; the class map holds each pixel's channel + 1.

Protocols: the official three splits over the native folds (``official1``–``official3``,
empty-GT images give NaN and are skipped by nan-aware means: empty-image policy ``"nan"``) and the
CISCA tissue-stratified split (``cisca``, METHOD.md §6.1, empty images excluded: ``"skip"``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from . import splits as splitting
from .download import Source, fetch_sources
from .native import (
    add_tiles,
    as_integer_labels,
    as_uint8_rgb,
    check_instance_map,
    class_counts,
    iter_npy_chunks,
    open_npy,
    safe_name,
    sequential,
)
from .prepared import DatasetInfo, PreparedWriter
from .registry import DATASETS

# The dataset's facts live in its registry entry (cellgap.data.registry); the names below are kept for the converter.
SPEC = DATASETS["pannuke"]
NAME = SPEC.name
CLASS_NAMES = SPEC.class_names
(MAGNIFICATION, MPP), = SPEC.mpp.items()
MIN_CELL_SIZE = SPEC.min_cell_size[MAGNIFICATION]
FOLDS = (1, 2, 3)
LICENCE = "CC BY-NC-SA 4.0"

# Official download (TIA Centre, University of Warwick).  SHA-256 values as published in the
# torch-em dataset table (constantinpape/torch-em, histopathology/pannuke.py); not re-computed here.
SOURCES = (
    Source("fold_1.zip", "https://warwick.ac.uk/fac/cross_fac/tia/data/pannuke/fold_1.zip",
           "6e19ad380300e8ce9480f9ab6a14cc91fa4b6a511609b40e3d70bdf9c881ed0b"),
    Source("fold_2.zip", "https://warwick.ac.uk/fac/cross_fac/tia/data/pannuke/fold_2.zip",
           "5bc540cc509f64b5f5a274d6e5a245527dbd3e6d3155d43555115c5d54709b07"),
    Source("fold_3.zip", "https://warwick.ac.uk/fac/cross_fac/tia/data/pannuke/fold_3.zip",
           "c14d372981c42f611ebc80afad01702b89cad8c1b3089daa31931cf5a4b1a39d"),
)

PROTOCOLS = {p.name: {"empty_policy": p.empty_policy, "description": p.description} for p in SPEC.protocols}
DEFAULT_PROTOCOL = SPEC.default_protocol

OVERLAP_RULE = ("each (channel, id) pair is one cell; a pixel claimed by several channels goes to the smaller cell "
                "(ties: lower channel index); ids renumbered 1..N")


def protocol_table(protocols: Iterable[str], default: str) -> dict:
    """Manifest column and empty-image policy of each protocol (``split`` holds the default's copy)."""
    return {p: {"column": f"split_{p}", "default": p == default, **PROTOCOLS[p]} for p in protocols}


def dataset_info(protocol: str = DEFAULT_PROTOCOL, protocols: Sequence[str] = tuple(PROTOCOLS)) -> DatasetInfo:
    """PanNuke's facts; ``protocol`` chooses the default split and its empty-image policy."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol: expected one of {sorted(PROTOCOLS)}, got {protocol!r}")
    return DatasetInfo(
        name=NAME, class_names=CLASS_NAMES, magnification=MAGNIFICATION, mpp=MPP, min_cell_size=MIN_CELL_SIZE,
        empty_policy=PROTOCOLS[protocol]["empty_policy"], tissue_label="tissue",
        description=f"PanNuke, 19 tissues, 256² tiles at 40x; split = {PROTOCOLS[protocol]['description']}",
        extra={"protocol": protocol, "protocols": protocol_table(protocols, protocol), "licence": LICENCE,
               "source": "https://warwick.ac.uk/fac/cross_fac/tia/data/pannuke", "overlap_rule": OVERLAP_RULE},
    )


def download(raw_dir: str | os.PathLike, urls: str | Mapping[str, str] | None = None, archives=None,
             progress: bool = True) -> Path:
    """Download (or take from ``archives``) the three fold zips, verify and extract them into ``raw_dir``."""
    return fetch_sources(SOURCES, raw_dir, urls=urls, archives=archives, progress=progress)


# --------------------------------------------------------------------------------------- reading


def _fold_of(path: Path, root: Path) -> int | None:
    for part in path.relative_to(root).parts[:-1]:
        m = re.fullmatch(r"fold[ _-]?(\d+)", part.strip().lower())
        if m:
            return int(m.group(1))
    return None


def find_fold_files(raw_dir: str | os.PathLike, fold: int) -> dict[str, Path]:
    """Paths of ``images.npy``, ``masks.npy`` and ``types.npy`` of one native fold under ``raw_dir``."""
    root = Path(raw_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: raw PanNuke folder missing; download it (--download) or point to the extracted folds")
    out = {}
    for key in ("images", "masks", "types"):
        hits = [p for p in root.rglob(f"{key}.npy") if _fold_of(p, root) == fold]
        if not hits:
            raise FileNotFoundError(f"{root}: no {key}.npy for fold {fold}; expected e.g. "
                                    f"'Fold {fold}/{'masks' if key == 'masks' else 'images'}/fold{fold}/{key}.npy'")
        if len(hits) > 1:
            raise ValueError(f"{root}: several {key}.npy files for fold {fold}: {[str(h) for h in hits]}; keep one")
        out[key] = hits[0]
    return out


def _read_types(path: Path, n: int) -> list[str]:
    types = open_npy(path, "one tissue name per tile", ndim=1)
    if types.dtype.kind not in "US":
        raise ValueError(f"{path}: tissue names must be strings, got dtype {types.dtype}")
    names = [t.decode() if isinstance(t, bytes) else str(t) for t in np.asarray(types)]
    for i, t in enumerate(names):
        if not t.strip():
            raise ValueError(f"{path}, index {i}: empty tissue name")
    return names


def open_fold(raw_dir: str | os.PathLike, fold: int) -> dict:
    """Check one fold's files (shapes, dtypes, counts) without reading the pixel data."""
    files = find_fold_files(raw_dir, fold)
    images = open_npy(files["images"], "RGB tiles of shape (N, H, W, 3)", ndim=4, last_dim=3)
    masks = open_npy(files["masks"], "masks of shape (N, H, W, 6): 5 class channels of instance ids + background", ndim=4,
                     last_dim=6)
    if images.dtype.kind not in "uif":
        raise ValueError(f"{files['images']}: dtype {images.dtype}; expected uint8 or float RGB values 0..255")
    if masks.dtype.kind not in "uif":
        raise ValueError(f"{files['masks']}: dtype {masks.dtype}; expected integer (or whole-number float) instance ids")
    types = _read_types(files["types"], len(images))
    counts = {"images": len(images), "masks": len(masks), "types": len(types)}
    if len(set(counts.values())) != 1:
        raise ValueError(f"fold {fold}: tile counts disagree: {files['images']} has {counts['images']}, "
                         f"{files['masks']} has {counts['masks']}, {files['types']} has {counts['types']}")
    if not counts["images"]:  # an empty fold would silently leave its split empty
        raise ValueError(f"fold {fold}: no tiles: {files['images']}, {files['masks']} and {files['types']} hold 0 tiles; "
                         "expected at least one tile per fold; download or extract the fold again")
    if images.shape[1:3] != masks.shape[1:3]:
        raise ValueError(f"fold {fold}: image size {images.shape[1:3]} ({files['images']}) differs from mask size "
                         f"{masks.shape[1:3]} ({files['masks']})")
    return {"fold": fold, "files": files, "count": len(images), "types": types}


# ------------------------------------------------------------------------------------- instances


def instance_map(channels: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Instance map, class map and number of overlap pixels from the class channels, shape (5, H, W).

    Implements the rule of the module docstring: per-channel ids kept, overlaps to the smaller cell.
    Channel-first so that every step works on contiguous planes.
    """
    c, h, w = channels.shape
    ids = channels.astype(np.int64, copy=False)
    max_id = int(ids.max()) if ids.size else 0
    if max_id == 0:
        return np.zeros((h, w), np.int32), np.zeros((h, w), np.uint8), 0
    fg = ids > 0
    claims = fg.sum(axis=0, dtype=np.uint8)
    overlap = int(np.count_nonzero(claims > 1))
    key = np.zeros((h, w), np.int64)  # unique per (channel, id): id + channel · (max_id + 1)
    channel = np.zeros((h, w), np.int64)
    if overlap == 0:
        for k in range(c):
            key[fg[k]] = ids[k][fg[k]] + k * (max_id + 1)
            channel[fg[k]] = k
    else:
        keys = np.where(fg, ids + (np.arange(c, dtype=np.int64) * (max_id + 1))[:, None, None], 0)
        if keys.max() < (1 << 24):
            area = np.bincount(keys.ravel())[keys]
        else:
            _, inverse, counts = np.unique(keys.ravel(), return_inverse=True, return_counts=True)
            area = counts[inverse].reshape(keys.shape)
        area[~fg] = np.iinfo(np.int64).max
        channel = area.argmin(axis=0)  # smallest cell wins; argmin keeps the lowest channel on ties
        key = np.take_along_axis(keys, channel[None], axis=0)[0]
    classes = np.where(key > 0, channel + 1, 0).astype(np.uint8)
    return sequential(key), classes, overlap


# ------------------------------------------------------------------------------------- convert


def _splits_for(ids: list[str], folds: np.ndarray, tissues: list[str], protocols: Sequence[str], seed: int,
                cisca_folds: str | os.PathLike | None) -> dict[str, np.ndarray]:
    columns = {}
    for p in protocols:
        if p.startswith("official"):
            columns[p] = splitting.pannuke_official_split(folds, int(p[-1]))
        elif p == "cisca":
            if cisca_folds is not None:
                given = splitting.read_split_csv(cisca_folds, ids)
                columns[p] = np.array([given[i] for i in ids])
            else:
                columns[p] = splitting.cisca_split(tissues, seed=seed)
    return columns


def convert(raw_dir: str | os.PathLike, out_dir: str | os.PathLike, protocol: str = DEFAULT_PROTOCOL,
            folds: Sequence[int] = FOLDS, seed: int = splitting.CISCA_SEED, cisca_folds: str | os.PathLike | None = None,
            overwrite: bool = False, progress: bool = True, chunk: int = 8, workers: int = 2) -> Path:
    """Convert native PanNuke folds into the prepared layout at ``out_dir``; return ``out_dir``.

    ``protocol`` (``official1``/``2``/``3`` or ``cisca``) is copied into the ``split`` column and sets
    the empty-image policy; every protocol is also written as ``split_<protocol>``.  The official
    protocols need all three folds.  ``cisca_folds``: the study's ``folds.csv`` to reproduce its exact
    CISCA split (otherwise a seeded split with the same proportions).  Tile ids follow the study:
    ``pannuke_<tissue>_fold<k>_<index>`` (index from 0).  Reads are memory-mapped, ``chunk`` tiles at
    a time.  On any error nothing is left at ``out_dir``.
    """
    raw_dir = Path(raw_dir)
    folds = tuple(int(k) for k in folds)
    if not folds or any(k not in FOLDS for k in folds) or len(set(folds)) != len(folds):
        raise ValueError(f"folds: expected distinct values among {FOLDS}, got {folds}")
    protocols = [p for p in PROTOCOLS if not p.startswith("official") or set(folds) == set(FOLDS)]
    if protocol not in protocols:
        raise ValueError(f"protocol {protocol!r} needs all three folds {FOLDS}; with folds {folds} use one of {protocols}")
    opened = [open_fold(raw_dir, k) for k in folds]

    ids, tissues, fold_of, index_of = [], [], [], []
    for f in opened:
        for i, t in enumerate(f["types"]):
            tissue = t.strip().lower()
            ids.append(f"pannuke_{safe_name(tissue)}_fold{f['fold']}_{i}")
            tissues.append(tissue)
            fold_of.append(f["fold"])
            index_of.append(i)
    columns = _splits_for(ids, np.array(fold_of), tissues, protocols, seed, cisca_folds)
    info = dataset_info(protocol, protocols)
    extra_columns = ("fold", "source_file", "source_index", "magnification", "mpp", "n_cells", "class_counts",
                     *(f"split_{p}" for p in protocols))

    def items():
        position = 0
        for f in opened:
            images_path, masks_path = f["files"]["images"], f["files"]["masks"]
            rel_images = images_path.relative_to(raw_dir).as_posix()
            mask_chunks = iter_npy_chunks(masks_path, chunk)
            for start, image_block in iter_npy_chunks(images_path, chunk):
                _, mask_block = next(mask_chunks)
                mask_block = np.ascontiguousarray(np.moveaxis(mask_block[..., :5], -1, 1))  # (n, 5, H, W)
                for j in range(len(image_block)):
                    i = start + j
                    where = f"{images_path} / {masks_path.name}, index {i}"
                    image = as_uint8_rgb(image_block[j], f"{images_path}, index {i}")
                    channels = as_integer_labels(mask_block[j], f"{masks_path}, index {i}")
                    label, classes, _ = instance_map(channels)
                    check_instance_map(label, where)
                    counts = class_counts(label, classes, len(CLASS_NAMES))
                    yield {"tile_id": ids[position], "image": image, "label": label, "classes": classes,
                           "tissue": tissues[position], "split": columns[protocol][position], "fold": f["fold"],
                           "source_file": rel_images, "source_index": i, "magnification": MAGNIFICATION, "mpp": MPP,
                           "n_cells": int(label.max()), "class_counts": ";".join(str(int(x)) for x in counts),
                           **{f"split_{p}": columns[p][position] for p in protocols}}
                    position += 1

    total = sum(f["count"] for f in opened)
    with PreparedWriter(out_dir, info, overwrite=overwrite, extra_columns=extra_columns) as writer:
        add_tiles(writer, tqdm(items(), total=total, desc="PanNuke", unit="tile", disable=not progress), workers=workers)
    return Path(out_dir)
