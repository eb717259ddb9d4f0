"""Synthetic slides for tests and benchmarks (never downloaded), and a parameter-free stand-in network.

:func:`synthetic_slide` paints tissue (tiles of :mod:`cellgap.data.synthetic`) inside an ellipse on glass;
:func:`write_slide` saves it as an SVS-like Aperio TIFF (JPEG tiles; OpenSlide opens it as ``aperio``), an
OME-TIFF pyramid, or a plain image.  :class:`StainThresholdNet` marks dark (haematoxylin) pixels as nuclei with
the output layout of :class:`cellgap.network.CellGapNet`: a deterministic, strictly local network whose cells are
real objects of the image, for checks where a random encoder would find none (seams, coordinates, resume).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

GLASS = 242  # grey level of the empty glass


def synthetic_slide(width: int, height: int, seed: int = 0, magnification: int = 20, tissue: float = 0.6,
                    tile: int = 512) -> np.ndarray:
    """RGB uint8 (height, width, 3): synthetic H&E inside a centred ellipse covering about ``tissue`` of the
    area, glass (with faint noise) outside. ``tissue=1`` fills the whole image."""
    from ..data.synthetic import generate_tile

    rng = np.random.default_rng(seed)
    image = np.clip(rng.normal(GLASS, 2.0, (height, width, 3)), 0, 255).astype(np.uint8)
    if tissue >= 1:
        inside = np.ones((height, width), bool)
    else:
        yy, xx = np.mgrid[0:height, 0:width]
        scale = np.sqrt(tissue * 4 / np.pi)  # ellipse area π·a·b = tissue · width · height
        inside = ((xx - width / 2) / (scale * width / 2)) ** 2 + ((yy - height / 2) / (scale * height / 2)) ** 2 <= 1
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            region = inside[top : top + tile, left : left + tile]
            if not region.any():
                continue
            painted = generate_tile(seed * 100_003 + top * 7 + left, size=tile, magnification=magnification).image
            h, w = region.shape
            target = image[top : top + h, left : left + w]
            target[region] = painted[:h, :w][region]
    return image


def pyramid(image: np.ndarray, levels: int) -> list[np.ndarray]:
    """``image`` and its 2×, 4× … box-averaged reductions."""
    out = [image]
    for _ in range(levels - 1):
        prev = out[-1]
        h, w = prev.shape[0] // 2 * 2, prev.shape[1] // 2 * 2
        out.append(prev[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8))
    return out


def write_slide(path: str | os.PathLike, image: np.ndarray, mpp: float | None, kind: str = "svs", levels: int = 2,
                tile: int = 256, magnification: float | None = None) -> Path:
    """Save ``image`` (level 0) as ``kind``: ``"svs"`` (Aperio TIFF, JPEG tiles, MPP and AppMag in the description),
    ``"ome"`` (OME-TIFF with SubIFD levels, zlib) or ``"plain"`` (PNG/TIFF by suffix, no pyramid); ``mpp=None``
    writes no resolution."""
    import tifffile

    path = Path(path)
    levels_ = pyramid(image, levels)
    if kind == "svs":
        height, width = image.shape[:2]
        description = f"Aperio Image Library v12.0.15\r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) JPEG/RGB Q=90"
        if magnification is not None:
            description += f"|AppMag = {magnification:g}"
        if mpp is not None:
            description += f"|MPP = {mpp:g}"
        with tifffile.TiffWriter(path, bigtiff=False) as tif:
            for i, level in enumerate(levels_):
                tif.write(level, tile=(tile, tile), photometric="rgb", compression="jpeg", compressionargs={"level": 90},
                          description=description if i == 0 else f"Aperio Image Library v12.0.15\r\nlevel {i}",
                          subfiletype=0 if i == 0 else 1, metadata=None)
    elif kind == "ome":
        metadata = {"axes": "YXS"}
        if mpp is not None:
            metadata.update(PhysicalSizeX=mpp, PhysicalSizeXUnit="µm", PhysicalSizeY=mpp, PhysicalSizeYUnit="µm")
        with tifffile.TiffWriter(path, ome=True, bigtiff=False) as tif:
            tif.write(levels_[0], subifds=len(levels_) - 1, tile=(tile, tile), photometric="rgb", compression="zlib",
                      metadata=metadata)
            for level in levels_[1:]:
                tif.write(level, subfiletype=1, tile=(tile, tile), photometric="rgb", compression="zlib")
    elif kind == "plain":
        if path.suffix.lower() in (".tif", ".tiff"):
            resolution = (1e4 / mpp, 1e4 / mpp) if mpp else None
            tifffile.imwrite(path, image, photometric="rgb", compression="zlib", resolution=resolution,
                             resolutionunit="CENTIMETER" if mpp else None)
        else:
            from PIL import Image

            Image.fromarray(image).save(path, dpi=(25400 / mpp, 25400 / mpp) if mpp else None)
    else:
        raise ValueError(f"kind: expected 'svs', 'ome' or 'plain', got {kind!r}")
    return path


class StainThresholdNet(nn.Module):
    """Nuclei = pixels whose 5×5-averaged red channel is below ``threshold`` (haematoxylin absorbs red).

    Outputs as :class:`cellgap.network.CellGapNet`: ``contour`` logits [boundary, body, background], flat
    ``distance`` maps (no interfaces: touching nuclei stay one cell) and ``type`` logits (class 1 for dark,
    class 2 for very dark pixels).  Strictly local (a 5×5 window), so a tile and the whole image agree exactly.
    """

    def __init__(self, num_classes: int = 2, threshold: float = 0.62, sharpness: float = 40.0):
        super().__init__()
        self.num_classes, self.threshold, self.sharpness = num_classes, threshold, sharpness

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        red = F.avg_pool2d(F.pad(x[:, :1], (2, 2, 2, 2), mode="replicate"), 5, stride=1)
        body = (self.threshold - red) * self.sharpness
        contour = torch.cat([torch.full_like(body, -20.0), body, -body], dim=1)
        distance = torch.zeros(x.shape[0], 4, *x.shape[2:], dtype=x.dtype, device=x.device)
        out = {"contour": contour, "distance": distance}
        if self.num_classes > 1:
            very = (self.threshold - 0.1 - red) * self.sharpness
            classes = [-body, body - very.clamp(min=0)] + [very] + [torch.full_like(body, -20.0)] * (self.num_classes - 2)
            out["type"] = torch.cat(classes[: self.num_classes + 1], dim=1)
        return out


def stain_threshold_meta(num_classes: int = 2, magnification: int = 20) -> dict:
    """Checkpoint-like meta for :class:`StainThresholdNet`."""
    return {"encoder": "stain-threshold", "class_names": [f"class{i}" for i in range(1, num_classes + 1)][:num_classes],
            "magnification": magnification, "mpp": 10.0 / magnification, "min_cell_size": 20,
            "encoder_weights_id": "none"}
