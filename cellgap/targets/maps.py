"""The CISCA target maps of an instance map (METHOD.md §1): contour levels and classes, directional
distance maps, the weight mask, per-pixel ↔ per-instance classes."""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache

import numpy as np

from ..magnification import MagnificationProfile, disk
from .labels import compact_ids, dense_ids, instance_map, small_id_dtype
from .morphology import (
    EIGHT_CONNECTED,
    FOUR_CONNECTED,
    components_below,
    dilate,
    erode,
    fill_holes,
    near,
    rank_filter,
    reconstruct,
    touching,
)

BOUNDARY, BODY, BACKGROUND, CLEFT = 0, 1, 2, 3
CONTOUR_CLASS_COUNTS = (2, 3, 4)
DISTANCE_MODES = ("fullrange", "tips")
INSTANCE_CLASS_RULES = ("majority", "max")
BACKGROUND_WEIGHT = 0.05


# Diagonal border width of the "tips" maps, relative to the h/v border (METHOD.md §1.4).
TIPS_DIAGONAL_FACTOR = 1.4
# §1.2 step 8: cleft components below 3 px, body and boundary components below 2 px are cleaned up.
MIN_CLEFT_COMPONENT = 3
MIN_BODY_COMPONENT = 2
MIN_BOUNDARY_COMPONENT = 2


# Above this many ids, distance_maps renumbers them densely first (its tables have one row per id).
_MAX_TABLE_IDS = 4096

# Level → K-class index (METHOD.md §1.3); levels are 0 boundary, 1 body, 2 background, 3 cleft.
_LEVEL_TO_CLASS = {
    2: np.array([0, 0, 1, 1], dtype=np.uint8),
    3: np.array([0, 1, 2, 2], dtype=np.uint8),
    4: np.array([0, 1, 2, 3], dtype=np.uint8),
}


# --------------------------------------------------------------------------------------------
# Contour target


def contour_levels(label: np.ndarray, profile: MagnificationProfile) -> np.ndarray:
    """The 4-level contour map ("graymask4") of METHOD.md §1.2.

    Args:
        label: (H, W) instance map, 0 = background, 1..N cells (any ids ≥ 0).
        profile: magnification profile giving the structuring elements, fragment sizes and hole area.

    Returns:
        (H, W) uint8 with 0 = boundary between touching (or nearly touching) cells, 1 = body,
        2 = background, 3 = cleft (METHOD.md's "gap" level: narrow background between close cells,
        small concavities).
        Computed on the array given (no tiling, METHOD.md §10.16). As skimage's grey closing,
        the cleft closing mirrors the image at its border, so a background strip narrower than
        about the se_cleft radius (METHOD.md's SE_gap) between a cell and the border is cleft too
        (K=4 only; K=2, 3 merge cleft into background).
    """
    label = small_id_dtype(instance_map(label))
    foreground = label > 0
    background = ~foreground
    hole_area = profile.max_hole_area

    # Step 2: clefts = background filled by a grey closing of the label image. For the test "J > 0"
    # this equals a binary closing of the foreground (flat morphology commutes with thresholding);
    # reflect mode at the border as skimage's grey closing.
    closed = rank_filter(rank_filter(foreground, profile.se_cleft, True, "reflect"), profile.se_cleft, False, "reflect")
    levels = np.full(label.shape, BODY, dtype=np.uint8)
    levels[background] = BACKGROUND
    levels[background & closed] = CLEFT

    # Steps 3-4: touching cells, then small holes filled.
    boundary = fill_holes(touching(label, foreground, profile.se_boundary), hole_area)
    boundary_large = fill_holes(touching(label, foreground, profile.se_boundary_large), hole_area)

    # Step 5: thicken small fragments (and the filled holes outside the cells) into the cells.
    for min_size, footprint in (
        (profile.fragment_size_1, profile.se_fragment_1),
        (profile.fragment_size_2, profile.se_fragment_2),
    ):
        inside = boundary & foreground
        small = boundary & ~(inside & ~components_below(inside, min_size, FOUR_CONNECTED))
        if small.any():
            added = dilate(small, footprint) & foreground & ~boundary
            if added.any():  # otherwise B is unchanged and its holes are already filled
                boundary = fill_holes(boundary | added, hole_area)
    levels[boundary] = BOUNDARY

    # Step 7: near-contact regions so thin that they vanish under erosion (reconstruction by
    # dilation with skimage's default 8-connectivity keeps every component that keeps a pixel).
    if boundary_large.any():
        levels[boundary_large & ~reconstruct(erode(boundary_large, profile.se_thin), boundary_large)] = BOUNDARY

    # Step 8: clean-up, in order; "near" is recomputed after each change of the boundary.
    for value, min_size in ((CLEFT, MIN_CLEFT_COMPONENT), (BODY, MIN_BODY_COMPONENT)):
        small = np.flatnonzero(components_below(levels == value, min_size, FOUR_CONNECTED))
        if small.size:
            levels.ravel()[small[near(levels == BOUNDARY, small, profile.se_boundary)]] = BOUNDARY
    levels[components_below(levels == BOUNDARY, MIN_BOUNDARY_COMPONENT, EIGHT_CONNECTED)] = BODY
    return levels


def contour_classes(levels: np.ndarray, num_contour_classes: int = 3) -> np.ndarray:
    """Merge the 4-level map into the K-class index map (METHOD.md §1.3).

    K=3: 0 boundary, 1 body, 2 background + cleft. K=2: 0 foreground (boundary + body),
    1 background + cleft. K=4: the levels unchanged.
    """
    if num_contour_classes not in _LEVEL_TO_CLASS:
        raise ValueError(f"num_contour_classes: expected one of {CONTOUR_CLASS_COUNTS}, got {num_contour_classes!r}")
    levels = np.asarray(levels)
    if levels.dtype.kind not in "iu" or (levels.size and (levels.min() < 0 or levels.max() > CLEFT)):
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
    label, count = compact_ids(instance_map(label))
    height, width = label.shape
    maps = np.zeros((4, height, width), dtype=np.float32)
    if count == 0:
        return maps
    if count > _MAX_TABLE_IDS:  # many distinct ids: keep the per-id tables short
        label, count = dense_ids(label)
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
    small = small_id_dtype(label)  # comparisons on uint8 rather than int64
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


def check_radius(name: str, radius) -> None:
    if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)) or radius < 0:
        raise ValueError(f"{name}: expected an integer ≥ 0 (pixels), got {radius!r}")


def weight_mask(label: np.ndarray, radius: int = 6) -> np.ndarray:
    """Regression weight mask of METHOD.md §1.6, float32 (H, W): 1.0 on cells and within
    ``radius`` px (Euclidean disk dilation) of any cell, 0.05 elsewhere."""
    check_radius("radius", radius)
    near = dilate(instance_map(label) > 0, disk(radius))
    return np.where(near, np.float32(1.0), np.float32(BACKGROUND_WEIGHT))  # float32 already: no copy


def class_map_from_instances(label: np.ndarray, classes_by_id: Mapping[int, int]) -> np.ndarray:
    """Per-pixel class map (uint8, 0 = background) painting each instance with its class.

    Every instance id of ``label`` must be in ``classes_by_id``; ids of the mapping absent from
    ``label`` are ignored. Classes must lie in 0..255.
    """
    label = instance_map(label)
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
    label = instance_map(label)
    class_map = instance_map(class_map, "class_map")
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
