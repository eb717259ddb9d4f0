"""Native-file helpers: instance-map check, relabelling, class counts, tiling, .npy checks."""

import numpy as np
import pytest

from cellgap.data import native


def test_instance_map_check_accepts_touching_and_fragmented_cells():
    label = np.zeros((20, 20), np.int32)
    label[2:6, 2:6] = 1
    label[2:6, 6:10] = 2  # touching cell 1
    label[12:14, 0:2] = 3
    label[12:14, 5:7] = 3
    label[12:14, 10:12] = 3  # one cell in three fragments
    native.check_instance_map(label, "x")


def test_instance_map_check_rejects_binary_and_class_masks():
    yy, xx = np.mgrid[:40, :40]
    blobs = ((yy % 8) < 3) & ((xx % 8) < 3)
    with pytest.raises(ValueError, match=r"x: not an instance map: 1 id\(s\) \(1\) cover 25 separate regions"):
        native.check_instance_map(blobs.astype(np.uint8), "x")
    classes = np.where(blobs, 1 + (xx // 8) % 3, 0)
    with pytest.raises(ValueError, match=r"3 id\(s\) \(1, 2, 3\) cover 25"):
        native.check_instance_map(classes, "x")


def test_sequential_keeps_the_partition():
    label = np.array([[0, 70, 70], [5, 0, 1_000_000], [5, 5, 0]], np.int64)
    out = native.sequential(label)
    assert out.dtype == np.int32
    assert out.tolist() == [[0, 2, 2], [1, 0, 3], [1, 1, 0]]
    huge = label.copy()
    huge[0, 0] = 1 << 30
    assert native.sequential(huge).max() == 4


def test_class_counts_majority_per_cell():
    label = np.array([[1, 1, 1, 2], [3, 3, 0, 2]])
    classes = np.array([[2, 2, 1, 1], [0, 0, 0, 1]])
    assert native.class_counts(label, classes, 2).tolist() == [1, 1]  # cell 3 has only background class pixels


def test_tiles_row_major_and_exact_cover():
    array = np.arange(16).reshape(4, 4)
    got = list(native.tiles(array, 2, "a"))
    assert [k for k, _ in got] == [1, 2, 3, 4]
    assert got[2][1].tolist() == [[8, 9], [12, 13]]
    with pytest.raises(ValueError, match="a: size 4×4 is not a multiple of the tile size 3"):
        list(native.tiles(array, 3, "a"))


def test_open_npy_rejects_objects_and_garbage(tmp_path):
    path = tmp_path / "o.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="holds Python objects"):
        native.open_npy(path, "x")
    path.write_bytes(b"not numpy at all")
    with pytest.raises(ValueError, match="not a readable .npy file"):
        native.open_npy(path, "x")
    with pytest.raises(FileNotFoundError, match="missing; expected x"):
        native.open_npy(tmp_path / "none.npy", "x")


def test_chunks_cover_the_array(tmp_path):
    path = tmp_path / "a.npy"
    np.save(path, np.arange(23 * 2).reshape(23, 2))
    blocks = list(native.iter_npy_chunks(path, 5))
    assert [s for s, _ in blocks] == [0, 5, 10, 15, 20]
    assert (np.concatenate([b for _, b in blocks]) == np.load(path)).all()


def test_chunks_of_an_empty_array(tmp_path):
    path = tmp_path / "e.npy"
    np.save(path, np.zeros((0, 4, 4, 3)))
    assert list(native.iter_npy_chunks(path, 5)) == []
    assert native.open_npy(path, "x", ndim=4).shape == (0, 4, 4, 3)
