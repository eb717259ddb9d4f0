"""A DataLoader whose forked worker processes never destroy the parent's CUDA objects.

Forked workers inherit every Python object of the training process. If a worker's garbage collector
frees an unreachable reference cycle that holds a CUDA object whose destructor calls CUDA (a recorded
``torch.cuda.Event``, for one), the call fails in the forked child, which cannot initialise CUDA, and the
worker aborts ("CUDA error: initialization error"; the loader then raises "DataLoader worker ... exited
unexpectedly"). On an H100 this stopped scripts/benchmark_training.py: a bundle's training loader was
created after a finished trainer whose timing handlers held recorded events (docs/benchmarks.md);
``tests/test_dataloader.py`` reproduces it on a CUDA machine.

MONAI and torch offer no switch for it: the usual advice, the "spawn" or "forkserver" start methods,
pickles the dataset (a CacheDataset's whole cache) to every worker at every epoch.
"""

from __future__ import annotations

import gc

import torch
from monai.data import DataLoader


class ForkSafeDataLoader(DataLoader):
    """``monai.data.DataLoader`` that collects garbage and freezes the collector while it forks workers.

    When the process has initialised CUDA and the loader uses worker processes, each new iterator
    (each epoch, unless ``persistent_workers``) first runs a full collection in the parent, where
    destroying CUDA objects is safe, then moves every surviving object to the collector's permanent
    generation for the duration of the fork. The workers inherit that frozen state, so their
    collectors never visit an inherited object; the parent unfreezes right after the fork (all of the
    permanent generation: ``gc.unfreeze`` has no finer grain). Without CUDA, or with ``num_workers=0``,
    it is exactly ``monai.data.DataLoader``.
    """

    def __iter__(self):
        if self.num_workers == 0 or not torch.cuda.is_initialized():
            return super().__iter__()
        gc.collect()
        gc.freeze()
        try:
            return super().__iter__()
        finally:
            gc.unfreeze()


__all__ = ["ForkSafeDataLoader"]
