"""The console shows one bar per epoch with the loss, steps/s and the time left (issue #20 item 7)."""

import io

import torch
from ignite.engine import Engine, Events

from cellgap.monitoring import EpochProgressBar


def test_the_epoch_bar_shows_loss_rate_and_eta():
    stream = io.StringIO()
    engine = Engine(lambda engine, batch: {"loss": torch.tensor(0.5 / (engine.state.iteration + 1))})
    EpochProgressBar(file=stream).attach(engine)
    engine.run(list(range(4)), max_epochs=2)
    text = stream.getvalue()
    assert "Epoch [1/2]" in text and "Epoch [2/2]" in text
    assert "loss=" in text and "it/s" in text and "<" in text  # elapsed<remaining


def test_one_short_line_per_validation(capsys):
    from cellgap.monitoring import ValidationLine

    engine = Engine(lambda engine, batch: None)
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: e.state.metrics.update({"val_key_metric": 0.25, "val_pq": 0.25}))
    ValidationLine(name="key metric pq").attach(engine)
    engine.run([0], max_epochs=2)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("validation")]
    assert lines == ["validation after epoch 1: key metric pq 0.2500, pq 0.2500",
                     "validation after epoch 2: key metric pq 0.2500, pq 0.2500"]
