"""Loading tiles into MONAI sample dicts with the checks MONAI's LoadImaged does not make.

MONAI's ``LoadImaged`` reads the files but accepts greyscale or 16-bit images, float label maps and
mismatched shapes silently; cellgap stops with the file name and what was expected instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor, get_track_meta
from monai.transforms import MapTransform

from ..targets import CONTOUR_LEVELS_KEY, CONTOUR_PROFILE_KEY
from .image_kinds import read_image
from .native import check_class_ids, read_class_map, read_instance_map
from .packed import packed_tiles_for


def tile_id(path: str) -> str:
    """The name of a tile: its file name without the image suffix."""
    name = Path(str(path)).name
    for suffix in (".ome.tif", ".tiff", ".tif", ".png", ".jpg", ".jpeg"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _meta(path: str, shape: tuple[int, int]) -> dict:
    return {"filename_or_obj": str(path), "spatial_shape": np.asarray(shape)}


def _tensor(array: np.ndarray, path: str, shape: tuple[int, int]) -> torch.Tensor:
    """A MetaTensor naming its file, or a plain tensor with MetaTensor tracking off (as MONAI's
    ``LoadImage`` does; a MetaTensor costs ≈0.1 ms per key and transform downstream)."""
    tensor = torch.from_numpy(array)
    return MetaTensor(tensor, meta=_meta(path, shape)) if get_track_meta() else tensor


class LoadTiled(MapTransform):
    """Read ``image`` (RGB, or any kind :mod:`cellgap.data.image_kinds` turns into 8-bit RGB), ``label`` (integer instance map) and ``classes`` (class map).

    Produces ``image`` (3,H,W) uint8, the stored values (crops and turns then move a quarter of the bytes
    of float32; scaling or the first photometric step makes it float32), ``label`` (1,H,W) int32 and
    ``classes`` (1,H,W) uint8 (ids up to 255) as MetaTensors carrying the source file name (plain tensors
    under ``monai.data.set_track_meta(False)``).
    An empty or absent ``classes`` path means a single-class dataset: ``classes = label > 0``.
    ``num_classes`` (if given) bounds the class ids. Keys absent from ``keys`` are not read (inference
    reads only ``image``).

    ``packed``: read tiles of a prepared dataset from its memory-mapped copy (``cellgap.data.packed``,
    ``<root>/packed``) when there is one and the tile's files are unchanged since packing: the same
    arrays, checked at packing, at ≈0.1 instead of ≈5.6 ms per 256² tile. Each is a private copy-on-write
    mapping of the tile's bytes: a crop from a large tile reads only the crop's pages, and a write stays in
    the array. With ``contour_levels`` among
    the keys, a tile read from the pack also brings its stored contour levels (1,H,W) uint8 and, under
    ``contour_levels_profile``, the magnification profile they were computed for (``ContourLevelsd``
    computes them for tiles read from the files).
    """

    def __init__(self, keys=("image", "label", "classes"), num_classes: int | None = None, allow_missing_keys: bool = True,
                 packed: bool = True):
        super().__init__(keys, allow_missing_keys)
        self.num_classes = num_classes
        self.packed = bool(packed)
        self._packs: dict = {}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_packs"] = {}  # memory maps are reopened in the process that reads (workers), never pickled
        return state

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        image_path = d.get("image")
        if self.packed and "image" in self.keys and image_path:
            out = self._from_pack(d, image_path)
            if out is not None:
                return out
        if "image" in self.keys:
            if not image_path:
                raise KeyError(f"sample {d.get('id', '?')!r}: no 'image' path")
            rgb = read_image(image_path)  # greyscale, 16-bit, RGBA … by cellgap.data.image_kinds' rule
            # Channel-first in memory too: a transposed view would leave every later step strided reads.
            image = np.ascontiguousarray(np.moveaxis(rgb, -1, 0))
            d["image"] = _tensor(image, image_path, rgb.shape[:2])
            d.setdefault("id", tile_id(image_path))  # names the outputs even when MetaTensor tracking is off
        if "label" in self.keys and d.get("label"):
            label_path = d["label"]
            label = read_instance_map(label_path, tuple(d["image"].shape[1:]) if "image" in self.keys else None, image_path)
            d["label"] = _tensor(label.astype(np.int32)[None], label_path, label.shape)
            if "classes" in self.keys:
                d["classes"] = self._classes(d, label, label_path)
        return d

    def _from_pack(self, d: dict, image_path) -> dict | None:
        tiles = packed_tiles_for(image_path, self._packs)
        if tiles is None:
            return None
        paths = {"image": image_path}
        label_path = d.get("label") if "label" in self.keys else None
        classes_path = d.get("classes") if label_path and "classes" in self.keys else None
        if label_path:
            paths["label"] = label_path
        if classes_path:
            paths["classes"] = classes_path
        row = tiles.row(**paths)
        if row is None:
            return None
        image = tiles.read(row, "images")
        shape = image.shape[1:]
        d["image"] = _tensor(image, image_path, shape)
        d.setdefault("id", tile_id(image_path))
        if label_path:
            label = tiles.read(row, "labels")[None]
            d["label"] = _tensor(label, label_path, shape)
            if "classes" in self.keys:
                if classes_path:
                    classes = tiles.read(row, "classes")[None]
                    # packing checked the ids against the dataset's class count; a smaller one is checked here
                    if self.num_classes is not None and self.num_classes < tiles.num_classes:
                        check_class_ids(classes, classes_path, self.num_classes)
                    d["classes"] = _tensor(classes, classes_path, shape)
                else:
                    d["classes"] = _tensor((label > 0).astype(np.uint8), label_path, shape)
            if CONTOUR_LEVELS_KEY in self.keys:
                d[CONTOUR_LEVELS_KEY] = _tensor(tiles.read(row, "levels")[None], label_path, shape)
                d[CONTOUR_PROFILE_KEY] = tiles.contour_profile
        return d

    def _classes(self, d: dict, label: np.ndarray, label_path: str) -> torch.Tensor:
        path = d.get("classes")
        if not path:
            return _tensor((label > 0).astype(np.uint8)[None], label_path, label.shape)
        classes = read_class_map(path, label.shape, self.num_classes)
        return _tensor(classes[None], path, classes.shape)
