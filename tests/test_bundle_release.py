"""What sharing a bundle needs: valid metadata, a network shape check, encoder weights loaded through the
bundle config, multi-process training under torchrun, and a self-contained model-zoo archive."""

import json
import os
import re
import subprocess
import sys
import venv
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from monai.bundle import ConfigParser, verify_metadata, verify_net_in_out
from PIL import Image

from cellgap.bundle import bundle_name, export_bundle
from cellgap.encoders import DEMO_ENCODER, ENCODERS, get_encoder_spec

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "cellgap" / "resources" / "bundle_metadata.schema.json"
TINY = {"widths": [8, 8, 8, 16, 16, 16], "head_features": 8, "head_width": 8, "norm": None}
SYNTH = {"n_train": 4, "n_val": 2, "n_test": 2, "seed": 0, "magnification": 40, "size": 64}


def _configs(key):
    return ROOT / "bundles" / bundle_name(key) / "configs"


@pytest.mark.parametrize("key", sorted(ENCODERS))
def test_metadata_verifies_against_the_schema_kept_in_the_repository(key):
    meta = _configs(key) / "metadata.json"
    verify_metadata(meta_file=str(meta), filepath=str(SCHEMA))  # the file exists: nothing is downloaded
    data = json.loads(meta.read_text())
    assert data["version"] in data["changelog"]
    assert data["encoder"]["key"] == key and data["encoder"]["gated"] == ENCODERS[key].gated


def test_schema_rejects_incomplete_metadata(tmp_path):
    meta = json.loads((_configs(DEMO_ENCODER) / "metadata.json").read_text())
    del meta["network_data_format"]["inputs"]["image"]["num_channels"]
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(Exception, match="num_channels"):
        verify_metadata(meta_file=str(tmp_path / "metadata.json"), filepath=str(SCHEMA))


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic") / "data"


@pytest.mark.parametrize("key", sorted(ENCODERS))
def test_network_shape_check_passes(key, synthetic_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        verify_net_in_out(net_id="network_pred", meta_file=str(_configs(key) / "metadata.json"),
                          config_file=str(_configs(key) / "train.json"), device="cpu", n=2,
                          encoder_weights="none", allow_random_encoder=True, reduced_encoder=True, decoder=TINY,
                          dataset_dir=str(synthetic_dir), synthetic=SYNTH)


def _hub_layout(model, spec, folder):
    folder.mkdir(parents=True)
    args = {k: v for k, v in spec.kwargs.items() if isinstance(v, (int, float, str, bool, list, tuple))}
    (folder / "config.json").write_text(json.dumps({"architecture": spec.architecture, "num_classes": 0, "model_args": args,
                                                    "pretrained_cfg": {"mean": list(spec.mean), "std": list(spec.std)}}))
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))


@pytest.mark.parametrize("key", sorted(ENCODERS))
def test_encoder_weights_in_the_hub_layout_load_through_the_bundle_config(key, tmp_path, synthetic_dir):
    spec = get_encoder_spec(key).reduced()
    torch.manual_seed(3)
    source = timm.create_model(spec.architecture, pretrained=False, **{**spec.build_kwargs(), "num_classes": 0}).eval()
    _hub_layout(source, spec, tmp_path / "weights")
    parser = ConfigParser()
    parser.read_config(str(_configs(key) / "train.json"))
    parser.update({"bundle_root": str(_configs(key).parent), "encoder_weights": str(tmp_path / "weights"),
                   "reduced_encoder": True, "decoder": TINY, "dataset_dir": str(synthetic_dir), "synthetic": SYNTH})
    encoder = parser.get_parsed_content("network_def").encoder
    assert not encoder.random_weights
    x = torch.rand(1, 3, 64, 64)
    xin = (x - encoder.mean) / encoder.std
    if encoder.scale != 1:
        xin = torch.nn.functional.interpolate(xin, scale_factor=encoder.scale, mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        expected = source.forward_intermediates(xin, indices=list(spec.taps), intermediates_only=True)
    for a, b in zip(encoder(x), expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _run_env(extra_path: Path | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "RANK", "WORLD_SIZE", "LOCAL_"))}
    env["OMP_NUM_THREADS"] = "1"
    if extra_path is not None:
        env["PYTHONPATH"] = str(extra_path)
    return env


def test_multi_gpu_config_trains_on_two_cpu_processes_with_gloo(tmp_path):
    configs = _configs(DEMO_ENCODER)
    overrides = ["--bundle_root", str(configs.parent), "--dataset_dir", str(tmp_path / "data"),
                 "--output_dir", str(tmp_path / "runs"), "--ckpt_dir", str(tmp_path / "models"),
                 "--encoder_weights", "none", "--allow_random_encoder", "True", "--decoder", repr(TINY),
                 "--synthetic", repr(SYNTH), "--tile_size", "64", "--epochs", "1", "--batch_size", "1",
                 "--val_batch_size", "1", "--num_workers", "0", "--logging_file", "False"]
    # generate the synthetic data once, before two processes race to write it
    from cellgap.data.synthetic import prepare_synthetic

    prepare_synthetic(tmp_path / "data", **SYNTH, progress=False)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2", "-m",
           "monai.bundle", "run", "--config_file",
           f"['{configs / 'train.json'}','{configs / 'multi_gpu_train.json'}']", *overrides]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_run_env())
    assert result.returncode == 0, result.stderr[-3000:]
    reports = sorted(re.findall(r"rank (\d+) trained (\d+) iterations", result.stdout))
    assert reports == [("0", "2"), ("1", "2")], \
        f"{reports}\n--- stdout ---\n{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-4000:]}"  # 4 tiles / 2 ranks
    assert (tmp_path / "models" / "model.pt").is_file()
    assert sorted(p.name for p in (tmp_path / "models").glob("*.pt")) == ["last.pt", "model.pt"]  # written by rank 0 alone


def test_exported_bundle_runs_where_cellgap_is_not_installed(tmp_path):
    # a trained checkpoint to ship: two iterations on tiny synthetic data
    from monai.bundle import run

    configs = _configs(DEMO_ENCODER)
    common = {"bundle_root": str(configs.parent), "encoder_weights": "none", "allow_random_encoder": True,
              "decoder": TINY, "tile_size": 64, "logging_file": False, "meta_file": str(configs / "metadata.json")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run(config_file=str(configs / "train.json"), dataset_dir=str(tmp_path / "data"), synthetic=SYNTH,
            ckpt_dir=str(tmp_path / "models"), output_dir=str(tmp_path / "runs"), epochs=1, epoch_length=1, batch_size=1,
            val_batch_size=1, num_workers=0, **common)
    archive = export_bundle(DEMO_ENCODER, tmp_path / "dist", checkpoint=tmp_path / "models" / "model.pt")
    assert archive.name == f"{bundle_name(DEMO_ENCODER)}_v0.1.0.zip"
    assert export_bundle(DEMO_ENCODER, tmp_path / "dist2", checkpoint=tmp_path / "models" / "model.pt").read_bytes() \
        == archive.read_bytes()  # reproducible archive
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(tmp_path / "zoo")
    bundle = tmp_path / "zoo" / bundle_name(DEMO_ENCODER)
    assert (bundle / "scripts" / "cellgap" / "network.py").is_file() and "scripts.cellgap.network.CellGapNet" in \
        (bundle / "configs" / "inference.json").read_text()

    # a clean virtual environment: the third-party packages, but not cellgap
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    deps = [p for p in sys.path if p.endswith("site-packages")]
    Path(site, "third_party.pth").write_text("\n".join(deps) + "\n")  # plain paths: the cellgap editable hook stays out
    probe = subprocess.run([str(python), "-c", "import cellgap"], cwd=tmp_path, capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'cellgap'" in probe.stderr

    inputs = tmp_path / "tiles"
    inputs.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 70, 3), dtype=np.uint8)).save(inputs / "a.png")
    cmd = [str(python), "-m", "monai.bundle", "run", "--config_file", "configs/inference.json", "--input_dir", str(inputs),
           "--output_dir", str(tmp_path / "cells"), "--encoder_weights", "none", "--allow_random_encoder", "True",
           "--decoder", repr(TINY), "--tile_size", "64"]
    result = subprocess.run(cmd, cwd=bundle, capture_output=True, text=True, timeout=600, env=_run_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "cells" / "a_instances.tif").is_file() and (tmp_path / "cells" / "a_cells.csv").is_file()
