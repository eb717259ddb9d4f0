"""The tile grid of a slide in processing pixels (the model's resolution), and the seam rule.

The processing image is cut into **cores**: disjoint squares of side ``core`` that cover it exactly.  Each tile is
its core grown by ``margin`` pixels on every side (``tile = core + 2·margin``), so neighbouring tiles overlap by
``2·margin``.  The seam rule (:func:`owns`): **a cell belongs to the tile whose core holds its centroid** (cores
are half-open, [x0, x1) × [y0, y1), so exactly one core holds any point).  With ``margin`` at least the
largest expected cell's diameter, a cell whose centroid lies in a core lies wholly inside that core's tile, so it
is kept once and with its full outline; a kept cell that still touches a tile edge inside the slide is counted
as ``cut`` in the summary (a cell larger than the margin allows).

Tile origins are multiples of 32 (the network's stride), so a pixel sees the same patch grid in every tile
as in the whole image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..network import INPUT_MULTIPLE

MAX_CELL_UM = 30.0  # the largest nucleus expected (µm, diameter); sets the default margin
DEFAULT_TILE = 1024


@dataclass(frozen=True)
class Tile:
    index: int
    x: int  # tile origin, processing px (may be negative: the first tiles reach past the slide's edge)
    y: int
    size: int
    core: tuple[int, int, int, int]  # x0, y0, x1, y1, processing px, clipped to the processing image


def margin_for(mpp: float, max_cell_um: float = MAX_CELL_UM) -> int:
    """Margin in processing pixels: the largest expected cell's diameter, rounded up to a multiple of 32."""
    pixels = max_cell_um / mpp
    return int(math.ceil(pixels / INPUT_MULTIPLE) * INPUT_MULTIPLE)


@dataclass(frozen=True)
class TileGrid:
    """Tiles over a ``width`` × ``height`` processing image."""

    width: int
    height: int
    tile: int
    margin: int

    def __post_init__(self) -> None:
        if self.tile % INPUT_MULTIPLE or self.margin % INPUT_MULTIPLE:
            raise ValueError(f"tile {self.tile} and margin {self.margin}: expected multiples of {INPUT_MULTIPLE} px")
        if self.core <= 0:
            raise ValueError(f"tile {self.tile}: must be larger than twice the margin ({2 * self.margin} px); "
                             f"use --tile-size {2 * self.margin + 4 * INPUT_MULTIPLE} or more")

    @property
    def core(self) -> int:
        return self.tile - 2 * self.margin

    @property
    def columns(self) -> int:
        return max(1, math.ceil(self.width / self.core))

    @property
    def rows(self) -> int:
        return max(1, math.ceil(self.height / self.core))

    def __len__(self) -> int:
        return self.rows * self.columns

    def __getitem__(self, index: int) -> Tile:
        if not 0 <= index < len(self):
            raise IndexError(index)
        row, col = divmod(index, self.columns)
        cx, cy = col * self.core, row * self.core
        core = (cx, cy, min(cx + self.core, self.width), min(cy + self.core, self.height))
        return Tile(index=index, x=cx - self.margin, y=cy - self.margin, size=self.tile, core=core)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def inside(self, tile: Tile) -> tuple[int, int, int, int]:
        """The part of ``tile`` inside the image, tile-local (x0, y0, x1, y1): the rest is padding."""
        return (max(0, -tile.x), max(0, -tile.y), min(tile.size, self.width - tile.x), min(tile.size, self.height - tile.y))

    def touches_inner_edge(self, tile: Tile, row0: int, col0: int, row1: int, col1: int) -> bool:
        """Whether a bounding box (tile-local, end exclusive) touches an edge of ``tile`` that lies inside the image
        (a cell there may be cut; at the image's own edge it is simply the slide's end)."""
        left = col0 == 0 and tile.x > 0
        top = row0 == 0 and tile.y > 0
        right = col1 == tile.size and tile.x + tile.size < self.width
        bottom = row1 == tile.size and tile.y + tile.size < self.height
        return left or top or right or bottom


def owns(tile: Tile, centroid_x: float, centroid_y: float) -> bool:
    """The seam rule: ``tile`` keeps a cell iff its core holds the cell's centroid (processing px, half-open)."""
    x0, y0, x1, y1 = tile.core
    return x0 <= centroid_x < x1 and y0 <= centroid_y < y1
