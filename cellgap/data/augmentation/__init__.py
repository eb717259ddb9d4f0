"""Training augmentation of CISCA (METHOD.md §7) as MONAI dictionary transforms.

The sample keys follow docs/contracts.md: ``image`` (3, H, W) in 0..255, uint8 as ``LoadTiled`` gives it
or float (augment *before* scaling to 0..1), ``label`` (1, H, W) instance map and ``classes`` (1, H, W)
class map. Geometric transforms move image and label maps with identical parameters (label maps by
exact index moves or nearest sampling, never interpolated); photometric transforms touch the image
only, in float32. The targets are recomputed afterwards from the augmented instance map by
``cellgap.targets.CISCATargetsd``.

:func:`cisca_augmentations` returns the ordered pipeline of §7 (augHE / augNissl). MONAI supplies
the crop, the kernels and draws of Gaussian blur and sharpening, contrast about the mean and
brightness; this package adds what MONAI lacks:

* :class:`RandLABStainJitterd` — RandStainNA-like jitter of the tile's CIELAB statistics towards
  per-dataset targets (:data:`STAIN_STATISTICS`);
* :class:`RandHSVShiftd` — hue / saturation / value shifts;
* :class:`RandCoarseElasticd` — the reference's coarse-grid elastic deformation (5×5 control
  points, ±10 px, border points pushed inwards), bilinear for the image and nearest for labels;
  :class:`RandDihedralElasticd` runs the turns/flips and this warp as one resampling;
* :class:`CheckTiled` — shape and dtype checks with messages that name the key;

and, for speed, equivalents of MONAI transforms that compute the same thing without MONAI's per-call
bookkeeping or with a faster kernel (each tested against the MONAI transform or its distribution):
:class:`RandDihedrald` (``RandRotate90d`` + a ``OneOf`` of ``RandFlipd``), :class:`RandSquareCropd`,
:class:`MedianSmooth3x3d`, :class:`RandGaussianBlurd`, :class:`RandSharpend`,
:class:`RandAdditiveGaussianNoised`, :class:`RandGammaContrastd` and :class:`ClipIntensityd`. With them the
augmentation of a 256² tile costs ≈7 instead of ≈12.6 ms.

Intended behaviour, not the reference quirks (METHOD.md §10.18/19): rotations draw k uniformly in
{0, 1, 2, 3}, the crop offset covers every valid position, elastic deformation interpolates the
image bilinearly. Not included: stain *normalisation* to fixed reference images (Vahadane, Macenko,
Ruifrok, Reinhard to ``HE1.png`` / Nissl references): the reference images are not distributed;
the LAB jitter covers the stain variation. CLAHE (skimage, ~10 ms per 256² tile, no MONAI
equivalent) is replaced by MONAI's gamma contrast, motion/box blur by Gaussian blur, and emboss is
left out. Timings: docs/benchmarks.md, "Data pipeline".

Reproducibility: every random draw goes through MONAI's ``self.R`` (the float32 noise through a
generator seeded from it), so
``Compose(cisca_augmentations()).set_random_state(seed)`` or ``monai.utils.set_determinism(seed)``
before building the ``Compose`` makes the whole pipeline repeatable.
"""

from .colour import RandHSVShiftd, lab8_to_rgb, rgb_to_lab8, shift_hsv
from .filters import (
    MedianSmooth3x3d,
    RandGaussianBlurd,
    RandSharpend,
    gaussian_filter_2d,
    gaussian_kernel,
    median3x3,
)
from .geometric import RandCoarseElasticd, RandDihedrald, RandDihedralElasticd, RandSquareCropd
from .intensity import ClipIntensityd, RandAdditiveGaussianNoised, RandGammaContrastd
from .recipe import (
    BLUR_NOISE_PROB,
    BLUR_NOISE_STD,
    BLUR_NOISE_WEIGHTS,
    BLUR_SIGMA,
    BRIGHTNESS_SCALE,
    BRIGHTNESS_SHIFT,
    COLOUR_PROB,
    COLOUR_WEIGHTS,
    CONTRAST_PROB,
    CONTRAST_WEIGHTS,
    GAMMA,
    HSV_SHIFTS,
    HUE_SHIFT,
    MEAN_CONTRAST,
    NOISE_PROB,
    NOISE_STD,
    SHARPEN_ALPHA,
    SHARPEN_SIGMA1,
    SHARPEN_SIGMA2,
    STAIN_PROB,
    cisca_augmentations,
)
from .samples import INTENSITY_MAX, CheckTiled
from .stain import STAIN_STATISTICS, RandLABStainJitterd, StainStatistics, stain_statistics

__all__ = [
    "BLUR_NOISE_PROB",
    "BLUR_NOISE_STD",
    "BLUR_NOISE_WEIGHTS",
    "BLUR_SIGMA",
    "BRIGHTNESS_SCALE",
    "BRIGHTNESS_SHIFT",
    "COLOUR_PROB",
    "COLOUR_WEIGHTS",
    "CONTRAST_PROB",
    "CONTRAST_WEIGHTS",
    "GAMMA",
    "HSV_SHIFTS",
    "HUE_SHIFT",
    "INTENSITY_MAX",
    "MEAN_CONTRAST",
    "NOISE_PROB",
    "NOISE_STD",
    "SHARPEN_ALPHA",
    "SHARPEN_SIGMA1",
    "SHARPEN_SIGMA2",
    "STAIN_PROB",
    "STAIN_STATISTICS",
    "CheckTiled",
    "ClipIntensityd",
    "MedianSmooth3x3d",
    "RandAdditiveGaussianNoised",
    "RandCoarseElasticd",
    "RandDihedralElasticd",
    "RandDihedrald",
    "RandGammaContrastd",
    "RandGaussianBlurd",
    "RandHSVShiftd",
    "RandLABStainJitterd",
    "RandSharpend",
    "RandSquareCropd",
    "StainStatistics",
    "cisca_augmentations",
    "gaussian_filter_2d",
    "gaussian_kernel",
    "lab8_to_rgb",
    "median3x3",
    "rgb_to_lab8",
    "shift_hsv",
    "stain_statistics",
]
