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

from .fill import default_fill_transform, fill_cache
from .keys import dataset_identity, encoder_identity, parameter_fingerprint, weights_identity
from .store import CACHE_DTYPES, COMPLETE, DIGEST_SIZE, FORMAT_VERSION, NUM_LEVELS, EmbeddingCache, bytes_per_row
from .transforms import CACHE_KEYS, FEATURES_KEY, CachedFeaturesd, PrepareCachedCISCABatch
from .views import CACHE_MODES, SeededViewd, ViewSpec, view_seed

__all__ = [
    "CACHE_DTYPES",
    "CACHE_KEYS",
    "CACHE_MODES",
    "COMPLETE",
    "DIGEST_SIZE",
    "FEATURES_KEY",
    "FORMAT_VERSION",
    "NUM_LEVELS",
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
