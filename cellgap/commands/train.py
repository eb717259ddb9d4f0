"""``cellgap train``: train the decoder of an encoder's bundle on a prepared dataset, into a run folder.

Example::

    cellgap prepare folder --raw ~/my_tiles --out data/my_tiles --magnification 40
    cellgap train data/my_tiles --encoder uni --out runs/my_uni --epochs 50
    cellgap evaluate runs/my_uni --split test

The bundle (``bundles/cisca_<encoder>/configs/train.json``) does the work; the command prints the
equivalent ``python -m monai.bundle run`` line. ``RUN_DIR/run.json`` records the encoder, dataset and
options, so ``cellgap evaluate RUN_DIR`` and ``cellgap segment --model RUN_DIR`` need nothing else.
Without a ``val`` split a seeded share of the training images is held out for validation; ``--no-val``
trains without validation and keeps the last model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..data.prepared import INFO, read_dataset_info, read_manifest
from ..data.registry import DATASETS
from ..locking import output_lock
from .bundle_run import CommandError, bundle_for, known_encoder, run_bundle, say
from .run_folder import MODEL, RESUME_STATE, RUN_FILE, read_run, run_overrides, write_run

EXAMPLE = "example: cellgap train data/my_tiles --encoder uni --out runs/my_uni --epochs 50 --batch-size 8"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0]
    parser.epilog = EXAMPLE
    parser.add_argument("data_dir", metavar="DATA_DIR", help="a prepared dataset (`cellgap prepare`)")
    parser.add_argument("--encoder", required=True, help="encoder registry key (`cellgap encoders`), e.g. uni, convnext_atto")
    parser.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder: run.json, models/, runs/ (TensorBoard)")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps per epoch (default: one pass over the training images, at least one batch)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-4, help="learning rate")
    parser.add_argument("--crop", type=int, default=256, help="side of the random training crops (a multiple of 32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--encoder-weights", default="hub",
                        help="'hub' (timm / Hugging Face; HF_TOKEN for gated models), a local weights file or folder, "
                             "or 'none' for a randomly initialised encoder (a pipeline check, not a real model)")
    parser.add_argument("--decoder", choices=("full", "small"), default="full",
                        help="full: the study's decoder widths; small: the demo's narrow decoder (trains on a CPU)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the first GPU if any)")
    parser.add_argument("--workers", type=int, default=4, help="data-loader worker processes")
    parser.add_argument("--val-split", default=None,
                        help="split that validates (default 'val'; without one, training images are held out); a split the "
                             "dataset lacks is an error")
    parser.add_argument("--no-val", action="store_true", help="no validation or model selection; keep the last model")
    parser.add_argument("--resume", action="store_true", help=f"continue the run in RUN_DIR from {RESUME_STATE}")


def dataset_kind(data_dir: Path) -> str:
    """The registry name of a prepared dataset (pannuke, conic, cytodark0, synthetic), else ``folder``."""
    name = read_dataset_info(data_dir).name.split("_")[0]
    return name if name in DATASETS and name != "folder" else "folder"


def check_options(args: argparse.Namespace) -> None:
    for flag, value, low in (("--epochs", args.epochs, 1), ("--batch-size", args.batch_size, 1),
                             ("--steps", args.steps, 1), ("--crop", args.crop, 32), ("--workers", args.workers, 0)):
        if value is not None and value < low:
            raise CommandError(f"{flag} {value}: expected at least {low}")
    if args.crop % 32:
        raise CommandError(f"--crop {args.crop}: expected a multiple of 32 (the encoder's stride), e.g. {args.crop // 32 * 32 or 32}")
    if not args.lr > 0:
        raise CommandError(f"--lr {args.lr}: expected a positive learning rate")
    if args.no_val and args.val_split is not None:
        raise CommandError(f"--no-val and --val-split {args.val_split}: contradictory; drop one (--no-val trains "
                           "without validation)")
    if args.device is not None and not (args.device == "cpu" or args.device == "cuda" or args.device.startswith("cuda:")):
        raise CommandError(f"--device {args.device!r}: expected cpu, cuda or cuda:N")


def overrides_from(args: argparse.Namespace, dataset: str, data_dir: Path) -> dict:
    """The bundle overrides of the options (no folder paths: those come from the run folder)."""
    random = args.encoder_weights.lower() in ("none", "random")
    options = {"dataset": dataset, "dataset_dir": str(data_dir), "encoder_weights": "none" if random else args.encoder_weights,
               "allow_random_encoder": random, "epochs": args.epochs, "epoch_length": args.steps,
               "batch_size": args.batch_size, "learning_rate": args.lr, "train_crop_size": args.crop, "seed": args.seed,
               "num_workers": args.workers, "validation": not args.no_val}
    if args.val_split is not None:
        options["val_split"] = args.val_split
    if args.decoder == "small":
        from ..cli import DEMO_DECODER

        options["decoder"] = DEMO_DECODER
    if args.device is not None:
        options["device"] = f"$torch.device({args.device!r})"
        options["amp"] = args.device.startswith("cuda")
    return options


def check_val_split(data_dir: Path, split: str | None) -> None:
    """A ``--val-split`` the user named must exist: the held-out share replaces only the default 'val'."""
    if split is None:
        return
    splits = sorted({row.get("split", "") for row in read_manifest(data_dir)})
    if split not in splits:
        raise CommandError(f"--val-split {split}: {data_dir} has no split {split!r}; its splits are {splits}. Name one "
                           "of them (not the test split), or drop --val-split to hold out a share of the training images "
                           "for validation")


def check_run_folder(run_dir: Path, args: argparse.Namespace, encoder: str, data_dir: Path) -> None:
    """Never overwrite a trained run; resume only the same encoder and dataset, from an existing state."""
    if args.resume:
        state = run_dir / RESUME_STATE
        if not state.is_file():
            raise CommandError(f"--resume: {state} is missing, so there is no run to continue; start a new run "
                               f"without --resume (or with another --out)")
        record = read_run(run_dir)
        if record["encoder"] != encoder:
            raise CommandError(f"--resume: {run_dir / RUN_FILE} was trained with encoder {record['encoder']!r}, not "
                               f"{encoder!r}; resume with --encoder {record['encoder']} or train into another --out")
        if Path(record["dataset_dir"]) != data_dir.resolve():
            raise CommandError(f"--resume: {run_dir / RUN_FILE} was trained on {record['dataset_dir']}, not {data_dir.resolve()}; "
                               "resume on the same dataset or train into another --out")
    elif (run_dir / MODEL).exists() or (run_dir / RESUME_STATE).exists():
        raise CommandError(f"{run_dir} already holds a trained model ({run_dir / MODEL}); continue it with --resume, "
                           "or choose another --out (nothing is overwritten)")


def run(args: argparse.Namespace) -> dict:
    check_options(args)
    encoder = known_encoder(args.encoder)
    data_dir = Path(args.data_dir).expanduser()
    if not data_dir.is_dir():
        raise CommandError(f"DATA_DIR {data_dir}: no such folder; prepare one with `cellgap prepare folder --raw <your "
                           f"images and labels> --out {data_dir}`")
    if not (data_dir / INFO).is_file():
        raise CommandError(f"DATA_DIR {data_dir}: no {INFO}, so it is not a prepared dataset; prepare it with "
                           f"`cellgap prepare folder --raw {data_dir} --out <prepared folder>`")
    try:
        dataset = dataset_kind(data_dir)
    except (OSError, ValueError) as error:
        raise CommandError(str(error)) from None
    try:
        check_val_split(data_dir, args.val_split)
    except (OSError, ValueError) as error:
        raise CommandError(str(error)) from None
    run_dir = Path(args.out).expanduser()
    check_run_folder(run_dir, args, encoder, data_dir)
    options = overrides_from(args, dataset, data_dir)
    if options["allow_random_encoder"]:
        say(f"NOTE: --encoder-weights {args.encoder_weights}: the {encoder} encoder is RANDOMLY INITIALISED; the model "
            "shows that the pipeline works, not what the encoder can do")
    run_dir.mkdir(parents=True, exist_ok=True)
    with output_lock(run_dir, "cellgap train"):
        write_run(run_dir, encoder, dataset, data_dir, options)
        bundle = bundle_for(encoder, run_dir)
        overrides = {**options, **run_overrides(run_dir)}
        if args.resume:
            # consumed by the bundle's resume entry (issue #20 item 4, the checkpoint module); no-op until it lands
            overrides["resume"] = True
        say(f"training the {encoder} decoder on {data_dir} ({dataset}) → {run_dir}")
        run_bundle(bundle, ["train.json"], overrides)
    say(f"model: {run_dir / MODEL}   TensorBoard: tensorboard --logdir {run_dir / 'runs'}   "
        f"evaluate: cellgap evaluate {run_dir} --split test")
    return {"run_dir": str(run_dir), "model": str(run_dir / MODEL)}
