"""CytoDArk0 (Vadori et al. 2024): Nissl-stained mammalian brain, one cell class, 20x and 40x.

Native layout of the Zenodo release (record 13694738, ``cytoDArk0.zip``), as described by the
torch-em loader and METHOD.md §6.3::

    cytoDArk0/20x/1024x1024/image/<name>.png    69 images, 0.548 µm/px
    cytoDArk0/20x/1024x1024/label/<name>.tiff   instance maps
    cytoDArk0/20x/1024x1024/folds.csv           img_id,fold (0 train, 1 val, 2 test), if present
    cytoDArk0/40x/2048x2048/...                 58 images, 0.274 µm/px
    (plus smaller tiers 256x256, 512x512, ... and graymask4/ targets, not used: cellgap
    recomputes targets and cuts its own tiles)

The converter takes the largest ``<S>x<S>`` tier of the requested magnification and keeps the
full-size images; with ``tile_size`` (default 256) it also writes non-overlapping tiles
``<name>_<k>`` (k = 1.. row-major), the tier that validation and test read (§6.3).

**Brain area.**  Image numbers (``ID05…`` → 5) map to areas as in the release's metadata sheet:
1–53 auditory cortex (*Tursiops truncatus*), 54–57 cerebellum, 58–61 hippocampus, 62–69 visual
cortex.  Names that carry no number need a ``metadata`` CSV (``name`` or ``id``, ``area``).  The
exact naming of the release files could not be confirmed here; the number is read as the first
digits of the name, after an optional ``ID`` prefix.

**Protocol ``area_holdout``** (default, METHOD.md §6.3): the study's test images — 20x: ID 5, 10,
14, 22, 28, 43, 52, 53 (auditory), 55 (cerebellum), 60 (hippocampus) and every visual-cortex image
62–69; 40x: the same auditory images and 55 — a seeded, area-stratified 10 % of the other images is
validation.  If the release's ``folds.csv`` is present it is kept as protocol ``zenodo``.

Split columns when tiled: training rows are the *full-size* images (training takes random 256²
crops), validation and test rows are the *tiles*; ``split_full`` gives every full-size image its
split for whole-image evaluation.
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
from .native import add_tiles, check_instance_map, read_label_image, read_rgb, sequential, tiles
from .prepared import DatasetInfo, PreparedWriter
from .registry import DATASETS

# The dataset's facts live in its registry entry (cellgap.data.registry); the names below are kept for the converter.
SPEC = DATASETS["cytodark0"]
NAME = SPEC.name
CLASS_NAMES = SPEC.class_names
MPP = dict(SPEC.mpp)
MIN_CELL_SIZE = dict(SPEC.min_cell_size)
FULL_SIZE = {20: 1024, 40: 2048}
TILE_SIZE = 256

# Zenodo record 13694738; SHA-256 as published in the torch-em dataset table (not re-computed here).
SOURCES = (Source("cytoDArk0.zip", "https://zenodo.org/records/13694738/files/cytoDArk0.zip",
                  "ce4b05675aa5057e277c8d4ab74524307e2402a3703f6bd80643b93ca9b70ff8"),)

AREAS = ((1, 53, "Auditory Cortex"), (54, 57, "Cerebellum"), (58, 61, "Hippocampus"), (62, 69, "Visual Cortex"))
TEST_IDS = {20: (5, 10, 14, 22, 28, 43, 52, 53, 55, 60, *range(62, 70)),
            40: (5, 10, 14, 22, 28, 43, 52, 53, 55)}

PROTOCOLS = {p.name: {"empty_policy": p.empty_policy, "description": p.description} for p in SPEC.protocols}
DEFAULT_PROTOCOL = SPEC.default_protocol


def _check_magnification(magnification: int) -> int:
    if magnification not in MPP:
        raise ValueError(f"magnification: CytoDArk0 exists at 20 and 40, got {magnification!r}")
    return int(magnification)


def dataset_info(magnification: int = 20, protocol: str = DEFAULT_PROTOCOL, protocols=tuple(PROTOCOLS),
                 tile_size: int | None = TILE_SIZE) -> DatasetInfo:
    mag = _check_magnification(magnification)
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol: expected one of {sorted(PROTOCOLS)}, got {protocol!r}")
    return DatasetInfo(
        name=f"{NAME}_{mag}x", class_names=CLASS_NAMES, magnification=mag, mpp=MPP[mag], min_cell_size=MIN_CELL_SIZE[mag],
        empty_policy=PROTOCOLS[protocol]["empty_policy"], tissue_label="brain area",
        description=f"CytoDArk0 Nissl-stained brain at {mag}x; split = {PROTOCOLS[protocol]['description']}",
        extra={"protocol": protocol,
               "protocols": {p: {"column": f"split_{p}", "default": p == protocol, **PROTOCOLS[p]} for p in protocols},
               "tile_size": tile_size, "test_ids": list(TEST_IDS[mag]),
               "areas": [{"ids": [a, b], "area": name} for a, b, name in AREAS],
               "source": "https://zenodo.org/records/13694738",
               "split_usage": "when tiled, train rows are full-size images and val/test rows are tiles; "
                              "split_full holds every full-size image's split"},
    )


def download(raw_dir: str | os.PathLike, urls: str | Mapping[str, str] | None = None, archives=None,
             progress: bool = True) -> Path:
    """Download (or take from ``archives``) ``cytoDArk0.zip``, verify and extract it into ``raw_dir``."""
    return fetch_sources(SOURCES, raw_dir, urls=urls, archives=archives, progress=progress)


# ----------------------------------------------------------------------------------------- reading


def find_tier(raw_dir: str | os.PathLike, magnification: int) -> Path:
    """The largest ``<S>x<S>`` folder (with ``image/``) under a ``<mag>x`` folder of ``raw_dir``."""
    root = Path(raw_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: raw CytoDArk0 folder missing; download it (--download) or point to the extracted release")
    tiers = []
    for image_dir in root.rglob("image"):
        tier = image_dir.parent
        m = re.fullmatch(r"(\d+)x(\d+)", tier.name)
        if image_dir.is_dir() and m and m.group(1) == m.group(2) and tier.parent.name.lower() == f"{magnification}x":
            tiers.append((int(m.group(1)), tier))
    if not tiers:
        raise FileNotFoundError(f"{root}: no '{magnification}x/<S>x<S>/image' folder; expected the CytoDArk0 layout "
                                f"cytoDArk0/{magnification}x/{FULL_SIZE[magnification]}x{FULL_SIZE[magnification]}/image/*.png")
    tiers.sort(key=lambda t: t[0])
    if len(tiers) > 1 and tiers[-1][0] == tiers[-2][0]:
        raise ValueError(f"{root}: several {tiers[-1][0]}x{tiers[-1][0]} tiers at {magnification}x: {tiers[-1][1]}, {tiers[-2][1]}")
    return tiers[-1][1]


def image_number(name: str) -> int | None:
    """The image number in a CytoDArk0 name (``ID05_x`` → 5), or None."""
    m = re.match(r"(?i)^(?:id)?[_-]?0*(\d+)", name)
    return int(m.group(1)) if m else None


def area_of_number(number: int) -> str | None:
    for first, last, area in AREAS:
        if first <= number <= last:
            return area
    return None


def read_area_table(path: str | os.PathLike) -> dict[str, str]:
    """``name``/``id`` → area from a CSV with columns (``name`` or ``id``) and ``area``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: metadata file missing; expected a CSV with columns name (or id) and area")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = {h.strip().lower(): h for h in (reader.fieldnames or [])}
        key = header.get("name") or header.get("id")
        area = header.get("area")
        if key is None or area is None:
            raise ValueError(f"{path}: expected columns 'name' (or 'id') and 'area', got {reader.fieldnames}")
        table: dict[str, str] = {}
        first_row: dict[str, int] = {}
        for line, row in enumerate(reader, start=2):
            cells = {}
            for column, what in ((key, "an image name or number"), (area, "a brain area name")):
                value = row[column]
                if value is None:  # the row ends before this column
                    raise ValueError(f"{path}, row {line}: no {column!r} cell; expected {what}")
                if not value.strip():
                    raise ValueError(f"{path}, row {line}: empty {column!r}; expected {what}")
                cells[column] = value.strip()
            name, value = cells[key], cells[area]
            if name in table and table[name] != value:
                raise ValueError(f"{path}, row {line}: {name!r} listed with two areas "
                                 f"({table[name]!r} on row {first_row[name]}, {value!r})")
            table[name] = value
            first_row.setdefault(name, line)
        return table


def _area(name: str, table: dict[str, str] | None, where: str, metadata: str | os.PathLike | None = None) -> tuple[int | None, str]:
    number = image_number(name)
    if table:
        for key in (name, str(number) if number is not None else None):
            if key is not None and key in table:
                return number, table[key]
    # A metadata CSV was given but does not list this image: say so instead of asking for one.
    fix = (f"add a row {name},<area> to {metadata}" if metadata is not None
           else "pass metadata= a CSV with columns name,area")
    unlisted = f"not listed in {metadata} (by name or image number) and " if metadata is not None else ""
    if number is None:
        raise ValueError(f"{where}: {unlisted}cannot read an image number from the name {name!r} "
                         f"(expected e.g. 'ID05_...'); {fix}")
    area = area_of_number(number)
    if area is None:
        raise ValueError(f"{where}: {unlisted}image number {number} is outside the known CytoDArk0 ids 1–69; {fix}")
    return number, area


# ----------------------------------------------------------------------------------------- convert


def convert(raw_dir: str | os.PathLike, out_dir: str | os.PathLike, magnification: int = 20,
            protocol: str = DEFAULT_PROTOCOL, tile_size: int | None = TILE_SIZE, seed: int = splitting.CISCA_SEED,
            metadata: str | os.PathLike | None = None, overwrite: bool = False, progress: bool = True,
            workers: int = 2) -> Path:
    """Convert one magnification of CytoDArk0 into the prepared layout at ``out_dir``; return ``out_dir``.

    Full-size images are kept; ``tile_size`` (256 by default, None to skip) adds the tile tier.
    ``metadata``: CSV mapping names or image numbers to areas, overriding the built-in table.
    On any error nothing is left at ``out_dir``.
    """
    mag = _check_magnification(magnification)
    raw_dir = Path(raw_dir)
    tier = find_tier(raw_dir, mag)
    image_paths = sorted(p for p in (tier / "image").iterdir() if p.suffix.lower() in (".png", ".tif", ".tiff"))
    if not image_paths:
        raise FileNotFoundError(f"{tier / 'image'}: no images (.png/.tif)")
    by_stem: dict[str, Path] = {}
    for path in image_paths:  # one tile id per name: ID01.png next to ID01.tif is ambiguous
        if path.stem in by_stem:
            raise ValueError(f"{tier / 'image'}: two images for {path.stem!r}: {by_stem[path.stem].name} and {path.name}; keep one")
        by_stem[path.stem] = path
    label_dir = tier / "label"
    names, label_paths, numbers, areas = [], [], [], []
    table = read_area_table(metadata) if metadata is not None else None
    for path in image_paths:
        candidates = [label_dir / f"{path.stem}{ext}" for ext in (".tiff", ".tif", ".png")]
        label = next((c for c in candidates if c.is_file()), None)
        if label is None:
            raise FileNotFoundError(f"{path}: no instance map {label_dir / (path.stem + '.tiff')}")
        number, area = _area(path.stem, table, str(path), metadata)
        names.append(path.stem)
        label_paths.append(label)
        numbers.append(number)
        areas.append(area)

    test_names = [n for n, k in zip(names, numbers) if k in TEST_IDS[mag]]
    columns = {"area_holdout": splitting.holdout_split(names, test_names, areas, seed=seed)}
    folds_csv = tier / "folds.csv"
    if folds_csv.is_file():
        given = splitting.read_split_csv(folds_csv, names, allow_unlisted=True)
        columns["zenodo"] = np.array([given.get(n, "") for n in names])
    if protocol not in columns:
        raise ValueError(f"protocol {protocol!r} not available: {folds_csv} is missing" if protocol == "zenodo"
                         else f"protocol: expected one of {sorted(columns)}, got {protocol!r}")
    protocols = tuple(columns)
    info = dataset_info(mag, protocol, protocols, tile_size)
    extra_columns = ("image_number", "tier", "parent", "source_file", "magnification", "mpp", "n_cells", "split_full",
                     *(f"split_{p}" for p in protocols))

    def usage(split: str, is_tile: bool) -> str:
        # When tiled: train reads full-size images (random crops), val/test read tiles (§6.3).
        if tile_size is None:
            return split
        return split if (split in ("val", "test")) == is_tile else ""

    def items():
        for i, name in enumerate(names):
            image = read_rgb(image_paths[i])
            label = read_label_image(label_paths[i])
            where = f"{label_paths[i]}"
            if label.shape != image.shape[:2]:
                raise ValueError(f"{where}: instance map shape {label.shape} does not match image {image.shape[:2]} ({image_paths[i]})")
            check_instance_map(label, where)
            label = sequential(label)
            common = {"tissue": areas[i], "image_number": numbers[i] if numbers[i] is not None else "",
                      "source_file": image_paths[i].relative_to(raw_dir).as_posix(), "magnification": mag, "mpp": MPP[mag]}
            own = {p: columns[p][i] for p in protocols}
            yield {"tile_id": name, "image": image, "label": label, "classes": (label > 0).astype(np.uint8),
                   "split": usage(own[protocol], False), "tier": "full", "parent": "", "n_cells": int(label.max()),
                   "split_full": own[protocol], **{f"split_{p}": usage(own[p], False) for p in protocols}, **common}
            if tile_size is None:
                continue
            label_tiles = tiles(label, tile_size, where)
            for k, image_tile in tiles(image, tile_size, str(image_paths[i])):
                _, label_tile = next(label_tiles)
                label_tile = sequential(label_tile)
                yield {"tile_id": f"{name}_{k}", "image": np.ascontiguousarray(image_tile), "label": label_tile,
                       "classes": (label_tile > 0).astype(np.uint8), "split": usage(own[protocol], True), "tier": "tile",
                       "parent": name, "n_cells": int(label_tile.max()), "split_full": "",
                       **{f"split_{p}": usage(own[p], True) for p in protocols}, **common}

    with PreparedWriter(out_dir, info, overwrite=overwrite, extra_columns=extra_columns) as writer:
        add_tiles(writer, tqdm(items(), desc=f"CytoDArk0 {mag}x", unit="tile", disable=not progress), workers=workers)
    return Path(out_dir)
