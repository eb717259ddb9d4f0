"""Running a MONAI bundle from a sub-command: the bundle stays the engine, the command only chooses its
configs and overrides, prints the equivalent ``python -m monai.bundle run ...`` line, and turns the error of a
failed run into one clear message (MONAI wraps it in "Failed to evaluate ConfigExpression ...")."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from ..encoders import get_encoder_spec


class CommandError(Exception):
    """An error the command reports in one line (no traceback): bad options, bad data, a failed bundle step."""


def say(text: str) -> None:
    print(text, flush=True)


def bundle_for(encoder: str, workdir: Path) -> Path:
    """The committed bundle of ``encoder`` when running from a checkout; otherwise rendered into ``workdir/bundle``."""
    from ..bundle import bundle_name, write_bundle

    committed = Path(__file__).resolve().parents[2] / "bundles" / bundle_name(encoder)
    if (committed / "configs" / "train.json").is_file():
        return committed
    return write_bundle(encoder, workdir / "bundle")


def known_encoder(name: str) -> str:
    """The registry key of encoder ``name``; CommandError listing the keys otherwise."""
    try:
        return get_encoder_spec(name).key
    except (KeyError, ValueError) as error:
        raise CommandError(f"--encoder {name!r}: {error.args[0] if error.args else 'unknown encoder'} "
                           "(`cellgap encoders` lists them)") from None


def equivalent_command(bundle: Path, configs: list[str], overrides: dict) -> str:
    """The ``python -m monai.bundle run`` line that does what :func:`run_bundle` does."""
    files = [str(bundle / "configs" / c) for c in configs]
    config = shlex.quote(files[0] if len(files) == 1 else json.dumps(files))
    parts = ["python -m monai.bundle run", f"--config_file {config}",
             f"--meta_file {shlex.quote(str(bundle / 'configs' / 'metadata.json'))}"]
    for key, value in overrides.items():
        text = value if isinstance(value, str) else json.dumps(value)
        parts.append(f"--{key} {shlex.quote(text)}")
    return " ".join(parts)


def root_cause(error: BaseException) -> BaseException:
    """The innermost exception of a chain: the cause MONAI's config parser wrapped."""
    seen = set()
    while (error.__cause__ or error.__context__) is not None and id(error) not in seen:
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return error


def run_bundle(bundle: Path, configs: list[str], overrides: dict, show: bool = True) -> None:
    """Run ``configs`` of ``bundle`` with ``overrides``; print the equivalent command first (``show``)."""
    from monai.bundle import run

    from ..study.bundles import quiet_warnings

    if show:
        say(f"equivalent bundle command:\n  {equivalent_command(bundle, configs, overrides)}")
    settings = {"bundle_root": str(bundle), "meta_file": str(bundle / "configs" / "metadata.json"),
                "logging_file": str(bundle / "configs" / "logging.conf"), **overrides}
    try:
        with quiet_warnings():
            run(config_file=[str(bundle / "configs" / c) for c in configs], **settings)
    except KeyboardInterrupt:
        raise
    except Exception as error:  # noqa: BLE001 — reported as its root cause, the message cellgap wrote
        cause = root_cause(error)
        raise CommandError(f"{type(cause).__name__}: {cause}") from error


__all__ = ["CommandError", "bundle_for", "equivalent_command", "known_encoder", "root_cause", "run_bundle", "say"]
