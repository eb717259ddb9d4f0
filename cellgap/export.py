"""Writing predicted cells: instance map and class map (TIFF), a per-cell CSV table, an overlay PNG and
QuPath-readable GeoJSON.

MONAI's ``SaveImaged`` writers assume the reversed spatial axes of MONAI's own readers and cannot write
tables or polygons, so the per-tile outputs are written here, each file atomically.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tifffile
import torch
from monai.transforms import MapTransform
from skimage.measure import find_contours

from .atomic import atomic_write_bytes
from .data.loading import tile_id
from .visualization import CLASS_COLOURS, overlay, save_png

CELL_COLUMNS = ("id", "centroid_row", "centroid_col", "area_px", "area_um2", "class_id", "class_name", "class_prob")


def _host_array(value) -> np.ndarray:
    """A numpy array of ``value``; tensors are copied to the host first (numpy cannot read CUDA memory)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _overlay(image, instances: np.ndarray, types: np.ndarray) -> np.ndarray:
    """The overlay; an image with a side under 3 pixels is drawn on a 1-pixel margin (scikit-image's boundary
    finder cannot pad a footprint larger than the image) that is cut off again."""
    if min(instances.shape) >= 3:
        return overlay(image, instances, types)
    picture = _host_array(image)
    channel_first = picture.ndim == 3 and picture.shape[0] in (1, 3) and picture.shape[1:] == instances.shape
    spatial = ((0, 0), (1, 1), (1, 1)) if channel_first else ((1, 1), (1, 1), (0, 0))
    drawn = overlay(np.pad(picture, spatial[: picture.ndim], mode="edge"), np.pad(instances, 1), np.pad(types, 1))
    return drawn[1:-1, 1:-1]


def write_tiff(path: str | os.PathLike, array: np.ndarray) -> Path:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, compression="zlib")
    return atomic_write_bytes(Path(path), buffer.getvalue())


def cell_rows(cells: Sequence[dict], class_names: Sequence[str], mpp: float | None = None) -> list[dict]:
    rows = []
    for c in cells:
        cls = int(c["class"])
        rows.append({"id": int(c["id"]), "centroid_row": round(float(c["centroid"][0]), 2),
                     "centroid_col": round(float(c["centroid"][1]), 2), "area_px": int(c["area"]),
                     "area_um2": round(float(c["area"]) * mpp * mpp, 3) if mpp else "",
                     "class_id": cls, "class_name": class_names[cls - 1] if 0 < cls <= len(class_names) else "",
                     "class_prob": round(float(c["class_prob"]), 4)})
    return rows


def write_cells_csv(path: str | os.PathLike, rows: list[dict]) -> Path:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(CELL_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_bytes(Path(path), text.getvalue().encode())


def cell_polygons(instances: np.ndarray, offset: tuple[float, float] = (0.0, 0.0)) -> dict[int, list[list[float]]]:
    """Outline of each instance as a closed [x, y] ring (pixel corners), from its bounding-box crop."""
    from scipy import ndimage as ndi

    rings = {}
    for i, sl in enumerate(ndi.find_objects(instances), start=1):
        if sl is None:
            continue
        mask = np.pad(instances[sl] == i, 1)
        contours = find_contours(mask.astype(np.float32), 0.5)
        if not contours:
            continue
        ring = max(contours, key=len)
        ys = ring[:, 0] - 1 + sl[0].start + offset[0]
        xs = ring[:, 1] - 1 + sl[1].start + offset[1]
        coords = np.round(np.stack([xs, ys], axis=1), 2).tolist()
        if coords[0] != coords[-1]:
            coords.append(coords[0])
        rings[i] = coords
    return rings


def geojson_features(instances: np.ndarray, rows: list[dict], offset: tuple[float, float] = (0.0, 0.0)) -> list[dict]:
    """QuPath-style detection features: polygon geometry, classification name and colour, measurements."""
    rings = cell_polygons(instances, offset)
    features = []
    for row in rows:
        ring = rings.get(row["id"])
        if ring is None or len(ring) < 4:
            continue
        colour = CLASS_COLOURS[(max(row["class_id"], 1) - 1) % len(CLASS_COLOURS)].tolist()
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {"objectType": "detection",
                           "classification": {"name": row["class_name"] or str(row["class_id"]), "color": colour},
                           "measurements": {"area_px": row["area_px"], "class_prob": row["class_prob"]}},
        })
    return features


def write_geojson(path: str | os.PathLike, features: list[dict]) -> Path:
    return atomic_write_bytes(Path(path), json.dumps({"type": "FeatureCollection", "features": features}).encode())


class SaveCellOutputsd(MapTransform):
    """Write one tile's predictions next to each other in ``output_dir``, named after the input file:

    ``<name>_instances.tif`` (int32), ``<name>_classes.tif`` (uint8), ``<name>_cells.csv``,
    ``<name>_overlay.png`` and ``<name>_cells.geojson`` (each optional).  Reads ``pred_instances``,
    ``pred_types``, ``pred_cells`` and ``image`` (for the overlay), and the file name from the image meta.
    """

    def __init__(self, output_dir: str | os.PathLike, class_names: Sequence[str], mpp: float | None = None,
                 overlay_png: bool = True, geojson: bool = True, image_key: str = "image"):
        super().__init__(keys=["pred_instances"])
        self.output_dir = Path(output_dir)
        self.class_names = list(class_names)
        self.mpp = mpp
        self.overlay_png, self.geojson = overlay_png, geojson
        self.image_key = image_key

    def _name(self, d: dict) -> str:
        if d.get("id"):
            return str(d["id"])
        meta = getattr(d.get(self.image_key), "meta", None) or {}
        if not meta.get("filename_or_obj"):
            raise KeyError("SaveCellOutputsd: no 'id' and no source file name in the image meta; cannot name the outputs")
        return tile_id(meta["filename_or_obj"])

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        for key in ("pred_instances", "pred_types", "pred_cells"):
            if key not in d:
                raise KeyError(f"SaveCellOutputsd: missing {key!r}; run CISCAPostProcessingd first")
        name = self._name(d)
        # CISCAPostProcessingd puts the maps on the network output's device: CUDA in a GPU evaluator.
        instances = _host_array(d["pred_instances"]).squeeze(0).astype(np.int32)
        types = _host_array(d["pred_types"]).squeeze(0).astype(np.uint8)
        rows = cell_rows(d["pred_cells"], self.class_names, self.mpp)
        # everything is computed before the first file is written: a failure leaves no partial set of outputs
        picture = _overlay(d[self.image_key], instances, types) if self.overlay_png and self.image_key in d else None
        features = geojson_features(instances, rows) if self.geojson else None
        written = {"instances": write_tiff(self.output_dir / f"{name}_instances.tif", instances),
                   "classes": write_tiff(self.output_dir / f"{name}_classes.tif", types),
                   "cells": write_cells_csv(self.output_dir / f"{name}_cells.csv", rows)}
        if picture is not None:
            written["overlay"] = save_png(self.output_dir / f"{name}_overlay.png", picture)
        if features is not None:
            written["geojson"] = write_geojson(self.output_dir / f"{name}_cells.geojson", features)
        d["written"] = {k: str(v) for k, v in written.items()}
        return d
