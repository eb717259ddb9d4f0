"""Tests of cellgap.data.augmentation: label integrity, image/label alignment, photometric steps,
stain jitter, crops, determinism and input errors."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from monai.data import get_track_meta, set_track_meta
from monai.transforms import (
    Compose,
    Flip,
    MedianSmoothd,
    OneOf,
    RandAdjustContrastd,
    RandGaussianNoised,
    RandGaussianSharpend,
    RandGaussianSmoothd,
    RandSpatialCropd,
    Rotate90,
    ScaleIntensityRanged,
)
from monai.utils import set_determinism
from skimage import color

from cellgap.data.augmentation import (
    STAIN_STATISTICS,
    CheckTiled,
    ClipIntensityd,
    MedianSmooth3x3d,
    RandAdditiveGaussianNoised,
    RandCoarseElasticd,
    RandDihedrald,
    RandDihedralElasticd,
    RandGammaContrastd,
    RandGaussianBlurd,
    RandHSVShiftd,
    RandLABStainJitterd,
    RandSharpend,
    RandSquareCropd,
    cisca_augmentations,
    lab8_to_rgb,
    median3x3,
    rgb_to_lab8,
    shift_hsv,
    stain_statistics,
)


def blob_sample(seed: int = 0, size: int = 64, n_cells: int = 12, n_classes: int = 3) -> dict:
    """Random discs (instance map), a class per disc, and an H&E-like image painted from them."""
    rng = np.random.default_rng(seed)
    label = np.zeros((size, size), dtype=np.int32)
    yy, xx = np.mgrid[:size, :size]
    for cell in range(1, n_cells + 1):
        cy, cx, r = rng.integers(0, size), rng.integers(0, size), rng.integers(3, 9)
        label[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = cell
    cell_class = rng.integers(1, n_classes + 1, n_cells + 1)
    cell_class[0] = 0
    classes = cell_class[label].astype(np.uint8)
    image = np.where(label[..., None] > 0, [90.0, 60.0, 150.0], [235.0, 190.0, 215.0])
    image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.float32).transpose(2, 0, 1)
    return {"image": image, "label": label[None], "classes": classes[None], "cell_class": cell_class}


def as_numpy(value) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def coordinate_sample(size: int, block: int = 1) -> dict:
    """Image whose channels encode (row, column) block indices; label = block id + 1; classes = id % 7."""
    rows, cols = np.mgrid[:size, :size] // block
    blocks = size // block
    ids = (rows * blocks + cols + 1).astype(np.int32)
    image = np.stack([rows, cols, np.zeros_like(rows)]).astype(np.float32)
    return {"image": image, "label": ids[None], "classes": (ids % 7)[None].astype(np.int32)}


# --------------------------------------------------------------------------------------------
# Colour conversions


def test_lab_conversion_matches_skimage_and_round_trips():
    rgb = np.random.default_rng(1).integers(0, 256, (3, 40, 40)).astype(np.float32)
    lab = rgb_to_lab8(rgb)
    reference = color.rgb2lab(rgb.transpose(1, 2, 0) / 255.0).transpose(2, 0, 1)
    assert np.abs(lab[0] / 2.55 - reference[0]).max() < 0.05
    assert np.abs(lab[1:] - 128 - reference[1:]).max() < 0.3  # below the 8-bit quantisation of OpenCV LAB
    assert np.abs(lab8_to_rgb(lab) - rgb).max() < 0.5


def test_hsv_shift_matches_skimage():
    rgb = np.random.default_rng(2).integers(0, 256, (3, 30, 30)).astype(np.float32)
    assert np.abs(shift_hsv(rgb, 0.0, 0.0, 0.0) - rgb).max() < 1e-3
    hsv = color.rgb2hsv(rgb.transpose(1, 2, 0) / 255.0)
    hsv[..., 0] = (hsv[..., 0] - 25 / 360) % 1.0
    hsv[..., 1] = np.clip(hsv[..., 1] + 0.1, 0, 1)
    hsv[..., 2] = np.clip(hsv[..., 2] + 12 / 255, 0, 1)
    expected = color.hsv2rgb(hsv).transpose(2, 0, 1) * 255
    assert np.abs(shift_hsv(rgb, -25.0, 0.1, 12.0) - expected).max() < 0.01


# --------------------------------------------------------------------------------------------
# Label maps stay integral and aligned with the image


def test_full_pipeline_keeps_label_ids_and_class_correspondence():
    pipeline = Compose(cisca_augmentations(stain_stats="pannuke", crop_size=48))
    pipeline.set_random_state(7)
    for seed in range(6):
        sample = blob_sample(seed)
        out = pipeline({k: sample[k] for k in ("image", "label", "classes")})
        label, classes = as_numpy(out["label"]), as_numpy(out["classes"])
        image = as_numpy(out["image"])
        assert image.shape == (3, 48, 48) and label.shape == classes.shape == (1, 48, 48)
        assert label.dtype == np.int32 and classes.dtype == np.uint8 and image.dtype == np.float32
        assert set(np.unique(label)) <= set(np.unique(sample["label"]))  # no id invented by interpolation
        # Label and class maps moved together: every pixel keeps the class of its instance.
        np.testing.assert_array_equal(classes, sample["cell_class"][label])
        assert image.min() >= 0 and image.max() <= 255


def test_uint8_image_as_loaded_augments_like_its_float32_copy():
    for seed in range(8):
        sample = blob_sample(seed)
        sample["image"] = np.rint(sample["image"]).astype(np.uint8)
        outputs = []
        for image in (sample["image"], sample["image"].astype(np.float32)):
            pipeline = Compose(cisca_augmentations(stain_stats="pannuke", crop_size=48)).set_random_state(seed)
            outputs.append(pipeline({"image": torch.from_numpy(image), "label": sample["label"], "classes": sample["classes"]}))
        assert outputs[0]["image"].dtype == torch.float32
        for key in ("image", "label", "classes"):
            np.testing.assert_array_equal(as_numpy(outputs[0][key]), as_numpy(outputs[1][key]))


def geometric_pipeline(crop_size: int | None, elastic: bool) -> Compose:
    steps = [t for t in cisca_augmentations(crop_size=crop_size, stain_stats=None) if isinstance(t, (CheckTiled, RandSpatialCropd))]
    moves = RandDihedralElasticd(("image", "label", "classes"), elastic_prob=1.0)
    return Compose([*steps, moves if elastic else moves.dihedral])


def test_rotations_flips_and_crops_move_image_and_labels_identically():
    pipeline = geometric_pipeline(crop_size=32, elastic=False)
    pipeline.set_random_state(3)
    sample = coordinate_sample(48)
    blocks = 48
    for _ in range(12):
        out = pipeline(dict(sample))
        image, label = as_numpy(out["image"]), as_numpy(out["label"])[0]
        decoded = (image[0] * blocks + image[1] + 1).astype(np.int64)
        np.testing.assert_array_equal(decoded, label)
        np.testing.assert_array_equal(as_numpy(out["classes"])[0], label % 7)


def test_elastic_moves_image_and_labels_together():
    pipeline = geometric_pipeline(crop_size=None, elastic=True)
    pipeline.set_random_state(5)
    sample = coordinate_sample(64, block=8)  # 8×8 blocks: interpolation only mixes along block edges
    for _ in range(6):
        out = pipeline(dict(sample))
        image, label = as_numpy(out["image"]), as_numpy(out["label"])[0]
        assert set(np.unique(label)) <= set(np.unique(sample["label"]))
        np.testing.assert_array_equal(as_numpy(out["classes"])[0], label % 7)
        decoded = np.rint(image[0]) * 8 + np.rint(image[1]) + 1
        assert np.mean(decoded == label) > 0.9
        assert np.abs(decoded - label).max() <= 9  # a mismatch is at most one block away


def test_elastic_border_points_inwards_and_zero_magnitude_is_identity():
    elastic = RandCoarseElasticd(("image", "label"), mode=("bilinear", "nearest"), magnitude=10.0, prob=1.0)
    elastic.set_random_state(0)
    for _ in range(20):
        elastic.randomize()
        grid = elastic.sampling_grid(64, 64)
        assert grid.abs().max() <= 1.0 + 1e-6  # never samples outside the tile
    sample = blob_sample(1)
    still = RandCoarseElasticd(("image", "label"), mode=("bilinear", "nearest"), magnitude=0.0, prob=1.0)
    out = still({"image": sample["image"], "label": sample["label"]})
    np.testing.assert_allclose(as_numpy(out["image"]), sample["image"], atol=1e-2)  # float32 grid rounding
    np.testing.assert_array_equal(as_numpy(out["label"]), sample["label"])


def dihedral_moves(array: np.ndarray) -> dict[tuple[int, int], np.ndarray]:
    """``array`` (C, H, W) after k quarter turns then flip f (none, vertical, horizontal, both)."""
    out = {}
    for k in range(4):
        for f, axes in enumerate(((), (1,), (2,), (1, 2))):
            moved = np.rot90(array, k, axes=(1, 2))
            out[k, f] = np.flip(moved, axis=axes) if axes else moved
    return out


def test_dihedral_reaches_all_8_elements_with_the_method_frequencies():
    dihedral = next(t for t in cisca_augmentations() if isinstance(t, RandDihedralElasticd)).dihedral
    dihedral.set_random_state(11)
    sample = coordinate_sample(8)
    moves = dihedral_moves(sample["label"])
    n = 4000
    draws = np.zeros((4, 4))
    elements: dict[bytes, int] = {}
    for _ in range(n):
        out = dihedral(dict(sample))
        label, image = as_numpy(out["label"]), as_numpy(out["image"])
        np.testing.assert_array_equal(label, moves[dihedral.quarter_turns, dihedral.flip])
        np.testing.assert_array_equal(image[0] * 8 + image[1] + 1, label[0])  # image and labels moved alike
        np.testing.assert_array_equal(as_numpy(out["classes"]), label % 7)
        assert label.dtype == np.int32
        draws[dihedral.quarter_turns, dihedral.flip] += 1
        elements[label.tobytes()] = elements.get(label.tobytes(), 0) + 1
    # Rotation p 0.9 with k uniform in {0..3}; flip p 0.9, uniform among vertical, horizontal, both;
    # independent, as RandRotate90d followed by a OneOf of three RandFlipd.
    rotation = np.array([0.1 + 0.9 / 4, 0.9 / 4, 0.9 / 4, 0.9 / 4])
    flip = np.array([0.1, 0.3, 0.3, 0.3])
    np.testing.assert_allclose(draws / n, np.outer(rotation, flip), atol=0.015)
    # The 16 (k, flip) pairs give the 8 elements of the dihedral group (flipping both axes is a half
    # turn): every element is reached with the summed probability of its pairs.
    expected: dict[bytes, float] = {}
    for (k, f), moved in moves.items():
        expected[moved.tobytes()] = expected.get(moved.tobytes(), 0.0) + rotation[k] * flip[f]
    assert len(expected) == 8 and set(elements) == set(expected)
    for key, p in expected.items():
        assert abs(elements[key] / n - p) < 0.025, (elements[key] / n, p)


def test_dihedral_matches_monai_rotate_then_flip():
    sample = {k: v[:, :, :10].copy() for k, v in coordinate_sample(12).items()}  # not square
    dihedral = RandDihedrald(("image", "label", "classes"))
    for k in range(4):
        for f, axis in enumerate((None, 0, 1, (0, 1))):
            dihedral.quarter_turns, dihedral.flip = k, f
            for value in sample.values():
                expected = Rotate90(k=k)(torch.from_numpy(value)) if k else torch.from_numpy(value)
                if axis is not None:
                    expected = Flip(spatial_axis=axis)(expected)
                np.testing.assert_array_equal(dihedral.apply(value), as_numpy(expected))


def test_dihedral_probabilities_zero_and_one():
    sample = coordinate_sample(8)
    still = RandDihedrald(("image", "label"), rotate_prob=0.0, flip_prob=0.0)
    out = still(dict(sample))
    assert out["label"] is sample["label"]
    always = RandDihedrald(("image", "label"), rotate_prob=1.0, flip_prob=1.0)
    always.set_random_state(0)
    flips = {always.randomize() or always.flip for _ in range(200)}
    assert flips == {1, 2, 3}
    with pytest.raises(ValueError, match="rotate_prob"):
        RandDihedrald(rotate_prob=1.5)


def test_dihedral_source_positions_invert_every_element():
    label = coordinate_sample(12)["label"][:, :, :9]  # not square
    dihedral = RandDihedrald("label")
    for k in range(4):
        for f in range(4):
            dihedral.quarter_turns, dihedral.flip = k, f
            moved = dihedral.apply(label)
            rows, cols = np.mgrid[: moved.shape[1], : moved.shape[2]].astype(np.float32)
            y, x = dihedral.source_positions(rows, cols, *label.shape[1:])
            np.testing.assert_array_equal(label[0][y.astype(int), x.astype(int)], moved[0])


def test_folded_turn_flip_and_warp_equal_the_two_steps_in_turn():
    rng = np.random.default_rng(4)
    sample = {"image": rng.uniform(0, 255, (3, 40, 56)).astype(np.float32),
              "label": rng.integers(0, 1000, (1, 40, 56)).astype(np.int32)}  # not square: turns swap the sides
    moves = RandDihedralElasticd(("image", "label"), mode=("bilinear", "nearest"), elastic_prob=1.0).set_random_state(3)
    seen = set()
    for _ in range(40):
        moves.randomize()
        seen.add((moves.dihedral.quarter_turns, moves.dihedral.flip))
        folded = moves.elastic.warp(sample, moves.dihedral)
        in_turn = moves.elastic.warp(moves.dihedral.move(sample))
        np.testing.assert_allclose(as_numpy(folded["image"]), as_numpy(in_turn["image"]), atol=1e-2)  # float32 grid rounding
        np.testing.assert_array_equal(as_numpy(folded["label"]), as_numpy(in_turn["label"]))
    assert len(seen) > 8


def test_turn_flip_and_warp_draw_from_one_state_with_the_method_probabilities():
    moves = RandDihedralElasticd(("image", "label"), mode=("bilinear", "nearest"))
    sample = blob_sample(2, size=32)
    outputs = []
    for _ in range(2):
        moves.set_random_state(9)
        outputs.append([moves({"image": sample["image"], "label": sample["label"]}) for _ in range(3)])
    for first, second in zip(*outputs):
        np.testing.assert_array_equal(as_numpy(first["image"]), as_numpy(second["image"]))
    warps = 0
    for _ in range(2000):
        moves.randomize()
        warps += moves.elastic._do_transform
    assert abs(warps / 2000 - 0.7) < 0.04
    quiet = RandDihedralElasticd(("image", "label"), ("bilinear", "nearest"), rotate_prob=0.0, flip_prob=0.0, elastic_prob=0.0)
    assert quiet(dict(sample))["label"] is sample["label"]


def test_elastic_labels_are_gathered_exactly_as_nearest_grid_sampling():
    elastic = RandCoarseElasticd(("image", "label", "classes"), prob=1.0)
    elastic.set_random_state(8)
    sample = blob_sample(3, size=80, n_cells=40)
    for _ in range(5):
        out = elastic({k: sample[k] for k in ("image", "label", "classes")})
        grid = elastic.sampling_grid(80, 80)
        for key in ("label", "classes"):
            source = torch.from_numpy(sample[key].astype(np.float32))[None]
            expected = torch.nn.functional.grid_sample(source, grid, mode="nearest", padding_mode="border",
                                                       align_corners=True)[0].numpy()
            moved = as_numpy(out[key])
            assert moved.dtype == sample[key].dtype  # moved, never interpolated or cast
            assert np.mean(moved == expected) > 0.999  # rounding ties of the float grid may differ
        bilinear = torch.nn.functional.grid_sample(torch.from_numpy(sample["image"])[None], grid, mode="bilinear",
                                                   padding_mode="border", align_corners=True)[0].numpy()
        np.testing.assert_allclose(as_numpy(out["image"]), bilinear, atol=1e-3)


def test_square_crop_passes_tiles_of_the_crop_size_through():
    crop = next(t for t in cisca_augmentations(crop_size=64) if isinstance(t, RandSpatialCropd))
    sample = blob_sample(0)  # 64²
    state = crop.R.get_state()[1].copy()
    out = crop(dict(sample))
    assert out["label"] is sample["label"] and out["image"] is sample["image"]
    np.testing.assert_array_equal(crop.R.get_state()[1], state)  # nothing drawn
    small = next(t for t in cisca_augmentations(crop_size=32) if isinstance(t, RandSpatialCropd))
    assert as_numpy(small(dict(sample))["image"]).shape == (3, 32, 32)


def test_median3x3_matches_monai_median_smooth():
    rng = np.random.default_rng(0)
    images = [rng.random((3, 37, 29)).astype(np.float32) * 255,
              rng.integers(0, 4, (3, 20, 20)).astype(np.float32),  # many ties
              rng.integers(0, 256, (1, 3, 5)).astype(np.float32)]
    for image in images:
        expected = as_numpy(MedianSmoothd("image", radius=1)({"image": torch.from_numpy(image)})["image"])
        np.testing.assert_array_equal(median3x3(image), expected)
        np.testing.assert_array_equal(as_numpy(MedianSmooth3x3d("image")({"image": image})["image"]), expected)


@pytest.mark.parametrize("shape", [(3, 40, 23), (1, 5, 9)])  # the second smaller than the widest kernel (13 taps)
def test_numpy_blur_and_sharpen_match_monai(shape):
    image = np.random.default_rng(2).random(shape).astype(np.float32) * 255
    pairs = [
        (RandGaussianSmoothd, RandGaussianBlurd, dict(sigma_x=(0.5, 1.5), sigma_y=(0.5, 1.5))),
        (RandGaussianSharpend, RandSharpend,
         dict(sigma1_x=(0.1, 0.2), sigma1_y=(0.1, 0.2), sigma2_x=(0.7, 0.9), sigma2_y=(0.7, 0.9), alpha=(0.45, 0.9))),
    ]
    for monai_class, numpy_class, ranges in pairs:
        theirs = monai_class("image", prob=0.6, **ranges).set_random_state(3)
        ours = numpy_class("image", prob=0.6, **ranges).set_random_state(3)
        fired = 0
        for _ in range(8):
            expected = as_numpy(theirs({"image": torch.from_numpy(image)})["image"])
            out = ours({"image": image})["image"]
            fired += ours._do_transform
            assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == shape
            np.testing.assert_allclose(out, expected, atol=2e-3)
        assert 0 < fired < 8  # both branches seen, drawn from the same random stream
        assert theirs.R.randint(2**31) == ours.R.randint(2**31)
    # rows and columns get their own sigma, as in MONAI (spatial axes 0 and 1)
    smooth = RandGaussianBlurd("image", sigma_x=(0.5, 0.5), sigma_y=(1.5, 1.5), prob=1.0)
    reference = RandGaussianSmoothd("image", sigma_x=(0.5, 0.5), sigma_y=(1.5, 1.5), prob=1.0)
    np.testing.assert_allclose(smooth({"image": image})["image"], as_numpy(reference({"image": image})["image"]), atol=2e-3)
    with pytest.raises(ValueError, match=r"image: expected a channel-first \(C, H, W\) image"):
        smooth({"image": image[0]})


def test_float32_noise_has_monais_distribution():
    image = np.full((3, 64, 64), 100.0, dtype=np.float32)
    ours, theirs = RandAdditiveGaussianNoised("image", mean=1.0, std=6.0, prob=1.0), RandGaussianNoised("image", mean=1.0, std=6.0, prob=1.0)
    ours.set_random_state(0)
    theirs.set_random_state(0)
    ours_std, theirs_std = [], []
    for _ in range(300):
        a, b = as_numpy(ours({"image": image})["image"]), as_numpy(theirs({"image": image})["image"])
        assert a.dtype == b.dtype == np.float32 and a.shape == b.shape
        assert abs((a - 100).mean() - 1.0) < 0.1 + 5 * ours.sampled_std / np.sqrt(a.size)
        ours_std.append((a - 100).std())
        theirs_std.append((b - 100).std())
    # The per-call std is uniform in [0, 6] for both: compare the quantiles of the measured stds.
    np.testing.assert_allclose(np.quantile(ours_std, [0.1, 0.5, 0.9]), np.quantile(theirs_std, [0.1, 0.5, 0.9]), atol=0.45)
    np.testing.assert_allclose(np.quantile(ours_std, [0.1, 0.5, 0.9]), [0.6, 3.0, 5.4], atol=0.45)


def test_gamma_contrast_matches_monai():
    image = blob_sample(2)["image"]
    image[0, 0, 0] = 0.0  # the minimum maps to 0 ** gamma
    theirs = RandAdjustContrastd("image", gamma=(0.7, 1.4), prob=1.0).set_random_state(4)
    ours = RandGammaContrastd("image", gamma=(0.7, 1.4), prob=1.0)
    for _ in range(6):
        expected = theirs({"image": torch.from_numpy(image)})["image"]
        ours.randomize = lambda data=None, g=theirs.adjuster.gamma_value: setattr(ours, "gamma_value", g)
        out = as_numpy(ours({"image": image})["image"])
        np.testing.assert_allclose(out, as_numpy(expected), atol=2e-3)
        assert out.dtype == np.float32
    draws = RandGammaContrastd("image", gamma=(0.7, 1.4), prob=0.5).set_random_state(0)
    gammas, fired = [], 0
    for _ in range(2000):
        draws.randomize()
        fired += draws._do_transform
        if draws._do_transform:
            gammas.append(draws.gamma_value)
    assert abs(fired / 2000 - 0.5) < 0.04 and 0.7 <= min(gammas) < 0.71 and 1.39 < max(gammas) <= 1.4
    assert abs(np.mean(gammas) - 1.05) < 0.02


def test_clip_matches_scale_intensity_range_clip():
    image = np.random.default_rng(1).normal(128, 100, (3, 16, 16)).astype(np.float32)
    expected = ScaleIntensityRanged("image", a_min=0.0, a_max=255.0, b_min=0.0, b_max=255.0, clip=True)({"image": image})
    out = ClipIntensityd("image", 0.0, 255.0)({"image": image})
    np.testing.assert_allclose(as_numpy(out["image"]), as_numpy(expected["image"]), atol=1e-4)
    assert as_numpy(out["image"]).dtype == np.float32 and image.min() < 0  # the input is not modified


@pytest.mark.parametrize("out_range", [(0.0, 1.0), (-1.0, 1.0), (0.1, 0.7)])
def test_clip_with_out_range_matches_scale_intensity_range(out_range):
    image = torch.from_numpy(np.random.default_rng(2).normal(128, 100, (3, 64, 64)).astype(np.float32))
    kept = image.clone()
    expected = ScaleIntensityRanged("image", a_min=0.0, a_max=255.0, b_min=out_range[0], b_max=out_range[1],
                                    clip=True)({"image": image})
    out = ClipIntensityd("image", 0.0, 255.0, out_range=out_range)({"image": image})
    np.testing.assert_array_equal(as_numpy(out["image"]), as_numpy(expected["image"]))  # to the bit
    assert isinstance(out["image"], torch.Tensor) and out["image"].dtype == torch.float32
    assert torch.equal(image, kept)  # the input is not modified
    loaded = {"image": image.clamp(0, 255).to(torch.uint8)}  # LoadTiled's uint8 image, as the validation pipeline gets it
    np.testing.assert_array_equal(as_numpy(ClipIntensityd("image", 0.0, 255.0, out_range=out_range)(loaded)["image"]),
                                  as_numpy(ScaleIntensityRanged("image", a_min=0.0, a_max=255.0, b_min=out_range[0],
                                                                b_max=out_range[1], clip=True)(loaded)["image"]))


def test_clip_to_uint8_rounds_to_the_nearest_value():
    image = torch.tensor([[[-3.0, 0.49, 0.5, 1.5, 254.49, 254.5, 300.0, 127.7]]]).expand(3, 1, 8).contiguous()
    out = ClipIntensityd("image", 0.0, 255.0, dtype="uint8")({"image": image})["image"]
    assert out.dtype == torch.uint8
    assert out[0, 0].tolist() == [0, 0, 1, 2, 254, 255, 255, 128]
    rng = np.random.default_rng(3)
    image = rng.normal(128, 100, (3, 32, 32)).astype(np.float32)
    expected = np.floor(np.clip(image, 0, 255) + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(as_numpy(ClipIntensityd("image", dtype="uint8")({"image": image})["image"]), expected)


@pytest.mark.parametrize("kwargs, match", [(dict(dtype="float16"), "dtype: expected 'float32' or 'uint8'"),
                                           (dict(low=-1.0, dtype="uint8"), "within 0..255"),
                                           (dict(out_range=(-1.0, 1.0), dtype="uint8"), "within 0..255")])
def test_clip_dtype_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ClipIntensityd("image", **kwargs)


@pytest.mark.parametrize("kwargs", [dict(low=0.0, high=0.0, out_range=(0.0, 1.0)), dict(out_range=(1.0, 0.0)),
                                    dict(out_range=(0.0, float("nan")))])
def test_clip_out_range_errors(kwargs):
    with pytest.raises(ValueError, match="out_range"):
        ClipIntensityd("image", **kwargs)


# --------------------------------------------------------------------------------------------
# Photometric steps


def photometric_transforms() -> list:
    steps = cisca_augmentations(stain_stats="conic")
    members = []
    for t in steps:
        if isinstance(t, OneOf):
            members.extend(t.transforms[:-1])  # the last member is the identity
    return [RandLABStainJitterd(stats="conic"), RandHSVShiftd(prob=1.0), *members, steps[-2]]


def test_photometric_transforms_touch_the_image_only():
    sample = blob_sample(4)
    for index, transform in enumerate(photometric_transforms()):
        if hasattr(transform, "set_random_state"):
            transform.set_random_state(index)
        if hasattr(transform, "prob"):
            transform.prob = 1.0
        out = transform({k: sample[k].copy() for k in ("image", "label", "classes")})
        np.testing.assert_array_equal(as_numpy(out["label"]), sample["label"])
        np.testing.assert_array_equal(as_numpy(out["classes"]), sample["classes"])
        assert as_numpy(out["image"]).shape == sample["image"].shape
        assert not np.allclose(as_numpy(out["image"]), sample["image"]), type(transform).__name__


def test_lab_jitter_moves_statistics_to_the_sampled_targets():
    sample = blob_sample(5, size=96, n_cells=30)
    before = rgb_to_lab8(sample["image"]).reshape(3, -1)
    jitter = RandLABStainJitterd(stats="cytodark0", prob=1.0)
    jitter.set_random_state(2)
    for _ in range(5):
        out = as_numpy(jitter({"image": sample["image"]})["image"])
        after = rgb_to_lab8(out).reshape(3, -1)
        target_mean, target_std = jitter.target_mean, jitter.target_std
        assert np.all(np.abs(after.mean(1) - target_mean) < np.abs(before.mean(1) - target_mean) + 1e-3)
        # Clipping to the gamut and to 8 bits leaves a small residue.
        np.testing.assert_allclose(after.mean(1), target_mean, atol=3.0)
        np.testing.assert_allclose(after.std(1), target_std, rtol=0.15, atol=1.5)


def test_lab_jitter_targets_follow_the_dataset_statistics():
    stats = STAIN_STATISTICS["pannuke"]
    jitter = RandLABStainJitterd(stats="pannuke", prob=1.0)
    jitter.set_random_state(0)
    draws = []
    for _ in range(2000):
        jitter.randomize()
        draws.append(jitter.target_mean.copy())
    draws = np.array(draws)
    np.testing.assert_allclose(draws.mean(0), stats.mean_mu, atol=1.5)
    np.testing.assert_allclose(draws.std(0), 0.6 * np.array(stats.mean_sigma), rtol=0.1)


def test_stain_statistics_names_and_mappings():
    assert stain_statistics("PanNuke") is STAIN_STATISTICS["pannuke"]
    he = STAIN_STATISTICS["he"]
    np.testing.assert_allclose(he.mean_mu, (np.array(STAIN_STATISTICS["conic"].mean_mu) + STAIN_STATISTICS["pannuke"].mean_mu) / 2)
    custom = stain_statistics({"mean_mu": [1, 2, 3], "mean_sigma": [1, 1, 1], "std_mu": [5, 5, 5], "std_sigma": [1, 1, 1]})
    assert custom.mean_mu == (1.0, 2.0, 3.0)
    with pytest.raises(ValueError, match="stain_stats: unknown dataset 'monuseg'"):
        stain_statistics("monuseg")
    with pytest.raises(ValueError, match="missing"):
        stain_statistics({"mean_mu": [1, 2, 3]})
    with pytest.raises(ValueError, match="std_sigma"):
        stain_statistics({"mean_mu": [1, 2, 3], "mean_sigma": [1, 1, 1], "std_mu": [5, 5, 5], "std_sigma": [1, -1, 1]})


# --------------------------------------------------------------------------------------------
# Crops


def test_crops_from_a_large_tile_are_crop_sized_and_aligned():
    pipeline = Compose(cisca_augmentations(crop_size=256, prob_scale=0.0))
    pipeline.set_random_state(0)
    sample = coordinate_sample(1024)
    sample["image"] = sample["image"] / 5  # keep the coordinates within 0..255
    for _ in range(3):
        out = pipeline(dict(sample))
        image, label = as_numpy(out["image"]), as_numpy(out["label"])[0]
        assert image.shape == (3, 256, 256) and label.shape == (256, 256)
        rows, cols = np.divmod(label - 1, 1024)
        np.testing.assert_allclose(image[0], rows / 5, rtol=1e-6)
        np.testing.assert_allclose(image[1], cols / 5, rtol=1e-6)
        assert 0 <= rows.min() <= 768 and 0 <= cols.min() <= 768


def test_stored_contour_levels_move_with_the_label_maps():
    """A sample's contour_levels (ContourLevelsd) go through crop, turns, flips and the elastic warp
    exactly as the instance map does; a sample without them is augmented as before."""
    pipeline = Compose(cisca_augmentations(crop_size=48))
    sample = {k: v for k, v in blob_sample(3, size=80, n_cells=30).items() if k != "cell_class"}
    sample["contour_levels"] = (sample["label"] % 4).astype(np.uint8)  # any function of the instance id
    moved_somewhere = 0
    for seed in range(12):
        pipeline.set_random_state(seed)
        out = pipeline(dict(sample))
        label, levels = as_numpy(out["label"]), as_numpy(out["contour_levels"])
        assert levels.dtype == np.uint8 and levels.shape == (1, 48, 48)
        np.testing.assert_array_equal(levels, label % 4)
        pipeline.set_random_state(seed)
        without = pipeline({k: v for k, v in sample.items() if k != "contour_levels"})
        np.testing.assert_array_equal(as_numpy(without["label"]), label)
        moved_somewhere += int(not np.array_equal(label, sample["label"][:, :48, :48]))
    assert moved_somewhere >= 10


def test_crop_offsets_cover_every_valid_position():
    crop = next(t for t in cisca_augmentations(crop_size=32) if isinstance(t, RandSpatialCropd))
    crop.set_random_state(1)
    sample = coordinate_sample(36)
    seen = set()
    for _ in range(400):  # 25 offsets: missing one by chance has probability ≈ 25·(24/25)**400 ≈ 2e-6
        label = as_numpy(crop(dict(sample))["label"])[0]
        seen.add(divmod(int(label[0, 0]) - 1, 36))
    assert seen == {(r, c) for r in range(5) for c in range(5)}  # offsets 0..4 on both axes, the last included


# --------------------------------------------------------------------------------------------
# Determinism


def run_pipeline(pipeline: Compose, n: int = 3) -> list[dict]:
    return [{k: as_numpy(v).copy() for k, v in pipeline({k: s[k] for k in ("image", "label", "classes")}).items()}
            for s in (blob_sample(i) for i in range(n))]


def assert_same_runs(a: list[dict], b: list[dict]) -> None:
    for x, y in zip(a, b):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_set_random_state_makes_the_pipeline_reproducible():
    first = Compose(cisca_augmentations(crop_size=48)).set_random_state(123)
    second = Compose(cisca_augmentations(crop_size=48)).set_random_state(123)
    assert_same_runs(run_pipeline(first), run_pipeline(second))
    other = run_pipeline(Compose(cisca_augmentations(crop_size=48)).set_random_state(124))
    with pytest.raises(AssertionError):
        assert_same_runs(run_pipeline(Compose(cisca_augmentations(crop_size=48)).set_random_state(123)), other)


def test_set_determinism_makes_the_pipeline_reproducible():
    try:
        set_determinism(seed=42)
        first = run_pipeline(Compose(cisca_augmentations(crop_size=48)))
        set_determinism(seed=42)
        second = run_pipeline(Compose(cisca_augmentations(crop_size=48)))
    finally:
        set_determinism(seed=None)
    assert_same_runs(first, second)


# --------------------------------------------------------------------------------------------
# Bad input


def value_error_of(function, *args) -> ValueError:
    """The ValueError raised by ``function`` (MONAI's Compose re-raises it as the cause of a RuntimeError)."""
    with pytest.raises(Exception) as info:
        function(*args)
    error = info.value
    while not isinstance(error, ValueError) and error.__cause__ is not None:
        error = error.__cause__
    assert isinstance(error, ValueError), repr(info.value)
    return error


def test_bad_input_raises_a_value_error_naming_the_key():
    pipeline = Compose(cisca_augmentations(crop_size=48))
    check = cisca_augmentations(crop_size=None)[0]
    sample = blob_sample(0)
    good = {k: sample[k] for k in ("image", "label", "classes")}
    cases = [
        ({"image": sample["image"][:2]}, r"image: expected a channel-first RGB image of shape \(3, H, W\)"),
        ({"image": sample["image"].transpose(1, 2, 0)}, r"image: expected a channel-first RGB"),
        ({"image": sample["image"] / 255.0}, "image: .*scaled to 0..1"),
        ({"label": sample["label"][:, :32]}, r"label: expected a \(1, H, W\) map matching image"),
        # wider than the image: any crop would cut it to the crop's size, so shapes are checked before cropping
        ({"label": np.pad(sample["label"], ((0, 0), (0, 0), (0, 16)))}, r"label: expected a \(1, H, W\) map matching image"),
        ({"classes": sample["classes"][0]}, r"classes: expected a \(1, H, W\) map"),
        ({"label": sample["label"] + 0.5}, "label: expected integer ids"),
        ({"label": -sample["label"]}, "label: expected non-negative ids"),
        ({"contour_levels": sample["label"][:, :32]}, r"contour_levels: expected a \(1, H, W\) map matching image"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            check({**good, **change})
        assert re.match(message, str(value_error_of(pipeline, {**good, **change})))


def test_transforms_check_their_own_inputs():
    sample = blob_sample(0)
    with pytest.raises(ValueError, match=r"^image: expected a channel-first RGB"):
        RandLABStainJitterd(prob=1.0)({"image": sample["image"][:1]})
    with pytest.raises(ValueError, match=r"^image: expected a channel-first RGB"):
        RandHSVShiftd(prob=1.0)({"image": np.zeros((4, 8, 8), np.float32)})
    with pytest.raises(ValueError, match=r"^label: expected a channel-first \(C, 64, 64\)"):
        RandCoarseElasticd(("image", "label"), mode=("bilinear", "nearest"), prob=1.0)(
            {"image": sample["image"], "label": sample["label"][:, :10]})
    with pytest.raises(ValueError, match="mode"):
        RandCoarseElasticd(("image", "label"), mode=("bilinear", "bicubic"))
    with pytest.raises(ValueError, match="prob_scale"):
        cisca_augmentations(prob_scale=-1)
    with pytest.raises(ValueError, match="crop_size"):
        cisca_augmentations(crop_size=0)
    with pytest.raises(ValueError, match="label_keys"):
        cisca_augmentations(label_keys=("image",))


def test_square_crop_of_plain_tensors_is_monais_crop():
    """Without MetaTensor tracking the crop slices the tensors itself: same windows from the same draws
    as MONAI's RandSpatialCropd, plain tensors out."""
    sample = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in coordinate_sample(40).items()}
    ours = RandSquareCropd(("image", "label"), roi_size=16, random_size=False).set_random_state(4)
    monai = RandSpatialCropd(("image", "label"), roi_size=16, random_size=False).set_random_state(4)
    previous = get_track_meta()
    set_track_meta(False)
    try:
        for _ in range(10):
            a, b = ours(dict(sample)), monai(dict(sample))
            for key in ("image", "label"):
                assert type(a[key]) is torch.Tensor and a[key].shape[1:] == (16, 16)
                assert torch.equal(a[key], b[key]), key
    finally:
        set_track_meta(previous)
