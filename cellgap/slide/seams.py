"""Applying the seam rule (:func:`cellgap.slide.tiling.owns`) to one tile's instances.

Every cell found in a tile is measured; only those whose centroid lies in the tile's core are kept, so a cell
in the overlap of two tiles is kept by exactly one of them, and with the outline that tile sees in full.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from .tiling import Tile, TileGrid


@dataclass
class OwnedCells:
    """The kept cells of one tile, renumbered 1..N in the tile's raster order of their first pixel.

    ``instance_map``: (size, size) uint32 of the kept cells only; ``source_ids``: their ids in the tile's map;
    ``centroid_x/_y``: processing px, pixel-centre convention (pixel (r, c) is centred on (c, r)); ``area``: px;
    ``cut``: touches a tile edge inside the image (a cell larger than the margin allows).
    """

    instance_map: np.ndarray
    source_ids: np.ndarray
    centroid_x: np.ndarray
    centroid_y: np.ndarray
    area: np.ndarray
    cut: np.ndarray


def owned_cells(instance_map: np.ndarray, tile: Tile, grid: TileGrid) -> OwnedCells:
    n = int(instance_map.max()) if instance_map.size else 0
    ids = np.arange(1, n + 1)
    if n == 0:
        empty = np.zeros(0)
        return OwnedCells(np.zeros_like(instance_map, dtype=np.uint32), ids, empty, empty, empty.astype(np.int64),
                          empty.astype(bool))
    rows, cols = np.nonzero(instance_map)
    labels = instance_map[rows, cols]
    area = np.bincount(labels, minlength=n + 1)[1:]
    safe = np.maximum(area, 1)
    cy = np.bincount(labels, weights=rows, minlength=n + 1)[1:] / safe + tile.y
    cx = np.bincount(labels, weights=cols, minlength=n + 1)[1:] / safe + tile.x
    x0, y0, x1, y1 = tile.core
    # centroids in pixel-centre coordinates; the core [x0, x1) is in pixel units, so compare pixel centres + 0.5
    keep = (area > 0) & (cx + 0.5 >= x0) & (cx + 0.5 < x1) & (cy + 0.5 >= y0) & (cy + 0.5 < y1)
    boxes = ndi.find_objects(instance_map, max_label=n)
    cut = np.array([box is not None and grid.touches_inner_edge(tile, box[0].start, box[1].start, box[0].stop, box[1].stop)
                    for box in boxes], dtype=bool)
    kept = ids[keep]
    lookup = np.zeros(n + 1, np.uint32)
    lookup[kept] = np.arange(1, len(kept) + 1, dtype=np.uint32)
    return OwnedCells(lookup[instance_map], kept, cx[keep], cy[keep], area[keep].astype(np.int64), cut[keep])
