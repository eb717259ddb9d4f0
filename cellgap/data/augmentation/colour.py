"""Colour conversions (sRGB, D65, OpenCV 8-bit CIELAB, hexcone HSV) and the HSV shift step."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
from monai.config import KeysCollection
from monai.transforms import (
    MapTransform,
    RandomizableTransform,
)
from monai.utils import TransformBackends

from .samples import INTENSITY_MAX, like, rgb_image

# Colour conversions (sRGB, D65), vectorised float32 on channel-first arrays in 0..255.
# Per-pixel powers (np.cbrt, np.power) cost several times a table lookup, and a 3×3 matmul goes through
# multi-threaded BLAS; table lookups and explicit multiply-adds keep a conversion at a few array passes.

_RGB_TO_XYZ = np.array(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]], dtype=np.float64
)
_D65_WHITE = np.array([0.950456, 1.0, 1.088754])
RGB_TO_XYZN = _RGB_TO_XYZ / _D65_WHITE[:, None]  # XYZ relative to the white point
XYZN_TO_RGB = np.linalg.inv(RGB_TO_XYZN)
LAB_DELTA = 6.0 / 29.0
_TABLE_STEPS = 1 << 14  # table resolution on [0, 1]: errors stay below 0.3 of an 8-bit LAB or RGB step


def _srgb_decode(c: np.ndarray) -> np.ndarray:
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def _srgb_encode(c: np.ndarray) -> np.ndarray:
    return np.where(c <= 0.0031308, c * 12.92, 1.055 * np.power(c, 1 / 2.4) - 0.055)


def _lab_f(t: np.ndarray) -> np.ndarray:
    return np.where(t > LAB_DELTA**3, np.cbrt(t), t / (3 * LAB_DELTA**2) + 4.0 / 29.0)


_DECODE_8BIT = _srgb_decode(np.arange(256) / 255.0).astype(np.float32)
_LAB_F_TABLE = _lab_f(np.arange(_TABLE_STEPS + 1) / _TABLE_STEPS).astype(np.float32)
_ENCODE_TABLE = (_srgb_encode(np.arange(_TABLE_STEPS + 1) / _TABLE_STEPS) * INTENSITY_MAX).astype(np.float32)


def _lookup(table: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Read ``table`` (sampled on [0, 1]) at the nearest step to each value; values outside [0, 1] clip."""
    index = (values * np.float32(_TABLE_STEPS) + np.float32(0.5)).astype(np.intp)  # take() converts other index types first
    return np.take(table, index, mode="clip")


def _mix(matrix: np.ndarray, channels: np.ndarray) -> np.ndarray:
    """``matrix @ channels`` for a 3×3 matrix and (3, N) float32 channels, as explicit multiply-adds."""
    out = np.empty_like(channels)
    for row in range(3):
        m = matrix[row].astype(np.float32)
        out[row] = channels[0] * m[0]
        out[row] += channels[1] * m[1]
        out[row] += channels[2] * m[2]
    return out


# OpenCV 8-bit LAB is affine in the opponent f-values g = (f(Y), f(X) − f(Y), f(Y) − f(Z)): lab = g·K + C.
LAB8_SCALE = np.array([116 * 2.55, 500.0, 200.0], dtype=np.float32)
LAB8_OFFSET = np.array([-16 * 2.55, 128.0, 128.0], dtype=np.float32)
OPPONENT_LOW, OPPONENT_HIGH = -LAB8_OFFSET / LAB8_SCALE, (np.float32(255) - LAB8_OFFSET) / LAB8_SCALE  # LAB's 0..255
_RGB_TO_YXZN, _YXZN_TO_RGB = RGB_TO_XYZN[[1, 0, 2]], XYZN_TO_RGB[:, [1, 0, 2]]  # XYZ in the order Y, X, Z


def rgb_to_opponent(image: np.ndarray) -> np.ndarray:
    """(3, N) opponent f-values of a (3, ...) RGB image in 0..255, read at 8-bit precision as RandStainNA reads it."""
    rgb8 = image
    if image.dtype != np.uint8:
        rgb8 = np.clip(image + np.float32(0.5), 0, 255).astype(np.uint8)  # round to the nearest 8-bit value
    g = _lookup(_LAB_F_TABLE, _mix(_RGB_TO_YXZN, np.take(_DECODE_8BIT, rgb8.reshape(3, -1))))  # f(Y), f(X), f(Z)
    g[1] -= g[0]
    np.subtract(g[0], g[2], out=g[2])
    return g


def opponent_to_rgb(g: np.ndarray) -> np.ndarray:
    """(3, N) RGB float32 in 0..255 of opponent f-values (overwritten); out-of-gamut colours clipped."""
    g[1] += g[0]  # f(X)
    np.subtract(g[0], g[2], out=g[2])  # f(Z): g now holds f(Y), f(X), f(Z)
    # The cube, then the linear segment for the few values at or below delta (very dark or strongly
    # chromatic pixels): np.where over every value costs ≈3× the whole cube.
    xyz = g * g
    xyz *= g
    low = g <= np.float32(LAB_DELTA)
    if low.any():
        xyz[low] = (g[low] - np.float32(4.0 / 29.0)) * np.float32(3 * LAB_DELTA**2)
    return _lookup(_ENCODE_TABLE, _mix(_YXZN_TO_RGB, xyz))


def rgb_to_lab8(image: np.ndarray) -> np.ndarray:
    """(3, ...) RGB in 0..255 → CIELAB in OpenCV 8-bit units (L·255/100, a+128, b+128), float32.

    The image is read at 8-bit precision, as RandStainNA reads it.
    """
    lab = rgb_to_opponent(image)
    lab *= LAB8_SCALE[:, None]
    lab += LAB8_OFFSET[:, None]
    return lab.reshape(image.shape)


def lab8_to_rgb(lab: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_lab8`: RGB float32 in 0..255, out-of-gamut colours clipped."""
    g = lab.reshape(3, -1) - LAB8_OFFSET[:, None]
    g /= LAB8_SCALE[:, None]
    return opponent_to_rgb(g).reshape(lab.shape)


def shift_hsv(image: np.ndarray, hue: float, saturation: float, value: float, value_max: float = INTENSITY_MAX) -> np.ndarray:
    """Shift hue (degrees, cyclic), saturation (fraction, clipped to 0..1) and value (image units,
    clipped to 0..value_max) of a (3, ...) RGB float image; returns float32 (hexcone HSV model)."""
    rgb = image.reshape(3, -1).astype(np.float32, copy=False)
    r, g, b = rgb
    v = np.maximum(np.maximum(r, g), b)
    chroma = v - np.minimum(np.minimum(r, g), b)
    inverse_chroma = np.divide(np.float32(1), chroma, out=np.zeros_like(chroma), where=chroma > 0)
    # Hue sector in [0, 6): the maximal channel picks the formula; grey pixels get hue 0.
    h = np.where(v == r, (g - b) * inverse_chroma, np.where(v == g, (b - r) * inverse_chroma + 2, (r - g) * inverse_chroma + 4))
    h += np.float32(hue / 60.0)
    h -= np.float32(6) * np.floor(h * np.float32(1 / 6))
    if saturation or value:
        s = np.divide(chroma, v, out=np.zeros_like(chroma), where=v > 0)
        s = np.clip(s + np.float32(saturation), 0, 1)
        v = np.clip(v + np.float32(value), 0, np.float32(value_max))
        chroma = v * s
    out = np.empty_like(rgb)
    for channel, n in enumerate((5, 3, 1)):  # R, G, B offsets of the hexcone formula
        k = h + np.float32(n)
        k -= np.float32(6) * (k >= 6)
        out[channel] = v - chroma * np.clip(np.minimum(k, 4 - k), 0, 1)
    return out.reshape(image.shape)


class RandHSVShiftd(RandomizableTransform, MapTransform):
    """Random hue / saturation / value shift (METHOD.md §7 colour step), drawn uniformly in ± the limits.

    ``hue_shift`` in degrees (OpenCV's 8-bit ±5 is ±10°; TF's ±0.1 is ±36°), ``saturation_shift`` as a
    fraction (OpenCV ±30 of 255 → 30/255), ``value_shift`` in image units (0..255).
    """

    backend = [TransformBackends.NUMPY]

    def __init__(self, keys: KeysCollection = "image", hue_shift: float = 10.0, saturation_shift: float = 30 / 255,
                 value_shift: float = 20.0, prob: float = 1.0, allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        for name, limit in (("hue_shift", hue_shift), ("saturation_shift", saturation_shift), ("value_shift", value_shift)):
            if not (isinstance(limit, (int, float)) and np.isfinite(limit) and limit >= 0):
                raise ValueError(f"{name}: expected a finite limit ≥ 0, got {limit!r}")
        self.limits = (float(hue_shift), float(saturation_shift), float(value_shift))
        self.shifts = (0.0, 0.0, 0.0)

    def randomize(self, data=None) -> None:
        super().randomize(None)
        if self._do_transform:
            self.shifts = tuple(float(self.R.uniform(-limit, limit)) for limit in self.limits)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            d[key] = like(shift_hsv(rgb_image(d[key], key), *self.shifts), d[key])
        return d
