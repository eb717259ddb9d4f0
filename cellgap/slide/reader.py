"""Reading slides lazily, one region at a time: OpenSlide formats (SVS, NDPI, MRXS, vendor TIFF …), OME-TIFF and
other tiled / pyramidal TIFFs (tifffile + zarr), and plain PNG / JPEG / TIFF images of any size.

A :class:`Slide` knows its pyramid (size and downsample of each level), its level-0 resolution (µm per pixel)
and reads RGB regions at a level.  Regions are read on demand, so the loader workers that call
:meth:`Slide.read_region` never hold a whole level.  A ``Slide`` pickles as its path and options and reopens in
the process that unpickles it (a DataLoader worker).

OpenSlide goes through MONAI's ``OpenSlideWSIReader``.  MONAI's tifffile backend is not used: it reads the whole
level (``asarray(level=…)``) for every patch, so OME / pyramidal TIFFs are read here through tifffile's zarr store,
which decodes only the tiles a region touches.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

import numpy as np

PLAIN_SUFFIXES = (".png", ".jpg", ".jpeg")
TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".ome.tif", ".ome.tiff")
OPENSLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".dcm")
SLIDE_SUFFIXES = PLAIN_SUFFIXES + TIFF_SUFFIXES + OPENSLIDE_SUFFIXES
# 10 / objective power: the usual 40x ≈ 0.25 µm/px convention (SLIDES.md), used when a slide records no mpp.
MPP_PER_INVERSE_POWER = 10.0


class SlideError(ValueError):
    """A slide that cannot be read or has no usable resolution; the message names the file and the fix."""


def is_slide_file(path: str | Path) -> bool:
    name = Path(path).name.lower()
    return not name.startswith(".") and name.endswith(SLIDE_SUFFIXES)


@dataclass(frozen=True)
class Level:
    width: int
    height: int
    downsample: float  # level-0 pixels per pixel of this level


def _positive(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


class Slide:
    """One slide (or plain image), opened lazily.

    ``mpp``: the caller's level-0 µm per pixel; it overrides the file's own (``--mpp``).  Without either, the
    objective power (``openslide.objective-power`` / Aperio ``AppMag``) gives ``10 / power``; without that,
    :class:`SlideError` says to pass ``--mpp``.
    """

    def __init__(self, path: str | Path, mpp: float | None = None):
        self.path = Path(path)
        self.mpp_override = _positive(mpp)
        if mpp is not None and self.mpp_override is None:
            raise SlideError(f"--mpp: expected a positive pixel size in µm per pixel, got {mpp!r}")
        if not self.path.is_file():
            raise SlideError(f"{self.path}: no such file")
        self._handle = None
        self._open()

    # pickling: workers reopen the file
    def __getstate__(self) -> dict:
        return {"path": self.path, "mpp_override": self.mpp_override, "backend": self.backend}

    def __setstate__(self, state: dict) -> None:
        self.path, self.mpp_override = state["path"], state["mpp_override"]
        self._handle = None
        self._open(state["backend"])

    # ------------------------------------------------------------------------------------------------
    def _open(self, backend: str | None = None) -> None:
        name = self.path.name.lower()
        try:
            if backend == "openslide" or (backend is None and self._openslide_can_read()):
                self._open_openslide()
            elif backend == "tifffile" or (backend is None and name.endswith(TIFF_SUFFIXES)):
                self._open_tifffile()
            else:
                self._open_plain()
        except SlideError:
            raise
        except Exception as e:  # each library raises its own types for truncated or foreign files
            raise SlideError(f"{self.path}: cannot be read as a slide ({type(e).__name__}: {e}); check that the file is "
                             f"complete (not truncated by a copy) and is one of {', '.join(SLIDE_SUFFIXES)}") from None

    def _openslide_can_read(self) -> bool:
        name = self.path.name.lower()
        if name.endswith(PLAIN_SUFFIXES):
            return False
        try:
            import openslide
        except ImportError:
            if name.endswith(OPENSLIDE_SUFFIXES):
                raise SlideError(f"{self.path}: needs OpenSlide; pip install openslide-python openslide-bin") from None
            return False
        try:
            vendor = openslide.OpenSlide.detect_format(str(self.path))
        except Exception:
            vendor = None
        if vendor in (None, "generic-tiff"):
            # OpenSlide's generic TIFF has no resolution; tifffile reads OME and resolution tags itself
            return name.endswith(OPENSLIDE_SUFFIXES)
        return True

    def _open_openslide(self) -> None:
        from monai.data import OpenSlideWSIReader

        self.backend = "openslide"
        self._monai = OpenSlideWSIReader()
        self._handle = self._monai.read(str(self.path))
        wsi = self._handle
        self.levels = [Level(int(w), int(h), float(d)) for (w, h), d in zip(wsi.level_dimensions, wsi.level_downsamples)]
        props = wsi.properties
        self.vendor = props.get("openslide.vendor", "")
        self.file_mpp = _positive(props.get("openslide.mpp-x"))
        self.objective_power = _positive(props.get("openslide.objective-power"))

    def _open_tifffile(self) -> None:
        import tifffile
        import zarr

        self.backend = "tifffile"
        tif = tifffile.TiffFile(str(self.path))
        series = tif.series[0]
        levels = series.levels
        self.vendor = "ome" if tif.is_ome else ("aperio" if tif.is_svs else "tiff")
        axes = series.axes.upper()
        if not (axes.endswith("YXS") or axes.endswith("YX")):
            raise SlideError(f"{self.path}: expected an RGB image (axes …YXS), tifffile reads axes {series.axes!r}")
        self._axes = axes
        self._arrays = []
        self._stores = []
        shapes = []
        for i in range(len(levels)):
            store = series.aszarr(level=i)
            self._stores.append(store)
            self._arrays.append(zarr.open_array(store, mode="r"))
            shape = levels[i].shape
            y = axes.index("Y")
            shapes.append((int(shape[y + 1]), int(shape[y])))
        width0 = shapes[0][0]
        self.levels = [Level(w, h, width0 / w) for w, h in shapes]
        self._tif = tif
        self.file_mpp = self._tiff_mpp(tif)
        self.objective_power = None
        if tif.is_svs:
            match = re.search(r"AppMag\s*=\s*([\d.]+)", tif.pages[0].description or "")
            self.objective_power = _positive(match.group(1)) if match else None

    def _tiff_mpp(self, tif) -> float | None:
        if tif.is_ome:
            try:
                root = ElementTree.fromstring(tif.ome_metadata)
                pixels = next(el for el in root.iter() if el.tag.endswith("Pixels"))
                size = _positive(pixels.get("PhysicalSizeX"))
                unit = pixels.get("PhysicalSizeXUnit", "µm")
                scale = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3}.get(unit)
                return size * scale if size and scale else None
            except (StopIteration, ElementTree.ParseError):
                return None
        if tif.is_svs:
            match = re.search(r"MPP\s*=\s*([\d.]+)", tif.pages[0].description or "")
            return _positive(match.group(1)) if match else None
        page = tif.pages[0]
        resolution = page.tags.get("XResolution")
        unit = page.tags.get("ResolutionUnit")
        if resolution is None or unit is None:
            return None
        num, den = resolution.value
        per_unit = num / den if den else 0
        um_per_unit = {2: 25400.0, 3: 10000.0}.get(int(unit.value))  # inch, centimetre; 1 = no unit
        return um_per_unit / per_unit if um_per_unit and per_unit > 0 else None

    def _open_plain(self) -> None:
        from PIL import Image

        self.backend = "plain"
        Image.MAX_IMAGE_PIXELS = None  # a plain image of any size is allowed; it is the user's own file
        with Image.open(self.path) as img:
            img.load()  # a truncated file fails here, not in a worker
            self._image = np.asarray(img.convert("RGB"))
            dpi = img.info.get("dpi")
        self.levels = [Level(self._image.shape[1], self._image.shape[0], 1.0)]
        self.vendor = "image"
        self.file_mpp = 25400.0 / dpi[0] if dpi and _positive(dpi[0]) and dpi[0] > 1 else None
        self.objective_power = None

    # ------------------------------------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height)."""
        return self.levels[0].width, self.levels[0].height

    @property
    def mpp(self) -> float:
        """Level-0 µm per pixel: ``--mpp``, else the file's, else 10 / objective power."""
        if self.mpp_override:
            return self.mpp_override
        if self.file_mpp:
            return self.file_mpp
        if self.objective_power:
            return MPP_PER_INVERSE_POWER / self.objective_power
        raise SlideError(f"{self.path}: the file records no resolution (no mpp, no objective power); "
                         f"pass --mpp with its level-0 µm per pixel (e.g. --mpp 0.25 for 40x, 0.5 for 20x)")

    @property
    def mpp_source(self) -> str:
        if self.mpp_override:
            return "--mpp"
        if self.file_mpp:
            return "file"
        return "objective power" if self.objective_power else "none"

    def level_mpp(self, level: int) -> float:
        return self.mpp * self.levels[level].downsample

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 (height, width, 3) at ``level`` from level-``level`` pixel (x, y); outside the slide is white."""
        lv = self.levels[level]
        out = np.full((height, width, 3), 255, np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + width, lv.width), min(y + height, lv.height)
        if x1 <= x0 or y1 <= y0:
            return out
        out[y0 - y : y1 - y, x0 - x : x1 - x] = self._read_inside(level, x0, y0, x1 - x0, y1 - y0)
        return out

    def _read_inside(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        if self.backend == "openslide":
            down = self.levels[level].downsample
            location = (int(round(y * down)), int(round(x * down)))  # MONAI: (row, col) in level-0 pixels
            patch, _ = self._monai.get_data(self._handle, location=location, size=(height, width), level=level, mode="RGB")
            return np.ascontiguousarray(np.moveaxis(np.asarray(patch, dtype=np.uint8), 0, -1))
        if self.backend == "tifffile":
            array = self._arrays[level]
            index = [0] * array.ndim
            yi = self._axes.index("Y")
            index[yi] = slice(y, y + height)
            index[yi + 1] = slice(x, x + width)
            if self._axes.endswith("S"):
                index[yi + 2] = slice(0, 3)
            region = np.asarray(array[tuple(index)])
            if region.ndim == 2:
                region = np.repeat(region[..., None], 3, axis=-1)
            return region.astype(np.uint8, copy=False)
        return self._image[y : y + height, x : x + width]

    def thumbnail(self, max_side: int = 2048) -> tuple[np.ndarray, float]:
        """An RGB thumbnail whose longer side is at most ``max_side``, and its downsample from level 0.

        Read from the smallest level that is still at least as large, in strips of about 16 MB, each reduced at
        once with PIL's box filter (uint8 throughout), so no more than a strip is in memory whatever the slide.
        """
        from PIL import Image

        width0, height0 = self.dimensions
        scale = max(width0, height0) / max_side
        if scale <= 1:
            return self.read_region(0, 0, 0, width0, height0), 1.0
        out_w, out_h = max(1, int(round(width0 / scale))), max(1, int(round(height0 / scale)))
        candidates = [i for i, lv in enumerate(self.levels) if lv.width >= out_w and lv.height >= out_h]
        level = max(candidates, key=lambda i: self.levels[i].downsample)
        lv = self.levels[level]
        out = np.empty((out_h, out_w, 3), np.uint8)
        strip = max(1, int(2**24 // (lv.width * 3)))
        done = 0
        for top in range(0, lv.height, strip):
            rows = min(strip, lv.height - top)
            bottom = int(round((top + rows) * out_h / lv.height))
            if bottom > done:
                part = Image.fromarray(self.read_region(level, 0, top, lv.width, rows))
                out[done:bottom] = np.asarray(part.resize((out_w, bottom - done), Image.Resampling.BOX))
                done = bottom
        return out, width0 / out_w

    def close(self) -> None:
        if self.backend == "openslide" and self._handle is not None:
            self._handle.close()
        elif self.backend == "tifffile":
            self._tif.close()
        self._handle = None


@dataclass(frozen=True)
class Resolution:
    """Where a run reads: the pyramid ``level`` and the ``scale`` from that level's pixels to processing pixels
    (< 1: downsampled after reading; 1: read as stored), and the processing µm per pixel."""

    level: int
    scale: float
    mpp: float  # processing µm per pixel
    downsample: float  # level-0 pixels per processing pixel


def choose_resolution(slide: Slide, target_mpp: float, tolerance: float = 0.05) -> Resolution:
    """The level nearest ``target_mpp`` from above (the coarsest level still at least as fine, within
    ``tolerance``), resampled the rest of the way; a slide coarser than the target is upsampled with a warning."""
    if not (target_mpp and target_mpp > 0):
        raise SlideError(f"model: its checkpoint records no training resolution (meta 'mpp'); cannot pick a level of {slide.path}")
    fine_enough = [i for i in range(len(slide.levels)) if slide.level_mpp(i) <= target_mpp * (1 + tolerance)]
    if not fine_enough:
        level = 0
        warnings.warn(f"{slide.path}: level 0 is {slide.mpp:.3f} µm/px, coarser than the model's {target_mpp:.3f} µm/px; "
                      f"it is UPSAMPLED ×{slide.mpp / target_mpp:.2f}, which the model never saw in training", stacklevel=2)
    else:
        level = max(fine_enough, key=slide.level_mpp)
    level_mpp = slide.level_mpp(level)
    scale = level_mpp / target_mpp
    if abs(scale - 1) <= tolerance:
        scale, mpp = 1.0, level_mpp
    else:
        mpp = target_mpp
    return Resolution(level=level, scale=scale, mpp=mpp, downsample=mpp / slide.mpp)


def read_processing_region(slide: Slide, resolution: Resolution, x: int, y: int, size: int) -> np.ndarray:
    """RGB uint8 (size, size, 3) of processing pixels [x, x+size) × [y, y+size), read at ``resolution.level`` and
    resampled with the exact fractional source box (PIL), so neighbouring tiles agree where they overlap."""
    if resolution.scale == 1.0:
        return slide.read_region(resolution.level, x, y, size, size)
    from PIL import Image

    fx0, fy0 = x / resolution.scale, y / resolution.scale
    fx1, fy1 = (x + size) / resolution.scale, (y + size) / resolution.scale
    ix0, iy0 = int(math.floor(fx0)) - 1, int(math.floor(fy0)) - 1  # one pixel of context for the filter
    ix1, iy1 = int(math.ceil(fx1)) + 1, int(math.ceil(fy1)) + 1
    source = slide.read_region(resolution.level, ix0, iy0, ix1 - ix0, iy1 - iy0)
    box = (fx0 - ix0, fy0 - iy0, fx1 - ix0, fy1 - iy0)
    resample = Image.Resampling.BOX if resolution.scale < 1 else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(source).resize((size, size), resample=resample, box=box))
