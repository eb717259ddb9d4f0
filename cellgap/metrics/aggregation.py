"""Dataset metrics from per-image scores, vectorised over image weights.

Every dataset metric is a function of *weighted sums over images* of per-image columns:

* per-image means (PQ, DQ, SQ, AJI, AJI+, Dice, image mPQ, per-class PQ): Σ w·x / Σ w·[x not NaN];
* tissue means (bPQ, mPQ PanNuke-style): the same per tissue, then the mean (and sample sd) over
  tissues that have at least one scored image;
* pooled metrics (mPQ+ CoNIC-style, detection P/R/F1, HoVer-Net per-class F1, type accuracy): Σ w·counts;
* count R² per class: from Σw, Σw·y, Σw·y² and Σw·(y − ŷ)².

:func:`aggregate` takes a (B, n) weight matrix and returns every metric for each of the B rows at
once: one row of ones gives the plain values, rows of bootstrap counts give bootstrap replicates,
rows of tissue indicators give per-tissue tables, and — since everything is a sum — mixing two runs
image by image (permutation tests) is a weighted sum too (:func:`aggregate_sums`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .classification import pq_from_counts, r2_from_sums, type_f1_scores
from .protocol import Protocol
from .scoring import COUNTS, SCALARS, ImageScore

KEY_METRICS = ("pq", "dq", "sq", "bpq", "mpq", "mpq+", "f1d", "aji", "aji+", "dice", "r2", "type_accuracy")
ALIASES = {"mpq_plus": "mpq+", "mpqplus": "mpq+", "aji_plus": "aji+", "f1_d": "f1d", "f1": "f1d", "mpq_pannuke": "mpq_tissue"}
_MEANS = SCALARS  # per-image means reported as headline metrics


def canonical_metric(name: str) -> str:
    """Normalise a user-facing metric name (``"mPQ+"``, ``"mpq_plus"``, ``"AJI_plus"`` …)."""
    key = str(name).strip().lower()
    return ALIASES.get(key, key)


@dataclass
class ScoreTable:
    """Per-image scores of a dataset as arrays (n images; C classes)."""

    ids: np.ndarray  # (n,) str
    tissues: np.ndarray  # (n,) str
    empty: np.ndarray  # (n,) bool: GT has no instance
    scalars: dict[str, np.ndarray]  # SCALARS + COUNTS, each (n,)
    class_pq: np.ndarray  # (n, C)
    pq_counts: np.ndarray  # (n, C, 4)
    f1_counts: np.ndarray  # (n, C, 5)
    count_gt: np.ndarray  # (n, C)
    count_pred: np.ndarray  # (n, C)
    class_names: tuple[str, ...]

    @classmethod
    def from_scores(cls, scores: list[ImageScore], class_names) -> ScoreTable:
        class_names = tuple(class_names)
        c = len(class_names)
        for s in scores:
            if s.pq_counts.shape != (c, 4):
                raise ValueError(f"image {s.image_id!r}: scored with {s.pq_counts.shape[0]} classes, table has {c} class names")
        n = len(scores)

        def stack(attr, shape):
            return np.array([getattr(s, attr) for s in scores], dtype=np.float64).reshape((n, *shape))

        table = cls(
            ids=np.array([s.image_id for s in scores], dtype=object),
            tissues=np.array([s.tissue for s in scores], dtype=object),
            empty=np.array([s.empty for s in scores], dtype=bool),
            scalars={k: np.array([s.values[k] for s in scores], dtype=np.float64) for k in SCALARS + COUNTS},
            class_pq=stack("class_pq", (c,)),
            pq_counts=stack("pq_counts", (c, 4)),
            f1_counts=stack("f1_counts", (c, 5)),
            count_gt=stack("count_gt", (c,)),
            count_pred=stack("count_pred", (c,)),
            class_names=class_names,
        )
        table.check()
        return table

    def __len__(self) -> int:
        return len(self.ids)

    def check(self) -> None:
        """Counts must be finite; per-image scores may be NaN only where the GT is empty."""
        for key in COUNTS:
            bad = ~np.isfinite(self.scalars[key])
            if bad.any():
                raise ValueError(f"image {self.ids[bad.argmax()]!r}: count {key!r} is not finite")
        for key in SCALARS:
            x = self.scalars[key]
            if np.isinf(x).any():
                raise ValueError(f"image {self.ids[np.isinf(x).argmax()]!r}: score {key!r} is infinite")
            if key != "mpq":
                bad = np.isnan(x) & ~self.empty
                if bad.any():
                    raise ValueError(f"image {self.ids[bad.argmax()]!r}: score {key!r} is NaN although its GT has cells")
        for name, arr in (("pq_counts", self.pq_counts), ("f1_counts", self.f1_counts),
                          ("count_gt", self.count_gt), ("count_pred", self.count_pred)):
            if not np.isfinite(arr).all():
                raise ValueError(f"{name}: NaN or infinite counts")

    def subset(self, index) -> ScoreTable:
        index = np.asarray(index)
        return ScoreTable(self.ids[index], self.tissues[index], self.empty[index],
                          {k: v[index] for k, v in self.scalars.items()}, self.class_pq[index],
                          self.pq_counts[index], self.f1_counts[index], self.count_gt[index],
                          self.count_pred[index], self.class_names)

    @classmethod
    def concat(cls, tables: list[ScoreTable]) -> ScoreTable:
        if not tables:
            raise ValueError("concat: no tables")
        names = tables[0].class_names
        if any(t.class_names != names for t in tables):
            raise ValueError("concat: tables have different class names")
        return cls(np.concatenate([t.ids for t in tables]), np.concatenate([t.tissues for t in tables]),
                   np.concatenate([t.empty for t in tables]),
                   {k: np.concatenate([t.scalars[k] for t in tables]) for k in tables[0].scalars},
                   *(np.concatenate([getattr(t, a) for t in tables]) for a in
                     ("class_pq", "pq_counts", "f1_counts", "count_gt", "count_pred")), names)

    def aligned_with(self, other: ScoreTable) -> ScoreTable:
        """This table's rows in the order of ``other``'s image ids (for paired comparisons)."""
        pos = {i: k for k, i in enumerate(self.ids)}
        if len(pos) != len(self.ids):
            raise ValueError("paired comparison: image ids are not unique")
        missing = [i for i in other.ids if i not in pos]
        if missing or len(other.ids) != len(self.ids):
            raise ValueError(f"paired comparison: the runs scored different images (e.g. {missing[:3] or list(set(self.ids) - set(other.ids))[:3]})")
        aligned = self.subset([pos[i] for i in other.ids])
        if not np.array_equal(aligned.empty, other.empty) or not np.array_equal(aligned.count_gt, other.count_gt):
            raise ValueError("paired comparison: the two runs have different ground truth for the same image ids")
        return aligned


def image_features(table: ScoreTable, protocol: Protocol) -> dict[str, np.ndarray]:
    """Per-image columns (n, k) whose weighted sums determine every metric."""
    included = ~table.empty if protocol.empty_policy == "skip" else np.ones(len(table), bool)
    inc = included.astype(np.float64)[:, None]
    feats: dict[str, np.ndarray] = {"n_included": inc, "n_empty": (table.empty & included)[:, None].astype(np.float64)}
    for key in _MEANS:
        x = table.scalars[key][:, None]
        valid = ~np.isnan(x)
        feats[f"{key}:sum"] = np.where(valid, x, 0.0)
        feats[f"{key}:n"] = valid.astype(np.float64)
    valid = ~np.isnan(table.class_pq)
    feats["class_pq:sum"] = np.where(valid, table.class_pq, 0.0)
    feats["class_pq:n"] = valid.astype(np.float64)
    n, c = table.class_pq.shape
    feats["pq_counts"] = (table.pq_counts * inc[:, :, None]).reshape(n, c * 4)
    feats["f1_counts"] = (table.f1_counts * inc[:, :, None]).reshape(n, c * 5)
    feats["det"] = np.stack([table.scalars[k] for k in ("det_tp", "det_fp", "det_fn")], 1) * inc
    feats["type"] = np.stack([table.scalars["type_paired"], table.scalars["type_correct"]], 1) * inc
    feats["instances"] = np.stack([table.scalars["n_gt"], table.scalars["n_pred"]], 1) * inc
    y, yhat = table.count_gt, table.count_pred
    feats["r2:y"] = y * inc
    feats["r2:yy"] = y * y * inc
    feats["r2:res"] = (y - yhat) ** 2 * inc
    # Tissue means: per-tissue sums of the per-image columns, as extra columns.
    tissues = sorted(set(table.tissues.tolist()))
    onehot = (table.tissues[:, None] == np.array(tissues, dtype=object)[None, :]).astype(np.float64)
    for key in ("pq", "mpq"):
        feats[f"{key}:tissue_sum"] = feats[f"{key}:sum"] * onehot
        feats[f"{key}:tissue_n"] = feats[f"{key}:n"] * onehot
    return feats


def _div(a, b):
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), np.nan)


def _nan_mean_sd(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample sd (ddof=1) along the last axis, ignoring NaN; NaN where nothing is left."""
    k = (~np.isnan(x)).sum(-1)
    s = np.where(np.isnan(x), 0.0, x).sum(-1)
    mean = _div(s, k)
    dev = np.where(np.isnan(x), 0.0, x - mean[..., None]) ** 2
    sd = np.where(k > 1, np.sqrt(_div(dev.sum(-1), np.maximum(k - 1, 1))), np.nan)
    return mean, sd


def aggregate_sums(sums: dict[str, np.ndarray], class_names, protocol: Protocol) -> dict[str, np.ndarray]:
    """Every dataset metric from weighted column sums (each (B, k)); returns name → (B,) arrays."""
    out: dict[str, np.ndarray] = {}
    b = next(iter(sums.values())).shape[0]
    c = len(class_names)
    out["n_images"] = sums["n_included"][:, 0]
    out["n_empty"] = sums["n_empty"][:, 0]
    out["n_gt_instances"], out["n_pred_instances"] = sums["instances"][:, 0], sums["instances"][:, 1]
    for key in _MEANS:
        out[key] = _div(sums[f"{key}:sum"][:, 0], sums[f"{key}:n"][:, 0])
    out["mpq_image"] = out.pop("mpq")
    out["bpq_image"] = out["pq"]
    for key, name in (("pq", "bpq"), ("mpq", "mpq")):
        per_tissue = _div(sums[f"{key}:tissue_sum"], sums[f"{key}:tissue_n"])
        out[f"{name}_tissue"], out[f"{name}_tissue_sd"] = _nan_mean_sd(per_tissue)
    for name in ("bpq", "mpq"):
        out[name] = out[f"{name}_{protocol.averaging}"]
    class_pq = _div(sums["class_pq:sum"], sums["class_pq:n"])
    pooled = sums["pq_counts"].reshape(b, c, 4)
    pq_plus, dq_plus, sq_plus = pq_from_counts(*np.moveaxis(pooled, -1, 0), eps=protocol.eps)
    out["mpq+"] = _nan_mean_sd(pq_plus)[0]
    tp, fp, fn = (sums["det"][:, k] for k in range(3))
    out["f1d"] = _div(2 * tp, 2 * tp + fp + fn)
    out["precision_d"] = _div(tp, tp + fp)
    out["recall_d"] = _div(tp, tp + fn)
    out["type_accuracy"] = _div(sums["type"][:, 1], sums["type"][:, 0])
    f1 = type_f1_scores(sums["f1_counts"].reshape(b, c, 5))
    n = sums["n_included"]
    ss_tot = sums["r2:yy"] - _div(sums["r2:y"] ** 2, n)
    ss_tot = np.maximum(ss_tot, 0.0)
    r2 = np.where(n > 0, r2_from_sums(sums["r2:res"], ss_tot), np.nan)
    out["r2"] = _nan_mean_sd(r2)[0]
    for k, name in enumerate(class_names):
        out[f"pq+/{name}"] = pq_plus[:, k]
        out[f"dq+/{name}"] = dq_plus[:, k]
        out[f"sq+/{name}"] = sq_plus[:, k]
        out[f"pq/{name}"] = class_pq[:, k]
        out[f"f1/{name}"] = f1["f1"][:, k]
        out[f"precision/{name}"] = f1["precision"][:, k]
        out[f"recall/{name}"] = f1["recall"][:, k]
        out[f"r2/{name}"] = r2[:, k]
        out[f"n_gt/{name}"] = pooled[:, k, 0] + pooled[:, k, 2]
        out[f"n_pred/{name}"] = pooled[:, k, 0] + pooled[:, k, 1]
    return out


def weighted_sums(feats: dict[str, np.ndarray], weights: np.ndarray) -> dict[str, np.ndarray]:
    return {k: weights @ v for k, v in feats.items()}


def aggregate(table: ScoreTable, protocol: Protocol, weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Dataset metrics for each row of ``weights`` (B, n); ``None`` = one row of ones (plain values)."""
    if weights is None:
        weights = np.ones((1, len(table)))
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 2 or weights.shape[1] != len(table):
        raise ValueError(f"weights: expected shape (B, {len(table)}), got {weights.shape}")
    return aggregate_sums(weighted_sums(image_features(table, protocol), weights), table.class_names, protocol)


def summarize(table: ScoreTable, protocol: Protocol) -> dict[str, float]:
    """The dataset metrics as plain floats (NaN where undefined)."""
    return {k: float(v[0]) for k, v in aggregate(table, protocol).items()}


def per_tissue(table: ScoreTable, protocol: Protocol) -> dict[str, dict[str, float]]:
    """Every metric computed on each tissue's images alone (tissue → metrics)."""
    tissues = sorted(set(table.tissues.tolist()))
    weights = (table.tissues[None, :] == np.array(tissues, dtype=object)[:, None]).astype(np.float64)
    values = aggregate(table, protocol, weights)
    return {t: {k: float(v[i]) for k, v in values.items()} for i, t in enumerate(tissues)}
