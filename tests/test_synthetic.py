"""The built-in synthetic dataset: tile generator, dataset facts and the prepared-layout writer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy import ndimage
from skimage.measure import regionprops

from cellgap.data import synthetic
from cellgap.data.prepared import INFO, datalist, read_dataset_info, read_manifest
from cellgap.data.synthetic import (
    SYNTHETIC_CLASSES,
    SYNTHETIC_TISSUES,
    generate_tile,
    prepare_synthetic,
    synthetic_info,
    tile_seed,
)
from cellgap.magnification import profile_for

TUMOUR, LYMPHOCYTE, STROMAL = 1, 2, 3
SEEDS = range(9)


@pytest.fixture(scope="module")
def tiles_40x():
    # Three tiles of each tissue kind, so that every class is well represented.
    return [generate_tile(seed, tissue=SYNTHETIC_TISSUES[seed % 3]) for seed in SEEDS]


@pytest.fixture(scope="module")
def tiles_20x():
    return [generate_tile(seed, magnification=20, tissue=SYNTHETIC_TISSUES[seed % 3]) for seed in SEEDS]


def border_ids(label: np.ndarray) -> set[int]:
    return set(np.unique(np.concatenate([label[0], label[-1], label[:, 0], label[:, -1]])).tolist()) - {0}


def touching_pairs(label: np.ndarray) -> set[tuple[int, int]]:
    """Pairs of different instances that are 4-neighbours somewhere."""
    pairs = set()
    for a, b in ((label[:, 1:], label[:, :-1]), (label[1:, :], label[:-1, :])):
        contact = (a != b) & (a > 0) & (b > 0)
        pairs |= {tuple(sorted(p)) for p in zip(a[contact].tolist(), b[contact].tolist())}
    return pairs


def interior_cells(tile):
    """regionprops of the cells not cut by the tile border."""
    cut = border_ids(tile.label)
    return [p for p in regionprops(tile.label, intensity_image=tile.image) if p.label not in cut]


# --------------------------------------------------------------------------------------------------
# One tile


def test_same_seed_gives_identical_tile():
    a, b = generate_tile(123), generate_tile(123)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    np.testing.assert_array_equal(a.classes, b.classes)
    assert a.cell_classes == b.cell_classes and a.tissue == b.tissue


def test_different_seeds_differ():
    a, b = generate_tile(1), generate_tile(2)
    assert not np.array_equal(a.image, b.image)
    assert not np.array_equal(a.label, b.label)


def test_arrays_have_the_documented_types(tiles_40x):
    for tile in tiles_40x:
        assert tile.image.shape == (256, 256, 3) and tile.image.dtype == np.uint8
        assert tile.label.shape == (256, 256) and tile.label.dtype == np.int32
        assert tile.classes.shape == (256, 256) and tile.classes.dtype == np.uint8
        assert tile.tissue in SYNTHETIC_TISSUES
        assert (tile.magnification, tile.mpp) == (40, 0.25)
    assert generate_tile(5, size=96).image.shape == (96, 96, 3)


def test_labels_are_sequential_and_match_the_class_maps(tiles_40x):
    for tile in tiles_40x:
        n = int(tile.label.max())
        assert n > 0
        np.testing.assert_array_equal(np.unique(tile.label), np.arange(n + 1))
        assert sorted(tile.cell_classes) == list(range(1, n + 1))
        assert set(tile.cell_classes.values()) <= {TUMOUR, LYMPHOCYTE, STROMAL}
        lookup = np.array([0] + [tile.cell_classes[i] for i in range(1, n + 1)], dtype=np.uint8)
        np.testing.assert_array_equal(tile.classes, lookup[tile.label])


@pytest.mark.parametrize("magnification", [40, 20])
def test_no_instance_is_split_into_fragments(magnification, tiles_40x, tiles_20x):
    tiles = tiles_40x if magnification == 40 else tiles_20x
    for seed, tile in zip(SEEDS, tiles):
        for i, box in enumerate(ndimage.find_objects(tile.label), start=1):
            pieces = ndimage.label(tile.label[box] == i)[1]  # 4-connectivity
            assert pieces == 1, f"seed {seed} at {magnification}x: instance {i} has {pieces} pieces"


@pytest.mark.parametrize("magnification", [40, 20])
def test_cells_exceed_the_minimum_cell_size_unless_cut_by_the_border(magnification, tiles_40x, tiles_20x):
    tiles = tiles_40x if magnification == 40 else tiles_20x
    min_size = profile_for(magnification=magnification).default_min_cell_size
    checked = 0
    for tile in tiles:
        areas = np.bincount(tile.label.ravel())
        for i in set(range(1, len(areas))) - border_ids(tile.label):
            assert areas[i] > min_size, f"interior instance {i} has {areas[i]} px, minimum cell size is {min_size}"
            checked += 1
    assert checked > 20


def test_touching_cells_exist(tiles_40x, tiles_20x):
    per_tile = [len(touching_pairs(t.label)) for t in tiles_40x + tiles_20x]
    assert sum(n > 0 for n in per_tile) >= len(per_tile) // 2, per_tile
    assert max(per_tile) >= 5


def test_overlap_rules_keep_occluded_nuclei_whole_and_mostly_visible():
    def lymphocyte(radius):
        return synthetic._Shape(LYMPHOCYTE, radius, radius, 0.0, np.zeros(4))

    layout = synthetic._Layout(128, min_interior=100, min_edge=40)
    spindle = synthetic._Shape(STROMAL, 50.0, 3.0, 0.0, np.zeros(4))  # horizontal, rows 61..67 at its middle
    spindle_area = layout.try_add(spindle, (64, 64), None)
    assert spindle_area > 300
    # A nucleus across the spindle's middle would cut it in two: refused.
    assert layout.try_add(lymphocyte(12), (70, 64), None) == 0
    # The same nucleus a little lower only bites its edge: accepted, drawn on top, spindle still one piece.
    assert layout.try_add(lymphocyte(12), (76, 64), None) > 0
    assert ndimage.label(layout.label == 1)[1] == 1
    assert 0.65 * spindle_area <= (layout.label == 1).sum() < spindle_area
    assert layout.label[76, 64] == 2

    layout = synthetic._Layout(128, min_interior=100, min_edge=40)
    assert layout.try_add(lymphocyte(10), (64, 64), None) > 0
    tumour = synthetic._Shape(TUMOUR, 30.0, 20.0, 0.0, np.zeros(4))
    assert layout.try_add(tumour, (64, 94), None) == 0  # would hide 40 % of the lymphocyte
    assert layout.try_add(tumour, (64, 101), None) > 0  # hides a small part of it
    assert (layout.label == 1).sum() >= 0.65 * np.pi * 10**2 * 0.95
    assert (layout.layers == 2).any()  # the overlap, painted darker in the image


def test_three_classes_differ_in_size_shape_colour_and_texture(tiles_40x):
    stats = {c: [] for c in (TUMOUR, LYMPHOCYTE, STROMAL)}
    for tile in tiles_40x:
        grey = tile.image.mean(axis=2)
        for cell in interior_cells(tile):
            inside = grey[cell.slice][cell.image]
            stats[tile.cell_classes[cell.label]].append((cell.area, cell.eccentricity, inside.mean(), inside.std()))
    assert all(len(v) >= 10 for v in stats.values()), {c: len(v) for c, v in stats.items()}
    area, eccentricity, brightness, texture = (
        {c: float(np.mean([s[k] for s in v])) for c, v in stats.items()} for k in range(4))
    # Size: tumour nuclei largest, lymphocytes smallest.
    assert area[TUMOUR] > 1.3 * area[STROMAL] and area[STROMAL] > 1.2 * area[LYMPHOCYTE], area
    # Shape: spindles elongated, lymphocytes round.
    assert eccentricity[STROMAL] > 0.9 > eccentricity[TUMOUR] > eccentricity[LYMPHOCYTE] + 0.1, eccentricity
    # Colour: lymphocytes darkest, tumour nuclei palest.
    assert brightness[LYMPHOCYTE] + 10 < brightness[STROMAL] and brightness[STROMAL] + 5 < brightness[TUMOUR], brightness
    # Texture: chromatin speckle and nucleoli make tumour nuclei the most textured.
    assert texture[TUMOUR] > 1.3 * max(texture[LYMPHOCYTE], texture[STROMAL]), texture


def test_stain_varies_between_tiles(tiles_40x):
    # Mean colour of lymphocyte pixels, tile by tile: the same kind of nucleus, differently stained.
    colours = np.array([t.image[t.classes == LYMPHOCYTE].mean(axis=0) for t in tiles_40x if (t.classes == LYMPHOCYTE).any()])
    assert len(colours) >= 5
    assert colours.std(axis=0).max() > 6, colours
    # Not only brightness: the hue (channel ratios) changes too.
    ratios = colours[:, 2] / colours[:, 0]
    assert ratios.std() > 0.03, ratios


def test_cells_at_20x_have_half_the_pixel_diameter(tiles_40x, tiles_20x):
    def mean_diameter(tiles, cls):
        return np.mean([cell.equivalent_diameter_area for t in tiles for cell in interior_cells(t) if t.cell_classes[cell.label] == cls])

    for cls in (TUMOUR, LYMPHOCYTE, STROMAL):
        ratio = mean_diameter(tiles_20x, cls) / mean_diameter(tiles_40x, cls)
        assert 0.4 < ratio < 0.6, f"class {cls}: 20x/40x diameter ratio {ratio:.2f}"


def test_density_and_tissue_arguments():
    sparse = generate_tile(3, tissue="tumour", density=0.05)
    crowded = generate_tile(3, tissue="tumour", density=0.45)
    assert sparse.tissue == crowded.tissue == "tumour"
    assert (crowded.label > 0).mean() > 3 * (sparse.label > 0).mean()
    empty = generate_tile(3, density=0.0)
    assert empty.label.max() == 0 and empty.cell_classes == {} and empty.image.std() > 0
    counts = {t: np.bincount(generate_tile(4, tissue=t).classes.ravel(), minlength=4)[1:] for t in ("stroma", "inflamed")}
    assert counts["inflamed"][LYMPHOCYTE - 1] > counts["stroma"][LYMPHOCYTE - 1]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"seed": -1}, "seed"), ({"seed": 1.5}, "seed"), ({"seed": 0, "size": 8}, "size"), ({"seed": 0, "tissue": "brain"}, "tissue"),
     ({"seed": 0, "density": 2.0}, "density"), ({"seed": 0, "magnification": 10}, "magnification"),
     ({"seed": 0, "magnification": "forty"}, "magnification")],
)
def test_bad_arguments_are_named(kwargs, field):
    with pytest.raises(ValueError, match=field):
        generate_tile(**kwargs)


# --------------------------------------------------------------------------------------------------
# Dataset facts and the prepared layout


@pytest.mark.parametrize("magnification", [40, "20x"])
def test_synthetic_info(magnification):
    info = synthetic_info(magnification)
    profile = profile_for(magnification=magnification)
    assert info.class_names == SYNTHETIC_CLASSES and len(SYNTHETIC_CLASSES) >= 3
    assert (info.magnification, info.mpp) == (profile.magnification, profile.mpp)
    assert info.min_cell_size == profile.default_min_cell_size
    assert (info.empty_policy, info.tissue_label) == ("skip", "tissue")


def test_tile_seeds_of_different_splits_never_overlap():
    for seed in (0, 1, 7):
        sets = {split: {tile_seed(seed, split, k) for k in range(2000)} for split in ("train", "val", "test")}
        assert not (sets["train"] & sets["val"] or sets["train"] & sets["test"] or sets["val"] & sets["test"])
    assert tile_seed(0, "test", 5) == tile_seed(0, "test", 5)


SMALL = {"n_train": 3, "n_val": 2, "n_test": 2, "size": 64, "progress": False}


def test_prepare_synthetic_round_trip(tmp_path):
    root = prepare_synthetic(tmp_path / "synthetic", **SMALL)
    info = read_dataset_info(root)
    assert info.class_names == SYNTHETIC_CLASSES and info.magnification == 40 and info.empty_policy == "skip"
    assert info.extra["synthetic"]["n_train"] == 3 and info.extra["synthetic"]["size"] == 64
    rows = read_manifest(root)
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    seeds = {split: {int(r["seed"]) for r in rows if r["split"] == split} for split in ("train", "val", "test")}
    assert sum(len(s) for s in seeds.values()) == len(rows) == 7  # every tile its own seed
    for split, n in (("train", 3), ("val", 2), ("test", 2)):
        items = datalist(root, split)
        assert len(items) == n
        for item, row in zip(items, [r for r in rows if r["split"] == split]):
            tile = generate_tile(int(row["seed"]), size=64)
            np.testing.assert_array_equal(np.asarray(Image.open(item["image"])), tile.image)
            np.testing.assert_array_equal(tifffile.imread(item["label"]), tile.label)
            np.testing.assert_array_equal(tifffile.imread(item["classes"]), tile.classes)
            assert item["tissue"] == tile.tissue


def test_prepare_synthetic_reuses_a_matching_dataset(tmp_path, monkeypatch):
    root = prepare_synthetic(tmp_path / "synthetic", **SMALL)
    stamp = (root / INFO).stat().st_mtime_ns

    def must_not_generate(*args, **kwargs):
        raise AssertionError("a matching dataset was regenerated")

    monkeypatch.setattr(synthetic, "generate_tile", must_not_generate)
    assert prepare_synthetic(root, **SMALL) == root
    assert (root / INFO).stat().st_mtime_ns == stamp


def test_prepare_synthetic_parameter_mismatch(tmp_path):
    root = prepare_synthetic(tmp_path / "synthetic", **SMALL)
    with pytest.raises(ValueError, match="overwrite"):
        prepare_synthetic(root, **{**SMALL, "n_train": 4})
    with pytest.raises(ValueError, match="seed"):
        prepare_synthetic(root, **SMALL, seed=1)
    assert len(datalist(root, "train")) == 3  # untouched
    prepare_synthetic(root, **{**SMALL, "n_train": 4}, overwrite=True)
    assert len(datalist(root, "train")) == 4
    assert json.loads((root / INFO).read_text())["extra"]["synthetic"]["n_train"] == 4


def test_prepare_synthetic_refuses_a_foreign_folder(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "notes.txt").write_text("not a dataset")
    with pytest.raises(ValueError, match="not a prepared synthetic dataset"):
        prepare_synthetic(root, **SMALL, overwrite=True)
    assert (root / "notes.txt").exists()


def test_prepare_synthetic_regenerates_a_damaged_dataset_only_when_asked(tmp_path):
    root = prepare_synthetic(tmp_path / "synthetic", **SMALL)
    missing = root / datalist(root, "val")[0]["image"]
    missing.unlink()
    with pytest.raises(ValueError, match="incomplete or damaged"):
        prepare_synthetic(root, **SMALL)
    prepare_synthetic(root, **SMALL, overwrite=True)
    assert missing.is_file()


def test_prepare_synthetic_replaces_an_empty_folder_but_not_a_file(tmp_path):
    (tmp_path / "empty").mkdir()
    assert len(datalist(prepare_synthetic(tmp_path / "empty", **SMALL))) == 7
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a prepared synthetic dataset"):
        prepare_synthetic(tmp_path / "file", **SMALL)


def test_prepare_synthetic_leaves_nothing_behind_on_failure(tmp_path, monkeypatch):
    calls = []
    real = synthetic.generate_tile

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "generate_tile", failing)
    root = tmp_path / "synthetic"
    with pytest.raises(RuntimeError, match="disk full"):
        prepare_synthetic(root, **SMALL)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("kwargs", "field"), [({"n_train": -1}, "n_train"), ({"n_val": 1.5}, "n_val"),
                                               ({"n_train": 0, "n_val": 0, "n_test": 0}, "at least 1"), ({"seed": -3}, "seed"),
                                               ({"magnification": 60}, "magnification")])
def test_prepare_synthetic_bad_arguments(tmp_path, kwargs, field):
    with pytest.raises(ValueError, match=field):
        prepare_synthetic(tmp_path / "x", **{**SMALL, **kwargs})
    assert not (tmp_path / "x").exists()
