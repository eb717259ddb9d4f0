"""Ignite / MONAI integration: one accumulating metric for the bundles and a report-saving handler.

:class:`CellMetrics` is an ignite ``Metric`` usable as a MONAI ``key_val_metric``.  Each iteration
it scores every item of the evaluator's decollated output (keys ``pred_instances``, ``pred_types``,
``gt_instances``, ``gt_types``; ``id`` and ``tissue`` from the batch items, see docs/contracts.md);
at the end of the epoch it gathers the per-image scores from every DDP rank
(``ignite.distributed.all_gather``; an image id seen twice — DistributedSampler padding — counts
once), then puts into ``engine.state.metrics``:

* under the attached name: the selected key metric (``"pq"``, ``"bpq"``, ``"mpq"``, ``"mpq+"``,
  ``"f1d"``, ``"aji"``, ``"aji+"``, ``"dice"``, ``"dq"``, ``"sq"``, ``"r2"``), a float for
  ``CheckpointSaver``/``EarlyStopHandler``;
* under ``prefix + name`` every other headline scalar and the per-class values (``pq+/<class>``,
  ``f1/<class>`` …), so MONAI's ``TensorBoardStatsHandler`` writes them.

The per-image table and protocol are left in ``engine.state.cell_metrics[<name>]`` for
:class:`MetricsReportSaver`, which writes the reports of :mod:`cellgap.metrics.report`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.metrics import Metric

from .aggregation import KEY_METRICS, ScoreTable, canonical_metric, summarize
from .protocol import Protocol
from .report import write_reports
from .scoring import ImageScore, score_image

STATE_ATTR = "cell_metrics"
ITEM_KEYS = ("pred_instances", "pred_types", "gt_instances", "gt_types")

logger = logging.getLogger(__name__)


def _identity(x):
    return x


def _text(value, default: str = "") -> str:
    if value is None:
        return default
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.reshape(-1)[0].item()
    elif isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(-1)[0].item()
    return str(value)


def _items(output, batch) -> list[dict]:
    """Per-item dicts from a decollated (list) or batched (dict) evaluator output, with id/tissue from the batch."""
    if isinstance(output, Mapping):  # decollate=False: split the batch dimension
        first = output.get("pred_instances")
        if first is None:
            raise KeyError("engine output: no 'pred_instances' (see docs/contracts.md, post-processing output)")
        n = len(first)
        output = [{k: v[i] for k, v in output.items() if isinstance(v, (torch.Tensor, np.ndarray, list, tuple)) and len(v) == n}
                  for i in range(n)]
        if isinstance(batch, Mapping):
            batch = [{k: v[i] for k, v in batch.items() if k in ("id", "tissue") and len(v) == n} for i in range(n)]
    if not isinstance(output, Sequence):
        raise TypeError(f"engine output: expected a list of per-item dicts (decollate=True) or a dict, got {type(output).__name__}")
    batch = batch if isinstance(batch, Sequence) and len(batch) == len(output) else [{}] * len(output)
    items = []
    for k, (o, b) in enumerate(zip(output, batch)):
        if not isinstance(o, Mapping):
            raise TypeError(f"engine output item {k}: expected a dict, got {type(o).__name__}")
        item = dict(o)
        for key in ("id", "tissue"):
            if key not in item and isinstance(b, Mapping) and key in b:
                item[key] = b[key]
        items.append(item)
    return items


class CellMetrics(Metric):
    """Accumulate per-image cell metrics over an evaluation epoch (all DDP ranks) and report them.

    Args:
        class_names: cell classes 1..C in order (background excluded).
        key_metric: the scalar returned under the attached name (see module docstring; aliases such as
            ``"mpq_plus"`` and ``"aji_plus"`` are accepted).
        protocol: a :class:`Protocol`; or give ``magnification``/``mpp``/``detection_radius`` and
            ``empty_policy`` (+ any ``Protocol`` field in ``protocol_kwargs``) to build a custom one.
        prefix: put before the other scalar names in ``engine.state.metrics`` (e.g. ``"val_"``).
        per_class: also publish per-class scalars.
        output_transform: applied to ``engine.state.output`` before scoring.
        device: where images are scored (None: where the tensors are — CUDA stays on GPU).
    """

    def __init__(
        self,
        class_names: Sequence[str],
        key_metric: str = "pq",
        protocol: Protocol | None = None,
        magnification: float | None = None,
        mpp: float | None = None,
        detection_radius: float | None = None,
        empty_policy: str | None = None,
        protocol_kwargs: dict | None = None,
        prefix: str = "",
        per_class: bool = True,
        output_transform: Callable = _identity,
        device: str | torch.device | None = None,
    ):
        if isinstance(class_names, str) or not class_names:
            raise ValueError(f"class_names: expected a non-empty list of class names, got {class_names!r}")
        self.class_names = tuple(str(c) for c in class_names)
        self.key_metric = canonical_metric(key_metric)
        if self.key_metric not in KEY_METRICS and self.key_metric not in ("mpq_image", "mpq_tissue", "bpq_image", "bpq_tissue"):
            raise ValueError(f"key_metric: expected one of {KEY_METRICS}, got {key_metric!r}")
        if protocol is None:
            kwargs = dict(protocol_kwargs or {})
            kwargs.update({k: v for k, v in (("magnification", magnification), ("mpp", mpp),
                                             ("detection_radius", detection_radius), ("empty_policy", empty_policy)) if v is not None})
            protocol = Protocol(**kwargs)
        elif any(v is not None for v in (magnification, mpp, detection_radius, empty_policy)) or protocol_kwargs:
            raise ValueError("give either protocol or magnification/mpp/detection_radius/empty_policy, not both")
        self.protocol = protocol
        self.prefix = prefix
        self.per_class = per_class
        self.score_device = device
        self._scores: list[ImageScore] = []
        self._seen = 0
        self.table: ScoreTable | None = None
        self.summary: dict[str, float] = {}
        super().__init__(output_transform=output_transform, device="cpu")

    def reset(self) -> None:
        self._scores = []
        self._seen = 0

    def update(self, output) -> None:
        """Score a list of per-item dicts (``pred_instances``, ``gt_instances``, optional ``*_types``, ``id``, ``tissue``)."""
        for item in _items(output, None):
            self._score(item)

    def _score(self, item: Mapping) -> None:
        where = f"item {self._seen}" + (f" (id {_text(item.get('id'))!r})" if item.get("id") is not None else "")
        missing = [k for k in ("pred_instances", "gt_instances") if k not in item]
        if missing:
            raise KeyError(f"{where}: missing {missing}; the evaluator's post-processing must add {list(ITEM_KEYS)}")
        gt_types, pred_types = item.get("gt_types"), item.get("pred_types")
        if len(self.class_names) == 1:
            gt_types = pred_types = None  # single class: every instance is class 1
        try:
            score = score_image(item["gt_instances"], item["pred_instances"], gt_types, pred_types,
                                num_classes=len(self.class_names), protocol=self.protocol,
                                image_id=_text(item.get("id"), default=f"#{self._seen}"), tissue=_text(item.get("tissue")),
                                device=self.score_device)
        except (ValueError, TypeError) as e:
            raise type(e)(f"{where}: {e}") from None
        self._scores.append(score)
        self._seen += 1

    def iteration_completed(self, engine: Engine) -> None:
        output = self._output_transform(engine.state.output)
        for item in _items(output, engine.state.batch):
            self._score(item)

    def _gathered(self) -> list[ImageScore]:
        scores = self._scores
        if idist.get_world_size() > 1:
            parts = idist.all_gather(scores)
            scores = [s for part in parts for s in part] if parts and isinstance(parts[0], list) else list(parts)
        unique, seen = [], set()
        for s in scores:
            if s.image_id in seen:
                continue
            seen.add(s.image_id)
            unique.append(s)
        return unique

    def compute(self) -> dict[str, float]:
        scores = self._gathered()
        if not scores:
            logger.warning("CellMetrics: no image was scored this epoch; every metric is NaN")
            self.table = None
            self.summary = {}
            return {self.key_metric: float("nan")}
        self.table = ScoreTable.from_scores(scores, self.class_names)
        self.summary = summarize(self.table, self.protocol)
        return self.summary

    def completed(self, engine: Engine, name: str) -> None:
        result = self.compute()
        key = result.get(self.key_metric, float("nan"))
        engine.state.metrics[name] = float(key)
        for k, v in result.items():
            if ("/" in k and not self.per_class) or not isinstance(v, float):
                continue
            full = self.prefix + k
            if full != name:
                engine.state.metrics[full] = v
        details = getattr(engine.state, STATE_ATTR, None) or {}
        details[name] = {"table": self.table, "protocol": self.protocol, "key_metric": self.key_metric}
        setattr(engine.state, STATE_ATTR, details)
        if math.isnan(key):
            logger.warning(f"CellMetrics: key metric {self.key_metric!r} is NaN (no scorable image or class)")


class MetricsReportSaver:
    """Write the evaluation reports of a :class:`CellMetrics` at the end of an evaluation run.

    Args:
        output_dir: folder; each run writes ``per_image.csv``, ``per_class.csv``, ``per_tissue.csv``
            and ``summary.json`` (into ``<output_dir>/<metric name>/`` when several metrics are reported).
        metric_name: which attached ``CellMetrics`` (default: all).
        bootstrap: resamples for the confidence intervals in the summary (0 = none).
        event: ``"completed"`` (end of ``run``) or ``"epoch_completed"``.
        extra: stored under ``"run"`` in the summary (encoder, checkpoint …).

    Only rank 0 writes.
    """

    def __init__(self, output_dir: str, metric_name: str | None = None, bootstrap: int = 1000, event: str = "completed",
                 extra: dict | None = None, seed: int = 0):
        if event not in ("completed", "epoch_completed"):
            raise ValueError(f"event: expected 'completed' or 'epoch_completed', got {event!r}")
        self.output_dir = Path(output_dir)
        self.metric_name = metric_name
        self.bootstrap = int(bootstrap)
        self.event = Events.COMPLETED if event == "completed" else Events.EPOCH_COMPLETED
        self.extra = extra
        self.seed = seed
        self.written: dict[str, dict[str, Path]] = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(self.event, self)

    def __call__(self, engine: Engine) -> None:
        if idist.get_rank() != 0:
            return
        details = getattr(engine.state, STATE_ATTR, None) or {}
        names = [self.metric_name] if self.metric_name is not None else sorted(details)
        if self.metric_name is not None and self.metric_name not in details:
            raise KeyError(f"MetricsReportSaver: no CellMetrics named {self.metric_name!r} on this engine; found {sorted(details)}")
        for name in names:
            info = details[name]
            if info["table"] is None:
                logger.warning(f"MetricsReportSaver: {name!r} scored no image; no report written")
                continue
            folder = self.output_dir if len(names) == 1 else self.output_dir / name
            extra = {"epoch": engine.state.epoch, "key_metric": info["key_metric"], **(self.extra or {})}
            self.written[name] = write_reports(folder, info["table"], info["protocol"], bootstrap=self.bootstrap,
                                               seed=self.seed, extra=extra)
