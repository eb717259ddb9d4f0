"""One bundle's files rendered from the encoder registry, and written to ``bundles/<bundle name>/``.

``scripts/build_bundles.py`` writes them and a test fails when a committed bundle differs from what is rendered.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..atomic import atomic_write_text
from ..encoders import ENCODERS, EncoderSpec, get_encoder_spec
from ..slide.bundle_config import segment_config
from .configs import evaluate_config, inference_config, multi_gpu_config, train_config
from .documents import LARGE_FILES, LOGGING_CONF, license_text, metadata, readme
from .json_layout import json_text
from .naming import bundle_name


def render_bundle(spec: EncoderSpec | str) -> dict[str, str]:
    """Relative path → text of every generated file of one bundle."""
    spec = get_encoder_spec(spec)
    return {
        "configs/metadata.json": json_text(metadata(spec)),
        "configs/train.json": json_text(train_config(spec)),
        "configs/evaluate.json": json_text(evaluate_config()),
        "configs/inference.json": json_text(inference_config(spec)),
        "configs/segment.json": json_text(segment_config()),
        "configs/multi_gpu_train.json": json_text(multi_gpu_config()),
        "configs/logging.conf": LOGGING_CONF,
        "docs/README.md": readme(spec),
        "LICENSE": license_text(),
        "large_files.yml": LARGE_FILES,
    }


def write_bundle(spec: EncoderSpec | str, bundles_dir: str | os.PathLike) -> Path:
    root = Path(bundles_dir) / bundle_name(spec)
    for rel, text in render_bundle(spec).items():
        atomic_write_text(root / rel, text)
    return root


def all_bundle_keys() -> list[str]:
    return list(ENCODERS)
