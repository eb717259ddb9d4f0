"""Dataset registry, prepare_dataset and the prepare_data.py command line."""

import importlib.util
import zipfile
from pathlib import Path

import pytest

from cellgap.data import cytodark0
from cellgap.data.download import Source
from cellgap.data.fixtures import write_native
from cellgap.data.prepared import datalist, read_dataset_info, read_manifest
from cellgap.data.registry import DATASETS, get, prepare_dataset, protocol_of

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "prepare_data.py"


def load_cli():
    spec = importlib.util.spec_from_file_location("prepare_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_names():
    assert set(DATASETS) == {"synthetic", "pannuke", "conic", "cytodark0", "folder"}
    with pytest.raises(ValueError, match="expected one of"):
        get("lizard")


# name → (fixture options, converter options, expected class count, expected magnification)
CASES = {
    "pannuke": ({"tiles_per_fold": (3, 3, 3), "size": 32}, {}, 5, 40),
    "conic": ({"sources_per_cohort": 2, "patches_per_source": 1, "size": 32}, {}, 6, 20),
    "cytodark0": ({"image_ids": (1, 5, 54, 62), "size": 128, "smaller_tier": None, "cells": (3, 8)}, {"tile_size": 64}, 1, 20),
    "folder": ({"size": 32}, {}, 2, 40),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_prepare_each_native_dataset(name, tmp_path):
    fixture, options, n_classes, mag = CASES[name]
    raw = write_native(name, tmp_path / "raw", **fixture)
    out = prepare_dataset(name, raw, tmp_path / "prepared", progress=False, **options)
    info = read_dataset_info(out)
    assert (info.num_classes, info.magnification) == (n_classes, mag)
    items = datalist(out, "train")
    assert items and all(Path(i["image"]).is_file() and Path(i["label"]).is_file() and Path(i["classes"]).is_file() for i in items)
    assert protocol_of(out)["column"] == "split"


def test_prepare_synthetic(tmp_path):
    out = prepare_dataset("synthetic", None, tmp_path / "syn", n_train=2, n_val=1, n_test=1, size=64, progress=False)
    assert len(read_manifest(out)) == 4


def test_prepare_from_a_local_archive(tmp_path, monkeypatch):
    raw = write_native("cytodark0", tmp_path / "fixture", image_ids=(1, 5), size=64, smaller_tier=None, cells=(2, 4))
    archive = tmp_path / "cytoDArk0.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(raw.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(raw).as_posix())
    monkeypatch.setattr(cytodark0, "SOURCES", (Source("cytoDArk0.zip", None, None),))  # fixture ≠ release hash
    out = prepare_dataset("cytodark0", archive, tmp_path / "cd", tile_size=None, progress=False)
    assert (tmp_path / "cd_raw" / "cytoDArk0" / "20x" / "64x64" / "image").is_dir()
    assert len(read_manifest(out)) == 2


def test_missing_raw_folder_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="--download"):
        prepare_dataset("conic", tmp_path / "nothing", tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="no downloadable files"):
        prepare_dataset("folder", tmp_path / "nothing", tmp_path / "out", download=True, progress=False)


def test_protocol_of_unknown_protocol(tmp_path):
    raw = write_native("conic", tmp_path / "raw", sources_per_cohort=2, patches_per_source=1, size=32)
    out = prepare_dataset("conic", raw, tmp_path / "out", progress=False)
    assert protocol_of(out, "cisca")["column"] == "split"
    with pytest.raises(ValueError, match=r"protocol 'official1' not available; expected one of \['cisca'\]"):
        protocol_of(out, "official1")


def test_command_line(tmp_path, capsys):
    cli = load_cli()
    raw = write_native("folder", tmp_path / "raw", size=32, split=True)
    assert cli.main(["folder", "--raw", str(raw), "--out", str(tmp_path / "out"), "--no-progress", "--magnification", "20"]) == 0
    printed = capsys.readouterr().out
    assert "my_tiles, 6 tiles, 2 class(es) ['tumour', 'immune'], 20x / 0.5 µm/px" in printed
    assert "split: train 4, val 1, test 1" in printed
    assert cli.main(["folder", "--raw", str(raw), "--out", str(tmp_path / "out"), "--no-progress"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert cli.main(["conic", "--raw", str(raw), "--out", str(tmp_path / "x"), "--metadata", "a.csv"]) == 2
    assert "--metadata do(es) not apply to conic" in capsys.readouterr().err


# ------------------------------------------------------------------ the registry holds each dataset's facts once
def test_every_spec_holds_its_facts_and_finds_its_converter():
    from cellgap.data.registry import STAIN_KINDS

    for name, spec in DATASETS.items():
        assert spec.name == name and spec.stain in STAIN_KINDS
        assert callable(spec.info) and callable(spec.convert)
        assert (spec.download is None) == (name in ("synthetic", "folder"))
        if spec.class_names is None:
            continue
        for mag, mpp in spec.mpp.items():
            info = spec.info(magnification=mag) if len(spec.mpp) > 1 else spec.info()
            assert (info.class_names, info.magnification, info.mpp) == (spec.class_names, mag, mpp)
            assert info.min_cell_size == spec.min_cell_size[mag]
            assert info.extra["protocol"] == spec.default_protocol and "lab_stats" not in info.extra
            for p in spec.protocols:
                table = info.extra["protocols"][p.name]
                assert (table["column"], table["empty_policy"]) == (p.column, p.empty_policy)


def test_metric_presets_come_from_the_protocols():
    assert [get("pannuke").metric_preset(p) for p in (None, "official2", "cisca")] == ["pannuke", "pannuke", "cisca"]
    assert get("conic").metric_preset(None) == get("cytodark0").metric_preset("zenodo") == "cisca"
    assert get("folder").metric_preset(None) == get("synthetic").metric_preset("anything") == "custom"
    with pytest.raises(ValueError, match="protocol: expected one of"):
        get("pannuke").metric_preset("official9")


def test_stain_statistics_and_oversampling_are_read_from_the_registry():
    from cellgap.data.augmentation import STAIN_STATISTICS, stain_statistics
    from cellgap.data.sampling import OVERSAMPLING_PRESETS

    for name, spec in DATASETS.items():
        if spec.stain_statistics is None:
            assert spec.stain_stats() == "he" and name not in STAIN_STATISTICS
        else:
            assert spec.stain_stats() == name
            assert stain_statistics(name).mean_mu == spec.stain_statistics["mean_mu"]
        assert OVERSAMPLING_PRESETS.get(name, {}) == dict(spec.oversampling)
    assert get("cytodark0").stain == "nissl"


def test_magnification_is_parsed_in_one_place():
    from cellgap.magnification import parse_magnification, profile_for

    assert parse_magnification("40x") == parse_magnification(" 40X ") == parse_magnification(40) == 40.0
    assert profile_for(magnification="20x") is profile_for(magnification=20)
    for bad in ("forty", "0x", -20):
        with pytest.raises(ValueError, match="magnification"):
            parse_magnification(bad)
