"""Which image of a tile the cached maps belong to: the view spec and the seeded view augmentation."""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field

import numpy as np
from monai.transforms import Compose, MapTransform, Randomizable
from monai.utils import MAX_SEED

from ..atomic import jsonable
from ..data.augmentation import cisca_augmentations

CACHE_MODES = ("off", "clean", "views")


# photometric is chosen by augmentation_transform (the bundle's photometric_on_device), not by the view spec
_AUGMENTATION_ARGS = tuple(p for p in inspect.signature(cisca_augmentations).parameters if p != "photometric")

def check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}: expected an integer ≥ {minimum}, got {value!r}")


def view_seed(seed: int, tile_id: str, view: int) -> int:
    """The random seed of view ``view`` of tile ``tile_id`` (stable across runs, processes and datalist order)."""
    text = f"{int(seed)}\0{tile_id}\0{int(view)}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") % MAX_SEED


class SeededViewd(Randomizable, MapTransform):
    """Apply ``augmentation`` as view k of the sample's tile, its random state seeded by (seed, tile id, k).

    ``k`` is the sample's ``view_key`` if set (the cache fill asks for each view), otherwise drawn
    uniformly from ``num_views`` with this transform's own random state (one view per tile per epoch).
    The chosen view is written back to ``view_key``.  Not thread-safe (the augmentation's state is set
    per call): use process workers, as MONAI's and torch's DataLoader do.
    """

    def __init__(self, augmentation: Compose, num_views: int = 1, seed: int = 0, id_key: str = "id", view_key: str = "view"):
        MapTransform.__init__(self, keys=[id_key], allow_missing_keys=False)
        if not isinstance(augmentation, Compose):
            augmentation = Compose(augmentation)
        check_int("num_views", num_views, 1)
        check_int("seed", seed, 0)
        self.augmentation = augmentation
        self.num_views = int(num_views)
        self.seed = int(seed)
        self.id_key = id_key
        self.view_key = view_key
        self._view = 0

    def randomize(self, data=None) -> None:
        self._view = int(self.R.randint(self.num_views))

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        if self.id_key not in d:
            raise KeyError(f"{self.id_key}: the sample has no tile id (keys: {sorted(map(str, d))}); seeded views need it")
        view = d.get(self.view_key)
        if view is None:
            self.randomize()
            view = self._view
        elif isinstance(view, bool) or not isinstance(view, (int, np.integer)) or not 0 <= view < self.num_views:
            raise ValueError(f"{self.view_key}: sample {d[self.id_key]!r} asks for view {view!r}; expected 0..{self.num_views - 1}")
        self.augmentation.set_random_state(seed=view_seed(self.seed, str(d[self.id_key]), int(view)))
        d = dict(self.augmentation(d))
        d[self.view_key] = int(view)
        return d


@dataclass(frozen=True)
class ViewSpec:
    """Which images the cache holds and how the training pipeline augments (see the module docstring).

    Args:
        mode: ``"off"``, ``"clean"`` or ``"views"``.
        num_views: K views per tile (``"views"``; ``"clean"`` has one).
        seed: seeds view k of tile t as ``view_seed(seed, t, k)``.
        augmentation: keyword arguments of :func:`cellgap.data.augmentation.cisca_augmentations`
            (``stain_stats``, ``crop_size``, ``prob_scale`` …).  In ``"clean"`` mode ``prob_scale`` is 0
            (only the crop and the checks run); a positive ``prob_scale`` there is an error.
    """

    mode: str = "clean"
    num_views: int = 1
    seed: int = 0
    augmentation: Mapping = field(default_factory=dict)

    def __post_init__(self):
        if self.mode not in CACHE_MODES:
            raise ValueError(f"cache mode: expected one of {CACHE_MODES}, got {self.mode!r}")
        check_int("num_views", self.num_views, 1)
        check_int("seed", self.seed, 0)
        if not isinstance(self.augmentation, Mapping):
            raise TypeError(f"augmentation: expected a mapping of cisca_augmentations arguments, got {type(self.augmentation).__name__}")
        unknown = sorted(set(self.augmentation) - set(_AUGMENTATION_ARGS))
        if unknown:
            raise ValueError(f"augmentation: unknown argument(s) {unknown}; cisca_augmentations takes {list(_AUGMENTATION_ARGS)}")
        aug = dict(self.augmentation)
        if self.mode == "clean":
            scale = aug.get("prob_scale", 0.0)
            if scale != 0:
                raise ValueError(f"cache mode 'clean' caches the tiles without random augmentation, but the config asks for "
                                 f"random augmentation (prob_scale={scale!r}); set prob_scale (augment_prob_scale) to 0, "
                                 f"use cache mode 'views' (K fixed augmented views per tile) or 'off' (augment on the fly, no cache)")
            if self.num_views != 1:
                raise ValueError(f"cache mode 'clean' holds one view per tile, got num_views={self.num_views}; use mode 'views'")
            aug["prob_scale"] = 0.0
        object.__setattr__(self, "augmentation", aug)

    @property
    def views(self) -> int:
        return 1 if self.mode == "clean" else self.num_views

    @property
    def crop_size(self) -> int | None:
        default = inspect.signature(cisca_augmentations).parameters["crop_size"].default
        return self.augmentation.get("crop_size", default)

    def identity(self) -> dict:
        """What the cached maps depend on (goes into the cache key)."""
        return {"mode": self.mode, "num_views": self.views, "seed": self.seed, "augmentation": jsonable(self.augmentation)}

    def augmentation_transform(self, photometric: bool = True) -> Compose | SeededViewd:
        """The augmentation step of the training pipeline (and of the cache fill) for this mode:
        on-the-fly random augmentation for ``"off"``, seeded views for ``"clean"`` and ``"views"``.
        ``photometric=False`` (mode ``"off"`` only) leaves the photometric steps to the training batch."""
        if not photometric and self.mode != "off":
            raise ValueError(f"photometric steps on the device need cache_mode 'off', got {self.mode!r}: a cached view "
                             "holds the encoder's maps of the fully augmented tile")
        augmentation = Compose(cisca_augmentations(**self.augmentation, photometric=photometric))
        if self.mode == "off":
            return augmentation
        return SeededViewd(augmentation, num_views=self.views, seed=self.seed)
