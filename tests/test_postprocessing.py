"""Tests of cellgap.postprocessing: round trip on the CISCA targets, field-of-view independence, K=2,
single-class, input errors and the MONAI dictionary transform."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import DataLoader, MetaTensor
from monai.engines import SupervisedEvaluator
from monai.transforms import Compose
from scipy import ndimage as ndi
from skimage.morphology import convex_hull_image

from cellgap.derivatives import derivative_kernels
from cellgap.magnification import PROFILE_20X, PROFILE_40X, MagnificationProfile
from cellgap.postprocessing import (
    CellInstances,
    CISCAPostProcessingd,
    contour_evidence,
    interface_responses,
    postprocess,
)
from cellgap.targets import class_map_from_instances, contour_classes, contour_levels, distance_maps

NUM_CLASSES = 5
# Nucleus semi-axes and cells per 256² tile, per magnification (a 256² tile is 128 µm wide at 20x, 64 µm at 40x).
SEMI_AXES_UM = (2.2, 4.5)
CELLS_PER_TILE = {20: (70, 100), 40: (30, 50)}
MIN_THICKNESS_UM = 1.5  # no sliver cells: every cell holds a disk of this radius
MIN_SOLIDITY = 0.9  # nuclei are nearly convex: no deep waists cut by a neighbour


# --------------------------------------------------------------------------------------------
# Synthetic crowded tiles and their targets


def crowded_tile(seed: int, profile: MagnificationProfile, size: int = 256, margin: int = 0) -> tuple[np.ndarray, dict[int, int]]:
    """Instance map of random ellipses (overlaps split by nearest normalised radius, so many cells touch),
    every cell a single, nearly convex piece at least twice the minimum cell size; random classes."""
    rng = np.random.default_rng(seed)
    low, high = (um / profile.mpp for um in SEMI_AXES_UM)
    best = np.full((size, size), np.inf)
    raw = np.zeros((size, size), np.int32)
    wanted = round(rng.integers(*CELLS_PER_TILE[profile.magnification]) * (size / 256) ** 2)
    for cell in range(1, wanted + 1):
        cy, cx = rng.uniform(margin, size - margin, 2)
        a, b = rng.uniform(low, high, 2)
        angle = rng.uniform(0, np.pi)
        r0, r1 = int(max(cy - high - 1, 0)), int(min(cy + high + 2, size))
        c0, c1 = int(max(cx - high - 1, 0)), int(min(cx + high + 2, size))
        dy, dx = np.mgrid[r0:r1, c0:c1] - np.array([cy, cx])[:, None, None]
        u = (dx * np.cos(angle) + dy * np.sin(angle)) / a
        v = (-dx * np.sin(angle) + dy * np.cos(angle)) / b
        radius = u**2 + v**2
        window = best[r0:r1, c0:c1]
        inside = (radius <= 1) & (radius < window)
        window[inside] = radius[inside]
        raw[r0:r1, c0:c1][inside] = cell
    label = np.zeros_like(raw)
    count = 0
    for cell, box in enumerate(ndi.find_objects(raw), start=1):
        if box is None:
            continue
        pieces, n = ndi.label(raw[box] == cell, structure=np.ones((3, 3)))
        sizes = np.bincount(pieces.ravel(), minlength=n + 1)
        sizes[0] = 0
        piece = pieces == sizes.argmax()
        thickness = ndi.distance_transform_edt(np.pad(piece, 1)).max()
        touches_margin = margin and (
            box[0].start < margin or box[1].start < margin or box[0].stop > size - margin or box[1].stop > size - margin
        )
        solidity = piece.sum() / convex_hull_image(piece).sum()
        if (
            piece.sum() >= 2 * profile.default_min_cell_size
            and thickness >= MIN_THICKNESS_UM / profile.mpp
            and solidity >= MIN_SOLIDITY
            and not touches_margin
        ):
            count += 1
            label[box][piece] = count
    classes = {cell: int(rng.integers(1, NUM_CLASSES + 1)) for cell in range(1, count + 1)}
    return label, classes


def one_hot(index_map: np.ndarray, channels: int) -> np.ndarray:
    return np.eye(channels, dtype=np.float32)[index_map].transpose(2, 0, 1).copy()


def targets(label: np.ndarray, classes: dict[int, int], profile: MagnificationProfile, num_contour_classes: int = 3):
    """The CISCA targets as post-processing inputs: one-hot contour classes, exact maps, one-hot classes."""
    contour = one_hot(contour_classes(contour_levels(label, profile), num_contour_classes), num_contour_classes)
    types = one_hot(class_map_from_instances(label, classes), NUM_CLASSES + 1)
    return contour, distance_maps(label), types


def network_like(contour: np.ndarray, distance: np.ndarray, types: np.ndarray, seed: int, noise: float = 0.05):
    """Targets softened like network outputs: blurred, noisy logits through a softmax, blurred noisy maps."""
    rng = np.random.default_rng(seed)

    def soft(probabilities):
        logits = np.log(np.clip(ndi.gaussian_filter(probabilities, (0, 1, 1)), 1e-3, 1)) + rng.normal(0, 5 * noise, probabilities.shape)
        return torch.softmax(torch.from_numpy(logits), dim=0).numpy().astype(np.float32)

    maps = ndi.gaussian_filter(distance, (0, 1, 1)) + rng.normal(0, noise, distance.shape)
    return soft(contour), maps.astype(np.float32), soft(types)


# --------------------------------------------------------------------------------------------
# A tiny binary PQ (IoU > 0.5 pairs are unique); the full metrics live in cellgap.metrics


def matched_pairs(gt: np.ndarray, pred: np.ndarray) -> tuple[list[tuple[int, int, float]], int, int]:
    n_gt, n_pred = int(gt.max()), int(pred.max())
    joint = np.bincount(gt.ravel().astype(np.int64) * (n_pred + 1) + pred.ravel(), minlength=(n_gt + 1) * (n_pred + 1))
    joint = joint.reshape(n_gt + 1, n_pred + 1)
    area_gt, area_pred = joint.sum(1), joint.sum(0)
    iou = joint[1:, 1:] / (area_gt[1:, None] + area_pred[None, 1:] - joint[1:, 1:])
    rows, cols = np.nonzero(iou > 0.5)
    return [(r + 1, c + 1, iou[r, c]) for r, c in zip(rows, cols)], n_gt, n_pred


def binary_pq(gt: np.ndarray, pred: np.ndarray) -> float:
    pairs, n_gt, n_pred = matched_pairs(gt, pred)
    tp = len(pairs)
    if tp == 0:
        return 0.0
    return sum(p[2] for p in pairs) / tp * tp / (tp + 0.5 * (n_pred - tp) + 0.5 * (n_gt - tp))


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True when two label maps hold the same instances, whatever their ids."""
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[a > 0]]), axis=1)
    return len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


# --------------------------------------------------------------------------------------------
# Round trip


@pytest.mark.parametrize("profile", [PROFILE_20X, PROFILE_40X], ids=["20x", "40x"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_round_trip_on_targets(profile, seed):
    label, classes = crowded_tile(seed, profile)
    assert 30 <= label.max() <= 100
    contour, distance, types = targets(label, classes, profile)
    assert (contour[0] > 0).sum() > 100, "the tile should hold touching cells"

    result = postprocess(contour, distance, types, profile=profile)

    assert binary_pq(label, result.instance_map) >= 0.98
    pairs, _, _ = matched_pairs(label, result.instance_map)
    assert all(result.classes[pred - 1] == classes[gt] for gt, pred, _ in pairs)
    assert result.class_probs.min() > 0.8 and result.class_probs.mean() > 0.97


@pytest.mark.parametrize("profile", [PROFILE_20X, PROFILE_40X], ids=["20x", "40x"])
def test_network_like_inputs(profile):
    label, classes = crowded_tile(10, profile)
    contour, distance, types = network_like(*targets(label, classes, profile), seed=10)
    result = postprocess(contour, distance, types, profile=profile)
    assert binary_pq(label, result.instance_map) >= 0.9
    pairs, _, _ = matched_pairs(label, result.instance_map)
    assert np.mean([result.classes[pred - 1] == classes[gt] for gt, pred, _ in pairs]) >= 0.98


def test_output_structure():
    label, classes = crowded_tile(3, PROFILE_20X, size=128)
    contour, distance, types = network_like(*targets(label, classes, PROFILE_20X), seed=3)
    result = postprocess(contour, distance, types, profile=PROFILE_20X)
    n = len(result)
    assert isinstance(result, CellInstances) and n > 5
    assert result.instance_map.dtype == np.int32 and result.type_map.dtype == np.uint8
    assert np.array_equal(np.unique(result.instance_map), np.arange(n + 1))  # sequential 1..N
    assert result.classes.shape == (n,) and result.class_probs.shape == (n,) and result.class_probs.dtype == np.float32
    assert result.classes.min() >= 1 and result.classes.max() <= NUM_CLASSES
    assert np.array_equal(result.type_map, np.concatenate([[0], result.classes])[result.instance_map])
    # class_prob is the mean probability of the chosen class over the instance
    for i in (0, n // 2, n - 1):
        inside = result.instance_map == i + 1
        assert result.class_probs[i] == pytest.approx(types[result.classes[i]][inside].mean(), rel=1e-5)
        assert types[1:, inside].sum(axis=1).argmax() + 1 == result.classes[i]
    cells = result.cells()
    assert [c["id"] for c in cells] == list(range(1, n + 1))
    centroids = ndi.center_of_mass(np.ones_like(label), result.instance_map, range(1, n + 1))
    for cell, centroid in zip(cells, centroids):
        assert cell["area"] == (result.instance_map == cell["id"]).sum() >= PROFILE_20X.default_min_cell_size
        assert cell["centroid"] == pytest.approx(centroid)
        assert cell["class"] == result.classes[cell["id"] - 1] and cell["class_prob"] == pytest.approx(result.class_probs[cell["id"] - 1])


# --------------------------------------------------------------------------------------------
# Field-of-view independence (METHOD.md §10.9)


@pytest.mark.parametrize("profile", [PROFILE_20X, PROFILE_40X], ids=["20x", "40x"])
def test_same_instances_alone_and_inside_a_larger_field(profile):
    tile, tile_classes = crowded_tile(4, profile, size=192, margin=8)
    other, other_classes = crowded_tile(5, profile, size=160, margin=8)
    field = np.zeros((300, 420), np.int32)
    field[50:242, 20:212] = tile
    field[100:260, 240:400] = np.where(other > 0, other + tile.max(), 0)
    field_classes = {**tile_classes, **{k + int(tile.max()): v for k, v in other_classes.items()}}
    contour, distance, types = network_like(*targets(field, field_classes, profile), seed=4)
    crop = np.s_[:, 50:242, 20:212]

    whole = postprocess(contour, distance, types, profile=profile)
    alone = postprocess(contour[crop], distance[crop], types[crop], profile=profile)

    assert len(alone) >= 10 and binary_pq(tile, alone.instance_map) >= 0.9
    assert same_partition(whole.instance_map[crop[1:]], alone.instance_map)
    assert np.array_equal(whole.type_map[crop[1:]], alone.type_map)


def test_contour_evidence_fixed_scale_does_not_depend_on_the_field():
    label, _ = crowded_tile(6, PROFILE_20X, size=128)
    maps = torch.from_numpy(distance_maps(label))
    field = torch.zeros(4, 128, 256)
    field[:, :, :128] = maps
    field[:, 60:64, 200:204] = torch.tensor([1.0, -1.0, 1.0, -1.0])[:, None, None] * 3  # an outlier elsewhere
    inner = np.s_[3:-3, 3:-3]

    fixed_alone, fixed_field = contour_evidence(maps), contour_evidence(field)[:, :128]
    assert torch.allclose(fixed_alone[inner], fixed_field[inner], atol=1e-5)
    minmax_alone, minmax_field = contour_evidence(maps, "minmax"), contour_evidence(field, "minmax")[:, :128]
    assert not torch.allclose(minmax_alone[inner], minmax_field[inner], atol=1e-2)  # the reference quirk


def test_contour_evidence_is_the_cross_correlation_of_method_section_4():
    """Against torch's conv2d (a cross-correlation) with the shared kernels, on a wide image done in strips."""
    maps = torch.rand(4, 70, 1030) * 2 - 1
    kernels = derivative_kernels()
    jump = kernels.abs().sum(dim=(1, 2))
    response = torch.nn.functional.conv2d(torch.nn.functional.pad(maps[None], (2,) * 4, mode="replicate"), kernels[:, None], groups=4)[0]
    expected = (0.5 - response / (2 * jump[:, None, None])).amax(dim=0)
    assert torch.allclose(contour_evidence(maps), expected, atol=1e-5)
    assert torch.allclose(contour_evidence(maps[:2]), (0.5 - response[:2] / (2 * jump[:2, None, None])).amax(dim=0), atol=1e-5)


def test_fixed_scale_meaning():
    """Flat map → 0.5; ideal +1 → −1 interface between neighbours → 1; half a jump (cell edge) → 0.75."""
    h = torch.zeros(4, 9, 12)
    h[0, :, :6], h[0, :, 6:] = 1.0, -1.0
    evidence = contour_evidence(h[:2])
    assert evidence[4, 5] == pytest.approx(1.0) and evidence[4, 0] == pytest.approx(0.5)
    edge = torch.zeros(2, 9, 12)
    edge[0, :, 6:] = -1.0
    assert contour_evidence(edge)[4, 5] == pytest.approx(0.75)
    assert interface_responses(4).tolist() == pytest.approx([8.4, 8.4, 12.2, 12.2])


# --------------------------------------------------------------------------------------------
# K=2 and single-class paths


def test_two_contour_classes_round_trip():
    label, classes = crowded_tile(7, PROFILE_40X)
    contour, distance, types = targets(label, classes, PROFILE_40X, num_contour_classes=2)
    result = postprocess(contour, distance, types, profile=PROFILE_40X)
    assert binary_pq(label, result.instance_map) >= 0.95


def test_two_contour_classes_use_the_foreground_probability():
    """K=2 [fg, bg] must act as K=3 [0, fg, bg]; the reference put the background probability in the energy."""
    label, classes = crowded_tile(8, PROFILE_20X, size=128)
    contour, distance, types = network_like(*targets(label, classes, PROFILE_20X, num_contour_classes=2), seed=8)
    as_three = np.concatenate([np.zeros_like(contour[:1]), contour])
    two = postprocess(contour, distance, types, profile=PROFILE_20X)
    three = postprocess(as_three, distance, types, profile=PROFILE_20X)
    assert len(two) > 10 and np.array_equal(two.instance_map, three.instance_map)


def test_single_class():
    label, classes = crowded_tile(9, PROFILE_20X, size=128)
    contour, distance, _ = network_like(*targets(label, classes, PROFILE_20X), seed=9)
    result = postprocess(contour, distance, profile=PROFILE_20X)
    assert len(result) > 10 and np.all(result.classes == 1)
    assert np.array_equal(result.type_map, (result.instance_map > 0).astype(np.uint8))
    foreground = contour[0] + contour[1]
    expected = ndi.mean(foreground, result.instance_map, range(1, len(result) + 1))
    assert result.class_probs == pytest.approx(expected, rel=1e-5)


def test_two_distance_maps():
    label, classes = crowded_tile(2, PROFILE_40X)
    contour, distance, types = targets(label, classes, PROFILE_40X)
    result = postprocess(contour, distance[:2], types, profile=PROFILE_40X)
    assert binary_pq(label, result.instance_map) >= 0.95


# --------------------------------------------------------------------------------------------
# Steps of the intended behaviour


def _one_cell(hole: tuple[slice, slice], size: int = 48):
    yy, xx = np.mgrid[:size, :size]
    label = (((yy - 24) ** 2 + (xx - 24) ** 2) <= 15**2).astype(np.int32)
    levels = np.where(label > 0, 1, 2)
    levels[hole] = 2
    return one_hot(levels, 3), np.zeros((4, size, size), np.float32)


def test_watershed_mask_fills_holes_smaller_than_5_px():
    contour, distance = _one_cell(np.s_[23:25, 23:25])  # 4 px hole: filled
    assert (postprocess(contour, distance, profile=PROFILE_40X).instance_map[23:25, 23:25] == 1).all()
    contour, distance = _one_cell(np.s_[22:25, 22:25])  # 9 px hole: kept
    assert (postprocess(contour, distance, profile=PROFILE_40X).instance_map[22:25, 22:25] == 0).all()


def test_min_cell_size():
    label, classes = crowded_tile(1, PROFILE_20X, size=128)
    contour, distance, types = targets(label, classes, PROFILE_20X)
    areas = np.bincount(label.ravel())[1:]
    threshold = int(np.median(areas))
    result = postprocess(contour, distance, types, profile=PROFILE_20X, min_cell_size=threshold)
    kept = np.bincount(result.instance_map.ravel())[1:]
    assert kept.min() >= threshold
    assert abs(len(result) - (areas >= threshold).sum()) <= 2


def test_empty_input():
    contour = np.zeros((3, 32, 32), np.float32)
    contour[2] = 1.0
    result = postprocess(contour, np.zeros((4, 32, 32), np.float32), profile=PROFILE_20X)
    assert len(result) == 0 and not result.instance_map.any() and result.cells() == []


def test_torch_tensors_on_cpu_match_numpy():
    label, classes = crowded_tile(11, PROFILE_20X, size=128)
    inputs = network_like(*targets(label, classes, PROFILE_20X), seed=11)
    from_numpy = postprocess(*inputs, profile=PROFILE_20X)
    from_torch = postprocess(*(torch.from_numpy(x) for x in inputs), profile=PROFILE_20X)
    assert np.array_equal(from_numpy.instance_map, from_torch.instance_map)
    assert np.array_equal(from_numpy.classes, from_torch.classes)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_match_cpu():
    label, classes = crowded_tile(12, PROFILE_40X)
    inputs = network_like(*targets(label, classes, PROFILE_40X), seed=12)
    on_cpu = postprocess(*inputs, profile=PROFILE_40X)
    on_gpu = postprocess(*(torch.from_numpy(x).cuda() for x in inputs), profile=PROFILE_40X)
    assert binary_pq(on_cpu.instance_map, on_gpu.instance_map) >= 0.99


# --------------------------------------------------------------------------------------------
# Input errors


def _small_inputs():
    contour = np.zeros((3, 16, 16), np.float32)
    contour[2] = 1.0
    types = np.zeros((NUM_CLASSES + 1, 16, 16), np.float32)
    types[0] = 1.0
    return contour, np.zeros((4, 16, 16), np.float32), types


@pytest.mark.parametrize("argument", [0, 1, 2])
def test_nan_or_inf_input_is_an_error(argument):
    inputs = list(_small_inputs())
    inputs[argument][0, 3, 4] = np.nan if argument != 1 else np.inf
    name = ["contour_prob", "distance", "type_prob"][argument]
    with pytest.raises(ValueError, match=f"{name}.*finite"):
        postprocess(*inputs, profile=PROFILE_20X)


def test_mismatched_shapes_are_errors():
    contour, distance, types = _small_inputs()
    with pytest.raises(ValueError, match=r"distance: expected H×W \(16, 16\)"):
        postprocess(contour, distance[:, :15], profile=PROFILE_20X)
    with pytest.raises(ValueError, match="type_prob: expected H×W"):
        postprocess(contour, distance, types[:, 1:], profile=PROFILE_20X)
    with pytest.raises(ValueError, match="contour_prob: expected K=3"):
        postprocess(np.concatenate([contour, contour[:1]]), distance, profile=PROFILE_20X)
    with pytest.raises(ValueError, match="distance: expected 4 channels"):
        postprocess(contour, distance[:3], profile=PROFILE_20X)
    with pytest.raises(ValueError, match=r"contour_prob: expected a \(channels, H, W\)"):
        postprocess(contour[None], distance, profile=PROFILE_20X)
    with pytest.raises(ValueError, match="type_prob: expected C\\+1 channels"):
        postprocess(contour, distance, types[:1], profile=PROFILE_20X)


def test_bad_options_are_errors():
    contour, distance, types = _small_inputs()
    with pytest.raises(ValueError, match="contour_prob: expected softmax probabilities"):
        postprocess(contour * 5 - 2, distance, profile=PROFILE_20X)
    with pytest.raises(ValueError, match="distance_normalisation"):
        postprocess(contour, distance, profile=PROFILE_20X, distance_normalisation="per-tile")
    with pytest.raises(ValueError, match="min_cell_size"):
        postprocess(contour, distance, profile=PROFILE_20X, min_cell_size=-1)
    with pytest.raises(TypeError, match="profile"):
        postprocess(contour, distance, profile="40x")
    with pytest.raises(TypeError, match="contour_prob"):
        postprocess(contour.tolist(), distance, profile=PROFILE_20X)


# --------------------------------------------------------------------------------------------
# MONAI dictionary transform


def _logits(probabilities: np.ndarray) -> torch.Tensor:
    return torch.log(torch.from_numpy(probabilities).clamp_min(1e-4))


def test_dict_transform_in_a_compose():
    label, classes = crowded_tile(13, PROFILE_20X, size=128)
    contour, distance, types = network_like(*targets(label, classes, PROFILE_20X), seed=13)
    outputs = {"contour": _logits(contour), "distance": torch.from_numpy(distance), "type": _logits(types)}
    softmax = {key: torch.softmax(outputs[key], dim=0) for key in ("contour", "type")}
    expected = postprocess(softmax["contour"], distance, softmax["type"], profile=PROFILE_20X)
    transform = Compose([CISCAPostProcessingd(magnification=20, num_classes=NUM_CLASSES)])

    for item in ({"pred": outputs, "image": torch.zeros(3, 128, 128)}, dict(outputs)):
        out = transform(item)
        assert out["pred_instances"].shape == (1, 128, 128) and out["pred_instances"].dtype == torch.int32
        assert out["pred_types"].shape == (1, 128, 128) and out["pred_types"].dtype == torch.uint8
        assert np.array_equal(out["pred_instances"][0].numpy(), expected.instance_map)
        assert np.array_equal(out["pred_types"][0].numpy(), expected.type_map)
        assert out["pred_cells"] == expected.cells()

    single = CISCAPostProcessingd(keys=("contour", "distance"), mpp=0.5)({"pred": outputs})
    assert np.array_equal(single["pred_instances"][0].numpy(), expected.instance_map)
    assert all(cell["class"] == 1 for cell in single["pred_cells"])


def test_dict_transform_keeps_metatensor_metadata_and_takes_bfloat16_logits():
    contour = torch.zeros(3, 32, 32)
    contour[2] = 5.0
    contour[1, 8:20, 8:20] = 9.0
    item = {"pred": {"contour": MetaTensor(contour.bfloat16(), affine=torch.eye(4) * 2), "distance": torch.zeros(4, 32, 32).bfloat16()}}
    out = CISCAPostProcessingd(magnification=20)(item)
    assert isinstance(out["pred_instances"], MetaTensor) and out["pred_instances"].affine[0, 0] == 2
    assert out["pred_instances"].dtype == torch.int32 and out["pred_types"].dtype == torch.uint8
    assert [cell["id"] for cell in out["pred_cells"]] == [1] and out["pred_cells"][0]["centroid"] == pytest.approx((13.5, 13.5))


def test_dict_transform_errors():
    outputs = {"contour": torch.zeros(3, 16, 16), "distance": torch.zeros(4, 16, 16), "type": torch.zeros(NUM_CLASSES + 1, 16, 16)}
    with pytest.raises(ValueError, match="num_classes \\+ 1 = 4"):
        CISCAPostProcessingd(magnification=40, num_classes=3)(dict(outputs))
    with pytest.raises(KeyError, match="'contour' not found"):
        CISCAPostProcessingd(magnification=40)({"distance": outputs["distance"]})
    with pytest.raises(ValueError, match="after decollation"):
        CISCAPostProcessingd(magnification=40)({k: v[None] for k, v in outputs.items()})
    with pytest.raises(ValueError, match="magnification"):
        CISCAPostProcessingd()


class _FixedOutputs(torch.nn.Module):
    """Stands in for the CISCA network: returns stored logits for every image of the batch."""

    def __init__(self, outputs: dict[str, torch.Tensor]):
        super().__init__()
        self.outputs = outputs

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v[None].expand(image.shape[0], *v.shape) for k, v in self.outputs.items()}


def test_dict_transform_in_a_supervised_evaluator():
    label, classes = crowded_tile(14, PROFILE_20X, size=96)
    contour, distance, types = targets(label, classes, PROFILE_20X)
    outputs = {"contour": _logits(contour), "distance": torch.from_numpy(distance), "type": _logits(types)}
    data = [{"image": torch.zeros(3, 96, 96), "label": torch.from_numpy(label)[None]} for _ in range(2)]
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(data, batch_size=2),
        network=_FixedOutputs(outputs),
        postprocessing=Compose([CISCAPostProcessingd(magnification="20x", num_classes=NUM_CLASSES)]),
    )
    evaluator.run()
    items = evaluator.state.output
    assert len(items) == 2
    for item in items:
        assert item["pred_instances"].shape == (1, 96, 96)
        assert binary_pq(label, item["pred_instances"][0].numpy()) >= 0.98
        pairs, _, _ = matched_pairs(label, item["pred_instances"][0].numpy())
        types_by_id = {cell["id"]: cell["class"] for cell in item["pred_cells"]}
        assert all(types_by_id[pred] == classes[gt] for gt, pred, _ in pairs)
