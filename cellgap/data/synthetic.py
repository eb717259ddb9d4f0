"""The built-in synthetic H&E-like dataset, for training, evaluating and running cellgap offline.

Real datasets and pretrained weights cannot be downloaded on development and CI machines, so the demo
trains on seeded synthetic tiles.  A tile is composed in optical-density space (Beer–Lambert):
``OD = h_conc · h_vec + e_conc · e_vec`` and ``RGB = white · exp(-OD)``, with hematoxylin and eosin
colour vectors and intensities drawn per tile (stain variation), then blurred (focus) and noised.

Content of a tile:

* eosin-pink stroma with wavy fibres, and white lumen / empty areas;
* nuclei of three classes that differ in size, shape, colour and texture (``SYNTHETIC_CLASSES``):
  1 ``tumour`` (large, irregular or elongated, pale purple, chromatin speckle, dark rim, nucleoli,
  purplish cytoplasm around), 2 ``lymphocyte`` (small, round, dark blue, dense), 3 ``stromal``
  (thin curved spindle, medium-dark, aligned with the fibres);
* crowded nests where nuclei touch and overlap: a later nucleus lies on top of an earlier one, the
  overlap is painted darker (two layers of chromatin), and the earlier nucleus keeps most of its area
  in one 4-connected piece (placements that break this are rejected);
* a tissue kind per tile (``SYNTHETIC_TISSUES``) that sets the density and class mix, with some
  sparse tiles.

Sizes are physical (µm) and scale with the magnification profile's pixel size, so a 20x tile shows
nuclei at half the pixel diameter of a 40x tile.  Apart from cells cut by the tile border, every
nucleus is larger than the profile's post-processing minimum cell size.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage.draw import disk as draw_disk
from tqdm.auto import tqdm

from ..magnification import MagnificationProfile, parse_magnification, profile_for
from .prepared import SPLITS, DatasetInfo, PreparedWriter, read_dataset_info, read_manifest

SYNTHETIC_CLASSES = ("tumour", "lymphocyte", "stromal")
SYNTHETIC_TISSUES = ("tumour", "stroma", "inflamed")
# Bump when the generator changes what a seed produces, so that a stored dataset is not reused.
GENERATOR_VERSION = 1
# Tile seeds of split s and index k are (seed·3 + s)·SEED_STRIDE + k: splits never share a tile, and
# the held-out tiles stay the same when n_train changes.
SEED_STRIDE = 10**8

TUMOUR, LYMPHOCYTE, STROMAL = 1, 2, 3

# Macenko's reference H&E optical-density vectors (RGB); each tile perturbs them.
_H_REF = np.array([0.5626, 0.7201, 0.4062])
_E_REF = np.array([0.2159, 0.8012, 0.5581])


@dataclass(frozen=True)
class _TissueKind:
    coverage: tuple[float, float]  # fraction of the tissue area covered by nuclei
    class_mix: tuple[float, float, float]  # probability of tumour, lymphocyte, stromal
    attach: float  # probability that a nucleus is placed against an existing one (nests, clusters)
    lumen: float  # probability that the tile has lumen / empty areas


_TISSUE_KINDS = {
    "tumour": _TissueKind(coverage=(0.3, 0.55), class_mix=(0.75, 0.1, 0.15), attach=0.8, lumen=0.7),
    "stroma": _TissueKind(coverage=(0.06, 0.16), class_mix=(0.07, 0.18, 0.75), attach=0.25, lumen=0.5),
    "inflamed": _TissueKind(coverage=(0.2, 0.4), class_mix=(0.12, 0.73, 0.15), attach=0.6, lumen=0.4),
}
_SPARSE_PROBABILITY = 0.15  # tiles with a quarter of the usual density
_SPARSE_FACTOR = 0.25

# An occluded nucleus keeps at least this fraction of its drawn area; a new nucleus may lie on top of
# others with at most this fraction of its own area.
_MIN_VISIBLE_FRACTION = 0.65
_MAX_OVERLAP_FRACTION = 0.3
# Interior nuclei keep a margin above the minimum cell size; border-cut ones at least half of it.
_INTERIOR_SIZE_MARGIN = 1.25
_EDGE_SIZE_FRACTION = 0.5
_FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)


@dataclass(frozen=True)
class SyntheticTile:
    """One generated tile: ``image`` (H,W,3) uint8 RGB, ``label`` (H,W) int32 instances 1..N,
    ``classes`` (H,W) uint8 class map (0 = background), ``cell_classes`` {instance id: class}."""

    image: np.ndarray
    label: np.ndarray
    classes: np.ndarray
    cell_classes: dict[int, int]
    tissue: str
    magnification: int
    mpp: float


def synthetic_profile(magnification: int | str) -> MagnificationProfile:
    """The magnification profile of a synthetic tile; only the two reference profiles (20x, 40x) exist."""
    profile = profile_for(magnification=magnification)
    if parse_magnification(magnification) != profile.magnification:
        raise ValueError(f"magnification: synthetic tiles exist at 20x and 40x, got {magnification!r}")
    return profile


def synthetic_info(magnification: int | str = 40) -> DatasetInfo:
    """Dataset facts of the synthetic dataset at a magnification (20 or 40)."""
    profile = synthetic_profile(magnification)
    return DatasetInfo(
        name="synthetic",
        class_names=SYNTHETIC_CLASSES,
        magnification=profile.magnification,
        mpp=profile.mpp,
        min_cell_size=profile.default_min_cell_size,
        empty_policy="skip",
        tissue_label="tissue",
        description="Built-in synthetic H&E-like tiles (cellgap.data.synthetic) for offline demos and tests; "
        f"tissue kinds {', '.join(SYNTHETIC_TISSUES)}. Not real data: metrics on it say nothing about real slides.",
    )


# ----------------------------------------------------------------------------------------------------
# Shapes


@dataclass(frozen=True)
class _Shape:
    """A nucleus outline around (0, 0): an ellipse with a wavy radius (tumour, lymphocyte), or a
    tapered, slightly bent spindle (stromal).  Angles in radians, lengths in pixels."""

    cls: int
    a: float  # half length along the long axis
    b: float  # half width
    angle: float
    wobble: np.ndarray  # complex coefficients of radius harmonics 2..5 (ellipses)
    bend: float = 0.0  # sideways offset of the spindle's tips (spindles)

    @property
    def radius(self) -> float:
        return (self.a + self.b) / 2

    @property
    def extent(self) -> float:
        """Upper bound of the distance from the centre to any pixel of the shape."""
        if self.cls == STROMAL:
            return self.a + self.b + abs(self.bend)
        return self.a * (1.0 + float(np.abs(self.wobble).sum())) + 1.0


def _nucleus_shape(rng: np.random.Generator, cls: int, px_per_um: float, fibre_angle: float) -> _Shape:
    if cls == STROMAL:
        length = rng.uniform(14.0, 24.0) * px_per_um
        width = rng.uniform(2.8, 4.4) * px_per_um
        return _Shape(cls, length / 2, width / 2, fibre_angle + rng.normal(0.0, 0.25), np.zeros(4),
                      bend=rng.uniform(-0.12, 0.12) * length)
    if cls == TUMOUR:
        diameter, aspect, wobble = rng.uniform(10.0, 16.0), rng.uniform(1.05, 1.6), 0.07
    else:
        diameter, aspect, wobble = rng.uniform(6.2, 7.8), rng.uniform(1.0, 1.15), 0.0
    a = diameter / 2 * px_per_um
    coefficients = rng.uniform(0.0, wobble, 4) * np.exp(1j * rng.uniform(0.0, 2 * np.pi, 4))
    return _Shape(cls, a, a / aspect, rng.uniform(0.0, np.pi), coefficients)


def _rasterise(shape: _Shape, centre: tuple[float, float], size: int):
    """Pixels (rows, cols) of a shape centred at ``centre``, clipped to the tile.

    Written out instead of skimage.draw.polygon, which tests every box pixel against every vertex: the
    analytic inside-test of these shapes is about 3x faster, and placement rasterises many candidates.
    """
    reach = shape.extent
    r0, r1 = max(int(centre[0] - reach), 0), min(int(centre[0] + reach) + 2, size)
    c0, c1 = max(int(centre[1] - reach), 0), min(int(centre[1] + reach) + 2, size)
    if r0 >= r1 or c0 >= c1:
        return np.empty(0, np.intp), np.empty(0, np.intp)
    dr = np.arange(r0, r1, dtype=np.float32)[:, None] - np.float32(centre[0])
    dc = np.arange(c0, c1, dtype=np.float32)[None, :] - np.float32(centre[1])
    cos, sin = np.float32(math.cos(shape.angle)), np.float32(math.sin(shape.angle))
    along = dc * cos + dr * sin
    across = dr * cos - dc * sin
    if shape.cls == STROMAL:
        t = along / np.float32(shape.a)
        taper = np.clip(1.0 - t * t, 0.0, None) ** 0.6
        inside = np.abs(across - np.float32(shape.bend) * (t * t - np.float32(1 / 3))) <= np.float32(shape.b) * taper
    elif shape.cls == LYMPHOCYTE:  # no visible wobble: a plain ellipse
        x, y = along / np.float32(shape.a), across / np.float32(shape.b)
        inside = x * x + y * y <= 1.0
    else:
        z = (along / np.float32(shape.a)) + 1j * (across / np.float32(shape.b))
        rho = np.abs(z)
        unit = z / np.maximum(rho, 1e-6)
        c2, c3, c4, c5 = shape.wobble
        inside = rho <= 1.0 + np.real(unit * unit * (c2 + unit * (c3 + unit * (c4 + unit * c5))))
    rr, cc = np.nonzero(inside)
    return rr + r0, cc + c0


def _largest_component(rr: np.ndarray, cc: np.ndarray):
    """Keep the largest 4-connected piece of a pixel set (thin spindle tips, shapes cut by the border)."""
    r0, c0 = rr.min(), cc.min()
    mask = np.zeros((rr.max() - r0 + 1, cc.max() - c0 + 1), dtype=bool)
    mask[rr - r0, cc - c0] = True
    components, n = ndimage.label(mask, structure=_FOUR_CONNECTED)
    if n <= 1:
        return rr, cc
    keep = np.argmax(np.bincount(components[rr - r0, cc - c0])[1:]) + 1
    inside = components[rr - r0, cc - c0] == keep
    return rr[inside], cc[inside]


def _upsample(small: np.ndarray, step: int, size: int) -> np.ndarray:
    """Bilinear upsampling of a (size/step)² map sampled at block centres to size², by gathers
    (ndimage.zoom does the same several times slower)."""
    position = (np.arange(size, dtype=np.float32) + 0.5) / step - 0.5
    lower = np.clip(np.floor(position).astype(np.intp), 0, small.shape[0] - 1)
    upper = np.minimum(lower + 1, small.shape[0] - 1)
    weight = np.clip(position - lower, 0.0, 1.0).astype(np.float32)
    rows = small[lower] * (1 - weight)[:, None] + small[upper] * weight[:, None]
    return rows[:, lower] * (1 - weight) + rows[:, upper] * weight


def _smooth_noise(rng: np.random.Generator, size: int, scale_px: float) -> np.ndarray:
    """Zero-mean random field of about unit variance with features of about ``scale_px`` pixels."""
    if scale_px < 4.0:
        sigma = max(scale_px / 2.0, 0.5)
        # Uniform white noise (cheaper to draw than normal; the filter makes it Gaussian anyway), scaled
        # so that the filtered field has unit variance: white variance 1/12, 2-D Gaussian gain 1/(4πσ²).
        field = ndimage.gaussian_filter(rng.random((size, size), dtype=np.float32) - np.float32(0.5), sigma, truncate=3.0)
        return field * np.float32(math.sqrt(12.0) * 2.0 * math.sqrt(math.pi) * sigma)
    # Random values on a coarse lattice spread by separable Gaussian weights: far cheaper than filtering
    # full-size noise with a wide kernel.  einsum, not @: multithreaded BLAS is many times slower on
    # these small products when the machine is busy.
    n = int(math.ceil(size / scale_px)) + 4
    nodes = (np.arange(n, dtype=np.float32) - 2.0) * np.float32(scale_px)
    weights = np.exp(-0.5 * ((np.arange(size, dtype=np.float32)[:, None] - nodes[None, :]) / np.float32(scale_px)) ** 2)
    weights /= np.sqrt((weights**2).sum(axis=1, keepdims=True))  # unit variance at every pixel
    lattice = rng.standard_normal((n, n), dtype=np.float32)
    return np.einsum("ik,kj->ij", weights, np.einsum("kl,jl->kj", lattice, weights))


# ----------------------------------------------------------------------------------------------------
# Layout: where the nuclei go


class _Layout:
    """Instance map built nucleus by nucleus; a nucleus is accepted only if every nucleus it covers keeps
    a large, connected visible part."""

    def __init__(self, size: int, min_interior: int, min_edge: int):
        self.size = size
        self.label = np.zeros((size, size), dtype=np.int32)
        self.layers = np.zeros((size, size), dtype=np.uint8)  # how many nuclei were drawn on a pixel
        self.min_interior = min_interior
        self.min_edge = min_edge
        self.shapes: list[_Shape] = []
        self.centres: list[tuple[float, float]] = []
        self.visible: list[int] = []
        self.min_visible: list[int] = []
        self.boxes: list[tuple[int, int, int, int]] = []

    @property
    def classes(self) -> list[int]:
        return [shape.cls for shape in self.shapes]

    def try_add(self, shape: _Shape, centre: tuple[float, float], lumen: np.ndarray | None) -> int:
        """Draw the shape if it fits; return the pixel area added (0 if rejected)."""
        size = self.size
        r, c = int(centre[0]), int(centre[1])
        if 0 <= r < size and 0 <= c < size and (self.label[r, c] > 0 or (lumen is not None and lumen[r, c] > 0.5)):
            return 0  # centred on another nucleus or in a lumen: cheap early rejection
        rr, cc = _rasterise(shape, centre, size)
        if rr.size == 0 or (lumen is not None and lumen[rr, cc].mean() > 0.15):
            return 0
        cut = rr.min() == 0 or cc.min() == 0 or rr.max() == size - 1 or cc.max() == size - 1
        if cut or shape.cls == STROMAL:
            rr, cc = _largest_component(rr, cc)
        area = rr.size
        floor = self.min_edge if cut else self.min_interior
        if area < floor:
            return 0
        under = self.label[rr, cc]
        covered = under[under > 0]
        if covered.size > _MAX_OVERLAP_FRACTION * area:
            return 0
        owners, counts = np.unique(covered, return_counts=True)
        for owner, count in zip(owners.tolist(), counts.tolist()):
            if self.visible[owner - 1] - count < self.min_visible[owner - 1] or not self._stays_connected(owner, rr, cc):
                return 0
        for owner, count in zip(owners.tolist(), counts.tolist()):
            self.visible[owner - 1] -= count
        self.label[rr, cc] = len(self.shapes) + 1
        self.layers[rr, cc] += 1
        self.shapes.append(shape)
        self.centres.append((float(centre[0]), float(centre[1])))
        self.visible.append(area)
        self.min_visible.append(max(floor, int(math.ceil(_MIN_VISIBLE_FRACTION * area))))
        self.boxes.append((int(rr.min()), int(rr.max()) + 1, int(cc.min()), int(cc.max()) + 1))
        return area

    def _stays_connected(self, owner: int, rr: np.ndarray, cc: np.ndarray) -> bool:
        r0, r1, c0, c1 = self.boxes[owner - 1]
        remaining = self.label[r0:r1, c0:c1] == owner
        inside = (rr >= r0) & (rr < r1) & (cc >= c0) & (cc < c1)
        remaining[rr[inside] - r0, cc[inside] - c0] = False
        return ndimage.label(remaining, structure=_FOUR_CONNECTED)[1] == 1


def _place_nuclei(rng: np.random.Generator, size: int, kind: _TissueKind, coverage: float, lumen: np.ndarray | None,
                  px_per_um: float, fibre_angle: float, profile: MagnificationProfile) -> _Layout:
    min_cell = profile.default_min_cell_size
    layout = _Layout(size, min_interior=int(math.ceil(_INTERIOR_SIZE_MARGIN * min_cell)),
                     min_edge=int(math.ceil(_EDGE_SIZE_FRACTION * min_cell)))
    target = coverage * float(size * size if lumen is None else (lumen < 0.5).sum())
    class_cdf = np.cumsum(kind.class_mix)
    typical_area = 60.0 * px_per_um**2  # µm² → px², only bounds the number of attempts
    max_attempts = int(6 * target / typical_area) + 30
    margin = 6.0 * px_per_um
    placed = 0.0
    for _ in range(max_attempts):
        if placed >= target:
            break
        cls = min(int(np.searchsorted(class_cdf, rng.random() * class_cdf[-1], side="right")), 2) + 1
        shape = _nucleus_shape(rng, cls, px_per_um, fibre_angle)
        if layout.shapes and rng.random() < kind.attach:
            j = int(rng.integers(len(layout.shapes)))
            direction = rng.uniform(0.0, 2 * np.pi)
            distance = (shape.radius + layout.shapes[j].radius) * rng.uniform(0.7, 1.05)
            centre = (layout.centres[j][0] + distance * math.sin(direction), layout.centres[j][1] + distance * math.cos(direction))
        else:
            centre = tuple(rng.uniform(-margin, size + margin, size=2))
        placed += layout.try_add(shape, centre, lumen)
    return layout


# ----------------------------------------------------------------------------------------------------
# Rendering


def _stain_vectors(rng: np.random.Generator):
    h = np.clip(_H_REF + rng.normal(0.0, 0.05, 3), 0.05, None)
    e = np.clip(_E_REF + rng.normal(0.0, 0.07, 3), 0.05, None)
    h = h / np.linalg.norm(h) * rng.uniform(0.75, 1.3)
    e = e / np.linalg.norm(e) * rng.uniform(0.65, 1.35)
    return h.astype(np.float32), e.astype(np.float32)


def _rim(label: np.ndarray) -> np.ndarray:
    """Nucleus pixels with a 4-neighbour of another label (background or another nucleus)."""
    rim = np.zeros(label.shape, dtype=bool)
    vertical = label[1:, :] != label[:-1, :]
    horizontal = label[:, 1:] != label[:, :-1]
    rim[1:, :] |= vertical
    rim[:-1, :] |= vertical
    rim[:, 1:] |= horizontal
    rim[:, :-1] |= horizontal
    return rim & (label > 0)


def _render(rng: np.random.Generator, layout: _Layout, lumen: np.ndarray | None, fibre_angle: float, px_per_um: float) -> np.ndarray:
    size = layout.size
    label = layout.label
    f32 = np.float32
    cell_class = np.array([0, *layout.classes], dtype=np.int64)
    nucleus = label > 0

    # Stroma: two families of wavy collagen fibres that fade in and out, pale clefts between them,
    # large-scale density changes, lumen cut out.
    axis = np.arange(size, dtype=f32)
    fibres = np.zeros((size, size), dtype=f32)
    families = [(1.0, fibre_angle)]
    if rng.random() < 0.5:  # a second, fainter family crossing the first
        families.append((rng.uniform(0.2, 0.6), fibre_angle + rng.uniform(0.4, 1.2)))
    for weight, angle in families:
        frequency = f32(2 * np.pi / (rng.uniform(4.0, 9.0) * px_per_um))
        phase = np.add.outer(axis * f32(math.sin(angle)), axis * f32(math.cos(angle))) * frequency
        phase += _smooth_noise(rng, size, rng.uniform(10.0, 20.0) * px_per_um) * f32(rng.uniform(2.0, 5.0))
        strength = np.clip(0.5 + 0.6 * _smooth_noise(rng, size, 8.0 * px_per_um), 0.0, 1.0)
        wave = 0.5 + 0.5 * np.sin(phase)
        clefts = wave * wave * wave
        clefts *= clefts  # wave**6: thin pale gaps between broad fibres
        fibres += f32(weight) * strength * clefts
    density = 1.0 + 0.2 * _smooth_noise(rng, size, 30.0 * px_per_um)
    if lumen is not None:
        density *= 1.0 - 0.93 * lumen
    grain = _smooth_noise(rng, size, 0.7 * px_per_um)  # stroma grain, and chromatin speckle in nuclei
    eosin = f32(rng.uniform(0.4, 0.8)) * density * (1.0 - 0.7 * np.clip(fibres, 0.0, 1.0)) * (1.0 + 0.1 * grain)
    haem = f32(rng.uniform(0.02, 0.07)) * density

    # Tumour nuclei sit in purplish cytoplasm (computed at a quarter of the resolution: it is smooth).
    step = 4
    tumour = (cell_class[label[step // 2 :: step, step // 2 :: step]] == TUMOUR).astype(f32)
    cytoplasm = _upsample(ndimage.gaussian_filter(tumour, 2.5 * px_per_um / step), step, size)
    cytoplasm = np.clip(cytoplasm * 2.5, 0.0, 1.0)
    eosin += 0.18 * cytoplasm
    haem += 0.12 * cytoplasm

    # Nuclei: per-cell hematoxylin level, per-class chromatin texture and rim, darker where two overlap.
    n = len(layout.shapes)
    level = np.zeros(n + 1, dtype=f32)
    texture = np.zeros(n + 1, dtype=f32)
    for cls, (low, high), amp in ((TUMOUR, (0.45, 0.75), 0.45), (LYMPHOCYTE, (1.25, 1.6), 0.12), (STROMAL, (0.85, 1.15), 0.15)):
        members = np.flatnonzero(cell_class == cls)
        level[members] = rng.uniform(low, high, members.size)
        texture[members] = amp
    rim_gain = np.array([0.0, 0.45, 0.1, 0.1], dtype=f32)[cell_class]
    cell_level = level[label]
    chromatin = cell_level * np.clip(1.0 + texture[label] * grain, 0.2, None)
    chromatin += _rim(label) * rim_gain[label]
    chromatin += (layout.layers >= 2) * (0.5 * cell_level)
    haem = np.where(nucleus, chromatin + 0.5 * haem, haem)
    eosin = np.where(nucleus, 0.3 * eosin, eosin)

    # Nucleoli: up to two dark dots in each tumour nucleus.
    for idx in np.flatnonzero(cell_class == TUMOUR):
        for _ in range(int(rng.integers(0, 3))):
            r, c = layout.centres[idx - 1]
            spread = layout.shapes[idx - 1].radius * 0.3
            rr, cc = draw_disk((r + rng.normal(0, spread), c + rng.normal(0, spread)), rng.uniform(0.5, 0.9) * px_per_um,
                               shape=(size, size))
            inside = label[rr, cc] == idx
            haem[rr[inside], cc[inside]] += 0.7

    # Out of focus: blur the stain concentrations, then Beer–Lambert to RGB, then sensor noise.
    blur = rng.uniform(0.1, 0.35) * px_per_um
    haem = ndimage.gaussian_filter(haem, blur, truncate=3.0)
    eosin = ndimage.gaussian_filter(eosin, blur, truncate=3.0)
    h_vec, e_vec = _stain_vectors(rng)
    white = rng.uniform(232.0, 252.0) + rng.normal(0.0, 3.0, 3)
    noise = f32(rng.uniform(1.0, 5.0) * math.sqrt(12.0))  # uniform noise of std 1..5 grey levels
    image = np.empty((size, size, 3), dtype=f32)
    for k in range(3):  # channel by channel: broadcasting over a last axis of 3 is slow
        channel = np.exp(-(haem * h_vec[k] + eosin * e_vec[k]))
        channel *= f32(white[k])
        channel += (rng.random((size, size), dtype=f32) - f32(0.5)) * noise + f32(0.5)
        image[..., k] = channel
    return np.clip(image, 0, 255, out=image).astype(np.uint8)


def _check_integer(name: str, value, minimum: int, what: str = "an integer", maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum or (maximum is not None and value > maximum):
        bounds = f"{minimum}..{maximum}" if maximum is not None else f">= {minimum}"
        raise ValueError(f"{name}: expected {what} ({bounds}), got {value!r}")


def generate_tile(seed: int, size: int = 256, magnification: int | str = 40, tissue: str | None = None,
                  density: float | None = None) -> SyntheticTile:
    """Generate one synthetic H&E-like tile; the same arguments give identical arrays (all randomness
    comes from ``np.random.default_rng(seed)``; on another CPU or numpy version, float rounding may
    still move a rare pixel).

    ``tissue``: one of ``SYNTHETIC_TISSUES``, drawn from the seed if None.  ``density``: fraction of the
    tissue area covered by nuclei (0..0.8), drawn from the tissue kind's range if None (some tiles sparse).
    """
    _check_integer("seed", seed, 0)
    _check_integer("size", size, 32, "a tile side in pixels")
    if tissue is not None and tissue not in _TISSUE_KINDS:
        raise ValueError(f"tissue: expected one of {SYNTHETIC_TISSUES} or None, got {tissue!r}")
    if density is not None and not (isinstance(density, (int, float)) and 0.0 <= density <= 0.8):
        raise ValueError(f"density: expected a fraction of tissue area in [0, 0.8] or None, got {density!r}")
    profile = synthetic_profile(magnification)
    size = int(size)
    px_per_um = 1.0 / profile.mpp
    rng = np.random.default_rng(int(seed))

    if tissue is None:
        tissue = SYNTHETIC_TISSUES[int(rng.integers(len(SYNTHETIC_TISSUES)))]
    kind = _TISSUE_KINDS[tissue]
    coverage = rng.uniform(*kind.coverage)
    if rng.random() < _SPARSE_PROBABILITY:
        coverage *= _SPARSE_FACTOR
    if density is not None:
        coverage = float(density)
    fibre_angle = rng.uniform(0.0, np.pi)

    lumen = None
    if rng.random() < kind.lumen:
        field = _smooth_noise(rng, size, 25.0 * px_per_um)
        threshold = np.quantile(field, 1.0 - rng.uniform(0.05, 0.3))
        edge = 0.04 * float(field.std())  # soft over a pixel or two
        lumen = np.clip((field - threshold) / edge, 0.0, 1.0).astype(np.float32)

    layout = _place_nuclei(rng, size, kind, coverage, lumen, px_per_um, fibre_angle, profile)
    image = _render(rng, layout, lumen, fibre_angle, px_per_um)
    cell_class = np.array([0, *layout.classes], dtype=np.uint8)
    return SyntheticTile(
        image=image,
        label=layout.label,
        classes=cell_class[layout.label],
        cell_classes={i + 1: c for i, c in enumerate(layout.classes)},
        tissue=tissue,
        magnification=profile.magnification,
        mpp=profile.mpp,
    )


# ----------------------------------------------------------------------------------------------------
# Prepared dataset


def tile_seed(seed: int, split: str, index: int) -> int:
    """Seed of tile ``index`` of ``split`` in a dataset prepared with ``seed`` (splits never share one)."""
    return (seed * len(SPLITS) + SPLITS.index(split)) * SEED_STRIDE + index


def prepare_synthetic(root: str | os.PathLike, n_train: int = 240, n_val: int = 40, n_test: int = 60, seed: int = 0,
                      magnification: int | str = 40, size: int = 256, overwrite: bool = False, progress: bool = True) -> Path:
    """Write a synthetic dataset in the prepared layout (``cellgap.data.prepared``) and return its root.

    If ``root`` already holds a synthetic dataset made with the same parameters it is returned as is.
    Different parameters are an error unless ``overwrite=True``, which regenerates it.  The folder is
    written atomically: a failure leaves neither ``root`` nor a partial folder behind.
    """
    root = Path(root)
    counts = {"train": n_train, "val": n_val, "test": n_test}
    for split, n in counts.items():
        _check_integer(f"n_{split}", n, 0, "a number of tiles", maximum=SEED_STRIDE - 1)
    if sum(counts.values()) == 0:
        raise ValueError("prepare_synthetic: n_train + n_val + n_test must be at least 1")
    _check_integer("seed", seed, 0)
    _check_integer("size", size, 32, "a tile side in pixels")
    info = synthetic_info(magnification)
    params = {"generator_version": GENERATOR_VERSION, "seed": int(seed), "magnification": info.magnification,
              "size": int(size), **{f"n_{s}": int(n) for s, n in counts.items()}}
    info = dataclasses.replace(info, extra={"synthetic": params})

    if root.exists():
        existing = _existing_synthetic_params(root)
        if existing == params:
            return root
        if existing is None:
            if not root.is_dir() or any(root.iterdir()):
                raise ValueError(f"{root}: exists and is not a prepared synthetic dataset; refusing to replace it")
            root.rmdir()  # an empty folder
        elif not overwrite:
            changed = {k: (existing.get(k), v) for k, v in params.items() if existing.get(k) != v}
            problem = f"was made with other parameters {changed} (stored, requested)" if changed else "is incomplete or damaged"
            raise ValueError(f"{root}: holds a synthetic dataset that {problem}; pass overwrite=True to regenerate it")

    total = sum(counts.values())
    with PreparedWriter(root, info, overwrite=True, extra_columns=("seed",)) as writer, \
            tqdm(total=total, desc=f"synthetic tiles → {root.name}", unit="tile", disable=not progress) as bar:
        for split, n in counts.items():
            for k in range(n):
                tile_seed_k = tile_seed(int(seed), split, k)
                tile = generate_tile(tile_seed_k, size=size, magnification=info.magnification)
                writer.add(f"synthetic_{split}_{k:05d}", tile.image, tile.label, tile.classes,
                           tissue=tile.tissue, split=split, seed=tile_seed_k)
                bar.update(1)
    return root


def _existing_synthetic_params(root: Path) -> dict | None:
    """The generation parameters stored in a prepared synthetic dataset, or None if ``root`` is none."""
    try:
        info = read_dataset_info(root)
        rows = read_manifest(root)
    except (FileNotFoundError, ValueError):
        return None
    params = info.extra.get("synthetic") if isinstance(info.extra, dict) else None
    if not isinstance(params, dict):
        return None
    expected = sum(params.get(f"n_{s}", 0) for s in SPLITS if isinstance(params.get(f"n_{s}"), int))
    if len(rows) != expected or not all((root / row["image"]).is_file() for row in rows):
        return {**params, "complete": False}  # damaged: never equal to requested parameters
    return params
