"""An uncompressed, memory-mapped copy of a prepared dataset's tiles, read by ``LoadTiled``.

Decoding a 256² tile of the prepared layout (PNG image + two zlib TIFFs) costs ≈5–6 ms of CPU on the
dev machine, more than the rest of the training data pipeline; reading it from this copy costs
≈0.1 ms (docs/benchmarks.md, "Data pipeline"). ``pack_dataset(root)`` writes, next to the prepared
files (which stay the reference), one folder per tile size (CytoDArk0 holds full-size images and
their 256² tiles)::

    <root>/packed/<H>x<W>/images.npy   (N, 3, H, W) uint8, channel-first as LoadTiled returns it
    <root>/packed/<H>x<W>/labels.npy   (N, H, W) int32 instance maps
    <root>/packed/<H>x<W>/classes.npy  (N, H, W) uint8 class maps (absent when the dataset has none)
    <root>/packed/<H>x<W>/levels.npy   (N, H, W) uint8 contour levels of each whole tile
                                       (``cellgap.targets``, for the magnification of dataset.json)
    <root>/packed/index.json           tile ids, their size folder and row, source files with size and mtime

Every tile is read and checked once, at packing, by the same readers and checks as ``LoadTiled``
(errors name the file). At load time a tile comes from the pack only when its source files still have
the recorded size and modification time; otherwise ``LoadTiled`` reads the files.
The arrays hold ``LoadTiled``'s dtypes, and each read maps its tile privately (copy-on-write) instead
of copying it: a random 256² crop from a 2048² tile touches the crop's pages only, and a write to a
loaded array never reaches the file or a later read. Disk: 9 bytes per pixel (≈0.59 MB per 256² tile;
PanNuke ≈4.7 GB, CoNIC ≈2.9 GB), served from the page cache when memory allows. The contour levels cost
≈4 ms per 256² tile at packing and save that much per sample in training (``ContourLevelsd``).
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..magnification import profile_for
from ..targets import CONTOUR_LEVELS_KEY, contour_levels
from .native import read_class_map, read_instance_map, read_rgb
from .prepared import INFO, read_dataset_info, read_manifest

PACKED = "packed"
INDEX = "index.json"
FORMAT = 2  # format 1: one tile size, uint16 ids, each tile copied and converted on reading
ARRAYS = {"images": np.uint8, "labels": np.int32, "classes": np.uint8, "levels": np.uint8}


def _stamp(path: Path) -> list:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def read_tile_files(image_path, label_path, classes_path, num_classes: int | None) -> tuple:
    """(image (H,W,3) uint8, label (H,W) integer, classes (H,W) uint8 or None) with LoadTiled's checks."""
    rgb = read_rgb(image_path)
    label = read_instance_map(label_path, rgb.shape[:2], image_path)
    classes = read_class_map(classes_path, label.shape, num_classes) if classes_path else None
    return rgb, label, classes


def _image_size(path: Path) -> tuple[int, int]:
    """(H, W) from the image header; an unreadable image raises read_rgb's error naming the file."""
    try:
        with Image.open(path) as image:
            return image.size[1], image.size[0]
    except (OSError, ValueError):
        return read_rgb(path).shape[:2]


def _folder(shape) -> str:
    return f"{shape[0]}x{shape[1]}"


def pack_dataset(root: str | os.PathLike, overwrite: bool = False, progress: bool = True) -> Path:
    """Write ``<root>/packed`` for the prepared dataset at ``root`` (all tiles); returns its folder."""
    root = Path(root)
    info = read_dataset_info(root)
    rows = read_manifest(root)
    if not rows:
        raise ValueError(f"{root}: the manifest lists no tiles; nothing to pack")
    out = root / PACKED
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists; pass overwrite=True to rebuild it")
    partial = root / (PACKED + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        with_classes = all(row["classes"] for row in rows)
        shapes = [_image_size(root / row["image"]) for row in rows]
        counts = dict.fromkeys(shapes, 0)  # tiles per size, sizes in order of first appearance
        group_of = {shape: group for group, shape in enumerate(counts)}
        places = []  # (size group, row in its arrays) of every tile
        for shape in shapes:
            places.append([group_of[shape], counts[shape]])
            counts[shape] += 1
        groups = []
        for shape, n in counts.items():
            (partial / _folder(shape)).mkdir()
            groups.append({
                name: np.lib.format.open_memmap(partial / _folder(shape) / f"{name}.npy", mode="w+", dtype=dtype,
                                                shape=(n, 3, *shape) if name == "images" else (n, *shape))
                for name, dtype in ARRAYS.items() if name != "classes" or with_classes
            })
        profile = profile_for(magnification=info.magnification)  # as the bundles' ContourLevelsd (@magnification)
        sources = []
        for row, shape, (group, index) in zip(tqdm(rows, desc=f"packing {root.name}", unit="tile", disable=not progress),
                                               shapes, places):
            paths = [root / row["image"], root / row["label"], root / row["classes"] if with_classes else None]
            rgb, label, cls = read_tile_files(*paths, num_classes=info.num_classes)
            if rgb.shape[:2] != shape:
                raise ValueError(f"{paths[0]}: decodes to {rgb.shape[:2]}, its header says {shape}")
            if label.size and label.max() >= 2**31:
                raise ValueError(f"{paths[1]}: instance id {label.max()} does not fit LoadTiled's int32 maps")
            arrays = groups[group]
            arrays["images"][index] = np.moveaxis(rgb, -1, 0)
            arrays["labels"][index] = label
            arrays["levels"][index] = contour_levels(label, profile)
            if cls is not None:
                arrays["classes"][index] = cls
            sources.append({k: [row[k], *_stamp(p)] for k, p in zip(("image", "label", "classes"), paths) if p is not None})
        for arrays in groups:
            for array in arrays.values():
                array.flush()
        del groups, arrays  # closes the maps before the folder is moved
        index = {"format": FORMAT, "dataset": info.name, "ids": [row["id"] for row in rows], "places": places,
                 "groups": [[*shape, n] for shape, n in counts.items()], "sources": sources,
                 "classes": with_classes, "num_classes": info.num_classes, CONTOUR_LEVELS_KEY: profile.name,
                 "dataset_json": _stamp(root / INFO)}
        (partial / INDEX).write_text(json.dumps(index), encoding="utf-8")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out


class PackedArray:
    """One packed ``.npy`` stack, read a tile at a time through a private copy-on-write mapping of that
    tile's bytes (numpy's memory maps are shared per file: a write through one would reach every later
    read of the tile in this process)."""

    def __init__(self, path: Path, dtype, count: int, shape: tuple, repack: str):
        try:
            array = np.load(path, mmap_mode="r")  # checks the header and that the file is long enough
        except (OSError, ValueError) as error:  # missing or truncated: numpy's message names no file
            raise ValueError(f"{path}: unreadable packed array ({error}); {repack}") from error
        if array.shape != (count, *shape) or array.dtype != dtype:
            raise ValueError(f"{path}: packed array {array.dtype} {array.shape}, the index says "
                             f"{np.dtype(dtype)} {(count, *shape)}; {repack}")
        self.path, self.dtype, self.shape, self.offset = path, array.dtype, tuple(shape), array.offset
        self.tile_values = int(np.prod(shape))
        self.tile_bytes = self.tile_values * array.dtype.itemsize
        self._file = None

    def __getitem__(self, position: int) -> np.ndarray:
        if self._file is None:
            self._file = open(self.path, "rb")  # noqa: SIM115 (kept open for the reads; closed with this object)
        start = self.offset + position * self.tile_bytes
        aligned = start - start % mmap.ALLOCATIONGRANULARITY
        pages = mmap.mmap(self._file.fileno(), start - aligned + self.tile_bytes, access=mmap.ACCESS_COPY, offset=aligned)
        return np.frombuffer(pages, self.dtype, self.tile_values, start - aligned).reshape(self.shape)


class PackedTiles:
    """Read access to ``<root>/packed`` (open it in the process that reads: each array keeps its file open)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        folder = self.root / PACKED
        repack = f"delete {folder} or pack the dataset again (cellgap.data.packed.pack_dataset(root, overwrite=True))"
        try:
            index = json.loads((folder / INDEX).read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ValueError(f"{folder / INDEX}: unreadable packed index ({error}); {repack}") from error
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            found = index.get("format") if isinstance(index, dict) else None
            raise ValueError(f"{folder}: packed format {found!r}; expected {FORMAT}; {repack}")
        try:
            self.sources = index["sources"]
            self.places = index["places"]
            self.num_classes = index["num_classes"]  # every tile's class ids were checked against it at packing
            self.contour_profile = index[CONTOUR_LEVELS_KEY]  # the magnification profile of the stored levels
            self.rows = {str(self.root / source["image"][0]): row for row, source in enumerate(self.sources)}
            with_classes = index["classes"]
            counts = [n for _, _, n in index["groups"]]
            misplaced = [row for row, (group, position) in enumerate(self.places)
                         if not (0 <= group < len(counts) and 0 <= position < counts[group])]
        except (KeyError, TypeError, ValueError, IndexError) as error:
            raise ValueError(f"{folder / INDEX}: damaged packed index ({type(error).__name__}: {error}); {repack}") from None
        if misplaced or len(self.places) != len(self.sources):
            raise ValueError(f"{folder / INDEX}: damaged packed index ({len(self.sources)} tiles, {len(self.places)} places, "
                             f"rows {misplaced[:5]} outside their arrays); {repack}")
        self.groups = [
            {name: PackedArray(folder / _folder((h, w)) / f"{name}.npy", dtype, n, (3, h, w) if name == "images" else (h, w),
                               repack)
             for name, dtype in ARRAYS.items() if name != "classes" or with_classes}
            for h, w, n in index["groups"]
        ]

    def read(self, row: int, name: str) -> np.ndarray | None:
        """Tile ``row``'s array ``name`` (one of ``ARRAYS``), privately mapped; None if the pack lacks it."""
        group, position = self.places[row]
        array = self.groups[group].get(name)
        return None if array is None else array[position]

    def row(self, **paths) -> int | None:
        """The packed row of the tile whose source files are ``paths`` (``image=…``, optionally ``label=…``,
        ``classes=…``) if it was packed from exactly these files and they are unchanged since; else None."""
        row = self.rows.get(str(paths.get("image")))
        if row is None:
            return None
        for key, path in paths.items():
            source = self.sources[row].get(key)
            if source is None or str(path) != str(self.root / source[0]):
                return None
            try:
                st = os.stat(path)
            except OSError:
                return None
            if st.st_size != source[1] or st.st_mtime_ns != source[2]:
                return None
        return row


_NOT_PACKED = object()


def packed_tiles_for(image_path, cache: dict) -> PackedTiles | None:
    """The :class:`PackedTiles` of the prepared dataset holding ``image_path`` (``<root>/images/<id>.png``),
    or None; ``cache`` keeps what was found per dataset root."""
    root = Path(str(image_path)).parent.parent
    found = cache.get(root)
    if found is None:
        found = PackedTiles(root) if (root / PACKED / INDEX).is_file() else _NOT_PACKED
        cache[root] = found
    return None if found is _NOT_PACKED else found


__all__ = ["PACKED", "PackedArray", "PackedTiles", "pack_dataset", "packed_tiles_for", "read_tile_files"]
