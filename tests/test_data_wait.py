"""cellgap.training.DataWait: the share of an epoch the training loop waited for its batches, and the warning
when a GPU would starve."""

import logging
import time

import pytest
import torch
from ignite.engine import Engine, Events

from cellgap.training import DataWait

PAUSE = 0.03


def _slow_batches(count: int):
    for index in range(count):
        time.sleep(PAUSE)  # the loader's work
        yield index


def _engine(device: str) -> Engine:
    engine = Engine(lambda engine, batch: time.sleep(PAUSE))  # the training step's work
    engine.state.device = torch.device(device)  # as MONAI's workflows set it
    return engine


@pytest.mark.parametrize("device, warned", [("cpu", False), ("cuda", True)])
def test_wait_share_per_epoch_and_warning_on_a_gpu(device, warned, caplog):
    engine = _engine(device)
    DataWait(warn_above=0.1).attach(engine)
    shares = []
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: shares.append(e.state.metrics["data_wait_share"]))
    with caplog.at_level(logging.WARNING, logger="cellgap.training"):
        engine.run(_slow_batches(8), max_epochs=2, epoch_length=4)
    assert len(shares) == 2 and all(0.35 < share < 0.65 for share in shares), shares  # waits as long as it steps
    warnings = [r.getMessage() for r in caplog.records if "waited for data" in r.getMessage()]
    assert len(warnings) == (2 if warned else 0)
    if warned:
        assert warnings[0].startswith("epoch 1: the training loop waited for data") and "more loader workers" in warnings[0]


def test_no_wait_no_warning(caplog):
    engine = _engine("cuda")
    DataWait().attach(engine)
    with caplog.at_level(logging.WARNING, logger="cellgap.training"):
        engine.run(list(range(4)), max_epochs=1)
    assert engine.state.metrics["data_wait_share"] < 0.1
    assert not caplog.records


@pytest.mark.parametrize("value", [-0.1, 1.5, True, "0.1"])
def test_warn_above_must_be_a_share(value):
    with pytest.raises(ValueError, match="warn_above: expected a share in 0..1"):
        DataWait(warn_above=value)


def test_a_distributed_warning_names_its_rank(tmp_path, caplog):
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        engine = _engine("cuda")
        DataWait().attach(engine)
        with caplog.at_level(logging.WARNING, logger="cellgap.training"):
            engine.run(_slow_batches(2), max_epochs=1, epoch_length=2)
    finally:
        torch.distributed.destroy_process_group()
    assert [r.getMessage()[:23] for r in caplog.records] == ["rank 0, epoch 1: the tr"]
