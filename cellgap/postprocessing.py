"""CISCA post-processing: network outputs → cell instances with one class each (METHOD.md §4).

Steps, for one tile or one stitched image:

1. foreground probability ``fg`` (K=3: boundary + body, K=2: foreground) and ``F = fg ≥ fg_threshold``;
2. contour evidence from the directional distance maps: cross-correlation with 5×5 derivative kernels,
   ``Cmap`` = the strongest negative derivative over the maps, kept inside ``F``, ``Cth = Cmap ≥ contour_threshold``;
3. energy = mix of ``1 − p_body`` and ``1 − blur((1 − Cth)·F)``: low in confident cell interiors;
4. markers: body-argmax pixels minus the contour skeleton band, small pieces dropped, eroded (pieces that
   vanish under erosion are kept whole), fragments closer than ~2 px merged;
5. watershed of the energy from the markers inside the (hole-filled, opened) foreground mask;
6. size filter and a soft-vote class per instance.

Steps 1–3 run in torch on the input's device (GPU-capable); steps 4–6 run on the CPU with scipy.ndimage and
scikit-image.  Every magnification-dependent constant comes from a :class:`~cellgap.magnification.MagnificationProfile`.

Differences from the reference code, on purpose (METHOD.md §10.9):

* ``distance_normalisation="fixed"`` (default) min–max normalises the derivative responses with their known
  extremes ±J (J: response to an ideal +1 → −1 jump between neighbouring instances) instead of the extremes
  found in the processed input, so a tile gives the same instances alone or inside a slide.  ``"minmax"``
  reproduces the reference per-input normalisation.
* K=2 uses the *foreground* probability in the energy (the reference uses the background one).
* The watershed mask really fills holes smaller than 5 px (a no-op in the reference).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import convert_to_dst_type
from scipy import ndimage as ndi
from skimage.morphology import skeletonize
from skimage.segmentation import watershed

from .derivatives import derivative_kernels
from .magnification import MagnificationProfile, disk, profile_for
from .targets.morphology import dilate, erode

DISTANCE_NORMALISATIONS = ("fixed", "minmax")

# The reference fills watershed-mask holes smaller than 5 px at every magnification.
WATERSHED_MASK_HOLE_SIZE = 5

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
_STRIP_PIXELS = 256 * 256  # CPU correlation works on strips of about this many pixels
_FOUR_CONNECTED = ndi.generate_binary_structure(2, 1)


@lru_cache(maxsize=16)
def _kernels(num_maps: int, device: torch.device) -> torch.Tensor:
    """The [h, v, tl, bl] derivative kernels (cellgap.derivatives), the first two for 2 maps; cached per device."""
    return derivative_kernels()[:num_maps].to(device)


def interface_responses(num_maps: int = 4) -> torch.Tensor:
    """Magnitude ``J`` of each kernel's response to an ideal +1 → −1 jump between two neighbouring instances.

    A map that is +1 on one side of a straight interface and −1 on the other, with the kernel centred on
    the last +1 pixel, gives ``−Σ|k|``, the most negative response a map in [−1, 1] can give (a −1 → +1
    jump gives ``+Σ|k|``): 8.4 for h and v, 12.2 for the diagonals.
    """
    if num_maps not in (2, 4):
        raise ValueError(f"num_maps: expected 4 (h, v, tl, bl) or 2 (h, v), got {num_maps!r}")
    return _interface_responses(num_maps, torch.device("cpu")).clone()


@lru_cache(maxsize=16)
def _interface_responses(num_maps: int, device: torch.device) -> torch.Tensor:
    return _kernels(num_maps, device).abs().sum(dim=(1, 2))


@lru_cache(maxsize=16)
def _unit_interface_kernels(num_maps: int, device: torch.device) -> torch.Tensor:
    """Kernels divided by their ideal-interface response J: an ideal +1 → −1 interface responds with −1."""
    return _kernels(num_maps, device) / _interface_responses(num_maps, device)[:, None, None]


def _correlate(maps: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Per-channel 5×5 cross-correlation with replicate padding, for antisymmetric kernels (k(−t) = −k(t)).

    Written as 12 weighted differences of shifted views: exact, works on any device, and on one CPU core it
    is several times faster and far steadier than torch's depthwise conv2d for 1-channel 5×5 kernels.  On
    the CPU, images larger than a tile go in strips of about a tile's pixels, which stay in cache (2× faster
    on a 1024² image).
    """
    reach = kernels.shape[-1] // 2
    channels, height, width = maps.shape
    # Replicate padding: a cell cut by the image edge gets no artificial jump there, and an image whose
    # border is background (0) gives exactly the responses it would give inside a larger empty field.
    padded = F.pad(maps[None], (reach,) * 4, mode="replicate")[0]
    taps = [(dy, dx, kernels[:, reach + dy, reach + dx][:, None, None]) for dy in range(reach + 1) for dx in range(-reach, reach + 1)]
    taps = [tap for tap in taps if tap[0] > 0 or tap[1] > 0]  # each tap pairs with its mirror −t
    out = torch.empty_like(maps)
    rows = height if maps.device.type != "cpu" else max(8, _STRIP_PIXELS // width)
    for top in range(0, height, rows):
        strip = out[:, top : top + rows]
        strip.zero_()
        difference = torch.empty_like(strip)
        below = top + strip.shape[1]
        for dy, dx, weight in taps:
            ahead = padded[:, top + reach + dy : below + reach + dy, reach + dx : reach + dx + width]
            behind = padded[:, top + reach - dy : below + reach - dy, reach - dx : reach - dx + width]
            strip.addcmul_(torch.sub(ahead, behind, out=difference), weight)
    return out


@dataclass
class CellInstances:
    """Instances found in one image.

    ``instance_map``: int32 (H, W), 0 = background, 1..N sequential.  ``classes``: int64 (N,), class
    (1..C) of instance ``i + 1``.  ``class_probs``: float32 (N,), mean probability of the chosen class
    over the instance's pixels (single-class: mean foreground probability).  ``type_map``: uint8 (H, W),
    each instance painted with its class.
    """

    instance_map: np.ndarray
    classes: np.ndarray
    class_probs: np.ndarray
    type_map: np.ndarray

    def __len__(self) -> int:
        return len(self.classes)

    def cells(self) -> list[dict]:
        """One dict per instance: ``id``, ``class``, ``class_prob``, ``centroid`` (row, col), ``area`` (pixels)."""
        n = len(self.classes)
        rows, cols = np.nonzero(self.instance_map)
        ids = self.instance_map[rows, cols]
        area = np.bincount(ids, minlength=n + 1)[1:]
        safe_area = np.maximum(area, 1)
        centre_row = np.bincount(ids, weights=rows, minlength=n + 1)[1:] / safe_area
        centre_col = np.bincount(ids, weights=cols, minlength=n + 1)[1:] / safe_area
        return [
            {
                "id": i + 1,
                "class": int(self.classes[i]),
                "class_prob": float(self.class_probs[i]),
                "centroid": (float(centre_row[i]), float(centre_col[i])),
                "area": int(area[i]),
            }
            for i in range(n)
        ]


def _as_float_tensor(value, name: str, device: torch.device | None = None) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        tensor = value.as_tensor() if hasattr(value, "as_tensor") else value  # MetaTensor → plain tensor
        tensor = tensor.detach()
    elif isinstance(value, np.ndarray):
        tensor = torch.from_numpy(value)
    else:
        raise TypeError(f"{name}: expected a numpy array or a torch tensor, got {type(value).__name__}")
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise TypeError(f"{name}: expected real-valued probabilities or maps, got dtype {tensor.dtype}")
    if tensor.ndim != 3:
        raise ValueError(f"{name}: expected a (channels, H, W) array, got shape {tuple(tensor.shape)}")
    if device is not None:
        tensor = tensor.to(device)
    return tensor.float()


def _check_values(tensor: torch.Tensor, name: str, probabilities: bool) -> None:
    """Finite values everywhere (one min/max pass: NaN and ±inf show in it), and [0, 1] for probabilities."""
    low, high = (float(v) for v in torch.aminmax(tensor))
    if not (math.isfinite(low) and math.isfinite(high)):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"{name}: expected finite values, found {bad} NaN or inf value(s)")
    if probabilities and (low < -1e-4 or high > 1 + 1e-4):
        raise ValueError(
            f"{name}: expected softmax probabilities in [0, 1], got values in [{low:.3g}, {high:.3g}] "
            "(logits? apply softmax first, or use CISCAPostProcessingd(logits=True))"
        )


def _validate_options(contour_threshold, fg_threshold, energy_weight, distance_normalisation, min_cell_size) -> None:
    if distance_normalisation not in DISTANCE_NORMALISATIONS:
        raise ValueError(f"distance_normalisation: expected one of {DISTANCE_NORMALISATIONS}, got {distance_normalisation!r}")
    for name, value in (("contour_threshold", contour_threshold), ("fg_threshold", fg_threshold), ("energy_weight", energy_weight)):
        if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
            raise ValueError(f"{name}: expected a number in [0, 1], got {value!r}")
    if min_cell_size is not None and not (isinstance(min_cell_size, (int, np.integer)) and min_cell_size >= 0):
        raise ValueError(f"min_cell_size: expected a non-negative integer number of pixels or None, got {min_cell_size!r}")


def contour_evidence(distance: torch.Tensor, normalisation: str = "fixed") -> torch.Tensor:
    """Contour evidence (H, W) from (4 or 2, H, W) distance maps, max over the maps (METHOD.md §4 step 2a–d,
    before masking by the foreground); high = strong negative derivative, i.e. an instance interface.

    ``"fixed"``: 0.5 for a flat map, 1 at an ideal +1 → −1 interface, 0 at an ideal −1 → +1 one, the same
    wherever the image sits in a larger field.  ``"minmax"``: the reference's per-input min–max normalisation
    (at the image edge with replicate padding, where OpenCV's filter2D in the reference reflects).
    """
    if normalisation not in DISTANCE_NORMALISATIONS:
        raise ValueError(f"normalisation: expected one of {DISTANCE_NORMALISATIONS}, got {normalisation!r}")
    # Per-channel kernel scale does not change a per-channel min–max, so both modes use the J-scaled kernels.
    kernels = _unit_interface_kernels(distance.shape[0], distance.device)
    if normalisation == "minmax":
        # Reference behaviour: min–max per channel over this input, then per response (METHOD.md §4 step 2).
        low = distance.amin(dim=(1, 2), keepdim=True)
        span = distance.amax(dim=(1, 2), keepdim=True) - low
        distance = torch.where(span > 0, (distance - low) / span.clamp_min(1e-12), torch.zeros_like(distance))
        response = _correlate(distance, kernels)
        low = response.amin(dim=(1, 2), keepdim=True)
        span = response.amax(dim=(1, 2), keepdim=True) - low
        evidence = torch.where(span > 0, 1 - (response - low) / span.clamp_min(1e-12), torch.zeros_like(response))
        return evidence.amax(dim=0)
    # The reference's min–max with the responses' known extremes ±J (ideal falling / rising interface jumps)
    # instead of this input's: 0.5 − r / (2J), i.e. flat map → 0.5, ideal +1 → −1 interface → 1.
    return 0.5 - 0.5 * _correlate(distance, kernels).amin(dim=0)


def _blur3(image: torch.Tensor) -> torch.Tensor:
    """3×3 Gaussian blur with OpenCV's default kernel for ksize 3, [1, 2, 1]/4 per axis (σ ≈ 0.8), separably."""
    padded = F.pad(image[None, None], (1, 1, 1, 1), mode="replicate")[0, 0]
    rows = 0.5 * padded[:, 1:-1] + 0.25 * (padded[:, :-2] + padded[:, 2:])
    return 0.5 * rows[1:-1] + 0.25 * (rows[:-2] + rows[2:])


def _dense_steps(contour, distance, fg_threshold, contour_threshold, energy_weight, normalisation):
    """Torch part of METHOD.md §4 (steps 1–4a, 6a) on the input's device; returns CPU numpy arrays."""
    if contour.shape[0] == 3:
        fg_prob = contour[0] + contour[1]
        body_prob = contour[1]
        seeds = (contour[1] > contour[0]) & (contour[1] > contour[2])
        mask = fg_prob > contour[2]
    else:
        fg_prob = contour[0]
        body_prob = contour[0]  # intended behaviour; the reference uses the background channel here
        seeds = contour[0] > contour[1]
        mask = seeds
    foreground = fg_prob >= fg_threshold
    on_contour = foreground & (contour_evidence(distance, normalisation) >= contour_threshold)
    smooth_interior = _blur3((foreground & ~on_contour).float())
    # (1 − w)·(1 − p_body) + w·(1 − smooth_interior), the reference energy without its 255 scale
    energy = 1 - (1 - energy_weight) * body_prob - energy_weight * smooth_interior
    floats = torch.stack([energy, fg_prob]).cpu().numpy()
    flags = torch.stack([on_contour, seeds, mask]).cpu().numpy()
    return floats[0], floats[1], flags[0], flags[1], flags[2]


def _markers(seeds: np.ndarray, on_contour: np.ndarray, profile: MagnificationProfile, min_cell_size: int) -> np.ndarray:
    """Marker labels from the body seeds (METHOD.md §4 steps 4–5)."""
    if on_contour.any():
        skeleton_band = dilate(skeletonize(on_contour), np.ones((profile.skeleton_dilation,) * 2, bool))
        seeds = seeds & ~(on_contour & skeleton_band)
    pieces, n = ndi.label(seeds, structure=_EIGHT_CONNECTED)
    if n == 0:
        return pieces
    sizes = np.bincount(pieces.ravel(), minlength=n + 1)
    big = sizes >= int(min_cell_size / 4)
    big[0] = False
    seeds = big[pieces]
    # Erosion + reconstruction by dilation, done with the piece labels: a piece that loses every pixel under
    # erosion is a residue and is kept whole; the others keep only their eroded core.
    core = erode(seeds, disk(profile.marker_erosion_radius))
    survives = np.bincount(pieces[core], minlength=n + 1) > 0
    marker_pixels = core | (seeds & ~survives[pieces])
    # Merge fragments closer than ~2 px: label the dilated markers, keep the labels on the marker pixels
    # (the reference's grey erosion with disk(1) before restricting to the markers changes nothing there).
    grown, m = ndi.label(dilate(marker_pixels, disk(1)), structure=_EIGHT_CONNECTED)
    markers = np.where(marker_pixels, grown, 0)
    marker_sizes = np.bincount(markers.ravel(), minlength=m + 1)
    keep = marker_sizes >= profile.min_residue_size
    keep[0] = False
    return np.where(keep[markers], markers, 0)


def _watershed_mask(mask: np.ndarray, profile: MagnificationProfile) -> np.ndarray:
    """Foreground mask with holes < 5 px filled, then opened (METHOD.md §4 step 6)."""
    # Hand-written hole filling: skimage's remove_small_holes also fills background pieces touching the image
    # edge, which depend on where a tile is cut; only enclosed holes are filled here.
    holes, n = ndi.label(~mask, structure=_FOUR_CONNECTED)
    if n:
        sizes = np.bincount(holes.ravel(), minlength=n + 1)
        small = sizes < WATERSHED_MASK_HOLE_SIZE
        small[0] = False
        edge = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
        small[edge] = False
        mask = mask | small[holes]
    return dilate(erode(mask, profile.mask_opening_se), profile.mask_opening_se)


def _flood(energy: np.ndarray, markers: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """8-connected marker-controlled watershed of ``energy`` inside ``mask`` (METHOD.md §4 step 7).

    skimage pushes every marker pixel onto its heap, and its cost grows faster than linearly with the heap.
    Marker pixels whose 8 neighbours all carry their own label can flood nothing, so they are left out of
    the call and put back afterwards: the same result, with a heap several times smaller.
    """
    markers = np.where(mask, markers, 0)
    interior = markers > 0
    height, width = markers.shape
    for dr, dc in ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)):
        here = np.s_[max(0, -dr) : height - max(0, dr), max(0, -dc) : width - max(0, dc)]
        there = np.s_[max(0, dr) : height + min(0, dr), max(0, dc) : width + min(0, dc)]
        interior[here] &= markers[here] == markers[there]
    labels = watershed(energy, np.where(interior, 0, markers), mask=mask & ~interior, connectivity=2)
    labels[interior] = markers[interior]
    return labels


def _size_filter(labels: np.ndarray, min_cell_size: int) -> np.ndarray:
    """Drop instances and 4-connected foreground pieces smaller than ``min_cell_size``; relabel 1..N."""
    n = int(labels.max())
    if n == 0:
        return labels.astype(np.int32)
    keep = np.bincount(labels.ravel(), minlength=n + 1) >= min_cell_size
    keep[0] = False
    kept = keep[labels]
    pieces, m = ndi.label(kept, structure=_FOUR_CONNECTED)
    if m:
        kept &= (np.bincount(pieces.ravel(), minlength=m + 1) >= min_cell_size)[pieces]
    present = np.bincount(labels[kept], minlength=n + 1) > 0
    new_ids = (np.cumsum(present) * present).astype(np.int32)
    return np.where(kept, new_ids[labels], 0).astype(np.int32)


def _soft_vote(instance_map: np.ndarray, n: int, type_prob: np.ndarray | None, fg_prob: np.ndarray):
    """Class and class probability per instance: summed class probabilities, argmax over classes 1..C."""
    ids = instance_map.ravel()
    area = np.maximum(np.bincount(ids, minlength=n + 1)[1:], 1)
    if type_prob is None:
        mean_fg = np.bincount(ids, weights=fg_prob.ravel(), minlength=n + 1)[1:] / area
        return np.ones(n, dtype=np.int64), mean_fg.astype(np.float32)
    sums = np.stack([np.bincount(ids, weights=channel.ravel(), minlength=n + 1)[1:] for channel in type_prob[1:]])
    classes = sums.argmax(axis=0) + 1  # background (channel 0) is never assigned to an instance
    class_probs = sums[classes - 1, np.arange(n)] / area
    return classes.astype(np.int64), class_probs.astype(np.float32)


def postprocess(
    contour_prob,
    distance,
    type_prob=None,
    *,
    profile: MagnificationProfile,
    min_cell_size: int | None = None,
    contour_threshold: float = 0.57,
    fg_threshold: float = 0.5,
    energy_weight: float = 0.5,
    distance_normalisation: str = "fixed",
) -> CellInstances:
    """Turn CISCA network outputs for one image into cell instances with a class each (METHOD.md §4).

    Args:
        contour_prob: (K, H, W) softmax probabilities; K=3 [boundary, body, background] or K=2
            [foreground, background].  numpy array or torch tensor on any device.
        distance: (4, H, W) directional maps [h, v, tl, bl] in [−1, 1], or (2, H, W) [h, v].
        type_prob: (C+1, H, W) class softmax with background as channel 0, or None for single-class.
        profile: magnification profile (skeleton dilation, marker erosion radius, residue size, mask
            opening element, default minimum cell size).
        min_cell_size: instances smaller than this (pixels) are dropped; None = ``profile.default_min_cell_size``.
            Marker pieces smaller than a quarter of it are dropped too.
        contour_threshold: contour evidence at or above this marks an instance interface.
        fg_threshold: foreground probability at or above this is foreground for the contour evidence.
        energy_weight: weight of the contour term in the watershed energy; ``1 − energy_weight`` weights
            ``1 − p_body``.
        distance_normalisation: ``"fixed"`` (default): the maps are taken in their known range [−1, 1] and
            each derivative response ``r`` becomes ``0.5 − r / (2J)``, with ``J`` the magnitude of the response
            to an ideal +1 → −1 jump between neighbouring instances (:func:`interface_responses`; ``±J`` are
            the extremes any map in [−1, 1] can reach).  This is the reference's min–max normalisation with
            those fixed extremes instead of the input's own, so the evidence does not depend on the field of
            view: a flat map gives 0.5, an ideal interface 1, and 0.57 keeps its meaning of "a derivative
            clearly more negative than flat" (a falling derivative of at least 14 % of an ideal interface;
            on crowded synthetic tiles the reference's per-tile extremes put it at 10–45 %).  ``"minmax"``: the
            reference behaviour, min–max normalisation of maps and responses over *this input*, so results
            depend on the tile or field of view (METHOD.md §10.9).

    Returns:
        :class:`CellInstances`.  Class per instance: the class probabilities are summed over the instance's
        pixels and the argmax over classes 1..C is taken (background is never assigned); ``class_probs`` is
        the mean probability of that class over the instance.  Single-class: class 1 and the mean
        foreground probability.
    """
    if not isinstance(profile, MagnificationProfile):
        raise TypeError(f"profile: expected a MagnificationProfile (cellgap.magnification.profile_for), got {type(profile).__name__}")
    _validate_options(contour_threshold, fg_threshold, energy_weight, distance_normalisation, min_cell_size)
    contour = _as_float_tensor(contour_prob, "contour_prob")
    device = contour.device
    distance_maps = _as_float_tensor(distance, "distance", device)
    if contour.shape[0] not in (2, 3):
        raise ValueError(f"contour_prob: expected K=3 (boundary, body, background) or K=2 (foreground, background) channels, got {contour.shape[0]}")
    if distance_maps.shape[0] not in (2, 4):
        raise ValueError(f"distance: expected 4 channels (h, v, tl, bl) or 2 (h, v), got {distance_maps.shape[0]}")
    size = tuple(contour.shape[1:])
    if tuple(distance_maps.shape[1:]) != size:
        raise ValueError(f"distance: expected H×W {size} as contour_prob, got {tuple(distance_maps.shape[1:])}")
    _check_values(contour, "contour_prob", probabilities=True)
    _check_values(distance_maps, "distance", probabilities=False)
    types = None
    if type_prob is not None:
        types = _as_float_tensor(type_prob, "type_prob", device)
        if not 2 <= types.shape[0] <= 256:
            raise ValueError(f"type_prob: expected C+1 channels (background first) with 1 ≤ C ≤ 255, got {types.shape[0]}")
        if tuple(types.shape[1:]) != size:
            raise ValueError(f"type_prob: expected H×W {size} as contour_prob, got {tuple(types.shape[1:])}")
        _check_values(types, "type_prob", probabilities=True)
    min_size = profile.default_min_cell_size if min_cell_size is None else int(min_cell_size)

    energy, fg_prob, on_contour, seeds, mask = _dense_steps(
        contour, distance_maps, fg_threshold, contour_threshold, energy_weight, distance_normalisation
    )
    markers = _markers(seeds, on_contour, profile, min_size)
    if markers.any():
        labels = _flood(energy, markers, _watershed_mask(mask, profile))
    else:
        labels = np.zeros(size, dtype=np.int32)
    instance_map = _size_filter(labels, min_size)
    n = int(instance_map.max())
    classes, class_probs = _soft_vote(instance_map, n, None if types is None else types.cpu().numpy(), fg_prob)
    lookup = np.concatenate([[0], classes]).astype(np.uint8)
    return CellInstances(instance_map=instance_map, classes=classes, class_probs=class_probs, type_map=lookup[instance_map])


class CISCAPostProcessingd(MapTransform):
    """MONAI dictionary transform: one item's CISCA network outputs → instances, type map and cell list.

    Reads the network outputs of **one** item (after decollation, as in a ``SupervisedEvaluator``
    postprocessing ``Compose``) from ``keys`` = (contour, distance[, type]), each (C, H, W).  When a key is not
    at the top level it is looked up inside ``item[pred_key]`` (the evaluator puts a network's output dict
    under ``"pred"``).  With ``logits=True`` (default, what the network returns) a softmax over channels is
    applied to contour and type; the distance maps are used as they are.

    Writes (docs/contracts.md) ``pred_instances`` (1, H, W) int32, ``pred_types`` (1, H, W) uint8 and
    ``pred_cells`` (list of dicts with ``id``, ``class``, ``class_prob``, ``centroid``, ``area``).  The two maps
    follow the contour input's type and device (a MetaTensor input gives MetaTensors with its metadata).

    ``num_classes`` (C, background excluded): None infers it from the type output (single-class when the type
    key is absent); 1 ignores any type output and gives every cell class 1 with the mean foreground
    probability; C > 1 requires a type output with C + 1 channels.  ``magnification`` or ``mpp`` (exactly
    one) chooses the :class:`~cellgap.magnification.MagnificationProfile`; the other arguments are those of
    :func:`postprocess`.
    """

    def __init__(
        self,
        keys: KeysCollection = ("contour", "distance", "type"),
        magnification: float | str | None = None,
        mpp: float | None = None,
        min_cell_size: int | None = None,
        contour_threshold: float = 0.57,
        fg_threshold: float = 0.5,
        energy_weight: float = 0.5,
        distance_normalisation: str = "fixed",
        num_classes: int | None = None,
        logits: bool = True,
        pred_key: str | None = "pred",
        instance_key: str = "pred_instances",
        type_key: str = "pred_types",
        cells_key: str = "pred_cells",
    ) -> None:
        super().__init__(keys)
        if len(self.keys) not in (2, 3):
            raise ValueError(f"keys: expected (contour, distance) or (contour, distance, type), got {self.keys}")
        _validate_options(contour_threshold, fg_threshold, energy_weight, distance_normalisation, min_cell_size)
        if num_classes is not None and not (isinstance(num_classes, (int, np.integer)) and 1 <= num_classes <= 255):
            raise ValueError(f"num_classes: expected None or a number of cell classes in 1..255 (background excluded), got {num_classes!r}")
        self.profile = profile_for(magnification=magnification, mpp=mpp)
        self.options = {
            "min_cell_size": min_cell_size,
            "contour_threshold": contour_threshold,
            "fg_threshold": fg_threshold,
            "energy_weight": energy_weight,
            "distance_normalisation": distance_normalisation,
        }
        self.num_classes = num_classes
        self.logits = logits
        self.pred_key = pred_key
        self.instance_key, self.type_key, self.cells_key = instance_key, type_key, cells_key

    def _lookup(self, data: Mapping, key: Hashable, required: bool):
        if key in data:
            value = data[key]
        elif self.pred_key is not None and isinstance(data.get(self.pred_key), Mapping) and key in data[self.pred_key]:
            value = data[self.pred_key][key]
        elif required:
            where = f" or inside item[{self.pred_key!r}]" if self.pred_key is not None else ""
            raise KeyError(f"CISCAPostProcessingd: key {key!r} not found at the top level of the item{where}; found keys {sorted(map(str, data))}")
        else:
            return None
        if not isinstance(value, torch.Tensor | np.ndarray) or value.ndim != 3:
            shape = tuple(value.shape) if hasattr(value, "shape") else type(value).__name__
            raise ValueError(f"CISCAPostProcessingd: key {key!r}: expected one item's (channels, H, W) output, got {shape} (apply after decollation)")
        return value

    def _probabilities(self, value):
        tensor = torch.as_tensor(value).float()
        return torch.softmax(tensor, dim=0) if self.logits else tensor

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        contour_key, distance_key = self.keys[0], self.keys[1]
        contour = self._lookup(d, contour_key, required=True)
        distance = self._lookup(d, distance_key, required=True)
        types = None
        if len(self.keys) == 3 and self.num_classes != 1:
            types = self._lookup(d, self.keys[2], required=self.num_classes is not None)
        if self.num_classes is not None and self.num_classes > 1:
            if types is None:
                raise ValueError(f"CISCAPostProcessingd: num_classes={self.num_classes} needs a type output; give keys=(contour, distance, type)")
            if types.shape[0] != self.num_classes + 1:
                raise ValueError(
                    f"CISCAPostProcessingd: key {self.keys[2]!r}: expected num_classes + 1 = {self.num_classes + 1} channels (background first), got {types.shape[0]}"
                )
        result = postprocess(
            self._probabilities(contour),
            torch.as_tensor(distance),
            None if types is None else self._probabilities(types),
            profile=self.profile,
            **self.options,
        )
        like = contour if isinstance(contour, torch.Tensor) else torch.empty(0)
        d[self.instance_key] = convert_to_dst_type(result.instance_map[None], dst=like, dtype=torch.int32)[0]
        d[self.type_key] = convert_to_dst_type(result.type_map[None], dst=like, dtype=torch.uint8)[0]
        d[self.cells_key] = result.cells()
        return d
