"""What a training run shows on the console: one progress bar per epoch with the loss, the steps per second
and the time left (ignite's ``ProgressBar`` shows neither the loss nor the rate unless told to). A line per
validation comes from the bundles' ``StatsHandler``; TensorBoard gets the loss, learning rate, validation
metrics and overlays from the bundles' TensorBoard handlers and ``cellgap.visualization.OverlayHandler``."""

from __future__ import annotations

from ignite.contrib.handlers import ProgressBar
from ignite.engine import Engine, Events
from tqdm.auto import tqdm

BAR_FORMAT = "{desc}[{n_fmt}/{total_fmt}] {percentage:3.0f}%|{bar}{postfix} [{elapsed}<{remaining}, {rate_fmt}]"


def _loss(output) -> dict:
    loss = output["loss"] if isinstance(output, dict) else output
    return {"loss": float(loss)}


class EpochProgressBar(ProgressBar):
    """Ignite's ``ProgressBar`` (one bar per epoch, kept on screen) showing ``loss``, steps/s and the ETA."""

    def __init__(self, persist: bool = True, **tqdm_kwargs) -> None:
        super().__init__(persist=persist, bar_format=BAR_FORMAT, **tqdm_kwargs)

    def attach(self, engine: Engine, metric_names=None, output_transform=None, **kwargs) -> None:  # noqa: D102
        super().attach(engine, metric_names=metric_names, output_transform=output_transform or _loss, **kwargs)


class ValidationLine:
    """One short line per validation: the key metric, the headline metrics, and the best so far."""

    def __init__(self, key_metric: str = "val_key_metric", shown=("val_pq", "val_mpq+", "val_f1d"), name: str = "") -> None:
        self.key_metric, self.shown, self.name = key_metric, tuple(shown), name

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        metrics = engine.state.metrics
        parts = [f"{self.name or self.key_metric} {metrics[self.key_metric]:.4f}"] if self.key_metric in metrics else []
        parts += [f"{k.removeprefix('val_')} {metrics[k]:.4f}" for k in self.shown if isinstance(metrics.get(k), float)]
        best, at = getattr(engine.state, "best_metric", None), getattr(engine.state, "best_metric_epoch", None)
        if best is not None and at is not None and at >= 0:
            parts.append(f"best {best:.4f} at epoch {at}")
        tqdm.write(f"validation after epoch {engine.state.epoch}: " + ", ".join(parts))


__all__ = ["BAR_FORMAT", "EpochProgressBar", "ValidationLine"]
