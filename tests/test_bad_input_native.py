"""Bad native input (PanNuke and CoNIC arrays, .npy files): each case stops with an error naming the file and
index, and leaves no output folder behind."""

import shutil

import numpy as np
import pytest
from PIL import Image

from cellgap.data import conic, native, pannuke
from cellgap.data.prepared import read_manifest
from cellgap.testing.fixtures import write_conic, write_pannuke


@pytest.fixture(scope="module")
def pannuke_raw(tmp_path_factory):
    return write_pannuke(tmp_path_factory.mktemp("pannuke") / "raw", tiles_per_fold=(4, 3, 4), size=48, seed=5)


@pytest.fixture(scope="module")
def conic_raw(tmp_path_factory):
    return write_conic(tmp_path_factory.mktemp("conic") / "raw", sources_per_cohort=2, patches_per_source=2, size=40, seed=4)


def copy_of(raw, tmp_path):
    target = tmp_path / "raw"
    shutil.copytree(raw, target)
    return target


def pn_file(raw, fold, key):
    return raw / f"Fold {fold}" / ("masks" if key == "masks" else "images") / f"fold{fold}" / f"{key}.npy"


def fails_cleanly(convert, raw, tmp_path, error, match, **options):
    out = tmp_path / "out"
    with pytest.raises(error, match=match) as info:
        convert(raw, out, progress=False, **options)
    assert not out.exists() and not (tmp_path / "out.partial").exists()
    return str(info.value)


# ------------------------------------------------------------------------------ images 0..1


def test_pannuke_images_scaled_to_0_1_are_rejected(pannuke_raw, tmp_path):
    bad = copy_of(pannuke_raw, tmp_path)
    np.save(pn_file(bad, 1, "images"), np.load(pn_file(bad, 1, "images")) / 255.0)
    message = fails_cleanly(pannuke.convert, bad, tmp_path, ValueError,
                            r"Fold 1/images/fold1/images.npy, index 0: image values span 0\.\d+\.\.(0\.\d+|1\.0)")
    assert "scaled to 0..1" in message and "expected RGB values 0..255" in message and "255" in message


def test_conic_images_scaled_to_0_1_are_rejected(conic_raw, tmp_path):
    bad = copy_of(conic_raw, tmp_path)
    np.save(bad / "images.npy", np.load(bad / "images.npy").astype(np.float32) / 255)
    fails_cleanly(conic.convert, bad, tmp_path, ValueError,
                  r"images.npy, index 0: image values span .* scaled to 0..1; expected RGB values 0..255")


def test_float_0_255_images_and_an_all_black_tile_still_pass(pannuke_raw, tmp_path):
    raw = copy_of(pannuke_raw, tmp_path)
    images = np.load(pn_file(raw, 2, "images"))
    assert images.dtype == np.float64 and images.max() > 1  # the release's float64 0..255
    images[1] = 0.0  # an all-black tile is not mistaken for a 0..1 image
    np.save(pn_file(raw, 2, "images"), images)
    out = pannuke.convert(raw, tmp_path / "out", progress=False)
    rows = {r["id"]: r for r in read_manifest(out)}
    row = next(r for r in rows.values() if r["fold"] == "2" and r["source_index"] == "1")
    assert not np.asarray(Image.open(out / row["image"])).any()
    row = next(r for r in rows.values() if r["fold"] == "2" and r["source_index"] == "0")
    assert (np.asarray(Image.open(out / row["image"])) == images[0].astype(np.uint8)).all()


# ------------------------------------------------------------------------ CoNIC negative ids


def test_conic_negative_instance_id_on_a_tile_without_cells(conic_raw, tmp_path):
    bad = copy_of(conic_raw, tmp_path)
    labels = np.load(bad / "labels.npy").astype(np.int16)
    labels[6] = 0
    labels[6, 3, 3, 0] = -5
    np.save(bad / "labels.npy", labels)
    fails_cleanly(conic.convert, bad, tmp_path, ValueError, r"labels.npy, index 6: negative instance id -5; expected")


def test_conic_negative_instance_id_on_a_tile_with_cells(conic_raw, tmp_path):
    bad = copy_of(conic_raw, tmp_path)
    labels = np.load(bad / "labels.npy").astype(np.int16)
    i = int(np.argmax(labels[..., 0].reshape(len(labels), -1).max(axis=1)))
    assert labels[i, ..., 0].max() > 0
    labels[i, 0, 0, 0] = -5
    np.save(bad / "labels.npy", labels)
    fails_cleanly(conic.convert, bad, tmp_path, ValueError, rf"labels.npy, index {i}: negative instance id -5; expected")


def test_conic_negative_class_id(conic_raw, tmp_path):
    bad = copy_of(conic_raw, tmp_path)
    labels = np.load(bad / "labels.npy").astype(np.int16)
    labels[4, 0, 0, 1] = -1
    np.save(bad / "labels.npy", labels)
    fails_cleanly(conic.convert, bad, tmp_path, ValueError,
                  r"labels.npy, index 4: negative class id -1; expected 0 \(background\) to 6")


# ------------------------------------------------------------------------- huge mask values


def test_pannuke_mask_value_beyond_int64_is_reported_as_it_is(pannuke_raw, tmp_path):
    bad = copy_of(pannuke_raw, tmp_path)
    masks = np.load(pn_file(bad, 1, "masks"))
    masks[3, 5, 5, 0] = 1e20
    np.save(pn_file(bad, 1, "masks"), masks)
    message = fails_cleanly(pannuke.convert, bad, tmp_path, ValueError,
                            r"Fold 1/masks/fold1/masks.npy, index 3: label value 1e\+20 .*expected ids 0\.\.")
    assert "-9223372036854775808" not in message
    masks[3, 5, 5, 0] = -1e20
    np.save(pn_file(bad, 1, "masks"), masks)
    fails_cleanly(pannuke.convert, bad, tmp_path, ValueError, r"masks.npy, index 3: negative label value -1e\+20; expected ids ≥ 0")


# --------------------------------------------------------------------- .npy longer than header


def test_npy_with_bytes_after_the_data(pannuke_raw, tmp_path):
    bad = copy_of(pannuke_raw, tmp_path)
    with open(pn_file(bad, 1, "masks"), "ab") as f:
        f.write(b"\x00" * 12345)
    fails_cleanly(pannuke.convert, bad, tmp_path, ValueError,
                  r"Fold 1/masks/fold1/masks.npy: 12345 extra bytes after the data its header promises")


def test_open_npy_extra_bytes_and_exact_size(tmp_path):
    path = tmp_path / "a.npy"
    np.save(path, np.arange(6))
    assert native.open_npy(path, "x").shape == (6,)
    with open(path, "ab") as f:
        f.write(b"junk")
    with pytest.raises(ValueError, match=r"a.npy: 4 extra bytes after the data its header promises \(shape \(6,\)"):
        native.open_npy(path, "x")


# ---------------------------------------------------------------------------- empty fold


@pytest.mark.parametrize("protocol", ["official1", "cisca"])
def test_pannuke_empty_fold(pannuke_raw, tmp_path, protocol):
    bad = copy_of(pannuke_raw, tmp_path)
    for key in ("images", "masks", "types"):
        np.save(pn_file(bad, 2, key), np.load(pn_file(bad, 2, key))[:0])
    message = fails_cleanly(pannuke.convert, bad, tmp_path, ValueError, r"fold 2: no tiles", protocol=protocol)
    for key in ("images", "masks", "types"):
        assert str(pn_file(bad, 2, key)) in message


def test_conic_without_patches(conic_raw, tmp_path):
    bad = copy_of(conic_raw, tmp_path)
    for name in ("images.npy", "labels.npy"):
        np.save(bad / name, np.load(bad / name)[:0])
    (bad / "patch_info.csv").write_text("patch_info\n")
    (bad / "counts.csv").write_text((bad / "counts.csv").read_text().splitlines()[0] + "\n")
    fails_cleanly(conic.convert, bad, tmp_path, ValueError, r"no patches: .*images.npy and .*labels.npy hold 0 patches")
