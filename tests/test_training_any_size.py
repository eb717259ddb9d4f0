"""Any dataset size trains for the steps asked (issue #20 item 2) and validation is optional (item 3): the
demo bundle on user folders of one to three 256² training images with batch 8."""

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
from ignite.engine import Events
from monai.bundle import ConfigWorkflow
from PIL import Image

from cellgap.bundle import bundle_name
from cellgap.data import folder
from cellgap.data.fixtures import random_instances, stained_image
from cellgap.data.trainable import UntrainableDataError
from cellgap.encoders import DEMO_ENCODER

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bundles" / bundle_name(DEMO_ENCODER) / "configs"
TINY = {"widths": [8, 8, 8, 16, 16, 16], "head_features": 8, "head_width": 8, "norm": None}


def user_folder(root: Path, splits: list[str], size: int = 256, cells: int = 12, seed: int = 0) -> Path:
    """A raw user folder: one image per entry of ``splits`` (its split), written with a split.csv."""
    rng = np.random.default_rng(seed)
    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    with open(root / "split.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "split"])
        for i, split in enumerate(splits):
            label = random_instances(rng, (size, size), cells, radius=(5, 9))
            Image.fromarray(stained_image(rng, label)).save(root / "images" / f"img{i}.png")
            tifffile.imwrite(root / "labels" / f"img{i}.tif", label.astype(np.uint16))
            writer.writerow([f"img{i}", split])
    (root / "cellgap.json").write_text(json.dumps({"magnification": 40}))
    return root


def prepared(tmp: Path, splits: list[str], **options) -> Path:
    return folder.convert(user_folder(tmp / "raw", splits, **options), tmp / "data", progress=False, workers=1)


def workflow(tmp: Path, data: Path, **overrides) -> ConfigWorkflow:
    settings = {"bundle_root": str(CONFIGS.parent), "meta_file": str(CONFIGS / "metadata.json"), "logging_file": None,
                "encoder_weights": "none", "allow_random_encoder": True, "decoder": TINY, "tile_size": 64,
                "sw_batch_size": 4, "ckpt_dir": str(tmp / "models"), "output_dir": str(tmp / "runs"),
                "dataset": "folder", "dataset_dir": str(data), "num_workers": 0, "train_crop_size": 64,
                "batch_size": 8, "val_batch_size": 2, "learning_rate": 3e-3, "grad_clip_norm": None,
                "augment_prob_scale": 0.0, "seed": 0, **overrides}
    flow = ConfigWorkflow(config_file=str(CONFIGS / "train.json"), workflow_type="train", **settings)
    flow.initialize()
    return flow


def run_collecting_losses(flow: ConfigWorkflow) -> list[float]:
    trainer = flow.parser.get_parsed_content("train#trainer")
    losses = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: losses.append(float(engine.state.output["loss"])))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flow.run()
    return losses


@pytest.mark.parametrize("n_train", [1, pytest.param(2, marks=pytest.mark.heavy), pytest.param(3, marks=pytest.mark.heavy)])
def test_fewer_images_than_the_batch_run_every_step_and_learn(n_train, tmp_path):
    data = prepared(tmp_path, ["train"] * n_train + ["val", "test"])
    flow = workflow(tmp_path, data, epochs=3, epoch_length=2, validation=False)
    losses = run_collecting_losses(flow)
    assert len(losses) == 6  # 3 epochs × 2 steps of 8 crops from 1..3 images
    assert np.mean(losses[-2:]) < np.mean(losses[:2])
    assert (tmp_path / "models" / "model.pt").is_file()


def test_one_pass_of_fewer_tiles_than_the_batch_is_one_full_batch(tmp_path):
    data = prepared(tmp_path, ["train", "train", "val", "test"])
    flow = workflow(tmp_path, data, epochs=1, epoch_length=None, validation=False)
    assert len(run_collecting_losses(flow)) == 1


def test_without_a_val_split_tiles_of_the_training_images_are_held_out(tmp_path, capsys):
    data = prepared(tmp_path, ["train", "test"], size=320)
    flow = workflow(tmp_path, data, epochs=1, epoch_length=1, train_crop_size=128)
    val = flow.parser.get_parsed_content("validate#datalist")
    train = flow.parser.get_parsed_content("train#datalist")
    assert "holding out 2 tile(s)" in capsys.readouterr().out
    assert [Path(v["image"]).name for v in val] == ["img0_val0.png", "img0_val1.png"]
    assert all(Image.open(v["image"]).size == (128, 128) for v in val)
    assert Image.open(train[0]["image"]).size in ((192, 320), (320, 192))
    assert not any("img1" in item["image"] for item in train + val)  # the test image is never touched
    assert len(run_collecting_losses(flow)) == 1
    assert (tmp_path / "models" / "model.pt").is_file()


def test_without_a_val_split_whole_images_are_held_out_from_four_on(tmp_path, capsys):
    data = prepared(tmp_path, ["train"] * 5 + ["test"], size=64)
    flow = workflow(tmp_path, data)
    train, val = flow.parser.get_parsed_content("train_val")
    assert (len(train), len(val)) == (4, 1)
    assert "holding out 1 of the 5 training images" in capsys.readouterr().out
    assert {Path(t["image"]).name for t in train + val} == {f"img{i}.png" for i in range(5)}


def test_no_validation_keeps_the_last_model(tmp_path):
    data = prepared(tmp_path, ["train", "test"])
    flow = workflow(tmp_path, data, epochs=1, epoch_length=1, validation=False)
    assert len(run_collecting_losses(flow)) == 1
    assert (tmp_path / "models" / "model.pt").is_file()
    assert not (tmp_path / "runs" / "holdout").exists()


def test_images_smaller_than_the_crop_stop_before_training(tmp_path):
    data = prepared(tmp_path, ["train", "val", "test"], size=64)
    with pytest.raises(Exception) as error:
        workflow(tmp_path, data, train_crop_size=128).parser.get_parsed_content("train#datalist")
    chain = []
    e = error.value
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    untrainable = [x for x in chain if isinstance(x, UntrainableDataError)]
    assert untrainable, chain
    assert "smaller than the training crop 128×128" in str(untrainable[0]) and "--crop 64" in str(untrainable[0])


def test_labels_without_a_cell_stop_before_training(tmp_path):
    data = prepared(tmp_path, ["train", "val", "test"], cells=0)
    with pytest.raises(UntrainableDataError, match="holds an annotated cell"):
        from cellgap.data.prepared import datalist
        from cellgap.data.trainable import check_trainable

        check_trainable(datalist(data, "train"), 64)


def test_evaluating_the_val_split_reads_the_held_out_share(tmp_path):
    """The minimum-cell-size choice (the study's selection) evaluates eval_split 'val': the held-out tiles."""
    from monai.bundle import ConfigParser

    data = prepared(tmp_path, ["train", "test"], size=320)
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")])
    parser.update({"bundle_root": str(CONFIGS.parent), "dataset": "folder", "dataset_dir": str(data), "tile_size": 64,
                   "train_crop_size": 128, "output_dir": str(tmp_path / "runs"), "eval_split": "val"})
    names = [Path(item["image"]).name for item in parser.get_parsed_content("validate#datalist")]
    assert names == ["img0_val0.png", "img0_val1.png"]
    parser.update({"eval_split": "test"})
    parser.parse()
    assert [Path(item["image"]).name for item in parser.get_parsed_content("validate#datalist")] == ["img1.png"]
