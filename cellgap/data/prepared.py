"""The prepared dataset layout that every dataset (synthetic, PanNuke, CoNIC, CytoDArk0, user folders)
is converted into, and that bundles read.

```
<root>/
  dataset.json     DatasetInfo: class names, magnification, mpp, minimum cell size, empty-image policy
  manifest.csv     one row per tile: id, image, label, classes, tissue, split, (more split columns)
  images/<id>.png  RGB uint8
  labels/<id>.tif  int32 instance map (0 = background, 1..N)
  classes/<id>.tif uint8 per-pixel class map (0 = background, 1..C)
```

A folder is written under a temporary name and renamed into place only when complete, so a failed
conversion never leaves a half-written dataset behind. One conversion at a time writes to a given output (a lock
beside it, ``cellgap.locking``), and ``overwrite`` replaces only a folder that this tool wrote
(:func:`check_replaceable`).
"""

from __future__ import annotations

import csv
import json
import math
import numbers
import os
import shutil
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from ..atomic import atomic_write_text  # noqa: F401  (re-exported for the converters)
from ..locking import output_lock
from ..magnification import MagnificationProfile, profile_for
from .stain import check_stain_kind

MANIFEST = "manifest.csv"
INFO = "dataset.json"
BASE_COLUMNS = ("id", "image", "label", "classes", "tissue", "split")
SPLITS = ("train", "val", "test")
EMPTY_POLICIES = ("skip", "nan")
PARTIAL_MARK = ".cellgap-partial"  # inside <root>.partial while a conversion writes it


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (both resolved)."""
    return path == folder or folder in path.parents


def check_replaceable(root: str | os.PathLike, inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Raise a ValueError unless ``root`` may be deleted to be written again: it must be a prepared dataset that
    this tool wrote (``dataset.json`` and ``manifest.csv`` in it) and must not be, or hold, the working directory,
    the user's home or any of ``inputs`` (the files the conversion reads)."""
    root = Path(root)
    resolved = root.resolve()
    protected = {"the working directory": Path.cwd().resolve(), "your home folder": Path.home().resolve()}
    protected.update({f"the input {i}": Path(i).expanduser().resolve() for i in inputs if i is not None})
    for what, path in protected.items():
        if _inside(path, resolved):
            raise ValueError(f"{root}: refusing to overwrite it, it {'is' if path == resolved else 'contains'} {what}; "
                             f"choose an --out folder of its own (for example {root / 'prepared'}); nothing was deleted")
    missing = [name for name in (INFO, MANIFEST) if not (root / name).is_file()]
    if missing:
        raise ValueError(f"{root}: refusing to overwrite it, it is not a prepared dataset written by cellgap (no "
                         f"{' or '.join(missing)}); move it away or choose another --out folder; nothing was deleted")


@dataclass(frozen=True)
class DatasetInfo:
    """Facts that travel with a dataset and reach targets, post-processing and metrics."""

    name: str
    class_names: tuple[str, ...]
    magnification: int
    mpp: float
    min_cell_size: int | None = None  # None: the magnification profile's default
    empty_policy: str = "skip"  # images without GT cells: "skip" (CISCA) or "nan" (PanNuke)
    tissue_label: str = "tissue"  # what the grouping column means: tissue, brain area, cohort
    description: str = ""
    extra: dict = field(default_factory=dict)
    # he | ihc | nissl | fluorescence | other: where the H&E stain jitter applies (data.stain); None: the stain of the
    # dataset's registry entry (H&E for a user folder), so datasets prepared before this field keep their jitter
    stain_kind: str | None = None

    def __post_init__(self):
        def problem(text: str) -> ValueError:
            return ValueError(f"dataset {self.name!r}: {text}")

        names = self.class_names
        if isinstance(names, str) or not isinstance(names, (list, tuple)) or not names:
            raise problem(f"class_names must be a list naming at least one cell class, got {names!r}")
        if not all(isinstance(n, str) and n.strip() for n in names) or len(set(names)) != len(names):
            raise problem(f"class_names must be distinct non-empty names, got {list(names)!r}")
        for field_name in ("magnification", "mpp"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > 0):
                raise problem(f"{field_name} must be a positive number, got {value!r}")
        size = self.min_cell_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1):
            raise problem(f"min_cell_size must be a whole number of pixels ≥ 1 (or null for the default), got {size!r}")
        if self.empty_policy not in EMPTY_POLICIES:
            raise problem(f"empty_policy must be one of {EMPTY_POLICIES}, got {self.empty_policy!r}")
        try:
            if self.stain_kind is not None:
                check_stain_kind(self.stain_kind)
        except ValueError as error:
            raise problem(str(error)) from None
        object.__setattr__(self, "class_names", tuple(self.class_names))

    @property
    def num_classes(self) -> int:
        """Number of cell classes, background excluded."""
        return len(self.class_names)

    @property
    def profile(self) -> MagnificationProfile:
        return profile_for(mpp=self.mpp)

    @property
    def cell_size(self) -> int:
        """Minimum cell size (pixels) of post-processing."""
        return self.min_cell_size if self.min_cell_size is not None else self.profile.default_min_cell_size

    @property
    def detection_radius(self) -> float:
        return self.profile.detection_radius

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict, source: str = "dataset.json") -> DatasetInfo:
        required = ("name", "class_names", "magnification", "mpp")
        missing = [k for k in required if k not in data]
        if missing:
            raise ValueError(f"{source}: missing field(s) {missing}; expected at least {list(required)}")
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        try:
            return cls(**known)
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None


def read_dataset_info(root: str | os.PathLike) -> DatasetInfo:
    path = Path(root) / INFO
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no dataset description; is {root} a prepared cellgap dataset?")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return DatasetInfo.from_json(data, source=str(path))


def read_manifest(root: str | os.PathLike) -> list[dict]:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; is {root} a prepared cellgap dataset?")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in BASE_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; expected {list(BASE_COLUMNS)}")
        rows, first_line = [], {}
        for row in reader:
            where = f"{path}, line {reader.line_num}"
            if None in row or None in row.values():  # csv's marks of extra and of missing cells
                raise ValueError(f"{where}: {'more' if None in row else 'fewer'} cells than the {len(reader.fieldnames)} "
                                 f"columns ({', '.join(reader.fieldnames)})")
            empty = [c for c in ("id", "image", "label") if not row[c].strip()]
            if empty:
                raise ValueError(f"{where}: empty {', '.join(empty)}; expected the tile id and its files' paths")
            if row["id"] in first_line:
                raise ValueError(f"{where}: tile id {row['id']!r} already on line {first_line[row['id']]}")
            first_line[row["id"]] = reader.line_num
            rows.append(row)
        return rows


def datalist(root: str | os.PathLike, split: str | None = None, split_column: str = "split") -> list[dict]:
    """Items of a prepared dataset for MONAI datasets: dicts with absolute ``image``, ``label`` and
    ``classes`` paths plus ``id`` and ``tissue``.  ``split=None`` returns every tile."""
    root = Path(root)
    rows = read_manifest(root)
    if rows and split_column not in rows[0]:
        raise ValueError(f"{root / MANIFEST}: no split column {split_column!r}; columns are {list(rows[0])}")
    items = []
    for row in rows:
        if split is not None and row[split_column] != split:
            continue
        item = {"id": row["id"], "tissue": row["tissue"], "image": str(root / row["image"]), "label": str(root / row["label"])}
        item["classes"] = str(root / row["classes"]) if row["classes"] else ""
        items.append(item)
    if split is not None and not items:
        values = sorted({r[split_column] for r in rows})
        raise ValueError(f"{root / MANIFEST}: no tile has {split_column} == {split!r}; values present: {values}")
    return items


def check_tile(image: np.ndarray, label: np.ndarray, classes: np.ndarray | None, where: str, num_classes: int | None = None) -> None:
    """Raise a ValueError naming ``where`` if a tile is not RGB uint8 + integer instance map (+ class map)."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{where}: image must be H×W×3 RGB, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"{where}: image must be 8-bit (uint8), got {image.dtype}")
    if label.shape != image.shape[:2]:
        raise ValueError(f"{where}: instance map shape {label.shape} does not match image {image.shape[:2]}")
    if not np.issubdtype(label.dtype, np.integer):
        raise ValueError(f"{where}: instance map must hold integers (0 = background, 1..N = cells), got {label.dtype}")
    if label.size and label.min() < 0:
        raise ValueError(f"{where}: instance map has negative ids (min {label.min()})")
    if classes is not None:
        if classes.shape != label.shape:
            raise ValueError(f"{where}: class map shape {classes.shape} does not match instance map {label.shape}")
        if not np.issubdtype(classes.dtype, np.integer):
            raise ValueError(f"{where}: class map must hold integers, got {classes.dtype}")
        if classes.size and (classes.min() < 0 or (num_classes is not None and classes.max() > num_classes)):
            raise ValueError(f"{where}: class ids must lie in 0..{num_classes}, found {classes.min()}..{classes.max()}")


class PreparedWriter:
    """Write a prepared dataset atomically: ``with PreparedWriter(root, info) as w: w.add(...)``.

    Tiles go to ``<root>.partial``; on success the folder is renamed to ``root`` (replacing nothing:
    an existing ``root`` is an error unless ``overwrite``, which replaces only what :func:`check_replaceable`
    allows; ``inputs``: the files or folders the conversion reads).  On failure the partial folder is removed.
    The writer holds a lock (``.<name>.lock/`` beside ``root``) from start to end: a second conversion to the
    same output stops at once naming the first.
    """

    def __init__(self, root: str | os.PathLike, info: DatasetInfo, overwrite: bool = False, extra_columns: tuple[str, ...] = (),
                 inputs: Iterable[str | os.PathLike] = ()):
        self.root = Path(root)
        self.inputs = [p for p in inputs if p is not None]
        self.lock_dir = self.root.with_name(f".{self.root.name}.lock")
        self._stack = ExitStack()
        self.info = info
        self.overwrite = overwrite
        self.columns = BASE_COLUMNS + tuple(c for c in extra_columns if c not in BASE_COLUMNS)
        self.partial = self.root.with_name(self.root.name + ".partial")
        self.rows: list[dict] = []
        self._ids: set[str] = set()

    def __enter__(self) -> PreparedWriter:
        if self.root.exists() and not self.root.is_dir():
            raise FileExistsError(f"{self.root}: exists and is not a folder; remove it or choose another output path")
        if self.root.exists() and not self.overwrite:
            raise FileExistsError(f"{self.root}: already exists; remove it or pass overwrite=True")
        if self.root.exists():
            check_replaceable(self.root, self.inputs)
        self._stack.enter_context(output_lock(self.lock_dir, f"conversion to {self.root}"))
        try:
            self._start()
        except BaseException:
            self._unlock()
            raise
        return self

    def _unlock(self) -> None:
        self._stack.close()
        try:
            self.lock_dir.rmdir()  # empty once released; another conversion may hold it again already
        except OSError:
            pass

    def _start(self) -> None:
        if self.partial.exists():  # a killed conversion's leftover is removed; anything else is the user's
            if not (self.partial / PARTIAL_MARK).is_file():
                raise FileExistsError(f"{self.partial}: exists and was not left by a cellgap conversion; move it away "
                                      f"or choose another output path")
            shutil.rmtree(self.partial)
        for sub in ("images", "labels", "classes"):
            (self.partial / sub).mkdir(parents=True)
        (self.partial / PARTIAL_MARK).touch()

    def add(self, tile_id: str, image: np.ndarray, label: np.ndarray, classes: np.ndarray | None = None,
            tissue: str = "", split: str = "", **extra) -> None:
        if tile_id in self._ids:
            raise ValueError(f"{self.root}: duplicate tile id {tile_id!r}")
        if "/" in tile_id or "\\" in tile_id or tile_id.startswith("."):
            raise ValueError(f"tile id {tile_id!r}: must be a plain file name")
        try:
            tile_id.encode("utf-8")
        except UnicodeEncodeError:  # a file name in another encoding, read by Python with surrogate escapes
            shown = os.fsencode(tile_id).decode("utf-8", errors="backslashreplace")
            raise ValueError(f"tile {shown!r}: its file name is not valid UTF-8 (the manifest and the bundles need "
                             f"UTF-8 names); rename the file (e.g. `convmv -f latin1 -t utf8 --notest <files>`) and "
                             f"convert again; nothing was written to {self.root}") from None
        check_tile(image, label, classes, where=f"tile {tile_id!r}", num_classes=self.info.num_classes)
        unknown = set(extra) - set(self.columns)
        if unknown:
            raise ValueError(f"tile {tile_id!r}: unknown manifest column(s) {sorted(unknown)}; declare them in extra_columns")
        self._ids.add(tile_id)
        Image.fromarray(image).save(self.partial / "images" / f"{tile_id}.png", compress_level=1)  # fast; PNG stays lossless
        tifffile.imwrite(self.partial / "labels" / f"{tile_id}.tif", label.astype(np.int32), compression="zlib")
        row = {"id": tile_id, "image": f"images/{tile_id}.png", "label": f"labels/{tile_id}.tif", "classes": "",
               "tissue": tissue, "split": split, **{k: str(v) for k, v in extra.items()}}
        if classes is not None:
            tifffile.imwrite(self.partial / "classes" / f"{tile_id}.tif", classes.astype(np.uint8), compression="zlib")
            row["classes"] = f"classes/{tile_id}.tif"
        self.rows.append(row)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._finish(exc_type)
        except BaseException:
            shutil.rmtree(self.partial, ignore_errors=True)  # nothing half-written stays behind
            raise
        finally:
            self._unlock()

    def _finish(self, exc_type) -> None:
        if exc_type is not None:
            shutil.rmtree(self.partial, ignore_errors=True)
            return
        with open(self.partial / MANIFEST, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(self.columns), restval="")
            writer.writeheader()
            writer.writerows(self.rows)
        (self.partial / INFO).write_text(json.dumps(self.info.to_json(), indent=2), encoding="utf-8")
        (self.partial / PARTIAL_MARK).unlink()
        if self.root.exists():
            check_replaceable(self.root, self.inputs)  # again: it may have changed while the conversion ran
            old = self.root.with_name(f".{self.root.name}.replaced")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.root, old)  # the new folder is in place before the old one's files go
            os.replace(self.partial, self.root)
            shutil.rmtree(old)
        else:
            os.replace(self.partial, self.root)
