"""The user's own annotated tiles, from a folder::

    <raw>/images/<name>.png|.tif|.tiff|.jpg     RGB, greyscale, 16-bit, RGBA (cellgap.data.image_kinds' rule)
    <raw>/labels/<name>.tif|.tiff|.png|.nii|.nii.gz   instance map (0 = background, one id per cell)
    <raw>/classes/<name>.tif|.png|.nii.gz       optional per-pixel class map 0..C, or
    <raw>/classes/<name>.csv                    optional per-instance classes:
                                                ``instance_id,class`` (1..C) or ``instance_id,class_name``
    <raw>/split.csv                             optional: ``id,split[,tissue]`` (train/val/test)
    <raw>/cellgap.json                          optional facts: name, class_names, magnification, mpp,
                                                min_cell_size, empty_policy, tissue_label, description,
                                                stain_kind (he, ihc, nissl, fluorescence, other; default he)
                                                (checked by type; arguments override it)

Without ``classes/`` the dataset has one class.  Without a split file a seeded split is generated
(the CISCA procedure: 80/20 then 90/10, stratified by tissue when a tissue is given); fewer than
:data:`SEEDED_SPLIT_MIN_IMAGES` images all go to train, where ``cellgap train`` holds validation tiles out.  Images
larger than the network tile are kept whole (training takes random crops); ``tile_size`` adds
non-overlapping tiles for validation/test as for CytoDArk0.  One file that cannot be converted does not stop
the others (see :func:`convert`).
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..failures import BatchFailures, describe, listing
from ..magnification import parse_magnification
from . import splits as splitting
from .image_kinds import IMAGE_SUFFIXES, read_image
from .native import (
    LABEL_SUFFIXES,
    add_tiles,
    check_instance_map,
    class_counts,
    read_label_image,
    sequential,
    strip_suffix,
    tiles,
)
from .prepared import EMPTY_POLICIES, DatasetInfo, PreparedWriter
from .stain import STAIN_KINDS

NAME = "folder"
CONFIG = "cellgap.json"
DEFAULT_CLASS_NAMES = ("cell",)
FAILURES_KEY = "conversion_failures"  # dataset.json extra: [{"file", "reason"}] of the files not converted


def _files_by_name(folder: Path, suffixes: Sequence[str], what: str) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name.lower().endswith(tuple(suffixes)) and not path.name.startswith("."):
            name = strip_suffix(path.name)
            if name in out:
                raise ValueError(f"{folder}: two {what} for {name!r}: {out[name].name} and {path.name}; keep one")
            out[name] = path
    return out


FACTS = {  # field of cellgap.json / argument of dataset_info -> what a valid value is
    "name": "a non-empty name",
    "class_names": 'a list of distinct, non-empty class names such as ["tumour", "immune"]',
    "magnification": "a positive number such as 20 or 40",
    "mpp": "a positive pixel size in µm/pixel such as 0.25",
    "min_cell_size": "a whole number of pixels ≥ 1, or null for the magnification's default",
    "empty_policy": f"one of {list(EMPTY_POLICIES)}",
    "tissue_label": 'a non-empty text such as "tissue"',
    "description": "a text",
    "stain_kind": f"one of {list(STAIN_KINDS)}",
}


def _fact(field: str, value):
    """``value`` of dataset fact ``field``, normalised ('40x' -> 40.0, 50.0 -> 50); ValueError if it is not valid."""
    def positive(v) -> bool:
        return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v) and v > 0

    if value is None and field in ("class_names", "magnification", "mpp", "min_cell_size"):
        return None  # not given: the default, or derived from the other of magnification/mpp
    if field == "magnification" and isinstance(value, str):
        try:
            value = parse_magnification(value)
        except ValueError:
            pass
    if field == "min_cell_size" and isinstance(value, (float, np.floating)) and float(value).is_integer():
        value = int(value)
    if field == "class_names":
        ok = (isinstance(value, (list, tuple)) and len(value) > 0
              and all(isinstance(n, str) and n.strip() for n in value) and len(set(value)) == len(value))
    elif field in ("magnification", "mpp"):
        ok = positive(value)
    elif field == "min_cell_size":
        ok = positive(value) and isinstance(value, (int, np.integer))
    elif field == "empty_policy":
        ok = value in EMPTY_POLICIES
    elif field == "description":
        ok = isinstance(value, str)
    elif field == "stain_kind":
        ok = value in STAIN_KINDS
    else:
        ok = isinstance(value, str) and bool(value.strip())
    if not ok:
        raise ValueError(FACTS[field])
    return tuple(value) if field == "class_names" else value


def _unsupported_namesake(folder: Path, name: str, suffixes: Sequence[str], what: str) -> None:
    """Raise if ``folder`` holds ``name`` in a format that is not read (e.g. a .jpg image), the likely
    reason why the file seems missing."""
    for path in sorted(folder.iterdir()):
        if path.is_file() and strip_suffix(path.name) == name and not path.name.lower().endswith(tuple(suffixes)):
            *rest, last = suffixes
            raise ValueError(f"{path}: {what} format {path.name[len(name):]!r} is not supported; expected "
                             f"{', '.join(rest)} or {last} (convert it)")


def read_config(raw_dir: Path, overrides: dict) -> dict:
    """Facts from ``<raw>/cellgap.json`` (if present) updated by explicit arguments that are not None."""
    path = raw_dir / CONFIG
    config: dict = {}
    if path.is_file():
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(config, dict):
            raise ValueError(f"{path}: expected a JSON object with class_names, magnification or mpp, ...")
        unknown = set(config) - set(FACTS)
        if unknown:
            raise ValueError(f"{path}: unknown field(s) {sorted(unknown)}; expected some of {sorted(FACTS)}")
        # Checked here so that the error names the file (dataset_info checks arguments again).
        for field, value in config.items():
            try:
                config[field] = _fact(field, value)
            except ValueError as e:
                raise ValueError(f"{path}: field {field!r} is {value!r}; expected {e}") from None
    given = {k: v for k, v in overrides.items() if v is not None}
    # Magnification and pixel size describe one fact: an argument for one replaces the file's pair.
    if ("magnification" in given) != ("mpp" in given):
        config.pop("mpp" if "magnification" in given else "magnification", None)
    config.update(given)
    return config


def dataset_info(class_names: Sequence[str] | None = None, magnification: float | None = None, mpp: float | None = None,
                 name: str = NAME, min_cell_size: int | None = None, empty_policy: str = "skip",
                 tissue_label: str = "tissue", description: str = "", stain_kind: str = "he") -> DatasetInfo:
    """Facts of a user folder.  Give ``magnification`` or ``mpp`` (or both); the other is derived
    with the usual 40x ≈ 0.25 µm/px convention."""
    facts = {"name": name, "class_names": class_names, "magnification": magnification, "mpp": mpp,
             "min_cell_size": min_cell_size, "empty_policy": empty_policy, "tissue_label": tissue_label,
             "description": description, "stain_kind": stain_kind}
    for field, value in facts.items():
        try:
            facts[field] = _fact(field, value)
        except ValueError as e:
            raise ValueError(f"{field}: got {value!r}; expected {e}") from None
    magnification, mpp = facts["magnification"], facts["mpp"]
    if magnification is None and mpp is None:
        raise ValueError("magnification or mpp: give at least one (e.g. magnification=40 or mpp=0.25), "
                         f"as an argument or in {CONFIG}; they set cell sizes and detection radii")
    if mpp is None:
        mpp = 10.0 / magnification
    if magnification is None:
        magnification = 10.0 / mpp
    return DatasetInfo(name=facts["name"], class_names=facts["class_names"] or DEFAULT_CLASS_NAMES,
                       magnification=int(round(magnification)), mpp=float(mpp), min_cell_size=facts["min_cell_size"],
                       empty_policy=facts["empty_policy"], tissue_label=facts["tissue_label"],
                       description=facts["description"] or "user folder", extra={"protocol": "given", "protocols": {}},
                       stain_kind=facts["stain_kind"])


def _classes_from_csv(path: Path, label: np.ndarray, class_names: Sequence[str]) -> np.ndarray:
    """Paint a class map from ``instance_id,class`` or ``instance_id,class_name`` rows."""
    lookup = {n: i + 1 for i, n in enumerate(class_names)}
    lookup_lower = {n.lower(): i for n, i in lookup.items()}
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        if "instance_id" not in header or not ({"class", "class_name"} & set(header)):
            raise ValueError(f"{path}: expected columns instance_id and class (1..{len(class_names)}) or class_name, got {header}")
        by_id: dict[int, int] = {}
        for line, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            try:
                instance = int(row["instance_id"])
            except ValueError:
                raise ValueError(f"{path}, row {line}: instance_id {row['instance_id']!r} is not an integer") from None
            if "class" in row and row["class"]:
                try:
                    value = int(row["class"])
                except ValueError:
                    raise ValueError(f"{path}, row {line}: class {row['class']!r} is not an integer 1..{len(class_names)}") from None
                if not 1 <= value <= len(class_names):
                    raise ValueError(f"{path}, row {line}: unknown class id {value}; expected 1..{len(class_names)} "
                                     f"({', '.join(class_names)})")
            else:
                text = row.get("class_name", "")
                value = lookup.get(text) or lookup_lower.get(text.lower())
                if value is None:
                    raise ValueError(f"{path}, row {line}: unknown class name {text!r}; expected one of {list(class_names)}")
            if instance in by_id and by_id[instance] != value:
                raise ValueError(f"{path}, row {line}: instance {instance} listed with two classes")
            by_id[instance] = value
    present = np.unique(label[label > 0])
    missing = [int(i) for i in present if int(i) not in by_id]
    if missing:
        raise ValueError(f"{path}: instance(s) {missing[:5]} of the label map have no class row")
    extra = sorted(set(by_id) - {int(i) for i in present})
    if extra:
        raise ValueError(f"{path}: rows for instance id(s) {extra[:5]} that are not in the label map")
    lut = np.zeros(int(label.max()) + 1, np.uint8)
    for instance, value in by_id.items():
        lut[instance] = value
    return lut[label]


# Below this many images a folder without split.csv goes to train whole (cellgap train holds out validation tiles).
SEEDED_SPLIT_MIN_IMAGES = 5


def convert(raw_dir: str | os.PathLike, out_dir: str | os.PathLike, class_names: Sequence[str] | None = None,
            magnification: float | None = None, mpp: float | None = None, name: str | None = None,
            min_cell_size: int | None = None, empty_policy: str | None = None, stain_kind: str | None = None,
            split_csv: str | os.PathLike | None = None,
            seed: int = splitting.CISCA_SEED, tile_size: int | None = None, overwrite: bool = False, progress: bool = True,
            workers: int = 2) -> Path:
    """Convert a user folder into the prepared layout at ``out_dir``; return ``out_dir``.

    Every image needs a label (and a class file when ``classes/`` exists); every label and class
    file needs an image.  ``split_csv`` (default ``<raw>/split.csv`` if present) must list every
    image.  These and the facts are checked first; on such an error nothing is left at ``out_dir``.

    A file that cannot be converted (unreadable or refused image, unreadable label or class map, shapes that
    disagree, a label that is not an instance map) is printed as ``FAILED <file>: <reason>``, the others are
    converted, ``dataset.json``'s ``extra.conversion_failures`` lists ``{"file", "reason"}`` (empty when all were
    converted), and once the folder is complete :class:`cellgap.failures.BatchFailures` says how many failed.
    When every file fails, or class ids contradict the class names, nothing is written (ValueError).
    """
    raw_dir = Path(raw_dir)
    for sub in ("images", "labels"):
        if not (raw_dir / sub).is_dir():
            raise FileNotFoundError(f"{raw_dir / sub}: folder missing; expected {raw_dir}/images and {raw_dir}/labels")
    config = read_config(raw_dir, {"class_names": class_names, "magnification": magnification, "mpp": mpp, "name": name,
                                   "min_cell_size": min_cell_size, "empty_policy": empty_policy, "stain_kind": stain_kind})
    info = dataset_info(**{"name": NAME, **config})

    images = _files_by_name(raw_dir / "images", IMAGE_SUFFIXES, "images")
    labels = _files_by_name(raw_dir / "labels", LABEL_SUFFIXES, "label maps")
    if not images:
        raise FileNotFoundError(f"{raw_dir / 'images'}: no images ({', '.join(IMAGE_SUFFIXES)})")
    class_dir = raw_dir / "classes"
    class_files = _files_by_name(class_dir, LABEL_SUFFIXES + (".csv",), "class files") if class_dir.is_dir() else None
    if class_files is not None and "class_names" not in config:
        raise ValueError(f"{class_dir}: class files given but no class names; set class_names (argument or {CONFIG})")
    for kind, files in (("label map", labels), ("class file", class_files or {})):
        orphans = sorted(set(files) - set(images))
        for n in orphans:
            _unsupported_namesake(raw_dir / "images", n, IMAGE_SUFFIXES, "image")
        if orphans:
            raise ValueError(f"{raw_dir}: {kind}(s) without an image: {orphans[:5]}")
    names = sorted(images)
    for n in names:
        if n not in labels:
            _unsupported_namesake(raw_dir / "labels", n, LABEL_SUFFIXES, "label")
            raise FileNotFoundError(f"{images[n]}: no label map {raw_dir / 'labels' / n}.tif (or .tiff/.png/.nii.gz)")
        if class_files is not None and n not in class_files:
            raise FileNotFoundError(f"{images[n]}: no class file {class_dir / n}.tif (or .png/.csv)")

    split_path = Path(split_csv) if split_csv is not None else raw_dir / "split.csv"
    tissue = {n: "" for n in names}
    if split_path.is_file():
        given = splitting.read_split_csv(split_path, names)
        split = np.array([given[n] for n in names])
        with open(split_path, newline="", encoding="utf-8-sig") as f:
            for row in csv.DictReader(f):
                row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
                key = next((row[k] for k in ("id", "image", "img_id", "name") if k in row), "")
                key = strip_suffix(key) if key not in tissue else key
                if key in tissue and row.get("tissue"):
                    tissue[key] = row["tissue"]
        protocol = "given"
    elif split_csv is not None:
        raise FileNotFoundError(f"{split_path}: split file missing")
    elif len(names) < SEEDED_SPLIT_MIN_IMAGES:  # 80/20 then 90/10 of so few images would leave nothing to train on
        split = np.full(len(names), "train")
        protocol = "seeded"
        print(f"{raw_dir}: {len(names)} images, too few for a seeded train/val/test split: all train (training holds "
              f"tiles out of them for validation); give a split.csv to keep a test image apart", flush=True)
    else:
        split = splitting.cisca_split([tissue[n] for n in names], seed=seed)
        protocol = "seeded"
    info = DatasetInfo(**{**info.to_json(), "extra": {
        "protocol": protocol, "tile_size": tile_size,
        "protocols": {protocol: {"column": f"split_{protocol}", "default": True, "empty_policy": info.empty_policy,
                                 "description": f"split from {split_path.name}" if protocol == "given"
                                 else f"seeded (seed {seed}) stratified 80/20 then 90/10"}},
        "split_usage": "when tiled, train rows are full-size images and val/test rows are tiles"}})
    extra_columns = ("source_file", "magnification", "mpp", "n_cells", "class_counts", "tier", "parent", "split_full",
                     f"split_{protocol}")

    def usage(s: str, is_tile: bool) -> str:
        if tile_size is None:
            return s
        return s if (s in ("val", "test")) == is_tile else ""

    failures: list[dict] = []

    def load(n: str):
        """One file's image, label and class map (None for a CSV or no classes): an error here belongs to this
        file alone (unreadable, an image kind the reader refuses, shapes that disagree, not an instance map)."""
        current = images[n]
        try:
            image = read_image(current)
            current = labels[n]
            raw_label = read_label_image(current)
            if raw_label.shape != image.shape[:2]:
                hint = " (NIfTI stored transposed? the first axis must be rows)" if raw_label.shape == image.shape[1::-1] else ""
                raise ValueError(f"{labels[n]}: label shape {raw_label.shape} does not match image {image.shape[:2]} "
                                 f"({images[n]}){hint}")
            check_instance_map(raw_label, str(labels[n]))
            class_map = None
            if class_files is not None and class_files[n].suffix.lower() != ".csv":
                current = class_files[n]
                class_map = read_label_image(current)
                if class_map.shape != raw_label.shape:
                    raise ValueError(f"{class_files[n]}: class map shape {class_map.shape} does not match label {raw_label.shape}")
        except Exception as error:  # reported, and the other files are converted
            failure = {"file": current.relative_to(raw_dir).as_posix(), "reason": describe(error)}
            failures.append(failure)
            tqdm.write(f"FAILED {failure['file']}: {failure['reason']}", file=sys.stderr)
            return None
        return image, raw_label, class_map

    def items():
        for i, n in enumerate(names):
            loaded = load(n)
            if loaded is None:
                continue
            image, raw_label, classes = loaded
            # Class ids that contradict the class names stop the conversion: the names are likely wrong for all files.
            if class_files is None:
                classes = (raw_label > 0).astype(np.uint8)
            elif classes is None:
                classes = _classes_from_csv(class_files[n], raw_label, info.class_names)
            else:
                if classes.max() > info.num_classes:
                    raise ValueError(f"{class_files[n]}: unknown class id {int(classes.max())}; expected 0..{info.num_classes} "
                                     f"({', '.join(info.class_names)})")
                classes = classes.astype(np.uint8)
            label = sequential(raw_label)
            common = {"tissue": tissue[n], "source_file": images[n].relative_to(raw_dir).as_posix(),
                      "magnification": info.magnification, "mpp": info.mpp}
            counts = class_counts(label, classes, info.num_classes)
            yield {"tile_id": n, "image": image, "label": label, "classes": classes, "split": usage(split[i], False),
                   "n_cells": int(label.max()), "class_counts": ";".join(str(int(x)) for x in counts), "tier": "full",
                   "parent": "", "split_full": split[i], f"split_{protocol}": usage(split[i], False), **common}
            if tile_size is None:
                continue
            label_tiles = tiles(label, tile_size, str(labels[n]))
            class_tiles = tiles(classes, tile_size, str(labels[n]))
            for k, image_tile in tiles(image, tile_size, str(images[n])):
                _, lt = next(label_tiles)
                _, ct = next(class_tiles)
                lt = sequential(lt)
                counts = class_counts(lt, ct, info.num_classes)
                yield {"tile_id": f"{n}_{k}", "image": np.ascontiguousarray(image_tile), "label": lt,
                       "classes": np.ascontiguousarray(ct), "split": usage(split[i], True), "n_cells": int(lt.max()),
                       "class_counts": ";".join(str(int(x)) for x in counts), "tier": "tile", "parent": n, "split_full": "",
                       f"split_{protocol}": usage(split[i], True), **common}

    with PreparedWriter(out_dir, info, overwrite=overwrite, extra_columns=extra_columns) as writer:
        add_tiles(writer, tqdm(items(), total=None if tile_size else len(names), desc=info.name, unit="tile",
                               disable=not progress), workers=workers)
        if len(failures) == len(names):  # nothing to prepare: a dataset-level error (the partial folder is removed)
            raise ValueError(f"{raw_dir}: none of the {len(names)} image(s) could be converted: {listing(failures, 10)}")
        writer.info.extra[FAILURES_KEY] = failures  # the record: dataset.json's extra.conversion_failures
    if failures:
        raise BatchFailures(f"converted {len(names) - len(failures)} of {len(names)} images; {len(failures)} failed: "
                            f"{listing(failures, 10)}. The others are in {out_dir}; the failures are listed in "
                            f"{Path(out_dir) / 'dataset.json'} (extra.{FAILURES_KEY})", failures=failures, output=Path(out_dir))
    return Path(out_dir)
