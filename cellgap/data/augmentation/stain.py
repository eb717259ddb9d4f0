"""Per-dataset CIELAB stain statistics and the RandStainNA-like stain jitter (METHOD.md §7)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass

import numpy as np
from monai.config import KeysCollection
from monai.transforms import (
    MapTransform,
    RandomizableTransform,
)
from monai.utils import TransformBackends

from ..registry import DATASETS
from .colour import LAB8_OFFSET, LAB8_SCALE, OPPONENT_HIGH, OPPONENT_LOW, opponent_to_rgb, rgb_to_opponent
from .samples import like, rgb_image


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
        g = rgb_to_opponent(image)
        std = g.std(axis=1) * LAB8_SCALE  # LAB units; float32 with numpy's pairwise summation
        # A flat channel (std 0) keeps its flatness and only moves to the target mean.
        scale = np.where(std > 1e-6, self.target_std / np.maximum(std, 1e-6), 0.0).astype(np.float32)
        # (lab − mean)·scale + target in LAB is g·scale + offset in opponent units, lab = g·K + C
        offset = ((self.target_mean - LAB8_OFFSET) / LAB8_SCALE - g.mean(axis=1) * scale).astype(np.float32)
        for channel in range(3):
            g[channel] *= scale[channel]
            g[channel] += offset[channel]
            np.clip(g[channel], OPPONENT_LOW[channel], OPPONENT_HIGH[channel], out=g[channel])
        return opponent_to_rgb(g).reshape(image.shape)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            d[key] = like(self.transfer(rgb_image(d[key], key)), d[key])
        return d
