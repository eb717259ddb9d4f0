"""Evaluation suite: PQ family, AJI, Dice, detection and per-class F1, R², with named protocols.

Start with :class:`Protocol` (presets ``Protocol.pannuke()``, ``.conic()``, ``.cisca()``),
score images with :func:`score_image`, combine them with :class:`ScoreTable` / :func:`summarize`,
and write reports with :func:`write_reports`.  See docs/metrics.md.
"""

from .aggregation import KEY_METRICS, ScoreTable, aggregate, canonical_metric, per_tissue, summarize
from .matching import Overlaps, instance_overlaps
from .protocol import Protocol
from .scoring import ImageScore, score_image

__all__ = [
    "KEY_METRICS",
    "ImageScore",
    "Overlaps",
    "Protocol",
    "ScoreTable",
    "aggregate",
    "canonical_metric",
    "instance_overlaps",
    "per_tissue",
    "score_image",
    "summarize",
]
