"""Tests of cellgap.data.packed: the memory-mapped copy gives LoadTiled the same arrays as the files,
is ignored for changed files, checks every tile once at packing, and never travels in a pickle."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import tifffile
import torch
from monai.data import MetaTensor, get_track_meta, set_track_meta

from cellgap.data.loading import LoadTiled
from cellgap.data.packed import PACKED, pack_dataset
from cellgap.data.prepared import DatasetInfo, PreparedWriter, datalist
from cellgap.data.synthetic import generate_tile, synthetic_info
from cellgap.magnification import PROFILE_20X, PROFILE_40X
from cellgap.targets import CONTOUR_LEVELS_KEY, CONTOUR_PROFILE_KEY, ContourLevelsd, contour_levels


def write(root, n: int = 4, size: int = 48, classes: bool = True, sizes: list[int] | None = None) -> list[dict]:
    info = synthetic_info(40)
    if not classes:
        info = DatasetInfo(name="plain", class_names=("cell",), magnification=40, mpp=0.25)
    with PreparedWriter(root, info) as writer:
        for index in range(n):
            tile = generate_tile(index, size=(sizes or [size] * n)[index], magnification=40)
            writer.add(f"t{index}", tile.image, tile.label, tile.classes if classes else None, split="train")
    return datalist(root, "train")


def assert_same(a: dict, b: dict) -> None:
    for key in ("image", "label", "classes"):
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key


@pytest.fixture(autouse=True)
def track_meta():
    """MetaTensor tracking on during each test (other tests may leave it off), restored afterwards."""
    previous = get_track_meta()
    set_track_meta(True)
    yield
    set_track_meta(previous)


@pytest.mark.parametrize("classes", [True, False])
def test_packed_tiles_equal_the_files(tmp_path, classes):
    items = write(tmp_path / "d", classes=classes)
    files = LoadTiled(num_classes=3, packed=False)
    expected = [files(item) for item in items]
    stored = np.moveaxis(generate_tile(0, size=expected[0]["image"].shape[-1], magnification=40).image, -1, 0)
    assert expected[0]["image"].dtype == torch.uint8 and np.array_equal(expected[0]["image"].numpy(), stored)
    folder = pack_dataset(tmp_path / "d")
    assert folder == tmp_path / "d" / PACKED
    assert np.load(folder / "48x48" / "labels.npy", mmap_mode="r").dtype == np.int32  # LoadTiled's dtype
    loader = LoadTiled(num_classes=3)
    for item, reference in zip(items, expected):
        out = loader(item)
        assert_same(out, reference)
        assert isinstance(out["image"], MetaTensor) and out["image"].meta["filename_or_obj"] == item["image"]
        assert out["id"] == item["id"]
    assert loader._packs  # read from the pack
    image_only = LoadTiled(keys=["image"])(items[0])
    assert torch.equal(image_only["image"], expected[0]["image"]) and "label" in image_only
    assert image_only["label"] == items[0]["label"]  # not read


def test_plain_tensors_without_meta_tracking(tmp_path):
    items = write(tmp_path / "d", n=1)
    pack_dataset(tmp_path / "d")
    set_track_meta(False)
    for packed in (True, False):
        out = LoadTiled(num_classes=3, packed=packed)(items[0])
        assert all(type(out[k]) is torch.Tensor for k in ("image", "label", "classes"))


def test_changed_files_are_read_from_disk(tmp_path):
    items = write(tmp_path / "d", n=2)
    pack_dataset(tmp_path / "d")
    label = tifffile.imread(items[1]["label"])
    label[label == label.max()] = 0
    tifffile.imwrite(items[1]["label"], label.astype(np.int32), compression="zlib")
    os.utime(items[1]["label"], ns=(1, 1))  # a new mtime even on coarse-clock file systems
    out = LoadTiled(num_classes=3)(items[1])
    np.testing.assert_array_equal(out["label"][0].numpy(), label)
    assert_same(LoadTiled(num_classes=3)(items[0]), LoadTiled(num_classes=3, packed=False)(items[0]))
    other = dict(items[0], classes=items[1]["classes"])  # paths that were not packed together
    assert_same(LoadTiled(num_classes=3)(other), LoadTiled(num_classes=3, packed=False)(other))


def test_packing_checks_every_tile_and_names_the_file(tmp_path):
    items = write(tmp_path / "d", n=3)
    classes = tifffile.imread(items[2]["classes"])
    classes[0, 0] = 9
    tifffile.imwrite(items[2]["classes"], classes, compression="zlib")
    with pytest.raises(ValueError, match=r"t2\.tif: class ids 0\.\.9; expected 0\.\.3"):
        pack_dataset(tmp_path / "d")
    assert not (tmp_path / "d" / PACKED).exists() and not (tmp_path / "d" / (PACKED + ".partial")).exists()
    with open(items[1]["image"], "wb") as f:
        f.write(b"not a png")
    with pytest.raises(ValueError, match=r"t1\.png: cannot read image"):
        pack_dataset(tmp_path / "d")


def test_tiles_of_several_sizes_pack_into_one_folder_each(tmp_path):
    """As CytoDArk0's full-size images and their 256² tiles: every tile loads as from its files."""
    items = write(tmp_path / "m", n=5, sizes=[48, 32, 48, 64, 32])
    folder = pack_dataset(tmp_path / "m")
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["32x32", "48x48", "64x64"]
    assert np.load(folder / "48x48" / "images.npy", mmap_mode="r").shape == (2, 3, 48, 48)
    loader, files = LoadTiled(num_classes=3), LoadTiled(num_classes=3, packed=False)
    for item in items:
        assert_same(loader(item), files(item))
    assert loader._packs


def test_a_write_to_a_loaded_tile_stays_in_that_array(tmp_path):
    """Tiles are private copy-on-write maps of the pack: writing to one (in place, as a transform may)
    changes neither the file nor the next read of the same tile in the same process."""
    items = write(tmp_path / "d", n=2)
    folder = pack_dataset(tmp_path / "d")
    keys = ("image", "label", "classes", CONTOUR_LEVELS_KEY)
    loader = LoadTiled(keys=keys, num_classes=3)
    out = loader(items[1])
    expected = {k: out[k].clone() for k in keys}
    for key in keys:
        out[key].fill_(7)
    again = loader(items[1])
    for key in keys:
        assert torch.equal(again[key], expected[key]), key
    np.testing.assert_array_equal(np.load(folder / "48x48" / "labels.npy")[1], expected["label"][0].numpy())


def test_loaded_class_ids_are_checked_against_the_loader(tmp_path):
    items = write(tmp_path / "d", n=2)
    pack_dataset(tmp_path / "d")
    with pytest.raises(ValueError, match=r"classes/t\d\.tif: class ids 0\.\.\d; expected 0\.\.1"):
        for item in items:
            LoadTiled(num_classes=1)(item)


def test_loader_pickles_without_its_memory_maps(tmp_path):
    items = write(tmp_path / "d", n=1)
    pack_dataset(tmp_path / "d")
    loader = LoadTiled(num_classes=3)
    loader(items[0])
    copy = pickle.loads(pickle.dumps(loader))
    assert copy._packs == {} and len(pickle.dumps(loader)) < 10_000
    assert_same(copy(items[0]), loader(items[0]))
    with pytest.raises(FileExistsError):
        pack_dataset(tmp_path / "d")
    pack_dataset(tmp_path / "d", overwrite=True)


@pytest.mark.parametrize("damage", ["truncate", "delete", "index"])
def test_damaged_pack_names_the_file_and_the_fix(tmp_path, damage):
    items = write(tmp_path / "d")
    folder = pack_dataset(tmp_path / "d")
    target = folder / ("index.json" if damage == "index" else "48x48/images.npy")
    if damage == "delete":
        target.unlink()
    else:
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"{target.name}.*pack the dataset again"):
        LoadTiled(num_classes=3)(items[0])


def test_pack_stores_each_tiles_contour_levels(tmp_path):
    """The pack holds contour_levels of every whole tile for the dataset's profile; LoadTiled brings them
    (with the profile's name) only when asked, and ContourLevelsd keeps them instead of recomputing."""
    items = write(tmp_path / "d", n=3)
    pack_dataset(tmp_path / "d")
    profile = PROFILE_40X  # dataset.json says 40x
    keys = ("image", "label", "classes", CONTOUR_LEVELS_KEY)
    loader, levels_step = LoadTiled(keys=keys, num_classes=3), ContourLevelsd(magnification=40)
    for item in items:
        out = loader(item)
        expected = contour_levels(np.asarray(out["label"][0]), profile)
        assert out[CONTOUR_PROFILE_KEY] == profile.name
        assert out[CONTOUR_LEVELS_KEY].dtype == torch.uint8
        np.testing.assert_array_equal(np.asarray(out[CONTOUR_LEVELS_KEY][0]), expected)
        kept = levels_step(out)
        assert CONTOUR_PROFILE_KEY not in kept and kept[CONTOUR_LEVELS_KEY] is out[CONTOUR_LEVELS_KEY]
    assert CONTOUR_LEVELS_KEY not in LoadTiled(num_classes=3)(items[0])  # not asked for
    from_files = LoadTiled(keys=keys, num_classes=3, packed=False)(items[0])
    assert CONTOUR_LEVELS_KEY not in from_files  # ContourLevelsd computes them
    computed = levels_step(from_files)[CONTOUR_LEVELS_KEY]
    np.testing.assert_array_equal(np.asarray(computed[0]), np.asarray(loader(items[0])[CONTOUR_LEVELS_KEY][0]))


def test_levels_of_another_profile_are_recomputed(tmp_path):
    items = write(tmp_path / "d", n=1)
    pack_dataset(tmp_path / "d")
    keys = ("image", "label", "classes", CONTOUR_LEVELS_KEY)
    stored = LoadTiled(keys=keys)(items[0])
    at_20x = ContourLevelsd(magnification=20)(stored)
    label = np.asarray(stored["label"][0])
    np.testing.assert_array_equal(np.asarray(at_20x[CONTOUR_LEVELS_KEY][0]), contour_levels(label, PROFILE_20X))


def test_a_pack_of_an_older_format_names_the_fix(tmp_path):
    items = write(tmp_path / "d", n=1)
    folder = pack_dataset(tmp_path / "d")
    index = json.loads((folder / "index.json").read_text())
    index["format"] = 1  # one tile size, uint16 ids: written before 2026-12-06
    (folder / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"packed format 1; expected 2; delete .*pack the dataset again"):
        LoadTiled(num_classes=3)(items[0])
