"""Tissue detection on a thumbnail, so that background is never sent to the network.

Tissue is what is both darker than the glass and coloured: Otsu thresholds on the grey level and on the colour
saturation of the thumbnail (scikit-image), OR-ed, then small specks removed and small holes filled.  An all-white
or all-grey thumbnail (nothing to separate) has no tissue.  ``--roi`` limits the mask to a level-0 rectangle.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.color import rgb2gray, rgb2hsv
from skimage.filters import threshold_otsu
from skimage.morphology import disk, remove_small_holes, remove_small_objects

from ..visualization import save_png

# Glass is brighter than this grey level and less saturated than this; keeps Otsu from splitting pure glass.
GLASS_GREY = 0.88
GLASS_SATURATION = 0.05
MIN_TISSUE_UM2 = 2_000.0  # specks smaller than this (≈ 45 µm a side) are dust, not tissue


@dataclass(frozen=True)
class TissueMask:
    """Boolean thumbnail mask and the thumbnail's downsample from level 0 (level-0 px per mask px)."""

    mask: np.ndarray
    downsample: float

    def any_in(self, x0: float, y0: float, x1: float, y1: float) -> bool:
        """Whether the level-0 rectangle [x0, x1) × [y0, y1) holds tissue."""
        d = self.downsample
        r0, r1 = max(int(np.floor(y0 / d)), 0), min(int(np.ceil(y1 / d)), self.mask.shape[0])
        c0, c1 = max(int(np.floor(x0 / d)), 0), min(int(np.ceil(x1 / d)), self.mask.shape[1])
        return r1 > r0 and c1 > c0 and bool(self.mask[r0:r1, c0:c1].any())

    def area_um2(self, level0_mpp: float) -> float:
        return float(self.mask.sum()) * (self.downsample * level0_mpp) ** 2

    def save(self, path: str | os.PathLike) -> None:
        save_png(path, np.where(self.mask, 255, 0).astype(np.uint8))


def tissue_mask(thumbnail: np.ndarray, downsample: float, level0_mpp: float,
                roi: tuple[int, int, int, int] | None = None) -> TissueMask:
    """The tissue of an RGB ``thumbnail`` taken at ``downsample`` (level-0 px per thumbnail px)."""
    rgb = thumbnail[..., :3]
    grey = rgb2gray(rgb)
    saturation = rgb2hsv(rgb)[..., 1]
    candidates = (grey < GLASS_GREY) | (saturation > GLASS_SATURATION)
    mask = np.zeros(grey.shape, bool)
    if candidates.any() and np.ptp(grey) > 1e-3:
        dark = grey < min(threshold_otsu(grey), GLASS_GREY) if np.ptp(grey) > 0.02 else np.zeros_like(candidates)
        coloured = (saturation > max(threshold_otsu(saturation), GLASS_SATURATION)
                    if np.ptp(saturation) > 0.02 else np.zeros_like(candidates))
        mask = (dark | coloured) & candidates
        mask = ndi.binary_closing(mask, disk(2))
        pixel_um2 = (downsample * level0_mpp) ** 2
        min_pixels = max(1, int(MIN_TISSUE_UM2 / pixel_um2))
        mask = remove_small_objects(mask, max_size=min_pixels)
        mask = remove_small_holes(mask, max_size=min_pixels)
        mask = ndi.binary_dilation(mask, iterations=1)  # a cell on the tissue's rim keeps its tile
    if roi is not None:
        x, y, w, h = roi
        inside = np.zeros_like(mask)
        r0, c0 = int(np.floor(y / downsample)), int(np.floor(x / downsample))
        r1, c1 = int(np.ceil((y + h) / downsample)), int(np.ceil((x + w) / downsample))
        inside[max(r0, 0):max(r1, 0), max(c0, 0):max(c1, 0)] = True
        mask &= inside
    return TissueMask(mask=mask, downsample=downsample)


def parse_roi(text: str | None) -> tuple[int, int, int, int] | None:
    """``"x,y,w,h"`` in level-0 pixels → a tuple; a clear error for anything else."""
    if text is None:
        return None
    try:
        x, y, w, h = (int(v) for v in str(text).split(","))
    except ValueError:
        raise ValueError(f"--roi: expected x,y,w,h in level-0 pixels (e.g. --roi 1000,2000,4096,4096), got {text!r}") from None
    if w <= 0 or h <= 0 or x < 0 or y < 0:
        raise ValueError(f"--roi: expected x, y ≥ 0 and w, h > 0, got {text!r}")
    return x, y, w, h
