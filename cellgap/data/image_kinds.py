"""The rule that turns the images users bring into the network's input: H×W×3 8-bit RGB.

=================================  ===============================================================
what the file holds                what the network sees
=================================  ===============================================================
8-bit RGB (PNG, TIFF, JPEG)        as it is
8-bit greyscale (Nissl, one stain) the channel repeated to R, G and B
16-bit / 32-bit / float            scaled to 0..255 between the 0.5th and 99.5th percentiles of all
(fluorescence, scanner TIFFs)      its pixels (all channels together, so colours keep their balance);
                                   16-bit values that all fit 0..255 are kept as they are; float
                                   images in 0..1 are multiplied by 255
RGBA / greyscale + alpha           alpha dropped when every pixel is opaque, otherwise composited on white
palette, 1-bit, CMYK (PNG, TIFF)   converted to RGB by Pillow
multi-page TIFF                    the first page when the others are smaller (a pyramid or thumbnails);
                                   a stack of equal pages (z, time, channels) is refused
2 or more than 4 channels          refused: make an RGB composite or keep the nuclear channel
=================================  ===============================================================

A refusal names the file and says what to convert it to. docs/datasets.md documents the same rule.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
PERCENTILES = (0.5, 99.5)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read ``path`` by the module's rule as a contiguous H×W×3 uint8 array; ValueError naming the file if refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image file missing")
    try:
        array = _read_tiff(path) if path.suffix.lower() in (".tif", ".tiff") else _read_pillow(path)
    except (OSError, ValueError, SyntaxError) as error:
        if str(error).startswith(str(path)):
            raise
        raise ValueError(f"{path}: cannot read image ({error}); expected a PNG, TIFF or JPEG file") from None
    except Exception as error:  # PIL's decompression-bomb refusal of a slide-sized image
        from .native import too_large_error

        raise too_large_error(path, error) from None
    return to_rgb8(array, str(path))


def _read_pillow(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        mode = image.mode
        if mode == "P":
            image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        elif mode in ("1", "CMYK", "YCbCr", "LAB", "HSV"):
            image = image.convert("L" if mode == "1" else "RGB")
        elif mode == "LA":
            image = image.convert("RGBA")
        elif mode == "PA":
            image = image.convert("RGBA")
        return np.asarray(image)


def _read_tiff(path: Path) -> np.ndarray:
    import tifffile

    def stack(what: str) -> ValueError:
        return ValueError(f"{path}: a multi-page TIFF, {what} (a stack of z-planes, time points or channels); save the "
                          "one image to segment as its own file (an RGB composite, or the nuclear channel)")

    with tifffile.TiffFile(path) as tif:
        series = tif.series
        first = series[0]
        if any(later.shape == first.shape for later in series[1:]):
            raise stack(f"{len(series)} images of {first.shape}")
        axes, array = first.axes, first.asarray()  # a pyramid's series gives its full-resolution level
        if tif.pages[0].photometric is not None and int(tif.pages[0].photometric) == 5:  # separated (CMYK)
            raise ValueError(f"{path}: a CMYK TIFF; convert it to RGB")
    if "S" in axes:  # samples (colour channels) last, wherever they were stored
        array, axes = np.moveaxis(array, axes.index("S"), -1), axes.replace("S", "") + "S"
    extra = [(a, n) for a, n in zip(axes, array.shape) if a not in "YXS"]
    if any(n > 1 for _, n in extra):
        plane = array.shape[-3:-1] if "S" in axes else array.shape[-2:]
        raise stack(", ".join(f"{n} pages along axis {a}" for a, n in extra) + f" of {plane}")
    return array.reshape([n for a, n in zip(axes, array.shape) if a in "YXS"])


def to_rgb8(array: np.ndarray, where: str = "image") -> np.ndarray:
    """An image array (H×W, H×W×C or planar C×H×W) by the module's rule as H×W×3 uint8."""
    array = np.asarray(array)
    if array.dtype == bool:
        raise ValueError(f"{where}: a 1-bit (binary) image; a mask is not a microscopy image: give the image itself")
    if array.ndim == 3 and array.shape[0] <= 16 < array.shape[2]:
        array = np.moveaxis(array, 0, -1)  # planar: channels first
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or min(array.shape[:2]) < 1:
        raise ValueError(f"{where}: an array of shape {array.shape}; expected an H×W (greyscale) or H×W×3 (RGB) image")
    channels = 1 if array.ndim == 2 else array.shape[2]
    if channels in (2,) or channels > 4:
        raise ValueError(f"{where}: {channels} channels (shape {array.shape}); make an RGB composite, or keep the nuclear "
                         "channel as a greyscale image")
    alpha = None
    if channels == 4:
        array, alpha = array[..., :3], array[..., 3]
    rgb8 = _to_uint8(array, where)
    if alpha is not None:
        opacity = _to_uint8(alpha, where, scale_by_range=True).astype(np.float32) / 255.0
        if (opacity < 1).any():  # composite on white
            rgb8 = np.rint(rgb8 * opacity[..., None] + 255.0 * (1 - opacity[..., None])).astype(np.uint8)
    if rgb8.ndim == 2:
        rgb8 = np.repeat(rgb8[..., None], 3, axis=2)
    return np.ascontiguousarray(rgb8)


def _to_uint8(array: np.ndarray, where: str, scale_by_range: bool = False) -> np.ndarray:
    """8-bit values: kept; 16/32-bit integers within 0..255 kept; float in 0..1 ×255; otherwise percentile-scaled.
    ``scale_by_range`` (alpha): integers scaled by their type's maximum instead of percentiles."""
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.integer):
        if array.size and array.min() >= 0 and array.max() <= 255:
            return array.astype(np.uint8)
        if scale_by_range:
            return np.clip(np.rint(array / np.iinfo(array.dtype).max * 255.0), 0, 255).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{where}: NaN or infinite pixel values; replace them before using the image")
        if array.size and array.min() >= 0 and array.max() <= 1:
            return np.rint(array * 255.0).astype(np.uint8)
    else:
        raise ValueError(f"{where}: pixel type {array.dtype}; expected 8- or 16-bit integers or floats")
    values = array.astype(np.float64)
    low, high = np.percentile(values, PERCENTILES)
    if high <= low:
        high = low + 1.0
    return np.clip(np.rint((values - low) / (high - low) * 255.0), 0, 255).astype(np.uint8)


__all__ = ["IMAGE_SUFFIXES", "PERCENTILES", "read_image", "to_rgb8"]
