"""Image kinds users bring (issue #20 item 5): read into 8-bit RGB by the documented rule, or refused naming
the file; the stain kind decides where the H&E stain jitter applies."""

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from cellgap.data import folder, registry
from cellgap.data.image_kinds import read_image, to_rgb8
from cellgap.data.loading import LoadTiled
from cellgap.data.prepared import DatasetInfo, read_dataset_info

RNG = np.random.default_rng(0)


def test_8_bit_rgb_png_and_jpeg_are_read_as_they_are(tmp_path):
    rows, cols = np.mgrid[0:40, 0:50]
    rgb = np.stack([rows * 5, cols * 5, 255 - rows * 3], axis=-1).astype(np.uint8)  # smooth: JPEG keeps it
    Image.fromarray(rgb).save(tmp_path / "a.png")
    assert np.array_equal(read_image(tmp_path / "a.png"), rgb)
    Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=95)
    jpeg = read_image(tmp_path / "a.jpg")
    assert jpeg.shape == (40, 50, 3) and jpeg.dtype == np.uint8 and np.abs(jpeg.astype(int) - rgb).mean() < 3


def test_greyscale_is_repeated_to_three_channels(tmp_path):
    grey = RNG.integers(0, 256, (30, 30), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "nissl.png")
    out = read_image(tmp_path / "nissl.png")
    assert out.shape == (30, 30, 3) and all(np.array_equal(out[..., c], grey) for c in range(3))


def test_16_bit_is_scaled_between_the_percentiles(tmp_path):
    values = np.linspace(1000, 61000, 200 * 100).reshape(200, 100).astype(np.uint16)
    values[0, 0] = 65535  # a hot pixel does not set the scale
    tifffile.imwrite(tmp_path / "dapi.tif", values)
    out = read_image(tmp_path / "dapi.tif")
    low, high = np.percentile(values.astype(float), (0.5, 99.5))
    expected = np.clip(np.rint((values.astype(float) - low) / (high - low) * 255), 0, 255).astype(np.uint8)
    assert out.shape == (200, 100, 3) and np.array_equal(out[..., 1], expected)
    assert out.min() == 0 and out.max() == 255
    Image.fromarray(values).save(tmp_path / "dapi.png")  # a 16-bit PNG follows the same rule
    assert np.array_equal(read_image(tmp_path / "dapi.png"), out)


def test_16_bit_values_within_8_bits_are_kept(tmp_path):
    values = RNG.integers(0, 256, (20, 20, 3)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", values)
    assert np.array_equal(read_image(tmp_path / "a.tif"), values.astype(np.uint8))


def test_alpha_is_dropped_when_opaque_and_composited_on_white_otherwise(tmp_path):
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 255
    Image.fromarray(rgba).save(tmp_path / "opaque.png")
    assert np.array_equal(read_image(tmp_path / "opaque.png"), rgba[..., :3])
    rgba[:5, :, 3] = 0
    Image.fromarray(rgba).save(tmp_path / "transparent.png")
    out = read_image(tmp_path / "transparent.png")
    assert (out[:5] == 255).all() and (out[5:, :, 0] == 200).all() and (out[5:, :, 1] == 0).all()


def test_pyramid_tiff_gives_its_first_page_and_a_stack_is_refused(tmp_path):
    full = RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    with tifffile.TiffWriter(tmp_path / "pyramid.tif") as tif:
        tif.write(full)
        tif.write(full[::2, ::2])
    assert np.array_equal(read_image(tmp_path / "pyramid.tif"), full)
    with tifffile.TiffWriter(tmp_path / "stack.tif") as tif:
        for _ in range(3):
            tif.write(RNG.integers(0, 256, (32, 32), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"stack\.tif: a multi-page TIFF, 3 images.*save the one image"):
        read_image(tmp_path / "stack.tif")


@pytest.mark.parametrize("shape, message", [((16, 16, 2), "a multi-page TIFF"), ((5, 16, 16), "a multi-page TIFF, 5 pages")])
def test_other_channel_counts_are_refused_with_the_fix(shape, message, tmp_path):
    tifffile.imwrite(tmp_path / "multi.tif", RNG.integers(0, 256, shape, dtype=np.uint8))
    with pytest.raises(ValueError, match=rf"multi\.tif: {message}.*RGB composite"):
        read_image(tmp_path / "multi.tif")


def test_arrays_with_2_or_more_than_4_channels_are_refused_with_the_fix():
    for shape in ((8, 8, 2), (8, 8, 6)):
        with pytest.raises(ValueError, match=rf"x\.png: {shape[2]} channels.*RGB composite"):
            to_rgb8(np.zeros(shape, np.uint8), "x.png")


def test_an_unreadable_file_is_named(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"broken\.png: cannot read image"):
        read_image(tmp_path / "broken.png")


def test_inference_loader_reads_a_16_bit_greyscale_tile(tmp_path):
    tifffile.imwrite(tmp_path / "f.tif", RNG.integers(0, 4000, (48, 48)).astype(np.uint16))
    sample = LoadTiled(keys=["image"])({"image": str(tmp_path / "f.tif")})
    assert tuple(sample["image"].shape) == (3, 48, 48) and sample["image"].dtype.is_floating_point is False


def test_a_user_folder_of_16_bit_fluorescence_with_its_stain_kind(tmp_path):
    raw = tmp_path / "raw"
    for sub in ("images", "labels"):
        (raw / sub).mkdir(parents=True)
    for i in range(3):
        label = np.zeros((32, 32), np.uint16)
        label[8:16, 8:16] = 1
        tifffile.imwrite(raw / "images" / f"t{i}.tif", (label * 30000 + RNG.integers(0, 500, (32, 32))).astype(np.uint16))
        tifffile.imwrite(raw / "labels" / f"t{i}.tif", label)
    (raw / "cellgap.json").write_text(json.dumps({"magnification": 40, "stain_kind": "fluorescence"}))
    out = folder.convert(raw, tmp_path / "prepared", progress=False, workers=1)
    assert read_dataset_info(out).stain_kind == "fluorescence"
    image = np.asarray(Image.open(out / "images" / "t0.png"))
    assert image.shape == (32, 32, 3) and image[12, 12, 0] > 240 and image[0, 0, 0] < 20
    from monai.bundle import ConfigParser

    from cellgap.bundle import bundle_name
    from cellgap.encoders import DEMO_ENCODER

    parser = ConfigParser()  # the bundle leaves the H&E stain jitter out for this dataset
    parser.read_config(str(Path(__file__).resolve().parents[1] / "bundles" / bundle_name(DEMO_ENCODER) / "configs" / "train.json"))
    parser.update({"dataset": "folder", "dataset_dir": str(out)})
    assert parser.get_parsed_content("stain_stats") is None
    (raw / "cellgap.json").write_text(json.dumps({"magnification": 40, "stain_kind": "dapi"}))
    with pytest.raises(ValueError, match=r"cellgap\.json: field 'stain_kind' is 'dapi'; expected one of"):
        folder.convert(raw, tmp_path / "again", progress=False, workers=1)


def test_the_stain_jitter_applies_where_it_means_something():
    assert registry.get("pannuke").stain_stats("he") == "pannuke"
    assert registry.get("cytodark0").stain_stats("nissl") == "cytodark0"
    assert registry.get("cytodark0").stain_stats("he") == "he"  # not the statistics measured on Nissl scans
    assert registry.get("folder").stain_stats("he") == "he"
    for kind in ("ihc", "nissl", "fluorescence", "other"):
        assert registry.get("folder").stain_stats(kind) is None
    with pytest.raises(ValueError, match="not a stain kind"):
        DatasetInfo(name="x", class_names=("cell",), magnification=40, mpp=0.25, stain_kind="DAPI")
    assert DatasetInfo(name="x", class_names=("cell",), magnification=40, mpp=0.25).stain_kind is None  # the registry's
    assert registry.get("cytodark0").stain_stats(None) == "cytodark0"
