"""Inference over a folder (issue #19 item 5): one bad file never sinks the run; images smaller than the
network's window give a result of their own size."""

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from monai.bundle import run
from PIL import Image

from cellgap.bundle import bundle_name
from cellgap.checkpoint import CheckpointMeta, checkpoint_objects
from cellgap.encoders import DEMO_ENCODER
from cellgap.inference import TilePaddingInferer
from cellgap.network import CellGapNet
from cellgap.testing.errors import message_chain

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bundles" / bundle_name(DEMO_ENCODER) / "configs"
TINY = {"widths": [8, 8, 8, 16, 16, 16], "head_features": 8, "head_width": 8, "norm": None}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """An untrained checkpoint (random encoder stored in it): enough to run inference end to end."""
    folder = tmp_path_factory.mktemp("model") / "models"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        net = CellGapNet(DEMO_ENCODER, num_classes=2, encoder_weights=None, allow_random_encoder=True, decoder=TINY)
    meta = CheckpointMeta(DEMO_ENCODER, ["tumour", "immune"], decoder_config=TINY, encoder_weights=None,
                          extra={"magnification": 40, "mpp": 0.25, "min_cell_size": 10, "dataset": "toy"})
    folder.mkdir()
    torch.save({k: v.state_dict() for k, v in checkpoint_objects(meta, net).items()}, folder / "model.pt")
    return folder



def _infer(model: Path, inputs: Path, out: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run(config_file=str(CONFIGS / "inference.json"), bundle_root=str(CONFIGS.parent), logging_file=False,
            meta_file=str(CONFIGS / "metadata.json"), ckpt_dir=str(model), input_dir=str(inputs), output_dir=str(out),
            tile_size=64, sw_batch_size=2)


def test_one_bad_file_is_named_and_the_others_are_written(model, tmp_path, capfd):
    rng = np.random.default_rng(0)
    inputs = tmp_path / "in"
    inputs.mkdir()
    sizes = {"good_a": (64, 64), "good_b": (100, 90), "tiny": (7, 5), "pixel": (1, 1)}
    for name, shape in sizes.items():
        Image.fromarray(rng.integers(0, 255, (*shape, 3), dtype=np.uint8)).save(inputs / f"{name}.png")
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    with pytest.raises(Exception) as info:  # MONAI's bundle runner wraps it: a non-zero exit
        _infer(model, inputs, tmp_path / "out")
    assert "1 of 5 file(s) could not be processed: broken.png (" in message_chain(info.value)
    assert f"FAILED {inputs / 'broken.png'}: " in capfd.readouterr().err
    for name, shape in sizes.items():  # the small ones too: a (possibly empty) result of their own size
        assert tifffile.imread(tmp_path / "out" / f"{name}_instances.tif").shape == shape
        assert (tmp_path / "out" / f"{name}_cells.csv").is_file()
    assert not list((tmp_path / "out").glob("broken_*"))
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert len(summary["processed"]) == 4 and [Path(f["file"]).name for f in summary["failed"]] == ["broken.png"]


def test_an_image_above_the_decompression_bomb_limit_is_named_with_the_fix(model, tmp_path, monkeypatch, capfd):
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(inputs / "fine.png")
    Image.fromarray(np.zeros((200, 200, 3), np.uint8)).save(inputs / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64)  # "huge" is then 9.8 × the limit, as a slide would be
    with pytest.raises(Exception) as info:
        _infer(model, inputs, tmp_path / "out")
    assert re.search(r"huge\.png \(.*cellgap segment.*MAX_IMAGE_PIXELS", message_chain(info.value))
    assert (tmp_path / "out" / "fine_instances.tif").is_file()


@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (40, 50), (64, 64), (300, 10)])
def test_the_padding_inferer_gives_maps_of_the_image_size(shape):
    calls = []

    def network(x):
        calls.append(tuple(x.shape[-2:]))
        return {"contour": x[:, :1] * 2}

    inferer = TilePaddingInferer(roi_size=(64, 64), sw_batch_size=1, overlap=0.25, mode="gaussian", padding_mode="reflect")
    image = torch.rand(1, 3, *shape)
    out = inferer(image, network)
    assert out["contour"].shape[-2:] == shape and torch.allclose(out["contour"], image[:, :1] * 2, atol=1e-5)
    assert set(calls) == {(64, 64)}
