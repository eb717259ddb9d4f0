"""CoNIC converter: layout, maps, source-grouped split, bad input."""

import shutil

import numpy as np
import pytest
import tifffile
from PIL import Image

from cellgap.data import conic
from cellgap.data.prepared import read_dataset_info, read_manifest
from cellgap.testing.fixtures import write_conic


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    return write_conic(tmp_path_factory.mktemp("conic") / "raw", sources_per_cohort=4, patches_per_source=3, size=40, seed=2)


@pytest.fixture(scope="module")
def prepared(raw, tmp_path_factory):
    return conic.convert(raw, tmp_path_factory.mktemp("out") / "conic", progress=False, chunk=7)


def test_layout_facts_and_maps(raw, prepared):
    rows = read_manifest(prepared)
    assert len(rows) == 60
    assert rows[0]["id"] == "consep_1-0000" and rows[0]["tissue"] == "consep" and rows[0]["source"] == "consep_1"
    info = read_dataset_info(prepared)
    assert info.class_names == ("Neutrophil", "Epithelial", "Lymphocyte", "Plasma", "Eosinophil", "Connective")
    assert (info.magnification, info.mpp, info.cell_size, info.detection_radius, info.empty_policy) == (20, 0.5, 26, 6.0, "skip")
    images, labels = np.load(raw / "images.npy"), np.load(raw / "labels.npy")
    for row in rows[::9]:
        i = int(row["source_index"])
        assert (np.asarray(Image.open(prepared / row["image"])) == images[i]).all()
        label = tifffile.imread(prepared / row["label"])
        classes = tifffile.imread(prepared / row["classes"])
        assert (classes == labels[i, ..., 1]).all()
        native = labels[i, ..., 0]
        # same partition, ids renumbered 1..N
        pairs = np.unique(np.stack([label.ravel(), native.ravel()]), axis=1)
        assert pairs.shape[1] == len(np.unique(native)) == label.max() + 1
        counts = [int(x) for x in row["class_counts"].split(";")]
        assert sum(counts) == label.max() == int(row["n_cells"])


def test_split_keeps_source_images_together(prepared):
    rows = read_manifest(prepared)
    by_source = {}
    for r in rows:
        by_source.setdefault(r["source"], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_source.values())
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    assert all(r["split"] == r["split_cisca"] for r in rows)


def broken(raw, tmp_path):
    target = tmp_path / "raw"
    shutil.copytree(raw, target)
    return target


def fails_cleanly(raw, tmp_path, error, match):
    with pytest.raises(error, match=match):
        conic.convert(raw, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_unknown_class_id(raw, tmp_path):
    bad = broken(raw, tmp_path)
    labels = np.load(bad / "labels.npy")
    labels[17, 0, 0, 1] = 7
    np.save(bad / "labels.npy", labels)
    fails_cleanly(bad, tmp_path, ValueError, r"labels.npy, index 17: unknown class id 7; expected 0 \(background\) to 6")


def test_float_labels_are_a_dtype_error(raw, tmp_path):
    bad = broken(raw, tmp_path)
    np.save(bad / "labels.npy", np.load(bad / "labels.npy").astype(np.float32))
    fails_cleanly(bad, tmp_path, ValueError, r"labels.npy: dtype float32; expected integer instance and class ids")


def test_wrong_shape_and_counts(raw, tmp_path):
    bad = broken(raw, tmp_path)
    np.save(bad / "labels.npy", np.load(bad / "labels.npy")[:-2])
    fails_cleanly(bad, tmp_path, ValueError, r"tile counts disagree: .*images.npy has 60, .*labels.npy has 58")
    np.save(bad / "labels.npy", np.load(raw / "labels.npy")[..., :1])
    fails_cleanly(bad, tmp_path, ValueError, r"labels.npy: expected labels of shape \(N, H, W, 2\)")


def test_patch_info_problems(raw, tmp_path):
    bad = broken(raw, tmp_path)
    lines = (raw / "patch_info.csv").read_text().splitlines()
    (bad / "patch_info.csv").write_text("\n".join(lines[:-1]) + "\n")
    fails_cleanly(bad, tmp_path, ValueError, r"patch_info.csv: 59 patch names but images.npy/labels.npy hold 60")
    (bad / "patch_info.csv").write_text("\n".join(lines[:5] + ["not a name"] + lines[6:]) + "\n")
    fails_cleanly(bad, tmp_path, ValueError, r"patch_info.csv, patch 4: name 'not a name' is not of the form")
    (bad / "patch_info.csv").unlink()
    fails_cleanly(bad, tmp_path, FileNotFoundError, r"patch_info.csv missing")


def test_counts_csv_row_count(raw, tmp_path):
    bad = broken(raw, tmp_path)
    lines = (raw / "counts.csv").read_text().splitlines()
    (bad / "counts.csv").write_text("\n".join(lines[:-3]) + "\n")
    fails_cleanly(bad, tmp_path, ValueError, r"counts.csv: 57 rows but 60 patches")


def test_class_map_in_the_instance_channel(raw, tmp_path):
    bad = broken(raw, tmp_path)
    labels = np.load(bad / "labels.npy")
    yy, xx = np.mgrid[:40, :40]
    labels[3, ..., 0] = ((yy % 10 < 3) & (xx % 10 < 3))  # a binary mask of 16 blobs where ids should be
    np.save(bad / "labels.npy", labels)
    fails_cleanly(bad, tmp_path, ValueError, r"labels.npy, index 3: not an instance map")


def test_truncated_images(raw, tmp_path):
    bad = broken(raw, tmp_path)
    (bad / "images.npy").write_bytes((raw / "images.npy").read_bytes()[:5000])
    fails_cleanly(bad, tmp_path, ValueError, r"images.npy: truncated .npy file")
