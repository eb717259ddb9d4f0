"""ForkSafeDataLoader: forked workers must not free the parent's objects (CUDA events in real runs)."""

import gc
import os

import pytest
import torch
from monai.data import DataLoader

from cellgap.data.dataloader import ForkSafeDataLoader


class Witness:
    """Unreachable once created (it refers to itself) and notes the process that finally frees it."""

    def __init__(self, path):
        self.path = path
        self.cycle = self

    def __del__(self):
        with open(self.path, "a") as f:
            f.write(f"{os.getpid()}\n")


class CollectingDataset(torch.utils.data.Dataset):
    """Runs the garbage collector in the worker, as any allocation in it may."""

    def __len__(self):
        return 4

    def __getitem__(self, index):
        gc.collect()
        return index


def freeing_processes(loader_class, path, monkeypatch) -> set[int]:
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # the case that matters: a CUDA process
    loader = loader_class(CollectingDataset(), batch_size=2, num_workers=1, multiprocessing_context="fork")
    gc.disable()  # keep the witness uncollected until the loader forks
    try:
        Witness(path)
        assert [batch.tolist() for batch in loader] == [[0, 1], [2, 3]]
    finally:
        gc.enable()
    gc.collect()
    return {int(line) for line in path.read_text().split()}


def test_workers_of_a_plain_loader_free_inherited_garbage(tmp_path, monkeypatch):
    # The hazard itself: a worker's collector frees what it inherited (a CUDA tensor would abort it).
    assert freeing_processes(DataLoader, tmp_path / "freed", monkeypatch) - {os.getpid()}


def test_fork_safe_loader_frees_it_in_the_parent_only(tmp_path, monkeypatch):
    assert freeing_processes(ForkSafeDataLoader, tmp_path / "freed", monkeypatch) == {os.getpid()}


@pytest.mark.parametrize("workers", [0, 1])
def test_without_cuda_or_workers_it_is_a_plain_loader(workers, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: workers == 0)
    calls = []
    monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))
    loader = ForkSafeDataLoader(list(range(6)), batch_size=3, num_workers=workers)
    assert [batch.tolist() for batch in loader] == [[0, 1, 2], [3, 4, 5]]
    assert calls == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("loader_class", [DataLoader, ForkSafeDataLoader])
def test_cuda_event_in_inherited_garbage(loader_class):
    # The failure seen on an H100: a finished trainer kept recorded CUDA events in a reference cycle; a plain
    # loader's forked worker destroyed one (a CUDA call in the child) and aborted.
    loader = loader_class(CollectingDataset(), batch_size=2, num_workers=1, multiprocessing_context="fork")
    gc.disable()
    try:
        holder = {"event": torch.cuda.Event(enable_timing=True)}
        holder["event"].record()
        holder["cycle"] = holder
        del holder
        if loader_class is DataLoader:
            with pytest.raises(RuntimeError, match="DataLoader worker"):
                list(loader)
        else:
            assert [batch.tolist() for batch in loader] == [[0, 1], [2, 3]]
    finally:
        gc.enable()
        gc.collect()
