"""Training augmentation of CISCA (METHOD.md §7) as MONAI dictionary transforms.

The sample keys follow docs/contracts.md: ``image`` (3, H, W) in 0..255, uint8 as ``LoadTiled`` gives it
or float (augment *before* scaling to 0..1), ``label`` (1, H, W) instance map and ``classes`` (1, H, W)
class map. Geometric transforms move image and label maps with identical parameters (label maps by
exact index moves or nearest sampling, never interpolated); photometric transforms touch the image
only, in float32. The targets are recomputed afterwards from the augmented instance map by
``cellgap.targets.CISCATargetsd``.

:func:`cisca_augmentations` returns the ordered pipeline of §7 (augHE / augNissl). MONAI supplies
the crop, the kernels and draws of Gaussian blur and sharpening, contrast about the mean and
brightness; this module adds what MONAI lacks:

* :class:`RandLABStainJitterd` — RandStainNA-like jitter of the tile's CIELAB statistics towards
  per-dataset targets (:data:`STAIN_STATISTICS`);
* :class:`RandHSVShiftd` — hue / saturation / value shifts;
* :class:`RandCoarseElasticd` — the reference's coarse-grid elastic deformation (5×5 control
  points, ±10 px, border points pushed inwards), bilinear for the image and nearest for labels;
  :class:`RandDihedralElasticd` runs the turns/flips and this warp as one resampling;
* :class:`CheckTiled` — shape and dtype checks with messages that name the key;

and, for speed, equivalents of MONAI transforms that compute the same thing without MONAI's per-call
bookkeeping or with a faster kernel (each tested against the MONAI transform or its distribution):
:class:`RandDihedrald` (``RandRotate90d`` + a ``OneOf`` of ``RandFlipd``), :class:`RandSquareCropd`,
:class:`MedianSmooth3x3d`, :class:`RandGaussianSmoothNumpyd`, :class:`RandGaussianSharpenNumpyd`,
:class:`RandGaussianNoise32d`, :class:`RandGammaContrastd` and :class:`ClipIntensityd`. With them the
augmentation of a 256² tile costs ≈7 instead of ≈12.6 ms.

Intended behaviour, not the reference quirks (METHOD.md §10.18/19): rotations draw k uniformly in
{0, 1, 2, 3}, the crop offset covers every valid position, elastic deformation interpolates the
image bilinearly. Not included: stain *normalisation* to fixed reference images (Vahadane, Macenko,
Ruifrok, Reinhard to ``HE1.png`` / Nissl references): the reference images are not distributed;
the LAB jitter covers the stain variation. CLAHE (skimage, ~10 ms per 256² tile, no MONAI
equivalent) is replaced by MONAI's gamma contrast, motion/box blur by Gaussian blur, and emboss is
left out. Timings: docs/benchmarks.md, "Data pipeline".

Reproducibility: every random draw goes through MONAI's ``self.R`` (the float32 noise through a
generator seeded from it), so
``Compose(cisca_augmentations()).set_random_state(seed)`` or ``monai.utils.set_determinism(seed)``
before building the ``Compose`` makes the whole pipeline repeatable.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor, get_track_meta
from monai.data.utils import get_random_patch, get_valid_patch_size
from monai.networks.layers.convutils import gaussian_1d
from monai.transforms import (
    CastToTyped,
    Compose,
    Identityd,
    MapTransform,
    OneOf,
    RandGaussianSharpend,
    RandGaussianSmoothd,
    RandomizableTransform,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    RandShiftIntensityd,
    RandSpatialCropd,
)
from monai.utils import TransformBackends, convert_to_dst_type, ensure_tuple, ensure_tuple_rep

from ..targets import CONTOUR_LEVELS_KEY
from .registry import DATASETS

INTENSITY_MAX = 255.0  # images are augmented in 0..255 (docs/contracts.md)

# --------------------------------------------------------------------------------------------
# Stain statistics (METHOD.md §7, RandStainNA yaml files)


@dataclass(frozen=True)
class StainStatistics:
    """Per-dataset CIELAB statistics in OpenCV 8-bit units (L·255/100, a+128, b+128), per channel
    (L, A, B): mean and standard deviation over training images of the per-image channel mean
    (``mean_mu``, ``mean_sigma``) and of the per-image channel std (``std_mu``, ``std_sigma``)."""

    mean_mu: tuple[float, float, float]
    mean_sigma: tuple[float, float, float]
    std_mu: tuple[float, float, float]
    std_sigma: tuple[float, float, float]

    def __post_init__(self):
        for name in ("mean_mu", "mean_sigma", "std_mu", "std_sigma"):
            value = getattr(self, name)
            try:
                triple = tuple(float(v) for v in value)
            except (TypeError, ValueError):
                raise ValueError(f"stain statistics {name}: expected three numbers (L, A, B), got {value!r}") from None
            if len(triple) != 3 or not all(np.isfinite(triple)):
                raise ValueError(f"stain statistics {name}: expected three finite numbers (L, A, B), got {value!r}")
            if name != "mean_mu" and min(triple) < 0:
                raise ValueError(f"stain statistics {name}: expected non-negative values, got {value!r}")
            object.__setattr__(self, name, triple)


# the datasets' own statistics, from their registry entries
STAIN_STATISTICS: dict[str, StainStatistics] = {
    name: StainStatistics(**spec.stain_statistics) for name, spec in DATASETS.items() if spec.stain_statistics is not None
}
# Neutral H&E default for datasets without their own statistics: the mean of the two H&E tables.
STAIN_STATISTICS["he"] = StainStatistics(
    *(
        tuple((a + b) / 2 for a, b in zip(getattr(STAIN_STATISTICS["conic"], f), getattr(STAIN_STATISTICS["pannuke"], f)))
        for f in ("mean_mu", "mean_sigma", "std_mu", "std_sigma")
    )
)


def stain_statistics(value: str | Mapping | StainStatistics) -> StainStatistics:
    """Statistics from a dataset name (``"conic"``, ``"pannuke"``, ``"cytodark0"``, ``"he"`` = neutral
    H&E default), a mapping with the four :class:`StainStatistics` fields, or the object itself."""
    if isinstance(value, StainStatistics):
        return value
    if isinstance(value, str):
        key = value.strip().lower()
        if key not in STAIN_STATISTICS:
            raise ValueError(
                f"stain_stats: unknown dataset {value!r}; expected one of {sorted(STAIN_STATISTICS)} "
                "(use 'he' for other H&E datasets) or a mapping with mean_mu, mean_sigma, std_mu, std_sigma"
            )
        return STAIN_STATISTICS[key]
    if isinstance(value, Mapping):
        fields = ("mean_mu", "mean_sigma", "std_mu", "std_sigma")
        missing = [f for f in fields if f not in value]
        unknown = [k for k in value if k not in fields]
        if missing or unknown:
            raise ValueError(f"stain_stats: expected exactly the keys {list(fields)}; missing {missing}, unknown {unknown}")
        return StainStatistics(**{f: value[f] for f in fields})
    raise TypeError(f"stain_stats: expected a dataset name, a mapping or StainStatistics, got {type(value).__name__}")


# --------------------------------------------------------------------------------------------
# Colour conversions (sRGB, D65), vectorised float32 on channel-first arrays in 0..255.
# Per-pixel powers (np.cbrt, np.power) cost several times a table lookup, and a 3×3 matmul goes through
# multi-threaded BLAS; table lookups and explicit multiply-adds keep a conversion at a few array passes.

_RGB_TO_XYZ = np.array(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]], dtype=np.float64
)
_D65_WHITE = np.array([0.950456, 1.0, 1.088754])
_RGB_TO_XYZN = _RGB_TO_XYZ / _D65_WHITE[:, None]  # XYZ relative to the white point
_XYZN_TO_RGB = np.linalg.inv(_RGB_TO_XYZN)
_LAB_DELTA = 6.0 / 29.0
_TABLE_STEPS = 1 << 14  # table resolution on [0, 1]: errors stay below 0.3 of an 8-bit LAB or RGB step


def _srgb_decode(c: np.ndarray) -> np.ndarray:
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def _srgb_encode(c: np.ndarray) -> np.ndarray:
    return np.where(c <= 0.0031308, c * 12.92, 1.055 * np.power(c, 1 / 2.4) - 0.055)


def _lab_f(t: np.ndarray) -> np.ndarray:
    return np.where(t > _LAB_DELTA**3, np.cbrt(t), t / (3 * _LAB_DELTA**2) + 4.0 / 29.0)


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
_LAB8_SCALE = np.array([116 * 2.55, 500.0, 200.0], dtype=np.float32)
_LAB8_OFFSET = np.array([-16 * 2.55, 128.0, 128.0], dtype=np.float32)
_OPPONENT_LOW, _OPPONENT_HIGH = -_LAB8_OFFSET / _LAB8_SCALE, (np.float32(255) - _LAB8_OFFSET) / _LAB8_SCALE  # LAB's 0..255
_RGB_TO_YXZN, _YXZN_TO_RGB = _RGB_TO_XYZN[[1, 0, 2]], _XYZN_TO_RGB[:, [1, 0, 2]]  # XYZ in the order Y, X, Z


def _rgb_to_opponent(image: np.ndarray) -> np.ndarray:
    """(3, N) opponent f-values of a (3, ...) RGB image in 0..255, read at 8-bit precision as RandStainNA reads it."""
    rgb8 = image
    if image.dtype != np.uint8:
        rgb8 = np.clip(image + np.float32(0.5), 0, 255).astype(np.uint8)  # round to the nearest 8-bit value
    g = _lookup(_LAB_F_TABLE, _mix(_RGB_TO_YXZN, np.take(_DECODE_8BIT, rgb8.reshape(3, -1))))  # f(Y), f(X), f(Z)
    g[1] -= g[0]
    np.subtract(g[0], g[2], out=g[2])
    return g


def _opponent_to_rgb(g: np.ndarray) -> np.ndarray:
    """(3, N) RGB float32 in 0..255 of opponent f-values (overwritten); out-of-gamut colours clipped."""
    g[1] += g[0]  # f(X)
    np.subtract(g[0], g[2], out=g[2])  # f(Z): g now holds f(Y), f(X), f(Z)
    # The cube, then the linear segment for the few values at or below delta (very dark or strongly
    # chromatic pixels): np.where over every value costs ≈3× the whole cube.
    xyz = g * g
    xyz *= g
    low = g <= np.float32(_LAB_DELTA)
    if low.any():
        xyz[low] = (g[low] - np.float32(4.0 / 29.0)) * np.float32(3 * _LAB_DELTA**2)
    return _lookup(_ENCODE_TABLE, _mix(_YXZN_TO_RGB, xyz))


def rgb_to_lab8(image: np.ndarray) -> np.ndarray:
    """(3, ...) RGB in 0..255 → CIELAB in OpenCV 8-bit units (L·255/100, a+128, b+128), float32.

    The image is read at 8-bit precision, as RandStainNA reads it.
    """
    lab = _rgb_to_opponent(image)
    lab *= _LAB8_SCALE[:, None]
    lab += _LAB8_OFFSET[:, None]
    return lab.reshape(image.shape)


def lab8_to_rgb(lab: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_lab8`: RGB float32 in 0..255, out-of-gamut colours clipped."""
    g = lab.reshape(3, -1) - _LAB8_OFFSET[:, None]
    g /= _LAB8_SCALE[:, None]
    return _opponent_to_rgb(g).reshape(lab.shape)


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


# --------------------------------------------------------------------------------------------
# Helpers


def _numpy(value) -> np.ndarray:
    if isinstance(value, MetaTensor):
        value = value.as_tensor()
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _rgb(value, key: Hashable) -> np.ndarray:
    array = _numpy(value)
    if array.ndim != 3 or array.shape[0] != 3:
        raise ValueError(f"{key}: expected a channel-first RGB image of shape (3, H, W), got shape {tuple(array.shape)}")
    if array.dtype.kind not in "uif":
        raise ValueError(f"{key}: expected a numeric image (0..255), got dtype {array.dtype}")
    return array


def _channels_first(value, key: Hashable) -> np.ndarray:
    array = _numpy(value)
    if array.ndim != 3:
        raise ValueError(f"{key}: expected a channel-first (C, H, W) image, got shape {tuple(array.shape)}")
    return array


def _like(array: np.ndarray, reference):
    """``array`` in the container type of ``reference`` (numpy, tensor, or MetaTensor with its metadata).

    With MetaTensor tracking off a MetaTensor reference gives a plain tensor, as MONAI's transforms do
    (building a MetaTensor costs ≈0.1 ms per key and call)."""
    if isinstance(reference, torch.Tensor) and (not isinstance(reference, MetaTensor) or not get_track_meta()):
        if reference.device.type == "cpu":
            return torch.from_numpy(np.ascontiguousarray(array))
    return convert_to_dst_type(array, reference, dtype=array.dtype)[0]


# --------------------------------------------------------------------------------------------
# Transforms MONAI lacks


class CheckTiled(MapTransform):
    """Check a sample before augmentation; raise a ValueError naming the key otherwise.

    ``image_key``: (3, H, W) numeric RGB in 0..255 (a float image whose maximum is ≤ 1 looks already
    scaled and is refused: augment before scaling). ``label_keys``: (1, H, W) maps with the image's
    H and W holding non-negative integers (integer dtype, or float with integral values as
    ``LoadImaged`` gives them). ``optional_keys``: maps checked the same way when the sample has them.
    ``values=False`` checks keys, shapes and dtypes only (no pass over the pixels): before a crop from a
    large tile, whose values are then checked on the crop.
    """

    backend = [TransformBackends.NUMPY, TransformBackends.TORCH]

    def __init__(self, image_key: str = "image", label_keys: KeysCollection = ("label", "classes"),
                 allow_missing_keys: bool = False, optional_keys: KeysCollection = (), values: bool = True) -> None:
        self.image_key = image_key
        self.values = bool(values)
        self.label_keys = ensure_tuple(label_keys)
        self.optional_keys = tuple(k for k in ensure_tuple(optional_keys) if k not in self.label_keys)
        super().__init__(keys=(image_key, *self.label_keys), allow_missing_keys=allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        if self.image_key not in d:
            if self.allow_missing_keys:
                return d
            raise KeyError(f"{self.image_key}: key missing from the sample (keys: {sorted(map(str, d))})")
        image = _rgb(d[self.image_key], self.image_key)
        if self.values and image.dtype.kind == "f" and image.size:
            low, high = (float(v) for v in torch.aminmax(torch.from_numpy(np.ascontiguousarray(image))))  # one pass
            if not (np.isfinite(low) and np.isfinite(high)) or low < 0 or high > INTENSITY_MAX:
                raise ValueError(f"{self.image_key}: expected intensities in 0..255, found {low:g}..{high:g}")
            if 0 < high <= 1:
                raise ValueError(
                    f"{self.image_key}: intensities lie in 0..{high:g}; the image looks scaled to 0..1 already, "
                    "augmentation expects 0..255 (scale after augmenting)"
                )
        for key in self.label_keys + self.optional_keys:
            if key not in d:
                if self.allow_missing_keys or key in self.optional_keys:
                    continue
                raise KeyError(f"{key}: key missing from the sample (keys: {sorted(map(str, d))})")
            label = _numpy(d[key])
            if label.ndim != 3 or label.shape[0] != 1 or label.shape[1:] != image.shape[1:]:
                raise ValueError(
                    f"{key}: expected a (1, H, W) map matching {self.image_key} (1, {image.shape[1]}, {image.shape[2]}), "
                    f"got shape {tuple(label.shape)}"
                )
            if label.dtype.kind not in "iubf":
                raise ValueError(f"{key}: expected an integer map, got dtype {label.dtype}")
            if not self.values:
                continue
            if label.dtype.kind == "f":
                if not np.array_equal(label, np.round(label)):
                    raise ValueError(f"{key}: expected integer ids, found non-integer values (interpolated labels?)")
            if label.size and label.dtype.kind != "u" and label.min() < 0:
                raise ValueError(f"{key}: expected non-negative ids (0 = background), found {label.min()}")
        return d


class RandLABStainJitterd(RandomizableTransform, MapTransform):
    """RandStainNA-like stain jitter (METHOD.md §7): move the tile's CIELAB statistics to random targets.

    Per channel (L, A, B in OpenCV 8-bit units) a target mean ~ N(mean_mu, mean_sigma·sigma_scale) and
    a target std ~ N(std_mu, std_sigma·sigma_scale) are drawn (RandStainNA's ``std_hyper=-0.4`` gives
    sigma_scale 0.6); the tile is Reinhard-transferred to them — (x − mean)/std·target_std + target_mean
    — clipped to 0..255 in LAB and converted back to RGB. A target std below ``min_std`` (a normal draw
    can be negative) is raised to it. ``stats``: see :func:`stain_statistics`.
    """

    backend = [TransformBackends.NUMPY]

    def __init__(self, keys: KeysCollection = "image", stats: str | Mapping | StainStatistics = "he", prob: float = 1.0,
                 sigma_scale: float = 0.6, min_std: float = 1.0, allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.stats = stain_statistics(stats)
        if not (isinstance(sigma_scale, (int, float)) and sigma_scale >= 0):
            raise ValueError(f"sigma_scale: expected a number ≥ 0, got {sigma_scale!r}")
        if not (isinstance(min_std, (int, float)) and min_std > 0):
            raise ValueError(f"min_std: expected a positive number, got {min_std!r}")
        self.sigma_scale = float(sigma_scale)
        self.min_std = float(min_std)
        self.target_mean = np.asarray(self.stats.mean_mu, dtype=np.float32)
        self.target_std = np.asarray(self.stats.std_mu, dtype=np.float32)

    def randomize(self, data=None) -> None:
        super().randomize(None)
        if not self._do_transform:
            return
        s = self.stats
        self.target_mean = self.R.normal(s.mean_mu, np.asarray(s.mean_sigma) * self.sigma_scale).astype(np.float32)
        std = self.R.normal(s.std_mu, np.asarray(s.std_sigma) * self.sigma_scale)
        self.target_std = np.maximum(std, self.min_std).astype(np.float32)

    def transfer(self, image: np.ndarray) -> np.ndarray:
        """Reinhard transfer of a (3, H, W) RGB image to the current targets; float32 RGB 0..255."""
        # Statistics and transfer in the opponent f-values, where LAB is one affine map away: the same
        # arithmetic with the 8-bit LAB scaling and its clip bounds folded into three constants per channel.
        g = _rgb_to_opponent(image)
        std = g.std(axis=1) * _LAB8_SCALE  # LAB units; float32 with numpy's pairwise summation
        # A flat channel (std 0) keeps its flatness and only moves to the target mean.
        scale = np.where(std > 1e-6, self.target_std / np.maximum(std, 1e-6), 0.0).astype(np.float32)
        # (lab − mean)·scale + target in LAB is g·scale + offset in opponent units, lab = g·K + C
        offset = ((self.target_mean - _LAB8_OFFSET) / _LAB8_SCALE - g.mean(axis=1) * scale).astype(np.float32)
        for channel in range(3):
            g[channel] *= scale[channel]
            g[channel] += offset[channel]
            np.clip(g[channel], _OPPONENT_LOW[channel], _OPPONENT_HIGH[channel], out=g[channel])
        return _opponent_to_rgb(g).reshape(image.shape)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            d[key] = _like(self.transfer(_rgb(d[key], key)), d[key])
        return d


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
            d[key] = _like(shift_hsv(_rgb(d[key], key), *self.shifts), d[key])
        return d


@lru_cache(maxsize=16)
def _upsampling_matrix(size: int, points: int) -> np.ndarray:
    """(size, points) float32 weights of linear interpolation from ``points`` control points spread over
    ``size`` pixels (first and last point on the first and last pixel: align_corners=True)."""
    position = np.linspace(0.0, points - 1.0, size)
    left = np.minimum(np.floor(position).astype(np.intp), points - 2)
    weight = position - left
    matrix = np.zeros((size, points))
    matrix[np.arange(size), left] = 1.0 - weight
    matrix[np.arange(size), left + 1] = weight
    return matrix.astype(np.float32)


class RandCoarseElasticd(RandomizableTransform, MapTransform):
    """Elastic deformation from a coarse grid of random displacements (METHOD.md §7 step 4).

    A ``grid_size``×``grid_size`` grid of displacements, uniform in ±``magnitude`` px per axis, with the
    border points' normal component pointing inwards (so no pixel is sampled from outside the tile),
    upsampled bilinearly to the tile (align_corners) and applied per key by ``mode``: "bilinear" for
    images (``torch.grid_sample``, border padding; float32 out, whatever the input dtype), "nearest" for
    label maps (an exact gather at the rounded source position: values are only moved, never mixed, and
    the input dtype is kept).

    MONAI's Rand2DElasticd draws normal offsets, upsamples them bicubically and resamples in float64
    (≈30 ms per 256² sample on the dev machine); it also has no inward border rule. Here the dense
    field is two small matrix products and labels are gathered with ``np.take`` instead of a float
    grid_sample pass (≈1.3 against ≈2.6 ms per 256² sample, docs/benchmarks.md).
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, keys: KeysCollection = ("image", "label", "classes"),
                 mode: str | Sequence[str] = ("bilinear", "nearest", "nearest"), grid_size: int = 5,
                 magnitude: float = 10.0, prob: float = 1.0, allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        bad = [m for m in self.mode if m not in ("bilinear", "nearest")]
        if bad:
            raise ValueError(f"mode: expected 'bilinear' or 'nearest' per key, got {bad}")
        if isinstance(grid_size, bool) or not isinstance(grid_size, (int, np.integer)) or grid_size < 2:
            raise ValueError(f"grid_size: expected an integer ≥ 2 (control points per axis), got {grid_size!r}")
        if not (isinstance(magnitude, (int, float)) and np.isfinite(magnitude) and magnitude >= 0):
            raise ValueError(f"magnitude: expected a displacement in pixels ≥ 0, got {magnitude!r}")
        self.grid_size = int(grid_size)
        self.magnitude = float(magnitude)
        self.displacement = np.zeros((2, self.grid_size, self.grid_size), dtype=np.float32)

    def randomize(self, data=None) -> None:
        super().randomize(None)
        if not self._do_transform:
            return
        g = self.grid_size
        disp = self.R.uniform(-self.magnitude, self.magnitude, size=(2, g, g))
        disp[0, 0, :], disp[0, -1, :] = np.abs(disp[0, 0, :]), -np.abs(disp[0, -1, :])  # rows: top down, bottom up
        disp[1, :, 0], disp[1, :, -1] = np.abs(disp[1, :, 0]), -np.abs(disp[1, :, -1])  # columns: left right, right left
        self.displacement = disp.astype(np.float32)

    def source_positions(self, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """(H, W) float32 row and column of the input position that each output pixel reads, clipped
        to the tile (grid_sample's border padding)."""
        rows = _upsampling_matrix(height, self.grid_size)
        cols = _upsampling_matrix(width, self.grid_size)
        y = rows @ self.displacement[0] @ cols.T
        x = rows @ self.displacement[1] @ cols.T
        y += np.arange(height, dtype=np.float32)[:, None]
        x += np.arange(width, dtype=np.float32)[None, :]
        return np.clip(y, 0, height - 1, out=y), np.clip(x, 0, width - 1, out=x)

    def sampling_grid(self, height: int, width: int) -> torch.Tensor:
        """(1, H, W, 2) grid_sample grid (x, y in −1..1, align_corners=True) for the current displacement."""
        return _sampling_grid(*self.source_positions(height, width), height, width)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        self.randomize()
        return self.warp(data) if self._do_transform else dict(data)

    def warp(self, data: Mapping[Hashable, object], dihedral: RandDihedrald | None = None) -> dict:
        """The current displacement on every key, after ``dihedral``'s current turn and flip when given:
        one resampling that reads each output pixel where the two steps in turn would have read it."""
        d = dict(data)
        keys = [(k, m) for k, m in self.key_iterator(d, self.mode)]
        if not keys:
            return d
        arrays = {k: _numpy(d[k]) for k, _ in keys}
        first = keys[0][0]
        size = arrays[first].shape[1:]
        for k, _ in keys:
            if arrays[k].ndim != 3 or arrays[k].shape[1:] != size:
                raise ValueError(
                    f"{k}: expected a channel-first (C, {size[0]}, {size[1]}) array like {first}, got shape {tuple(arrays[k].shape)}"
                )
        height, width = size
        out_size = (width, height) if dihedral is not None and dihedral.quarter_turns % 2 else (height, width)
        y, x = self.source_positions(*out_size)
        if dihedral is not None:
            y, x = dihedral.source_positions(y, x, height, width)
        grid = index = None
        for k, mode in keys:
            array = arrays[k]
            if mode == "bilinear":
                if grid is None:
                    grid = _sampling_grid(y, x, height, width)
                source = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]
                moved = F.grid_sample(source, grid, mode="bilinear", padding_mode="border", align_corners=True)[0].numpy()
            else:
                if index is None:  # rint rounds halves to even, as grid_sample's nearest mode does
                    index = (np.rint(y).astype(np.intp) * width + np.rint(x).astype(np.intp)).ravel()
                moved = np.take(array.reshape(array.shape[0], -1), index, axis=1).reshape(array.shape[0], *out_size)
            d[k] = _like(moved, d[k])
        return d


def _sampling_grid(y: np.ndarray, x: np.ndarray, height: int, width: int) -> torch.Tensor:
    """grid_sample's (1, h, w, 2) grid (align_corners=True) reading input positions (y, x) of an H×W input."""
    return torch.from_numpy(np.stack([x * np.float32(2.0 / max(width - 1, 1)) - np.float32(1.0),
                                      y * np.float32(2.0 / max(height - 1, 1)) - np.float32(1.0)], axis=-1)[None])


# Same operations as MONAI's RandRotate90d + RandFlipd, RandSpatialCropd, MedianSmoothd,
# RandGaussianNoised and ScaleIntensityRanged, without their per-call bookkeeping (≈0.5–1 ms each on a
# 256² sample with three keys, against the < 0.2 ms the data movement takes; docs/benchmarks.md).

_FLIP_AXES = ((), (1,), (2,), (1, 2))  # none, vertical (spatial axis 0), horizontal (spatial axis 1), both


class RandDihedrald(RandomizableTransform, MapTransform):
    """Rotation by quarter turns, then a flip, applied identically to every key (one copy per key).

    With probability ``rotate_prob`` the sample turns by k quarter turns (``np.rot90`` on the spatial
    axes), k uniform in {0, 1, 2, 3}; otherwise k = 0. Independently, with probability ``flip_prob``
    it is flipped vertically, horizontally or along both axes, uniformly; otherwise not. This is the
    distribution of METHOD.md §7 steps 2–3 (``RandRotate90d`` + a ``OneOf`` of three ``RandFlipd``) over
    the 8 elements of the dihedral group, drawn and applied in one step. Label maps are only moved.
    """

    backend = [TransformBackends.NUMPY, TransformBackends.TORCH]

    def __init__(self, keys: KeysCollection = ("image", "label", "classes"), rotate_prob: float = 0.9,
                 flip_prob: float = 0.9, allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, 1.0)
        for name, value in (("rotate_prob", rotate_prob), ("flip_prob", flip_prob)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"{name}: expected a probability in 0..1, got {value!r}")
        self.rotate_prob = float(rotate_prob)
        self.flip_prob = float(flip_prob)
        self.quarter_turns = 0
        self.flip = 0  # index into _FLIP_AXES

    def randomize(self, data=None) -> None:
        super().randomize(None)
        self.quarter_turns = int(self.R.randint(4)) if self.R.rand() < self.rotate_prob else 0
        self.flip = int(self.R.randint(1, 4)) if self.R.rand() < self.flip_prob else 0

    def apply(self, array: np.ndarray) -> np.ndarray:
        """The current element on one (C, H, W) array (a contiguous copy)."""
        out = np.rot90(array, self.quarter_turns, axes=(1, 2)) if self.quarter_turns else array
        if self.flip:
            out = np.flip(out, axis=_FLIP_AXES[self.flip])
        return np.ascontiguousarray(out)

    def source_positions(self, y: np.ndarray, x: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Row and column of an H×W input that output positions (y, x) read under the current element
        (fractional positions allowed): the inverse of the flip, then of each quarter turn."""
        turned_height, turned_width = (width, height) if self.quarter_turns % 2 else (height, width)
        if 1 in _FLIP_AXES[self.flip]:
            y = (turned_height - 1) - y
        if 2 in _FLIP_AXES[self.flip]:
            x = (turned_width - 1) - x
        for turn in range(self.quarter_turns, 0, -1):  # np.rot90 turn: output (i, j) reads input (j, w − 1 − i)
            input_width = width if turn % 2 else height
            y, x = x, (input_width - 1) - y
        return y, x

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        self.randomize()
        return self.move(data)

    def move(self, data: Mapping[Hashable, object]) -> dict:
        """The current element on every key."""
        d = dict(data)
        if not (self.quarter_turns or self.flip):
            return d
        for key in self.key_iterator(d):
            array = _numpy(d[key])
            if array.ndim != 3:
                raise ValueError(f"{key}: expected a channel-first (C, H, W) array, got shape {tuple(array.shape)}")
            d[key] = _like(self.apply(array), d[key])
        return d


class RandDihedralElasticd(RandomizableTransform, MapTransform):
    """METHOD.md §7 steps 2–4: :class:`RandDihedrald` then :class:`RandCoarseElasticd`, drawn in that order from
    one random state. When the warp fires, the turn and flip are folded into its source positions, so every
    key is resampled once instead of copied and then resampled (≈0.8 ms less per 256² sample with four keys).
    The result equals the two steps in sequence, except that a nearest-sampling position exactly halfway
    between two pixels may round to the other one (ties round to even in the input's frame)."""

    backend = [TransformBackends.NUMPY, TransformBackends.TORCH]

    def __init__(self, keys: KeysCollection = ("image", "label", "classes"),
                 mode: str | Sequence[str] = ("bilinear", "nearest", "nearest"), rotate_prob: float = 0.9,
                 flip_prob: float = 0.9, elastic_prob: float = 0.7, grid_size: int = 5, magnitude: float = 10.0,
                 allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, 1.0)
        self.dihedral = RandDihedrald(keys, rotate_prob, flip_prob, allow_missing_keys)
        self.elastic = RandCoarseElasticd(keys, mode, grid_size, magnitude, elastic_prob, allow_missing_keys)
        self.dihedral.R = self.elastic.R = self.R

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> RandDihedralElasticd:
        super().set_random_state(seed, state)
        self.dihedral.R = self.elastic.R = self.R
        return self

    def randomize(self, data=None) -> None:
        self.dihedral.randomize()
        self.elastic.randomize()

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        self.randomize()
        if self.elastic._do_transform:
            return self.elastic.warp(data, self.dihedral)
        return self.dihedral.move(data)


class RandSquareCropd(RandSpatialCropd):
    """MONAI's ``RandSpatialCropd`` (fixed size, offset uniform over every valid position) that passes a
    sample through untouched, without drawing, when no spatial side exceeds ``roi_size`` (a no-op that
    costs ≈0.6 ms per 256² sample in MONAI), and that slices plain tensors itself under
    ``set_track_meta(False)``: the same draw and values as MONAI (whose crop of four keys costs ≈0.25 ms
    there, in bookkeeping for MetaTensors), as compact copies rather than views (3 % less for the whole
    pipeline on crops from 2048² tiles, paired)."""

    def __call__(self, data: Mapping[Hashable, object], lazy: bool | None = None) -> dict:
        first = next(iter(self.key_iterator(data)), None)
        if first is None:
            return super().__call__(data, lazy=lazy)
        shape = data[first].shape
        roi = ensure_tuple_rep(self.cropper.roi_size, len(shape) - 1)
        if all(side <= r for side, r in zip(shape[1:], roi)):
            return dict(data)
        if lazy or self.lazy or get_track_meta() or not all(
                type(data[key]) is torch.Tensor for key in self.key_iterator(data)):  # as MONAI gives them
            return super().__call__(data, lazy=lazy)
        window = (slice(None), *get_random_patch(shape[1:], get_valid_patch_size(shape[1:], roi), self.cropper.R))
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = d[key][window].contiguous()  # compact: later steps stop striding over the whole tile
        return d


_MEDIAN9_EXCHANGES = ((1, 2), (4, 5), (7, 8), (0, 1), (3, 4), (6, 7), (1, 2), (4, 5), (7, 8), (0, 3), (5, 8), (4, 7),
                      (3, 6), (1, 4), (2, 5), (4, 7), (4, 2), (6, 4), (4, 2))  # median-of-9 network: v[4] ends as the median


def median3x3(image: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """3×3 median per channel of a (..., H, W) array or tensor (any device) with edge replication: what
    MONAI's ``MedianSmooth(radius=1)`` computes (≈50 ms per 256² RGB image there, via a 9-channel
    convolution and ``torch.median``), here a 19-exchange median-of-9 network on the nine shifted copies,
    in place with torch (≈3 ms; numpy's ``out=`` on an input copies it first, ≈7 ms). Returns the input's type."""
    tensor = torch.as_tensor(image)
    height, width = tensor.shape[-2:]
    padded = torch.cat([tensor[..., :1, :], tensor, tensor[..., -1:, :]], dim=-2)  # edge replication, any dtype
    padded = torch.cat([padded[..., :1], padded, padded[..., -1:]], dim=-1)
    v = [padded[..., i : i + height, j : j + width].contiguous() for i in range(3) for j in range(3)]
    low = torch.empty_like(v[0])
    for a, b in _MEDIAN9_EXCHANGES:
        torch.minimum(v[a], v[b], out=low)
        torch.maximum(v[a], v[b], out=v[b])
        v[a], low = low, v[a]
    return v[4].numpy() if isinstance(image, np.ndarray) else v[4]


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """MONAI's ``GaussianFilter`` kernel (sampled with erf, 4σ each side, not renormalised), float32."""
    return gaussian_1d(float(sigma), truncated=4.0, approx="erf")


def _filter_axis(image: np.ndarray, kernel: np.ndarray, axis: int) -> np.ndarray:
    """Correlate float32 ``image`` with a symmetric odd ``kernel`` along ``axis``, zero padding."""
    radius, length = kernel.size // 2, image.shape[axis]
    shape = list(image.shape)
    shape[axis] += 2 * radius
    padded = np.zeros(shape, dtype=np.float32)

    def window(offset: int) -> np.ndarray:
        index = [slice(None)] * image.ndim
        index[axis] = slice(offset, offset + length)
        return padded[tuple(index)]

    window(radius)[...] = image
    out = window(radius) * kernel[radius]
    pair = np.empty_like(out)
    for tap in range(1, radius + 1):  # the kernel is symmetric: one multiply per pair of taps
        np.add(window(radius - tap), window(radius + tap), out=pair)
        pair *= kernel[radius + tap]
        out += pair
    return out


def gaussian_filter_2d(image: np.ndarray, sigma_rows: float, sigma_cols: float) -> np.ndarray:
    """MONAI's ``GaussianSmooth(sigma=(sigma_rows, sigma_cols))`` on a (C, H, W) image, float32: the same
    kernels and zero padding as separable numpy passes (≈2 against ≈4 ms per 256² RGB image on one core,
    where torch's convolution with one channel per group is slow)."""
    image = image.astype(np.float32, copy=False)
    return _filter_axis(_filter_axis(image, gaussian_kernel(sigma_cols).numpy(), 2), gaussian_kernel(sigma_rows).numpy(), 1)


class RandGaussianSmoothNumpyd(RandGaussianSmoothd):
    """MONAI's ``RandGaussianSmoothd`` (same draws from ``self.R``) filtering with :func:`gaussian_filter_2d`."""

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        self.rand_smooth.randomize(None)
        sigma = (self.rand_smooth.x, self.rand_smooth.y)
        for key in self.key_iterator(d):
            d[key] = _like(gaussian_filter_2d(_channels_first(d[key], key), *sigma), d[key])
        return d


class RandGaussianSharpenNumpyd(RandGaussianSharpend):
    """MONAI's ``RandGaussianSharpend`` (same draws from ``self.R``): blurred + α·(blurred − blurred again),
    with :func:`gaussian_filter_2d` for both blurs."""

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        draw = self.rand_sharpen
        draw.randomize(None)
        for key in self.key_iterator(d):
            blurred = gaussian_filter_2d(_channels_first(d[key], key), draw.x1, draw.y1)
            detail = blurred - gaussian_filter_2d(blurred, draw.x2, draw.y2)
            detail *= np.float32(draw.a)
            d[key] = _like(blurred + detail, d[key])
        return d


class MedianSmooth3x3d(MapTransform):
    """:func:`median3x3` on each key (MONAI's ``MedianSmoothd(radius=1)`` on 2-D images)."""

    backend = [TransformBackends.NUMPY]

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = _like(median3x3(_channels_first(d[key], key)), d[key])
        return d


class RandGaussianNoise32d(RandomizableTransform, MapTransform):
    """MONAI's ``RandGaussianNoised`` (std drawn uniformly in [0, ``std``], then per-pixel noise
    N(``mean``, std²) added; float32 output) with the noise drawn in float32 by a torch generator seeded
    from ``self.R``: MONAI draws float64 with RandomState's polar method (≈4.8 ms per 256² RGB image on
    the dev machine; numpy's float32 ``Generator`` ≈2.5 ms, torch ≈1.2 ms)."""

    backend = [TransformBackends.NUMPY]

    def __init__(self, keys: KeysCollection = "image", mean: float = 0.0, std: float = 0.1, prob: float = 0.1,
                 allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if not (isinstance(std, (int, float)) and np.isfinite(std) and std >= 0):
            raise ValueError(f"std: expected a finite number ≥ 0, got {std!r}")
        self.mean = float(mean)
        self.std = float(std)
        self.sampled_std = 0.0
        self.seed = 0

    def randomize(self, data=None) -> None:
        super().randomize(None)
        if self._do_transform:
            self.sampled_std = float(self.R.uniform(0, self.std))
            self.seed = int(self.R.randint(2**31))

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        generator = torch.Generator().manual_seed(self.seed)
        for key in self.key_iterator(d):
            image = _numpy(d[key])
            noise = torch.randn(image.shape, generator=generator, dtype=torch.float32).numpy()
            noise *= np.float32(self.sampled_std)
            noise += np.float32(self.mean)
            noise += image
            d[key] = _like(noise, d[key])
        return d


class RandGammaContrastd(RandomizableTransform, MapTransform):
    """MONAI's ``RandAdjustContrastd`` (gamma uniform in ``gamma``; x → ((x − min)/range)^γ·range + min over
    the whole image, drawn with the same ``self.R`` calls) with the power as exp(γ·log t): torch's float32
    ``pow`` costs ≈2× log + exp on the dev machine (1.6 against 0.7 ms per 256² RGB image)."""

    backend = [TransformBackends.TORCH]

    def __init__(self, keys: KeysCollection = "image", gamma: tuple[float, float] = (0.7, 1.4), prob: float = 0.1,
                 allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        low, high = (float(g) for g in gamma)
        if not (0 < low <= high and np.isfinite(high)):
            raise ValueError(f"gamma: expected a range 0 < low ≤ high, got {gamma!r}")
        self.gamma = (low, high)
        self.gamma_value = 1.0

    def randomize(self, data=None) -> None:
        super().randomize(None)
        if self._do_transform:
            self.gamma_value = self.R.uniform(low=self.gamma[0], high=self.gamma[1])

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            image = torch.as_tensor(_numpy(d[key]), dtype=torch.float32)
            low, high = (float(v) for v in torch.aminmax(image))
            spread = high - low
            out = (image - low) / float(spread + 1e-7)  # MONAI's epsilon
            torch.log_(out)  # log 0 = −inf, and exp(−inf) = 0 = 0^γ
            out *= float(self.gamma_value)
            torch.exp_(out)
            out *= spread
            out += low
            d[key] = _like(out.numpy(), d[key])
        return d


class ClipIntensityd(MapTransform):
    """Clip to ``low``..``high`` as float32 and, when ``out_range`` is given, map ``low``..``high`` linearly
    onto it: MONAI's ``ScaleIntensityRanged(a_min=low, a_max=high, b_min, b_max, clip=True)`` (without
    ``out_range``: b = a) with in-place passes, less its ≈0.5 ms of bookkeeping and temporaries per 256²
    image. The input is never modified.

    ``dtype="uint8"`` rounds the result to the nearest integer (halves up) and stores it as uint8, as an 8-bit
    image: the output range must then lie within 0..255.
    """

    backend = [TransformBackends.NUMPY]

    def __init__(self, keys: KeysCollection = "image", low: float = 0.0, high: float = INTENSITY_MAX,
                 out_range: Sequence[float] | None = None, dtype: str = "float32", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if not (np.isfinite(low) and np.isfinite(high) and low <= high):
            raise ValueError(f"low, high: expected finite bounds with low ≤ high, got {low!r}, {high!r}")
        self.low, self.high = float(low), float(high)
        self.out_range = None
        if out_range is not None:
            out_low, out_high = (float(v) for v in out_range)
            if not (np.isfinite(out_low) and np.isfinite(out_high) and out_low < out_high and low < high):
                raise ValueError(f"out_range: expected finite (low, high) with low < high, mapped from low < high; "
                                 f"got {tuple(out_range)!r} from {low!r}..{high!r}")
            self.out_range = (out_low, out_high)
        if dtype not in ("float32", "uint8"):
            raise ValueError(f"dtype: expected 'float32' or 'uint8', got {dtype!r}")
        if dtype == "uint8" and not 0 <= min(self.out_range or (self.low,)) <= max(self.out_range or (self.high,)) <= 255:
            raise ValueError(f"dtype='uint8': the output range must lie within 0..255, got {self.out_range or (self.low, self.high)}")
        self.dtype = dtype

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            array = _numpy(d[key])
            if self.out_range is None:
                out = np.clip(array.astype(np.float32, copy=False), self.low, self.high)  # a new array
            else:  # MONAI's operations in its order, clip last: the same float32 values to the bit
                out_low, out_high = self.out_range
                out = np.subtract(array, np.float32(self.low), dtype=np.float32)  # a new array
                out /= np.float32(self.high - self.low)
                if out_high - out_low != 1.0:
                    out *= np.float32(out_high - out_low)
                if out_low:
                    out += np.float32(out_low)
                np.clip(out, out_low, out_high, out=out)
            if self.dtype == "uint8":
                out += np.float32(0.5)
                out = out.astype(np.uint8)  # truncation of value + ½: rounding to the nearest
            d[key] = _like(out, d[key])
        return d


# --------------------------------------------------------------------------------------------
# The pipeline of METHOD.md §7


# The photometric steps of §7 (probabilities, OneOf member weights, ranges), read by cisca_augmentations and
# by its batch version, cellgap.data.device_augmentation.BatchPhotometricAugmentation.
STAIN_PROB = 0.7
BLUR_NOISE_PROB, BLUR_NOISE_WEIGHTS = 0.15, (0.3, 0.15, 0.2, 0.2)  # Gaussian blur, 3×3 median, Gaussian noise, sharpen
BLUR_SIGMA = (0.5, 1.5)  # per axis
BLUR_NOISE_STD = float(np.sqrt(20.0))  # the noise's std is drawn in [0, this]
# Unsharp mask img + α(img − blur): the reference's Sharpen α 0.05–0.1 on a 3×3 Laplacian-type kernel
# amounts to α·9 ≈ 0.45–0.9 against a 3×3 mean (≈ Gaussian σ 0.8).
SHARPEN_SIGMA1, SHARPEN_SIGMA2, SHARPEN_ALPHA = (0.1, 0.2), (0.7, 0.9), (0.45, 0.9)
CONTRAST_PROB, CONTRAST_WEIGHTS = 0.7, (0.5, 0.5, 0.2)  # gamma, contrast about the mean, brightness scale
GAMMA, MEAN_CONTRAST, BRIGHTNESS_SCALE = (0.7, 1.4), 0.15, 0.2  # the last two: factors in ± this
COLOUR_PROB, COLOUR_WEIGHTS = 0.65, (1.0, 1.0)  # HSV shift, hue shift + brightness shift
HSV_SHIFTS = (10.0, 30 / 255, 20.0)  # ± hue (degrees), saturation (fraction), value (image units)
HUE_SHIFT, BRIGHTNESS_SHIFT = 36.0, 0.1 * INTENSITY_MAX  # ± each
NOISE_PROB, NOISE_STD = 0.15, 0.03 * INTENSITY_MAX  # the noise's std is drawn in [0, NOISE_STD]


def _one_of(transforms: list, weights: Sequence[float], prob: float, keys) -> OneOf:
    """The reference's ``OneOf(p)``: fire with probability ``prob``, then pick one member ∝ ``weights``
    (MONAI's OneOf always fires, so an identity member takes the remaining probability)."""
    total = float(sum(weights))
    return OneOf([*transforms, Identityd(keys)], weights=[prob * w / total for w in weights] + [1.0 - prob])


def cisca_augmentations(image_key: str = "image", label_keys: KeysCollection = ("label", "classes"),
                        stain_stats: str | Mapping | StainStatistics | None = "he", crop_size: int | None = 256,
                        prob_scale: float = 1.0, photometric: bool = True) -> list:
    """The ordered training augmentations of METHOD.md §7 as MONAI dictionary transforms.

    Args:
        image_key: the (3, H, W) RGB image in 0..255 (uint8 or float; float32 after the spatial steps).
        label_keys: (1, H, W) maps moved with the image without interpolation (instance map, class map).
            The stored tile's ``contour_levels`` (``cellgap.targets.ContourLevelsd``) move with them when
            the sample has them; the checks before augmenting make sure the image and these keys are there.
        stain_stats: dataset whose LAB statistics drive the stain jitter (``"pannuke"``, ``"conic"``,
            ``"cytodark0"``, ``"he"`` = neutral H&E), a mapping (see :func:`stain_statistics`), or None
            to leave the stain step out.
        crop_size: side of the random square crop taken first from larger tiles, at a uniform offset
            over all valid positions. The crop comes first, so a 1024² tile costs what a 256² one does;
            the reference crops after augmenting, which differs only in the statistics the stain and
            contrast steps read (crop instead of whole tile) and in the elastic border rule applying
            at the crop's edges.
            Tiles not larger than it pass whole; None: no crop.
        prob_scale: multiplies every step's probability (capped at 1); 0 leaves check, crop and clip only.
        photometric: False leaves out every step that changes colours or intensities (stain, blur/noise,
            contrast, colour, noise, clip): the list ends with the elastic step and a float32 cast, for
            ``cellgap.data.device_augmentation.BatchPhotometricAugmentation`` to apply them on the batch.

    Steps and probabilities: stain 0.7; rot90 0.9 (k uniform in {0,1,2,3}); flip 0.9 (vertical,
    horizontal or both, uniformly); elastic 0.7; blur/noise 0.15 (Gaussian blur 0.3, median 0.15,
    Gaussian noise 0.2, sharpen 0.2); contrast 0.7 (gamma 0.5, contrast about the mean 0.5,
    brightness 0.2); colour 0.65 (HSV shift ±10°/±30/±20, or hue ±36° + brightness ±25.5, equally);
    additive noise 0.15 (σ ≤ 0.03·255); finally the image is clipped to 0..255. The image is float32 from
    the elastic step on (a cast after it when neither the stain step nor the elastic step fired).

    Usable from a bundle config: ``"$cellgap.data.augmentation.cisca_augmentations(stain_stats='pannuke')"``.
    """
    label_keys = tuple(ensure_tuple(label_keys))
    if not isinstance(image_key, str) or not image_key:
        raise ValueError(f"image_key: expected a non-empty key name, got {image_key!r}")
    if image_key in label_keys:
        raise ValueError(f"label_keys: must not contain the image key {image_key!r}")
    if isinstance(prob_scale, bool) or not isinstance(prob_scale, (int, float)) or not (prob_scale >= 0 and np.isfinite(prob_scale)):
        raise ValueError(f"prob_scale: expected a finite number ≥ 0, got {prob_scale!r}")
    if crop_size is not None and (isinstance(crop_size, bool) or not isinstance(crop_size, (int, np.integer)) or crop_size < 1):
        raise ValueError(f"crop_size: expected a positive integer (pixels) or None, got {crop_size!r}")

    def p(value: float) -> float:
        return min(1.0, value * prob_scale)

    # A stored tile's contour levels (ContourLevelsd), when present, move with the label maps; the check
    # makes the image and label_keys required, so the spatial steps may skip the keys a sample lacks.
    check = CheckTiled(image_key, label_keys, optional_keys=(CONTOUR_LEVELS_KEY,))
    spatial = (image_key, *check.label_keys, *check.optional_keys)
    out: list = [check]
    if crop_size is not None:  # values checked on the crop: a pass over a 2048² tile's maps costs ≈1 ms
        structure = CheckTiled(image_key, label_keys, optional_keys=(CONTOUR_LEVELS_KEY,), values=False)
        crop = RandSquareCropd(spatial, roi_size=int(crop_size), random_size=False, allow_missing_keys=True)
        out = [structure, crop, check]
    if stain_stats is not None and photometric:
        out.append(RandLABStainJitterd(image_key, stats=stain_stats, prob=p(STAIN_PROB)))
    out.append(RandDihedralElasticd(spatial, mode=("bilinear",) + ("nearest",) * (len(spatial) - 1), rotate_prob=p(0.9),
                                    flip_prob=p(0.9), elastic_prob=p(0.7), allow_missing_keys=True))
    out.append(CastToTyped(image_key, dtype=torch.float32))  # the loader's uint8 image: photometric steps compute in float32
    if not photometric:
        return out
    blur_noise = [
        RandGaussianSmoothNumpyd(image_key, sigma_x=BLUR_SIGMA, sigma_y=BLUR_SIGMA, prob=1.0),
        MedianSmooth3x3d(image_key),
        RandGaussianNoise32d(image_key, mean=0.0, std=BLUR_NOISE_STD, prob=1.0),
        RandGaussianSharpenNumpyd(image_key, sigma1_x=SHARPEN_SIGMA1, sigma1_y=SHARPEN_SIGMA1, sigma2_x=SHARPEN_SIGMA2,
                                  sigma2_y=SHARPEN_SIGMA2, alpha=SHARPEN_ALPHA, prob=1.0),
    ]
    out.append(_one_of(blur_noise, BLUR_NOISE_WEIGHTS, p(BLUR_NOISE_PROB), image_key))
    contrast = [
        RandGammaContrastd(image_key, gamma=GAMMA, prob=1.0),
        RandScaleIntensityFixedMeand(image_key, factors=MEAN_CONTRAST, fixed_mean=True, prob=1.0),
        RandScaleIntensityd(image_key, factors=BRIGHTNESS_SCALE, prob=1.0),
    ]
    out.append(_one_of(contrast, CONTRAST_WEIGHTS, p(CONTRAST_PROB), image_key))
    colour = [
        RandHSVShiftd(image_key, *HSV_SHIFTS),
        Compose([
            RandHSVShiftd(image_key, hue_shift=HUE_SHIFT, saturation_shift=0.0, value_shift=0.0),
            RandShiftIntensityd(image_key, offsets=BRIGHTNESS_SHIFT, prob=1.0),
        ]),
    ]
    out.append(_one_of(colour, COLOUR_WEIGHTS, p(COLOUR_PROB), image_key))
    out.append(RandGaussianNoise32d(image_key, mean=0.0, std=NOISE_STD, prob=p(NOISE_PROB)))
    out.append(ClipIntensityd(image_key, 0.0, INTENSITY_MAX))
    return out


__all__ = [
    "INTENSITY_MAX",
    "STAIN_STATISTICS",
    "CheckTiled",
    "ClipIntensityd",
    "MedianSmooth3x3d",
    "RandCoarseElasticd",
    "RandDihedrald",
    "RandDihedralElasticd",
    "RandGammaContrastd",
    "RandGaussianNoise32d",
    "RandGaussianSharpenNumpyd",
    "RandGaussianSmoothNumpyd",
    "RandHSVShiftd",
    "RandLABStainJitterd",
    "RandSquareCropd",
    "StainStatistics",
    "cisca_augmentations",
    "gaussian_filter_2d",
    "gaussian_kernel",
    "lab8_to_rgb",
    "median3x3",
    "rgb_to_lab8",
    "shift_hsv",
    "stain_statistics",
]
