"""CISCA training targets from an instance map (METHOD.md §1).

* :func:`contour_levels` — the 4-level "graymask4" map (§1.2): 0 boundary between touching cells,
  1 body, 2 background, 3 gap.
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

from __future__ import annotations

from collections.abc import Hashable, Mapping
from functools import lru_cache

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.utils import convert_to_dst_type
from scipy import ndimage as ndi
from skimage.measure import label as connected_components

from .magnification import MagnificationProfile, disk, profile_for

BOUNDARY, BODY, BACKGROUND, GAP = 0, 1, 2, 3
CONTOUR_CLASS_COUNTS = (2, 3, 4)
DISTANCE_MODES = ("fullrange", "tips")
INSTANCE_CLASS_RULES = ("majority", "max")
BACKGROUND_WEIGHT = 0.05
# Sample keys of a stored tile's contour-level map and of the profile it was computed with.
CONTOUR_LEVELS_KEY = "contour_levels"
CONTOUR_PROFILE_KEY = "contour_levels_profile"
# Diagonal border width of the "tips" maps, relative to the h/v border (METHOD.md §1.4).
TIPS_DIAGONAL_FACTOR = 1.4
# §1.2 step 8: gap components below 3 px, body and boundary components below 2 px are cleaned up.
MIN_GAP_COMPONENT = 3
MIN_BODY_COMPONENT = 2
MIN_BOUNDARY_COMPONENT = 2

# Neighbour offsets (row, col) of 4- and 8-connectivity.
FOUR_CONNECTED = np.array([(-1, 0), (0, -1), (0, 1), (1, 0)])
EIGHT_CONNECTED = np.array([(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)])

# Level → K-class index (METHOD.md §1.3); levels are 0 boundary, 1 body, 2 background, 3 gap.
_LEVEL_TO_CLASS = {
    2: np.array([0, 0, 1, 1], dtype=np.uint8),
    3: np.array([0, 1, 2, 2], dtype=np.uint8),
    4: np.array([0, 1, 2, 3], dtype=np.uint8),
}


# --------------------------------------------------------------------------------------------
# Input checks


def _instance_map(label, name: str = "label") -> np.ndarray:
    """Return ``label`` as a 2-D integer numpy array, or raise naming ``name`` and what was expected."""
    if isinstance(label, torch.Tensor):
        label = label.detach().cpu().numpy()
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (H, W) instance map, got shape {label.shape}")
    if label.dtype == bool:
        return label.astype(np.int32)
    if label.dtype.kind in "iu":
        if label.dtype.kind == "i" and label.size and label.min() < 0:
            raise ValueError(f"{name}: expected an instance map with ids ≥ 0 (0 = background), found negative id {label.min()}")
        return label
    if label.dtype.kind == "f":
        with np.errstate(invalid="ignore"):  # NaN, inf and out-of-range values fail the check below
            ints = label.astype(np.int32)
        # Compared in the label's own float dtype (exact for int32 values): no float64 temporaries.
        if label.size and ints.min() >= 0 and np.array_equal(ints.astype(label.dtype), label):
            return ints
        if not np.all(np.isfinite(label)):
            raise ValueError(f"{name}: expected an integer-valued instance map, found NaN or infinite values")
        if not np.array_equal(label, np.round(label)):
            raise ValueError(
                f"{name}: expected an integer-valued instance map, found non-integer values (e.g. interpolated labels)"
            )
        if label.size and label.min() < 0:
            raise ValueError(f"{name}: expected an instance map with ids ≥ 0 (0 = background), found negative id {label.min()}")
        return label.astype(np.int64)
    raise TypeError(f"{name}: expected an integer instance map, got dtype {label.dtype}")


def _compact_ids(label: np.ndarray) -> tuple[np.ndarray, int]:
    """Map the ids of ``label`` to a small non-negative range, so that per-id arrays stay short.

    Returns (map with ids in 0..n, n). Consecutive maps (the usual case) pass through unchanged.
    """
    top = int(label.max()) if label.size else 0
    if top <= 4 * label.size + 16:
        return label, top
    return _dense_ids(label)


# --------------------------------------------------------------------------------------------
# Morphology with structuring elements decomposed into rectangles


@lru_cache(maxsize=64)
def _rectangles_of(shape: tuple[int, int], bits: bytes) -> tuple[tuple[int, int], ...] | None:
    footprint = np.frombuffer(bits, dtype=bool).reshape(shape)
    height, width = shape
    if height % 2 == 0 or width % 2 == 0:
        return None
    widths = footprint.sum(axis=1)
    sizes = set()
    for w in sorted(set(widths.tolist()) - {0}):
        rows = np.flatnonzero(widths >= w)
        sizes.add((int(rows.size), int(w)))
    union = np.zeros_like(footprint)
    for h, w in sizes:
        r0, c0 = (height - h) // 2, (width - w) // 2
        union[r0 : r0 + h, c0 : c0 + w] = True
    return tuple(sorted(sizes)) if np.array_equal(union, footprint) else None


def _rectangles(footprint: np.ndarray) -> tuple[tuple[int, int], ...] | None:
    """Centred rectangles whose union is ``footprint`` (None if it is not such a union).

    All structuring elements of the method (squares, crosses, diamonds, disks) are unions of a few
    centred rectangles, and a max/min filter over a union is the max/min over the rectangles. Each
    rectangle filter is separable, whereas a footprint filter costs O(|SE|) per pixel.
    """
    footprint = np.ascontiguousarray(footprint, dtype=bool)
    return _rectangles_of(footprint.shape, footprint.tobytes())


def _running(flat: np.ndarray, size: int, step: int, op) -> np.ndarray:
    """``op`` over the windows flat[i], flat[i + step], …, flat[i + (size-1)·step], by doubling."""
    current, width = flat, 1
    while 2 * width <= size:
        current = op(current[: -width * step], current[width * step :])
        width *= 2
    if width < size:
        shift = (size - width) * step
        current = op(current[:-shift], current[shift:])
    return current


def _rank_filter(image: np.ndarray, footprint: np.ndarray, maximum: bool, mode: str, cval=0) -> np.ndarray:
    """Max or min filter of a 2-D image over ``footprint`` ("constant" or "reflect" border).

    Hand-written because scipy's rank filters copy every line into a double buffer and are
    several times slower than these whole-array numpy passes on 256² tiles. The footprint is
    split into centred rectangles; each is filtered separably on the padded, flattened image by
    doubling windows (log2 passes per axis), widths grown from the previous rectangle's.
    """
    rectangles = _rectangles(footprint)
    if rectangles is None:
        rank = ndi.maximum_filter if maximum else ndi.minimum_filter
        return rank(image, footprint=footprint, mode=mode, cval=cval)
    op = np.maximum if maximum else np.minimum
    height, width = image.shape
    pad_rows = max(h for h, _ in rectangles) // 2
    pad_cols = max(w for _, w in rectangles) // 2
    if mode not in ("constant", "reflect"):
        raise ValueError(f"mode: expected 'constant' or 'reflect', got {mode!r}")
    if mode == "reflect" and (pad_rows > height or pad_cols > width):
        padded = np.pad(image, ((pad_rows, pad_rows), (pad_cols, pad_cols)), mode="symmetric")  # = scipy "reflect"
    else:
        padded = np.full((height + 2 * pad_rows, width + 2 * pad_cols), cval, dtype=image.dtype)
        padded[pad_rows : pad_rows + height, pad_cols : pad_cols + width] = image
        if mode == "reflect":  # mirror including the edge pixel (d c b a | a b c d), as np.pad "symmetric"
            padded[:pad_rows] = padded[pad_rows : 2 * pad_rows][::-1]
            padded[pad_rows + height :] = padded[height : pad_rows + height][::-1]
            padded[:, :pad_cols] = padded[:, pad_cols : 2 * pad_cols][:, ::-1]
            padded[:, pad_cols + width :] = padded[:, width : pad_cols + width][:, ::-1]
    stride = width + 2 * pad_cols
    flat = padded.ravel()
    by_width, previous = {}, None
    for w in sorted({w for _, w in rectangles}):
        # window [i, i+w) from the previous window [i, i+w_prev): extend by w - w_prev.
        by_width[w] = _running(flat, w, 1, op) if previous is None else _running(by_width[previous], w - previous + 1, 1, op)
        previous = w
    length = (height - 1) * stride + width
    result = None
    for h, w in rectangles:
        windows = _running(by_width[w], h, stride, op)
        start = pad_rows * stride + pad_cols - w // 2 - (h // 2) * stride  # window start of pixel (0, 0)
        aligned = windows[start : start + length]
        result = aligned.copy() if result is None else op(result, aligned, out=result)
    out = np.empty((height, stride), dtype=image.dtype)
    out.ravel()[:length] = result
    return out[:, :width]


def _dilate(mask: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """Binary dilation; nothing enters from outside the image."""
    return _rank_filter(mask, footprint, True, "constant", False)


def _erode(mask: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """Binary erosion; the image border does not erode (as skimage's binary_erosion)."""
    return _rank_filter(mask, footprint, False, "constant", True)


def _enclosed(outside: np.ndarray, reach: int) -> np.ndarray:
    """True where, in each of the four axis directions, ``outside`` or the image border lies
    within ``reach`` steps."""
    height, width = outside.shape
    padded = np.ones((height + 2 * reach, width + 2 * reach), dtype=bool)
    padded[reach : reach + height, reach : reach + width] = outside
    stride = width + 2 * reach
    flat = padded.ravel()
    along_row = _running(flat, reach, 1, np.logical_or)  # window [i, i + reach)
    along_column = _running(flat, reach, stride, np.logical_or)
    origin, length = reach * stride + reach, (height - 1) * stride + width
    enclosed = along_row[origin - reach : origin - reach + length] & along_row[origin + 1 : origin + 1 + length]
    enclosed &= along_column[origin - reach * stride : origin - reach * stride + length]
    enclosed &= along_column[origin + stride : origin + stride + length]
    out = np.empty((height, stride), dtype=bool)
    out.ravel()[:length] = enclosed
    return out[:, :width]


def _components_below(mask: np.ndarray, size: int, connectivity: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` whose connected component has < ``size`` pixels.

    ``connectivity`` is FOUR_CONNECTED or EIGHT_CONNECTED (neighbour offsets).

    Hand-written instead of labelling the whole image with scipy (measured slower on 256² tiles,
    and this runs up to nine times per tile): a component of fewer than ``size`` pixels ends
    within ``size - 1`` steps in every axis direction, so only those few candidate pixels are
    grouped, by min-label propagation over a pixel list. ``size - 2`` rounds settle every such
    component; a group is kept when it is closed (no neighbour in another group or in the rest
    of the mask) and small.
    """
    if size <= 1 or not mask.any():
        return np.zeros(mask.shape, dtype=bool)
    if size <= 3 and (size == 2 or len(connectivity) == 4):
        return _tiny_components(mask, size, len(connectivity) == 8)
    candidates = mask & _enclosed(~mask, size - 1)
    pixels = np.flatnonzero(candidates)
    if pixels.size == 0:
        return np.zeros(mask.shape, dtype=bool)
    height, width = mask.shape
    rows, cols = np.divmod(pixels, width)
    r, c = rows + connectivity[:, :1], cols + connectivity[:, 1:]  # (n, k): one row per neighbour
    inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)
    flat = np.where(inside, r * width + c, 0)
    position = np.minimum(np.searchsorted(pixels, flat), pixels.size - 1)
    is_candidate = inside & (pixels[position] == flat)
    escapes = (inside & mask.ravel()[flat] & ~is_candidate).any(axis=0)
    itself = np.arange(pixels.size)
    neighbours = np.where(is_candidate, position, itself)  # (n, k); itself where there is none
    group = itself
    for _ in range(size - 2):
        updated = np.minimum(group, group[neighbours].min(axis=0))
        updated = updated[updated]  # pointer jumping: only speeds up the propagation
        if not (updated != group).any():  # settled everywhere, not just in the small components
            break
        group = updated
    open_group = np.zeros(pixels.size, dtype=bool)
    open_group[group[escapes | (group[neighbours] != group).any(axis=0)]] = True
    small = ~open_group[group] & (np.bincount(group, minlength=pixels.size)[group] < size)
    out = np.zeros(height * width, dtype=bool)
    out[pixels[small]] = True
    return out.reshape(height, width)


def _tiny_components(mask: np.ndarray, size: int, eight: bool) -> np.ndarray:
    """Pixels of ``mask`` in components of 1 pixel (size 2) or of 1-2 pixels (size 3, 4-connected).

    Whole-array neighbour counts instead of the pixel-list grouping of ``_components_below``:
    about 30 µs instead of 160-290 µs per 256² call; the clean-up rules and the 20x hole and
    fragment sizes are this small.
    """
    height, width = mask.shape
    padded = np.zeros((height + 2, width + 2), dtype=bool)
    padded[1:-1, 1:-1] = mask
    shifts = [(0, 1), (1, 0), (1, 2), (2, 1)]
    if eight:
        shifts += [(0, 0), (0, 2), (2, 0), (2, 2)]
    if size == 2:
        neighbour = np.zeros((height, width), dtype=bool)
        for r, c in shifts:
            neighbour |= padded[r : r + height, c : c + width]
        return mask & ~neighbour
    count = np.zeros((height, width), dtype=np.uint8)
    for r, c in shifts:
        count += padded[r : r + height, c : c + width]
    single = mask & (count == 0)
    # A pair: two adjacent pixels that each have exactly one neighbour (necessarily each other).
    one = mask & (count == 1)
    pair = one[:, :-1] & one[:, 1:]
    single[:, :-1] |= pair
    single[:, 1:] |= pair
    pair = one[:-1] & one[1:]
    single[:-1] |= pair
    single[1:] |= pair
    return single


def _dilate_square3(mask: np.ndarray) -> np.ndarray:
    """Binary dilation by the 3×3 square (8-neighbourhood), in four whole-array ORs."""
    height, width = mask.shape
    padded = np.zeros((height + 2, width + 2), dtype=bool)
    padded[1:-1, 1:-1] = mask
    rows = padded[:, :-2] | padded[:, 1:-1]
    rows |= padded[:, 2:]
    out = rows[:-2] | rows[1:-1]
    out |= rows[2:]
    return out


def _reconstruct(seed: np.ndarray, mask: np.ndarray, max_rounds: int = 24) -> np.ndarray:
    """Morphological reconstruction by dilation of ``seed`` under ``mask`` (8-connectivity): the
    8-connected components of ``mask`` that contain a seed pixel.

    Geodesic 3×3 dilations until stable: the thin-region residues are short, so a few rounds of
    ~20 µs replace a labelling of the whole image (~0.4 ms per 256² tile); after ``max_rounds``
    it labels the mask instead.
    """
    grown, count = seed & mask, -1
    for _ in range(max_rounds):
        new_count = int(np.count_nonzero(grown))
        if new_count == count:
            return grown
        count = new_count
        grown = _dilate_square3(grown)
        grown &= mask
    components, total = ndi.label(mask, structure=np.ones((3, 3), dtype=bool))
    survives = np.zeros(total + 1, dtype=bool)
    survives[components[seed & mask]] = True
    survives[0] = False
    return survives[components]


def _near(mask: np.ndarray, pixels: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """For each flat pixel index, whether ``mask`` holds inside its ``footprint`` neighbourhood:
    ``_dilate(mask, footprint)`` read at a few pixels without filtering the whole image."""
    height, width = mask.shape
    center_row, center_col = footprint.shape[0] // 2, footprint.shape[1] // 2
    offset_rows, offset_cols = np.nonzero(footprint)
    rows, cols = np.divmod(pixels, width)
    r = rows[:, None] + (offset_rows - center_row)[None, :]
    c = cols[:, None] + (offset_cols - center_col)[None, :]
    inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)
    return (inside & mask[np.clip(r, 0, height - 1), np.clip(c, 0, width - 1)]).any(axis=1)


def _fill_holes(mask: np.ndarray, max_area: int) -> np.ndarray:
    """Fill 4-connected holes of area < ``max_area`` (skimage ``remove_small_holes`` semantics:
    any small component of the complement counts, also one that touches the image border)."""
    return mask | _components_below(~mask, max_area, FOUR_CONNECTED)


def _touching(label: np.ndarray, foreground: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """Foreground pixels with a *different* instance inside their ``footprint`` neighbourhood.

    Equal to summing per-instance dilations and taking ``> 1`` on the foreground (§1.2 step 3),
    but without a loop over instances: the neighbourhood holds another id exactly when its
    maximum id (background 0) or its minimum id (background +inf) differs from the pixel's own.
    """
    highest = _rank_filter(label, footprint, True, "constant", 0)
    background_high = np.where(foreground, label, np.iinfo(label.dtype).max)
    lowest = _rank_filter(background_high, footprint, False, "constant", np.iinfo(label.dtype).max)
    return foreground & (highest != lowest)


def _small_id_dtype(label: np.ndarray) -> np.ndarray:
    top = int(label.max()) if label.size else 0
    for dtype in (np.uint8, np.uint16, np.uint32):
        if top < np.iinfo(dtype).max:
            return label.astype(dtype, copy=False)
    return label.astype(np.uint64, copy=False)


# --------------------------------------------------------------------------------------------
# Contour target


def contour_levels(label: np.ndarray, profile: MagnificationProfile) -> np.ndarray:
    """The 4-level contour map ("graymask4") of METHOD.md §1.2.

    Args:
        label: (H, W) instance map, 0 = background, 1..N cells (any ids ≥ 0).
        profile: magnification profile giving the structuring elements, fragment sizes and hole area.

    Returns:
        (H, W) uint8 with 0 = boundary between touching (or nearly touching) cells, 1 = body,
        2 = background, 3 = gap (narrow background between close cells, small concavities).
        Computed on the array given (no tiling, METHOD.md §10.16). As skimage's grey closing,
        the gap closing mirrors the image at its border, so a background strip narrower than
        about the SE_gap radius between a cell and the border is gap too (K=4 only; K=2, 3 merge
        gap into background).
    """
    label = _small_id_dtype(_instance_map(label))
    foreground = label > 0
    background = ~foreground
    hole_area = profile.max_hole_area

    # Step 2: gaps = background filled by a grey closing of the label image. For the test "J > 0"
    # this equals a binary closing of the foreground (flat morphology commutes with thresholding);
    # reflect mode at the border as skimage's grey closing.
    closed = _rank_filter(_rank_filter(foreground, profile.se_gap, True, "reflect"), profile.se_gap, False, "reflect")
    levels = np.full(label.shape, BODY, dtype=np.uint8)
    levels[background] = BACKGROUND
    levels[background & closed] = GAP

    # Steps 3-4: touching cells, then small holes filled.
    boundary = _fill_holes(_touching(label, foreground, profile.se_boundary), hole_area)
    boundary_large = _fill_holes(_touching(label, foreground, profile.se_boundary_large), hole_area)

    # Step 5: thicken small fragments (and the filled holes outside the cells) into the cells.
    for min_size, footprint in (
        (profile.fragment_size_1, profile.se_fragment_1),
        (profile.fragment_size_2, profile.se_fragment_2),
    ):
        inside = boundary & foreground
        small = boundary & ~(inside & ~_components_below(inside, min_size, FOUR_CONNECTED))
        if small.any():
            added = _dilate(small, footprint) & foreground & ~boundary
            if added.any():  # otherwise B is unchanged and its holes are already filled
                boundary = _fill_holes(boundary | added, hole_area)
    levels[boundary] = BOUNDARY

    # Step 7: near-contact regions so thin that they vanish under erosion (reconstruction by
    # dilation with skimage's default 8-connectivity keeps every component that keeps a pixel).
    if boundary_large.any():
        levels[boundary_large & ~_reconstruct(_erode(boundary_large, profile.se_thin), boundary_large)] = BOUNDARY

    # Step 8: clean-up, in order; "near" is recomputed after each change of the boundary.
    for value, min_size in ((GAP, MIN_GAP_COMPONENT), (BODY, MIN_BODY_COMPONENT)):
        small = np.flatnonzero(_components_below(levels == value, min_size, FOUR_CONNECTED))
        if small.size:
            levels.ravel()[small[_near(levels == BOUNDARY, small, profile.se_boundary)]] = BOUNDARY
    levels[_components_below(levels == BOUNDARY, MIN_BOUNDARY_COMPONENT, EIGHT_CONNECTED)] = BODY
    return levels


def contour_classes(levels: np.ndarray, num_contour_classes: int = 3) -> np.ndarray:
    """Merge the 4-level map into the K-class index map (METHOD.md §1.3).

    K=3: 0 boundary, 1 body, 2 background + gap. K=2: 0 foreground (boundary + body),
    1 background + gap. K=4: the levels unchanged.
    """
    if num_contour_classes not in _LEVEL_TO_CLASS:
        raise ValueError(f"num_contour_classes: expected one of {CONTOUR_CLASS_COUNTS}, got {num_contour_classes!r}")
    levels = np.asarray(levels)
    if levels.dtype.kind not in "iu" or (levels.size and (levels.min() < 0 or levels.max() > GAP)):
        raise ValueError(f"levels: expected an integer map with values in 0..3 (contour_levels output), got dtype {levels.dtype}")
    return _LEVEL_TO_CLASS[num_contour_classes][levels]


# --------------------------------------------------------------------------------------------
# Directional distance maps


def _normalised(value: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Map ``value`` from [low, high] to [-1, 1]; -1 where the range is empty."""
    span = high - low
    return np.where(span > 0, 2.0 * (value - low) / np.maximum(span, 1) - 1.0, -1.0)


def _tips_profile(offset: np.ndarray, extent: np.ndarray, border: int) -> np.ndarray:
    """h/v of the tips maps: a ramp over the first and last ``border`` rows/columns, 0 between."""
    d = np.where(
        offset < border,
        offset / (2 * border),
        np.where(offset >= extent - border, (border + 1 + offset - (extent - border)) / (2 * border), 0.5),
    )
    tips = 2.0 * d - 1.0
    return np.where(extent > 2 * border, tips, _normalised(offset, 0, extent - 1))


def _tips_diagonal(s: np.ndarray, low: np.ndarray, high: np.ndarray, border: float) -> np.ndarray:
    """Diagonal of the tips maps: a ramp over ``border`` at each end of the s-range, flat between.

    d runs 0..2·border and both ends are attained by the instance, so its min–max normalisation
    is d / (2·border).
    """
    d = np.where(s <= low + border, s - low, np.where(s >= high - border, s - high + 2 * border, border))
    return np.where(high - low > 2 * border, d / border - 1.0, _normalised(s, low, high))


def distance_maps(label: np.ndarray, mode: str = "fullrange", profile: MagnificationProfile | None = None) -> np.ndarray:
    """Directional maps [h, v, tl, bl] of METHOD.md §1.4, float32 (4, H, W).

    Per instance, h runs linearly from -1 (leftmost column) to +1 (rightmost), v from -1 (top
    row) to +1 (bottom), tl along row+col and bl along col-row, each normalised to exactly
    [-1, 1] over the instance's own pixels. Instances whose bounding box is 1 px high or wide are
    0 in all four maps; a diagonal with a single value of row±col is -1; background is 0.

    Args:
        label: (H, W) instance map.
        mode: "fullrange" (default, METHOD.md §10.1) or "tips", the reference's on-the-fly
            training variant: h/v ramp only over the first and last ``profile.tips_border``
            rows/columns of instances wider than twice that, diagonals likewise with 1.4× the
            border. The two agree for nuclei-sized cells.
        profile: magnification profile; needed for ``mode="tips"``.
    """
    if mode not in DISTANCE_MODES:
        raise ValueError(f"mode: expected one of {DISTANCE_MODES}, got {mode!r}")
    if mode == "tips" and profile is None:
        raise ValueError("profile: mode='tips' needs a MagnificationProfile for its border width (profile.tips_border)")
    label, count = _compact_ids(_instance_map(label))
    height, width = label.shape
    maps = np.zeros((4, height, width), dtype=np.float32)
    if count == 0:
        return maps
    if count > _MAX_TABLE_IDS:  # many distinct ids: keep the per-id tables short
        label, count = _dense_ids(label)
    lows, highs = _coordinate_extremes(label, count)
    skipped = (highs[0] <= lows[0]) | (highs[1] <= lows[1])  # bounding box 1 px wide or high (or absent id)
    lows[:, skipped] = 0
    highs[:, skipped] = 0
    # Each map is a function of (instance, coordinate) only: tabulate it for each instance over its
    # own coordinate range (the same float64 formula per value as per pixel), then gather once per
    # pixel. About 0.6 instead of 1.5-2 ms per crowded 256² tile at 40x (per-pixel gathers/scatters).
    length = height + width - 1  # table columns, enough for every coordinate
    first = (0, 0, 0, -(height - 1))  # coordinate of table column 0 (bl = col - row can be negative)
    kept = np.flatnonzero(~skipped)
    base = label.astype(np.intp) * length
    index = np.empty_like(base)
    for channel in range(4):
        low, high = lows[channel][kept], highs[channel][kept]
        extent = high - low + 1
        owner = np.repeat(np.arange(kept.size), extent)  # table entry → instance (position in kept)
        coordinate = np.arange(owner.size) + (low - (np.cumsum(extent) - extent))[owner]
        if mode == "fullrange":
            span = high - low
            scale = np.where(span > 0, 2.0 / np.maximum(span, 1), 0.0)
            offset = np.where(span > 0, -1.0 - np.where(span > 0, low, 0) * scale, -1.0)
            values = scale[owner] * coordinate + offset[owner]
        elif channel < 2:
            values = _tips_profile(coordinate - low[owner], extent[owner], profile.tips_border)
        else:
            values = _tips_diagonal(coordinate, low[owner], high[owner], TIPS_DIAGONAL_FACTOR * profile.tips_border)
        table = np.zeros((count + 1) * length, dtype=np.float32)  # background and skipped ids: 0
        table[kept[owner] * length + (coordinate - first[channel])] = values
        np.add(base, _coordinate_grids(height, width)[channel], out=index)
        np.take(table, index, out=maps[channel], mode="clip")  # mode "raise" with out= is 3× slower
    return maps


# Above this many ids, distance_maps renumbers them densely first (its tables have one row per id).
_MAX_TABLE_IDS = 4096


def _dense_ids(label: np.ndarray) -> tuple[np.ndarray, int]:
    """Renumber the ids of ``label`` to 0..n in increasing order (0 stays 0)."""
    ids, inverse = np.unique(label, return_inverse=True)
    if ids[0] != 0:
        inverse = inverse + 1
    inverse = inverse.reshape(label.shape)
    return inverse, int(inverse.max())


@lru_cache(maxsize=32)
def _coordinate_grids(height: int, width: int) -> np.ndarray:
    """(4, H, W) table columns of each pixel: col, row, row + col, col - row + H - 1."""
    rows, cols = np.indices((height, width), dtype=np.intp)
    grids = np.stack([cols, rows, rows + cols, cols - rows + height - 1])
    grids.flags.writeable = False
    return grids


def _coordinate_extremes(label: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-id min and max of col, row, row + col and col - row, each (4, count + 1) intp.

    Only the instances' edge pixels (a 4-neighbour of another id, or the image border) are
    visited: a linear coordinate cannot be extreme at an interior pixel, whose four neighbours
    include a smaller and a larger value. Absent ids keep low > high.
    """
    height, width = label.shape
    small = _small_id_dtype(label)  # comparisons on uint8 rather than int64
    edge = np.zeros((height, width), dtype=bool)
    edge[[0, -1], :] = True
    edge[:, [0, -1]] = True
    vertical = small[1:] != small[:-1]
    edge[1:] |= vertical
    edge[:-1] |= vertical
    horizontal = small[:, 1:] != small[:, :-1]
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    edge &= small > 0
    pixels = np.flatnonzero(edge)
    ids = small.ravel()[pixels].astype(np.intp)
    rows, cols = np.divmod(pixels, width)
    lows = np.full((4, count + 1), np.iinfo(np.intp).max, dtype=np.intp)
    highs = np.full((4, count + 1), np.iinfo(np.intp).min, dtype=np.intp)
    for channel, coordinate in enumerate((cols, rows, rows + cols, cols - rows)):
        np.minimum.at(lows[channel], ids, coordinate)
        np.maximum.at(highs[channel], ids, coordinate)
    return lows, highs


# --------------------------------------------------------------------------------------------
# Weight mask and classes


def _check_radius(name: str, radius) -> None:
    if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)) or radius < 0:
        raise ValueError(f"{name}: expected an integer ≥ 0 (pixels), got {radius!r}")


def weight_mask(label: np.ndarray, radius: int = 6) -> np.ndarray:
    """Regression weight mask of METHOD.md §1.6, float32 (H, W): 1.0 on cells and within
    ``radius`` px (Euclidean disk dilation) of any cell, 0.05 elsewhere."""
    _check_radius("radius", radius)
    near = _dilate(_instance_map(label) > 0, disk(radius))
    return np.where(near, np.float32(1.0), np.float32(BACKGROUND_WEIGHT))  # float32 already: no copy


def class_map_from_instances(label: np.ndarray, classes_by_id: Mapping[int, int]) -> np.ndarray:
    """Per-pixel class map (uint8, 0 = background) painting each instance with its class.

    Every instance id of ``label`` must be in ``classes_by_id``; ids of the mapping absent from
    ``label`` are ignored. Classes must lie in 0..255.
    """
    label = _instance_map(label)
    present = np.unique(label)
    present = present[present > 0]
    missing = [int(i) for i in present if int(i) not in classes_by_id]
    if missing:
        raise ValueError(f"classes_by_id: no class for instance ids {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    classes = np.zeros(present.size + 1, dtype=np.int64)
    for position, instance in enumerate(present, start=1):
        value = classes_by_id[int(instance)]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= 255:
            raise ValueError(f"classes_by_id[{int(instance)}]: expected a class id in 0..255, got {value!r}")
        classes[position] = value
    positions = np.searchsorted(present, label)  # background 0 → 0 (all present ids are > 0)
    positions = np.where(label > 0, positions + 1, 0)
    return classes[positions].astype(np.uint8)


def instance_classes(label: np.ndarray, class_map: np.ndarray, rule: str = "majority") -> dict[int, int]:
    """Class of each instance of ``label`` from a per-pixel ``class_map`` (0 = background).

    rule="majority": the class held by most of the instance's pixels, ties to the lower class id;
    background-class pixels do not vote, an instance without any classed pixel gets 0.
    rule="max": the largest class id inside the instance (the F1 convention of METHOD.md §10.13).
    """
    if rule not in INSTANCE_CLASS_RULES:
        raise ValueError(f"rule: expected one of {INSTANCE_CLASS_RULES}, got {rule!r}")
    label = _instance_map(label)
    class_map = _instance_map(class_map, "class_map")
    if class_map.shape != label.shape:
        raise ValueError(f"class_map: expected the shape of label {label.shape}, got {class_map.shape}")
    ids, compact = np.unique(label, return_inverse=True)
    compact = compact.reshape(label.shape)
    if ids.size == 0 or (ids.size == 1 and ids[0] == 0):
        return {}
    count = ids.size
    inside = label > 0
    members = compact[inside]
    member_classes = class_map[inside].astype(np.int64)
    if rule == "max":
        best = np.zeros(count, dtype=np.int64)
        np.maximum.at(best, members, member_classes)
    else:
        num_classes = int(class_map.max()) + 1
        votes = np.bincount(members * num_classes + member_classes, minlength=count * num_classes)
        votes = votes.reshape(count, num_classes)
        votes[:, 0] = 0  # background-class pixels do not vote
        best = np.where(votes.any(axis=1), votes.argmax(axis=1), 0)
    return {int(i): int(c) for i, c in zip(ids, best) if i > 0}


# --------------------------------------------------------------------------------------------
# MONAI dictionary transform


def _channel_map(value, key: str) -> np.ndarray:
    """(1, H, W) tensor/array → (H, W) numpy, with a message naming ``key`` otherwise."""
    array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if array.ndim != 3 or array.shape[0] != 1:
        raise ValueError(f"{key}: expected a (1, H, W) map, got shape {tuple(array.shape)}")
    return _instance_map(array[0], key)


class DenseTargets:
    """``distance_target`` and ``weight_mask`` of a batch, computed where the batch is (on a GPU, off the loader
    workers) from its relabelled instance maps: bit-equal to :func:`distance_maps` ("fullrange") and
    :func:`weight_mask` of each map.

    The bundles' ``targets_on_device`` sends the (B, 1, H, W) int32 ``label`` instead of these two targets (393
    fewer KB per 256² tile through the workers' shared memory, and ≈1 ms less of a worker's CPU) and
    ``cellgap.training.PrepareCISCABatch`` calls this on the device. Torch has no per-instance reduction of its
    own for the maps' extremes, so they are ``scatter_reduce`` over the pixels.
    """

    def __init__(self, weight_radius: int = 6) -> None:
        _check_radius("weight_radius", weight_radius)
        self.disk = torch.from_numpy(disk(weight_radius)).float()[None, None]

    def __call__(self, label: torch.Tensor) -> dict[str, torch.Tensor]:
        if label.ndim != 4 or label.shape[1] != 1 or label.is_floating_point():
            raise ValueError(f"label: expected (B, 1, H, W) integer instance maps, got {tuple(label.shape)} {label.dtype}")
        return {"distance_target": self.distance(label), "weight_mask": self.weight(label)}

    @staticmethod
    def distance(label: torch.Tensor) -> torch.Tensor:
        """(B, 4, H, W) float32 directional maps [h, v, tl, bl] (fullrange, METHOD.md §1.4)."""
        batch, _, height, width = label.shape
        ids = label[:, 0].long()
        if ids.numel() and int(ids.min()) < 0:
            raise ValueError(f"label: expected non-negative instance ids, found {int(ids.min())}")
        slots = int(ids.max()) + 1 if ids.numel() else 1
        owner = (ids + slots * torch.arange(batch, device=label.device)[:, None, None]).flatten()  # one slot per (tile, id)
        rows = torch.arange(height, device=label.device)[:, None].expand(height, width)
        cols = torch.arange(width, device=label.device)[None, :].expand(height, width)
        coordinates = torch.stack([cols, rows, rows + cols, cols - rows]).reshape(4, 1, -1).expand(4, batch, -1).reshape(4, -1)
        low = torch.full((4, batch * slots), torch.iinfo(torch.int64).max, dtype=torch.int64, device=label.device)
        high = torch.full_like(low, torch.iinfo(torch.int64).min)
        low.scatter_reduce_(1, owner.expand(4, -1), coordinates, reduce="amin")
        high.scatter_reduce_(1, owner.expand(4, -1), coordinates, reduce="amax")
        absent = low > high
        low[absent], high[absent] = 0, 0
        # distance_maps' per-instance line, in float64 as there: value = scale·coordinate + offset
        span = (high - low).double()
        scale = torch.where(span > 0, 2.0 / span.clamp(min=1), 0.0)
        offset = torch.where(span > 0, -1.0 - low * scale, -1.0)
        skipped = (span[0] <= 0) | (span[1] <= 0)  # bounding box 1 px wide or high
        skipped[::slots] = True  # each tile's background
        scale[:, skipped], offset[:, skipped] = 0.0, 0.0
        maps = (scale[:, owner] * coordinates + offset[:, owner]).float()
        return maps.reshape(4, batch, height, width).transpose(0, 1).contiguous()

    def weight(self, label: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) float32: 1 on and within ``weight_radius`` px of any cell, BACKGROUND_WEIGHT elsewhere."""
        kernel = self.disk.to(label.device)
        near = torch.nn.functional.conv2d((label > 0).float(), kernel, padding=kernel.shape[-1] // 2) > 0.5
        return torch.where(near, 1.0, BACKGROUND_WEIGHT).float()


class CISCATargetsd(MapTransform):
    """Compute every CISCA training target of a sample from its instance (and class) map.

    Run it after all spatial augmentation and cropping. Reads ``label`` ((1, H, W) instance map,
    float with integral values accepted as LoadImaged gives them) and, if present, ``classes``
    ((1, H, W) class map). Adds ``contour_target`` (1, H, W) uint8, ``distance_target`` (4, H, W)
    float32, ``weight_mask`` (1, H, W) float32 and ``type_target`` (1, H, W) uint8 as torch
    tensors (MetaTensors carrying the label's metadata when the label is one). The contour target
    comes from the sample's ``contour_levels`` when :class:`ContourLevelsd` put them there before
    augmenting (the reference's behaviour), otherwise from the augmented label map.

    Args:
        label_key, class_key: keys of the instance map and of the per-pixel class map. A missing
            or empty class map means a single-class dataset: type_target = label > 0.
        magnification, mpp: give one; chooses the magnification profile (``profile_for``).
        num_contour_classes: K of the contour target (2, 3 or 4).
        distance_mode: "fullrange" (default) or "tips" (see :func:`distance_maps`).
        weight_radius: radius in px of the weight-mask dilation.
        relabel: relabel 8-connected components first and write the result back to ``label``:
            after a crop or an elastic deformation an instance can fall apart (METHOD.md §1.4, §7).
        num_classes: if given, class ids above it raise a ValueError.
        dense_targets: False leaves ``distance_target`` and ``weight_mask`` out, for :class:`DenseTargets` to
            compute on the batch's device from ``label`` (relabelled, int32; "fullrange" distances only).
    """

    def __init__(
        self,
        label_key: str = "label",
        class_key: str = "classes",
        magnification: float | str | None = None,
        mpp: float | None = None,
        num_contour_classes: int = 3,
        distance_mode: str = "fullrange",
        weight_radius: int = 6,
        relabel: bool = True,
        num_classes: int | None = None,
        dense_targets: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys=[label_key], allow_missing_keys=allow_missing_keys)
        if not dense_targets and (distance_mode != "fullrange" or not relabel):
            raise ValueError(f"dense_targets=False: DenseTargets computes 'fullrange' distances from the relabelled map; "
                             f"got distance_mode={distance_mode!r}, relabel={relabel!r}")
        if num_contour_classes not in CONTOUR_CLASS_COUNTS:
            raise ValueError(f"num_contour_classes: expected one of {CONTOUR_CLASS_COUNTS}, got {num_contour_classes!r}")
        if distance_mode not in DISTANCE_MODES:
            raise ValueError(f"distance_mode: expected one of {DISTANCE_MODES}, got {distance_mode!r}")
        _check_radius("weight_radius", weight_radius)
        if num_classes is not None and (
            isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1
        ):
            raise ValueError(f"num_classes: expected a positive integer or None, got {num_classes!r}")
        self.label_key = label_key
        self.class_key = class_key
        self.profile = profile_for(magnification=magnification, mpp=mpp)
        self.num_contour_classes = num_contour_classes
        self.distance_mode = distance_mode
        self.weight_radius = int(weight_radius)
        self.relabel = relabel
        self.num_classes = num_classes
        self.dense_targets = bool(dense_targets)

    def _class_map(self, data: Mapping, label: np.ndarray) -> np.ndarray:
        value = data.get(self.class_key)
        if value is None or (value.numel() if isinstance(value, torch.Tensor) else np.size(value)) == 0:
            return (label > 0).view(np.uint8)
        classes = _channel_map(value, self.class_key)
        if classes.shape != label.shape:
            raise ValueError(
                f"{self.class_key}: expected the shape of {self.label_key} (1, {label.shape[0]}, {label.shape[1]}), got (1, {classes.shape[0]}, {classes.shape[1]})"
            )
        top = int(classes.max()) if classes.size else 0
        if self.num_classes is not None and top > self.num_classes:
            raise ValueError(f"{self.class_key}: expected class ids in 0..{self.num_classes} (num_classes), found {top}")
        if top > 255:
            raise ValueError(f"{self.class_key}: expected class ids in 0..255 (the type target is uint8), found {top}")
        return classes.astype(np.uint8, copy=False)

    def _levels(self, data: Mapping, label: np.ndarray) -> np.ndarray:
        """The sample's moved contour-level map (ContourLevelsd) when it has one, else computed here."""
        value = data.get(CONTOUR_LEVELS_KEY)
        if value is None:
            return contour_levels(label, self.profile)
        levels = _channel_map(value, CONTOUR_LEVELS_KEY)
        if levels.shape != label.shape:
            raise ValueError(f"{CONTOUR_LEVELS_KEY}: expected the shape of {self.label_key} (1, {label.shape[0]}, "
                             f"{label.shape[1]}), got (1, {levels.shape[0]}, {levels.shape[1]}); move it with the same "
                             f"crop and augmentation as the label map")
        if levels.size and levels.max() > GAP:
            raise ValueError(f"{CONTOUR_LEVELS_KEY}: expected contour levels 0..{GAP}, found {int(levels.max())}")
        return levels.astype(np.uint8)  # a copy: it is modified in place below

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            source = d[key]
            label = _channel_map(source, key)
            if self.relabel:
                label = connected_components(label, background=0, connectivity=2).astype(np.int32, copy=False)
                d[key] = _like(label[None], source, torch.int32)
            levels = self._levels(d, label)
            classes = self._class_map(d, label)
            # contour_classes without its table gather (same values); uint8 like the type target: the
            # workers pass an eighth of int64's bytes through shared memory and the loss takes .long() on the device
            if self.num_contour_classes == 3:
                levels = np.minimum(levels, BACKGROUND, out=levels)
            elif self.num_contour_classes == 2:
                levels = (levels >= BACKGROUND).view(np.uint8)
            d["contour_target"] = _like(levels[None], source, torch.uint8)
            if self.dense_targets:
                d["distance_target"] = _like(distance_maps(label, self.distance_mode, self.profile), source, torch.float32)
                d["weight_mask"] = _like(weight_mask(label, self.weight_radius)[None], source, torch.float32)
            d["type_target"] = _like(classes[None], source, torch.uint8)
        return d


class ContourLevelsd(MapTransform):
    """Add ``contour_levels``, the 4-level contour map (:func:`contour_levels`) of the stored tile.

    The reference computes this map once per stored image (METHOD.md §1.2, on the full image before
    tiling, §10.16) and moves it with the geometric augmentation like the label maps, with nearest
    interpolation (§7); only the distance maps and the weight mask are recomputed after augmenting.
    Put this transform between loading and augmentation: ``cisca_augmentations`` moves the map when it
    is present and :class:`CISCATargetsd` then uses it instead of recomputing it (≈4 ms per 256² tile
    at 40x). A map already in the sample for the same magnification profile (``LoadTiled`` reads it from
    the packed copy, ``contour_levels_profile`` naming the profile) is kept; otherwise it is computed.
    """

    def __init__(self, label_key: str = "label", magnification: float | str | None = None, mpp: float | None = None,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys=[label_key], allow_missing_keys=allow_missing_keys)
        self.profile = profile_for(magnification=magnification, mpp=mpp)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        stored_profile = d.pop(CONTOUR_PROFILE_KEY, None)
        for key in self.key_iterator(d):
            if CONTOUR_LEVELS_KEY in d and stored_profile == self.profile.name:
                continue
            source = d[key]
            d[CONTOUR_LEVELS_KEY] = _like(contour_levels(_channel_map(source, key), self.profile)[None], source, torch.uint8)
        return d


def _like(array: np.ndarray, reference, dtype: torch.dtype) -> torch.Tensor:
    """Torch tensor of ``array``; a MetaTensor with the reference's metadata if it is one."""
    if isinstance(reference, MetaTensor):
        return convert_to_dst_type(array, reference, dtype=dtype)[0]
    tensor = torch.from_numpy(np.ascontiguousarray(array))  # no copy; convert_to_tensor costs ~60 µs a call
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


__all__ = [
    "BACKGROUND",
    "BODY",
    "BOUNDARY",
    "CONTOUR_LEVELS_KEY",
    "CONTOUR_PROFILE_KEY",
    "GAP",
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
