"""The generated MONAI bundles: committed files match the generator, and train / evaluate / inference run
through ``monai.bundle`` on a tiny synthetic dataset."""

import csv
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from monai.bundle import ConfigParser, ConfigWorkflow, run
from PIL import Image

from cellgap.bundle import PINNED, bundle_name, render_bundle
from cellgap.data.device_augmentation import BatchPhotometricAugmentation
from cellgap.encoders import DEMO_ENCODER, ENCODERS
from cellgap.targets import BACKGROUND_WEIGHT
from cellgap.testing.errors import message_chain

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "bundles" / bundle_name(DEMO_ENCODER)
CONFIGS = DEMO / "configs"
TINY = {"widths": [8, 8, 8, 16, 16, 16], "head_features": 8, "head_width": 8, "norm": None}


def test_committed_bundles_match_the_generator():
    committed = sorted(p.name for p in (ROOT / "bundles").iterdir() if p.is_dir())
    assert committed == sorted(bundle_name(k) for k in ENCODERS)
    for key in ENCODERS:
        for rel, text in render_bundle(key).items():
            path = ROOT / "bundles" / bundle_name(key) / rel
            assert path.is_file(), f"{path} missing: run scripts/build_bundles.py"
            assert path.read_text(encoding="utf-8") == text, f"{path} differs from the generator: run scripts/build_bundles.py"


def test_metadata_pins_match_requirements():
    pins = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==([^\s#]+)", (ROOT / "requirements.txt").read_text(), re.M))
    for name, version in PINNED.items():
        assert pins.get(name) == version, f"{name}: bundle metadata pins {version}, requirements.txt {pins.get(name)}"


def _common(tmp: Path, **extra) -> dict:
    return {"bundle_root": str(DEMO), "meta_file": str(CONFIGS / "metadata.json"), "logging_file": False,
            "encoder_weights": "none", "allow_random_encoder": True, "decoder": TINY, "tile_size": 64, "sw_batch_size": 2,
            "ckpt_dir": str(tmp / "models"), "output_dir": str(tmp / "runs"), "dataset_dir": str(tmp / "data"),
            "num_workers": 0, "synthetic": {"n_train": 4, "n_val": 2, "n_test": 2, "seed": 0, "magnification": 40, "size": 64},
            **extra}



def _quiet_run(configs, **overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run(config_file=[str(CONFIGS / c) for c in configs], **overrides)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bundle")
    _quiet_run(["train.json"], epochs=2, epoch_length=2, batch_size=2, val_batch_size=2, **_common(tmp))
    return tmp


def test_train_writes_checkpoint_and_tensorboard(trained):
    ckpt = torch.load(trained / "models" / "model.pt", weights_only=True)
    assert ckpt["meta"]["encoder"] == DEMO_ENCODER and ckpt["meta"]["class_names"] == ["tumour", "lymphocyte", "stromal"]
    assert ckpt["meta"]["magnification"] == 40 and any(k.startswith("contour_head") for k in ckpt["decoder"])
    assert not any(k.startswith("encoder") for k in ckpt["decoder"])  # the frozen encoder is not saved
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = {"scalars": set(), "images": set()}
    waits = []
    for events in (trained / "runs").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for kind in tags:
            tags[kind] |= set(acc.Tags()[kind])
        if "data_wait_share" in acc.Tags()["scalars"]:
            waits += [(e.step, e.value) for e in acc.Scalars("data_wait_share")]
    assert {"train_loss", "learning_rate", "data_wait_share", "val_key_metric", "val_pq", "val_mpq+", "val_f1d"} <= tags["scalars"]
    # one value per epoch; with num_workers 0 the loop itself loads and augments, so it waits a real share
    assert [step for step, _ in waits] == [1, 2] and all(0 < value < 1 for _, value in waits)
    assert any(t.startswith("overlay/") for t in tags["images"])


def test_evaluate_writes_reports_with_the_protocol(trained):
    _quiet_run(["train.json", "evaluate.json"], eval_split="test", bootstrap=20, **_common(trained))
    folder = trained / "runs" / "eval_test"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["protocol"]["empty_policy"] == "skip" and summary["protocol"]["detection_radius"] == 12
    assert "test" in summary["protocol"]["split"]
    assert {"per_image.csv", "per_class.csv", "per_tissue.csv"} <= {p.name for p in folder.iterdir()}
    assert list(folder.glob("overlay_*.png"))


def test_inference_writes_cells_for_any_tile_size(trained, tmp_path):
    rng = np.random.default_rng(0)
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(inputs / "small.png")  # smaller than a tile
    Image.fromarray(rng.integers(0, 255, (100, 90, 3), dtype=np.uint8)).save(inputs / "odd.png")  # not a multiple
    common = {k: v for k, v in _common(trained).items() if k not in ("dataset_dir", "synthetic", "num_workers")}
    _quiet_run(["inference.json"], input_dir=str(inputs), **{**common, "output_dir": str(tmp_path / "out")})
    for name, shape in (("small", (40, 50)), ("odd", (100, 90))):
        inst = tifffile.imread(tmp_path / "out" / f"{name}_instances.tif")
        assert inst.shape == shape and inst.dtype == np.int32
        assert tifffile.imread(tmp_path / "out" / f"{name}_classes.tif").shape == shape
        with open(tmp_path / "out" / f"{name}_cells.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == len(np.unique(inst[inst > 0]))
        assert (tmp_path / "out" / f"{name}_overlay.png").is_file()
        geo = json.loads((tmp_path / "out" / f"{name}_cells.geojson").read_text())
        assert geo["type"] == "FeatureCollection"


def test_inference_rejects_an_image_stack(trained, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    tifffile.imwrite(inputs / "grey.tif", np.zeros((5, 64, 64), np.uint8))  # greyscale is read; a stack is not
    common = {k: v for k, v in _common(trained).items() if k not in ("dataset_dir", "synthetic", "num_workers")}
    with pytest.raises(Exception) as info:
        _quiet_run(["inference.json"], input_dir=str(inputs), **{**common, "output_dir": str(tmp_path / "out")})
    assert re.search(r"grey\.tif.*RGB composite", message_chain(info.value))


def test_a_checkpoint_for_another_encoder_is_refused(trained, tmp_path):
    ckpt = torch.load(trained / "models" / "model.pt", weights_only=True)
    ckpt["meta"]["encoder"] = "uni"
    (tmp_path / "models").mkdir()
    torch.save(ckpt, tmp_path / "models" / "model.pt")
    overrides = {**_common(trained), "ckpt_dir": str(tmp_path / "models"), "output_dir": str(tmp_path / "runs")}
    with pytest.raises(Exception) as info:
        _quiet_run(["train.json", "evaluate.json"], eval_split="test", bootstrap=0, **overrides)
    assert "encoder: checkpoint has 'uni'" in message_chain(info.value)


def test_bundle_properties_are_complete(trained, tmp_path):
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "tile.png")
    for configs, kind in ((["train.json"], "train"), (["inference.json"], "infer")):
        wf = ConfigWorkflow(config_file=[str(CONFIGS / c) for c in configs], meta_file=str(CONFIGS / "metadata.json"),
                            logging_file=False, workflow_type=kind, input_dir=str(tmp_path),
                            **{k: v for k, v in _common(trained).items() if k not in ("meta_file", "logging_file")})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wf.initialize()
            assert wf.check_properties() == [] or wf.check_properties() is None


def test_missing_checkpoint_says_how_to_get_one(tmp_path):
    overrides = {**_common(tmp_path), "ckpt_dir": str(tmp_path / "no_models")}
    with pytest.raises(Exception) as info:
        _quiet_run(["train.json", "evaluate.json"], eval_split="test", bootstrap=0, **overrides)
    text = message_chain(info.value)
    assert "model.pt: missing" in text and "train the bundle first" in text


@pytest.mark.parametrize("mode", ["clean", "views"])
def test_training_from_the_embedding_cache(mode, tmp_path):
    overrides = _common(tmp_path, cache_mode=mode, cache_views=2, cache_dir=str(tmp_path / "cache"), augment_prob_scale=0.5)
    _quiet_run(["train.json"], epochs=2, epoch_length=2, batch_size=2, val_batch_size=2, **overrides)
    folders = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert len(folders) == 1  # one cache, filled once before training and read by both epochs
    assert (tmp_path / "models" / "model.pt").is_file()
    complete = np.load(folders[0] / "complete.npy")
    views = 1 if mode == "clean" else 2
    assert complete.shape[0] == 4 * views and complete.all()  # 4 training tiles × views, every row verified


def test_training_with_the_photometric_steps_on_the_device(tmp_path):
    overrides = _common(tmp_path, photometric_on_device=True)
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json")])
    parser.update(overrides)
    preprocessing = parser.get_parsed_content("train#preprocessing")
    steps = [type(t).__name__ for t in preprocessing.transforms]
    augmentation = [type(t).__name__ for t in preprocessing.transforms[2].transforms]
    assert augmentation[-1] == "CastToTyped" and "RandLABStainJitterd" not in augmentation
    clip = preprocessing.transforms[steps.index("ClipIntensityd")]
    assert (clip.low, clip.high, clip.out_range, clip.dtype) == (0.0, 255.0, None, "uint8")  # 0..255 to the batch step
    assert isinstance(parser.get_parsed_content("train_prepare_batch").photometric, BatchPhotometricAugmentation)
    _quiet_run(["train.json"], epochs=1, epoch_length=2, batch_size=2, val_batch_size=2, **overrides)
    assert (tmp_path / "models" / "model.pt").is_file()


def test_training_batches_travel_as_8_bit_images_and_half_precision_and_train_in_float32(tmp_path):
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json")])
    parser.update(_common(tmp_path, batch_size=2))
    parser.get_parsed_content("initialize")
    batch = next(iter(parser.get_parsed_content("train#dataloader")))
    dtypes = {k: v.dtype for k, v in batch.items()}
    assert dtypes == {"image": torch.uint8, "distance_target": torch.float16, "weight_mask": torch.float16,
                      "contour_target": torch.uint8, "type_target": torch.uint8}
    image, targets = parser.get_parsed_content("train_prepare_batch")(batch, torch.device("cpu"))
    assert image.dtype == targets["distance_target"].dtype == targets["weight_mask"].dtype == torch.float32
    assert targets["contour_target"].dtype == targets["type_target"].dtype == torch.uint8
    assert torch.equal(image, batch["image"].float() / 255) and 0 <= image.min() and image.max() <= 1
    assert torch.equal(targets["distance_target"], batch["distance_target"].float())
    assert set(targets["weight_mask"].unique().tolist()) <= {1.0, float(torch.tensor(BACKGROUND_WEIGHT).half())}


def test_targets_on_the_device_are_the_targets_of_the_workers(tmp_path):
    batches = {}
    for on_device in (False, True):
        parser = ConfigParser()
        parser.read_config([str(CONFIGS / "train.json")])
        parser.update(_common(tmp_path, batch_size=2, targets_on_device=on_device, seed=3))
        parser.get_parsed_content("initialize")
        batch = next(iter(parser.get_parsed_content("train#dataloader")))
        batches[on_device] = (batch, parser.get_parsed_content("train_prepare_batch")(batch, torch.device("cpu")))
    (sent, (image, targets)), (sent_label, (image_label, targets_label)) = batches[False], batches[True]
    assert {"distance_target", "weight_mask"} <= set(sent) and "label" not in sent
    assert "distance_target" not in sent_label and "weight_mask" not in sent_label
    assert sent_label["label"].dtype == torch.int32
    assert torch.equal(image, image_label)  # the same draws: the same views
    assert set(targets) == set(targets_label)
    for key in targets:  # the workers send them rounded to float16; the device computes them in float32
        tolerance = 1e-3 if targets[key].is_floating_point() else 0
        assert torch.allclose(targets[key].float(), targets_label[key].float(), atol=tolerance), key
    _quiet_run(["train.json"], epochs=1, epoch_length=2, batch_size=2, val_batch_size=2,
               **_common(tmp_path, targets_on_device=True))
    assert (tmp_path / "models" / "model.pt").is_file()


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_loaders_pin_memory_for_a_gpu(tmp_path, device):
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json")])
    parser.update(_common(tmp_path, device=f"$torch.device('{device}')"))  # no CUDA call: the loaders are only built
    for loader in ("train#dataloader", "validate#dataloader"):
        assert parser.get_parsed_content(loader).pin_memory == (device == "cuda"), loader


def test_photometric_steps_on_the_device_need_cache_mode_off(tmp_path):
    overrides = _common(tmp_path, photometric_on_device=True, cache_mode="clean", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(Exception) as info:
        _quiet_run(["train.json"], epochs=1, epoch_length=1, batch_size=2, **overrides)
    assert "need cache_mode 'off'" in message_chain(info.value)
