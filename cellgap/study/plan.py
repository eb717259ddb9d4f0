"""The study plan: which encoders, dataset, splits and weights make the grid; stored as ``study.json``."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..encoders import ENCODERS, EXTRA_ENCODERS, STUDY_ENCODERS

STUDY_FILE = "study.json"
WEIGHTS_RANDOM = ("random", "none")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


@dataclass(frozen=True)
class SplitSpec:
    """One split of the grid: a protocol of the prepared dataset, or a seed of the synthetic dataset."""

    name: str
    protocol: str | None = None
    data_seed: int | None = None


@dataclass
class StudyPlan:
    """Everything that defines a study; stored as ``study.json``."""

    dataset: str
    dataset_dir: str
    encoders: list[str]
    splits: list[SplitSpec]
    overrides: dict = field(default_factory=dict)
    encoder_weights: dict = field(default_factory=dict)
    min_cell_sizes: list[int] | None = None
    gap_metrics: list[str] | None = None
    bootstrap: int = 2000
    permutations: int = 5000
    confidence: float = 0.95
    seed: int = 0
    eval_bootstrap: int = 1000
    bundles_dir: str | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> StudyPlan:
        data = dict(data)
        data["splits"] = [SplitSpec(**s) for s in data["splits"]]
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def encoder_list(encoders: str | Sequence[str] | None) -> list[str]:
    """Registry keys of the grid, groups (``study``, ``extra``, ``all``) expanded, in order, without repeats."""
    groups = {"study": list(STUDY_ENCODERS), "extra": list(EXTRA_ENCODERS), "all": list(STUDY_ENCODERS) + list(EXTRA_ENCODERS)}
    if encoders is None:
        return list(STUDY_ENCODERS)
    if isinstance(encoders, str):
        encoders = [encoders]
    out: list[str] = []
    for name in encoders:
        for key in groups.get(str(name), [str(name)]):
            if key not in ENCODERS:
                raise ValueError(f"encoders: {key!r} is not in the registry; expected keys of {sorted(ENCODERS)} "
                                 f"or a group {sorted(groups)}")
            if key not in out:
                out.append(key)
    if not out:
        raise ValueError("encoders: the grid needs at least one encoder")
    return out


def weights_table(encoders: list[str], encoder_weights) -> dict[str, str]:
    """Encoder → "hub", "random" or a local path (str)."""
    if encoder_weights is None or isinstance(encoder_weights, (str, Path)):
        default = "hub" if encoder_weights is None else str(encoder_weights)
        table = {}
    elif isinstance(encoder_weights, Mapping):
        unknown = sorted(set(encoder_weights) - set(encoders) - {"*"})
        if unknown:
            raise ValueError(f"encoder_weights: {unknown} not in the grid's encoders {encoders}")
        default = str(encoder_weights.get("*", "hub"))
        table = {str(k): str(v) for k, v in encoder_weights.items() if k != "*"}
    else:
        raise TypeError(f"encoder_weights: expected 'hub', 'random', a path, or a dict encoder → one of those; "
                        f"got {type(encoder_weights).__name__}")
    out = {}
    for key in encoders:
        value = table.get(key, default).strip()
        if not value:
            raise ValueError(f"encoder_weights[{key!r}]: empty; expected 'hub', 'random' or a local folder/file")
        out[key] = "random" if value.lower() in WEIGHTS_RANDOM else value
    return out


def weights_kind(value: str) -> str:
    return "random" if value == "random" else "hub" if value == "hub" else "local"


def _synthetic_seed(name) -> int | None:
    text = str(name).strip().lower()
    match = re.fullmatch(r"(?:seed)?(\d+)", text)
    return int(match.group(1)) if match else None


def resolve_splits(dataset: str, dataset_dir: str | Path | None, splits) -> list[SplitSpec]:
    """The grid's splits, checked against the dataset (ValueError naming the split and what exists).

    Synthetic: data seeds (``seed0`` or ``0``), default ``[seed0]``.  Prepared datasets: protocol names
    recorded in their ``dataset.json``; default the official protocols if there are any (PanNuke), else the
    dataset's default protocol.
    """
    from ..data import registry

    entry = registry.get(dataset)
    if isinstance(splits, (str, int)):
        splits = [splits]
    if entry.name == "synthetic":
        names = list(splits) if splits else ["seed0"]
        out = []
        for name in names:
            seed = _synthetic_seed(name)
            if seed is None:
                raise ValueError(f"splits: {name!r} — the synthetic dataset's splits are data seeds such as 'seed0' or 0")
            out.append(SplitSpec(f"seed{seed}", None, seed))
    else:
        if dataset_dir is None:
            raise ValueError(f"dataset_dir: the {entry.name} study needs the prepared dataset folder "
                             f"(python scripts/prepare_data.py {entry.name} ... --out <folder>)")
        from ..data.prepared import read_dataset_info

        info = read_dataset_info(dataset_dir)
        table = info.extra.get("protocols", {}) if isinstance(info.extra, dict) else {}
        default = info.extra.get("protocol") if isinstance(info.extra, dict) else None
        if not splits:
            official = sorted(p for p in table if p.startswith("official"))
            splits = official or [default or "default"]
        out = []
        for name in splits:
            name = str(name)
            protocol = None if name == "default" else name
            try:
                registry.protocol_of(info, protocol)
            except ValueError as e:
                raise ValueError(f"splits: {name!r} is not a protocol of the dataset at {dataset_dir}: {e}") from None
            out.append(SplitSpec(name, protocol, None))
    names = [s.name for s in out]
    for name in names:
        if not _SAFE_NAME.match(name):
            raise ValueError(f"splits: {name!r} cannot name a folder; use letters, digits, '_', '-' and '.'")
    if len(set(names)) != len(names):
        raise ValueError(f"splits: repeated split in {names}")
    return out
