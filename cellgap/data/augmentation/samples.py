"""A sample's arrays as the augmentation steps read and write them, and the check before augmenting."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor, get_track_meta
from monai.transforms import (
    MapTransform,
)
from monai.utils import TransformBackends, convert_to_dst_type, ensure_tuple

INTENSITY_MAX = 255.0  # images are augmented in 0..255 (docs/contracts.md)


def to_numpy(value) -> np.ndarray:
    if isinstance(value, MetaTensor):
        value = value.as_tensor()
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def rgb_image(value, key: Hashable) -> np.ndarray:
    array = to_numpy(value)
    if array.ndim != 3 or array.shape[0] != 3:
        raise ValueError(f"{key}: expected a channel-first RGB image of shape (3, H, W), got shape {tuple(array.shape)}")
    if array.dtype.kind not in "uif":
        raise ValueError(f"{key}: expected a numeric image (0..255), got dtype {array.dtype}")
    return array


def channels_first_image(value, key: Hashable) -> np.ndarray:
    array = to_numpy(value)
    if array.ndim != 3:
        raise ValueError(f"{key}: expected a channel-first (C, H, W) image, got shape {tuple(array.shape)}")
    return array


def like(array: np.ndarray, reference):
    """``array`` in the container type of ``reference`` (numpy, tensor, or MetaTensor with its metadata).

    With MetaTensor tracking off a MetaTensor reference gives a plain tensor, as MONAI's transforms do
    (building a MetaTensor costs ≈0.1 ms per key and call)."""
    if isinstance(reference, torch.Tensor) and (not isinstance(reference, MetaTensor) or not get_track_meta()):
        if reference.device.type == "cpu":
            return torch.from_numpy(np.ascontiguousarray(array))
    return convert_to_dst_type(array, reference, dtype=array.dtype)[0]


class CheckTiled(MapTransform):
    """Check a sample before augmentation; raise a ValueError naming the key otherwise.

    ``image_key``: (3, H, W) numeric RGB in 0..255 (a float image whose maximum is ≤ 1 looks already
    scaled and is refused: augment before scaling). ``label_keys``: (1, H, W) maps with the image's
    H and W holding non-negative integers (integer dtype, or float with integral values as
    ``LoadImaged`` gives them). ``optional_keys``: maps checked the same way when the sample has them.
    ``values=False`` checks keys, shapes and dtypes only (no pass over the pixels): before a crop from a
    large tile, whose values are then checked on the crop.
    """

    backend = [TransformBackends.NUMPY, TransformBackends.TORCH]

    def __init__(self, image_key: str = "image", label_keys: KeysCollection = ("label", "classes"),
                 allow_missing_keys: bool = False, optional_keys: KeysCollection = (), values: bool = True) -> None:
        self.image_key = image_key
        self.values = bool(values)
        self.label_keys = ensure_tuple(label_keys)
        self.optional_keys = tuple(k for k in ensure_tuple(optional_keys) if k not in self.label_keys)
        super().__init__(keys=(image_key, *self.label_keys), allow_missing_keys=allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        if self.image_key not in d:
            if self.allow_missing_keys:
                return d
            raise KeyError(f"{self.image_key}: key missing from the sample (keys: {sorted(map(str, d))})")
        image = rgb_image(d[self.image_key], self.image_key)
        if self.values and image.dtype.kind == "f" and image.size:
            low, high = (float(v) for v in torch.aminmax(torch.from_numpy(np.ascontiguousarray(image))))  # one pass
            if not (np.isfinite(low) and np.isfinite(high)) or low < 0 or high > INTENSITY_MAX:
                raise ValueError(f"{self.image_key}: expected intensities in 0..255, found {low:g}..{high:g}")
            if 0 < high <= 1:
                raise ValueError(
                    f"{self.image_key}: intensities lie in 0..{high:g}; the image looks scaled to 0..1 already, "
                    "augmentation expects 0..255 (scale after augmenting)"
                )
        for key in self.label_keys + self.optional_keys:
            if key not in d:
                if self.allow_missing_keys or key in self.optional_keys:
                    continue
                raise KeyError(f"{key}: key missing from the sample (keys: {sorted(map(str, d))})")
            label = to_numpy(d[key])
            if label.ndim != 3 or label.shape[0] != 1 or label.shape[1:] != image.shape[1:]:
                raise ValueError(
                    f"{key}: expected a (1, H, W) map matching {self.image_key} (1, {image.shape[1]}, {image.shape[2]}), "
                    f"got shape {tuple(label.shape)}"
                )
            if label.dtype.kind not in "iubf":
                raise ValueError(f"{key}: expected an integer map, got dtype {label.dtype}")
            if not self.values:
                continue
            if label.dtype.kind == "f":
                if not np.array_equal(label, np.round(label)):
                    raise ValueError(f"{key}: expected integer ids, found non-integer values (interpolated labels?)")
            if label.size and label.dtype.kind != "u" and label.min() < 0:
                raise ValueError(f"{key}: expected non-negative ids (0 = background), found {label.min()}")
        return d
