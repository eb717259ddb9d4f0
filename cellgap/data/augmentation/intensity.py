"""Intensity steps: additive Gaussian noise, gamma contrast, clip (and rescale) of the intensities.

The same operations as MONAI's RandGaussianNoised, RandAdjustContrastd and ScaleIntensityRanged without
their per-call bookkeeping and temporaries (docs/benchmarks.md, "Data pipeline")."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    MapTransform,
    RandomizableTransform,
)
from monai.utils import TransformBackends

from .samples import INTENSITY_MAX, like, to_numpy


class RandAdditiveGaussianNoised(RandomizableTransform, MapTransform):
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
            image = to_numpy(d[key])
            noise = torch.randn(image.shape, generator=generator, dtype=torch.float32).numpy()
            noise *= np.float32(self.sampled_std)
            noise += np.float32(self.mean)
            noise += image
            d[key] = like(noise, d[key])
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
            image = torch.as_tensor(to_numpy(d[key]), dtype=torch.float32)
            low, high = (float(v) for v in torch.aminmax(image))
            spread = high - low
            out = (image - low) / float(spread + 1e-7)  # MONAI's epsilon
            torch.log_(out)  # log 0 = −inf, and exp(−inf) = 0 = 0^γ
            out *= float(self.gamma_value)
            torch.exp_(out)
            out *= spread
            out += low
            d[key] = like(out.numpy(), d[key])
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
            array = to_numpy(d[key])
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
            d[key] = like(out, d[key])
        return d
