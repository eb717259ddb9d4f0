"""One tile's network outputs → its kept cells (post-processing, the seam rule, outlines), as a journal record.

Runs in the post-processing processes: :func:`process_tile` takes the tile's probabilities, runs
:func:`cellgap.postprocessing.postprocess`, keeps the cells the seam rule gives this tile, draws their outlines
(:func:`cellgap.export.cell_polygons`, made valid with shapely) and writes the record atomically, so the main
process receives only counts and a finished tile is never lost.

Coordinates in the record are level-0 pixels of the slide with the QuPath convention: continuous, x right, y down,
pixel (col, row) covering [col, col+1) × [row, row+1).
"""

from __future__ import annotations

import io
import os
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_bytes
from .seams import owned_cells
from .tiling import Tile, TileGrid


@dataclass
class TileCells:
    """The cells one tile keeps (index order = raster order of their first pixel in the tile)."""

    tile: int
    x: np.ndarray  # centroid, level-0 px
    y: np.ndarray
    area_px: np.ndarray  # processing px
    area_um2: np.ndarray
    class_id: np.ndarray
    class_prob: np.ndarray
    cut: np.ndarray
    ring_offsets: np.ndarray  # ring i: ring_coords[ring_offsets[i]:ring_offsets[i+1]] (closed, level-0 x, y)
    ring_coords: np.ndarray
    labels: np.ndarray  # the kept cells' instance map (1..N), processing px, cropped to their bounding box
    labels_origin: np.ndarray  # (x, y) processing px of labels[0, 0]

    def __len__(self) -> int:
        return len(self.x)

    def ring(self, i: int) -> list[list[float]]:
        return self.ring_coords[self.ring_offsets[i]:self.ring_offsets[i + 1]].tolist()

    def save(self, path: str | os.PathLike) -> Path:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **{f.name: np.asarray(getattr(self, f.name)) for f in fields(self)})
        return atomic_write_bytes(path, buffer.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike) -> TileCells:
        with np.load(path) as data:
            values = {f.name: data[f.name] for f in fields(cls)}
        values["tile"] = int(values["tile"])
        return cls(**values)


def _valid_ring(coords: list[list[float]]) -> list[list[float]] | None:
    """The exterior of the largest valid polygon of a traced ring (a ring pinched at a diagonal pixel contact is
    not a valid polygon), rounded to 0.01 px, counter-clockwise."""
    import shapely
    from shapely.geometry import Polygon

    polygon = Polygon(coords)
    if not polygon.is_valid:
        fixed = shapely.make_valid(polygon)
        parts = [g for g in getattr(fixed, "geoms", [fixed]) if g.geom_type == "Polygon" and g.area > 0]
        if not parts:
            return None
        polygon = Polygon(max(parts, key=lambda g: g.area).exterior)
    polygon = shapely.set_precision(polygon, 0.01)
    if polygon.is_empty or polygon.geom_type != "Polygon" or not polygon.is_valid:
        return None
    return [list(c) for c in shapely.geometry.polygon.orient(polygon, 1.0).exterior.coords]


def tile_cells(instance_map: np.ndarray, classes: np.ndarray, class_probs: np.ndarray, tile: Tile, grid: TileGrid,
               downsample: float, mpp: float) -> TileCells:
    """The kept cells of a post-processed tile. ``downsample``: level-0 px per processing px; ``mpp``: processing µm/px."""
    from ..export import cell_polygons

    owned = owned_cells(instance_map, tile, grid)
    rings = cell_polygons(owned.instance_map.astype(np.int32))
    keep, coords, offsets = [], [], [0]
    for i in range(1, len(owned.source_ids) + 1):
        ring = rings.get(i)
        if ring is None or len(ring) < 4:
            continue
        level0 = [[(x + tile.x + 0.5) * downsample, (y + tile.y + 0.5) * downsample] for x, y in ring]
        ring = _valid_ring(level0)
        if ring is None:
            continue
        keep.append(i - 1)
        coords.extend(ring)
        offsets.append(len(coords))
    keep = np.asarray(keep, dtype=np.int64)
    source = owned.source_ids[keep] - 1 if len(keep) else np.zeros(0, np.int64)
    lookup = np.zeros(len(owned.source_ids) + 1, np.uint32)
    lookup[keep + 1] = np.arange(1, len(keep) + 1, dtype=np.uint32)
    labels = lookup[owned.instance_map]
    rows, cols = np.nonzero(labels)
    if len(rows):
        r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        crop, origin = labels[r0:r1, c0:c1], (tile.x + c0, tile.y + r0)
    else:
        crop, origin = np.zeros((0, 0), np.uint32), (tile.x, tile.y)
    area = owned.area[keep]
    return TileCells(
        tile=tile.index,
        x=np.round((owned.centroid_x[keep] + 0.5) * downsample, 2), y=np.round((owned.centroid_y[keep] + 0.5) * downsample, 2),
        area_px=area, area_um2=np.round(area * mpp * mpp, 3),
        class_id=np.asarray(classes, np.int64)[source], class_prob=np.round(np.asarray(class_probs, np.float64)[source], 4),
        cut=owned.cut[keep], ring_offsets=np.asarray(offsets, np.int64),
        ring_coords=np.round(np.asarray(coords, np.float64).reshape(-1, 2), 2), labels=crop, labels_origin=np.asarray(origin),
    )


@dataclass(frozen=True)
class PostProcessing:
    """What the post-processing processes need besides a tile's outputs (small, pickled once per task)."""

    grid: TileGrid
    downsample: float
    mpp: float
    magnification: float
    min_cell_size: int | None
    journal: str  # folder of the tile records


def init_worker() -> None:
    """One thread per post-processing process: the processes are the parallelism."""
    import torch

    torch.set_num_threads(1)


def process_tile(setup: PostProcessing, tile: Tile, contour: np.ndarray, distance: np.ndarray,
                 types: np.ndarray | None) -> dict:
    """Post-process one tile's probabilities and journal its kept cells; returns counts and seconds."""
    from ..magnification import profile_for
    from ..postprocessing import postprocess

    start = time.perf_counter()
    # only the part inside the slide: a cell at the slide's edge ends there, as in whole-image inference
    x0, y0, x1, y1 = setup.grid.inside(tile)
    crop = (slice(None), slice(y0, y1), slice(x0, x1))
    result = postprocess(contour[crop].astype(np.float32), distance[crop].astype(np.float32),
                         None if types is None else types[crop].astype(np.float32),
                         profile=profile_for(magnification=setup.magnification), min_cell_size=setup.min_cell_size)
    instance_map = np.zeros((tile.size, tile.size), np.int32)
    instance_map[y0:y1, x0:x1] = result.instance_map
    cells = tile_cells(instance_map, result.classes, result.class_probs, tile, setup.grid, setup.downsample, setup.mpp)
    post = time.perf_counter() - start
    cells.save(Path(setup.journal) / record_name(tile.index))
    return {"tile": tile.index, "cells": len(cells), "cut": int(cells.cut.sum()), "postprocess_s": post,
            "write_s": time.perf_counter() - start - post}


def record_name(index: int) -> str:
    return f"tile_{index:07d}.npz"
