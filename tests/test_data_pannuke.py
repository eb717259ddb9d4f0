"""PanNuke converter: layout, instance/class maps, overlap rule, protocols, bad input."""

import numpy as np
import pytest
import tifffile
from PIL import Image

from cellgap.data import pannuke
from cellgap.data.prepared import datalist, read_dataset_info, read_manifest
from cellgap.data.registry import protocol_of
from cellgap.testing.fixtures import write_pannuke


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    return write_pannuke(tmp_path_factory.mktemp("pannuke") / "raw", tiles_per_fold=(7, 6, 8), size=48, seed=3)


def masks_path(raw, k):
    return raw / f"Fold {k}" / "masks" / f"fold{k}" / "masks.npy"


def images_path(raw, k):
    return raw / f"Fold {k}" / "images" / f"fold{k}" / "images.npy"


def types_path(raw, k):
    return raw / f"Fold {k}" / "images" / f"fold{k}" / "types.npy"


@pytest.fixture(scope="module")
def prepared(raw, tmp_path_factory):
    return pannuke.convert(raw, tmp_path_factory.mktemp("out") / "pannuke", progress=False, chunk=4)


def test_layout_ids_and_facts(raw, prepared):
    rows = read_manifest(prepared)
    assert len(rows) == 21
    assert rows[0]["id"] == "pannuke_adrenal_gland_fold1_0"
    assert rows[7]["id"].endswith("_fold2_0") and rows[7]["fold"] == "2"
    assert {r["tissue"] for r in rows} == {"adrenal_gland", "bile-duct", "bladder"}
    assert rows[3]["source_file"] == "Fold 1/images/fold1/images.npy" and rows[3]["source_index"] == "3"
    info = read_dataset_info(prepared)
    assert info.class_names == ("Neoplastic", "Inflammatory", "Connective", "Dead", "Epithelial")
    assert (info.magnification, info.mpp, info.cell_size, info.detection_radius) == (40, 0.25, 50, 12.0)
    assert info.empty_policy == "nan"
    assert protocol_of(prepared, "cisca") == {"protocol": "cisca", "column": "split_cisca", "empty_policy": "skip",
                                              "description": pannuke.PROTOCOLS["cisca"]["description"]}
    assert protocol_of(prepared)["column"] == "split"


def test_pixels_instances_and_classes_match_the_native_files(raw, prepared):
    rows = read_manifest(prepared)
    images = np.load(images_path(raw, 2))
    masks = np.load(masks_path(raw, 2))
    for row in rows[7:13]:
        i = int(row["source_index"])
        image = np.asarray(Image.open(prepared / row["image"]))
        assert (image == images[i].astype(np.uint8)).all()
        label = tifffile.imread(prepared / row["label"])
        classes = tifffile.imread(prepared / row["classes"])
        channels = masks[i, ..., :5]
        n_cells = sum(len(np.unique(channels[..., c][channels[..., c] > 0])) for c in range(5))
        overlapped = (channels > 0).sum(axis=2) > 1
        if not overlapped.any():
            assert label.max() == n_cells == int(row["n_cells"])
            expected_class = np.where(channels.max(axis=2) > 0, (channels > 0).argmax(axis=2) + 1, 0)
            assert (classes == expected_class).all()
        assert (np.unique(label) == np.arange(label.max() + 1)).all()  # sequential ids
        assert ((label > 0) == (channels.max(axis=2) > 0)).all()
        counts = [int(x) for x in row["class_counts"].split(";")]
        assert sum(counts) == label.max()


def test_overlap_rule_smaller_cell_wins_and_same_ids_in_two_channels_stay_apart():
    channels = np.zeros((5, 12, 12), np.int64)
    channels[2, 0:8, 0:8] = 7   # large connective cell, id 7
    channels[0, 6:10, 6:10] = 7  # small neoplastic cell with the same id, overlapping the corner
    channels[4, 10:12, 0:2] = 3  # separate epithelial cell
    channels[1, 10:12, 10:12] = 5
    channels[3, 10:12, 10:12] = 9  # two equal-size cells on the same pixels: lower channel wins
    label, classes, overlap = pannuke.instance_map(channels)
    assert overlap == 4 + 4
    small = label[7, 7]
    assert classes[7, 7] == 1 and (label == small).sum() == 16  # the small cell keeps all its pixels
    big = label[0, 0]
    assert big != small and classes[0, 0] == 3 and (label == big).sum() == 64 - 4
    assert classes[11, 11] == 2  # inflammatory (channel 1) beats dead (channel 3) on a tie
    assert len(np.unique(label)) - 1 == 4  # the tied dead cell lost every pixel
    assert sorted(np.unique(label)) == [0, 1, 2, 3, 4]


def test_protocol_columns(prepared):
    rows = read_manifest(prepared)
    fold = np.array([int(r["fold"]) for r in rows])
    s1 = np.array([r["split_official1"] for r in rows])
    assert set(s1[fold == 1]) == {"train"} and set(s1[fold == 2]) == {"val"} and set(s1[fold == 3]) == {"test"}
    s3 = np.array([r["split_official3"] for r in rows])
    assert set(s3[fold == 3]) == {"train"} and set(s3[fold == 1]) == {"test"}
    assert [r["split"] for r in rows] == list(s1)
    cisca = np.array([r["split_cisca"] for r in rows])
    assert set(cisca) == {"train", "val", "test"}
    assert len(datalist(prepared, "test", split_column="split_cisca")) == int(np.ceil(0.2 * 21))


def test_cisca_default_protocol_and_exact_folds_file(raw, tmp_path):
    rows_ids = [f"pannuke_{t}_fold{k}_{i}" for k, n in ((1, 7), (2, 6), (3, 8)) for i, t in
                zip(range(n), ["adrenal_gland", "bile-duct", "bladder"] * 3)]
    folds = tmp_path / "folds.csv"
    folds.write_text("img_id,fold\n" + "".join(f"{r},{j % 3}\n" for j, r in enumerate(rows_ids)) + f"{rows_ids[0]},0\n")
    out = pannuke.convert(raw, tmp_path / "p", protocol="cisca", cisca_folds=folds, progress=False)
    rows = read_manifest(out)
    assert [r["split"] for r in rows] == [("train", "val", "test")[j % 3] for j in range(21)]
    assert read_dataset_info(out).empty_policy == "skip"


def test_subset_of_folds_allows_only_cisca(raw, tmp_path):
    with pytest.raises(ValueError, match="needs all three folds"):
        pannuke.convert(raw, tmp_path / "p", folds=(1, 2), progress=False)
    out = pannuke.convert(raw, tmp_path / "p", folds=(1, 2), protocol="cisca", progress=False)
    assert len(read_manifest(out)) == 13 and "split_official1" not in read_manifest(out)[0]


def test_chunk_boundaries_do_not_change_the_result(raw, prepared, tmp_path):
    other = pannuke.convert(raw, tmp_path / "p", progress=False, chunk=32, workers=1)
    for a, b in zip(read_manifest(prepared), read_manifest(other)):
        assert a == b
        assert (tifffile.imread(prepared / a["label"]) == tifffile.imread(other / b["label"])).all()


# ------------------------------------------------------------------------------------ bad input


def broken_copy(raw, tmp_path):
    import shutil

    target = tmp_path / "raw"
    shutil.copytree(raw, target)
    return target


def assert_fails_cleanly(raw, tmp_path, error, match):
    out = tmp_path / "out"
    with pytest.raises(error, match=match):
        pannuke.convert(raw, out, progress=False)
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_truncated_npy(raw, tmp_path):
    bad = broken_copy(raw, tmp_path)
    path = images_path(bad, 2)
    path.write_bytes(path.read_bytes()[:-1000])
    assert_fails_cleanly(bad, tmp_path, ValueError, r"Fold 2/images/fold2/images.npy: truncated .npy file")


def test_wrong_shaped_masks(raw, tmp_path):
    bad = broken_copy(raw, tmp_path)
    np.save(masks_path(bad, 1), np.load(masks_path(bad, 1))[..., :5])
    assert_fails_cleanly(bad, tmp_path, ValueError, r"fold1/masks.npy: expected masks of shape \(N, H, W, 6\).*got shape")


def test_counts_disagree(raw, tmp_path):
    bad = broken_copy(raw, tmp_path)
    np.save(types_path(bad, 3), np.load(types_path(bad, 3))[:-1])
    assert_fails_cleanly(bad, tmp_path, ValueError, r"fold 3: tile counts disagree: .*images.npy has 8, .*masks.npy has 8, .*types.npy has 7")


def test_wrong_dtypes(raw, tmp_path):
    bad = broken_copy(raw, tmp_path)
    np.save(types_path(bad, 1), np.arange(7))
    assert_fails_cleanly(bad, tmp_path, ValueError, r"types.npy: tissue names must be strings, got dtype int64")
    np.save(types_path(bad, 1), np.load(types_path(raw, 1)))
    np.save(images_path(bad, 1), np.load(images_path(bad, 1)).astype(np.complex64))
    assert_fails_cleanly(bad, tmp_path, ValueError, r"fold1/images.npy: dtype complex64; expected uint8 or float")


def test_non_rgb_images(raw, tmp_path):
    bad = broken_copy(raw, tmp_path)
    np.save(images_path(bad, 2), np.load(images_path(bad, 2))[..., :1])
    assert_fails_cleanly(bad, tmp_path, ValueError, r"fold2/images.npy: expected RGB tiles of shape \(N, H, W, 3\)")


def test_image_values_out_of_range_name_the_index(raw, tmp_path):
    bad = broken_copy(raw, tmp_path)
    images = np.load(images_path(bad, 3))
    images[5, 0, 0, 0] = 300.0
    np.save(images_path(bad, 3), images)
    assert_fails_cleanly(bad, tmp_path, ValueError, r"fold3/images.npy, index 5: image values span \d+\.0\.\.300\.0; expected RGB values 0..255")


def test_masks_that_are_not_instance_maps(raw, tmp_path):
    bad = broken_copy(raw, tmp_path)
    masks = np.load(masks_path(bad, 1))
    masks[4, ..., :5] = 0
    yy, xx = np.mgrid[:48, :48]
    masks[4, ..., 2] = ((yy % 12 < 4) & (xx % 12 < 4)).astype(float)  # 16 separate blobs, all with id 1
    np.save(masks_path(bad, 1), masks)
    assert_fails_cleanly(bad, tmp_path, ValueError, r"index 4: not an instance map: 1 id\(s\) \(1\) cover 16 separate regions")


def test_non_integer_mask_values(raw, tmp_path):
    bad = broken_copy(raw, tmp_path)
    masks = np.load(masks_path(bad, 2))
    masks[1, 3, 3, 0] = 2.5
    np.save(masks_path(bad, 2), masks)
    assert_fails_cleanly(bad, tmp_path, ValueError, r"fold2/masks.npy, index 1: label values are not whole numbers")


def test_missing_file(raw, tmp_path):
    bad = broken_copy(raw, tmp_path)
    masks_path(bad, 3).unlink()
    assert_fails_cleanly(bad, tmp_path, FileNotFoundError, r"no masks.npy for fold 3")


def test_split_file_naming_missing_images(raw, tmp_path):
    folds = tmp_path / "folds.csv"
    folds.write_text("img_id,fold\npannuke_lung_fold1_999,0\n")
    with pytest.raises(ValueError, match=r"folds.csv, row 2: img_id 'pannuke_lung_fold1_999' names no image"):
        pannuke.convert(raw, tmp_path / "out", protocol="cisca", cisca_folds=folds, progress=False)
    assert not (tmp_path / "out").exists()


def test_existing_output_is_not_replaced_without_overwrite(raw, prepared):
    with pytest.raises(FileExistsError, match="already exists"):
        pannuke.convert(raw, prepared, progress=False)
