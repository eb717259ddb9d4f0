"""Choosing the minimum cell size on the validation split (METHOD.md §4, "Choosing T_small").

The trained network runs once over the validation tiles and every candidate size post-processes the same
outputs (one evaluator pass, one metric per candidate); the best candidate by mPQ+ (multi-class) or
PQ + detection F1 (single class) is kept and written into the checkpoint's meta.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Mapping
from pathlib import Path

from ..workflow import CandidateOutput, candidate_suffix  # noqa: F401  (where the study's callers found them)
from .cells import HEADLINE_METRICS


def default_min_cell_sizes(magnification: int) -> list[int]:
    """METHOD.md §4 candidate minimum cell sizes for a magnification (via its reference profile)."""
    from ..magnification import profile_for

    return list(profile_for(magnification=magnification).min_cell_size_candidates)


def selection_metric(num_classes: int) -> str:
    """What picks the minimum cell size on val: mPQ+ for multi-class data, PQ + detection F1 for one class."""
    return "mpq+" if num_classes > 1 else "pq+f1d"


def selection_score(metrics: Mapping[str, float], num_classes: int) -> float:
    if num_classes > 1:
        return float(metrics["mpq+"])
    return float(metrics["pq"]) + float(metrics["f1d"])


def select_min_cell_size(root: Path, overrides: dict, cell: Path, candidates: list[int] | None) -> dict:
    """Run the trained network once over the validation split; score every candidate minimum cell size."""
    from monai.bundle import ConfigParser

    from ..metrics.aggregation import summarize

    parser = evaluator = None
    try:
        parser = ConfigParser()
        parser.read_config([str(root / "configs" / "train.json"), str(root / "configs" / "evaluate.json")])
        parser.update({**overrides, "eval_split": "val"})
        magnification = parser.get_parsed_content("magnification")
        num_classes = int(parser.get_parsed_content("num_classes"))
        sizes = sorted({int(c) for c in candidates}) if candidates else default_min_cell_sizes(magnification)
        if any(c < 1 for c in sizes):
            raise ValueError(f"min_cell_sizes: expected positive pixel counts, got {sizes}")
        # the bundle's builders post-process and score once per candidate; only the decoder's loader and a report run
        parser.update({"min_cell_size_candidates": sizes, "validate#handlers": [
            "@validate#checkpoint_loader",
            {"_target_": "cellgap.metrics.handlers.MetricsReportSaver", "output_dir": str(cell / "select_val"), "bootstrap": 0}]})
        names = [f"min_cell_size_{c}" for c in sizes]
        evaluator = parser.get_parsed_content("validate#evaluator")
        evaluator.run()
        details = getattr(evaluator.state, "cell_metrics", {}) or {}
        scores, ids, protocol = [], None, None
        for c, name in zip(sizes, names):
            info = details.get(name)
            if info is None or info["table"] is None:
                raise RuntimeError(f"min-cell-size selection: no validation image was scored for candidate {c}")
            summary = summarize(info["table"], info["protocol"])
            score = selection_score(summary, num_classes)
            scores.append({"min_cell_size": c, "score": score, **{m: summary.get(m) for m in HEADLINE_METRICS}})
            ids = [str(i) for i in info["table"].ids]
            protocol = info["protocol"].to_json()
    finally:
        del parser, evaluator  # free the network before the next stage
        gc.collect()
    finite = [s for s in scores if math.isfinite(s["score"])]
    if not finite:
        raise RuntimeError(f"min-cell-size selection: every candidate scored NaN on the validation split ({sizes}); "
                           "does the validation split hold annotated cells?")
    best = max(finite, key=lambda s: s["score"])  # ties: the smaller size (candidates are ascending, max keeps the first)
    return {"chosen": best["min_cell_size"], "candidates": sizes, "metric": selection_metric(num_classes),
            "split": "val", "protocol_split": protocol.get("split") if protocol else None, "n_images": len(ids or []),
            "image_ids": ids, "scores": scores, "magnification": magnification, "num_classes": num_classes}


def set_checkpoint_min_cell_size(path: Path, size: int, metric: str) -> None:
    """Store the chosen size in the checkpoint meta, so inference with this decoder uses it."""
    import io

    import torch

    from ..atomic import atomic_write_bytes

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    ckpt["meta"]["min_cell_size"] = int(size)
    ckpt["meta"]["min_cell_size_selection"] = f"best {metric} on the validation split"
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    atomic_write_bytes(path, buffer.getvalue())
