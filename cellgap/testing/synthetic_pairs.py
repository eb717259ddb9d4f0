"""Synthetic GT/prediction label-map pairs with the defects metrics must handle, for tests and benchmarks.

``random_instances`` paints elliptical cells (later cells overwrite earlier ones, so many touch);
``perturb`` turns a GT map into a plausible prediction: boundary shifts, missed cells, false
positives, split and merged cells, single-pixel fragments, and non-sequential ids.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.segmentation import expand_labels


def random_instances(shape, n_cells: int, rng: np.random.Generator, radius=(3.0, 9.0)) -> np.ndarray:
    """An int32 instance map with up to ``n_cells`` ellipses (ids 1..n; overwritten ones may vanish)."""
    h, w = shape
    out = np.zeros((h, w), np.int32)
    for k in range(1, n_cells + 1):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(*radius, size=2)
        y0, y1 = int(max(cy - ry, 0)), int(min(cy + ry + 1, h))
        x0, x1 = int(max(cx - rx, 0)), int(min(cx + rx + 1, w))
        yy, xx = np.ogrid[y0:y1, x0:x1]
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        out[y0:y1, x0:x1][inside] = k
    return out


def random_classes(instances: np.ndarray, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """A class map consistent with ``instances``: one random class 1..C per instance."""
    lut = rng.integers(1, num_classes + 1, size=int(instances.max()) + 1)
    lut[0] = 0
    return lut[instances].astype(np.uint8)


def relabel_randomly(labels: np.ndarray, rng: np.random.Generator, high: int = 60_000) -> np.ndarray:
    """Map ids 1..N to distinct random, non-sequential ids in [1, high)."""
    ids = np.unique(labels[labels > 0])
    if len(ids) == 0:
        return labels.copy()
    new = rng.choice(np.arange(1, high), size=len(ids), replace=False)
    lut = np.zeros(int(labels.max()) + 1, np.int64)
    lut[ids] = new
    return lut[labels].astype(np.int32)


def perturb(gt: np.ndarray, rng: np.random.Generator, p_drop=0.1, p_split=0.1, p_merge=0.1, n_false=2,
            n_specks=1, grow: int | None = None) -> np.ndarray:
    """A prediction derived from ``gt`` with the usual segmentation errors (ids stay < 2**31)."""
    pred = gt.astype(np.int64).copy()
    ids = np.unique(pred[pred > 0])
    next_id = int(pred.max()) + 1
    # Boundary errors: grow everything by a pixel, or erode a random subset of cells by one pixel.
    grow = rng.integers(0, 2) if grow is None else grow
    if grow:
        pred = expand_labels(pred, 1)
    else:
        edge = (ndimage.grey_dilation(pred, size=3) != ndimage.grey_erosion(pred, size=3)) & (pred > 0)
        eroded_ids = ids[rng.random(len(ids)) < 0.5]
        pred[edge & np.isin(pred, eroded_ids)] = 0
    boxes = ndimage.find_objects(pred)
    for i in ids:
        box = boxes[i - 1] if i - 1 < len(boxes) else None
        if box is None:
            continue
        box = tuple(slice(max(b.start - 1, 0), b.stop + 1) for b in box)  # one pixel of context for neighbours
        window = pred[box]
        mask = window == i
        if not mask.any():
            continue
        u = rng.random()
        if u < p_drop:
            window[mask] = 0
        elif u < p_drop + p_split:  # cut along the centroid column
            cols = np.nonzero(mask)[1]
            window[mask & (np.arange(window.shape[1])[None, :] > cols.mean())] = next_id
            next_id += 1
        elif u < p_drop + p_split + p_merge:  # merge with a touching neighbour
            ring = ndimage.binary_dilation(mask) & ~mask & (window > 0)
            if ring.any():
                other = window[ring][0]
                obox = boxes[other - 1] if other - 1 < len(boxes) and boxes[other - 1] is not None else None
                region = pred[obox] if obox is not None else pred
                region[region == other] = i
    for cell in (random_instances(pred.shape, n_false, rng, radius=(2.0, 5.0)), ):
        free = (cell > 0) & (pred == 0)
        pred[free] = cell[free] + next_id
        next_id += n_false + 1
    for _ in range(n_specks):
        r, c = rng.integers(0, pred.shape[0]), rng.integers(0, pred.shape[1])
        if pred[r, c] == 0:
            pred[r, c] = next_id
            next_id += 1
    return pred.astype(np.int32)


def perturb_classes(pred: np.ndarray, gt_classes: np.ndarray, num_classes: int, rng: np.random.Generator,
                    p_wrong: float = 0.2) -> np.ndarray:
    """A class map for ``pred``: each predicted instance takes the majority GT class under it (a random
    class where it covers none), changed to a random class with probability ``p_wrong``."""
    n = int(pred.max()) + 1
    hist = np.bincount(pred.ravel().astype(np.int64) * (num_classes + 1) + gt_classes.ravel(),
                       minlength=n * (num_classes + 1)).reshape(n, num_classes + 1)[:, 1:]
    cls = np.where(hist.any(1), hist.argmax(1) + 1, rng.integers(1, num_classes + 1, size=n))
    wrong = rng.random(n) < p_wrong
    cls[wrong] = rng.integers(1, num_classes + 1, size=int(wrong.sum()))
    cls[0] = 0
    return cls[pred].astype(np.uint8)
