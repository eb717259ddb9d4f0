"""What each encoder costs: parameters and GFLOPs per 256² tile, cached in ``results/cost.json``."""

from __future__ import annotations

import json
from pathlib import Path

from ..atomic import write_json
from ..network import COST_TILE, network_cost
from .bundles import bundle_defaults, bundle_root, error_chain
from .plan import StudyPlan
from .runs import read_json


def encoder_costs(results: Path, plan: StudyPlan, encoders: list[str], num_classes: int) -> dict:
    """Per encoder cost, cached in ``results/cost.json`` (keyed by everything that changes it)."""
    path = results / "cost.json"
    cache = read_json(path) or {}
    out = {}
    for e in encoders:
        try:
            root = bundle_root(e, plan, results.parent)
            defaults = bundle_defaults(root)
        except (FileNotFoundError, json.JSONDecodeError):
            defaults = {}
        settings = {"encoder": e, "num_classes": num_classes, "tile": COST_TILE,
                    "decoder": plan.overrides.get("decoder", defaults.get("decoder")),
                    "reduced": bool(plan.overrides.get("reduced_encoder", False)),
                    "num_contour_classes": plan.overrides.get("num_contour_classes", defaults.get("num_contour_classes", 3)),
                    "num_distance_maps": plan.overrides.get("num_distance_maps", defaults.get("num_distance_maps", 4))}
        key = json.dumps(settings, sort_keys=True)
        if key not in cache:
            try:
                cache[key] = {**settings, **network_cost(e, num_classes, settings["decoder"], settings["reduced"],
                                                         settings["num_contour_classes"], settings["num_distance_maps"])}
            except Exception as err:  # the cost figure must not stop the results
                cache[key] = {**settings, "error": error_chain(err)[-1].splitlines()[0]}
        out[e] = cache[key]
    write_json(path, cache)
    return out
