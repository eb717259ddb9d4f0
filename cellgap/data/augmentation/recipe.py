"""The ordered augmentation pipeline of METHOD.md §7 and its probabilities and ranges."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    CastToTyped,
    Compose,
    Identityd,
    OneOf,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    RandShiftIntensityd,
)
from monai.utils import ensure_tuple

from ...targets import CONTOUR_LEVELS_KEY
from .colour import RandHSVShiftd
from .filters import MedianSmooth3x3d, RandGaussianBlurd, RandSharpend
from .geometric import RandDihedralElasticd, RandSquareCropd
from .intensity import ClipIntensityd, RandAdditiveGaussianNoised, RandGammaContrastd
from .samples import INTENSITY_MAX, CheckTiled
from .stain import RandLABStainJitterd, StainStatistics

# The photometric steps of §7 (probabilities, OneOf member weights, ranges), read by cisca_augmentations and
# by its batch version, cellgap.data.device_augmentation.BatchPhotometricAugmentation.
STAIN_PROB = 0.7
BLUR_NOISE_PROB, BLUR_NOISE_WEIGHTS = 0.15, (0.3, 0.15, 0.2, 0.2)  # Gaussian blur, 3×3 median, Gaussian noise, sharpen
BLUR_SIGMA = (0.5, 1.5)  # per axis
BLUR_NOISE_STD = float(np.sqrt(20.0))  # the noise's std is drawn in [0, this]
# Unsharp mask img + α(img − blur): the reference's Sharpen α 0.05–0.1 on a 3×3 Laplacian-type kernel
# amounts to α·9 ≈ 0.45–0.9 against a 3×3 mean (≈ Gaussian σ 0.8).
SHARPEN_SIGMA1, SHARPEN_SIGMA2, SHARPEN_ALPHA = (0.1, 0.2), (0.7, 0.9), (0.45, 0.9)
CONTRAST_PROB, CONTRAST_WEIGHTS = 0.7, (0.5, 0.5, 0.2)  # gamma, contrast about the mean, brightness scale
GAMMA, MEAN_CONTRAST, BRIGHTNESS_SCALE = (0.7, 1.4), 0.15, 0.2  # the last two: factors in ± this
COLOUR_PROB, COLOUR_WEIGHTS = 0.65, (1.0, 1.0)  # HSV shift, hue shift + brightness shift
HSV_SHIFTS = (10.0, 30 / 255, 20.0)  # ± hue (degrees), saturation (fraction), value (image units)
HUE_SHIFT, BRIGHTNESS_SHIFT = 36.0, 0.1 * INTENSITY_MAX  # ± each
NOISE_PROB, NOISE_STD = 0.15, 0.03 * INTENSITY_MAX  # the noise's std is drawn in [0, NOISE_STD]


def _one_of(transforms: list, weights: Sequence[float], prob: float, keys) -> OneOf:
    """The reference's ``OneOf(p)``: fire with probability ``prob``, then pick one member ∝ ``weights``
    (MONAI's OneOf always fires, so an identity member takes the remaining probability)."""
    total = float(sum(weights))
    return OneOf([*transforms, Identityd(keys)], weights=[prob * w / total for w in weights] + [1.0 - prob])


def cisca_augmentations(image_key: str = "image", label_keys: KeysCollection = ("label", "classes"),
                        stain_stats: str | Mapping | StainStatistics | None = "he", crop_size: int | None = 256,
                        prob_scale: float = 1.0, photometric: bool = True) -> list:
    """The ordered training augmentations of METHOD.md §7 as MONAI dictionary transforms.

    Args:
        image_key: the (3, H, W) RGB image in 0..255 (uint8 or float; float32 after the spatial steps).
        label_keys: (1, H, W) maps moved with the image without interpolation (instance map, class map).
            The stored tile's ``contour_levels`` (``cellgap.targets.ContourLevelsd``) move with them when
            the sample has them; the checks before augmenting make sure the image and these keys are there.
        stain_stats: dataset whose LAB statistics drive the stain jitter (``"pannuke"``, ``"conic"``,
            ``"cytodark0"``, ``"he"`` = neutral H&E), a mapping (see :func:`stain_statistics`), or None
            to leave the stain step out.
        crop_size: side of the random square crop taken first from larger tiles, at a uniform offset
            over all valid positions. The crop comes first, so a 1024² tile costs what a 256² one does;
            the reference crops after augmenting, which differs only in the statistics the stain and
            contrast steps read (crop instead of whole tile) and in the elastic border rule applying
            at the crop's edges.
            Tiles not larger than it pass whole; None: no crop.
        prob_scale: multiplies every step's probability (capped at 1); 0 leaves check, crop and clip only.
        photometric: False leaves out every step that changes colours or intensities (stain, blur/noise,
            contrast, colour, noise, clip): the list ends with the elastic step and a float32 cast, for
            ``cellgap.data.device_augmentation.BatchPhotometricAugmentation`` to apply them on the batch.

    Steps and probabilities: stain 0.7; rot90 0.9 (k uniform in {0,1,2,3}); flip 0.9 (vertical,
    horizontal or both, uniformly); elastic 0.7; blur/noise 0.15 (Gaussian blur 0.3, median 0.15,
    Gaussian noise 0.2, sharpen 0.2); contrast 0.7 (gamma 0.5, contrast about the mean 0.5,
    brightness 0.2); colour 0.65 (HSV shift ±10°/±30/±20, or hue ±36° + brightness ±25.5, equally);
    additive noise 0.15 (σ ≤ 0.03·255); finally the image is clipped to 0..255. The image is float32 from
    the elastic step on (a cast after it when neither the stain step nor the elastic step fired).

    Usable from a bundle config: ``"$cellgap.data.augmentation.cisca_augmentations(stain_stats='pannuke')"``.
    """
    label_keys = tuple(ensure_tuple(label_keys))
    if not isinstance(image_key, str) or not image_key:
        raise ValueError(f"image_key: expected a non-empty key name, got {image_key!r}")
    if image_key in label_keys:
        raise ValueError(f"label_keys: must not contain the image key {image_key!r}")
    if isinstance(prob_scale, bool) or not isinstance(prob_scale, (int, float)) or not (prob_scale >= 0 and np.isfinite(prob_scale)):
        raise ValueError(f"prob_scale: expected a finite number ≥ 0, got {prob_scale!r}")
    if crop_size is not None and (isinstance(crop_size, bool) or not isinstance(crop_size, (int, np.integer)) or crop_size < 1):
        raise ValueError(f"crop_size: expected a positive integer (pixels) or None, got {crop_size!r}")

    def p(value: float) -> float:
        return min(1.0, value * prob_scale)

    # A stored tile's contour levels (ContourLevelsd), when present, move with the label maps; the check
    # makes the image and label_keys required, so the spatial steps may skip the keys a sample lacks.
    check = CheckTiled(image_key, label_keys, optional_keys=(CONTOUR_LEVELS_KEY,))
    spatial = (image_key, *check.label_keys, *check.optional_keys)
    out: list = [check]
    if crop_size is not None:  # values checked on the crop: a pass over a 2048² tile's maps costs ≈1 ms
        structure = CheckTiled(image_key, label_keys, optional_keys=(CONTOUR_LEVELS_KEY,), values=False)
        crop = RandSquareCropd(spatial, roi_size=int(crop_size), random_size=False, allow_missing_keys=True)
        out = [structure, crop, check]
    if stain_stats is not None and photometric:
        out.append(RandLABStainJitterd(image_key, stats=stain_stats, prob=p(STAIN_PROB)))
    out.append(RandDihedralElasticd(spatial, mode=("bilinear",) + ("nearest",) * (len(spatial) - 1), rotate_prob=p(0.9),
                                    flip_prob=p(0.9), elastic_prob=p(0.7), allow_missing_keys=True))
    out.append(CastToTyped(image_key, dtype=torch.float32))  # the loader's uint8 image: photometric steps compute in float32
    if not photometric:
        return out
    blur_noise = [
        RandGaussianBlurd(image_key, sigma_x=BLUR_SIGMA, sigma_y=BLUR_SIGMA, prob=1.0),
        MedianSmooth3x3d(image_key),
        RandAdditiveGaussianNoised(image_key, mean=0.0, std=BLUR_NOISE_STD, prob=1.0),
        RandSharpend(image_key, sigma1_x=SHARPEN_SIGMA1, sigma1_y=SHARPEN_SIGMA1, sigma2_x=SHARPEN_SIGMA2,
                                  sigma2_y=SHARPEN_SIGMA2, alpha=SHARPEN_ALPHA, prob=1.0),
    ]
    out.append(_one_of(blur_noise, BLUR_NOISE_WEIGHTS, p(BLUR_NOISE_PROB), image_key))
    contrast = [
        RandGammaContrastd(image_key, gamma=GAMMA, prob=1.0),
        RandScaleIntensityFixedMeand(image_key, factors=MEAN_CONTRAST, fixed_mean=True, prob=1.0),
        RandScaleIntensityd(image_key, factors=BRIGHTNESS_SCALE, prob=1.0),
    ]
    out.append(_one_of(contrast, CONTRAST_WEIGHTS, p(CONTRAST_PROB), image_key))
    colour = [
        RandHSVShiftd(image_key, *HSV_SHIFTS),
        Compose([
            RandHSVShiftd(image_key, hue_shift=HUE_SHIFT, saturation_shift=0.0, value_shift=0.0),
            RandShiftIntensityd(image_key, offsets=BRIGHTNESS_SHIFT, prob=1.0),
        ]),
    ]
    out.append(_one_of(colour, COLOUR_WEIGHTS, p(COLOUR_PROB), image_key))
    out.append(RandAdditiveGaussianNoised(image_key, mean=0.0, std=NOISE_STD, prob=p(NOISE_PROB)))
    out.append(ClipIntensityd(image_key, 0.0, INTENSITY_MAX))
    return out
