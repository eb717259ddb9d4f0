"""Tests of the CISCA training targets (cellgap/targets/, METHOD.md §1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage as ndi

from cellgap.magnification import PROFILE_20X, PROFILE_40X, disk
from cellgap.targets import (
    BACKGROUND,
    BODY,
    BOUNDARY,
    CLEFT,
    CONTOUR_LEVELS_KEY,
    CONTOUR_PROFILE_KEY,
    CISCATargetsd,
    ContourLevelsd,
    DenseTargets,
    class_map_from_instances,
    contour_classes,
    contour_levels,
    distance_maps,
    instance_classes,
    labels,
    morphology,
    weight_mask,
)

PROFILES = [PROFILE_20X, PROFILE_40X]
SE_NAMES = ["se_cleft", "se_boundary", "se_boundary_large", "se_thin", "se_fragment_1", "se_fragment_2"]


def two_squares(height: int, width: int, side: int, top: int, left: int, spacing: int) -> np.ndarray:
    """Instance 1 at (top, left) and instance 2 ``spacing`` columns to its right, both side×side."""
    label = np.zeros((height, width), dtype=np.int32)
    label[top : top + side, left : left + side] = 1
    label[top : top + side, left + side + spacing : left + 2 * side + spacing] = 2
    return label


def random_label_maps(count: int, shape=(40, 48), seed=0):
    """Crowded random maps: overlapping rectangles (touching, nested, fragmented instances)."""
    rng = np.random.default_rng(seed)
    maps = []
    for _ in range(count):
        label = np.zeros(shape, dtype=np.int32)
        for instance in range(1, int(rng.integers(3, 25))):
            r, c = rng.integers(0, shape[0]), rng.integers(0, shape[1])
            h, w = rng.integers(1, 12, 2)
            label[r : r + h, c : c + w] = instance
        maps.append(label)
    return maps


# --------------------------------------------------------------------------------------------
# Morphology helpers (hand-written for speed; checked against scipy)


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.name)
def test_rank_filter_matches_scipy_for_every_structuring_element(profile):
    rng = np.random.default_rng(1)
    for name in SE_NAMES:
        footprint = getattr(profile, name)
        assert morphology._rectangles(footprint) is not None, name
        for shape in [(31, 37), (4, 5), (1, 9)]:
            image = rng.integers(0, 40, shape).astype(np.uint16)
            mask = rng.random(shape) > 0.6
            for maximum, scipy_filter in ((True, ndi.maximum_filter), (False, ndi.minimum_filter)):
                for mode, cval in (("constant", 7), ("reflect", 0)):
                    expected = scipy_filter(image, footprint=footprint, mode=mode, cval=cval)
                    got = morphology.rank_filter(image, footprint, maximum, mode, cval)
                    np.testing.assert_array_equal(got, expected, err_msg=f"{name} {shape} {maximum} {mode}")
            np.testing.assert_array_equal(morphology.dilate(mask, footprint), ndi.binary_dilation(mask, footprint))
            np.testing.assert_array_equal(morphology.erode(mask, footprint), ndi.binary_erosion(mask, footprint, border_value=1))


def test_rank_filter_falls_back_for_footprints_that_are_not_rectangle_unions():
    ring = np.ones((3, 3), dtype=bool)
    ring[1, 1] = False
    image = np.random.default_rng(2).integers(0, 9, (12, 13))
    assert morphology._rectangles(ring) is None
    np.testing.assert_array_equal(
        morphology.rank_filter(image, ring, True, "constant"), ndi.maximum_filter(image, footprint=ring, mode="constant")
    )


@pytest.mark.parametrize("connectivity", ["four", "eight"])
def test_small_components_match_a_full_labelling(connectivity):
    offsets, structure = {
        "four": (morphology.FOUR_CONNECTED, ndi.generate_binary_structure(2, 1)),
        "eight": (morphology.EIGHT_CONNECTED, ndi.generate_binary_structure(2, 2)),
    }[connectivity]
    rng = np.random.default_rng(3)
    for size in (1, 2, 3, 4, 6, 8, 11, 40):
        for _ in range(15):
            mask = rng.random(tuple(rng.integers(1, 35, 2))) > rng.uniform(0.3, 0.95)
            components, _ = ndi.label(mask, structure)
            small = np.bincount(components.ravel()) < size
            small[0] = False
            np.testing.assert_array_equal(
                morphology.components_below(mask, size, offsets), small[components], err_msg=f"size {size}"
            )


def test_fill_holes_fills_complement_components_below_the_area():
    mask = np.zeros((9, 12), dtype=bool)
    mask[1:6, 1:6] = True
    mask[2:4, 2:4] = False  # hole of 4 px
    mask[1:8, 7:11] = True
    mask[3, 8] = False  # hole of 1 px
    filled = morphology.fill_holes(mask, 3)
    assert filled[3, 8] and not filled[2:4, 2:4].any()
    assert morphology.fill_holes(mask, 5)[2:4, 2:4].all()


# --------------------------------------------------------------------------------------------
# Contour levels (§1.2)


def per_instance_touching(label: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """§1.2 step 3 as written: sum of per-instance dilations > 1, on the foreground."""
    total = np.zeros(label.shape, dtype=int)
    for instance in np.unique(label[label > 0]):
        total += ndi.binary_dilation(label == instance, footprint)
    return (total > 1) & (label > 0)


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.name)
def test_max_min_filter_touching_equals_per_instance_dilation(profile):
    for label in random_label_maps(12, seed=profile.magnification):
        for footprint in (profile.se_boundary, profile.se_boundary_large):
            small_ids = labels.small_id_dtype(label)
            got = morphology.touching(small_ids, label > 0, footprint)
            np.testing.assert_array_equal(got, per_instance_touching(label, footprint))


def test_touching_squares_20x_boundary_one_pixel_each_side():
    label = two_squares(24, 30, side=10, top=7, left=5, spacing=0)  # interface between columns 14 | 15
    levels = contour_levels(label, PROFILE_20X)
    assert levels.dtype == np.uint8 and levels.shape == label.shape
    expected = np.where(label > 0, BODY, -1)
    expected[7:17, 14:16] = BOUNDARY
    foreground = label > 0
    np.testing.assert_array_equal(levels[foreground], expected[foreground])
    # The outer cell-background outline is body, not boundary.
    assert (levels[7, 5:14] == BODY).all() and (levels[7:17, 5] == BODY).all()
    assert set(np.unique(levels[~foreground])) <= {BACKGROUND, CLEFT}
    assert levels[0, 0] == BACKGROUND and levels[-1, -1] == BACKGROUND


def test_touching_squares_40x_boundary_two_pixels_each_side():
    label = two_squares(36, 44, side=14, top=11, left=8, spacing=0)  # interface between columns 21 | 22
    levels = contour_levels(label, PROFILE_40X)
    foreground = label > 0
    expected = np.where(foreground, BODY, -1)
    expected[11:25, 20:24] = BOUNDARY
    np.testing.assert_array_equal(levels[foreground], expected[foreground])
    assert levels[0, 0] == BACKGROUND


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.name)
@pytest.mark.parametrize("spacing", [1, 2, 3])
def test_narrow_background_between_cells_is_cleft_level(profile, spacing):
    label = two_squares(40, 48, side=12, top=14, left=10, spacing=spacing)
    levels = contour_levels(label, profile)
    between = levels[14:26, 22 : 22 + spacing]
    assert (between == CLEFT).all(), between
    assert levels[0, 0] == BACKGROUND


def test_near_contact_40x_thin_band_becomes_boundary():
    # 2 px apart: no pixel has the other cell within SE_b (city-block 2), but the SE_bL band is
    # 3 px wide on each side, vanishes under the 5×5 erosion and so becomes boundary (step 7).
    label = two_squares(36, 44, side=12, top=12, left=8, spacing=2)  # cell 1 columns 8..19, cell 2 22..33
    levels = contour_levels(label, PROFILE_40X)
    assert (levels[12:24, 17:20] == BOUNDARY).all() and (levels[12:24, 22:25] == BOUNDARY).all()
    assert (levels[12:24, 8:17] == BODY).all() and (levels[12:24, 25:34] == BODY).all()
    assert (levels[12:24, 20:22] == CLEFT).all()


def test_diagonal_contact_20x_fragments_are_thickened():
    # Two squares meeting only at one corner: B is two single pixels; the first thickening pass
    # (m1=2, 3×3) grows each into a 2×2 block, which the second pass (m2=4) keeps.
    label = np.zeros((14, 14), dtype=np.int32)
    label[2:7, 2:7] = 1
    label[7:12, 7:12] = 2
    levels = contour_levels(label, PROFILE_20X)
    expected_boundary = np.zeros_like(label, dtype=bool)
    expected_boundary[5:7, 5:7] = True
    expected_boundary[7:9, 7:9] = True
    np.testing.assert_array_equal(levels == BOUNDARY, expected_boundary)


def test_single_cell_has_no_boundary_and_empty_map_is_background():
    label = np.zeros((20, 20), dtype=np.int64)
    assert (contour_levels(label, PROFILE_40X) == BACKGROUND).all()
    label[5:15, 4:12] = 7
    levels = contour_levels(label, PROFILE_20X)
    assert not (levels == BOUNDARY).any()
    assert (levels[label > 0] == BODY).all()


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.name)
def test_contour_levels_invariants_on_random_maps(profile):
    for label in random_label_maps(6, shape=(48, 48), seed=10 + profile.magnification):
        levels = contour_levels(label, profile)
        foreground = label > 0
        assert set(np.unique(levels)) <= {BOUNDARY, BODY, BACKGROUND, CLEFT}
        assert not np.isin(levels[foreground], [BACKGROUND, CLEFT]).any()  # cells are boundary or body
        assert not (levels[~foreground] == BODY).any()
        # Every cell pixel touching another instance (SE_b) is boundary.
        assert (levels[per_instance_touching(label, profile.se_boundary)] == BOUNDARY).all()
        # Relabelling ids (e.g. sparse ids) changes nothing.
        np.testing.assert_array_equal(contour_levels(np.where(foreground, label * 1000 + 3, 0), profile), levels)


# --------------------------------------------------------------------------------------------
# K-class merge (§1.3)


def test_contour_classes_merges():
    levels = np.array([[BOUNDARY, BODY, BACKGROUND, CLEFT]], dtype=np.uint8)
    np.testing.assert_array_equal(contour_classes(levels, 3), [[0, 1, 2, 2]])
    np.testing.assert_array_equal(contour_classes(levels), [[0, 1, 2, 2]])
    np.testing.assert_array_equal(contour_classes(levels, 2), [[0, 0, 1, 1]])
    np.testing.assert_array_equal(contour_classes(levels, 4), [[0, 1, 2, 3]])
    for bad in (1, 5, "3"):
        with pytest.raises(ValueError, match="num_contour_classes"):
            contour_classes(levels, bad)
    with pytest.raises(ValueError, match="levels"):
        contour_classes(np.array([[4]]), 3)


# --------------------------------------------------------------------------------------------
# Distance maps (§1.4)


def test_distance_maps_rectangle_exact_ramps():
    label = np.zeros((6, 7), dtype=np.int32)
    label[1:4, 2:6] = 5  # 3 rows × 4 columns
    maps = distance_maps(label)
    assert maps.dtype == np.float32 and maps.shape == (4, 6, 7)
    h, v, tl, bl = (m[1:4, 2:6] for m in maps)
    third = 1 / 3
    np.testing.assert_allclose(h, [[-1, -third, third, 1]] * 3, atol=1e-6)
    np.testing.assert_allclose(v, [[-1] * 4, [0] * 4, [1] * 4], atol=1e-6)
    # tl: row+col spans 5 steps; bl: col-row spans 5 steps, -1 at the bottom-left corner.
    np.testing.assert_allclose(tl, [[-1, -0.6, -0.2, 0.2], [-0.6, -0.2, 0.2, 0.6], [-0.2, 0.2, 0.6, 1]], atol=1e-6)
    np.testing.assert_allclose(bl, [[-0.2, 0.2, 0.6, 1], [-0.6, -0.2, 0.2, 0.6], [-1, -0.6, -0.2, 0.2]], atol=1e-6)
    outside = label == 0
    assert (maps[:, outside] == 0).all()
    assert maps.min() == -1 and maps.max() == 1


def test_distance_maps_l_shape_exact_ramps():
    label = np.zeros((5, 5), dtype=np.int32)
    cells = [(1, 1), (2, 1), (3, 1), (3, 2), (3, 3)]  # an L: down the left, then along the bottom
    for r, c in cells:
        label[r, c] = 1
    maps = distance_maps(label)
    values = {p: tuple(float(x) for x in maps[:, p[0], p[1]]) for p in cells}
    expected = {  # (h, v, tl, bl)
        (1, 1): (-1, -1, -1, 1),
        (2, 1): (-1, 0, -0.5, 0),
        (3, 1): (-1, 1, 0, -1),
        (3, 2): (0, 1, 0.5, 0),
        (3, 3): (1, 1, 1, 1),
    }
    for p in cells:
        np.testing.assert_allclose(values[p], expected[p], atol=1e-6, err_msg=str(p))


def test_distance_maps_degenerate_instances():
    label = np.zeros((8, 8), dtype=np.int32)
    label[1:6, 1] = 1  # 1 px wide → skipped
    label[7, 2:7] = 2  # 1 px high → skipped
    label[1, 5] = label[2, 4] = 3  # anti-diagonal pair: row+col constant → tl = -1
    maps = distance_maps(label)
    assert (maps[:, label == 1] == 0).all() and (maps[:, label == 2] == 0).all()
    np.testing.assert_allclose(maps[:, 1, 5], [1, -1, -1, 1])
    np.testing.assert_allclose(maps[:, 2, 4], [-1, 1, -1, -1])


def test_distance_maps_each_instance_spans_full_range():
    for label in random_label_maps(5, seed=4):
        maps = distance_maps(label)
        for instance in np.unique(label[label > 0]):
            rows, cols = np.nonzero(label == instance)
            values = maps[:, rows, cols]
            if np.ptp(rows) == 0 or np.ptp(cols) == 0:
                assert (values == 0).all()
                continue
            assert values[:2].min(axis=1).tolist() == [-1, -1] and values[:2].max(axis=1).tolist() == [1, 1]
            assert (values[2:].min(axis=1) == -1).all() and (values[2:].max(axis=1) <= 1).all()


def test_distance_maps_tips_variant():
    border = PROFILE_20X.tips_border  # 13 at 20x
    label = np.zeros((40, 80), dtype=np.int32)
    label[5:35, 5:65] = 1  # 30 × 60: wider than 2·13, higher than 2·13
    label[36:39, 70:76] = 2  # a nucleus-sized cell: tips = full range
    tips = distance_maps(label, "tips", PROFILE_20X)
    full = distance_maps(label)
    h = tips[0, 10, 5:65]
    columns = np.arange(60)
    expected = np.where(columns < border, columns / (2 * border), 0.5)
    last = columns >= 60 - border
    expected[last] = (border + 1 + columns[last] - (60 - border)) / (2 * border)
    np.testing.assert_allclose(h, 2 * expected - 1, atol=1e-6)
    assert h[0] == -1 and h[-1] == 1 and h[30] == 0
    # Diagonal: s = row+col spans 88 > 2·18.2: ramps of 18.2 at both ends, flat (0) between.
    tl = tips[2, 5:35, 5:65]
    s = np.add.outer(np.arange(30), np.arange(60))
    d = np.where(s <= 18.2, s, np.where(s >= 88 - 18.2, s - 88 + 36.4, 18.2))
    np.testing.assert_allclose(tl, d / 18.2 - 1, atol=1e-6)
    np.testing.assert_allclose(tips[:, label == 2], full[:, label == 2], atol=1e-6)
    with pytest.raises(ValueError, match="profile"):
        distance_maps(label, "tips")
    with pytest.raises(ValueError, match="mode"):
        distance_maps(label, "centroid")


# --------------------------------------------------------------------------------------------
# Weight mask (§1.6)


def test_weight_mask_disk_around_cells():
    label = np.zeros((21, 21), dtype=np.int32)
    label[10, 10] = 1
    weights = weight_mask(label)
    assert weights.dtype == np.float32
    expected = np.zeros((21, 21), dtype=bool)
    expected[4:17, 4:17] = disk(6)
    np.testing.assert_array_equal(weights == 1.0, expected)
    assert weights[10, 16] == 1.0 and weights[15, 13] == 1.0  # 6² ≤ 36, 5²+3² = 34 ≤ 36
    assert weights[14, 15] == np.float32(0.05) and weights[10, 17] == np.float32(0.05)  # 4²+5² = 41, 7² = 49
    assert set(np.unique(weights).tolist()) == {np.float32(0.05), 1.0}
    np.testing.assert_array_equal(weight_mask(label, radius=0) == 1.0, label > 0)
    assert (weight_mask(np.zeros((4, 4), dtype=int)) == np.float32(0.05)).all()
    with pytest.raises(ValueError, match="radius"):
        weight_mask(label, radius=-1)


# --------------------------------------------------------------------------------------------
# Classes


def test_class_map_and_instance_classes_round_trip():
    label = np.array([[1, 1, 0, 2], [1, 3, 3, 2], [0, 3, 3, 0]])
    class_map = class_map_from_instances(label, {1: 4, 2: 1, 3: 2, 9: 5})
    assert class_map.dtype == np.uint8
    np.testing.assert_array_equal(class_map, [[4, 4, 0, 1], [4, 2, 2, 1], [0, 2, 2, 0]])
    assert instance_classes(label, class_map) == {1: 4, 2: 1, 3: 2}
    with pytest.raises(ValueError, match=r"no class for instance ids \[3\]"):
        class_map_from_instances(label, {1: 1, 2: 1})
    with pytest.raises(ValueError, match="0..255"):
        class_map_from_instances(label, {1: 1, 2: 1, 3: 300})


def test_instance_classes_majority_ties_and_max_rule():
    label = np.array([[1, 1, 1, 1, 2, 2, 2], [1, 1, 0, 0, 2, 2, 0]])
    classes = np.array([[3, 3, 2, 2, 0, 0, 5], [0, 0, 1, 1, 0, 4, 0]])
    # Instance 1: class 3 ×2, class 2 ×2, background ×2 → tie → lower id 2. Instance 2: 5 vs 4 → tie → 4.
    assert instance_classes(label, classes) == {1: 2, 2: 4}
    assert instance_classes(label, classes, rule="max") == {1: 3, 2: 5}
    assert instance_classes(label, np.zeros_like(classes)) == {1: 0, 2: 0}
    assert instance_classes(np.zeros((3, 3), dtype=int), np.zeros((3, 3), dtype=int)) == {}
    with pytest.raises(ValueError, match="rule"):
        instance_classes(label, classes, rule="mean")
    with pytest.raises(ValueError, match="class_map"):
        instance_classes(label, classes[:, :3])


# --------------------------------------------------------------------------------------------
# CISCATargetsd


def test_transform_end_to_end_with_relabel_of_a_split_instance():
    label = np.zeros((1, 32, 32), dtype=np.float32)  # LoadImaged gives float maps
    label[0, 4:12, 4:12] = 3
    label[0, 20:28, 4:12] = 3  # same id, two pieces (e.g. after a crop)
    label[0, 4:12, 12:20] = 8  # touches the first piece
    classes = np.zeros((1, 32, 32), dtype=np.int64)
    classes[label > 0] = 2
    classes[label == 8] = 1
    meta = MetaTensor(torch.from_numpy(label), meta={"filename_or_obj": "tile_7.tif"})
    out = CISCATargetsd(magnification=20, num_classes=2)({"label": meta, "classes": torch.from_numpy(classes), "id": "tile_7"})

    relabelled = out["label"]
    assert isinstance(relabelled, MetaTensor) and relabelled.meta["filename_or_obj"] == "tile_7.tif"
    relabelled = relabelled.numpy()[0]
    assert len(np.unique(relabelled)) == 4  # background + 3 instances
    assert relabelled[4, 4] != relabelled[20, 4]
    assert out["id"] == "tile_7"

    expected_shapes = {
        "contour_target": (1, 32, 32),
        "distance_target": (4, 32, 32),
        "weight_mask": (1, 32, 32),
        "type_target": (1, 32, 32),
    }
    expected_dtypes = {
        "contour_target": torch.uint8,
        "distance_target": torch.float32,
        "weight_mask": torch.float32,
        "type_target": torch.uint8,
    }
    for key, shape in expected_shapes.items():
        assert isinstance(out[key], torch.Tensor) and tuple(out[key].shape) == shape and out[key].dtype == expected_dtypes[key], (
            key
        )
        assert out[key].meta["filename_or_obj"] == "tile_7.tif"
    np.testing.assert_array_equal(out["contour_target"].numpy()[0], contour_classes(contour_levels(relabelled, PROFILE_20X), 3))
    np.testing.assert_array_equal(out["distance_target"].numpy(), distance_maps(relabelled))
    np.testing.assert_array_equal(out["weight_mask"].numpy()[0], weight_mask(relabelled))
    np.testing.assert_array_equal(out["type_target"].numpy(), classes)
    # Each piece of the split instance gets its own full [-1, 1] ramps.
    h = out["distance_target"].numpy()[0]
    assert h[20, 4] == -1 and h[20, 11] == 1 and h[4, 4] == -1 and h[4, 11] == 1
    # The touching pieces share a boundary; the far piece has none.
    contour = out["contour_target"].numpy()[0]
    assert (contour[4:12, 11:13] == BOUNDARY).all() and not (contour[20:28, 4:12] == BOUNDARY).any()


def test_transform_single_class_options_and_plain_arrays():
    label = np.zeros((1, 24, 24), dtype=np.int32)
    label[0, 3:10, 3:10] = 1
    label[0, 3:10, 10:18] = 2
    transform = CISCATargetsd(mpp=0.25, num_contour_classes=2, distance_mode="tips", weight_radius=2, relabel=False)
    out = transform({"label": label})
    assert isinstance(out["label"], np.ndarray)  # not relabelled, left as given
    assert type(out["contour_target"]) is torch.Tensor
    np.testing.assert_array_equal(out["type_target"].numpy(), (label > 0).astype(np.uint8))
    assert out["type_target"].dtype == out["contour_target"].dtype == torch.uint8
    np.testing.assert_array_equal(out["contour_target"].numpy()[0], contour_classes(contour_levels(label[0], PROFILE_40X), 2))
    np.testing.assert_array_equal(out["weight_mask"].numpy()[0], weight_mask(label[0], 2))
    # An empty class map also means single-class.
    out = transform({"label": label, "classes": torch.zeros(0)})
    np.testing.assert_array_equal(out["type_target"].numpy(), (label > 0).astype(np.uint8))
    with pytest.raises(ValueError, match=r"classes: expected class ids in 0\.\.255 \(the type target is uint8\), found 300"):
        transform({"label": label, "classes": np.full((1, 24, 24), 300, dtype=np.int32)})


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.name)
def test_contour_levels_turn_and_flip_with_the_label_map(profile):
    """Moving a stored tile's levels with a quarter turn or flip (what the augmentation does since
    ContourLevelsd) gives exactly the levels of the moved label map: the method is D4-symmetric."""
    from cellgap.data.synthetic import generate_tile

    for seed in range(2):
        label = generate_tile(seed, size=96, magnification=40 if profile is PROFILE_40X else 20).label
        levels = contour_levels(label, profile)
        for turns in range(4):
            for flip in (False, True):
                moved_label, moved_levels = (np.ascontiguousarray(np.rot90(a[:, ::-1] if flip else a, turns)) for a in (label, levels))
                np.testing.assert_array_equal(contour_levels(moved_label, profile), moved_levels)


def test_targets_use_the_moved_contour_levels_when_present():
    label = np.zeros((1, 24, 24), dtype=np.int32)
    label[0, 3:10, 3:10] = 1
    label[0, 3:10, 10:18] = 2
    sample = ContourLevelsd(magnification=40)({"label": torch.from_numpy(label)})
    levels = sample[CONTOUR_LEVELS_KEY]
    assert levels.dtype == torch.uint8 and tuple(levels.shape) == (1, 24, 24)
    np.testing.assert_array_equal(levels.numpy()[0], contour_levels(label[0], PROFILE_40X))
    transform = CISCATargetsd(magnification=40)
    np.testing.assert_array_equal(transform(sample)["contour_target"], transform({"label": label})["contour_target"])
    # The stored map wins over the label map (the reference moves it instead of recomputing it) …
    moved = dict(sample, **{CONTOUR_LEVELS_KEY: torch.full((1, 24, 24), CLEFT, dtype=torch.uint8)})
    assert (transform(moved)["contour_target"] == 2).all()  # the cleft merges into background for K = 3
    assert torch.equal(moved[CONTOUR_LEVELS_KEY], torch.full((1, 24, 24), CLEFT, dtype=torch.uint8))  # not modified
    # … and a map stored for another profile is recomputed.
    stale = {"label": torch.from_numpy(label), CONTOUR_LEVELS_KEY: moved[CONTOUR_LEVELS_KEY], CONTOUR_PROFILE_KEY: "20x"}
    np.testing.assert_array_equal(ContourLevelsd(magnification=40)(stale)[CONTOUR_LEVELS_KEY], levels)
    with pytest.raises(ValueError, match="contour_levels: expected the shape of label"):
        transform({"label": label, CONTOUR_LEVELS_KEY: np.zeros((1, 24, 23), dtype=np.uint8)})
    with pytest.raises(ValueError, match="contour_levels: expected contour levels 0..3, found 7"):
        transform({"label": label, CONTOUR_LEVELS_KEY: np.full((1, 24, 24), 7, dtype=np.uint8)})
    with pytest.raises(ValueError, match="magnification"):
        ContourLevelsd()


@pytest.mark.parametrize(
    "label, match",
    [
        (np.full((1, 8, 8), 1.5, dtype=np.float32), "label: expected an integer-valued"),
        (np.full((1, 8, 8), np.nan, dtype=np.float32), "label: expected an integer-valued"),
        (-np.ones((1, 8, 8), dtype=np.int32), "label: expected an instance map with ids ≥ 0"),
        (-np.ones((1, 8, 8), dtype=np.float32), "label: expected an instance map with ids ≥ 0"),
        (np.ones((8, 8), dtype=np.int32), r"label: expected a \(1, H, W\)"),
        (np.ones((2, 8, 8), dtype=np.int32), r"label: expected a \(1, H, W\)"),
    ],
)
def test_transform_rejects_bad_labels(label, match):
    with pytest.raises(ValueError, match=match):
        CISCATargetsd(magnification=40)({"label": label})


def test_transform_rejects_bad_classes_and_settings():
    label = np.ones((1, 8, 8), dtype=np.int32)
    with pytest.raises(ValueError, match=r"classes: expected class ids in 0..3"):
        CISCATargetsd(magnification=40, num_classes=3)({"label": label, "classes": np.full((1, 8, 8), 4)})
    with pytest.raises(ValueError, match="classes: expected the shape of label"):
        CISCATargetsd(magnification=40)({"label": label, "classes": np.ones((1, 8, 9), dtype=np.int32)})
    with pytest.raises(ValueError, match="classes: expected an integer-valued"):
        CISCATargetsd(magnification=40)({"label": label, "classes": np.full((1, 8, 8), 0.5)})
    with pytest.raises(TypeError, match="label: expected an integer instance map"):
        CISCATargetsd(magnification=40)({"label": np.full((1, 2, 2), "a")})
    with pytest.raises(KeyError):
        CISCATargetsd(magnification=40)({"image": label})
    assert "contour_target" not in CISCATargetsd(magnification=40, allow_missing_keys=True)({"image": label})
    for kwargs, match in [
        ({}, "magnification"),
        ({"magnification": 40, "num_contour_classes": 5}, "num_contour_classes"),
        ({"magnification": 40, "distance_mode": "tip"}, "distance_mode"),
        ({"magnification": 40, "weight_radius": -2}, "weight_radius"),
        ({"magnification": 40, "num_classes": 0}, "num_classes"),
    ]:
        with pytest.raises(ValueError, match=match):
            CISCATargetsd(**kwargs)


@pytest.mark.parametrize("max_rounds", [0, 2, 24])
def test_reconstruction_keeps_the_components_holding_a_seed(max_rounds):
    rng = np.random.default_rng(5)
    for _ in range(20):
        mask = rng.random(tuple(rng.integers(1, 40, 2))) > rng.uniform(0.2, 0.7)
        seed = rng.random(mask.shape) > 0.97
        components, _ = ndi.label(mask, np.ones((3, 3), dtype=bool))
        kept = np.isin(components, components[seed & mask]) & mask
        np.testing.assert_array_equal(morphology.reconstruct(seed, mask, max_rounds), kept)


def test_near_reads_the_dilation_at_given_pixels():
    rng = np.random.default_rng(6)
    for footprint in (PROFILE_20X.se_boundary, PROFILE_40X.se_boundary, disk(3)):
        mask = rng.random((23, 31)) > 0.93
        pixels = rng.choice(mask.size, 50, replace=False)
        np.testing.assert_array_equal(morphology.near(mask, pixels, footprint), morphology.dilate(mask, footprint).ravel()[pixels])


# --------------------------------------------------------------------------------------------
# Dense targets on the batch's device


def _relabelled_tiles() -> list[np.ndarray]:
    from cellgap.data.synthetic import generate_tile

    tiles = []
    for seed in range(6):
        tile = generate_tile(seed, size=96, magnification=40 if seed % 2 else 20)
        label = torch.from_numpy(np.asarray(tile.label).reshape(1, 96, 96).astype(np.int32))
        tiles.append(CISCATargetsd(magnification=40)({"label": label})["label"].numpy()[0])
    odd = np.zeros((96, 96), np.int32)
    odd[5, 5:20] = 3  # 1 px high: all maps 0
    odd[30:40, 50] = 9  # 1 px wide
    odd[60, 60] = 7  # a single pixel
    odd[70, 70], odd[71, 71] = 11, 11  # two pixels on one diagonal: that diagonal is -1
    odd[80:83, 80:85] = 1000  # a large id
    tiles.append(odd)
    return tiles


def test_dense_targets_are_the_per_sample_targets_to_the_bit():
    tiles = _relabelled_tiles()
    out = DenseTargets(weight_radius=6)(torch.from_numpy(np.stack(tiles)[:, None]))
    assert out["distance_target"].dtype == out["weight_mask"].dtype == torch.float32
    np.testing.assert_array_equal(out["distance_target"].numpy(), np.stack([distance_maps(t) for t in tiles]))
    np.testing.assert_array_equal(out["weight_mask"].numpy(), np.stack([weight_mask(t, 6)[None] for t in tiles]))


@pytest.mark.parametrize("label, match", [(torch.zeros(2, 96, 96, dtype=torch.int32), r"\(B, 1, H, W\) integer"),
                                          (torch.zeros(2, 1, 8, 8), r"\(B, 1, H, W\) integer"),
                                          (torch.full((1, 1, 8, 8), -2, dtype=torch.int32), "non-negative")])
def test_dense_targets_refuse_what_is_not_a_batch_of_instance_maps(label, match):
    with pytest.raises(ValueError, match=match):
        DenseTargets()(label)


def test_targets_can_leave_the_dense_maps_to_the_device():
    label = torch.from_numpy(_relabelled_tiles()[0][None])
    out = CISCATargetsd(magnification=40, dense_targets=False)({"label": label})
    assert "distance_target" not in out and "weight_mask" not in out
    assert {"contour_target", "type_target"} <= set(out) and out["label"].dtype == torch.int32
    with pytest.raises(ValueError, match="fullrange"):
        CISCATargetsd(magnification=40, dense_targets=False, distance_mode="tips")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dense_targets_on_cuda_are_those_on_the_cpu():
    label = torch.from_numpy(np.stack(_relabelled_tiles())[:, None])
    on_cpu, on_cuda = DenseTargets()(label), DenseTargets()(label.cuda())
    for key, value in on_cpu.items():
        assert on_cuda[key].is_cuda and torch.equal(on_cuda[key].cpu(), value), key
