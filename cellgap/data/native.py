"""Reading the native files of public datasets and user folders, with errors that name the file.

Shared by the converters (PanNuke, CoNIC, CytoDArk0, user folders): memory-mapped ``.npy`` access
with a header/size check, RGB image and instance-map readers (PNG, TIFF, NIfTI), the check that a
label map really is an instance map, sequential relabelling, non-overlapping tiling, and a small
helper that writes tiles of a ``PreparedWriter`` on two threads (PNG/zlib encoding releases the GIL).
"""

from __future__ import annotations

import os
import re
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage.segmentation import relabel_sequential

IMAGE_SUFFIXES = (".png", ".tif", ".tiff")
LABEL_SUFFIXES = (".tif", ".tiff", ".png", ".nii", ".nii.gz")
MAX_FLOAT_ID = 2**53  # largest id a float label map can hold with every smaller whole number exact


# --------------------------------------------------------------------------------------------- npy


def open_npy(path: str | os.PathLike, what: str, ndim: int | None = None, last_dim: int | None = None) -> np.ndarray:
    """Memory-map a ``.npy`` file read-only after checking that it is complete.

    ``what`` says what the file should hold (for messages).  Raises FileNotFoundError if it is
    missing and ValueError if it is not a ``.npy`` file, is truncated, holds Python objects, or
    has the wrong number of dimensions / size of the last axis.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; expected {what}")
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        except (ValueError, OSError, SyntaxError) as e:
            raise ValueError(f"{path}: not a readable .npy file ({e}); expected {what}") from None
        offset = f.tell()
    if dtype.hasobject:
        raise ValueError(f"{path}: holds Python objects (dtype {dtype}); expected {what} as a plain numeric/string array")
    expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = path.stat().st_size
    if actual < expected:
        raise ValueError(f"{path}: truncated .npy file: its header promises shape {shape} {dtype} "
                         f"({expected} bytes) but the file has {actual} bytes; download or copy it again")
    if actual > expected:  # np.save writes exactly the header's size; more means a wrong header or a damaged copy
        raise ValueError(f"{path}: {actual - expected} extra bytes after the data its header promises (shape {shape} "
                         f"{dtype}, {expected} bytes); expected a file of exactly {expected} bytes; download or copy it again")
    if ndim is not None and len(shape) != ndim:
        raise ValueError(f"{path}: expected {what}, got shape {shape}")
    if last_dim is not None and (not shape or shape[-1] != last_dim):
        raise ValueError(f"{path}: expected {what} (last axis of size {last_dim}), got shape {shape}")
    if int(np.prod(shape, dtype=np.int64)) == 0:
        return np.zeros(shape, dtype=dtype)
    return np.load(path, mmap_mode="r", allow_pickle=False)


def iter_npy_chunks(path: str | os.PathLike, chunk: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(start, array[start:start+chunk])`` copies of a large ``.npy`` file.

    The file is memory-mapped afresh for each chunk and unmapped afterwards, so the pages read so
    far are released and the resident memory stays at about one chunk (a single long-lived map
    would keep every page it touched resident).
    """
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape = read_header(f)[0]
    n = shape[0] if shape else 0
    if n == 0 or int(np.prod(shape)) == 0:  # an empty array cannot be memory-mapped
        return
    for start in range(0, n, chunk):
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
        block = np.array(arr[start : start + chunk])
        del arr
        yield start, block


def as_uint8_rgb(block: np.ndarray, where: str) -> np.ndarray:
    """Cast a batch (or one) of RGB images stored as uint8 or float 0..255 to uint8, or raise."""
    if block.dtype == np.uint8:
        return block
    if np.issubdtype(block.dtype, np.floating) or np.issubdtype(block.dtype, np.integer):
        if np.issubdtype(block.dtype, np.floating) and not np.all(np.isfinite(block)):
            raise ValueError(f"{where}: image holds NaN or infinite values; expected RGB values 0..255")
        lo, hi = (block.min(), block.max()) if block.size else (0, 0)
        if lo < 0 or hi > 255:
            raise ValueError(f"{where}: image values span {lo}..{hi}; expected RGB values 0..255 (uint8 or float)")
        # Judged per call (one tile) on max > 0: an all-black tile stays valid, while a real 0..255 tile
        # whose brightest pixel is ≤ 1 is implausible, so this means the file was scaled to 0..1.
        if np.issubdtype(block.dtype, np.floating) and 0 < hi <= 1:
            raise ValueError(f"{where}: image values span {lo}..{hi}, i.e. scaled to 0..1; expected RGB values 0..255 "
                             "(multiply images scaled to 0..1 by 255)")
        return np.rint(block).astype(np.uint8) if np.issubdtype(block.dtype, np.floating) else block.astype(np.uint8)
    raise ValueError(f"{where}: image has dtype {block.dtype}; expected uint8 or float RGB values 0..255")


def as_integer_labels(block: np.ndarray, where: str) -> np.ndarray:
    """Return integer label values from an integer array or a float array holding whole numbers."""
    if np.issubdtype(block.dtype, np.integer):
        out = block
    elif np.issubdtype(block.dtype, np.floating):
        if not np.all(np.isfinite(block)) or np.any(block != np.floor(block)):
            raise ValueError(f"{where}: label values are not whole numbers (dtype {block.dtype}); "
                             "expected integer instance ids (0 = background)")
        # Range before the cast: int64 would wrap (1e20 -> -2^63), and beyond 2^53 floats skip whole numbers.
        lo, hi = (float(block.min()), float(block.max())) if block.size else (0.0, 0.0)
        if lo < 0:
            raise ValueError(f"{where}: negative label value {lo:g}; expected ids ≥ 0 (0 = background)")
        if hi > MAX_FLOAT_ID:
            raise ValueError(f"{where}: label value {hi:g} is too large; expected ids 0..{MAX_FLOAT_ID} (2^53, the "
                             f"largest whole number a float holds exactly) in a {block.dtype} label map")
        out = block.astype(np.int64)
    else:
        raise ValueError(f"{where}: labels have dtype {block.dtype}; expected integer instance ids (0 = background)")
    if out.size and out.min() < 0:
        raise ValueError(f"{where}: negative label value {out.min()}; expected ids ≥ 0 (0 = background)")
    return out


# ---------------------------------------------------------------------------------- images, labels


def strip_suffix(name: str) -> str:
    """File name without its image/label suffix (``a.nii.gz`` → ``a``)."""
    lower = name.lower()
    for suffix in sorted(IMAGE_SUFFIXES + LABEL_SUFFIXES + (".csv",), key=len, reverse=True):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def too_large_error(path, error: BaseException) -> BaseException:
    """PIL's decompression-bomb refusal as a ValueError naming the file and the fix; any other error as it is."""
    from PIL import Image

    if not isinstance(error, Image.DecompressionBombError):
        return error
    return ValueError(f"{path}: {error} It is an image of whole-slide size: segment it with `cellgap segment` (which "
                      f"reads it tile by tile) or cut it into tiles; if you trust the file, raise PIL.Image.MAX_IMAGE_PIXELS")


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """Read an 8-bit RGB image (PNG or TIFF) as H×W×3 uint8; RGBA with an opaque alpha is accepted."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image file missing")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            arr = tifffile.imread(path)
        else:
            from PIL import Image

            with Image.open(path) as im:
                if im.mode == "P":
                    im = im.convert("RGBA" if "transparency" in im.info else "RGB")
                arr = np.asarray(im)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read image ({e})") from None
    except Exception as e:
        raise too_large_error(path, e) from None
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[2] not in (3, 4):
        arr = np.moveaxis(arr, 0, -1)  # planar TIFF
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"{path}: not an RGB image (shape {arr.shape}); expected H×W×3 8-bit RGB")
    if arr.shape[2] == 4:
        if arr.dtype == np.uint8 and np.all(arr[..., 3] == 255):
            arr = arr[..., :3]
        else:
            raise ValueError(f"{path}: RGBA image with transparent pixels; expected opaque H×W×3 RGB")
    if arr.dtype != np.uint8:
        raise ValueError(f"{path}: image has dtype {arr.dtype}; expected 8-bit (uint8) RGB")
    return np.ascontiguousarray(arr)


def read_label_image(path: str | os.PathLike) -> np.ndarray:
    """Read a single-channel integer label image (TIFF, PNG or NIfTI) as a 2-D array.

    NIfTI arrays are taken as stored (first axis = rows), as written by
    ``nibabel.Nifti1Image(label, affine)`` from a row/column array.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file missing; expected a label map (instance or class ids; TIFF, PNG or NIfTI)")
    name = path.name.lower()
    try:
        if name.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            arr = np.asarray(nib.load(str(path)).dataobj)
        elif name.endswith((".tif", ".tiff")):
            import tifffile

            arr = tifffile.imread(path)
        else:
            from PIL import Image

            with Image.open(path) as im:
                arr = np.asarray(im)
    except Exception as e:  # nibabel/PIL/tifffile raise many types for unreadable files
        raise ValueError(f"{path}: cannot read label map ({type(e).__name__}: {e})") from None
    arr = np.squeeze(arr)
    if arr.ndim != 2:
        raise ValueError(f"{path}: label map has shape {arr.shape}; expected one 2-D channel of integer ids")
    return as_integer_labels(arr, str(path))


def read_instance_map(path: str | os.PathLike, image_shape: tuple[int, ...] | None = None, image_path=None) -> np.ndarray:
    """A prepared tile's instance map: non-negative ids, and the image's height and width when given."""
    label = read_label_image(path)
    if label.min() < 0:
        raise ValueError(f"{path}: negative instance ids; expected 0 = background, 1..N = cells")
    if image_shape is not None and label.shape != tuple(image_shape):
        raise ValueError(f"{path}: label map is {label.shape}, but its image {image_path} is "
                         f"{tuple(image_shape)}; expected the same height and width")
    return label


def read_class_map(path: str | os.PathLike, label_shape: tuple[int, ...], num_classes: int | None) -> np.ndarray:
    """A prepared tile's class map as uint8 (LoadTiled's dtype): the instance map's shape, ids 0..num_classes."""
    classes = read_label_image(path)
    if classes.shape != tuple(label_shape):
        raise ValueError(f"{path}: class map is {classes.shape}, but the instance map is {tuple(label_shape)}")
    check_class_ids(classes, path, num_classes)
    return classes.astype(np.uint8, copy=False)


def check_class_ids(classes: np.ndarray, path, num_classes: int | None) -> None:
    """Ids in 0..num_classes, and in 0..255 as class maps are uint8."""
    low, high = int(classes.min()), int(classes.max())
    if low < 0 or (num_classes is not None and high > num_classes):
        raise ValueError(f"{path}: class ids {low}..{high}; expected 0..{num_classes} "
                         f"(0 = background) for this dataset's {num_classes} classes")
    if high > 255:
        raise ValueError(f"{path}: class id {high}; class maps hold ids 0..255 (uint8)")


def check_instance_map(label: np.ndarray, where: str) -> None:
    """Raise ValueError if ``label`` looks like a binary/semantic mask rather than an instance map.

    The test: an instance map gives each cell its own id, so ids covering many separate regions
    mean one value is shared by many cells.  It fails when the ids split into at least twice as
    many 8-connected regions as there are ids *and* at least four regions more than ids, so that a
    few fragmented cells (annotation noise, cells cut by the tile border) still pass.
    """
    if not np.issubdtype(label.dtype, np.integer):
        raise ValueError(f"{where}: instance map must hold integers, got {label.dtype}")
    fg = label > 0
    if not fg.any():
        return
    n_ids = len(np.unique(label[fg]))
    # Regions of equal id: connected components of the foreground, split further where ids change.
    regions, _ = ndimage.label(fg, structure=np.ones((3, 3), dtype=bool))
    ids = label[fg].astype(np.int64)
    n_regions = len(np.unique(regions[fg].astype(np.int64) * (int(ids.max()) + 1) + ids))
    # A component holding two ids counts once per id; an id in many components counts many times.
    if n_regions >= 2 * n_ids and n_regions >= n_ids + 4:
        values = ", ".join(str(v) for v in np.unique(label[fg])[:5])
        raise ValueError(f"{where}: not an instance map: {n_ids} id(s) ({values}) cover {n_regions} separate regions; "
                         "expected one distinct id per cell (0 = background), e.g. a labelled mask, not a binary or class mask")


def sequential(label: np.ndarray) -> np.ndarray:
    """Instance ids renumbered 1..N in order of their old values (0 stays background), as int32."""
    top = int(label.max()) if label.size else 0
    if top == 0:
        return np.zeros(label.shape, np.int32)
    if top < (1 << 24):  # lookup table: much faster than a sort for the usual id ranges
        present = np.bincount(label.ravel().astype(np.int64, copy=False), minlength=top + 1) > 0
        present[0] = False
        lut = np.cumsum(present, dtype=np.int64).astype(np.int32)
        lut[0] = 0
        return lut[label]
    return relabel_sequential(label)[0].astype(np.int32)


def class_counts(label: np.ndarray, classes: np.ndarray, num_classes: int) -> np.ndarray:
    """Cells per class (index 0 = class 1).  A cell's class is the majority class under it."""
    fg = label > 0
    if not fg.any():
        return np.zeros(num_classes, dtype=np.int64)
    ids = label[fg].astype(np.int64)
    cls = classes[fg].astype(np.int64)
    if cls.max() > num_classes:
        raise ValueError(f"class id {cls.max()} exceeds the number of classes {num_classes}")
    width = num_classes + 1
    votes = np.bincount(ids * width + cls, minlength=(int(ids.max()) + 1) * width).reshape(-1, width)
    present = votes.sum(axis=1) > 0
    winners = votes[present, 1:].argmax(axis=1) + 1
    winners[votes[present, 1:].max(axis=1) == 0] = 0  # cell with only background class pixels
    return np.bincount(winners, minlength=num_classes + 1)[1:]


def tiles(array: np.ndarray, size: int, where: str) -> Iterator[tuple[int, np.ndarray]]:
    """Non-overlapping ``size``×``size`` tiles in row-major order, numbered from 1.

    The image side must be a multiple of ``size`` (nothing is cut off silently).
    """
    h, w = array.shape[:2]
    if h % size or w % size:
        raise ValueError(f"{where}: size {h}×{w} is not a multiple of the tile size {size}; "
                         "expected non-overlapping tiles that cover the whole image")
    k = 0
    for r in range(0, h, size):
        for c in range(0, w, size):
            k += 1
            yield k, array[r : r + size, c : c + size]


def safe_name(text: str) -> str:
    """A file-name-safe version of ``text`` (letters, digits, ``_``, ``-``, ``.``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text.strip()).strip(".") or "_"


# --------------------------------------------------------------------------------------- writing


def add_tiles(writer, items: Iterable[dict], workers: int = 2) -> int:
    """Call ``writer.add(**item)`` for every item on ``workers`` threads, keeping manifest order.

    Image encoding (PNG, zlib TIFF) releases the GIL, so two threads roughly halve the writing time.
    At most ``2 × workers`` tiles are in flight, which bounds memory.  The first error is raised
    after the threads have stopped, so the caller's ``PreparedWriter`` can remove its partial folder.
    """
    order: dict[str, int] = {}
    pending: deque[Future] = deque()
    count = 0
    start = len(writer.rows)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        try:
            for item in items:
                order[item["tile_id"]] = count
                count += 1
                pending.append(pool.submit(writer.add, **item))
                while len(pending) >= 2 * max(1, workers):
                    pending.popleft().result()
            while pending:
                pending.popleft().result()
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise
    # Threads finish out of order; restore the order in which the items came.
    writer.rows[start:] = sorted(writer.rows[start:], key=lambda row: order[row["id"]])
    return count
