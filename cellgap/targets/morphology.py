"""Binary and grey morphology on numpy maps, with structuring elements decomposed into rectangles.

Hand-written because scipy/skimage filter per footprint pixel: running min/max over the rectangles of a
decomposed footprint is several times faster for the profiles' disks (docs/benchmarks.md, "Targets");
each function is tested against its scipy.ndimage equivalent."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy import ndimage as ndi

# Neighbour offsets (row, col) of 4- and 8-connectivity.
FOUR_CONNECTED = np.array([(-1, 0), (0, -1), (0, 1), (1, 0)])
EIGHT_CONNECTED = np.array([(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)])


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


def rank_filter(image: np.ndarray, footprint: np.ndarray, maximum: bool, mode: str, cval=0) -> np.ndarray:
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


def dilate(mask: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """Binary dilation; nothing enters from outside the image."""
    return rank_filter(mask, footprint, True, "constant", False)


def erode(mask: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """Binary erosion; the image border does not erode (as skimage's binary_erosion)."""
    return rank_filter(mask, footprint, False, "constant", True)


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


def components_below(mask: np.ndarray, size: int, connectivity: np.ndarray) -> np.ndarray:
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

    Whole-array neighbour counts instead of the pixel-list grouping of ``components_below``:
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


def reconstruct(seed: np.ndarray, mask: np.ndarray, max_rounds: int = 24) -> np.ndarray:
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


def near(mask: np.ndarray, pixels: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """For each flat pixel index, whether ``mask`` holds inside its ``footprint`` neighbourhood:
    ``dilate(mask, footprint)`` read at a few pixels without filtering the whole image."""
    height, width = mask.shape
    center_row, center_col = footprint.shape[0] // 2, footprint.shape[1] // 2
    offset_rows, offset_cols = np.nonzero(footprint)
    rows, cols = np.divmod(pixels, width)
    r = rows[:, None] + (offset_rows - center_row)[None, :]
    c = cols[:, None] + (offset_cols - center_col)[None, :]
    inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)
    return (inside & mask[np.clip(r, 0, height - 1), np.clip(c, 0, width - 1)]).any(axis=1)


def fill_holes(mask: np.ndarray, max_area: int) -> np.ndarray:
    """Fill 4-connected holes of area < ``max_area`` (skimage ``remove_small_holes`` semantics:
    any small component of the complement counts, also one that touches the image border)."""
    return mask | components_below(~mask, max_area, FOUR_CONNECTED)


def touching(label: np.ndarray, foreground: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """Foreground pixels with a *different* instance inside their ``footprint`` neighbourhood.

    Equal to summing per-instance dilations and taking ``> 1`` on the foreground (§1.2 step 3),
    but without a loop over instances: the neighbourhood holds another id exactly when its
    maximum id (background 0) or its minimum id (background +inf) differs from the pixel's own.
    """
    highest = rank_filter(label, footprint, True, "constant", 0)
    background_high = np.where(foreground, label, np.iinfo(label.dtype).max)
    lowest = rank_filter(background_high, footprint, False, "constant", np.iinfo(label.dtype).max)
    return foreground & (highest != lowest)
