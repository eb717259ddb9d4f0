"""Train/val/test splits and the evaluation protocols of each dataset.

A split is an array of ``"train" | "val" | "test"`` with one entry per tile, written into the
prepared manifest as a column: ``split`` holds the dataset's default protocol, ``split_<protocol>``
the others.

* PanNuke official protocol (PanNuke paper, CellViT): three splits over the native folds —
  split 1 trains on fold 1, validates on fold 2, tests on fold 3; split 2: 2/1/3; split 3: 3/2/1.
* CISCA split (METHOD.md §6.1): all tiles pooled, a tissue-stratified 80/20 split into
  train+val / test, then a stratified 90/10 split of train+val into train / val (≈72/8/20).
* CoNIC (§6.2): the same 80/20 then 90/10 procedure applied to *source images* stratified by
  cohort, so that all patches of one source image land in the same split.
* CytoDArk0 (§6.3): a fixed list of test images (area hold-out); a seeded area-stratified 10 % of
  the rest is validation.
* User folders: a given split file, or the seeded stratified split above.

The reference used scikit-learn's ``StratifiedShuffleSplit`` (seed 5, draw #1).  scikit-learn is
not a dependency, so :func:`stratified_split` is a numpy implementation that reproduces the
*proportions* per stratum (largest-remainder allocation), not scikit-learn's exact draws.  To
reproduce the study's exact CISCA split, pass its ``folds.csv`` (see :func:`read_split_csv`).
"""

from __future__ import annotations

import csv
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

SPLIT_NAMES = ("train", "val", "test")
CISCA_SEED = 5
CISCA_TEST_FRACTION = 0.2
CISCA_VAL_FRACTION = 0.1

# (train fold, val fold, test fold) of the three official PanNuke splits.
PANNUKE_OFFICIAL_FOLDS = {1: (1, 2, 3), 2: (2, 1, 3), 3: (3, 2, 1)}

# Names accepted in split files, mapped to ours; CISCA's folds.csv uses 0/1/2.
_SPLIT_ALIASES = {"train": "train", "training": "train", "0": "train",
                  "val": "val", "valid": "val", "validation": "val", "1": "val",
                  "test": "test", "testing": "test", "2": "test"}


def _allocate(counts: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` picks over strata in proportion to ``counts`` (largest remainder).

    Every stratum with at least two members gets at least one pick and keeps at least one member,
    so that no stratum is missing from either side; the total is then restored where the bounds allow.
    """
    n = counts.sum()
    exact = counts * (total / n) if n else np.zeros(len(counts))
    alloc = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - alloc), kind="stable")
    for i in order[: max(0, total - alloc.sum())]:
        alloc[i] += 1
    lower = np.where(counts >= 2, 1, 0)
    upper = np.where(counts >= 2, counts - 1, counts)
    if total >= (counts >= 2).sum():
        alloc = np.clip(alloc, lower, upper)
    else:
        alloc = np.minimum(alloc, upper)
    # Restore the total: take from / give to the strata furthest above / below their exact share.
    while alloc.sum() > total:
        room = np.where(alloc > lower, alloc - exact, -np.inf)
        if not np.isfinite(room.max()):
            break
        alloc[int(np.argmax(room))] -= 1
    while alloc.sum() < total:
        room = np.where(alloc < upper, exact - alloc, -np.inf)
        if not np.isfinite(room.max()):
            break
        alloc[int(np.argmax(room))] += 1
    return alloc


def stratified_split(strata: Sequence, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask choosing ``ceil(fraction · n)`` items, spread over strata in proportion.

    Within each stratum the chosen items are a uniform random sample.  Strata with at least two
    items are represented on both sides whenever the requested total allows it.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction: expected a number strictly between 0 and 1, got {fraction!r}")
    strata = np.asarray([str(s) for s in strata])
    n = len(strata)
    chosen = np.zeros(n, dtype=bool)
    if n == 0:
        return chosen
    names, inverse = np.unique(strata, return_inverse=True)
    counts = np.bincount(inverse, minlength=len(names))
    # scikit-learn's convention: the chosen side gets ceil(fraction · n) items.
    alloc = _allocate(counts, math.ceil(fraction * n - 1e-9))
    for k in range(len(names)):
        members = np.flatnonzero(inverse == k)
        chosen[rng.permutation(members)[: alloc[k]]] = True
    return chosen


def cisca_split(strata: Sequence, seed: int = CISCA_SEED, test_fraction: float = CISCA_TEST_FRACTION,
                val_fraction: float = CISCA_VAL_FRACTION) -> np.ndarray:
    """Stratified train/val/test split: ``test_fraction`` to test, then ``val_fraction`` of the rest to val."""
    strata = np.asarray([str(s) for s in strata])
    rng = np.random.default_rng(seed)
    out = np.full(len(strata), "train", dtype=object)
    test = stratified_split(strata, test_fraction, rng)
    out[test] = "test"
    rest = np.flatnonzero(~test)
    val = stratified_split(strata[rest], val_fraction, rng)
    out[rest[val]] = "val"
    return out.astype(str)


def grouped_split(groups: Sequence, strata: Sequence, seed: int = CISCA_SEED, test_fraction: float = CISCA_TEST_FRACTION,
                  val_fraction: float = CISCA_VAL_FRACTION) -> np.ndarray:
    """:func:`cisca_split` over *groups* (e.g. source images), each group stratified by its stratum.

    Every item of a group lands in the same split.  A group whose items disagree on the stratum is
    an error.
    """
    groups = np.asarray([str(g) for g in groups])
    strata = np.asarray([str(s) for s in strata])
    if len(groups) != len(strata):
        raise ValueError(f"groups ({len(groups)}) and strata ({len(strata)}) must have one entry per item")
    names, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    group_stratum = strata[first]
    clash = np.flatnonzero(group_stratum[inverse] != strata)
    if clash.size:
        i = int(clash[0])
        raise ValueError(f"group {groups[i]!r} spans strata {group_stratum[inverse[i]]!r} and {strata[i]!r}; "
                         "each group must belong to exactly one stratum")
    group_split = cisca_split(group_stratum, seed, test_fraction, val_fraction)
    return group_split[inverse]


def pannuke_official_split(folds: Sequence[int], split_number: int) -> np.ndarray:
    """Official PanNuke split ``split_number`` (1, 2 or 3) from each tile's native fold (1, 2 or 3)."""
    if split_number not in PANNUKE_OFFICIAL_FOLDS:
        raise ValueError(f"split_number: expected 1, 2 or 3, got {split_number!r}")
    folds = np.asarray(folds, dtype=np.int64)
    bad = np.setdiff1d(np.unique(folds), [1, 2, 3])
    if bad.size:
        raise ValueError(f"folds: expected native PanNuke folds 1, 2, 3; found {bad.tolist()}")
    train, val, test = PANNUKE_OFFICIAL_FOLDS[split_number]
    out = np.empty(len(folds), dtype=object)
    out[folds == train] = "train"
    out[folds == val] = "val"
    out[folds == test] = "test"
    return out.astype(str)


def holdout_split(groups: Sequence, test_groups: Iterable, strata: Sequence, seed: int = CISCA_SEED,
                  val_fraction: float = CISCA_VAL_FRACTION) -> np.ndarray:
    """Fixed test set (every item whose group is in ``test_groups``); a seeded stratified
    ``val_fraction`` of the remaining *groups* is validation, the rest training."""
    groups = np.asarray([str(g) for g in groups])
    strata = np.asarray([str(s) for s in strata])
    test_groups = {str(g) for g in test_groups}
    out = np.full(len(groups), "train", dtype=object)
    is_test = np.isin(groups, list(test_groups))
    out[is_test] = "test"
    rest = np.flatnonzero(~is_test)
    if rest.size:
        names, first, inverse = np.unique(groups[rest], return_index=True, return_inverse=True)
        val = stratified_split(strata[rest][first], val_fraction, np.random.default_rng(seed)) if len(names) > 1 else np.zeros(1, bool)
        out[rest[val[inverse]]] = "val"
    return out.astype(str)


def normalise_split_name(value: str, where: str) -> str:
    key = str(value).strip().lower()
    if key not in _SPLIT_ALIASES:
        raise ValueError(f"{where}: split {value!r} is not one of train/val/test (or valid, validation, 0/1/2)")
    return _SPLIT_ALIASES[key]


def read_split_csv(path: str | os.PathLike, ids: Sequence[str], id_column: str | None = None,
                   split_column: str | None = None, allow_unlisted: bool = False) -> dict[str, str]:
    """Read a split file: one row per tile id with its split.

    Accepted headers: ``id``/``image``/``img_id``/``name`` for the id and ``split``/``fold`` for the
    split (train/val/test, valid/validation, or CISCA's 0/1/2).  Rows repeating an id with the same
    split are merged (CISCA's ``folds.csv`` repeats oversampled training tiles).  Raises ValueError
    naming the file and row when a row names an image that does not exist, an id is listed with two
    different splits, or (unless ``allow_unlisted``) an image is missing from the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: split file missing")
    known = set(ids)
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        id_col = id_column or next((h for h in ("id", "image", "img_id", "name") if h in header), None)
        split_col = split_column or next((h for h in ("split", "fold") if h in header), None)
        if id_col is None or split_col is None or id_col not in header or split_col not in header:
            raise ValueError(f"{path}: expected columns 'id' (or image/img_id/name) and 'split' (or fold), got {header}")
        out: dict[str, str] = {}
        for line, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            tile = row[id_col]
            for suffix in (".png", ".tif", ".tiff"):
                if tile.lower().endswith(suffix) and tile[: -len(suffix)] in known:
                    tile = tile[: -len(suffix)]
            if tile not in known:
                raise ValueError(f"{path}, row {line}: {id_col} {row[id_col]!r} names no image of the dataset "
                                 f"({len(known)} images, e.g. {sorted(known)[:3]})")
            split = normalise_split_name(row[split_col], f"{path}, row {line}")
            if out.get(tile, split) != split:
                raise ValueError(f"{path}, row {line}: {tile!r} is listed in both {out[tile]!r} and {split!r}")
            out[tile] = split
    missing = [t for t in ids if t not in out]
    if missing and not allow_unlisted:
        raise ValueError(f"{path}: {len(missing)} image(s) have no split, e.g. {missing[:3]}; list every image or "
                         "remove the split file to generate a seeded split")
    return out


def split_sizes(split: Iterable[str]) -> dict[str, int]:
    """Number of tiles per split, in train/val/test order (empty entries ignored)."""
    counts = Counter(s for s in split if s)
    return {name: counts.get(name, 0) for name in SPLIT_NAMES} | {k: v for k, v in counts.items() if k not in SPLIT_NAMES}


def describe(columns: Mapping[str, Sequence[str]]) -> str:
    """One line per split column: ``split_cisca: train 5688 / val 632 / test 1581``."""
    lines = []
    for name, values in columns.items():
        sizes = split_sizes(values)
        lines.append(f"{name}: " + " / ".join(f"{k} {v}" for k, v in sizes.items()))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Validation held out of the training split when a dataset has none
# --------------------------------------------------------------------------------------------------
HOLDOUT_FRACTION = 0.1
# From this many training images on, whole images are held out; fewer give validation tiles cut from each.
HOLDOUT_MIN_IMAGES = 4


def holdout_validation(data, train_split: str = "train", val_split: str = "val", validation: bool = True,
                       fraction: float = HOLDOUT_FRACTION, seed: int = CISCA_SEED,
                       holdout_dir: str | os.PathLike | None = None, tile_side: int = 256, crop_side: int = 256,
                       say=print) -> tuple[list[dict], list[dict]]:
    """(training items, validation items) of a dataset selection (``data.datalist(split)``).

    * ``validation`` False: the training split and no validation (training keeps its last checkpoint).
    * The dataset has a ``val_split``: both splits as they are.
    * Otherwise a seeded share of the *training* images is held out, with a message (``say``); test rows
      are never read. With at least :data:`HOLDOUT_MIN_IMAGES` images, ``ceil(fraction · n)`` whole images
      (stratified by tissue); with fewer, a strip ``tile_side`` wide along one edge of each image (edge
      chosen by the seed) is cut into ``tile_side``² validation tiles and the rest of the image, at least
      ``crop_side`` wide, trains.
      The pieces are written to ``holdout_dir`` (images, labels, classes), the dataset stays untouched.
      An image too small to give both a tile and a training crop is an error that names the fixes.
    """
    train = data.datalist(train_split)
    if not validation:
        return train, []
    try:
        return train, data.datalist(val_split)
    except ValueError as error:
        if "no tile has" not in str(error):
            raise
    root = getattr(data, "root", "the dataset")
    if not 0 < fraction < 1:
        raise ValueError(f"val_fraction: expected a share strictly between 0 and 1, got {fraction!r}")
    if len(train) >= HOLDOUT_MIN_IMAGES:
        held = stratified_split([item.get("tissue", "") for item in train], fraction, np.random.default_rng(seed))
        say(f"no {val_split!r} split in {root}: holding out {int(held.sum())} of the {len(train)} training images "
            f"(seed {seed}) for model selection and min-cell-size tuning; the test split is not touched")
        return [t for t, h in zip(train, held) if not h], [t for t, h in zip(train, held) if h]
    if holdout_dir is None:
        raise ValueError(f"no {val_split!r} split in {root} and only {len(train)} training image(s): a holdout_dir is "
                         "needed to write the validation tiles cut from them")
    rng = np.random.default_rng(seed)
    kept, held = [], []
    for item in train:
        pieces = _cut_validation_strip(item, Path(holdout_dir), int(tile_side), int(crop_side), rng, val_split)
        kept.append(pieces[0])
        held.extend(pieces[1])
    say(f"no {val_split!r} split in {root} and only {len(train)} training image(s): holding out {len(held)} tile(s) "
        f"of {tile_side}² cut from one edge of each (seed {seed}, written to {holdout_dir}) for model selection and "
        "min-cell-size tuning; training crops come from the rest; the test split is not touched")
    return kept, held


def _cut_validation_strip(item: Mapping, out: Path, side: int, crop: int, rng: np.random.Generator,
                          val_split: str) -> tuple[dict, list[dict]]:
    """(training item for the image minus a ``side``-wide edge strip, validation items for the strip's tiles)."""
    import io

    import tifffile
    from PIL import Image

    from ..atomic import atomic_write_bytes
    from .native import read_label_image, read_rgb, sequential

    image = read_rgb(item["image"])
    height, width = image.shape[:2]
    maps = {"label": read_label_image(item["label"])}
    if item.get("classes"):
        maps["classes"] = read_label_image(item["classes"])
    if width >= side + crop and height >= side:
        axis = 1
    elif height >= side + crop and width >= side:
        axis = 0
    else:
        smaller_crop = max(height, width) - side >= 32 and min(height, width) >= side  # a crop of ≥ 32 px would fit
        raise ValueError(
            f"{item['image']}: {height}×{width} is too small to hold out a {side}² validation tile and keep a {crop}² "
            f"training crop (no {val_split!r} split in the dataset); add a {val_split!r} split (split.csv), "
            + ("train with a smaller --crop, " if smaller_crop else "")
            + "or train without validation (--no-val)")
    length = image.shape[axis]
    at_end = bool(rng.integers(2))
    strip = slice(length - side, length) if at_end else slice(0, side)
    rest = slice(0, length - side) if at_end else slice(side, length)

    def part(array: np.ndarray, along: slice, across: slice | None = None) -> np.ndarray:
        index = [slice(None), slice(None)]
        index[axis] = along
        if across is not None:
            index[1 - axis] = across
        return np.ascontiguousarray(array[tuple(index)])

    def write(name: str, rgb: np.ndarray, pieces: dict) -> dict:
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, format="PNG", compress_level=1)
        entry = {"id": name, "tissue": item.get("tissue", ""), "image": str(atomic_write_bytes(out / "images" / f"{name}.png",
                                                                                              buffer.getvalue()))}
        for key, array in pieces.items():
            buffer = io.BytesIO()
            array = sequential(array) if key == "label" else array.astype(np.uint8)
            tifffile.imwrite(buffer, array, compression="zlib")
            folder = "labels" if key == "label" else "classes"
            entry[key] = str(atomic_write_bytes(out / folder / f"{name}.tif", buffer.getvalue()))
        entry.setdefault("classes", "")
        return entry

    name = str(item.get("id") or Path(item["image"]).stem)
    training = write(f"{name}_train", part(image, rest), {k: part(v, rest) for k, v in maps.items()})
    validation = []
    across = image.shape[1 - axis]
    for k in range(across // side):
        window = slice(k * side, (k + 1) * side)
        validation.append(write(f"{name}_val{k}", part(image, strip, window),
                                {key: part(v, strip, window) for key, v in maps.items()}))
    return training, validation
