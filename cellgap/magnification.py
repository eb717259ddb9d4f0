"""Magnification-dependent constants of the CISCA method (METHOD.md §1.2, §4, §5).

Every structuring element, fragment size, default minimum cell size and detection radius that
depends on magnification lives here, so that targets, post-processing and metrics read them from
one profile instead of literals.  The reference method defines a 20x and a 40x profile; any other
magnification or pixel size is mapped to the nearer of the two on a log scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Pixel size of the two reference profiles, in micrometres per pixel.
MPP_40X = 0.25
MPP_20X = 0.5


def square(side: int) -> np.ndarray:
    return np.ones((side, side), dtype=bool)


def cross3() -> np.ndarray:
    return np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)


def diamond(radius: int) -> np.ndarray:
    """City-block ball, identical to ``skimage.morphology.disk(radius)`` for radius ≤ 2."""
    r = np.arange(-radius, radius + 1)
    return (np.abs(r)[:, None] + np.abs(r)[None, :]) <= radius


def disk(radius: int) -> np.ndarray:
    """Euclidean ball, as ``skimage.morphology.disk``."""
    r = np.arange(-radius, radius + 1)
    return (r[:, None] ** 2 + r[None, :] ** 2) <= radius**2


def row_disk(row_widths: list[int]) -> np.ndarray:
    """A centred disk given by the number of ones per row (MATLAB ``strel('disk')`` shapes)."""
    side = max(row_widths)
    out = np.zeros((len(row_widths), side), dtype=bool)
    for i, w in enumerate(row_widths):
        start = (side - w) // 2
        out[i, start : start + w] = True
    return out


@dataclass(frozen=True)
class MagnificationProfile:
    """All magnification-dependent constants used by targets, post-processing and metrics."""

    magnification: int
    mpp: float
    # Contour target (METHOD.md §1.2).
    se_gap: np.ndarray
    se_boundary: np.ndarray
    se_boundary_large: np.ndarray
    se_thin: np.ndarray
    se_fragment_1: np.ndarray
    se_fragment_2: np.ndarray
    fragment_size_1: int
    fragment_size_2: int
    max_hole_area: int
    # "Tips" distance maps border width (METHOD.md §1.4); the default full-range maps ignore it.
    tips_border: int
    # Post-processing (METHOD.md §4).
    default_min_cell_size: int
    min_cell_size_candidates: tuple[int, ...]  # grid searched on the validation split (METHOD.md §4)
    skeleton_dilation: int
    marker_erosion_radius: int
    min_residue_size: int
    mask_opening_se: np.ndarray
    # Metrics (METHOD.md §5).
    detection_radius: float

    @property
    def name(self) -> str:
        return f"{self.magnification}x"


PROFILE_20X = MagnificationProfile(
    magnification=20,
    mpp=MPP_20X,
    se_gap=square(5),
    se_boundary=square(3),
    se_boundary_large=square(5),
    se_thin=square(3),
    se_fragment_1=square(3),
    se_fragment_2=cross3(),
    fragment_size_1=2,
    fragment_size_2=4,
    max_hole_area=3,
    tips_border=13,
    default_min_cell_size=24,
    min_cell_size_candidates=(17, 20, 23, 26, 29, 32),
    skeleton_dilation=3,
    marker_erosion_radius=1,
    min_residue_size=2,
    mask_opening_se=cross3(),
    detection_radius=6.0,
)

PROFILE_40X = MagnificationProfile(
    magnification=40,
    mpp=MPP_40X,
    se_gap=row_disk([5, 7, 9, 9, 9, 9, 9, 7, 5]),
    se_boundary=diamond(2),
    se_boundary_large=row_disk([7, 9, 11, 11, 11, 11, 11, 11, 11, 9, 7]),
    se_thin=square(5),
    se_fragment_1=diamond(2),
    se_fragment_2=square(3),
    fragment_size_1=6,
    fragment_size_2=11,
    max_hole_area=8,
    tips_border=21,
    default_min_cell_size=80,
    min_cell_size_candidates=(50, 55, 60, 65, 70, 75, 80),
    skeleton_dilation=5,
    marker_erosion_radius=2,
    min_residue_size=3,
    mask_opening_se=square(3),
    detection_radius=12.0,
)

PROFILES = {20: PROFILE_20X, 40: PROFILE_40X}


def parse_magnification(value: float | str) -> float:
    """A magnification as a number: ``40``, ``40.0``, ``"40"`` or ``"40x"`` → 40.0 (the one place "40x" is read)."""
    text = str(value).strip().lower().rstrip("x")
    try:
        mag = float(text)
    except ValueError:
        raise ValueError(f"magnification: expected a number such as 20, 40 or '40x', got {value!r}") from None
    if not mag > 0:
        raise ValueError(f"magnification: expected a positive number, got {value!r}")
    return mag


def profile_for(magnification: float | str | None = None, mpp: float | None = None) -> MagnificationProfile:
    """Return the reference profile nearest to a magnification (e.g. ``40``, ``"20x"``) or a pixel size.

    Exactly one of ``magnification`` and ``mpp`` must be given.  Values between the two reference
    profiles go to the nearer one on a log scale (the split is at about 28x / 0.35 µm per pixel).
    """
    if (magnification is None) == (mpp is None):
        raise ValueError("profile_for: give exactly one of magnification (e.g. 40 or '40x') or mpp (µm/pixel)")
    if magnification is not None:
        mpp = 10.0 / parse_magnification(magnification)  # the usual 40x ≈ 0.25 µm/px convention
    if not (isinstance(mpp, (int, float)) and math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp: expected a positive pixel size in µm/pixel, got {mpp!r}")
    split = math.sqrt(MPP_20X * MPP_40X)
    return PROFILE_40X if mpp <= split else PROFILE_20X
