"""CytoDArk0 converter: tiers, tiles, areas, area hold-out, release folds, bad input."""

import shutil

import numpy as np
import pytest
import tifffile
from PIL import Image

from cellgap.data import cytodark0
from cellgap.data.prepared import datalist, read_dataset_info, read_manifest
from cellgap.testing.fixtures import cytodark0_name, write_cytodark0

IDS_20X = (1, 2, 3, 4, 5, 6, 54, 55, 56, 58, 60, 62, 63)


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    return write_cytodark0(tmp_path_factory.mktemp("cd") / "raw", image_ids=IDS_20X, size=256, smaller_tier=128,
                           cells=(6, 20), seed=4)


@pytest.fixture(scope="module")
def prepared(raw, tmp_path_factory):
    return cytodark0.convert(raw, tmp_path_factory.mktemp("out") / "cd20", tile_size=128, progress=False)


def test_full_images_tiles_and_facts(raw, prepared):
    rows = read_manifest(prepared)
    full = [r for r in rows if r["tier"] == "full"]
    tiles = [r for r in rows if r["tier"] == "tile"]
    assert len(full) == len(IDS_20X) and len(tiles) == 4 * len(IDS_20X)  # the 256 tier is the full size, 128 ignored
    info = read_dataset_info(prepared)
    assert (info.name, info.class_names, info.magnification, info.mpp, info.cell_size) == ("cytodark0_20x", ("Cell",), 20, 0.548, 20)
    assert info.detection_radius == 6.0 and info.empty_policy == "skip"
    name = cytodark0_name(54)
    tier = raw / "cytoDArk0" / "20x" / "256x256"
    image = np.asarray(Image.open(tier / "image" / f"{name}.png"))
    label = tifffile.imread(tier / "label" / f"{name}.tiff")
    tile3 = next(r for r in tiles if r["id"] == f"{name}_3")  # row-major: bottom-left quarter
    assert tile3["parent"] == name and tile3["tissue"] == "Cerebellum"
    assert (np.asarray(Image.open(prepared / tile3["image"])) == image[128:, :128]).all()
    tile_label = tifffile.imread(prepared / tile3["label"])
    assert (np.unique(tile_label) == np.arange(tile_label.max() + 1)).all()
    assert ((tile_label > 0) == (label[128:, :128] > 0)).all()
    assert (tifffile.imread(prepared / tile3["classes"]) == (tile_label > 0)).all()


def test_areas_and_area_holdout(prepared):
    rows = read_manifest(prepared)
    full = {r["id"]: r for r in rows if r["tier"] == "full"}
    assert full[cytodark0_name(2)]["tissue"] == "Auditory Cortex"
    assert full[cytodark0_name(58)]["tissue"] == "Hippocampus"
    assert full[cytodark0_name(63)]["tissue"] == "Visual Cortex"
    test = {n for n, r in full.items() if r["split_full"] == "test"}
    assert test == {cytodark0_name(k) for k in (5, 55, 60, 62, 63)}  # every visual-cortex image held out
    assert sum(r["split_full"] == "val" for r in full.values()) == int(np.ceil(0.1 * (len(IDS_20X) - 5)))


def test_split_usage_train_full_images_eval_tiles(prepared):
    rows = read_manifest(prepared)
    train = datalist(prepared, "train")
    assert {r["id"] for r in rows if r["tier"] == "full" and r["split_full"] == "train"} == {i["id"] for i in train}
    test_ids = {i["id"] for i in datalist(prepared, "test")}
    assert all(r["tier"] == "tile" for r in rows if r["id"] in test_ids)
    assert len(test_ids) == 5 * 4
    parent_split = {r["id"]: r["split_full"] for r in rows if r["tier"] == "full"}
    for r in rows:
        if r["tier"] == "tile" and r["split"]:
            assert r["split"] == parent_split[r["parent"]] in ("val", "test")


def test_release_folds_become_the_zenodo_protocol(raw, prepared, tmp_path):
    rows = read_manifest(prepared)
    assert {r["split_zenodo"] for r in rows if r["tier"] == "full"} == {"train", ""}  # test rows are tiles
    out = cytodark0.convert(raw, tmp_path / "z", protocol="zenodo", tile_size=None, progress=False)
    rows = read_manifest(out)
    assert {r["id"] for r in rows if r["split"] == "test"} == {cytodark0_name(k) for k in (5, 55, 60, 62)}


def test_40x_test_images(tmp_path):
    raw = write_cytodark0(tmp_path / "raw", magnification=40, image_ids=(1, 5, 10, 54, 55, 58), size=128,
                          smaller_tier=None, folds=False, cells=(3, 8))
    out = cytodark0.convert(raw, tmp_path / "out", magnification=40, tile_size=None, progress=False)
    rows = read_manifest(out)
    assert {r["id"] for r in rows if r["split"] == "test"} == {cytodark0_name(k) for k in (5, 10, 55)}
    info = read_dataset_info(out)
    assert (info.mpp, info.cell_size, info.detection_radius) == (0.274, 80, 12.0)
    assert "split_zenodo" not in rows[0]


def test_metadata_csv_names_areas(raw, tmp_path):
    bad = tmp_path / "raw"
    shutil.copytree(raw, bad)
    tier = bad / "cytoDArk0" / "20x" / "256x256"
    for sub, ext in (("image", ".png"), ("label", ".tiff")):
        (tier / sub / f"{cytodark0_name(2)}{ext}").rename(tier / sub / f"slice_b{ext}")
    (tier / "folds.csv").unlink()
    with pytest.raises(ValueError, match=r"slice_b.png: cannot read an image number from the name 'slice_b'"):
        cytodark0.convert(bad, tmp_path / "out", tile_size=None, progress=False)
    meta = tmp_path / "areas.csv"
    meta.write_text("name,area\nslice_b,Cerebellum\n")
    out = cytodark0.convert(bad, tmp_path / "out", tile_size=None, metadata=meta, progress=False)
    assert next(r for r in read_manifest(out) if r["id"] == "slice_b")["tissue"] == "Cerebellum"


def broken(raw, tmp_path):
    target = tmp_path / "raw"
    shutil.copytree(raw, target)
    return target, target / "cytoDArk0" / "20x" / "256x256"


def fails_cleanly(raw, tmp_path, error, match, **kw):
    with pytest.raises(error, match=match):
        cytodark0.convert(raw, tmp_path / "out", progress=False, **kw)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_missing_label(raw, tmp_path):
    bad, tier = broken(raw, tmp_path)
    (tier / "label" / f"{cytodark0_name(56)}.tiff").unlink()
    fails_cleanly(bad, tmp_path, FileNotFoundError, rf"{cytodark0_name(56)}.png: no instance map")


def test_grayscale_image(raw, tmp_path):
    bad, tier = broken(raw, tmp_path)
    path = tier / "image" / f"{cytodark0_name(3)}.png"
    Image.open(path).convert("L").save(path)
    fails_cleanly(bad, tmp_path, ValueError, rf"{cytodark0_name(3)}.png: not an RGB image \(shape \(256, 256\)\)")


def test_label_shape_and_tile_size(raw, tmp_path):
    bad, tier = broken(raw, tmp_path)
    fails_cleanly(bad, tmp_path, ValueError, r"is not a multiple of the tile size 100", tile_size=100)
    path = tier / "label" / f"{cytodark0_name(4)}.tiff"
    tifffile.imwrite(path, tifffile.imread(path)[:200])
    fails_cleanly(bad, tmp_path, ValueError, r"instance map shape \(200, 256\) does not match image \(256, 256\)")


def test_release_folds_naming_missing_images(raw, tmp_path):
    bad, tier = broken(raw, tmp_path)
    with open(tier / "folds.csv", "a") as f:
        f.write("ID99_section,2\n")
    fails_cleanly(bad, tmp_path, ValueError, r"folds.csv, row \d+: img_id 'ID99_section' names no image")


def test_no_tier_folder(tmp_path):
    (tmp_path / "raw").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no '40x/<S>x<S>/image' folder"):
        cytodark0.convert(tmp_path / "raw", tmp_path / "out", magnification=40, progress=False)
    with pytest.raises(ValueError, match="exists at 20 and 40"):
        cytodark0.convert(tmp_path / "raw", tmp_path / "out", magnification=10, progress=False)
