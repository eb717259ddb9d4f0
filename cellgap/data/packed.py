"""An uncompressed, memory-mapped copy of a prepared dataset's tiles, read by ``LoadTiled``.

Decoding a 256² tile of the prepared layout (PNG image + two zlib TIFFs) costs ≈5–6 ms of CPU on the
dev machine, more than the rest of the training data pipeline; reading it from this copy costs
≈0.2 ms (docs/benchmarks.md, "Data pipeline"). ``pack_dataset(root)`` writes, next to the prepared
files (which stay the reference)::

    <root>/packed/images.npy   (N, 3, H, W) uint8, channel-first as LoadTiled returns it
    <root>/packed/labels.npy   (N, H, W) uint16 or int32 instance maps
    <root>/packed/classes.npy  (N, H, W) uint8 class maps (absent when the dataset has none)
    <root>/packed/levels.npy   (N, H, W) uint8 contour levels of each whole tile (``cellgap.targets``,
                               for the magnification of dataset.json, profile named in the index)
    <root>/packed/index.json   tile ids, their source files with size and mtime, array dtypes

Every tile is read and checked once, at packing, by the same readers and checks as ``LoadTiled``
(errors name the file). At load time a tile comes from the pack only when its three source files
still have the recorded size and modification time; otherwise ``LoadTiled`` reads the files.
Packing needs one tile size for the whole dataset. Disk: 7 bytes per pixel with uint16 ids
(≈0.46 MB per 256² tile; PanNuke ≈3.6 GB, CoNIC ≈2.2 GB), served from the page cache when memory allows.
The contour levels cost ≈4 ms per 256² tile at packing and save that much per sample in training
(``ContourLevelsd``); a pack written before they existed still loads, and they are then computed per sample.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..magnification import profile_for
from ..targets import CONTOUR_LEVELS_KEY, contour_levels
from .native import read_class_map, read_instance_map, read_rgb
from .prepared import INFO, read_dataset_info, read_manifest

PACKED = "packed"
INDEX = "index.json"
FORMAT = 1


def _stamp(path: Path) -> list:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def read_tile_files(image_path, label_path, classes_path, num_classes: int | None) -> tuple:
    """(image (H,W,3) uint8, label (H,W) integer, classes (H,W) integer or None) with LoadTiled's checks."""
    rgb = read_rgb(image_path)
    label = read_instance_map(label_path, rgb.shape[:2], image_path)
    classes = read_class_map(classes_path, label.shape, num_classes) if classes_path else None
    return rgb, label, classes


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
        first = read_rgb(root / rows[0]["image"])
        height, width = first.shape[:2]
        n = len(rows)
        images = np.lib.format.open_memmap(partial / "images.npy", mode="w+", dtype=np.uint8, shape=(n, 3, height, width))
        labels = np.lib.format.open_memmap(partial / "labels32.npy", mode="w+", dtype=np.int32, shape=(n, height, width))
        top = 0
        classes = np.lib.format.open_memmap(partial / "classes.npy", mode="w+", dtype=np.uint8,
                                            shape=(n, height, width)) if with_classes else None
        profile = profile_for(magnification=info.magnification)  # as the bundles' ContourLevelsd (@magnification)
        levels = np.lib.format.open_memmap(partial / "levels.npy", mode="w+", dtype=np.uint8, shape=(n, height, width))
        sources = []
        for index, row in enumerate(tqdm(rows, desc=f"packing {root.name}", unit="tile", disable=not progress)):
            paths = [root / row["image"], root / row["label"], root / row["classes"] if with_classes else None]
            rgb, label, cls = read_tile_files(*paths, num_classes=info.num_classes)
            if rgb.shape[:2] != (height, width):
                raise ValueError(f"{paths[0]}: tile is {rgb.shape[:2]}, the first tile {rows[0]['image']} is "
                                 f"{(height, width)}; packing needs one tile size")
            if cls is not None and cls.max() > 255:
                raise ValueError(f"{paths[2]}: class id {cls.max()} does not fit the packed uint8 class maps")
            if label.size and label.max() >= 2**31:
                raise ValueError(f"{paths[1]}: instance id {label.max()} does not fit LoadTiled's int32 maps")
            images[index] = np.moveaxis(rgb, -1, 0)
            labels[index] = label
            levels[index] = contour_levels(label, profile)
            top = max(top, int(label.max(initial=0)))
            if classes is not None:
                classes[index] = cls
            sources.append({k: [row[k], *_stamp(p)] for k, p in zip(("image", "label", "classes"), paths) if p is not None})
        labels.flush()
        if top < 2**16:  # uint16 ids when they fit: 2 instead of 4 bytes per pixel
            small = np.lib.format.open_memmap(partial / "labels.npy", mode="w+", dtype=np.uint16, shape=labels.shape)
            for start in range(0, n, 256):
                small[start : start + 256] = labels[start : start + 256]
            small.flush()
            del small, labels
            (partial / "labels32.npy").unlink()
        else:
            del labels
            os.replace(partial / "labels32.npy", partial / "labels.npy")
        images.flush()
        levels.flush()
        del images, levels
        if classes is not None:
            classes.flush()
            del classes
        index = {"format": FORMAT, "dataset": info.name, "shape": [height, width], "ids": [row["id"] for row in rows],
                 "sources": sources, "classes": with_classes, "num_classes": info.num_classes,
                 CONTOUR_LEVELS_KEY: profile.name,
                 "dataset_json": _stamp(root / INFO)}
        (partial / INDEX).write_text(json.dumps(index), encoding="utf-8")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out


class PackedTiles:
    """Read access to ``<root>/packed`` (memory-mapped; open it in the process that reads)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        folder = self.root / PACKED
        repack = f"delete {folder} or pack the dataset again (cellgap.data.packed.pack_dataset(root, overwrite=True))"
        try:
            index = json.loads((folder / INDEX).read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ValueError(f"{folder / INDEX}: unreadable packed index ({error}); {repack}") from error
        if index.get("format") != FORMAT:
            raise ValueError(f"{folder}: packed format {index.get('format')!r}; expected {FORMAT}; {repack}")
        self.sources = index["sources"]
        self.rows = {str(self.root / source["image"][0]): row for row, source in enumerate(self.sources)}
        self.images = self._array(folder / "images.npy", (len(self.sources), 3, *index["shape"]), repack)
        self.labels = self._array(folder / "labels.npy", (len(self.sources), *index["shape"]), repack)
        self.classes = self._array(folder / "classes.npy", self.labels.shape, repack) if index["classes"] else None
        # Profile name of the stored contour levels; None in packs written before they were stored.
        self.contour_profile = index.get(CONTOUR_LEVELS_KEY)
        self.levels = self._array(folder / "levels.npy", self.labels.shape, repack) if self.contour_profile else None

    @staticmethod
    def _array(path: Path, shape: tuple, repack: str) -> np.ndarray:
        try:
            array = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as error:  # missing or truncated: numpy's message names no file
            raise ValueError(f"{path}: unreadable packed array ({error}); {repack}") from error
        if array.shape != tuple(shape):
            raise ValueError(f"{path}: packed array of shape {array.shape}, the index says {tuple(shape)}; {repack}")
        return array

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


__all__ = ["PACKED", "PackedTiles", "pack_dataset", "packed_tiles_for", "read_tile_files"]
