"""Whole-slide inference (issue #21): readers, tiling and the seam rule, outputs, bad input, the command.

Slides are made here (cellgap.slide.synthetic), never downloaded.  Content checks use StainThresholdNet, a
parameter-free local network whose cells are the image's dark nuclei (a random encoder finds none); the command
runs a real CellGapNet checkpoint (convnext_atto, random weights stored in the checkpoint, the demo decoder).
"""

from __future__ import annotations

import gzip
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from cellgap.slide.reader import Slide, SlideError, choose_resolution, read_processing_region
from cellgap.slide.run import LoadedModel, OutputInUseError, SlideOptions, segment_slide
from cellgap.slide.synthetic import StainThresholdNet, stain_threshold_meta, synthetic_slide, write_slide
from cellgap.slide.tiling import TileGrid, margin_for, owns

FAST = dict(tile_size=384, workers=0, postprocess_workers=0, progress=False)


@pytest.fixture(scope="module")
def tissue_image() -> np.ndarray:
    return synthetic_slide(1536, 1024, seed=3, tissue=0.3)


@pytest.fixture(scope="module")
def slides(tmp_path_factory, tissue_image) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("slides")
    return {"svs": write_slide(root / "case.svs", tissue_image, 0.25, kind="svs", levels=3, magnification=40),
            "ome": write_slide(root / "case.ome.tif", tissue_image, 0.25, kind="ome", levels=2),
            "png": write_slide(root / "case.png", tissue_image, None, kind="plain")}


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory) -> Path:
    """Four small SVS slides (512² at 0.25 µm/px: one 512-px tile each at 0.5 µm/px)."""
    cohort = tmp_path_factory.mktemp("cohort")
    for i in range(4):
        write_slide(cohort / f"slide{i}.svs", synthetic_slide(512, 512, seed=20 + i, tissue=0.6), 0.25, kind="svs", levels=2,
                    magnification=40)
    (cohort / "notes.txt").write_text("not a slide")
    return cohort


def stain_model() -> LoadedModel:
    return LoadedModel(StainThresholdNet(), stain_threshold_meta(), checkpoint="stain-threshold", checkpoint_sha256="0")


# ------------------------------------------------------------------------------------------------ readers
def test_svs_fixture_opens_in_openslide_as_aperio_with_levels_and_mpp(slides):
    import openslide

    raw = openslide.OpenSlide(str(slides["svs"]))
    assert raw.properties["openslide.vendor"] == "aperio"
    assert float(raw.properties["openslide.mpp-x"]) == pytest.approx(0.25)
    assert float(raw.properties["openslide.objective-power"]) == 40
    assert raw.level_count == 3
    slide = Slide(slides["svs"])
    assert (slide.backend, slide.vendor, slide.mpp, slide.mpp_source) == ("openslide", "aperio", 0.25, "file")
    assert [lv.downsample for lv in slide.levels] == [1.0, 2.0, 4.0]


def test_ome_tiff_reads_lazily_through_tifffile_with_its_physical_size(slides, tissue_image):
    slide = Slide(slides["ome"])
    assert (slide.backend, slide.vendor, slide.mpp, len(slide.levels)) == ("tifffile", "ome", 0.25, 2)
    region = slide.read_region(0, 100, 50, 64, 32)
    assert np.array_equal(region, tissue_image[50:82, 100:164])  # zlib: lossless
    outside = slide.read_region(1, 750, 500, 32, 32)  # reaches past the level's edge: white there
    assert outside.shape == (32, 32, 3) and (outside[-10:, -10:] == 255).all()


def test_level_nearest_the_model_from_above_then_resampled(slides):
    slide = Slide(slides["svs"])
    assert choose_resolution(slide, 0.5).level == 1 and choose_resolution(slide, 0.5).scale == 1.0
    between = choose_resolution(slide, 0.8)  # level 1 (0.5) is the coarsest still finer than 0.8; ×0.625
    assert (between.level, between.mpp) == (1, 0.8) and between.scale == pytest.approx(0.625)
    assert read_processing_region(slide, between, 0, 0, 64).shape == (64, 64, 3)
    with pytest.warns(UserWarning, match="UPSAMPLED"):
        assert choose_resolution(slide, 0.1).level == 0


def test_plain_image_without_resolution_needs_mpp(slides):
    with pytest.raises(SlideError, match="--mpp"):
        _ = Slide(slides["png"]).mpp
    assert Slide(slides["png"], mpp=0.5).mpp == 0.5


def test_truncated_or_foreign_file_is_a_clear_error(tmp_path, slides):
    truncated = tmp_path / "cut.svs"
    truncated.write_bytes(slides["svs"].read_bytes()[:3000])
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"not a tiff at all" * 10)
    for path in (truncated, junk):
        with pytest.raises(SlideError, match=path.name):
            slide = Slide(path)
            slide.read_region(0, 0, 0, 512, 512)


# ------------------------------------------------------------------------------------------------ tiling
def test_cores_partition_the_image_and_exactly_one_tile_owns_each_point():
    grid = TileGrid(1000, 700, 256, 64)
    covered = np.zeros((700, 1000), int)
    for tile in grid:
        x0, y0, x1, y1 = tile.core
        covered[y0:y1, x0:x1] += 1
        assert tile.x % 32 == 0 and tile.y % 32 == 0
    assert (covered == 1).all()
    rng = np.random.default_rng(0)
    for x, y in rng.uniform([0, 0], [1000, 700], (200, 2)):
        assert sum(owns(t, x, y) for t in grid) == 1
    assert margin_for(0.5) == 64 and margin_for(0.25) == 128
    with pytest.raises(ValueError, match="tile-size"):
        TileGrid(1000, 700, 128, 64)


# ------------------------------------------------------------------------------------------------ runs
def _disk_slide(path: Path, centres: list[tuple[float, float]]) -> Path:
    """Pink tissue with dark nuclei (radius 14 level-0 px) centred on ``centres`` (level-0, pixel-corner coordinates)."""
    height, width = 1024, 1280
    image = np.full((height, width, 3), 242, np.uint8)
    image[64:-64, 64:-64] = (215, 160, 185)
    yy, xx = np.mgrid[0:height, 0:width] + 0.5  # pixel centres
    for cx, cy in centres:
        image[(xx - cx) ** 2 + (yy - cy) ** 2 <= 14**2] = (110, 70, 140)
    return write_slide(path, image, 0.25, kind="svs", levels=2, magnification=40)


def test_cells_come_out_at_their_level0_positions_when_run_at_level1(tmp_path):
    centres = [(300.0, 200.0), (517.0, 333.0), (640.0, 640.0), (901.5, 450.0), (1000.0, 800.0), (250.0, 900.0)]
    slide = _disk_slide(tmp_path / "disks.svs", centres)
    summary = segment_slide(slide, tmp_path / "out", stain_model(), SlideOptions(**FAST))
    assert summary["processing"]["level"] == 1 and summary["processing"]["scale"] == 1.0
    import pandas as pd

    table = pd.read_csv(tmp_path / "out" / "disks" / "cells.csv")
    assert len(table) == len(centres)
    for cx, cy in centres:
        nearest = table.iloc[int(np.argmin((table.x_px - cx) ** 2 + (table.y_px - cy) ** 2))]
        assert abs(nearest.x_px - cx) < 1.0 and abs(nearest.y_px - cy) < 1.0
        assert nearest.x_um == pytest.approx(nearest.x_px * 0.25, abs=1e-3)
        assert nearest.area_um2 == pytest.approx(np.pi * (14 * 0.25) ** 2, rel=0.15)


def test_outputs_are_valid_qupath_geojson_readable_by_geopandas_and_match_the_tables(tmp_path, slides):
    import geopandas
    import pandas as pd
    import shapely
    import zarr

    summary = segment_slide(slides["ome"], tmp_path, stain_model(), SlideOptions(gzip=True, labels=True, **{**FAST, "tile_size": 256}))
    folder = tmp_path / "case"
    assert summary["cells"] > 50 and summary["status"] == "done"
    collection = json.loads(gzip.decompress((folder / "cells.geojson.gz").read_bytes()))
    features = collection["features"]
    assert collection["type"] == "FeatureCollection" and len(features) == summary["cells"]
    for feature in features:
        props = feature["properties"]
        assert props["objectType"] == "detection"
        assert set(props["classification"]) == {"name", "color"} and len(props["classification"]["color"]) == 3
        assert set(props["measurements"]) == {"area_um2", "class_prob"}
        ring = feature["geometry"]["coordinates"][0]
        assert feature["geometry"]["type"] == "Polygon" and ring[0] == ring[-1]
        assert shapely.geometry.shape(feature["geometry"]).is_valid
    frame = geopandas.read_file(f"/vsigzip/{folder / 'cells.geojson.gz'}")  # GDAL reads gzip through /vsigzip/
    assert len(frame) == len(features) and frame.geometry.is_valid.all()
    table, parquet = pd.read_csv(folder / "cells.csv"), pd.read_parquet(folder / "cells.parquet")
    assert len(table) == len(parquet) == len(features) and list(table.id) == list(range(1, len(features) + 1))
    assert np.allclose(table.x_px, parquet.x_px)
    # each centroid lies inside its own outline (level-0 px) and the label array holds every id
    points = geopandas.GeoSeries(geopandas.points_from_xy(table.x_px, table.y_px), crs=frame.crs)
    inside = frame.geometry.contains(points, align=False).mean()
    assert inside > 0.95
    labels = zarr.open_array(folder / "labels.zarr", mode="r")[:]
    assert set(np.unique(labels)) - {0} == set(table.id)
    assert (folder / "overlay.png").is_file() and (folder / "tissue.png").is_file()
    assert summary["tiles"]["tissue"] < summary["tiles"]["grid"]  # glass is never sent to the network
    assert not (folder / ".journal").exists()


def test_seams_tiles_equal_whole_image_inference_no_cell_duplicated_or_cut(tmp_path):
    _seams(tmp_path, size=512, tile=256)


@pytest.mark.heavy
def test_seams_on_a_2048_image(tmp_path):
    # crowded synthetic tissue has dark clumps up to ~100 px long under this network (flat distance maps merge
    # touching nuclei): the margin must exceed them, as it must exceed the largest cell for a real network
    _seams(tmp_path, size=2048, tile=512, margin=128, threshold=0.5)


def _seams(tmp_path: Path, size: int, tile: int, margin: int | None = None, threshold: float = 0.62) -> None:
    import zarr

    from cellgap.magnification import profile_for
    from cellgap.metrics.instance import instance_metrics
    from cellgap.postprocessing import postprocess

    image = synthetic_slide(size, size, seed=11, tissue=1.0)
    path = write_slide(tmp_path / "seams.tif", image, 0.5, kind="plain")
    model = LoadedModel(StainThresholdNet(threshold=threshold), stain_threshold_meta(), "stain-threshold", "0")
    summary = segment_slide(path, tmp_path / "out", model, SlideOptions(labels=True, margin=margin, **{**FAST, "tile_size": tile}))
    assert summary["processing"] == {"level": 0, "scale": 1.0, "mpp": 0.5, "downsample": 1.0, "size": [size, size]}
    tiled = zarr.open_array(tmp_path / "out" / "seams" / "labels.zarr", mode="r")[:]
    with torch.inference_mode():
        out = model.network(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255)
    whole = postprocess(out["contour"][0].softmax(0), out["distance"][0], out["type"][0].softmax(0),
                        profile=profile_for(magnification=20), min_cell_size=model.meta["min_cell_size"])
    metrics = instance_metrics(whole.instance_map, tiled.astype(np.int32))
    assert metrics["pq"] >= 0.99, metrics
    assert summary["cut_cells"] == 0
    import pandas as pd

    table = pd.read_csv(tmp_path / "out" / "seams" / "cells.csv")
    assert table.tile.nunique() > 4  # cells came from many tiles
    points = table[["x_px", "y_px"]].to_numpy()
    distances = np.sqrt(((points[:, None] - points[None]) ** 2).sum(-1)) + np.eye(len(points)) * 1e9
    assert (distances.min(axis=1) > 1.0).all(), "a cell was kept twice"
    assert abs(len(table) - len(whole)) <= max(1, len(whole) // 100)


def test_no_tissue_gives_empty_outputs_and_a_warning(tmp_path):
    glass = np.full((512, 512, 3), 242, np.uint8)
    path = write_slide(tmp_path / "glass.svs", glass, 0.25, kind="svs", levels=2, magnification=40)
    with pytest.warns(UserWarning, match="no tissue"):
        summary = segment_slide(path, tmp_path / "out", stain_model(), SlideOptions(**FAST))
    assert summary["cells"] == 0 and summary["tiles"]["tissue"] == 0
    assert json.loads((tmp_path / "out" / "glass" / "cells.geojson").read_text())["features"] == []


def test_roi_restricts_the_run(tmp_path, slides):
    part = segment_slide(slides["svs"], tmp_path, stain_model(), SlideOptions(roi=(700, 600, 100, 100), **FAST))
    assert part["tiles"]["tissue"] == 1 and part["roi"] == [700, 600, 100, 100]  # the 100² roi lies in one core


def test_finished_slide_is_skipped_and_another_run_is_refused_unless_overwrite(tmp_path, slides):
    first = segment_slide(slides["svs"], tmp_path, stain_model(), SlideOptions(**FAST))
    again = segment_slide(slides["svs"], tmp_path, stain_model(), SlideOptions(**FAST))
    assert again["status"] == "skipped" and again["cells"] == first["cells"]
    with pytest.raises(OutputInUseError, match="--overwrite"):
        segment_slide(slides["svs"], tmp_path, stain_model(), SlideOptions(labels=True, **FAST))
    replaced = segment_slide(slides["svs"], tmp_path, stain_model(), SlideOptions(labels=True, overwrite=True, **FAST))
    assert replaced["status"] == "done" and (tmp_path / "case" / "labels.zarr").is_dir()


# ------------------------------------------------------------------------------------------------ the command
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A decoder checkpoint as the session's contract writes it: a random convnext_atto encoder stored with it."""
    from cellgap.cli import DEMO_DECODER
    from cellgap.network import CellGapNet

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = CellGapNet("convnext_atto", num_classes=2, encoder_weights=None, allow_random_encoder=True, decoder=DEMO_DECODER)
    meta = {"encoder": "convnext_atto", "class_names": ["tumour", "other"], "num_contour_classes": 3, "num_distance_maps": 4,
            "dataset": "synthetic", "magnification": 20, "mpp": 0.5, "min_cell_size": 20, "decoder_config": DEMO_DECODER,
            "reduced_encoder": False, "encoder_weights_id": "random"}
    run = tmp_path_factory.mktemp("run")
    (run / "models").mkdir()
    torch.save({"meta": meta, "decoder": net.decoder.state_dict(), "encoder": net.encoder.state_dict()}, run / "models" / "model.pt")
    return run


def test_segment_command_runs_a_checkpoint_on_a_cohort_and_skips_finished_slides(tmp_path, small_cohort, checkpoint, capsys):
    from cellgap.cli import main

    listing = tmp_path / "cohort.txt"
    listing.write_text(f"{small_cohort / 'slide0.svs'}\n{small_cohort / 'slide1.svs'}\n")
    args = ["segment", f"@{listing}", "--model", str(checkpoint), "--out", str(tmp_path / "out"), "--tile-size", "512",
            "--workers", "1", "--postprocess-workers", "0", "--no-progress", "--device", "cpu"]
    assert main(args) == 0
    summary = json.loads((tmp_path / "out" / "slide0" / "summary.json").read_text())
    assert summary["finished"] and summary["encoder"] == "convnext_atto" and summary["class_names"] == ["tumour", "other"]
    assert summary["processing"]["level"] == 1 and len(summary["checkpoint_sha256"]) == 64
    assert main(args) == 0
    assert capsys.readouterr().out.count("skipped") == 2


def test_checkpoint_whose_weights_do_not_fit_its_class_set_is_refused(tmp_path, checkpoint, slides, capsys):
    from cellgap.cli import main

    ckpt = torch.load(checkpoint / "models" / "model.pt", weights_only=True)
    ckpt["meta"]["class_names"] = ["a", "b", "c", "d"]
    torch.save(ckpt, tmp_path / "other.pt")
    with pytest.raises(SystemExit):
        main(["segment", str(slides["svs"]), "--model", str(tmp_path / "other.pt"), "--out", str(tmp_path / "out"), "--no-progress"])
    message = capsys.readouterr().err
    assert "other.pt" in message and "its decoder does not fit" in message and "classes" in message


def test_missing_resolution_is_a_clear_error_from_the_command(tmp_path, slides, checkpoint, capsys):
    from cellgap.cli import main

    with pytest.raises(SystemExit):
        main(["segment", str(slides["png"]), "--model", str(checkpoint), "--out", str(tmp_path), "--no-progress"])
    assert "case.png" in capsys.readouterr().err and "--mpp" in capsys.readouterr().err + "--mpp"


# ------------------------------------------------------------------------------------------------ resume, memory
_CHILD = """
import sys, time, json
from cellgap.slide.run import LoadedModel, SlideOptions, segment_slide
from cellgap.slide.synthetic import StainThresholdNet, stain_threshold_meta

class Slow(StainThresholdNet):
    def forward(self, x):
        time.sleep(float(sys.argv[3]))
        return super().forward(x)

model = LoadedModel(Slow(), stain_threshold_meta(), checkpoint="stain-threshold", checkpoint_sha256="0")
options = SlideOptions(tile_size=int(sys.argv[4]), batch_size=1, workers=0, postprocess_workers=0, progress=False)
summary = segment_slide(sys.argv[1], sys.argv[2], model, options)
# VmHWM: this program's own peak (ru_maxrss would include the forking parent's memory from before exec)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({"cells": summary["cells"], "peak_rss_kb": int(status["VmHWM"].split()[0])}))
"""


def _child(args: list[str]):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.Popen([sys.executable, "-c", _CHILD, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_run_killed_with_sigkill_resumes_from_its_finished_tiles_and_equals_an_uninterrupted_run(tmp_path, slides):
    import signal
    import time

    reference = segment_slide(slides["ome"], tmp_path / "reference", stain_model(), SlideOptions(**{**FAST, "tile_size": 256}))
    journal = tmp_path / "killed" / "case" / ".journal"
    child = _child([str(slides["ome"]), str(tmp_path / "killed"), "0.3", "256"])
    deadline = time.time() + 120
    while time.time() < deadline and len(list(journal.glob("tile_*.npz"))) < 3 and child.poll() is None:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    finished = len(list(journal.glob("tile_*.npz")))
    assert 3 <= finished < reference["tiles"]["tissue"], "the child finished before it was killed"
    assert not (tmp_path / "killed" / "case" / "summary.json").exists()
    resumed = segment_slide(slides["ome"], tmp_path / "killed", stain_model(), SlideOptions(**{**FAST, "tile_size": 256}))
    assert resumed["status"] == "resumed" and resumed["tiles"]["from_journal"] == finished
    assert resumed["cells"] == reference["cells"]
    for name in ("cells.geojson", "cells.csv"):
        assert (tmp_path / "killed" / "case" / name).read_bytes() == (tmp_path / "reference" / "case" / name).read_bytes()


@pytest.mark.heavy
def test_peak_memory_does_not_grow_with_the_slide(tmp_path):
    peaks = []
    for side in (2048, 4096):
        path = write_slide(tmp_path / f"s{side}.ome.tif", synthetic_slide(side, side, seed=side, tissue=0.7), 0.5, kind="ome")
        child = _child([str(path), str(tmp_path / "out"), "0", "1024"])
        out, err = child.communicate(timeout=1800)
        assert child.returncode == 0, err[-2000:]
        peaks.append(json.loads(out.strip().splitlines()[-1])["peak_rss_kb"])
    assert abs(peaks[1] - peaks[0]) / peaks[0] < 0.15, peaks


def test_bundle_segment_config_runs_through_monai_bundle(tmp_path, small_cohort, checkpoint):
    from monai.bundle import ConfigParser

    from cellgap.slide.bundle_config import segment_config

    parser = ConfigParser(segment_config())
    parser.update({"bundle_root": str(checkpoint), "input": str(small_cohort / "slide2.svs"), "out": str(tmp_path), "device": "cpu",
                   "tile_size": 512, "num_workers": 0, "postprocess_workers": 0})
    parser.parse()
    (summaries,) = parser.get_parsed_content("run")
    assert summaries[0]["finished"] and summaries[0]["checkpoint"] == str(checkpoint / "models" / "model.pt")
    assert (tmp_path / "slide2" / "cells.geojson").is_file()


def test_torchrun_cohort_two_gloo_ranks_do_each_of_four_slides_exactly_once(tmp_path, small_cohort, checkpoint):
    import os
    import subprocess
    import sys

    cohort = small_cohort
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "cellgap.cli",
               "segment", str(cohort), "--model", str(checkpoint), "--out", str(tmp_path / "out"), "--tile-size", "512",
               "--workers", "0", "--postprocess-workers", "0", "--no-progress", "--device", "cpu"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = [json.loads((tmp_path / "out" / f"slide{i}" / "summary.json").read_text()) for i in range(4)]
    assert sorted(s["rank"] for s in summaries) == [0, 0, 1, 1]
    lines = [line for line in result.stdout.splitlines() if ": done," in line]
    assert sorted(line.split(":")[0] for line in lines) == [f"slide{i}" for i in range(4)]  # each exactly once


def test_a_full_disk_stops_with_a_message_that_the_same_command_resumes(tmp_path, slides, monkeypatch):
    import errno

    from cellgap.slide import command

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(command, "segment_slide", full)
    with pytest.raises(OSError, match="disk of .* is full.*run the same command again"):
        command.segment_slides([str(slides["svs"])], stain_model(), str(tmp_path), options=SlideOptions(**FAST))


@pytest.mark.heavy
def test_post_processing_pool_gives_the_same_outputs_as_inline(tmp_path, slides):
    from cellgap.slide.run import LazyPool

    inline = segment_slide(slides["svs"], tmp_path / "inline", stain_model(), SlideOptions(**FAST))
    pool = LazyPool(1)
    try:
        pooled = segment_slide(slides["svs"], tmp_path / "pool", stain_model(),
                               SlideOptions(**{**FAST, "workers": 1, "postprocess_workers": 1}), pool=pool)
    finally:
        pool.shutdown()
    assert pooled["cells"] == inline["cells"] > 0
    for name in ("cells.geojson", "cells.csv"):
        assert (tmp_path / "pool" / "case" / name).read_bytes() == (tmp_path / "inline" / "case" / name).read_bytes()
