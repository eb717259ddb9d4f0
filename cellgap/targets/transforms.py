"""The MONAI dictionary transforms that add the targets to a sample (names from docs/contracts.md)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.utils import convert_to_dst_type
from skimage.measure import label as connected_components

from ..magnification import profile_for
from .labels import instance_map
from .maps import (
    BACKGROUND,
    CLEFT,
    CONTOUR_CLASS_COUNTS,
    DISTANCE_MODES,
    check_radius,
    contour_levels,
    distance_maps,
    weight_mask,
)

# Sample keys of a stored tile's contour-level map and of the profile it was computed with.
CONTOUR_LEVELS_KEY = "contour_levels"
CONTOUR_PROFILE_KEY = "contour_levels_profile"


def _channel_map(value, key: str) -> np.ndarray:
    """(1, H, W) tensor/array → (H, W) numpy, with a message naming ``key`` otherwise."""
    array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if array.ndim != 3 or array.shape[0] != 1:
        raise ValueError(f"{key}: expected a (1, H, W) map, got shape {tuple(array.shape)}")
    return instance_map(array[0], key)


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
        check_radius("weight_radius", weight_radius)
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
        if levels.size and levels.max() > CLEFT:
            raise ValueError(f"{CONTOUR_LEVELS_KEY}: expected contour levels 0..{CLEFT}, found {int(levels.max())}")
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
