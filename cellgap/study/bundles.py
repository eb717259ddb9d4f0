"""The study's use of the encoders' MONAI bundles: which bundle, its defaults, a run's overrides, running a config."""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

from .plan import SplitSpec, StudyPlan


def bundle_root(encoder: str, plan: StudyPlan, study_dir: Path) -> Path:
    from ..bundle import bundle_name, write_bundle

    if plan.bundles_dir:
        root = Path(plan.bundles_dir) / bundle_name(encoder)
        if not (root / "configs" / "train.json").is_file():
            raise FileNotFoundError(f"bundles_dir: {root} has no configs/train.json (scripts/build_bundles.py writes bundles)")
        return root
    committed = Path(__file__).resolve().parents[2] / "bundles" / bundle_name(encoder)
    if (committed / "configs" / "train.json").is_file():
        return committed
    return write_bundle(encoder, study_dir / "bundles")  # installed package without a checkout


def bundle_defaults(root: Path) -> dict:
    return json.loads((root / "configs" / "train.json").read_text(encoding="utf-8"))


@contextlib.contextmanager
def quiet_warnings():
    """MONAI's config-security notice and the random-encoder warning, once per stage, add nothing here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*arbitrary code.*|.*any `\"_target_\"` value.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*RANDOMLY INITIALISED.*")
        yield


def run_bundle(root: Path, configs: list[str], overrides: dict) -> None:
    from monai.bundle import run

    with quiet_warnings():
        run(config_file=[str(root / "configs" / c) for c in configs], meta_file=str(root / "configs" / "metadata.json"),
            logging_file=str(root / "configs" / "logging.conf"), **overrides)


def _weights_overrides(value: str) -> dict:
    if value == "random":
        return {"encoder_weights": "none", "allow_random_encoder": True}
    return {"encoder_weights": value if value == "hub" else str(Path(value).expanduser()), "allow_random_encoder": False}


def run_overrides(plan: StudyPlan, split: SplitSpec, encoder: str, run_folder: Path, root: Path) -> dict:
    """Bundle overrides of one run: where things go, which data and split, which weights, the user's settings."""
    out = dict(plan.overrides)
    out.update({"bundle_root": str(root), "ckpt_dir": str(run_folder / "models"), "output_dir": str(run_folder / "runs"),
                "dataset": plan.dataset})
    out.update(_weights_overrides(plan.encoder_weights[encoder]))
    if plan.dataset == "synthetic":
        synthetic = dict(plan.overrides.get("synthetic") or bundle_defaults(root).get("synthetic") or {})
        synthetic["seed"] = split.data_seed
        out["synthetic"] = synthetic
        out["dataset_dir"] = str(Path(plan.dataset_dir) / split.name)
        out["protocol"] = None
    else:
        out["dataset_dir"] = str(plan.dataset_dir)
        out["protocol"] = split.protocol
    return out


def error_chain(error: BaseException) -> list[str]:
    """Every message of an exception chain, outermost first (MONAI wraps the cause in 'Failed to …')."""
    texts, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        texts.append(f"{type(error).__name__}: {error}".strip())
        error = error.__cause__ or error.__context__
    return texts
