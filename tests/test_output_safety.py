"""Conversions never destroy what the user owns: ``--overwrite`` replaces only a prepared dataset that cellgap
wrote, and one conversion at a time writes to an output (issue #19, items 1 and 4)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cellgap.data.prepared import PreparedWriter, check_replaceable, read_manifest
from cellgap.data.synthetic import generate_tile, synthetic_info
from cellgap.locking import LOCK_NAME, OutputLockedError
from cellgap.testing.fixtures import write_folder

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "prepare_data.py"


def _script(capsys, *args) -> tuple[int, str]:
    """scripts/prepare_data.py run in this process (a subprocess would spend seconds importing): status, stderr."""
    spec = importlib.util.spec_from_file_location("prepare_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    capsys.readouterr()
    status = module.main([str(a) for a in args])
    return status, capsys.readouterr().err


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _write(root: Path, n: int = 2, overwrite: bool = False, inputs=()) -> Path:
    with PreparedWriter(root, synthetic_info(40), overwrite=overwrite, inputs=inputs) as writer:
        for index in range(n):
            tile = generate_tile(index, size=32, magnification=40)
            writer.add(f"t{index}", tile.image, tile.label, tile.classes, split="train")
    return root


def test_overwrite_of_the_folder_holding_the_input_is_refused_and_deletes_nothing(tmp_path, capsys):
    project = tmp_path / "project"
    write_folder(project / "mytiles", n_images=2, size=32, seed=0)
    (project / "thesis.tex").write_text("two years of work")
    before = _files(project)
    status, err = _script(capsys, "folder", "--raw", project / "mytiles", "--out", project, "--overwrite", "--no-progress",
                          "--magnification", "40")
    assert status != 0
    assert "holds the input" in err and str(project) in err
    assert _files(project) == before


@pytest.mark.parametrize("kind", ["unrelated", "parent_of_input"])
def test_overwrite_of_a_folder_cellgap_did_not_write_is_refused(tmp_path, kind):
    target = tmp_path / "stuff"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    inputs = ()
    if kind == "parent_of_input":  # even a prepared dataset: it holds the conversion's input
        _write(tmp_path / "prepared")
        target = tmp_path / "prepared"
        (target / "raw").mkdir()
        inputs = (target / "raw",)
    before = _files(target)
    with pytest.raises(ValueError, match="refusing to overwrite it.*nothing was deleted"):
        _write(target, overwrite=True, inputs=inputs)
    assert _files(target) == before


def test_overwrite_refuses_the_working_directory_and_home(tmp_path, monkeypatch):
    _write(tmp_path / "prepared")
    monkeypatch.chdir(tmp_path / "prepared")
    with pytest.raises(ValueError, match="is the working directory"):
        check_replaceable(tmp_path / "prepared")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "prepared" / "me"))
    with pytest.raises(ValueError, match="contains your home folder"):
        check_replaceable(tmp_path / "prepared")


def test_overwrite_replaces_a_prepared_dataset(tmp_path):
    root = _write(tmp_path / "prepared", n=3)
    _write(root, n=1, overwrite=True)
    assert [r["id"] for r in read_manifest(root)] == ["t0"]
    assert not list(tmp_path.glob(".prepared.*"))  # no lock or replaced folder left beside it


WRITER = """
import sys
from cellgap.data.prepared import PreparedWriter
from cellgap.data.synthetic import generate_tile, synthetic_info
with PreparedWriter(sys.argv[1], synthetic_info(40)) as writer:
    for index in range(3):
        tile = generate_tile(index, size=32, magnification=40)
        writer.add(f"t{index}", tile.image, tile.label, tile.classes, split="train")
        if index == 0:
            print("writing", flush=True)
            sys.stdin.readline()  # the test lets it go on once the second conversion has been refused
"""


def test_a_second_conversion_to_the_same_output_is_refused_and_the_first_completes(tmp_path, capsys):
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, "-c", WRITER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert first.stdout.readline().strip() == "writing"
        with pytest.raises(OutputLockedError, match=f"in use by conversion to {out}.*pid {first.pid}"):
            _write(out)
        status, err = _script(capsys, "synthetic", "--out", out, "--n-train", "2", "--n-val", "1", "--n-test", "1",
                              "--no-progress")
        assert status == 1 and f"in use by conversion to {out}" in err
        assert (tmp_path / "out.partial").is_dir()  # the first one's work, untouched
        first.stdin.write("go\n")
        first.stdin.flush()
        assert first.wait(timeout=60) == 0
    finally:
        first.kill()
        first.wait()
    rows = read_manifest(out)
    assert [r["id"] for r in rows] == ["t0", "t1", "t2"] and all((out / r["image"]).is_file() for r in rows)
    assert not (tmp_path / ".out.lock").exists()


def test_a_dead_conversions_lock_is_taken_over(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.run([sys.executable, "-c", "from cellgap.locking import acquire\n"
                             f"acquire({str(tmp_path / '.out.lock')!r}, 'conversion to {out}')"],
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)  # exits holding it
    assert holder.returncode == 0 and (tmp_path / ".out.lock" / LOCK_NAME).is_file()
    _write(out)
    assert len(read_manifest(out)) == 2 and not (tmp_path / ".out.lock").exists()


def test_a_file_name_that_is_not_utf8_is_named_and_nothing_is_left(tmp_path):
    from cellgap.data import folder

    raw = write_folder(tmp_path / "raw", n_images=2, size=32, seed=0, classes=None)
    odd = os.fsdecode(b"caf\xe9")  # "café" in Latin-1, as an old camera or a Windows share writes it
    for sub, suffix in (("images", ".png"), ("labels", ".tif")):
        first = sorted((raw / sub).iterdir())[0]
        first.rename(raw / sub / f"{odd}{suffix}")
    with pytest.raises(ValueError, match=r"tile 'caf\\\\xe9': its file name is not valid UTF-8.*rename the file"):
        folder.convert(raw, tmp_path / "out", progress=False, magnification=40)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]  # no output, no partial folder, no lock


def test_an_archive_whose_top_folder_is_downloads_is_refused(tmp_path):
    import zipfile

    from cellgap.data import download

    raw = tmp_path / "raw"
    (raw / "downloads").mkdir(parents=True)
    (raw / "downloads" / "checksums.json").write_text('{"fold_1.zip": "abc"}')
    archive = tmp_path / "odd.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("downloads/readme.txt", "the archive's own notes")
        zf.writestr("images/a.png", "x")
    before = _files(raw)
    with pytest.raises(ValueError, match=r"odd\.zip: its top-level 'downloads' would replace .*nothing was extracted"):
        download.extract_archive(archive, raw, progress=False)
    assert _files(raw) == before and not (raw / "images").exists()


def test_a_png_above_the_decompression_bomb_limit_is_named_with_the_fix(tmp_path, monkeypatch):
    from PIL import Image

    from cellgap.data import folder

    raw = write_folder(tmp_path / "raw", n_images=2, size=32, seed=0, classes=None)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a 32² tile is then 10 × the limit, as a slide would be
    first = sorted((raw / "images").iterdir())[0]
    with pytest.raises(ValueError, match=f"{first}: Image size .*cellgap segment.*MAX_IMAGE_PIXELS"):
        folder.convert(raw, tmp_path / "out", progress=False, magnification=40)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_a_conversion_names_the_files_it_cannot_convert_and_converts_the_others(tmp_path, capsys):
    """Issue #19, batch jobs isolate failures: a corrupt image and a label of the wrong size among good tiles."""
    import json

    import numpy as np
    import tifffile
    from PIL import Image

    from cellgap.data import folder
    from cellgap.failures import BatchFailures

    raw = write_folder(tmp_path / "raw", n_images=6, size=32, seed=0, classes=None)
    (raw / "images" / "tile_001.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    tifffile.imwrite(raw / "labels" / "tile_003.tif", np.zeros((16, 32), np.uint16))
    good = ["tile_000", "tile_002", "tile_004", "tile_005"]

    status, err = _script(capsys, "folder", "--raw", raw, "--out", tmp_path / "out", "--no-progress")
    assert status == 3  # non-zero: complete, but not every file was converted
    assert "FAILED images/tile_001.png: " in err and "FAILED labels/tile_003.tif: " in err
    assert "converted 4 of 6 images; 2 failed: images/tile_001.png (" in err and "labels/tile_003.tif (" in err
    assert "label shape (16, 32) does not match image (32, 32)" in err
    out = tmp_path / "out"
    assert sorted(r["id"] for r in read_manifest(out)) == good
    for name in good:  # each good tile converted whole and unchanged
        source = np.asarray(Image.open(raw / "images" / f"{name}.png").convert("RGB"))
        assert np.array_equal(np.asarray(Image.open(out / "images" / f"{name}.png")), source)
    record = json.loads((out / "dataset.json").read_text())["extra"]["conversion_failures"]
    assert [f["file"] for f in record] == ["images/tile_001.png", "labels/tile_003.tif"]
    assert "does not match image" in record[1]["reason"] and record[0]["reason"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "raw"]  # no partial folder, no lock

    # The Python API says the same with BatchFailures once the folder is complete; a clean folder records none.
    with pytest.raises(BatchFailures, match=r"converted 4 of 6 images; 2 failed") as caught:
        folder.convert(raw, tmp_path / "api", progress=False)
    assert caught.value.output == tmp_path / "api" and len(caught.value.failures) == 2
    clean = write_folder(tmp_path / "clean", n_images=2, size=32, seed=1, classes=None)
    info = json.loads((folder.convert(clean, tmp_path / "clean_out", progress=False) / "dataset.json").read_text())
    assert info["extra"]["conversion_failures"] == []


def test_a_conversion_where_every_file_fails_writes_nothing(tmp_path, capsys):
    raw = write_folder(tmp_path / "raw", n_images=2, size=32, seed=0, classes=None)
    for image in (raw / "images").iterdir():
        image.write_bytes(b"not an image")
    status, err = _script(capsys, "folder", "--raw", raw, "--out", tmp_path / "out", "--no-progress")
    assert status == 1 and "none of the 2 image(s) could be converted: images/tile_000.png (" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]
