"""Checkpoints (issue #19 items 2–3, #20 item 6): atomic and monotone writes, a network rebuilt from the
checkpoint alone with the encoder it was trained with, and errors that name the file and the fix."""

import json
import os
import signal
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow, run
from monai.inferers import SlidingWindowInferer
from PIL import Image

from cellgap.bundle import bundle_name, export_bundle
from cellgap.checkpoint import LAST, MODEL, PREVIOUS, load_network, read_checkpoint, save_atomically
from cellgap.cli import DEMO_DECODER
from cellgap.encoders import DEMO_ENCODER
from cellgap.testing.errors import message_chain

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bundles" / bundle_name(DEMO_ENCODER) / "configs"
TINY = dict(DEMO_DECODER)  # the demo's small decoder, not the bundles' default


def _common(tmp: Path, **extra) -> dict:
    return {"bundle_root": str(CONFIGS.parent), "meta_file": str(CONFIGS / "metadata.json"), "logging_file": False,
            "encoder_weights": "none", "allow_random_encoder": True, "decoder": TINY, "tile_size": 64, "sw_batch_size": 2,
            "ckpt_dir": str(tmp / "models"), "output_dir": str(tmp / "runs"), "dataset_dir": str(tmp / "data"),
            "num_workers": 0, "synthetic": {"n_train": 4, "n_val": 2, "n_test": 2, "seed": 0, "magnification": 40, "size": 64},
            **extra}


def _run(configs, **overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run(config_file=[str(CONFIGS / c) for c in configs], **overrides)


def _train(tmp: Path, epochs: int = 2, epoch_length: int = 2, **extra):
    _run(["train.json"], epochs=epochs, epoch_length=epoch_length, batch_size=2, val_batch_size=2, **_common(tmp, **extra))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    _train(tmp)
    return tmp



def test_the_checkpoint_carries_everything_to_rebuild_the_network(trained):
    ckpt = read_checkpoint(trained / "models" / MODEL)
    meta = ckpt["meta"]
    assert meta["decoder_config"] == TINY and meta["reduced_encoder"] is False
    assert meta["encoder_weights_id"] == "random" and "encoder" in ckpt  # the random encoder travels with the model
    assert isinstance(meta["best_score"], float) and meta["epoch"] in (1, 2) and meta["iteration"] == 2 * meta["epoch"]
    last = torch.load(trained / "models" / LAST, weights_only=True)
    assert last["trainer"]["epoch"] == 2 and last["trainer"]["iteration"] == 4 and last["best"]["score"] == meta["best_score"]
    assert {"optimizer", "lr_scheduler", "random", "decoder"} <= set(last)
    assert torch.load(trained / "models" / PREVIOUS, weights_only=True)["trainer"]["epoch"] == 1


KILLED_WRITER = """
import sys, time, torch
from cellgap.checkpoint import save_atomically
def slow_save(obj, f):
    f.write(b"PK" + b"0" * 1000)  # the first bytes of a torch file, then nothing more
    f.flush()
    print("writing", flush=True)
    time.sleep(60)
save_atomically({"new": torch.ones(3)}, sys.argv[1], save=slow_save)
"""


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path):
    path = tmp_path / "models" / MODEL
    save_atomically({"old": torch.zeros(3)}, path)
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert writer.stdout.readline().strip() == "writing"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert torch.equal(torch.load(path, weights_only=True)["old"], torch.zeros(3))
    with pytest.raises(ZeroDivisionError):  # an error while writing: the same
        save_atomically({"new": 1}, path, save=lambda obj, f: (f.write(b"x"), 1 / 0))
    assert torch.equal(torch.load(path, weights_only=True)["old"], torch.zeros(3))
    assert oct(path.stat().st_mode & 0o777) != "0o600"  # readable by the group as any file the user writes


def test_a_rerun_never_replaces_a_better_model(trained, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    ckpt = torch.load(trained / "models" / MODEL, weights_only=True)
    ckpt["meta"]["best_score"] = 0.99  # a better model than this tiny run can reach
    torch.save(ckpt, models / MODEL)
    before = (models / MODEL).read_bytes()
    _train(tmp_path, epochs=1, resume=False)  # a new run into the same folder, from epoch 0
    assert (models / MODEL).read_bytes() == before
    assert torch.load(models / LAST, weights_only=True)["best"]["score"] == 0.99


def _instances_from_evaluate(tmp: Path, overrides: dict) -> list[np.ndarray]:
    """The evaluator's instance maps, in the order of the test split (it does not shuffle)."""
    wf = ConfigWorkflow(config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")],
                        workflow_type="eval", eval_split="test", bootstrap=0, **overrides)
    found = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wf.initialize()
        evaluator = wf.parser.get_parsed_content("validate#evaluator")

        def keep(engine):
            for item in engine.state.output:
                found.append(np.asarray(item["pred_instances"]).squeeze())
        evaluator.add_event_handler(Events.ITERATION_COMPLETED, keep)
        wf.run()
    return found


@pytest.fixture(scope="module")
def applied(trained, tmp_path_factory) -> dict:
    """The trained model with a body bias, its test tiles as PNGs, and inference.json's instance maps of them:
    no decoder, no encoder weights, nothing but the checkpoint and the bundle's defaults."""
    from cellgap.data.prepared import datalist

    tmp = tmp_path_factory.mktemp("applied")
    # two epochs find no cell: a body bias makes the maps non-empty, shaped by the encoder's and decoder's outputs
    ckpt = torch.load(trained / "models" / MODEL, weights_only=True)
    ckpt["decoder"]["contour_head.3.bias"] += torch.tensor([0.0, 0.8, 0.0])
    (tmp / "models").mkdir()
    torch.save(ckpt, tmp / "models" / MODEL)
    tiles = datalist(trained / "data", "test")
    inputs = tmp / "in"
    inputs.mkdir()
    for item in tiles:
        (inputs / Path(item["image"]).name).write_bytes(Path(item["image"]).read_bytes())
    _run(["inference.json"], bundle_root=str(CONFIGS.parent), meta_file=str(CONFIGS / "metadata.json"), logging_file=False,
         ckpt_dir=str(tmp / "models"), input_dir=str(inputs), output_dir=str(tmp / "out"), tile_size=64, sw_batch_size=2)
    inferred = {Path(t["image"]).stem: tifffile.imread(tmp / "out" / f"{Path(t['image']).stem}_instances.tif") for t in tiles}
    assert len(inferred) == 2 and all(inst.max() > 0 for inst in inferred.values())
    return {"root": tmp, "inputs": inputs, "tiles": tiles, "inferred": inferred}


def _same_cells(a: np.ndarray, b: np.ndarray) -> bool:
    """The same instance map up to the numbering of the cells: one-to-one labels, the same background."""
    if a.shape != b.shape or not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[a > 0]]), axis=1)
    return len(pairs[0]) == len(np.unique(pairs[0])) == len(np.unique(pairs[1]))


def test_evaluate_inference_and_load_network_give_the_same_instances(trained, applied, tmp_path):
    from cellgap.postprocessing import CISCAPostProcessingd

    tiles, inferred, inputs = applied["tiles"], applied["inferred"], applied["inputs"]
    overrides = {k: v for k, v in _common(trained).items() if k not in ("decoder", "encoder_weights", "allow_random_encoder")}
    overrides.update(output_dir=str(tmp_path / "runs"), ckpt_dir=str(applied["root"] / "models"))
    evaluated = dict(zip([Path(t["image"]).stem for t in tiles], _instances_from_evaluate(trained, overrides)))
    network, meta = load_network(applied["root"])
    inferer = SlidingWindowInferer(roi_size=(64, 64), sw_batch_size=2, overlap=0.25, mode="gaussian", padding_mode="reflect")
    post = CISCAPostProcessingd(magnification=meta["magnification"], min_cell_size=meta["min_cell_size"],
                                num_classes=len(meta["class_names"]), pred_key="pred")
    assert len(evaluated) == len(inferred) == 2
    for name, inst in inferred.items():
        image = torch.as_tensor(np.array(Image.open(inputs / f"{name}.png")), dtype=torch.float32).permute(2, 0, 1)[None] / 255
        with torch.no_grad():
            pred = {k: v[0] for k, v in inferer(image, network).items()}
        loaded = np.asarray(post({"pred": pred})["pred_instances"]).squeeze()
        assert np.array_equal(inst, loaded), name
        assert np.array_equal(inst, evaluated[name]), name


def test_cellgap_segment_gives_the_inference_instances(applied, tmp_path):
    """`cellgap segment` on the same tiles (each tile one slide, one tile without margin at the model's resolution)."""
    import zarr

    from cellgap.cli import main

    meta = read_checkpoint(applied["root"] / "models" / MODEL)["meta"]
    mpp = meta.get("mpp") or 10.0 / meta["magnification"]
    main(["segment", str(applied["inputs"]), "--model", str(applied["root"]), "--out", str(tmp_path / "slides"),
          "--mpp", str(mpp), "--tile-size", "64", "--margin", "0", "--labels", "--device", "cpu", "--workers", "0",
          "--postprocess-workers", "0", "--no-progress"])
    for name, inst in applied["inferred"].items():
        labels = zarr.open_array(tmp_path / "slides" / name / "labels.zarr", mode="r")[:]
        assert _same_cells(inst, labels.astype(np.int64)), name


@pytest.mark.heavy  # ~25 s: the export and a fresh interpreter
def test_the_exported_zoo_bundle_gives_the_inference_instances(applied, tmp_path):
    """The exported bundle run from its unzipped folder by `python -m monai.bundle run`, cellgap reachable only as
    its vendored copy (no PYTHONPATH), with no architecture override."""
    archive = export_bundle(DEMO_ENCODER, tmp_path / "dist", checkpoint=applied["root"] / "models" / MODEL)
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(tmp_path / "zoo")
    bundle = tmp_path / "zoo" / bundle_name(DEMO_ENCODER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
           "--input_dir", str(applied["inputs"]), "--output_dir", str(tmp_path / "out"), "--tile_size", "64",
           "--sw_batch_size", "2"]
    result = subprocess.run(cmd, cwd=bundle, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    for name, inst in applied["inferred"].items():
        assert np.array_equal(tifffile.imread(tmp_path / "out" / f"{name}_instances.tif"), inst), name


def test_another_encoders_weights_are_refused_naming_both(trained, tmp_path):
    weights = tmp_path / "other.safetensors"
    weights.write_bytes(b"not the weights it was trained with")
    with pytest.raises(ValueError) as info:
        load_network(trained / "models" / MODEL, encoder_weights=weights)
    text = str(info.value)
    assert str(trained / "models" / MODEL) in text and "randomly initialised encoder" in text and "sha256:" in text


def test_decoder_shapes_that_do_not_fit_name_the_file_and_the_fix(trained, tmp_path):
    ckpt = torch.load(trained / "models" / MODEL, weights_only=True)
    del ckpt["meta"]["decoder_config"]  # as an older checkpoint: the bundles' default decoder is assumed
    path = tmp_path / "legacy.pt"
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=f"checkpoint {path}: its decoder does not fit.*drop decoder / architecture overrides"):
        load_network(path)
    common = {k: v for k, v in _common(trained).items() if k not in ("dataset_dir", "synthetic", "num_workers")}
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "t.png")
    with pytest.raises(Exception) as info:  # an architecture override that contradicts the checkpoint
        _run(["inference.json"], **{**common, "input_dir": str(tmp_path), "output_dir": str(tmp_path / "out"),
                                    "decoder": {**TINY, "widths": [8, 8, 8, 16, 16, 32]}})
    assert f"checkpoint {trained / 'models' / MODEL} does not fit" in message_chain(info.value) and "decoder:" in message_chain(info.value)


def test_the_exported_bundle_does_not_require_cellgap_from_an_index(trained, tmp_path):
    archive = export_bundle(DEMO_ENCODER, tmp_path / "dist", checkpoint=trained / "models" / MODEL)
    with zipfile.ZipFile(archive) as zf:
        meta = json.loads(zf.read(f"{bundle_name(DEMO_ENCODER)}/configs/metadata.json"))
        inference = json.loads(zf.read(f"{bundle_name(DEMO_ENCODER)}/configs/inference.json"))
    assert "cellgap" not in meta["required_packages_version"]
    # the vendored copy rebuilds the network from the checkpoint too
    assert inference["trained"]["_target_"] == "scripts.cellgap.workflow.TrainedFor" and inference["decoder"] == "$@trained.decoder"


# --------------------------------------------------------------------------------------------------
# resume (#20 item 4)
# --------------------------------------------------------------------------------------------------
def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _copy_models(trained: Path, tmp: Path) -> Path:
    (tmp / "models").mkdir()
    for name in (MODEL, LAST, PREVIOUS):
        (tmp / "models" / name).write_bytes((trained / "models" / name).read_bytes())
    return tmp / "models"


def test_a_stopped_run_resumes_to_the_uninterrupted_result(trained, tmp_path, capsys):
    _train(tmp_path, epochs=1, dataset_dir=str(trained / "data"))
    _train(tmp_path, epochs=2, dataset_dir=str(trained / "data"))  # the same run, asked for one more epoch
    assert "resuming from" in capsys.readouterr().out
    resumed = torch.load(tmp_path / "models" / LAST, weights_only=True)
    reference = torch.load(trained / "models" / LAST, weights_only=True)
    assert resumed["trainer"] == reference["trainer"]
    assert _same_state(resumed["decoder"], reference["decoder"])  # bit-equal
    assert resumed["best"] == reference["best"]
    assert resumed["optimizer"]["state"].keys() == reference["optimizer"]["state"].keys()


def test_a_damaged_last_checkpoint_falls_back_to_the_previous_one(trained, tmp_path, capfd):
    models = _copy_models(trained, tmp_path)
    (models / LAST).write_bytes((models / LAST).read_bytes()[:1000])  # torn, as by a disk-full or a copy cut short
    _train(tmp_path, epochs=2, dataset_dir=str(trained / "data"))
    err = capfd.readouterr().err
    assert f"checkpoint {models / LAST}: cannot be read" in err and f"resuming from the previous one, {models / PREVIOUS}" in err
    resumed = torch.load(models / LAST, weights_only=True)
    reference = torch.load(trained / "models" / LAST, weights_only=True)
    assert resumed["trainer"]["epoch"] == 2 and _same_state(resumed["decoder"], reference["decoder"])


def test_resume_into_the_folder_of_another_run_is_refused_with_the_reason(trained, tmp_path):
    models = _copy_models(trained, tmp_path)
    for name in (MODEL, LAST):
        state = torch.load(models / name, weights_only=True)
        state["meta"]["dataset"] = "pannuke"
        torch.save(state, models / name)
    before = {p.name: p.read_bytes() for p in models.iterdir()}
    with pytest.raises(Exception) as info:
        _train(tmp_path, epochs=3, dataset_dir=str(trained / "data"))
    assert "dataset: 'pannuke' there, 'synthetic' here" in message_chain(info.value) and "resume refused" in message_chain(info.value)
    assert {p.name: p.read_bytes() for p in models.iterdir() if not p.name.startswith(".")} == before


KILLABLE_TRAINING = """
import sys, warnings
sys.path.insert(0, {tests!r})
from pathlib import Path
from ignite.engine import Events
import cellgap.checkpoint as checkpoint
import test_checkpoint as t

attach = checkpoint.TrainingCheckpoints.attach
def attach_and_report(self, engine):  # says which iteration ran, so that the test kills it mid-epoch
    attach(self, engine)
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: print("iteration", e.state.iteration, flush=True))
checkpoint.TrainingCheckpoints.attach = attach_and_report
t._train(Path(sys.argv[1]), epochs=3, epoch_length=2, dataset_dir=sys.argv[2])
"""


@pytest.mark.heavy
def test_a_training_killed_mid_epoch_resumes_to_the_uninterrupted_result(trained, tmp_path):
    """kill -9 in the second epoch, the same command again: the decoder equals an uninterrupted run's, bit for bit.
    Each epoch here is one pass over the 4 training tiles (2 batches of 2): see docs/guarantees.md for epochs that
    end inside a pass."""
    script = KILLABLE_TRAINING.format(tests=str(ROOT / "tests"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs = {}
    for name in ("reference", "killed"):
        command = [sys.executable, "-c", script, str(tmp_path / name), str(trained / "data")]
        if name == "killed":
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
            for line in process.stdout:
                if line.strip() == "iteration 3":  # epoch 2 of 3, its first iteration
                    process.send_signal(signal.SIGKILL)
                    break
            process.wait()
            assert torch.load(tmp_path / name / "models" / LAST, weights_only=True)["trainer"]["epoch"] == 1
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        if name == "killed":
            assert "resuming from" in result.stdout and "epoch 1, iteration 2" in result.stdout
        runs[name] = torch.load(tmp_path / name / "models" / LAST, weights_only=True)
    assert runs["killed"]["trainer"] == runs["reference"]["trainer"] == {"epoch": 3, "iteration": 6, "epoch_length": 2}
    assert _same_state(runs["killed"]["decoder"], runs["reference"]["decoder"])
    assert runs["killed"]["best"] == runs["reference"]["best"]


def test_a_second_training_into_the_same_folder_stops_naming_the_first(tmp_path):
    models = tmp_path / "models"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom cellgap.locking import output_lock\n"
         f"with output_lock({str(models)!r}, 'training'):\n    print('locked', flush=True)\n    sys.stdin.readline()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(Exception) as info:
            _train(tmp_path, epochs=1)
        assert f"{models}: in use by training (pid {holder.pid}" in message_chain(info.value)
        assert [p.name for p in models.iterdir()] == [".cellgap.lock"]  # the first run's folder untouched
    finally:
        holder.kill()
        holder.wait()


def test_without_validation_model_pt_is_the_latest_model(tmp_path):
    """No model selection (no validator): model.pt follows the last epoch, its meta without a score."""
    from types import SimpleNamespace

    from ignite.engine import Engine

    from cellgap.checkpoint import CheckpointMeta, TrainingCheckpoints

    torch.manual_seed(0)
    network = SimpleNamespace(decoder=torch.nn.Linear(2, 2), encoder=torch.nn.Linear(1, 1))
    optimizer = torch.optim.SGD(network.decoder.parameters(), lr=0.1)

    def step(engine, batch):
        optimizer.zero_grad()
        network.decoder(batch).sum().backward()
        optimizer.step()

    trainer = Engine(step)
    meta = CheckpointMeta(DEMO_ENCODER, ["cell"], encoder_weights=None, decoder_config={"widths": [2]})
    TrainingCheckpoints(tmp_path / "models", meta, network, optimizer).attach(trainer)
    trainer.run([torch.ones(1, 2)] * 3, max_epochs=2)
    saved = torch.load(tmp_path / "models" / MODEL, weights_only=True)
    assert saved["meta"]["best_score"] is None and saved["meta"]["epoch"] == 2 and saved["meta"]["iteration"] == 6
    assert _same_state(saved["decoder"], network.decoder.state_dict()) and "encoder" in saved
    assert not (tmp_path / "models" / ".cellgap.lock").exists()  # released at the end
