"""User folders: label formats, class sources, splits, config, bad input."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from cellgap.data import folder
from cellgap.data.prepared import read_dataset_info, read_manifest
from cellgap.failures import BatchFailures
from cellgap.testing.fixtures import write_folder


def native_label(raw, name):
    for ext in (".tif", ".png", ".nii.gz"):
        path = raw / "labels" / f"{name}{ext}"
        if path.exists():
            if ext == ".nii.gz":
                import nibabel as nib

                return np.asarray(nib.load(str(path)).dataobj)
            return tifffile.imread(path) if ext == ".tif" else np.asarray(Image.open(path))
    raise AssertionError(name)


@pytest.mark.parametrize(("label_format", "classes"), [("tif", "map"), ("png", "csv"), ("nii", "csv_names"), ("tif", None)])
def test_formats_and_class_sources(tmp_path, label_format, classes):
    raw = write_folder(tmp_path / "raw", label_format=label_format, classes=classes, split=True, size=40, seed=1)
    out = folder.convert(raw, tmp_path / "out", progress=False)
    rows = read_manifest(out)
    info = read_dataset_info(out)
    assert info.class_names == (("tumour", "immune") if classes else ("cell",))
    assert (info.name, info.magnification, info.mpp, info.cell_size, info.detection_radius) == ("my_tiles", 40, 0.25, 80, 12.0)
    assert [r["split"] for r in rows] == ["train", "train", "val", "test", "train", "train"]
    assert [r["tissue"] for r in rows] == ["a", "b"] * 3
    for row in rows:
        label = tifffile.imread(out / row["label"])
        native = native_label(raw, row["id"])
        assert ((label > 0) == (native > 0)).all()
        assert label.max() == len(np.unique(native)) - 1 == int(row["n_cells"])
        image = np.asarray(Image.open(out / row["image"]))
        assert (image == np.asarray(Image.open(raw / "images" / f"{row['id']}.png"))).all()
        cls = tifffile.imread(out / row["classes"])
        if classes == "map":
            assert (cls == tifffile.imread(raw / "classes" / f"{row['id']}.tif")).all()
        elif classes is None:
            assert (cls == (label > 0)).all()
        else:
            assert set(np.unique(cls[label > 0])) <= {1, 2} and (cls[label == 0] == 0).all()


def test_classes_from_csv_follow_the_instance_ids(tmp_path):
    raw = write_folder(tmp_path / "raw", classes="csv_names", n_images=1, size=40, seed=5)
    label = tifffile.imread(raw / "labels" / "tile_000.tif")
    rows = (raw / "classes" / "tile_000.csv").read_text().splitlines()[1:]
    expected = {int(r.split(",")[0]): r.split(",")[1] for r in rows}
    out = folder.convert(raw, tmp_path / "out", progress=False)
    cls = tifffile.imread(out / "classes" / "tile_000.tif")
    for instance, name in expected.items():
        assert (cls[label == instance] == ("tumour", "immune").index(name) + 1).all()


def test_seeded_split_and_arguments_override_config(tmp_path):
    raw = write_folder(tmp_path / "raw", n_images=20, size=32, classes=None)
    out = folder.convert(raw, tmp_path / "out", magnification=20, name="mine", progress=False)
    info = read_dataset_info(out)
    assert (info.name, info.magnification, info.mpp, info.cell_size) == ("mine", 20, 0.5, 24)
    split = [r["split"] for r in read_manifest(out)]
    assert split.count("test") == 4 and split.count("val") == 2 and split.count("train") == 14
    again = folder.convert(raw, tmp_path / "again", magnification=20, name="mine", progress=False)
    assert [r["split"] for r in read_manifest(again)] == split
    assert info.extra["protocol"] == "seeded"


def test_tiling_option(tmp_path):
    raw = write_folder(tmp_path / "raw", n_images=4, size=64, split=True, classes="map")
    out = folder.convert(raw, tmp_path / "out", tile_size=32, progress=False)
    rows = read_manifest(out)
    assert sum(r["tier"] == "tile" for r in rows) == 16
    assert {r["tier"] for r in rows if r["split"] == "train"} == {"full"}
    assert {r["tier"] for r in rows if r["split"] in ("val", "test")} == {"tile"}


def fails_cleanly(raw, tmp_path, error, match, **kw):
    with pytest.raises(error, match=match):
        folder.convert(raw, tmp_path / "out", progress=False, **kw)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def fails_alone(raw, tmp_path, failed, match):
    """A file the converter cannot read is named (with ``match`` in its reason); the others are converted."""
    out = tmp_path / "out"
    with pytest.raises(BatchFailures, match=match) as caught:
        folder.convert(raw, out, progress=False)
    assert [Path(f["file"]).stem.split(".")[0] for f in caught.value.failures] == [failed]
    ids = [r["id"] for r in read_manifest(out)]
    assert failed not in ids and len(ids) == len(list((raw / "images").iterdir())) - 1
    shutil.rmtree(out)


def test_missing_and_orphan_files(tmp_path):
    raw = write_folder(tmp_path / "raw", size=32)
    (raw / "labels" / "tile_002.tif").unlink()
    fails_cleanly(raw, tmp_path, FileNotFoundError, r"tile_002.png: no label map")
    (raw / "images" / "tile_002.png").unlink()
    (raw / "classes" / "tile_002.tif").rename(raw / "classes" / "tile_099.tif")
    fails_cleanly(raw, tmp_path, ValueError, r"class file\(s\) without an image: \['tile_099'\]")


def test_magnification_required_and_config_checked(tmp_path):
    raw = write_folder(tmp_path / "raw", size=32, config=False, classes=None)
    fails_cleanly(raw, tmp_path, ValueError, r"magnification or mpp: give at least one")
    (raw / "cellgap.json").write_text(json.dumps({"mpp": 0.5, "colour": "blue"}))
    fails_cleanly(raw, tmp_path, ValueError, r"cellgap.json: unknown field\(s\) \['colour'\]")


def test_class_files_need_class_names(tmp_path):
    raw = write_folder(tmp_path / "raw", size=32, config=False)
    fails_cleanly(raw, tmp_path, ValueError, r"class files given but no class names", magnification=40)


def test_unknown_classes(tmp_path):
    raw = write_folder(tmp_path / "raw", size=32, classes="map")
    path = raw / "classes" / "tile_001.tif"
    cls = tifffile.imread(path)
    cls[0, 0] = 3
    tifffile.imwrite(path, cls)
    fails_cleanly(raw, tmp_path, ValueError, r"tile_001.tif: unknown class id 3; expected 0..2 \(tumour, immune\)")

    raw = write_folder(tmp_path / "raw2", size=32, classes="csv_names")
    path = raw / "classes" / "tile_004.csv"
    path.write_text(path.read_text().replace("immune", "macrophage", 1).replace("tumour", "macrophage", 1))
    fails_cleanly(raw, tmp_path, ValueError, r"tile_004.csv, row \d: unknown class name 'macrophage'")

    raw = write_folder(tmp_path / "raw3", size=32, classes="csv")
    path = raw / "classes" / "tile_000.csv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n")
    fails_cleanly(raw, tmp_path, ValueError, r"tile_000.csv: instance\(s\) \[\d+\] of the label map have no class row")


def test_label_maps_that_are_not_instance_maps(tmp_path):
    raw = write_folder(tmp_path / "raw", size=48, classes=None)
    yy, xx = np.mgrid[:48, :48]
    binary = (((yy % 12) < 5) & ((xx % 12) < 5)).astype(np.uint8) * 255
    tifffile.imwrite(raw / "labels" / "tile_003.tif", binary)
    fails_alone(raw, tmp_path, "tile_003", r"tile_003.tif: not an instance map: 1 id\(s\) \(255\) cover 16 separate regions")
    Image.fromarray(np.zeros((48, 48, 3), np.uint8)).save(raw / "labels" / "tile_003.png")
    (raw / "labels" / "tile_003.tif").unlink()
    fails_alone(raw, tmp_path, "tile_003", r"tile_003.png: label map has shape \(48, 48, 3\); expected one 2-D channel")
    tifffile.imwrite(raw / "labels" / "tile_003.tif", np.full((48, 48), 1.5, np.float32))
    (raw / "labels" / "tile_003.png").unlink()
    fails_alone(raw, tmp_path, "tile_003", r"tile_003.tif: label values are not whole numbers")


def test_images_the_image_kind_rule_refuses(tmp_path):
    """Greyscale and 16-bit images are read (tests/test_image_kinds.py); stacks and odd channel counts are refused."""
    raw = write_folder(tmp_path / "raw", size=32, classes=None)
    tifffile.imwrite(raw / "images" / "tile_005.tif", np.zeros((5, 32, 32), np.uint16))
    (raw / "images" / "tile_005.png").unlink()
    fails_alone(raw, tmp_path, "tile_005", r"tile_005.tif: a multi-page TIFF, 5 pages.*RGB composite")


def test_split_file_naming_missing_images(tmp_path):
    raw = write_folder(tmp_path / "raw", size=32, split=True, classes=None)
    with open(raw / "split.csv", "a") as f:
        f.write("tile_777,test,a\n")
    fails_cleanly(raw, tmp_path, ValueError, r"split.csv, row 8: id 'tile_777' names no image")


def test_nifti_stored_transposed_gets_a_hint(tmp_path):
    import nibabel as nib

    raw = write_folder(tmp_path / "raw", size=32, classes=None)
    Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(raw / "images" / "tile_000.png")
    (raw / "labels" / "tile_000.tif").unlink()
    nib.save(nib.Nifti1Image(np.zeros((48, 32), np.int16), np.eye(4)), str(raw / "labels" / "tile_000.nii.gz"))
    fails_alone(raw, tmp_path, "tile_000", r"label shape \(48, 32\) does not match image \(32, 48\).*first axis must be rows")


def test_a_few_images_without_a_split_file_all_train(tmp_path, capsys):
    """A seeded 80/20 then 90/10 split of two images would leave nothing to train on."""
    raw = write_folder(tmp_path / "raw", n_images=2, size=64, seed=0, classes=None)
    out = folder.convert(raw, tmp_path / "out", progress=False, magnification=40)
    assert [row["split"] for row in read_manifest(out)] == ["train", "train"]
    assert "too few for a seeded train/val/test split" in capsys.readouterr().out
