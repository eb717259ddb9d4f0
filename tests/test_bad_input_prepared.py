"""Bad input to the prepared layout, its pack and prepare_data.py: dataset facts of the wrong type, damaged
manifests and pack indexes, an output path that is a file or a folder of someone else's, and a conversion
stopped by SIGTERM. Each stops with an error naming the file, line or field, and leaves nothing behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cellgap.data.loading import LoadTiled
from cellgap.data.packed import pack_dataset
from cellgap.data.prepared import MANIFEST, PARTIAL_MARK, DatasetInfo, PreparedWriter, datalist, read_dataset_info
from cellgap.data.synthetic import generate_tile, synthetic_info

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "prepare_data.py"
FACTS = {"name": "mine", "class_names": ["tumour"], "magnification": 40, "mpp": 0.25}


def write(root: Path, n: int = 3) -> Path:
    with PreparedWriter(root, synthetic_info(40)) as writer:
        for index in range(n):
            tile = generate_tile(index, size=32, magnification=40)
            writer.add(f"t{index}", tile.image, tile.label, tile.classes, split="train")
    return root


@pytest.mark.parametrize("field, value, expected", [
    ("class_names", "tumour", "class_names must be a list naming at least one cell class, got 'tumour'"),
    ("class_names", ["a", "a"], "class_names must be distinct non-empty names"),
    ("class_names", ["a", ""], "class_names must be distinct non-empty names"),
    ("magnification", -40, "magnification must be a positive number, got -40"),
    ("mpp", 0, "mpp must be a positive number, got 0"),
    ("mpp", "0.25", "mpp must be a positive number, got '0.25'"),
    ("min_cell_size", "fifty", "min_cell_size must be a whole number of pixels ≥ 1 (or null for the default), got 'fifty'"),
    ("min_cell_size", 0, "min_cell_size must be a whole number of pixels ≥ 1"),
])
def test_dataset_facts_of_the_wrong_type_name_the_file_and_field(tmp_path, field, value, expected):
    root = write(tmp_path / "d")
    (root / "dataset.json").write_text(json.dumps({**FACTS, field: value}))
    with pytest.raises(ValueError) as error:
        read_dataset_info(root)
    assert str(error.value).startswith(f"{root / 'dataset.json'}: dataset 'mine': ")
    assert expected in str(error.value)
    with pytest.raises(ValueError, match="must be"):
        DatasetInfo(**{**FACTS, field: value})


@pytest.mark.parametrize("edit, expected", [
    (lambda lines: lines[:2] + ["t1,images/t1.png"] + lines[3:], "line 3: fewer cells than the 6 columns"),
    (lambda lines: lines[:2] + [lines[2] + ",extra"] + lines[3:], "line 3: more cells than the 6 columns"),
    (lambda lines: lines[:2] + [lines[2].replace("images/t1.png", "")] + lines[3:], "line 3: empty image"),
    (lambda lines: lines + [lines[1]], "line 5: tile id 't0' already on line 2"),
])
def test_a_damaged_manifest_names_its_line(tmp_path, edit, expected):
    root = write(tmp_path / "d")
    manifest = root / MANIFEST
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join(edit(lines)) + "\n")
    for read in (datalist, pack_dataset):
        with pytest.raises(ValueError, match=f"^{manifest}, {expected}"):
            read(root)
    assert not (root / "packed").exists() and not (root / "packed.partial").exists()


def test_an_output_path_that_is_a_file_is_refused_before_any_work(tmp_path):
    out = tmp_path / "out"
    out.write_text("not a folder")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="exists and is not a folder"):
            PreparedWriter(out, synthetic_info(40), overwrite=overwrite).__enter__()
    assert out.read_text() == "not a folder" and not (tmp_path / "out.partial").exists()


def test_a_partial_folder_is_removed_only_when_cellgap_left_it(tmp_path):
    partial = tmp_path / "out.partial"
    partial.mkdir()
    (partial / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="was not left by a cellgap conversion"):
        write(tmp_path / "out")
    assert (partial / "notes.txt").read_text() == "mine"
    (partial / "notes.txt").unlink()
    (partial / PARTIAL_MARK).touch()  # as a killed conversion leaves it
    root = write(tmp_path / "out")
    assert not partial.exists() and not (root / PARTIAL_MARK).exists() and len(datalist(root)) == 3


@pytest.mark.parametrize("damage, expected", [
    (lambda index: index.pop("sources"), r"damaged packed index \(KeyError: 'sources'\)"),
    (lambda index: index["places"].__setitem__(0, [0, 99]), r"damaged packed index \(3 tiles, 3 places, rows \[0\] outside"),
    (lambda index: index["places"].pop(), r"damaged packed index \(3 tiles, 2 places"),
])
def test_a_damaged_pack_index_names_the_file_and_the_fix(tmp_path, damage, expected):
    root = write(tmp_path / "d")
    folder = pack_dataset(root, progress=False)
    index = json.loads((folder / "index.json").read_text())
    damage(index)
    (folder / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"^{folder / 'index.json'}: {expected}.*pack the dataset again"):
        LoadTiled(num_classes=3)(datalist(root)[0])


def test_sigterm_stops_a_conversion_without_leftovers(tmp_path):
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, str(SCRIPT), "synthetic", "--out", str(out), "--n-train", "400",
                                "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    partial = tmp_path / "out.partial"
    deadline = time.monotonic() + 60
    while not (partial / "images").is_dir() or not any((partial / "images").iterdir()):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    assert not out.exists() and not partial.exists(), os.listdir(tmp_path)
