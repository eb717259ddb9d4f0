"""Filling a cache: the encoder run over the rows it lacks, resumable, before training."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from monai.data import Dataset
from monai.transforms import Compose, SelectItemsd
from torch import nn
from tqdm.auto import tqdm

from ..data.augmentation import INTENSITY_MAX, ClipIntensityd
from ..data.dataloader import ForkSafeDataLoader
from ..data.loading import LoadTiled
from ..training import scaled_image
from .store import EmbeddingCache
from .views import ViewSpec, check_int


def default_fill_transform(view_spec: ViewSpec, num_classes: int | None = None) -> Compose:
    """Load → the view's augmentation → 8-bit image: the training pipeline's image, without targets
    (:func:`fill_cache` scales it to 0..1 on the encoder's device, as ``PrepareCISCABatch`` does in training)."""
    return Compose([
        LoadTiled(num_classes=num_classes),  # labels too: the augmentation moves them and checks them
        view_spec.augmentation_transform(),
        ClipIntensityd("image", 0.0, INTENSITY_MAX, dtype="uint8"),
        SelectItemsd(["image", "cache_row"]),
    ])


def _device_of(module: nn.Module) -> torch.device:
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return torch.device("cpu")


def fill_cache(encoder: nn.Module, datalist: Sequence[Mapping], cache: EmbeddingCache, *, transform=None,
               batch_size: int = 8, num_workers: int = 0, device: torch.device | str | None = None, verify: bool = True,
               max_rows: int | None = None, progress: bool = True) -> dict:
    """Compute the rows the cache lacks (a separate pass before training) and return counts.

    Args:
        encoder: the frozen encoder (``network.encoder``); it runs under ``torch.no_grad()`` and, on CUDA,
            bf16 autocast.  Its device is used unless ``device`` is given.
        datalist: items with ``id`` and the file paths (``image``, ``label``, ``classes``) of every cached tile.
        transform: the pipeline from a datalist item (plus ``view`` and ``cache_row``) to the ``image`` (uint8 in
            0..255 or float in 0..1); default :func:`default_fill_transform`, i.e. exactly the training pipeline's image.
        verify: first check the complete rows' checksums; corrupted ones are recomputed.
        max_rows: compute at most this many rows now (the rest on a later call).
    Returns ``{"rows", "reused", "computed", "corrupted", "remaining"}``.  Resumable: rows are flagged
    complete batch by batch, so a killed fill continues where it stopped.
    """
    check_int("batch_size", batch_size, 1)
    check_int("num_workers", num_workers, 0)
    if max_rows is not None:
        check_int("max_rows", max_rows, 0)
    items = {}
    for i, item in enumerate(datalist):
        if not isinstance(item, Mapping) or "id" not in item:
            raise ValueError(f"datalist item {i}: expected a dict with a tile 'id', got {item!r}")
        items.setdefault(str(item["id"]), item)
    missing = [t for t in cache.tile_ids if t not in items]
    if missing:
        raise ValueError(f"datalist: lacks {len(missing)} tile(s) of the cache, e.g. {missing[:3]}; "
                         f"fill with the datalist the cache was built for")
    device = torch.device(device) if device is not None else _device_of(encoder)
    encode = getattr(encoder, "forward_features", encoder)  # a CellGapNet works too
    with cache.lock():
        cache.load_meta()  # another process may have filled it while we waited
        corrupted = cache.verify(progress=progress) if verify else []
        todo = cache.missing_rows()
        reused = cache.num_rows - len(todo)
        if max_rows is not None:
            todo = todo[:max_rows]
        jobs = []
        for row in todo:
            tile, view = cache.row_key(int(row))
            jobs.append({**items[tile], "view": view, "cache_row": int(row)})
        loader = ForkSafeDataLoader(Dataset(jobs, transform or default_fill_transform(cache.view_spec)), batch_size=batch_size,
                                    shuffle=False, num_workers=num_workers)
        computed = 0
        encoder_was_training = encoder.training
        encoder.eval()
        try:
            with torch.no_grad(), tqdm(total=len(jobs), desc=f"embedding cache {cache.path.name}", unit="tile",
                                       disable=not progress or not jobs) as bar:
                for batch in loader:
                    image = scaled_image(torch.as_tensor(batch["image"]).to(device))
                    if tuple(image.shape[-2:]) != cache.input_size:
                        raise ValueError(f"tiles {[cache.row_key(int(r))[0] for r in batch['cache_row'][:3]]}: images are "
                                         f"{tuple(image.shape[-2:])} after the view transform; this cache is for "
                                         f"{cache.input_size} inputs (crop size or input_size)")
                    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                        features = encode(image)
                    cache.write(torch.as_tensor(batch["cache_row"]).tolist(), [f.float() for f in features])
                    computed += image.shape[0]
                    bar.update(image.shape[0])
        finally:
            encoder.train(encoder_was_training)
    return {"rows": cache.num_rows, "reused": reused, "computed": computed, "corrupted": len(corrupted),
            "remaining": cache.num_rows - reused - computed}
