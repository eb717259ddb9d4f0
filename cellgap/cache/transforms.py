"""MONAI glue: the transform that adds a sample's cached maps and the batch preparation that hands them to the network."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.transforms import MapTransform
from torch import nn

from ..training import PrepareCISCABatch
from .store import EmbeddingCache

FEATURES_KEY = "features"
CACHE_KEYS = (FEATURES_KEY, "features_ok", "cache_row")  # what CachedFeaturesd adds (keep them in SelectItemsd)


class CachedFeaturesd(MapTransform):
    """Add the cached encoder maps of the sample's (tile, view) to the sample.

    Put it after the view augmentation and scaling.  Adds ``features`` (4 tensors (C_i, h_i, w_i) in the
    cache's storage dtype), ``features_ok`` (False when the row is missing or corrupted: zeros stand in
    and :class:`PrepareCachedCISCABatch` recomputes them) and ``cache_row``.
    """

    def __init__(self, cache: EmbeddingCache, id_key: str = "id", view_key: str = "view", image_key: str = "image",
                 features_key: str = FEATURES_KEY):
        super().__init__(keys=[id_key])
        if not isinstance(cache, EmbeddingCache):
            raise TypeError(f"cache: expected an EmbeddingCache, got {type(cache).__name__}")
        self.cache = cache
        self.id_key, self.view_key, self.image_key, self.features_key = id_key, view_key, image_key, features_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        if self.id_key not in d:
            raise KeyError(f"{self.id_key}: the sample has no tile id (keys: {sorted(map(str, d))}); the cache is keyed by it")
        tile = str(d[self.id_key])
        row = self.cache.row(tile, int(d.get(self.view_key, 0)))
        image = d.get(self.image_key)
        if image is not None and tuple(image.shape[-2:]) != self.cache.input_size:
            raise ValueError(f"tile {tile!r}: image is {tuple(image.shape[-2:])}, but the cache holds maps of "
                             f"{self.cache.input_size} inputs; the training pipeline and the cache disagree (crop size?)")
        features = self.cache.read_tensors(row)
        d[self.features_key] = features if features is not None else self.cache.placeholder()
        d["features_ok"] = features is not None
        d["cache_row"] = row
        return d


class PrepareCachedCISCABatch(PrepareCISCABatch):
    """:class:`~cellgap.training.PrepareCISCABatch` that hands cached encoder maps to the network.

    Batches with ``features`` give ``(image, targets, (), {"features": [...]})``, so MONAI's engines call
    ``network(image, features=...)`` and the encoder is skipped; other batches (validation, cache mode
    ``"off"``) give ``(image, targets)`` as before.  Rows flagged ``features_ok == False`` are computed
    with ``encoder`` and written back to ``cache``.
    """

    def __init__(self, encoder: nn.Module | None = None, cache: EmbeddingCache | None = None, features_key: str = FEATURES_KEY,
                 dense_targets=None):
        super().__init__(dense_targets=dense_targets)  # no batch photometric step: cached maps come from fully augmented views
        self.encoder = encoder
        self.cache = cache
        self.features_key = features_key

    def __call__(self, batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
        image, targets = super().__call__(batchdata, device, non_blocking, **kwargs)
        features = batchdata.get(self.features_key)
        if features is None:
            return image, targets
        features = [torch.as_tensor(f).to(device=device, non_blocking=non_blocking) for f in features]
        ok = batchdata.get("features_ok")
        if ok is not None and not bool(torch.as_tensor(ok).all()):
            bad = torch.nonzero(~torch.as_tensor(ok, dtype=torch.bool)).flatten()
            if self.encoder is None:
                raise RuntimeError(f"embedding cache: {len(bad)} sample(s) of this batch have no valid cached features and "
                                   f"no encoder was given to recompute them; pass encoder=network.encoder")
            with torch.no_grad():
                fresh = self.encoder(torch.as_tensor(image)[bad.to(image.device)])
            for f, new in zip(features, fresh):
                f[bad.to(f.device)] = new.to(f.dtype)
            if self.cache is not None and "cache_row" in batchdata:
                rows = torch.as_tensor(batchdata["cache_row"])[bad].tolist()
                self.cache.write(rows, [new.float() for new in fresh])
        return image, targets, (), {"features": features}
