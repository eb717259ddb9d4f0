"""Save a preview grid of synthetic tiles with instance outlines (docs/images/synthetic_tiles.png).

Top row: the tiles as generated; bottom row: the same tiles with each nucleus outlined in its class
colour (tumour yellow, lymphocyte cyan, stromal green).  The default columns are a tumour, an inflamed
and a stroma tile at 40x, then a tumour tile at 20x.

    python scripts/preview_synthetic.py [--out docs/images/synthetic_tiles.png] [--tiles 11:40 2:40 12:40 11:20]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from skimage.segmentation import find_boundaries

from cellgap.data.synthetic import generate_tile

CLASS_COLOURS = np.array([[0, 0, 0], [255, 220, 0], [0, 230, 255], [40, 255, 40]], dtype=np.uint8)
GUTTER = 4
PALETTE_COLOURS = 128  # a palette PNG keeps the preview small enough for the repository


def outlined(image: np.ndarray, label: np.ndarray, classes: np.ndarray) -> np.ndarray:
    out = image.copy()
    edges = find_boundaries(label, mode="inner")
    out[edges] = CLASS_COLOURS[classes[edges]]
    return out


def parse_tile(text: str) -> tuple[int, str]:
    seed, _, magnification = text.partition(":")
    try:
        return int(seed), magnification or "40"
    except ValueError:
        raise argparse.ArgumentTypeError(f"tile {text!r}: expected SEED or SEED:MAGNIFICATION, e.g. 11:40") from None


def preview_grid(tiles: list[tuple[int, str]], size: int = 256) -> np.ndarray:
    generated = [generate_tile(seed, size=size, magnification=magnification) for seed, magnification in tiles]
    rows = [[t.image for t in generated], [outlined(t.image, t.label, t.classes) for t in generated]]
    step = size + GUTTER
    grid = np.full((2 * step - GUTTER, len(tiles) * step - GUTTER, 3), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            grid[i * step : i * step + size, j * step : j * step + size] = tile
    return grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/images/synthetic_tiles.png"))
    parser.add_argument("--tiles", type=parse_tile, nargs="+", default=[(11, "40"), (2, "40"), (12, "40"), (11, "20")],
                        help="SEED:MAGNIFICATION per column")
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    grid = preview_grid(args.tiles, args.size)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(grid).quantize(PALETTE_COLOURS, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    image.save(args.out, optimize=True)
    print(f"{args.out}: {grid.shape[1]}×{grid.shape[0]} px, {args.out.stat().st_size / 1024:.0f} KB")


if __name__ == "__main__":
    main()
