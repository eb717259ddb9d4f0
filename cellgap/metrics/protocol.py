"""The evaluation protocol: every choice that changes a reported number, recorded with the number.

Presets follow PEERS.md §3 and METHOD.md §5:

* ``Protocol.pannuke()``: empty-GT images give NaN per-image scores (excluded by the nan-aware
  means, still counted in pooled metrics); bPQ and mPQ averaged per tissue, then over tissues.
* ``Protocol.conic()``: mPQ+ pooled over the dataset; counts (R²) in the central 224×224 region;
  20x (radius 6 px); empty-GT images kept as NaN like PanNuke (the challenge scores every patch).
* ``Protocol.cisca()``: the study's own evaluation; images without GT cells are skipped for
  every metric (METHOD §10.12), bPQ/mPQ tissue-averaged as in its ``tissue_stats``, per-class F1
  with the largest class id inside a GT instance (§10.13).

Empty-image policies:

* ``"skip"`` — an image whose GT has no instance is excluded from every metric, pooled ones
  included (its false positives are never counted).
* ``"nan"`` — its per-image scores (PQ, DQ, SQ, AJI, AJI+, Dice, mPQ) are NaN and left out of the
  nan-aware means; pooled metrics (mPQ+, detection, per-class F1, R²) still count its predictions.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from ..magnification import profile_for
from .matching import CLASS_RULES

EMPTY_POLICIES = ("skip", "nan")
AVERAGINGS = ("tissue", "image")


@dataclass(frozen=True)
class Protocol:
    """How a dataset is scored.

    Attributes:
        name: preset name, or ``"custom"``.
        split: what was evaluated (e.g. ``"test"``, ``"pannuke split 1 (fold3)"``); recorded only.
        empty_policy: ``"skip"`` or ``"nan"`` (see module docstring).
        averaging: ``"tissue"`` — ``bpq`` and ``mpq`` are means over tissues of per-tissue image
            means (PanNuke); ``"image"`` — means over images.  Both variants are always reported as
            ``bpq_tissue``/``bpq_image`` and ``mpq_tissue``/``mpq_image``.
        magnification, mpp: of the evaluated images; the detection radius follows from them.
        detection_radius: pixels; default ``profile_for(...).detection_radius`` (12 at 40x, 6 at 20x).
        iou_threshold: PQ pairing threshold, IoU strictly above it (0.5).
        class_rule: one class per instance for PQ, counts and R² (``"majority"`` or ``"max"``).
        f1_class_rule: the GT instance class for per-class F1 (CISCA: ``"max"``).
        count_region: side of the central square where instances are counted for R² (CoNIC 224).
        eps: added to DQ and SQ denominators (0 = exact; CISCA used 1e-6).
    """

    name: str = "custom"
    split: str = ""
    empty_policy: str = "skip"
    averaging: str = "tissue"
    magnification: float | None = None
    mpp: float | None = None
    detection_radius: float | None = None
    iou_threshold: float = 0.5
    class_rule: str = "majority"
    f1_class_rule: str = "majority"
    count_region: int | None = None
    eps: float = 0.0

    def __post_init__(self):
        if self.empty_policy not in EMPTY_POLICIES:
            raise ValueError(f"protocol.empty_policy: expected one of {EMPTY_POLICIES}, got {self.empty_policy!r}")
        if self.averaging not in AVERAGINGS:
            raise ValueError(f"protocol.averaging: expected one of {AVERAGINGS}, got {self.averaging!r}")
        for field in ("class_rule", "f1_class_rule"):
            if getattr(self, field) not in CLASS_RULES:
                raise ValueError(f"protocol.{field}: expected one of {CLASS_RULES}, got {getattr(self, field)!r}")
        if not 0.5 <= self.iou_threshold < 1:
            raise ValueError(f"protocol.iou_threshold: expected a value in [0.5, 1), got {self.iou_threshold}")
        if self.count_region is not None and (not isinstance(self.count_region, int) or self.count_region <= 0):
            raise ValueError(f"protocol.count_region: expected a positive integer side or None, got {self.count_region!r}")
        if not (math.isfinite(self.eps) and self.eps >= 0):
            raise ValueError(f"protocol.eps: expected a finite value ≥ 0, got {self.eps}")
        if self.detection_radius is None:
            if self.magnification is None and self.mpp is None:
                raise ValueError("protocol: give magnification, mpp or detection_radius (the detection radius depends on it)")
            if self.magnification is not None:
                profile = profile_for(magnification=self.magnification)
            else:
                profile = profile_for(mpp=self.mpp)
            object.__setattr__(self, "detection_radius", float(profile.detection_radius))
        elif not (math.isfinite(self.detection_radius) and self.detection_radius > 0):
            raise ValueError(f"protocol.detection_radius: expected a positive number of pixels, got {self.detection_radius}")

    @classmethod
    def pannuke(cls, split: str = "", magnification: float = 40, **overrides) -> Protocol:
        return cls(**{"name": "pannuke", "split": split, "empty_policy": "nan", "averaging": "tissue",
                      "magnification": magnification, **overrides})

    @classmethod
    def conic(cls, split: str = "", magnification: float = 20, **overrides) -> Protocol:
        return cls(**{"name": "conic", "split": split, "empty_policy": "nan", "averaging": "image",
                      "magnification": magnification, "count_region": 224, **overrides})

    @classmethod
    def cisca(cls, split: str = "", magnification: float = 40, **overrides) -> Protocol:
        return cls(**{"name": "cisca", "split": split, "empty_policy": "skip", "averaging": "tissue",
                      "magnification": magnification, "f1_class_rule": "max", **overrides})

    @classmethod
    def for_dataset(cls, info, preset: str = "custom", split: str = "", **overrides) -> Protocol:
        """Protocol for a prepared dataset (:class:`cellgap.data.prepared.DatasetInfo`): its mpp,
        detection radius and empty-image policy, on top of a preset."""
        base = {"custom": cls, "pannuke": cls.pannuke, "conic": cls.conic, "cisca": cls.cisca}
        if preset not in base:
            raise ValueError(f"protocol preset: expected one of {sorted(base)}, got {preset!r}")
        values = {"split": split, "magnification": info.magnification, "mpp": info.mpp,
                  "detection_radius": info.detection_radius, "empty_policy": info.empty_policy, **overrides}
        return base[preset](**values) if preset != "custom" else cls(**values)

    def with_(self, **changes) -> Protocol:
        return replace(self, **changes)

    def to_json(self) -> dict:
        out = asdict(self)
        out["empty_policy_meaning"] = {
            "skip": "images without GT instances are excluded from every metric, pooled ones included",
            "nan": "images without GT instances get NaN per-image scores (left out of nan-aware means) and count in pooled metrics",
        }[self.empty_policy]
        return out
