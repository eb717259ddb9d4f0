"""Save a preview grid of synthetic tiles with instance outlines (docs/images/synthetic_tiles.png).

Top row: the tiles as generated; bottom row: the same tiles with each nucleus outlined in its class
colour (tumour yellow, lymphocyte cyan, stromal green).

    python scripts/preview_synthetic.py [--out docs/images/synthetic_tiles.png] [--seeds 0 1 2 3] [--magnification 40]
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


def outlined(image: np.ndarray, label: np.ndarray, classes: np.ndarray) -> np.ndarray:
    out = image.copy()
    edges = find_boundaries(label, mode="inner")
    out[edges] = CLASS_COLOURS[classes[edges]]
    return out


def preview_grid(seeds: list[int], magnification: int | str = 40, size: int = 256) -> np.ndarray:
    tiles = [generate_tile(seed, size=size, magnification=magnification) for seed in seeds]
    rows = [[t.image for t in tiles], [outlined(t.image, t.label, t.classes) for t in tiles]]
    step = size + GUTTER
    grid = np.full((2 * step - GUTTER, len(seeds) * step - GUTTER, 3), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            grid[i * step : i * step + size, j * step : j * step + size] = tile
    return grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/images/synthetic_tiles.png"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 2, 11, 4])
    parser.add_argument("--magnification", default="40")
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    grid = preview_grid(args.seeds, args.magnification, args.size)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(args.out, optimize=True)
    print(f"{args.out}: {grid.shape[1]}×{grid.shape[0]} px, {args.out.stat().st_size / 1024:.0f} KB")


if __name__ == "__main__":
    main()
