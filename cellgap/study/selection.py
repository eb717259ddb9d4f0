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

from .cells import HEADLINE_METRICS

_CANDIDATE_KEYS = ("pred_instances", "pred_types", "pred_cells")


class CandidateOutput:
    """``output_transform`` of a :class:`~cellgap.metrics.handlers.CellMetrics` that scores one candidate
    minimum cell size: it exposes ``pred_instances_min<size>`` (etc.) as ``pred_instances``."""

    def __init__(self, min_cell_size: int):
        self.suffix = candidate_suffix(min_cell_size)

    def _one(self, item: Mapping) -> dict:
        out = dict(item)
        for key in _CANDIDATE_KEYS:
            if key + self.suffix in item:
                out[key] = item[key + self.suffix]
        return out

    def __call__(self, output):
        if isinstance(output, Mapping):
            return self._one(output)
        return [self._one(item) for item in output]


def candidate_suffix(min_cell_size: int) -> str:
    return f"_min{int(min_cell_size)}"


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

        post = parser.get("validate#postprocessing#transforms")
        at = [i for i, t in enumerate(post) if isinstance(t, dict) and str(t.get("_target_", "")).endswith("CISCAPostProcessingd")]
        if len(at) != 1:
            raise ValueError(f"bundle {root.name}: expected one CISCAPostProcessingd in validate#postprocessing, found {len(at)}")
        base = post[at[0]]
        variants = [{**base, "min_cell_size": c, "instance_key": "pred_instances" + candidate_suffix(c),
                     "type_key": "pred_types" + candidate_suffix(c), "cells_key": "pred_cells" + candidate_suffix(c)}
                    for c in sizes]
        parser["validate#postprocessing#transforms"] = post[: at[0]] + variants + post[at[0] + 1:]

        metric_cfg = dict(parser.get("validate#key_metric#val_key_metric"))
        metrics = {f"min_cell_size_{c}": {**metric_cfg, "prefix": f"min_cell_size_{c}/",
                                           "output_transform": {"_target_": "cellgap.study.selection.CandidateOutput", "min_cell_size": c}}
                   for c in sizes}
        names = list(metrics)
        parser["validate#key_metric"] = {names[0]: metrics[names[0]]}
        parser["validate#evaluator#additional_metrics"] = {n: metrics[n] for n in names[1:]}
        loaders = [h for h in parser.get("validate#handlers")
                   if isinstance(h, dict) and str(h.get("_target_", "")).endswith("CheckpointLoader")]
        if not loaders:
            raise ValueError(f"bundle {root.name}: configs/evaluate.json has no CheckpointLoader in validate#handlers")
        parser["validate#handlers"] = [loaders[0], {"_target_": "cellgap.metrics.handlers.MetricsReportSaver",
                                                    "output_dir": str(cell / "select_val"), "bootstrap": 0}]
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
    import torch

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    ckpt["meta"]["min_cell_size"] = int(size)
    ckpt["meta"]["min_cell_size_selection"] = f"best {metric} on the validation split"
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(ckpt, tmp)
    tmp.replace(path)
