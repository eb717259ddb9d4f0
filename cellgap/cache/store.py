"""The memory-mapped store of encoder maps: one row per (tile, view), a completion flag and a checksum per row.

A low floor: numpy and the standard library only. Torch is imported by the two methods that hand out tensors
(:meth:`EmbeddingCache.read_tensors`, :meth:`EmbeddingCache.placeholder`), and a view spec given by its mode
name is built by :class:`cellgap.cache.views.ViewSpec` (MONAI) when that happens."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

from .. import __version__
from ..atomic import atomic_write_text, jsonable

try:  # POSIX; elsewhere concurrent fills of one cache are not serialised
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

from .keys import dataset_identity, digest, encoder_identity, folder_label, tile_ids_of, weights_identity

if TYPE_CHECKING:
    import torch

    from .views import ViewSpec

logger = logging.getLogger(__name__)

CACHE_DTYPES = ("float16", "bfloat16", "float32")
FORMAT_VERSION = 1
NUM_LEVELS = 4
DIGEST_SIZE = 16
COMPLETE = 1
STORAGE = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}  # numpy has no bfloat16


def as_float32(values) -> np.ndarray:
    """A tensor (any device and float dtype) or an array as a float32 numpy array."""
    if hasattr(values, "detach"):  # a torch tensor: .float() first, numpy has no bfloat16
        values = values.detach().float().cpu().numpy()
    return np.ascontiguousarray(values, dtype=np.float32)


def to_storage(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 ``values`` in the storage dtype; bfloat16 as its uint16 bits, rounded to the nearest even as torch
    rounds (values must be finite)."""
    if dtype == "bfloat16":
        bits = values.view(np.uint32)
        return ((bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)).astype(np.uint16)
    with np.errstate(over="ignore"):  # beyond float16's range: inf, which write() reports
        return values.astype(STORAGE[dtype])


def from_storage(array: np.ndarray, dtype: str) -> torch.Tensor:
    import torch  # the store's only use of torch: handing rows out as tensors

    tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor


def _view_spec(value: ViewSpec | str) -> ViewSpec:
    from .views import ViewSpec  # MONAI's transforms: imported when a cache is built, not with the store

    if isinstance(value, str):
        value = ViewSpec(value)
    if not isinstance(value, ViewSpec):
        raise TypeError(f"view_spec: expected a ViewSpec or a mode name, got {type(value).__name__}")
    return value


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
        view_spec = _view_spec(view_spec)
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
                    "dataset": dataset_id, "tiles": digest(ids, 16), "num_tiles": len(ids), "input_size": list(self.input_size),
                    "view_spec": view_spec.identity(), "dtype": dtype}
        self.digest = digest(self.key, 10)
        self.path = self.root / f"{folder_label(encoder_key.split(':')[0])}-{folder_label(dataset_id.split(':')[0])}-{self.digest}"
        self.geometry: list[tuple[int, int, int]] | None = None
        self._arrays: dict | None = None
        self.load_meta()

    # -- construction helpers ------------------------------------------------------------------

    @classmethod
    def for_encoder(cls, root: str | os.PathLike, encoder, weights, datalist: Sequence[Mapping], view_spec: ViewSpec | str,
                    dataset_id: str | None = None, dtype: str = "float16", input_size: int | Sequence[int] | None = None,
                    weights_seed: int | None = None, verify_reads: bool = True) -> EmbeddingCache:
        """The cache of ``encoder`` (a FrozenEncoder or a CellGapNet) with ``weights`` (as given to the network)
        on the tiles of ``datalist``; ``input_size`` defaults to the view spec's crop size."""
        view_spec = _view_spec(view_spec)
        if input_size is None:
            input_size = getattr(view_spec, "crop_size", None)
            if input_size is None:
                raise ValueError("input_size: the view spec has no crop size; give the encoder input side explicitly")
        return cls(root, encoder_identity(encoder), weights_identity(weights, encoder, weights_seed),
                   dataset_id or dataset_identity(datalist), view_spec, dtype, tile_ids=tile_ids_of(datalist),
                   input_size=input_size, verify_reads=verify_reads)

    # -- files ---------------------------------------------------------------------------------

    def _file(self, name: str) -> Path:
        return self.path / name

    def load_meta(self) -> None:
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
        storage = STORAGE[self.dtype]
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
        storage = np.dtype(STORAGE[self.dtype])
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
        return [from_storage(np.zeros(g, dtype=STORAGE[self.dtype]), self.dtype) for g in self.geometry]

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
        values = [as_float32(f) for f in features]
        for i, f in enumerate(values):
            if f.ndim != 4 or f.shape[0] != len(rows):
                raise ValueError(f"features[{i}]: expected ({len(rows)}, C, h, w) for {len(rows)} rows, got {tuple(f.shape)}")
            if not np.isfinite(f).all():
                tiles = [self.row_key(int(r))[0] for r in rows]
                raise ValueError(f"features[{i}]: the encoder gave NaN or infinite values for tiles {tiles}")
        stored = [to_storage(f, self.dtype) for f in values]
        if self.dtype == "float16":
            for i, s in enumerate(stored):
                if not np.isfinite(s).all():
                    raise ValueError(f"features[{i}]: values beyond the float16 range (max |x| = "
                                     f"{float(np.abs(values[i]).max()):.4g} > 65504); use dtype='bfloat16' or 'float32'")
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
        return None if parts is None else [from_storage(p, self.dtype) for p in parts]

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
    return int(sum(int(np.prod(g)) for g in geometry) * np.dtype(STORAGE[dtype]).itemsize)
