"""scripts/benchmark_training.py on the CPU: the bundle's training step runs, is timed and counted, and trains
the decoder only."""

import importlib.util
import json
import warnings
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_training.py"
TINY = {"widths": [8, 8, 8, 16, 16, 16], "head_features": 8, "head_width": 8, "norm": None}


def _load():
    spec = importlib.util.spec_from_file_location("benchmark_training", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train_bench")
    threads = torch.get_num_threads()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = _load().main(["--device", "cpu", "--reduced", "--steps", "2", "--warmup", "1", "--data-steps", "2",
                               "--encoders", "convnext_atto,vit_l16_21k", "--workers", "0", "--batch-size", "2",
                               "--tile", "64", "--tiles", "4", "--matmul-size", "256", "--decoder", json.dumps(TINY), "--threads", "1",
                               "--out", str(tmp / "bench.json"), "--workdir", str(tmp / "work")])
    torch.set_num_threads(threads)
    return result, json.loads((tmp / "bench.json").read_text())


def test_json_has_every_field(record):
    result, saved = record
    assert saved["complete"], saved["skipped"]
    assert saved["environment"]["card"].startswith("CPU") and saved["matmul"]["dtype"] == "float32"
    assert saved["matmul"]["tflops"] > 0
    assert saved["settings"]["random_encoder_weights"] and saved["settings"]["num_classes"] == 5
    assert [(r["encoder"], r["source"]) for r in saved["rows"]] == [
        ("convnext_atto", "on the fly"), ("vit_l16_21k", "on the fly"), ("vit_l16_21k", "embedding cache")]
    for row in saved["rows"]:
        assert row["batch"] == 2
        g = row["gflops"]
        assert g["train_step"] > g["forward"] > 0 and g["decoder_backward_and_loss"] > 0
        assert row["compute_only"]["tiles_per_s"] > 0 and row["mfu"] > 0
        assert row["compute_only"]["decoder_changed"] and row["compute_only"]["encoder_unchanged"]
    for row in saved["rows"][:2]:
        assert row["with_data"].get("tiles_per_s", 0) > 0, row["with_data"]
        assert row["gpu_busy"] > 0 and row["bundle_loss_on_device"] == "ok"
        assert row["gflops"]["encoder_forward"] > 0
        # the step's forward count agrees with network_cost's (meta device) count
        assert abs(row["gflops"]["forward_vs_network_cost"]) < 0.01
    cached = saved["rows"][2]
    assert cached["encoder_calls"] == 0 and cached["gflops"]["encoder_forward"] == 0
    assert cached["gflops"]["train_step"] < saved["rows"][1]["gflops"]["train_step"]
    assert "| vit_l16_21k (from embedding cache) | 2 |" in saved["table"]
    assert result["table"] == saved["table"]


def test_training_step_changes_the_decoder_only(record):
    _, saved = record
    for row in saved["rows"]:
        assert row["compute_only"]["decoder_update_rms_per_step"] > 0
        assert row["compute_only"]["encoder_unchanged"]
