"""cellgap: cell segmentation and classification with frozen foundation-model encoders and the CISCA decoder,
as MONAI bundles. Every sub-command runs a bundle and prints the equivalent `python -m monai.bundle run` line.

examples:
  cellgap demo                                            # offline: train, evaluate, infer on synthetic tiles
  cellgap prepare folder --raw ~/my_tiles --out data/my_tiles --magnification 40
  cellgap train data/my_tiles --encoder uni --out runs/my_uni --epochs 50
  cellgap evaluate runs/my_uni --split test
  cellgap encoders                                        # the encoder registry"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import warnings
from pathlib import Path

from .encoders import DEMO_ENCODER, ENCODERS, EncoderWeightsError, FrozenEncoder

# A small decoder that trains on 2 CPU cores in a couple of minutes (the study uses the full widths).
DEMO_DECODER = {"widths": [8, 16, 32, 48, 64, 96], "head_features": 16, "head_width": 8, "norm": "batch",
                "channels_last": True}
BANNER = "!" * 100


def _say(text: str) -> None:
    print(text, flush=True)


def demo_bundle(workdir: Path) -> Path:
    """The committed demo bundle when running from a checkout; otherwise rendered into ``workdir``."""
    from .commands.bundle_run import bundle_for

    return bundle_for(DEMO_ENCODER, workdir)


def _encoder_weights() -> tuple[str | None, bool]:
    """Try the demo encoder's pretrained weights; offline, say loudly that it will be random."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            FrozenEncoder(DEMO_ENCODER, weights="hub")
        return "hub", False
    except EncoderWeightsError as e:
        _say(f"\n{BANNER}\nNO PRETRAINED WEIGHTS: {e}\nThe demo carries on with a RANDOMLY INITIALISED {DEMO_ENCODER} encoder. "
             f"Its numbers show that the pipeline works, not how good the encoder is.\n{BANNER}\n")
        return None, True


def _run_bundle(config_files: list[Path], **overrides) -> None:
    from .commands.bundle_run import run_bundle

    bundle = Path(overrides.pop("bundle_root"))
    overrides.pop("logging_file", None), overrides.pop("meta_file", None)
    run_bundle(bundle, [Path(c).name for c in config_files], overrides)


def run_demo(args: argparse.Namespace) -> dict:
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    bundle = demo_bundle(workdir)
    configs = bundle / "configs"
    weights, random_encoder = _encoder_weights()
    common = {
        "bundle_root": str(bundle), "logging_file": str(configs / "logging.conf"),
        "meta_file": str(configs / "metadata.json"),
        "encoder_weights": weights if weights else "none", "allow_random_encoder": random_encoder,
        "decoder": DEMO_DECODER, "ckpt_dir": str(workdir / "models"), "output_dir": str(workdir / "runs"),
        "dataset": "synthetic", "dataset_dir": str(workdir / "data"), "num_workers": args.workers,
        "synthetic": {"n_train": args.train_tiles, "n_val": args.val_tiles, "n_test": args.test_tiles, "seed": args.seed,
                      "magnification": args.magnification},
        "seed": args.seed, "sw_batch_size": 4, "cache_rate": 1.0,
    }
    timings = {}
    start = time.time()
    _say(f"[1/3] training the decoder of bundle {bundle.name} on synthetic tiles ({args.epochs} epochs) → {workdir}")
    _run_bundle([configs / "train.json"], epochs=args.epochs, batch_size=args.batch_size, val_batch_size=4,
                train_crop_size=args.crop, epoch_length=args.steps or None,
                learning_rate=args.learning_rate, grad_clip_norm=None, augment_prob_scale=args.augment, **common)
    timings["train_s"] = round(time.time() - start, 1)

    _say("[2/3] evaluating on the held-out synthetic test tiles")
    t = time.time()
    _run_bundle([configs / "train.json", configs / "evaluate.json"], eval_split="test", bootstrap=200, **common)
    timings["evaluate_s"] = round(time.time() - t, 1)
    summary = json.loads((workdir / "runs" / "eval_test" / "summary.json").read_text())

    _say("[3/3] inference on a few test tiles (instance map, class map, cell table, overlay, GeoJSON)")
    t = time.time()
    inputs = workdir / "inference_input"
    shutil.rmtree(inputs, ignore_errors=True)
    inputs.mkdir()
    from .data.prepared import datalist

    for item in datalist(workdir / "data", "test")[:4]:
        shutil.copy(item["image"], inputs / Path(item["image"]).name)
    infer = {k: v for k, v in common.items() if k not in ("dataset", "dataset_dir", "synthetic", "seed", "num_workers")}
    infer["output_dir"] = str(workdir / "inference")
    _run_bundle([configs / "inference.json"], input_dir=str(inputs), **infer)
    timings["inference_s"] = round(time.time() - t, 1)
    timings["total_s"] = round(time.time() - start, 1)

    metrics = summary.get("metrics", summary)
    result = {
        "what": "cellgap demo: frozen encoder + CISCA decoder trained and evaluated on built-in synthetic tiles",
        "encoder": DEMO_ENCODER, "encoder_weights": "pretrained (hub)" if weights else "RANDOM (no pretrained weights offline)",
        "decoder": DEMO_DECODER, "epochs": args.epochs,
        "pq": metrics.get("pq"), "bpq": metrics.get("bpq"), "mpq+": metrics.get("mpq+"), "f1d": metrics.get("f1d"),
        "protocol": summary.get("protocol"), "timings": timings,
        "outputs": {"tensorboard": str(workdir / "runs"), "checkpoint": str(workdir / "models" / "model.pt"),
                    "evaluation": str(workdir / "runs" / "eval_test"), "inference": str(workdir / "inference")},
    }
    (workdir / "metrics.json").write_text(json.dumps(result, indent=2, default=str))
    _say(f"\nheld-out synthetic test tiles ({result['encoder_weights']} encoder): "
         f"PQ {result['pq']:.3f}  mPQ+ {result['mpq+']:.3f}  detection F1 {result['f1d']:.3f}")
    _say(f"metrics: {workdir / 'metrics.json'}   overlays: {workdir / 'inference'}   "
         f"TensorBoard: tensorboard --logdir {workdir / 'runs'}   ({timings['total_s']:.0f} s)")
    return result


def list_encoders(_args: argparse.Namespace) -> None:
    for spec in ENCODERS.values():
        access = "gated" if spec.gated else "open"
        print(f"{spec.key:20s} {spec.domain:10s} {access:6s} {spec.model_id:45s} {spec.display_name}")


def main(argv: list[str] | None = None) -> int:
    from .commands import evaluate, prepare, train
    from .commands.bundle_run import CommandError

    parser = argparse.ArgumentParser(prog="cellgap", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module, text in (("prepare", prepare, "convert a dataset (or your own annotated images) into the prepared layout"),
                               ("train", train, "train an encoder's decoder on a prepared dataset into a run folder"),
                               ("evaluate", evaluate, "metrics reports of a run folder on a split of its dataset")):
        command = sub.add_parser(name, help=text, formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(command)
        command.set_defaults(func=module.run)
    demo = sub.add_parser("demo", help="train, evaluate and run the demo bundle on built-in synthetic data (offline)",
                          description="Train, evaluate and run the demo bundle on built-in synthetic tiles, offline.",
                          epilog="example: cellgap demo --workdir runs/demo --epochs 4")
    demo.add_argument("--workdir", default="runs/demo", help="where data, checkpoints, logs and outputs go")
    demo.add_argument("--epochs", type=int, default=4)
    demo.add_argument("--batch-size", type=int, default=8)
    demo.add_argument("--crop", type=int, default=128, help="side of the random training crops")
    demo.add_argument("--steps", type=int, default=75, help="iterations per epoch (0: one pass over the tiles)")
    demo.add_argument("--learning-rate", type=float, default=2e-3)
    demo.add_argument("--augment", type=float, default=0.5, help="scale of the augmentation probabilities (0 = none)")
    demo.add_argument("--train-tiles", type=int, default=64)
    demo.add_argument("--val-tiles", type=int, default=8)
    demo.add_argument("--test-tiles", type=int, default=24)
    demo.add_argument("--magnification", type=int, default=20, choices=[20, 40])
    demo.add_argument("--workers", type=int, default=0, help="data-loader worker processes")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=run_demo)
    from .study import add_study_arguments
    from .study.options import run_and_report

    study = sub.add_parser("study", help="run the encoders × splits study grid and write its results (docs/study.md)")
    add_study_arguments(study)
    study.set_defaults(func=run_and_report)
    from .slide import command as segment_command

    segment = sub.add_parser("segment", help="segment and classify every cell of whole slides or images (docs/slides.md)")
    segment_command.add_arguments(segment)
    segment.set_defaults(func=segment_command.run)
    enc = sub.add_parser("encoders", help="list the encoder registry")
    enc.set_defaults(func=list_encoders)
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except CommandError as error:
        print(f"cellgap {args.command}: error: {error}", file=sys.stderr)
        return 1
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
