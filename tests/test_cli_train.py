"""``cellgap prepare / train / evaluate``: a thin front over the bundles (issue #20 item 1) and its bad input."""

import json
import warnings

import pytest

from cellgap.cli import main
from tests.test_training_any_size import user_folder


def cellgap(*argv) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return main([str(a) for a in argv])


@pytest.mark.parametrize("command", ["prepare", "train", "evaluate", "demo"])
def test_every_command_explains_itself_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert f"cellgap {command}" in text and "example" in text.lower()


def test_top_level_help_lists_the_commands_with_examples(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert all(f"cellgap {c}" in text for c in ("prepare", "train", "evaluate", "demo"))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    raw = user_folder(tmp / "raw", ["train", "train", "test"], size=320)  # no val split: held out from the training images
    assert cellgap("prepare", "folder", "--raw", raw, "--out", tmp / "data", "--no-progress", "--workers", "1") == 0
    code = cellgap("train", tmp / "data", "--encoder", "convnext_atto", "--out", tmp / "run", "--encoder-weights", "none",
                   "--decoder", "small", "--epochs", "1", "--steps", "1", "--batch-size", "8", "--crop", "64",
                   "--workers", "0", "--device", "cpu")
    assert code == 0
    return tmp


def test_train_records_the_run_and_prints_the_bundle_command(trained_run, capsys):
    run = json.loads((trained_run / "run" / "run.json").read_text())
    assert run["encoder"] == "convnext_atto" and run["dataset"] == "folder"
    assert run["options"]["batch_size"] == 8 and run["options"]["allow_random_encoder"] is True
    assert (trained_run / "run" / "models" / "model.pt").is_file()
    assert list((trained_run / "run" / "runs" / "holdout" / "images").glob("*_val0.png"))


def test_evaluate_needs_only_the_run_folder(trained_run, capsys):
    assert cellgap("evaluate", trained_run / "run", "--split", "test", "--bootstrap", "0") == 0
    out = capsys.readouterr().out
    assert "python -m monai.bundle run" in out and "evaluate.json" in out
    summary = json.loads((trained_run / "run" / "runs" / "eval_test" / "summary.json").read_text())
    assert "metrics" in summary or "pq" in summary


def test_a_trained_run_is_never_overwritten(trained_run, capsys):
    assert cellgap("train", trained_run / "data", "--encoder", "convnext_atto", "--out", trained_run / "run") == 1
    assert "already holds a trained model" in capsys.readouterr().err


def test_resume_without_a_checkpoint_names_the_missing_file(trained_run, tmp_path, capsys):
    assert cellgap("train", trained_run / "data", "--encoder", "convnext_atto", "--out", tmp_path / "fresh", "--resume") == 1
    assert str(tmp_path / "fresh" / "models" / "last.pt") in capsys.readouterr().err


@pytest.mark.parametrize("options, message", [
    (["--encoder", "not_an_encoder"], "known encoders"),
    (["--encoder", "convnext_atto", "--no-val", "--val-split", "val"], "contradictory"),
    (["--encoder", "convnext_atto", "--crop", "100"], "multiple of 32"),
    (["--encoder", "convnext_atto", "--device", "tpu"], "--device"),
])
def test_bad_options_are_named(options, message, trained_run, tmp_path, capsys):
    assert cellgap("train", trained_run / "data", "--out", tmp_path / "run", *options) == 1
    assert message in capsys.readouterr().err


def test_a_val_split_the_dataset_lacks_stops_naming_it_the_splits_and_the_fix(trained_run, tmp_path, capsys):
    """The held-out share stands in for the default 'val' only (trained_run has no val split and trains)."""
    assert cellgap("train", trained_run / "data", "--encoder", "convnext_atto", "--out", tmp_path / "run",
                   "--val-split", "valid", "--encoder-weights", "none") == 1
    err = capsys.readouterr().err
    assert "--val-split valid" in err and "no split 'valid'" in err and "['test', 'train']" in err
    assert "drop --val-split" in err
    assert not (tmp_path / "run").exists()  # stopped before anything was written


def test_empty_or_missing_data_folders_say_how_to_prepare_one(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "missing"):
        assert cellgap("train", folder, "--encoder", "convnext_atto", "--out", tmp_path / "run") == 1
        assert "cellgap prepare folder" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_an_unreadable_prepared_folder_is_named(tmp_path, capsys):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "dataset.json").write_text("{not json")
    assert cellgap("train", tmp_path / "bad", "--encoder", "convnext_atto", "--out", tmp_path / "run") == 1
    assert "dataset.json: not valid JSON" in capsys.readouterr().err


def test_evaluate_of_a_folder_that_is_no_run(tmp_path, capsys):
    assert cellgap("evaluate", tmp_path) == 1
    assert "run.json: missing" in capsys.readouterr().err


def test_resume_of_a_run_of_another_encoder_is_refused_with_the_reason(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "models").mkdir(parents=True)
    (run / "models" / "last.pt").write_bytes(b"state")
    record = json.loads((trained_run / "run" / "run.json").read_text())
    (run / "run.json").write_text(json.dumps(record))
    assert cellgap("train", trained_run / "data", "--encoder", "uni", "--out", run, "--resume") == 1
    assert "trained with encoder 'convnext_atto', not 'uni'" in capsys.readouterr().err
    assert (run / "models" / "last.pt").read_bytes() == b"state"  # nothing touched
