"""What a cache's features depend on, as strings for its key: the encoder build, its weights, the dataset."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..atomic import jsonable


def digest(value, size: int = 10) -> str:
    text = json.dumps(jsonable(value), sort_keys=True, default=repr)
    return hashlib.blake2b(text.encode(), digest_size=size).hexdigest()


def folder_label(text: str, limit: int = 32) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "_", text)[:limit].strip("_.") or "x"



def encoder_identity(encoder) -> str:
    """``<registry key>:<hash of the build>`` for a :class:`~cellgap.encoders.FrozenEncoder` (or a
    network holding one): a reduced or re-configured build of the same registry entry gets another key."""
    encoder = getattr(encoder, "encoder", encoder)
    spec = getattr(encoder, "spec", None)
    if spec is None:
        raise TypeError(f"encoder_identity: expected a FrozenEncoder or a CellGapNet, got {type(encoder).__name__}")
    build = {"architecture": spec.architecture, "kwargs": spec.kwargs, "taps": list(getattr(encoder, "taps", spec.taps)),
             "input_size": spec.input_size, "mean": spec.mean, "std": spec.std, "swiglu": spec.swiglu}
    return f"{spec.key}:{digest(build)}"


def parameter_fingerprint(module) -> str:
    """blake2b of every parameter and buffer: identifies randomly initialised weights."""
    h = hashlib.blake2b(digest_size=10)
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(np.ascontiguousarray(tensor.detach().float().cpu().numpy()).tobytes())
    return h.hexdigest()


def weights_identity(weights, encoder=None, seed: int | None = None) -> str:
    """Identity of an encoder's weights for the cache key.

    ``"hub"`` → ``hub:<model id>``; ``"hf-hub:org/repo"`` → ``hub:org/repo``; a local file → its resolved
    path, size and mtime; a local folder → the same over its files; None / ``"none"`` / ``"random"``
    (random weights) → ``random:<seed>`` if ``seed`` is given, else a fingerprint of ``encoder``'s
    parameters.
    """
    if weights is None or str(weights).lower() in ("none", "random"):
        if seed is not None:
            return f"random:{int(seed)}"
        if encoder is None:
            raise ValueError("weights_identity: random weights need either their seed or the encoder (to fingerprint)")
        return f"random:params-{parameter_fingerprint(getattr(encoder, 'encoder', encoder))}"
    text = str(weights)
    if text == "hub":
        spec = getattr(getattr(encoder, "encoder", encoder), "spec", None)
        return f"hub:{spec.model_id}" if spec is not None else "hub"
    if text.startswith(("hf-hub:", "hf_hub:")):
        return "hub:" + text.split(":", 1)[1]
    path = Path(text).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"weights {path}: does not exist; expected 'hub', a weights file or a folder")
    path = path.resolve()
    if path.is_file():
        st = path.stat()
        return f"file:{path}:{st.st_size}:{st.st_mtime_ns}"
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return f"dir:{path}:" + digest([(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files])


def dataset_identity(datalist: Sequence[Mapping], name: str = "") -> str:
    """``<name>:<hash>`` of the datalist's tile ids and image files (name, size, mtime)."""
    entries = []
    for i, item in enumerate(datalist):
        if "id" not in item or "image" not in item:
            raise ValueError(f"datalist item {i}: expected keys 'id' and 'image', got {sorted(item)}")
        path = Path(item["image"])
        st = path.stat() if path.is_file() else None
        entries.append((str(item["id"]), path.name, st.st_size if st else -1, st.st_mtime_ns if st else -1))
    return f"{name or 'dataset'}:{digest(sorted(set(entries)))}"


def tile_ids_of(datalist: Sequence[Mapping]) -> list[str]:
    ids = []
    for i, item in enumerate(datalist):
        if not isinstance(item, Mapping) or "id" not in item:
            raise ValueError(f"datalist item {i}: expected a dict with a tile 'id', got {item!r}")
        ids.append(str(item["id"]))
    return ids
