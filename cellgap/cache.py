"""The embedding cache: the frozen encoder's four feature maps, computed once and memory-mapped on disk.

The encoder never trains, so its maps for a given input never change: a decoder epoch can read them
instead of running the encoder again.  Three modes (:data:`CACHE_MODES`, chosen by :class:`ViewSpec`):

* ``"off"`` — no cache; the encoder runs on every (randomly augmented) sample, as without this module.
* ``"clean"`` — one cached view per tile: the tile without random augmentation (a random crop of a
  larger tile is fixed per tile).  Asking for random augmentation with it is an error.
* ``"views"`` — K fixed augmented views per tile.  View k of tile t is augmented with the random state
  seeded by (seed, t, k), so the image and targets that the data pipeline recomputes match the cached
  maps exactly; each epoch draws one of the K views per tile.

On disk (one folder per cache key, under the cache root)::

    <encoder>-<dataset>-<digest>/
      key.json         what the features depend on, the storage dtype and the map shapes
      index.json       tile ids and views per tile: row = tile position * num_views + view
      level0..3.npy    (rows, C_i, h_i, w_i) maps, float16 / bfloat16 (stored as uint16) / float32
      complete.npy     (rows,) uint8: 1 once the row's maps and checksum are on disk
      checksum.npy     (rows, 16) uint8: blake2b of the row's bytes over the four levels

The folder name is a hash of the encoder (registry entry and build), the weights (file path, size and
mtime; hub id; or the random initialisation), the dataset, the tile ids, the input size, the view
spec, the storage dtype and the cellgap version: a change of any of them opens a new folder instead of
reusing stale features.  Rows are written data → checksum → flag, each flushed before the next, so a
killed fill leaves only unflagged rows behind and the next fill computes just those.  Every read checks
the checksum; a corrupted or half-written row is recomputed.

Precision: ``float32`` gives exactly the maps (and loss) of the on-the-fly encoder; ``float16`` rounds
each value to 11 significant bits (relative error ≤ 2**-11), which changed the training loss by less
than 1e-3 relative in tests/test_cache.py and scripts/benchmark_cache.py (see docs/cache.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
import re
import shutil
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.data import Dataset
from monai.transforms import Compose, MapTransform, Randomizable, SelectItemsd
from monai.utils import MAX_SEED
from torch import nn
from tqdm.auto import tqdm

from . import __version__
from .atomic import atomic_write_text, jsonable
from .data.augmentation import INTENSITY_MAX, ClipIntensityd, cisca_augmentations
from .data.dataloader import ForkSafeDataLoader
from .data.loading import LoadTiled
from .training import PrepareCISCABatch, scaled_image

try:  # POSIX; elsewhere concurrent fills of one cache are not serialised
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

logger = logging.getLogger(__name__)

CACHE_MODES = ("off", "clean", "views")
CACHE_DTYPES = ("float16", "bfloat16", "float32")
FEATURES_KEY = "features"
CACHE_KEYS = (FEATURES_KEY, "features_ok", "cache_row")  # what CachedFeaturesd adds (keep them in SelectItemsd)
FORMAT_VERSION = 1
NUM_LEVELS = 4
DIGEST_SIZE = 16
COMPLETE = 1
_STORAGE = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}  # numpy has no bfloat16
# photometric is chosen by augmentation_transform (the bundle's photometric_on_device), not by the view spec
_AUGMENTATION_ARGS = tuple(p for p in inspect.signature(cisca_augmentations).parameters if p != "photometric")


def _digest(value, size: int = 10) -> str:
    text = json.dumps(jsonable(value), sort_keys=True, default=repr)
    return hashlib.blake2b(text.encode(), digest_size=size).hexdigest()


def _label(text: str, limit: int = 32) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "_", text)[:limit].strip("_.") or "x"


def view_seed(seed: int, tile_id: str, view: int) -> int:
    """The random seed of view ``view`` of tile ``tile_id`` (stable across runs, processes and datalist order)."""
    text = f"{int(seed)}\0{tile_id}\0{int(view)}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") % MAX_SEED


# --------------------------------------------------------------------------------------------
# Views: which image of a tile the cached maps belong to


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
        _check_int("num_views", num_views, 1)
        _check_int("seed", seed, 0)
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
        _check_int("num_views", self.num_views, 1)
        _check_int("seed", self.seed, 0)
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


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}: expected an integer ≥ {minimum}, got {value!r}")


# --------------------------------------------------------------------------------------------
# Identities that go into the cache key


def encoder_identity(encoder) -> str:
    """``<registry key>:<hash of the build>`` for a :class:`~cellgap.encoders.FrozenEncoder` (or a
    network holding one): a reduced or re-configured build of the same registry entry gets another key."""
    encoder = getattr(encoder, "encoder", encoder)
    spec = getattr(encoder, "spec", None)
    if spec is None:
        raise TypeError(f"encoder_identity: expected a FrozenEncoder or a CellGapNet, got {type(encoder).__name__}")
    build = {"architecture": spec.architecture, "kwargs": spec.kwargs, "taps": list(getattr(encoder, "taps", spec.taps)),
             "input_size": spec.input_size, "mean": spec.mean, "std": spec.std, "swiglu": spec.swiglu}
    return f"{spec.key}:{_digest(build)}"


def parameter_fingerprint(module: nn.Module) -> str:
    """blake2b of every parameter and buffer: identifies randomly initialised weights."""
    h = hashlib.blake2b(digest_size=10)
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(np.ascontiguousarray(tensor.detach().to("cpu", torch.float32).numpy()).tobytes())
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
    return f"dir:{path}:" + _digest([(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files])


def dataset_identity(datalist: Sequence[Mapping], name: str = "") -> str:
    """``<name>:<hash>`` of the datalist's tile ids and image files (name, size, mtime)."""
    entries = []
    for i, item in enumerate(datalist):
        if "id" not in item or "image" not in item:
            raise ValueError(f"datalist item {i}: expected keys 'id' and 'image', got {sorted(item)}")
        path = Path(item["image"])
        st = path.stat() if path.is_file() else None
        entries.append((str(item["id"]), path.name, st.st_size if st else -1, st.st_mtime_ns if st else -1))
    return f"{name or 'dataset'}:{_digest(sorted(set(entries)))}"


def _tile_ids(datalist: Sequence[Mapping]) -> list[str]:
    ids = []
    for i, item in enumerate(datalist):
        if not isinstance(item, Mapping) or "id" not in item:
            raise ValueError(f"datalist item {i}: expected a dict with a tile 'id', got {item!r}")
        ids.append(str(item["id"]))
    return ids


# --------------------------------------------------------------------------------------------
# The cache


def _to_storage(tensor: torch.Tensor, dtype: str) -> np.ndarray:
    tensor = torch.as_tensor(tensor).detach().to("cpu")
    if dtype == "bfloat16":
        return tensor.to(torch.bfloat16).view(torch.uint16).numpy()
    return tensor.to(getattr(torch, dtype)).numpy()


def _from_storage(array: np.ndarray, dtype: str) -> torch.Tensor:
    tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor


class EmbeddingCache:
    """Memory-mapped per-level encoder maps, one row per (tile, view), with a completion flag and a checksum.

    Args:
        root: folder that holds caches; this cache lives in a sub-folder named by its key.
        encoder_key: the encoder's identity (:func:`encoder_identity`; a registry key is enough for tests).
        weights_id: the weights' identity (:func:`weights_identity`).
        dataset_id: the dataset's identity (:func:`dataset_identity`, or a name).
        view_spec: a :class:`ViewSpec` (mode ``"clean"`` or ``"views"``) or a mode name.
        dtype: storage dtype, ``"float16"`` (default), ``"bfloat16"`` or ``"float32"``.
        tile_ids: the tiles it holds (duplicates, e.g. from oversampling, count once).
        input_size: side (or (height, width)) of the encoder input, i.e. the image after the view transform.
        verify_reads: check each row's checksum when reading it.

    Use :meth:`for_encoder` to derive every identity from an encoder, its weights and a datalist.
    Instances pickle without their memory maps, so DataLoader workers reopen them.
    """

    def __init__(self, root: str | os.PathLike, encoder_key: str, weights_id: str, dataset_id: str,
                 view_spec: ViewSpec | str, dtype: str = "float16", *, tile_ids: Sequence[str],
                 input_size: int | Sequence[int] = 256, verify_reads: bool = True):
        if isinstance(view_spec, str):
            view_spec = ViewSpec(view_spec)
        if not isinstance(view_spec, ViewSpec):
            raise TypeError(f"view_spec: expected a ViewSpec or a mode name, got {type(view_spec).__name__}")
        if view_spec.mode == "off":
            raise ValueError("view_spec: cache mode 'off' computes features on the fly and uses no cache; "
                             "choose 'clean' or 'views' to cache")
        if dtype not in CACHE_DTYPES:
            raise ValueError(f"dtype: expected one of {CACHE_DTYPES}, got {dtype!r}")
        for name, value in (("encoder_key", encoder_key), ("weights_id", weights_id), ("dataset_id", dataset_id)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name}: expected a non-empty string, got {value!r}")
        if isinstance(tile_ids, str) or not isinstance(tile_ids, Sequence):
            raise TypeError(f"tile_ids: expected a sequence of tile id strings, got {type(tile_ids).__name__}")
        bad = [i for i, t in enumerate(tile_ids) if not isinstance(t, str) or not t]
        if bad:
            raise ValueError(f"tile_ids: entries {bad[:5]} are not non-empty strings (e.g. {tile_ids[bad[0]]!r})")
        ids = sorted(set(tile_ids))
        if not ids:
            raise ValueError("tile_ids: the cache must hold at least one tile")
        size = (input_size, input_size) if isinstance(input_size, (int, np.integer)) else tuple(input_size)
        if len(size) != 2 or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1 for s in size):
            raise ValueError(f"input_size: expected a positive side or (height, width), got {input_size!r}")
        self.root = Path(root)
        self.view_spec = view_spec
        self.dtype = dtype
        self.input_size = (int(size[0]), int(size[1]))
        self.tile_ids = ids
        self.num_views = view_spec.views
        self.num_rows = len(ids) * self.num_views
        self.verify_reads = bool(verify_reads)
        self._position = {t: i for i, t in enumerate(ids)}
        self.key = {"format": FORMAT_VERSION, "cellgap_version": __version__, "encoder": encoder_key, "weights": weights_id,
                    "dataset": dataset_id, "tiles": _digest(ids, 16), "num_tiles": len(ids), "input_size": list(self.input_size),
                    "view_spec": view_spec.identity(), "dtype": dtype}
        self.digest = _digest(self.key, 10)
        self.path = self.root / f"{_label(encoder_key.split(':')[0])}-{_label(dataset_id.split(':')[0])}-{self.digest}"
        self.geometry: list[tuple[int, int, int]] | None = None
        self._arrays: dict | None = None
        self._load_meta()

    # -- construction helpers ------------------------------------------------------------------

    @classmethod
    def for_encoder(cls, root: str | os.PathLike, encoder, weights, datalist: Sequence[Mapping], view_spec: ViewSpec | str,
                    dataset_id: str | None = None, dtype: str = "float16", input_size: int | Sequence[int] | None = None,
                    weights_seed: int | None = None, verify_reads: bool = True) -> EmbeddingCache:
        """The cache of ``encoder`` (a FrozenEncoder or a CellGapNet) with ``weights`` (as given to the network)
        on the tiles of ``datalist``; ``input_size`` defaults to the view spec's crop size."""
        if isinstance(view_spec, str):
            view_spec = ViewSpec(view_spec)
        if input_size is None:
            input_size = getattr(view_spec, "crop_size", None)
            if input_size is None:
                raise ValueError("input_size: the view spec has no crop size; give the encoder input side explicitly")
        return cls(root, encoder_identity(encoder), weights_identity(weights, encoder, weights_seed),
                   dataset_id or dataset_identity(datalist), view_spec, dtype, tile_ids=_tile_ids(datalist),
                   input_size=input_size, verify_reads=verify_reads)

    # -- files ---------------------------------------------------------------------------------

    def _file(self, name: str) -> Path:
        return self.path / name

    def _load_meta(self) -> None:
        meta_path = self._file("key.json")
        if not meta_path.is_file():
            return
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            geometry = [tuple(int(v) for v in g) for g in meta["geometry"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            logger.warning("embedding cache %s: unreadable key.json (%s); the cache will be rebuilt", self.path, e)
            return
        if meta.get("key") != jsonable(self.key):
            raise ValueError(f"{meta_path}: holds a cache with another key than this one (digest collision or a hand-edited "
                             f"folder); remove {self.path} and fill again")
        if len(geometry) != NUM_LEVELS:
            logger.warning("embedding cache %s: key.json lists %d levels, expected %d; rebuilding", self.path, len(geometry), NUM_LEVELS)
            return
        self.geometry = geometry

    def _create(self, geometry: list[tuple[int, int, int]]) -> None:
        """Allocate every file (all rows incomplete); key.json is written last, so a crash here means 'not created'."""
        self.path.mkdir(parents=True, exist_ok=True)
        self._file("key.json").unlink(missing_ok=True)
        self._arrays = None
        storage = _STORAGE[self.dtype]
        arrays = {f"level{i}": np.lib.format.open_memmap(self._file(f"level{i}.npy"), mode="w+", dtype=storage,
                                                         shape=(self.num_rows, *g)) for i, g in enumerate(geometry)}
        arrays["complete"] = np.lib.format.open_memmap(self._file("complete.npy"), mode="w+", dtype=np.uint8, shape=(self.num_rows,))
        arrays["checksum"] = np.lib.format.open_memmap(self._file("checksum.npy"), mode="w+", dtype=np.uint8,
                                                       shape=(self.num_rows, DIGEST_SIZE))
        for a in arrays.values():
            a.flush()
        atomic_write_text(self._file("index.json"), json.dumps({"num_views": self.num_views, "tile_ids": self.tile_ids}))
        atomic_write_text(self._file("key.json"), json.dumps({"key": jsonable(self.key), "geometry": [list(g) for g in geometry],
                                                               "storage_dtype": np.dtype(storage).name}, indent=1))
        self.geometry = [tuple(g) for g in geometry]
        self._arrays = arrays

    def _open(self) -> dict | None:
        """The memory maps (opened on first use in each process); None before the first write."""
        if self._arrays is not None:
            return self._arrays
        if self.geometry is None:
            return None
        storage = np.dtype(_STORAGE[self.dtype])
        expected = {f"level{i}": ((self.num_rows, *g), storage) for i, g in enumerate(self.geometry)}
        expected["complete"] = ((self.num_rows,), np.dtype(np.uint8))
        expected["checksum"] = ((self.num_rows, DIGEST_SIZE), np.dtype(np.uint8))
        arrays = {}
        try:
            for name, (shape, dtype) in expected.items():
                # Mode "r" first: it refuses a truncated file, which "r+" would silently extend with zeros.
                a = np.load(self._file(f"{name}.npy"), mmap_mode="r")
                if a.shape != shape or a.dtype != dtype:
                    raise ValueError(f"{name}.npy is {a.shape} {a.dtype}, expected {shape} {dtype}")
                if os.access(self._file(f"{name}.npy"), os.W_OK):  # a read-only cache can still be read
                    a = np.load(self._file(f"{name}.npy"), mmap_mode="r+")
                arrays[name] = a
        except (OSError, ValueError) as e:  # missing, truncated or foreign files: start this cache afresh
            logger.warning("embedding cache %s: %s; every row will be recomputed", self.path, e)
            self._create(self.geometry)
            return self._arrays
        self._arrays = arrays
        return arrays

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_arrays"] = None  # memory maps are reopened in each process
        return state

    def __repr__(self) -> str:
        done = int(self.complete.sum()) if self.geometry is not None else 0
        return f"EmbeddingCache({self.path}, {done}/{self.num_rows} rows, {self.dtype}, mode={self.view_spec.mode!r})"

    # -- rows ----------------------------------------------------------------------------------

    def row(self, tile_id: str, view: int = 0) -> int:
        """Row of (tile, view); a ValueError naming the tile if this cache does not hold it."""
        position = self._position.get(str(tile_id))
        if position is None:
            raise ValueError(f"tile {tile_id!r} is not in the embedding cache {self.path.name} ({len(self.tile_ids)} tiles): "
                             f"the cache is keyed by the datalist it was built for; build it for this datalist")
        if isinstance(view, bool) or not isinstance(view, (int, np.integer)) or not 0 <= view < self.num_views:
            raise ValueError(f"tile {tile_id!r}: view {view!r} is not cached; expected 0..{self.num_views - 1}")
        return position * self.num_views + int(view)

    def row_key(self, row: int) -> tuple[str, int]:
        """(tile id, view) of ``row``."""
        return self.tile_ids[row // self.num_views], row % self.num_views

    @property
    def complete(self) -> np.ndarray:
        """(rows,) bool: rows whose maps and checksum are on disk (not yet checked against the checksum)."""
        arrays = self._open()
        if arrays is None:
            return np.zeros(self.num_rows, dtype=bool)
        return np.asarray(arrays["complete"]) == COMPLETE

    def missing_rows(self) -> np.ndarray:
        return np.flatnonzero(~self.complete)

    def placeholder(self) -> list[torch.Tensor]:
        """Zero maps of one row in the storage dtype, for a row that must be recomputed."""
        if self.geometry is None:
            raise RuntimeError(f"embedding cache {self.path}: empty; fill it first (cellgap.cache.fill_cache)")
        return [_from_storage(np.zeros(g, dtype=_STORAGE[self.dtype]), self.dtype) for g in self.geometry]

    @staticmethod
    def _row_digest(parts: Sequence[np.ndarray]) -> np.ndarray:
        h = hashlib.blake2b(digest_size=DIGEST_SIZE)
        for part in parts:
            h.update(np.ascontiguousarray(part).data)
        return np.frombuffer(h.digest(), dtype=np.uint8)

    def write(self, rows: Sequence[int], features: Sequence[torch.Tensor]) -> None:
        """Store the maps of ``rows`` (``features``: 4 tensors (len(rows), C_i, h_i, w_i)).

        Per row: flag cleared → maps flushed → checksum flushed → flag set and flushed, so that a crash
        at any point leaves the row either complete and correct or flagged incomplete.
        """
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(np.unique(rows)) != len(rows) or (rows.size and (rows.min() < 0 or rows.max() >= self.num_rows)):
            raise ValueError(f"rows: expected distinct rows in 0..{self.num_rows - 1}, got {rows.tolist()}")
        if len(features) != NUM_LEVELS:
            raise ValueError(f"features: expected {NUM_LEVELS} encoder maps, got {len(features)}")
        for i, f in enumerate(features):
            if f.ndim != 4 or f.shape[0] != len(rows):
                raise ValueError(f"features[{i}]: expected ({len(rows)}, C, h, w) for {len(rows)} rows, got {tuple(f.shape)}")
            if not torch.isfinite(torch.as_tensor(f)).all():
                tiles = [self.row_key(int(r))[0] for r in rows]
                raise ValueError(f"features[{i}]: the encoder gave NaN or infinite values for tiles {tiles}")
        stored = [_to_storage(f, self.dtype) for f in features]
        if self.dtype == "float16":
            for i, s in enumerate(stored):
                if not np.isfinite(s).all():
                    raise ValueError(f"features[{i}]: values beyond the float16 range (max |x| = "
                                     f"{float(torch.as_tensor(features[i]).abs().max()):.4g} > 65504); use dtype='bfloat16' or 'float32'")
        geometry = [tuple(int(v) for v in s.shape[1:]) for s in stored]
        if self.geometry is None or self._open() is None:
            self._create(geometry)
        elif geometry != self.geometry:
            raise ValueError(f"features: map shapes {geometry} differ from this cache's {self.geometry} "
                             f"(another encoder or input size under the same key?)")
        arrays = self._open()
        complete, checksum = arrays["complete"], arrays["checksum"]
        complete[rows] = 0
        complete.flush()
        for i, s in enumerate(stored):
            arrays[f"level{i}"][rows] = s
            arrays[f"level{i}"].flush()
        checksum[rows] = np.stack([self._row_digest([s[j] for s in stored]) for j in range(len(rows))])
        checksum.flush()
        complete[rows] = COMPLETE
        complete.flush()

    def read(self, row: int, verify: bool | None = None) -> list[np.ndarray] | None:
        """The 4 maps of ``row`` in the storage dtype (bfloat16 as uint16), or None if the row is missing or
        its bytes do not match the checksum (corrupted or half-written)."""
        arrays = self._open()
        if arrays is None or arrays["complete"][row] != COMPLETE:
            return None
        parts = [np.array(arrays[f"level{i}"][row]) for i in range(NUM_LEVELS)]
        if (self.verify_reads if verify is None else verify) and not np.array_equal(self._row_digest(parts), arrays["checksum"][row]):
            tile, view = self.row_key(row)
            logger.warning("embedding cache %s: row %d (tile %r, view %d) fails its checksum; it will be recomputed",
                           self.path.name, row, tile, view)
            return None
        return parts

    def read_tensors(self, row: int, verify: bool | None = None) -> list[torch.Tensor] | None:
        """:meth:`read` as torch tensors in the storage dtype (float16, bfloat16 or float32)."""
        parts = self.read(row, verify)
        return None if parts is None else [_from_storage(p, self.dtype) for p in parts]

    def invalidate(self, rows: Sequence[int]) -> None:
        arrays = self._open()
        if arrays is not None:
            arrays["complete"][np.asarray(rows, dtype=np.int64)] = 0
            arrays["complete"].flush()

    def verify(self, progress: bool = False) -> list[int]:
        """Check every complete row against its checksum; flag the bad ones incomplete and return them."""
        arrays = self._open()
        if arrays is None:
            return []
        bad = []
        for row in tqdm(np.flatnonzero(self.complete), desc=f"verify {self.path.name}", unit="row", disable=not progress):
            if self.read(int(row), verify=True) is None:
                bad.append(int(row))
        self.invalidate(bad)
        return bad

    @property
    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.glob("*") if p.is_file()) if self.path.is_dir() else 0

    def clear(self) -> None:
        """Delete this cache's folder (other caches under ``root`` stay)."""
        self._arrays = None
        self.geometry = None
        shutil.rmtree(self.path, ignore_errors=True)

    @contextlib.contextmanager
    def lock(self):
        """Exclusive lock on this cache (POSIX): concurrent fills (e.g. DDP ranks) take turns."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self._file("fill.lock"), "a+") as handle:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                if fcntl is not None:
                    fcntl.flock(handle, fcntl.LOCK_UN)


def bytes_per_row(geometry: Sequence[Sequence[int]], dtype: str = "float16") -> int:
    """Disk bytes of one cached (tile, view): sum of C·h·w over the levels times the storage size."""
    return int(sum(int(np.prod(g)) for g in geometry) * np.dtype(_STORAGE[dtype]).itemsize)


# --------------------------------------------------------------------------------------------
# Filling


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
    _check_int("batch_size", batch_size, 1)
    _check_int("num_workers", num_workers, 0)
    if max_rows is not None:
        _check_int("max_rows", max_rows, 0)
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
        cache._load_meta()  # another process may have filled it while we waited
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


# --------------------------------------------------------------------------------------------
# Training integration


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


__all__ = [
    "CACHE_DTYPES",
    "CACHE_KEYS",
    "CACHE_MODES",
    "CachedFeaturesd",
    "EmbeddingCache",
    "PrepareCachedCISCABatch",
    "SeededViewd",
    "ViewSpec",
    "bytes_per_row",
    "dataset_identity",
    "default_fill_transform",
    "encoder_identity",
    "fill_cache",
    "parameter_fingerprint",
    "view_seed",
    "weights_identity",
]
