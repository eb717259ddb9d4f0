"""CISCA training targets from an instance map (METHOD.md §1).

* :func:`contour_levels` — the 4-level "graymask4" map (§1.2): 0 boundary between touching cells,
  1 body, 2 background, 3 cleft (METHOD.md calls this level "gap"; here "gap" is kept for the
  study's encoder gap).
* :func:`contour_classes` — its merge into the K-class contour target (§1.3).
* :func:`distance_maps` — the directional maps [h, v, tl, bl] (§1.4).
* :func:`weight_mask` — the regression weight mask (§1.6).
* :func:`class_map_from_instances`, :func:`instance_classes` — per-pixel ↔ per-instance classes.
* :class:`ContourLevelsd` — the contour-level map of a stored tile, computed (or read from the packed
  copy) before augmentation, so that the geometric augmentation moves it as the reference does.
* :class:`CISCATargetsd` — the MONAI dictionary transform that computes all targets of a sample
  after spatial augmentation (names from docs/contracts.md).

Every magnification-dependent constant comes from a :class:`~cellgap.magnification.MagnificationProfile`.
Everything is vectorised over instances: the cost of a tile does not grow with its number of cells.
"""

from .dense import DenseTargets
from .maps import (
    BACKGROUND,
    BACKGROUND_WEIGHT,
    BODY,
    BOUNDARY,
    CLEFT,
    CONTOUR_CLASS_COUNTS,
    DISTANCE_MODES,
    INSTANCE_CLASS_RULES,
    MIN_BODY_COMPONENT,
    MIN_BOUNDARY_COMPONENT,
    MIN_CLEFT_COMPONENT,
    TIPS_DIAGONAL_FACTOR,
    class_map_from_instances,
    contour_classes,
    contour_levels,
    distance_maps,
    instance_classes,
    weight_mask,
)
from .morphology import EIGHT_CONNECTED, FOUR_CONNECTED
from .transforms import CONTOUR_LEVELS_KEY, CONTOUR_PROFILE_KEY, CISCATargetsd, ContourLevelsd

__all__ = [
    "BACKGROUND",
    "BACKGROUND_WEIGHT",
    "BODY",
    "BOUNDARY",
    "CLEFT",
    "CONTOUR_CLASS_COUNTS",
    "CONTOUR_LEVELS_KEY",
    "CONTOUR_PROFILE_KEY",
    "DISTANCE_MODES",
    "EIGHT_CONNECTED",
    "FOUR_CONNECTED",
    "INSTANCE_CLASS_RULES",
    "MIN_BODY_COMPONENT",
    "MIN_BOUNDARY_COMPONENT",
    "MIN_CLEFT_COMPONENT",
    "TIPS_DIAGONAL_FACTOR",
    "CISCATargetsd",
    "ContourLevelsd",
    "DenseTargets",
    "class_map_from_instances",
    "contour_classes",
    "contour_levels",
    "distance_maps",
    "instance_classes",
    "weight_mask",
]
