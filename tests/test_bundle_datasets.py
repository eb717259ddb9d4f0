"""Each real dataset, from tiny files in its native format, through its converter and one training step of
a bundle: the dataset choice is one config override, and its facts reach the network and the metrics."""

import warnings
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser, run

from cellgap import targets
from cellgap.bundle import bundle_name
from cellgap.data import loading
from cellgap.data.fixtures import write_native
from cellgap.data.packed import pack_dataset
from cellgap.data.prepared import read_dataset_info
from cellgap.data.registry import prepare_dataset
from cellgap.encoders import DEMO_ENCODER

CONFIGS = Path(__file__).resolve().parents[1] / "bundles" / bundle_name(DEMO_ENCODER) / "configs"
TINY = {"widths": [8, 8, 8, 16, 16, 16], "head_features": 8, "head_width": 8, "norm": None}

NATIVE = {
    "pannuke": ({"tiles_per_fold": (4, 4, 4)}, {}),
    "conic": ({"sources_per_cohort": 2, "patches_per_source": 2}, {}),
    "cytodark0": ({"size": 128, "smaller_tier": None}, {"tile_size": 64}),
    "folder": ({"n_images": 8, "split": True}, {"magnification": 40}),
}


def convert(name: str, tmp_path: Path) -> Path:
    writer_options, convert_options = NATIVE[name]
    raw = write_native(name, tmp_path / "raw", **writer_options)
    return prepare_dataset(name, raw, tmp_path / "prepared", progress=False, **convert_options)


@pytest.mark.parametrize("name", sorted(NATIVE))
def test_native_files_convert_and_train_one_step(name, tmp_path):
    train_one_step(name, convert(name, tmp_path), tmp_path)


def test_cytodark0_full_images_and_their_tiles_pack_and_train(tmp_path, monkeypatch):
    """CytoDArk0 holds full-size images (training, random crops) and their tiles (validation): the pack
    keeps one folder per size, and a training step with validation reads every tile from it."""
    prepared = convert("cytodark0", tmp_path)
    folder = pack_dataset(prepared, progress=False)
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["128x128", "64x64"]

    def not_here(path):
        raise AssertionError(f"{path}: decoded although the pack holds it")

    monkeypatch.setattr(loading, "read_image", not_here)
    train_one_step("cytodark0", prepared, tmp_path)


def train_one_step(name: str, prepared: Path, tmp_path: Path) -> None:
    info = read_dataset_info(prepared)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run(config_file=str(CONFIGS / "train.json"), meta_file=str(CONFIGS / "metadata.json"), logging_file=False,
            bundle_root=str(CONFIGS.parent), dataset=name, dataset_dir=str(prepared), encoder_weights="none",
            allow_random_encoder=True, decoder=TINY, tile_size=64, epochs=1, epoch_length=1, batch_size=2, val_batch_size=2,
            num_workers=0, ckpt_dir=str(tmp_path / "models"), output_dir=str(tmp_path / "runs"))
    meta = torch.load(tmp_path / "models" / "model.pt", weights_only=True)["meta"]
    assert meta["class_names"] == list(info.class_names)
    assert meta["magnification"] == info.magnification and meta["min_cell_size"] == info.cell_size
    head = [k for k in torch.load(tmp_path / "models" / "model.pt", weights_only=True)["decoder"] if k.startswith("type_head")]
    assert bool(head) == (info.num_classes > 1)  # single-class data builds no type head


def test_bundle_training_pipeline_uses_the_packed_contour_levels(tmp_path, monkeypatch):
    """On a packed dataset the bundle's train#preprocessing takes each tile's contour levels from the pack
    and moves them through the augmentation: contour_levels is never computed per sample."""
    raw = write_native("folder", tmp_path / "raw", n_images=8, split=True)
    prepared = prepare_dataset("folder", raw, tmp_path / "prepared", progress=False, magnification=40)
    pack_dataset(prepared, progress=False)
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser.read_meta(str(CONFIGS / "metadata.json"))
    parser.update({"bundle_root": str(CONFIGS.parent), "dataset": "folder", "dataset_dir": str(prepared),
                   "encoder_weights": "none", "allow_random_encoder": True, "decoder": TINY, "tile_size": 64})
    preprocessing = parser.get_parsed_content("train#preprocessing")
    items = parser.get_parsed_content("train#datalist")

    def not_here(*args, **kwargs):
        raise AssertionError("contour levels recomputed although the pack holds them")

    monkeypatch.setattr(targets, "contour_levels", not_here)
    for item in items[:4]:
        sample = preprocessing(item)
        assert tuple(sample["contour_target"].shape) == (1, 64, 64) and "contour_levels" not in sample
