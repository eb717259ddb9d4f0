"""A DataLoader whose forked worker processes never free the parent's CUDA tensors.

Forked workers inherit every Python object of the training process. If a worker's garbage collector
frees an unreachable reference cycle that holds a CUDA tensor (a finished engine's state, an old batch),
the tensor's deallocation calls into CUDA, which a forked child cannot initialise: the worker aborts
with "CUDA error: initialization error" and the run stops ("DataLoader worker ... exited
unexpectedly"). This happened on an H100 to a bundle's training loader that was created after other
engines had run in the same process (docs/benchmarks.md, "Training throughput (GPU)").

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
    freeing CUDA memory is safe, then moves every surviving object to the collector's permanent
    generation for the duration of the fork. The workers inherit that frozen state, so their
    collectors never visit an inherited object; the parent unfreezes right after the fork. Without
    CUDA, or with ``num_workers=0``, it is exactly ``monai.data.DataLoader``.
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
