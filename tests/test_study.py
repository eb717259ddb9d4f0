"""The study runner: a 2 encoders × 2 splits grid end to end on synthetic data (random weights, tiny decoder,
64² tiles), its results files and their consistency, resume, crash handling, and the paired statistics."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cellgap.data.prepared import datalist
from cellgap.locking import LOCK_NAME
from cellgap.magnification import PROFILE_40X
from cellgap.metrics import Protocol, ScoreTable, score_image
from cellgap.metrics.statistics import paired_bootstrap
from cellgap.network import network_cost
from cellgap.study import (
    CandidateOutput,
    pooled_paired_statistics,
    resolve_splits,
    run_study,
    write_results,
)
from cellgap.study.grid import OptionsChangedError
from cellgap.study.options import main as study_main
from cellgap.testing.synthetic_pairs import perturb, perturb_classes, random_classes, random_instances

TINY = {"widths": [8, 8, 8, 16, 16, 16], "head_features": 8, "head_width": 8, "norm": None}
OVERRIDES = {"epochs": 1, "epoch_length": 1, "batch_size": 2, "val_batch_size": 2, "decoder": TINY, "tile_size": 64,
             "sw_batch_size": 2, "num_workers": 0, "reduced_encoder": True,
             "synthetic": {"n_train": 2, "n_val": 2, "n_test": 3, "magnification": 40, "size": 64}}
ENCODERS = ["convnext_atto", "uni"]  # general-purpose and pathology (reduced ViT)
SPLITS = ["seed0", "seed1"]
FAST_STATS = {"bootstrap": 100, "permutations": 100, "eval_bootstrap": 0, "log": lambda text: None}
RESULT_FILES = ["README.md", "protocol.json", "cost.json", *(f"{s}.{x}" for s in ("summary", "per_run", "per_class",
                "per_tissue", "gap", "runs") for x in ("csv", "md")),
                *(f"figures/{f}.png" for f in ("metrics_bars", "per_class_heatmap", "per_tissue_heatmap", "cost_vs_accuracy"))]


def _grid(study_dir, weights="random", overrides=None, **kwargs):
    return run_study(study_dir, ENCODERS, "synthetic", None, SPLITS, overrides or OVERRIDES, weights, **{**FAST_STATS, **kwargs})


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("study")
    report = _grid(folder)
    return folder, report


def _copy(study, tmp_path) -> Path:
    target = tmp_path / "study"
    shutil.copytree(study[0], target)
    return target


def _cell(folder: Path, split: str, encoder: str) -> Path:
    return folder / "cells" / "synthetic" / split / encoder


def _cell_json(folder: Path, split: str, encoder: str) -> dict:
    return json.loads((_cell(folder, split, encoder) / "cell.json").read_text())


def _table(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


def _test_metrics(folder: Path, split: str, encoder: str) -> dict:
    return json.loads((_cell(folder, split, encoder) / "eval_test" / "summary.json").read_text())["metrics"]


def test_the_grid_runs_every_cell(study):
    folder, report = study
    assert sorted(report.ran) == sorted(f"synthetic/{s}/{e}" for s in SPLITS for e in ENCODERS)
    assert report.failed == [] and report.skipped == []
    for s in SPLITS:
        for e in ENCODERS:
            record = _cell_json(folder, s, e)
            assert record["status"] == "done" and record["random_weights"] is True
            assert set(record["timings"]) >= {"train_s", "select_s", "evaluate_s", "total_s"}
            assert record["versions"]["torch"] == torch.__version__


def test_every_results_file_exists_and_names_its_protocol(study):
    results = study[0] / "results"
    for name in RESULT_FILES:
        assert (results / name).is_file() and (results / name).stat().st_size > 0, name
    for name in RESULT_FILES:
        if name.endswith((".csv", ".md")) and name != "README.md":
            text = (results / name).read_text()
            assert "Protocol: dataset synthetic" in text and "empty-image policy skip" in text, name
            assert "RANDOM ENCODER WEIGHTS" in text, name  # random weights are said loudly in every table
    for name in RESULT_FILES:
        if name.endswith(".png"):
            with Image.open(results / name) as image:
                assert image.format == "PNG" and min(image.size) > 100
    summary_md = (results / "summary.md").read_text()
    assert "uni [RANDOM WEIGHTS, reduced]" in summary_md and " ± " in summary_md


def test_summary_means_are_the_means_of_the_cells(study):
    folder = study[0]
    rows = {r["encoder"]: r for r in _table(folder / "results" / "summary.csv")}
    assert list(rows) == ENCODERS
    for e in ENCODERS:
        assert rows[e]["weights"] == "random" and rows[e]["n_splits"] == "2"
        for metric in ("pq", "bpq", "mpq", "mpq+", "aji", "dice", "f1d"):
            values = [_test_metrics(folder, s, e)[metric] for s in SPLITS]
            assert float(rows[e][f"{metric}_mean"]) == pytest.approx(np.mean(values), abs=1e-12)
            assert float(rows[e][f"{metric}_sd"]) == pytest.approx(np.std(values, ddof=1), abs=1e-12)
    per_run = _table(folder / "results" / "per_run.csv")
    assert len(per_run) == 4
    for row in per_run:
        assert float(row["pq"]) == pytest.approx(_test_metrics(folder, row["split"], row["encoder"])["pq"])


def test_per_class_and_per_tissue_tables_average_the_cells(study):
    folder = study[0]
    rows = _table(folder / "results" / "per_class.csv")
    assert {r["class"] for r in rows} == {"tumour", "lymphocyte", "stromal"}
    for row in rows:
        values = []
        for s in SPLITS:
            cls = {r["class"]: r for r in _table(_cell(folder, s, row["encoder"]) / "eval_test" / "per_class.csv")}
            values.append(float(cls[row["class"]]["f1"]))
        assert float(row["f1_mean"]) == pytest.approx(np.mean(values), nan_ok=True)
    tissues = _table(folder / "results" / "per_tissue.csv")
    assert tissues and {"encoder", "tissue", "pq_mean", "mpq_image_mean"} <= set(tissues[0])


def test_the_gap_difference_is_the_summary_difference(study):
    folder = study[0]
    summary = {r["encoder"]: r for r in _table(folder / "results" / "summary.csv")}
    gap = _table(folder / "results" / "gap.csv")
    assert {r["metric"] for r in gap} == {"mpq+", "bpq"}  # multi-class default
    for metric in ("mpq+", "bpq"):
        rows = {r["split"]: r for r in gap if r["metric"] == metric}
        assert set(rows) == {*SPLITS, "all (mean over splits)"}
        for r in rows.values():
            assert r["encoder"] == "uni" and r["reference"] == "convnext_atto"  # the only general-purpose encoder
            assert 0 < float(r["p_bootstrap"]) <= 1 and 0 < float(r["p_permutation"]) <= 1
            assert float(r["ci_low"]) <= float(r["ci_high"])
        pooled = rows["all (mean over splits)"]
        expected = float(summary["uni"][f"{metric}_mean"]) - float(summary["convnext_atto"][f"{metric}_mean"])
        assert float(pooled["difference"]) == pytest.approx(expected, abs=1e-12)
        assert pooled["n_splits"] == "2"
        for s in SPLITS:
            diff = _test_metrics(folder, s, "uni")[metric] - _test_metrics(folder, s, "convnext_atto")[metric]
            assert float(rows[s]["difference"]) == pytest.approx(diff, abs=1e-12)


def test_min_cell_size_is_chosen_on_val_never_test(study):
    folder = study[0]
    for s in SPLITS:
        data = folder / "data" / s
        val_ids = {item["id"] for item in datalist(data, "val")}
        test_ids = {item["id"] for item in datalist(data, "test")}
        for e in ENCODERS:
            record = _cell_json(folder, s, e)
            selection = record["min_cell_size"]
            assert selection["split"] == "val" and "val split" in selection["protocol_split"]
            assert set(selection["image_ids"]) == val_ids and not val_ids & test_ids
            assert selection["candidates"] == list(PROFILE_40X.min_cell_size_candidates)  # synthetic tiles are 40x
            scores = [c["score"] for c in selection["scores"]]
            assert [c["min_cell_size"] for c in selection["scores"]] == selection["candidates"]
            assert selection["chosen"] == selection["candidates"][int(np.argmax(scores))]
            assert selection["metric"] == "mpq+" and scores == [c["mpq+"] for c in selection["scores"]]
            cell = _cell(folder, s, e)
            for candidate in selection["candidates"]:  # every candidate was scored on the val tiles only
                ids = {r["id"] for r in _table(cell / "select_val" / f"min_cell_size_{candidate}" / "per_image.csv")}
                assert ids == val_ids
            evaluated = {r["id"] for r in _table(cell / "eval_test" / "per_image.csv")}
            assert evaluated == test_ids
            summary = json.loads((cell / "eval_test" / "summary.json").read_text())
            assert summary["run"]["min_cell_size"] == selection["chosen"] and "test" in summary["protocol"]["split"]
            ckpt = torch.load(cell / "models" / "model.pt", weights_only=True)
            assert ckpt["meta"]["min_cell_size"] == selection["chosen"]


def test_each_cell_has_its_tensorboard_run(study):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cell = _cell(study[0], "seed1", "uni")
    tags = set()
    for events in (cell / "runs").rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"train_loss", "val_key_metric", "select_val/mpq+", "test/pq"} <= tags


def test_protocol_json_records_every_choice(study):
    doc = json.loads((study[0] / "results" / "protocol.json").read_text())
    assert doc["dataset"]["magnification"] == 40 and doc["dataset"]["class_names"] == ["tumour", "lymphocyte", "stromal"]
    assert [s["name"] for s in doc["splits"]] == SPLITS and [s["data_seed"] for s in doc["splits"]] == [0, 1]
    for s in doc["splits"]:
        assert s["metric_protocol"]["empty_policy"] == "skip" and s["metric_protocol"]["detection_radius"] == 12
    assert doc["training"]["random_weights"] == ENCODERS
    for key, cell in doc["runs"].items():
        assert cell["status"] == "done" and cell["selection_split"] == "val"
        assert cell["min_cell_size"] == _cell_json(study[0], *key.split("/"))["min_cell_size"]["chosen"]
    assert doc["cost"]["per_encoder"]["uni"]["gflops"] > 0


def test_resume_reruns_only_what_is_unfinished(study, tmp_path):
    folder = _copy(study, tmp_path)
    (_cell(folder, "seed1", "uni") / "cell.json").unlink()  # lost: the cell reruns from scratch
    half = _cell(folder, "seed0", "convnext_atto")  # killed after training: resumes at the selection stage
    record = _cell_json(folder, "seed0", "convnext_atto")
    record["status"] = "running"
    for stage in ("select", "evaluate"):
        record["stages"].pop(stage)
    (half / "cell.json").write_text(json.dumps(record))
    shutil.rmtree(half / "eval_test")
    events_before = sorted(p.name for p in (half / "runs").glob("events.out.tfevents.*"))
    untouched = {(s, e): _cell_json(folder, s, e) for s, e in (("seed0", "uni"), ("seed1", "convnext_atto"))}

    report = _grid(folder)
    assert sorted(report.ran) == ["synthetic/seed0/convnext_atto", "synthetic/seed1/uni"]
    assert sorted(report.skipped) == ["synthetic/seed0/uni", "synthetic/seed1/convnext_atto"]
    for (s, e), before in untouched.items():
        assert _cell_json(folder, s, e) == before
    resumed = _cell_json(folder, "seed0", "convnext_atto")
    assert resumed["status"] == "done" and resumed["attempt"] == 2 and resumed["history"][0]["status"] == "running"
    assert sorted(p.name for p in (half / "runs").glob("events.out.tfevents.*")) == events_before  # not retrained
    rerun = _cell_json(folder, "seed1", "uni")
    assert rerun["status"] == "done" and rerun["attempt"] == 1 and rerun["timings"]["train_s"] > 0


def test_a_run_stopped_during_training_resumes_from_its_last_epoch(tmp_path, monkeypatch):
    """Training stops after epoch 1 of 2 (an error after last.pt is written, as a kill would leave it); the rerun
    trains epoch 2 only, from models/last.pt, and says so."""
    from ignite.engine import Events

    import cellgap.checkpoint as checkpoint

    attach, iterations, lines = checkpoint.TrainingCheckpoints.attach, [], []
    stop = {"after_epoch": 1}

    def attach_and_watch(self, engine):
        attach(self, engine)  # first: last.pt is saved before the stop below
        engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: iterations.append(e.state.iteration))

        @engine.on(Events.EPOCH_COMPLETED)
        def interrupt(e):
            if e.state.epoch == stop["after_epoch"]:
                raise RuntimeError(f"stopped after epoch {e.state.epoch}")

    monkeypatch.setattr(checkpoint.TrainingCheckpoints, "attach", attach_and_watch)
    grid = dict(encoders=["convnext_atto"], dataset="synthetic", splits=["seed0"], overrides={**OVERRIDES, "epochs": 2},
                encoder_weights="random", **{**FAST_STATS, "log": lines.append})
    first = run_study(tmp_path, **grid)
    cell = _cell(tmp_path, "seed0", "convnext_atto")
    assert first.failed == ["synthetic/seed0/convnext_atto"] and iterations == [1]
    assert torch.load(cell / "models" / "last.pt", weights_only=True)["trainer"]["epoch"] == 1

    stop["after_epoch"], iterations[:], lines[:] = None, [], []
    again = run_study(tmp_path, **grid)
    assert again.ran == ["synthetic/seed0/convnext_atto"] and not again.failed
    assert iterations == [2]  # epoch 2 only: continued, not restarted
    assert any("train: resuming the interrupted training from" in line and "last.pt" in line for line in lines), lines
    record = _cell_json(tmp_path, "seed0", "convnext_atto")
    assert record["status"] == "done" and record["attempt"] == 2 and record["stages"]["train"]["resumed_from"] == "models/last.pt"
    assert torch.load(cell / "models" / "last.pt", weights_only=True)["trainer"]["epoch"] == 2


def test_a_crashing_cell_is_recorded_and_the_grid_goes_on(study, tmp_path):
    folder = _copy(study, tmp_path)
    missing = tmp_path / "no_such_weights"
    weights = {"convnext_atto": str(missing), "uni": "random"}
    with pytest.raises(OptionsChangedError, match=r"weights: \"random\" → \".*no_such_weights"):
        _grid(folder, weights)  # finished runs made with other weights are not mixed with new ones silently
    report = _grid(folder, weights, rerun_changed=True)
    assert sorted(report.failed) == ["synthetic/seed0/convnext_atto", "synthetic/seed1/convnext_atto"]
    assert sorted(report.skipped) == ["synthetic/seed0/uni", "synthetic/seed1/uni"]  # their results are kept
    for s in SPLITS:
        record = _cell_json(folder, s, "convnext_atto")
        assert record["status"] == "failed" and record["error"]["stage"] == "train"
        assert "EncoderWeightsError" in record["error"]["message"] and str(missing) in record["error"]["message"]
        assert _cell_json(folder, s, "uni")["status"] == "done"
    results = folder / "results"
    assert [r["encoder"] for r in _table(results / "summary.csv")] == ["uni"]
    cells = {(r["split"], r["encoder"]): r for r in _table(results / "runs.csv")}
    assert cells[("seed0", "convnext_atto")]["status"] == "failed" and "no_such_weights" in cells[("seed0", "convnext_atto")]["error"]
    assert "seed1/convnext_atto: failed" in (results / "README.md").read_text()
    assert "No gap table" in (results / "gap.md").read_text()

    again = _grid(folder, weights)  # failed cells are retried on the next run, finished ones are not
    assert sorted(again.ran) == sorted(report.failed) and sorted(again.skipped) == sorted(report.skipped)
    assert _cell_json(folder, "seed0", "convnext_atto")["attempt"] == 3  # done once, failed twice


def test_results_can_be_rewritten_from_the_cells(study, tmp_path):
    from cellgap.cli import main

    folder = _copy(study, tmp_path)
    shutil.rmtree(folder / "results")
    assert main(["study", str(folder), "--results-only"]) == 0
    assert all((folder / "results" / name).is_file() for name in RESULT_FILES)
    assert _table(folder / "results" / "summary.csv") == _table(study[0] / "results" / "summary.csv")
    assert write_results(folder, log=lambda text: None) == folder / "results"


def test_bad_grids_are_refused_before_anything_runs(tmp_path, study):
    with pytest.raises(ValueError, match="'nope' is not in the registry"):
        run_study(tmp_path / "s", ["nope"], "synthetic", splits=["seed0"], log=print)
    with pytest.raises(ValueError, match="data seeds"):
        resolve_splits("synthetic", None, ["official1"])
    with pytest.raises(ValueError, match="needs the prepared dataset folder"):
        resolve_splits("pannuke", None, ["official1"])
    with pytest.raises(ValueError, match="'official1' is not a protocol"):
        resolve_splits("folder", study[0] / "data" / "seed0", ["official1"])
    with pytest.raises(ValueError, match="'min_cell_size' is set by the study runner"):
        run_study(tmp_path / "s", ENCODERS, "synthetic", splits=["seed0"], overrides={"min_cell_size": 30})
    with pytest.raises(ValueError, match="not in the grid's encoders"):
        run_study(tmp_path / "s", ["uni"], "synthetic", splits=["seed0"], encoder_weights={"virchow2": "hub"})
    with pytest.raises(ValueError, match="min_cell_sizes"):
        run_study(tmp_path / "s", ["uni"], "synthetic", splits=["seed0"], min_cell_sizes=[0, 10])
    assert not (tmp_path / "s" / "cells").exists()


def test_candidate_output_exposes_one_candidate():
    item = {"pred_instances": 0, "pred_instances_min50": 1, "pred_types_min50": 2, "pred_instances_min55": 3, "id": "a"}
    assert CandidateOutput(50)([item])[0] == {**item, "pred_instances": 1, "pred_types": 2}
    assert CandidateOutput(55)(item)["pred_instances"] == 3


def _tables(n_images: int, seed: int):
    """Per-image score tables of perfect and of damaged predictions on the same GT images."""
    rng = np.random.default_rng(seed)
    protocol = Protocol.cisca()
    good, bad = [], []
    for k in range(n_images):
        gt = random_instances((64, 64), 12, rng)
        gc = random_classes(gt, 3, rng)
        pred = perturb(gt, rng, n_false=3, n_specks=1)
        pc = perturb_classes(pred, gc, 3, rng)
        for out, (p, c) in ((good, (gt, gc)), (bad, (pred, pc))):
            out.append(score_image(gt, p, gc, c, num_classes=3, protocol=protocol, image_id=f"im{k}", tissue=f"t{k % 3}"))
    names = ("a", "b", "c")
    return ScoreTable.from_scores(good, names), ScoreTable.from_scores(bad, names), protocol


def test_pooled_paired_statistics_find_a_real_difference_and_none_between_equals():
    good0, bad0, protocol = _tables(24, 0)
    good1, bad1, _ = _tables(24, 1)
    pairs = [(good0, bad0, protocol), (good1, bad1, protocol)]
    result = pooled_paired_statistics(pairs, "pq", n_resamples=300, n_permutations=300, seed=0)
    one = [paired_bootstrap(a, b, p, "pq", n_resamples=10)["difference"] for a, b, p in pairs]
    assert result["difference"] == pytest.approx(np.mean(one)) and result["difference"] > 0.1
    assert 0 < result["low"] <= result["difference"] <= result["high"]
    assert result["p_permutation"] < 0.01 and result["p_bootstrap"] < 0.01
    same = pooled_paired_statistics([(bad0, bad0, protocol)], "mpq+", n_resamples=100, n_permutations=100)
    assert same["difference"] == 0 and same["p_permutation"] == 1 and same["low"] == same["high"] == 0
    with pytest.raises(ValueError, match="different images"):
        pooled_paired_statistics([(good0, bad1.subset(np.arange(10)), protocol)], "pq")


def test_network_cost_counts_the_network_that_runs():
    from cellgap.network import CellGapNet

    cost = network_cost("convnext_atto", num_classes=3, decoder=TINY)
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        net = CellGapNet("convnext_atto", num_classes=3, encoder_weights=None, allow_random_encoder=True, decoder=TINY)
    assert cost["counted_on"] == "meta"
    assert cost["encoder_params"] == sum(p.numel() for p in net.encoder.parameters())
    assert cost["decoder_params"] == sum(p.numel() for p in net.decoder.parameters())
    assert 0 < cost["encoder_gflops"] < cost["gflops"]
    bigger = network_cost("convnext_atto", num_classes=3, decoder=TINY, tile=512)
    assert bigger["gflops"] == pytest.approx(4 * cost["gflops"], rel=0.05)  # convolutions scale with the pixels


# The fixture's grid as command-line options (the same settings, hence the same run fingerprints).
CLI_ARGS = ["--encoders", *ENCODERS, "--splits", *SPLITS, "--random-weights", "--reduced-encoders", "--epochs", "1",
            "--epoch-length", "1", "--batch-size", "2", "--num-workers", "0", "--decoder", json.dumps(TINY),
            "--synthetic", json.dumps(OVERRIDES["synthetic"]), "--set", "val_batch_size=2", "--set", "tile_size=64",
            "--set", "sw_batch_size=2", "--bootstrap", "100", "--permutations", "100", "--eval-bootstrap", "0"]


def _list(folder: Path, capsys, args=CLI_ARGS) -> tuple[dict, list[str]]:
    """Run id → state, and the commands, as ``--list`` prints them."""
    assert study_main([str(folder), *args, "--list"]) == 0
    out = capsys.readouterr().out
    states = {}
    for line in out.splitlines():
        words = line.split()
        if len(words) == 5 and words[0].startswith("synthetic/"):
            states[words[0]] = words[4]
    return states, [line for line in out.splitlines() if line.startswith("python -m cellgap.study ")]


def test_list_prints_every_run_and_its_command_runs_as_printed(study, tmp_path, capsys, monkeypatch):
    import os
    import subprocess

    folder = _copy(study, tmp_path)
    (_cell(folder, "seed1", "uni") / "cell.json").unlink()
    states, commands = _list(folder, capsys)
    assert states == {f"synthetic/{s}/{e}": "done" for s in SPLITS for e in ENCODERS} | {"synthetic/seed1/uni": "todo"}
    assert len(commands) == 1 and commands[0].endswith("--only synthetic/seed1/uni")
    # As docs/study.md's Slurm array task does: line k of the listed commands through eval, in bash, from another
    # directory; `python` here only shows the words bash hands it (starting an interpreter per test costs ~15 s).
    (tmp_path / "jobs").write_text("\n".join(commands) + "\n")
    shown = subprocess.run(["bash", "-c", 'python() { printf "%s\\0" python "$@"; }; eval "$(sed -n "${TASK}p" jobs)"'],
                           cwd=tmp_path, env={**os.environ, "TASK": "1"}, capture_output=True, text=True, timeout=60)
    argv = shown.stdout.split("\0")[:-1]
    assert shown.returncode == 0 and argv[:3] == ["python", "-m", "cellgap.study"], shown.stderr
    assert argv[3] == str(folder.resolve()) and argv[argv.index("--decoder") + 1] == json.dumps(TINY)
    monkeypatch.chdir(tmp_path)
    assert study_main(argv[3:]) == 0  # what `python -m cellgap.study` runs with those words
    assert _list(folder, capsys) == ({f"synthetic/{s}/{e}": "done" for s in SPLITS for e in ENCODERS}, [])
    record = _cell_json(folder, "seed1", "uni")
    assert record["attempt"] == 1 and record["settings"]["overrides"]["epochs"] == 1
    assert not (_cell(folder, "seed1", "uni") / LOCK_NAME).exists()  # the run's lock is released


def test_only_refuses_unknown_ids_and_runs_another_job_holds(study, tmp_path, capsys):
    import os
    import socket

    folder = _copy(study, tmp_path)
    assert study_main([str(folder), *CLI_ARGS, "--only", "synthetic/seed9/uni"]) == 2
    assert "'synthetic/seed9/uni' not a run of this grid" in capsys.readouterr().err
    held = _cell(folder, "seed0", "uni")
    (held / LOCK_NAME).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                              "what": "study run synthetic/seed0/uni", "started": "now"}))
    states, _ = _list(folder, capsys)
    assert states["synthetic/seed0/uni"] == "running"
    assert study_main([str(folder), *CLI_ARGS, "--only", "synthetic/seed0/uni"]) == 2
    assert "synthetic/seed0/uni is being run by another job" in capsys.readouterr().err
    (held / "cell.json").unlink()  # would be rerun, but another job holds it: left alone
    report = _grid(folder)
    assert report.busy == ["synthetic/seed0/uni"] and report.ran == [] and len(report.skipped) == 3
    assert not (held / "cell.json").exists()


def test_changed_options_are_refused_naming_them(study, tmp_path, capsys):
    folder = _copy(study, tmp_path)
    with pytest.raises(OptionsChangedError, match="(?s)4 finished run.*overrides.epochs: 1 → 2"):
        _grid(folder, overrides={**OVERRIDES, "epochs": 2})
    args = list(CLI_ARGS)
    args[args.index("--epochs") + 1] = "2"
    assert study_main([str(folder), *args, "--only", "synthetic/seed0/uni"]) == 2
    assert "overrides.epochs: 1 → 2" in capsys.readouterr().err
    states, commands = _list(folder, capsys, args)
    assert set(states.values()) == {"changed"} and commands == []


def test_results_merge_marks_missing_runs_and_reports_corrupt_ones(study, tmp_path, capsys):
    folder = _copy(study, tmp_path)
    (_cell(folder, "seed1", "uni") / "cell.json").unlink()  # never finished
    (_cell(folder, "seed1", "convnext_atto") / "eval_test" / "summary.json").write_text("{truncated")  # corrupt
    assert study_main([str(folder), "--results-only"]) == 0
    out = capsys.readouterr().out
    assert "2 of 4 run(s) finished; missing: seed1/convnext_atto (corrupt), seed1/uni (todo)" in out
    assert "seed1/convnext_atto is corrupt, left out: eval_test/summary.json" in out
    results = folder / "results"
    summary = {r["encoder"]: r for r in _table(results / "summary.csv")}
    for e in ENCODERS:  # over the one finished split, and saying so
        assert summary[e]["n_splits"] == "1" and summary[e]["missing_splits"] == "seed1"
        assert float(summary[e]["pq_mean"]) == pytest.approx(_test_metrics(folder, "seed0", e)["pq"])
    md = (results / "summary.md").read_text()
    assert "1 of 2 †" in md and "INCOMPLETE" in md and "uni: 1 of 2 splits; missing seed1" in md
    per_run = {(r["split"], r["encoder"]): r for r in _table(results / "per_run.csv")}
    assert len(per_run) == 4 and per_run[("seed1", "uni")]["status"] == "todo"
    assert per_run[("seed1", "convnext_atto")]["status"] == "corrupt" and per_run[("seed1", "convnext_atto")]["pq"] == "nan"
    assert "MISSING" in (results / "per_run.md").read_text()
    runs = {(r["split"], r["encoder"]): r for r in _table(results / "runs.csv")}
    assert "summary.json" in runs[("seed1", "convnext_atto")]["error"]
    gap = _table(results / "gap.csv")
    assert {r["split"] for r in gap} == {"seed0", "all (mean over 1 of 2 splits)"}
    assert "INCOMPLETE" in (results / "gap.md").read_text() and "1 of 2 splits" in (results / "per_class.md").read_text()


def test_dry_run_plans_steps_flops_hours_and_cache_disk(tmp_path, capsys):
    import math

    from cellgap.encoders import FrozenEncoder
    from cellgap.study.estimate import estimate
    from cellgap.study.runner import make_plan

    folder = tmp_path / "s"
    overrides = {**OVERRIDES, "epochs": 3, "epoch_length": None, "cache_mode": "clean"}
    plan = make_plan(folder, ENCODERS, "synthetic", None, SPLITS, overrides, "random")
    result = estimate(plan, folder, ["uni=100", "convnext_atto=50"], only=["synthetic/seed1/uni", "synthetic/seed0/convnext_atto"])
    assert [r["run"] for r in result["runs"]] == ["synthetic/seed0/convnext_atto", "synthetic/seed1/uni"]
    for r in result["runs"]:
        assert r["steps"] == 3 * math.ceil(2 / 2)  # epochs × batches of the 2 training tiles
        cost = network_cost(r["encoder"], 3, TINY, reduced=True)
        expected = 2 * (cost["encoder_gflops"] + 3 * (cost["gflops"] - cost["encoder_gflops"])) * (64 / 256) ** 2
        assert r["train_gflops_per_step"] == pytest.approx(expected)
        tiles = 3 * 2 + 3 * 2 + 2 + 3  # training tiles, a val pass per epoch, selection on val, test
        assert r["gpu_hours"] == pytest.approx(tiles / {"uni": 100, "convnext_atto": 50}[r["encoder"]] / 3600)
        with pytest.warns(UserWarning, match="RANDOMLY"):
            encoder = FrozenEncoder(r["encoder"], weights=None, allow_random=True, reduced=True)
        with torch.no_grad():
            maps = encoder(torch.zeros(1, 3, 64, 64))
        assert r["cache_bytes"] == 2 * sum(m.numel() for m in maps) * 2  # 2 training tiles, float16
    assert result["total"]["gpu_hours"] == pytest.approx(sum(r["gpu_hours"] for r in result["runs"]))
    assert study_main([str(folder), *CLI_ARGS, "--dry-run", "--tiles-per-second", "uni=100"]) == 0
    out = capsys.readouterr().out
    assert "synthetic/seed1/uni" in out and "\ntotal" in out and "pass --tiles-per-second convnext_atto=N" in out
    assert study_main([str(folder), *CLI_ARGS, "--dry-run", "--tiles-per-second", "uni=fast"]) == 2
    assert "--tiles-per-second 'uni=fast': expected a positive number" in capsys.readouterr().err
    assert not folder.exists()  # a plan, nothing written


def test_torchrun_ranks_share_the_grid_and_match_a_sequential_run(study, tmp_path):
    """``torchrun --nproc-per-node 2 -m cellgap.study``: two CPU ranks (gloo barrier) over the 2 × 2 grid."""
    import os
    import subprocess
    import sys

    folder = tmp_path / "ranks"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "cellgap.study", str(folder), *CLI_ARGS], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    ranks = {}
    for s in SPLITS:
        for e in ENCODERS:
            record = _cell_json(folder, s, e)
            assert record["status"] == "done" and record["attempt"] == 1 and record["history"] == []  # trained once
            assert record["worker"]["world_size"] == 2 and record["worker"]["device"] == "cpu"
            ranks.setdefault(record["worker"]["rank"], []).append(f"{s}/{e}")
    assert sorted(ranks) == [0, 1] and all(len(v) == 2 for v in ranks.values())  # each rank its share
    for s in SPLITS:
        for e in ENCODERS:
            mine, theirs = _test_metrics(folder, s, e), _test_metrics(study[0], s, e)
            for m in ("pq", "bpq", "mpq+", "aji", "dice", "f1d"):
                assert mine[m] == pytest.approx(theirs[m], abs=1e-6, nan_ok=True), (s, e, m)
    summary, sequential = _table(folder / "results" / "summary.csv"), _table(study[0] / "results" / "summary.csv")
    assert [r["encoder"] for r in summary] == [r["encoder"] for r in sequential]
    for a, b in zip(summary, sequential):
        for key in ("pq_mean", "pq_sd", "mpq+_mean", "f1d_mean"):
            assert float(a[key]) == pytest.approx(float(b[key]), abs=1e-6, nan_ok=True)
