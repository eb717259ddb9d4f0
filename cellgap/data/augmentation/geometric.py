"""Geometric steps: coarse-grid elastic warp, turns and flips (alone or fused with the warp), square crop."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import get_track_meta
from monai.data.utils import get_random_patch, get_valid_patch_size
from monai.transforms import (
    MapTransform,
    RandomizableTransform,
    RandSpatialCropd,
)
from monai.utils import TransformBackends, ensure_tuple_rep

from .samples import like, to_numpy


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
        arrays = {k: to_numpy(d[k]) for k, _ in keys}
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
            d[k] = like(moved, d[k])
        return d


def _sampling_grid(y: np.ndarray, x: np.ndarray, height: int, width: int) -> torch.Tensor:
    """grid_sample's (1, h, w, 2) grid (align_corners=True) reading input positions (y, x) of an H×W input."""
    return torch.from_numpy(np.stack([x * np.float32(2.0 / max(width - 1, 1)) - np.float32(1.0),
                                      y * np.float32(2.0 / max(height - 1, 1)) - np.float32(1.0)], axis=-1)[None])


# Same operations as MONAI's RandRotate90d + RandFlipd and RandSpatialCropd, without their per-call
# bookkeeping (≈0.5–1 ms each on a 256² sample with three keys, against the < 0.2 ms the data movement
# takes; docs/benchmarks.md).

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
            array = to_numpy(d[key])
            if array.ndim != 3:
                raise ValueError(f"{key}: expected a channel-first (C, H, W) array, got shape {tuple(array.shape)}")
            d[key] = like(self.apply(array), d[key])
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
