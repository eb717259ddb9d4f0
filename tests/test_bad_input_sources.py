"""Bad input to the user-folder and CytoDArk0 converters: cellgap.json facts of the wrong type, an image in
an unsupported format, a CytoDArk0 metadata CSV with empty or missing cells or without an image, and two
source images with one name. Each stops with an error naming the file, row or field and what was
expected, and leaves neither the output folder nor ``<out>.partial`` behind."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from cellgap.data import cytodark0, folder
from cellgap.data.fixtures import cytodark0_name, write_cytodark0, write_folder
from cellgap.data.prepared import read_dataset_info, read_manifest


def fails_cleanly(convert, raw, tmp_path, error, match, **kw):
    with pytest.raises(error, match=match) as caught:
        convert(raw, tmp_path / "out", progress=False, **kw)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    return str(caught.value)


# ------------------------------------------------------------------------------------ user folder


@pytest.fixture(scope="module")
def folder_raw(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("fo") / "raw", size=32, classes=None, split=True)


def folder_copy(folder_raw, tmp_path, **facts) -> Path:
    raw = tmp_path / "raw"
    shutil.copytree(folder_raw, raw)
    config = json.loads((raw / "cellgap.json").read_text())
    (raw / "cellgap.json").write_text(json.dumps({**config, **facts}))
    return raw


@pytest.mark.parametrize("field, value, expected", [
    ("class_names", "tumor", "a list of distinct, non-empty class names"),
    ("class_names", [], "a list of distinct, non-empty class names"),
    ("class_names", ["a", "a"], "a list of distinct, non-empty class names"),
    ("class_names", ["a", " "], "a list of distinct, non-empty class names"),
    ("class_names", ["a", 2], "a list of distinct, non-empty class names"),
    ("class_names", [["a"]], "a list of distinct, non-empty class names"),
    ("min_cell_size", "fifty", "a whole number of pixels ≥ 1"),
    ("min_cell_size", 0, "a whole number of pixels ≥ 1"),
    ("min_cell_size", 2.5, "a whole number of pixels ≥ 1"),
    ("min_cell_size", True, "a whole number of pixels ≥ 1"),
    ("magnification", -40, "a positive number such as 20 or 40"),
    ("magnification", "forty", "a positive number such as 20 or 40"),
    ("magnification", True, "a positive number such as 20 or 40"),
    ("mpp", 0, "a positive pixel size in µm/pixel"),
    ("mpp", "0.25", "a positive pixel size in µm/pixel"),
    ("mpp", float("inf"), "a positive pixel size in µm/pixel"),
    ("name", "", "a non-empty name"),
    ("name", 5, "a non-empty name"),
    ("empty_policy", "none", "one of ['skip', 'nan']"),
    ("tissue_label", ["organ"], "a non-empty text"),
    ("description", 3, "a text"),
])
def test_cellgap_json_facts_are_type_checked(folder_raw, tmp_path, field, value, expected):
    raw = folder_copy(folder_raw, tmp_path, **{field: value})
    message = fails_cleanly(folder.convert, raw, tmp_path, ValueError, None)
    assert message.startswith(f"{raw / 'cellgap.json'}: field {field!r} is {value!r}; expected ")
    assert expected in message


def test_cellgap_json_magnification_alone_must_be_positive(folder_raw, tmp_path):
    raw = folder_copy(folder_raw, tmp_path, magnification=-40)
    config = json.loads((raw / "cellgap.json").read_text())
    del config["mpp"]
    (raw / "cellgap.json").write_text(json.dumps(config))
    fails_cleanly(folder.convert, raw, tmp_path, ValueError, r"cellgap.json: field 'magnification' is -40; expected a positive")


def test_cellgap_json_good_values_still_pass(folder_raw, tmp_path):
    raw = folder_copy(folder_raw, tmp_path, magnification="40x", min_cell_size=50.0, class_names=["cell"])
    info = read_dataset_info(folder.convert(raw, tmp_path / "out", progress=False))
    assert (info.magnification, info.mpp, info.min_cell_size, info.class_names) == (40, 0.25, 50, ("cell",))


def test_bad_arguments_name_the_argument(folder_raw, tmp_path):
    raw = folder_copy(folder_raw, tmp_path)
    message = fails_cleanly(folder.convert, raw, tmp_path, ValueError, r"^class_names: got 'tumor'; expected a list",
                            class_names="tumor")
    assert "cellgap.json" not in message
    fails_cleanly(folder.convert, raw, tmp_path, ValueError, r"^magnification: got -40; expected a positive number",
                  magnification=-40)


def test_image_in_an_unsupported_format_is_named(folder_raw, tmp_path):
    raw = folder_copy(folder_raw, tmp_path)
    png = raw / "images" / "tile_004.png"
    Image.open(png).convert("RGB").save(png.with_suffix(".bmp"))
    png.unlink()
    fails_cleanly(folder.convert, raw, tmp_path, ValueError,
                  r"images/tile_004.bmp: image format '.bmp' is not supported; expected .png, .tif, .tiff, .jpg or .jpeg")
    # the same for a label map saved in a format that is not read
    shutil.copy(raw / "images" / "tile_004.bmp", png)
    (raw / "images" / "tile_004.bmp").unlink()
    label = raw / "labels" / "tile_004.tif"
    label.rename(label.with_suffix(".jpg"))
    fails_cleanly(folder.convert, raw, tmp_path, ValueError,
                  r"labels/tile_004.jpg: label format '.jpg' is not supported; expected .tif, .tiff, .png, .nii or .nii.gz")


# -------------------------------------------------------------------------------------- CytoDArk0


@pytest.fixture(scope="module")
def cyto_raw(tmp_path_factory):
    return write_cytodark0(tmp_path_factory.mktemp("cy") / "raw", image_ids=(1, 2, 3, 5, 54, 60), size=128,
                           smaller_tier=None, cells=(4, 10), seed=2, folds=False)


def cyto_copy(cyto_raw, tmp_path, renames=(2,)) -> tuple[Path, Path]:
    """A copy of the raw folder whose images ``renames`` get names without a number (slice_b, slice_c, ...)."""
    raw = tmp_path / "raw"
    shutil.copytree(cyto_raw, raw)
    tier = raw / "cytoDArk0" / "20x" / "128x128"
    for letter, image_id in zip("bcdef", renames):
        for sub, ext in (("image", ".png"), ("label", ".tiff")):
            (tier / sub / f"{cytodark0_name(image_id)}{ext}").rename(tier / sub / f"slice_{letter}{ext}")
    return raw, tier


@pytest.mark.parametrize("text, row, what", [
    ("name,area\nslice_b,\n", 2, "empty 'area'"),
    ("name,area\nslice_b\n", 2, "no 'area' cell"),
    ("name,area\nID05_section,Cerebellum\n,Hippocampus\nslice_b,Cerebellum\n", 3, "empty 'name'"),
])
def test_metadata_rows_with_empty_or_missing_cells(cyto_raw, tmp_path, text, row, what):
    raw, _ = cyto_copy(cyto_raw, tmp_path)
    meta = tmp_path / "areas.csv"
    meta.write_text(text)
    fails_cleanly(cytodark0.convert, raw, tmp_path, ValueError, rf"^{re.escape(str(meta))}, row {row}: {what}; expected ",
                  tile_size=None, metadata=meta)


def test_metadata_conflicting_rows(cyto_raw, tmp_path):
    raw, _ = cyto_copy(cyto_raw, tmp_path)
    meta = tmp_path / "areas.csv"
    meta.write_text("name,area\nslice_b,Cerebellum\nslice_b,Hippocampus\n")
    fails_cleanly(cytodark0.convert, raw, tmp_path, ValueError,
                  rf"^{re.escape(str(meta))}, row 3: 'slice_b' listed with two areas \('Cerebellum' on row 2, 'Hippocampus'\)",
                  tile_size=None, metadata=meta)


def test_metadata_csv_that_misses_an_image(cyto_raw, tmp_path):
    raw, tier = cyto_copy(cyto_raw, tmp_path, renames=(2, 3))
    meta = tmp_path / "areas.csv"
    meta.write_text("name,area\nslice_b,Cerebellum\n")
    message = fails_cleanly(cytodark0.convert, raw, tmp_path, ValueError,
                            rf"^{re.escape(str(tier / 'image' / 'slice_c.png'))}: not listed in {re.escape(str(meta))}", tile_size=None, metadata=meta)
    assert "pass metadata=" not in message
    # without a metadata CSV the advice to pass one stays
    fails_cleanly(cytodark0.convert, raw, tmp_path, ValueError, r"slice_b.png: .*pass metadata= a CSV", tile_size=None)
    # a listed image still converts
    meta.write_text("name,area\nslice_b,Cerebellum\nslice_c,Hippocampus\n")
    out = cytodark0.convert(raw, tmp_path / "out", tile_size=None, metadata=meta, progress=False)
    assert {r["id"]: r["tissue"] for r in read_manifest(out)}["slice_c"] == "Hippocampus"


def test_two_source_images_with_one_name(cyto_raw, tmp_path):
    raw, tier = cyto_copy(cyto_raw, tmp_path, renames=())
    png = tier / "image" / f"{cytodark0_name(1)}.png"
    tifffile.imwrite(png.with_suffix(".tif"), np.asarray(Image.open(png)))
    fails_cleanly(cytodark0.convert, raw, tmp_path, ValueError,
                  rf"^{re.escape(str(tier / 'image'))}: two images for '{cytodark0_name(1)}': {cytodark0_name(1)}.png and "
                  rf"{cytodark0_name(1)}.tif; keep one", tile_size=None)
