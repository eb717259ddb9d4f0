"""The datasets cellgap knows, one :class:`DatasetSpec` each, and one call that downloads and converts any of them.

A spec is the one place of a dataset's facts: classes, magnification(s) with their pixel size and minimum
cell size, protocols (split column, empty-image policy, metric preset), stain kind and LAB stain
statistics, the class-oversampling preset, and where its converter lives (``cellgap.data.<module>``
with ``dataset_info``, ``convert`` and, when there is something to download, ``download``).
**Adding a dataset** = one entry in :data:`DATASETS` + one converter module.

This module imports no converter when it is imported (they are resolved on use), so the converters, the
augmentation and the sampler read their facts here.  Bundles pick a protocol's split column and
empty-image policy from the prepared dataset itself with :func:`protocol_of`.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from .prepared import DatasetInfo, read_dataset_info
from .stain import STAIN_KINDS

METRIC_PRESETS = ("pannuke", "conic", "cisca", "custom")  # cellgap.metrics.protocol.Protocol.for_dataset


@dataclass(frozen=True)
class ProtocolSpec:
    """One way of splitting a dataset: its manifest column ``split_<name>``, how images without ground-truth
    cells count in the metrics (``empty_policy``) and the metric preset it is scored with."""

    name: str
    empty_policy: str
    metric_preset: str
    description: str = ""

    @property
    def column(self) -> str:
        return f"split_{self.name}"


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    description: str
    module: str  # the converter: cellgap.data.<module>
    class_names: tuple[str, ...] | None = None  # None: the prepared data names them (folder, synthetic)
    mpp: Mapping[int, float] = field(default_factory=dict)  # magnification → µm per pixel; empty: the data says
    min_cell_size: Mapping[int, int] = field(default_factory=dict)  # magnification → pixels (METHOD.md §4)
    protocols: tuple[ProtocolSpec, ...] = ()  # the first is the default
    stain: str = "he"  # one of STAIN_KINDS
    stain_statistics: Mapping[str, tuple] | None = None  # LAB StainStatistics fields; None: the generic H&E ones
    oversampling: Mapping = field(default_factory=dict)  # ClassBalancedSampler options (METHOD.md §6.5)
    downloadable: bool = True
    needs_raw: bool = True
    info_function: str = "dataset_info"
    convert_function: str = "convert"

    def __post_init__(self):
        if self.stain not in STAIN_KINDS:
            raise ValueError(f"dataset {self.name!r}: stain must be one of {STAIN_KINDS}, got {self.stain!r}")
        for p in self.protocols:
            if p.metric_preset not in METRIC_PRESETS:
                raise ValueError(f"dataset {self.name!r}, protocol {p.name!r}: metric preset must be one of "
                                 f"{METRIC_PRESETS}, got {p.metric_preset!r}")
        for name in ("mpp", "min_cell_size", "oversampling"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))

    # -- facts
    @property
    def magnifications(self) -> tuple[int, ...]:
        return tuple(self.mpp)

    @property
    def default_protocol(self) -> str | None:
        return self.protocols[0].name if self.protocols else None

    def protocol(self, name: str) -> ProtocolSpec:
        for p in self.protocols:
            if p.name == name:
                return p
        raise ValueError(f"protocol: expected one of {sorted(p.name for p in self.protocols)}, got {name!r}")

    def metric_preset(self, protocol: str | None = None) -> str:
        """The metric preset of ``protocol`` (None: the default protocol); ``custom`` for datasets without protocols."""
        if not self.protocols:
            return "custom"
        return self.protocol(protocol if protocol is not None else self.default_protocol).metric_preset

    def stain_stats(self, stain_kind: str | None = None) -> str | None:
        """What the augmentation's stain jitter is given for data of ``stain_kind`` (default: the spec's): the
        dataset's own LAB statistics where they were measured on that stain, the generic H&E ones for other H&E
        data, None (no stain jitter) for any other stain, where H&E colours would mean nothing."""
        kind = self.stain if stain_kind is None else stain_kind
        if self.stain_statistics is not None and kind == self.stain:
            return self.name
        return "he" if kind == "he" else None

    # -- the converter, resolved on use
    def _function(self, name: str) -> Callable:
        return getattr(importlib.import_module(f"{__package__}.{self.module}"), name)

    @property
    def info(self) -> Callable[..., DatasetInfo]:
        return self._function(self.info_function)

    @property
    def convert(self) -> Callable[..., Path]:
        return self._function(self.convert_function)

    @property
    def download(self) -> Callable[..., Path] | None:
        return self._function("download") if self.downloadable else None


# CISCA protocols (METHOD.md §6) exclude images without cells from the metrics and score with the CISCA preset.
DATASETS: dict[str, DatasetSpec] = {
    "synthetic": DatasetSpec("synthetic", "generated tiles for tests and demos", "synthetic", downloadable=False,
                             needs_raw=False, info_function="synthetic_info", convert_function="prepare_synthetic"),
    "pannuke": DatasetSpec(
        "pannuke", "PanNuke, 40x, 5 classes, 19 tissues, 3 folds", "pannuke",
        class_names=("Neoplastic", "Inflammatory", "Connective", "Dead", "Epithelial"),
        mpp={40: 0.25}, min_cell_size={40: 50},  # T_small chosen on validation for PanNuke
        protocols=(
            ProtocolSpec("official1", "nan", "pannuke", "official split 1: train fold 1, val fold 2, test fold 3"),
            ProtocolSpec("official2", "nan", "pannuke", "official split 2: train fold 2, val fold 1, test fold 3"),
            ProtocolSpec("official3", "nan", "pannuke", "official split 3: train fold 3, val fold 2, test fold 1"),
            ProtocolSpec("cisca", "skip", "cisca", "CISCA split (METHOD.md §6.1): all folds pooled, tissue-stratified "
                                                   "80/20 then 90/10, seeded; empty images excluded from metrics"),
        ),
        # RandStainNA LAB statistics of the training images (METHOD.md §7): (L, A, B) mean and sd of the
        # per-image channel mean (mean_*) and of the per-image channel standard deviation (std_*)
        stain_statistics={"mean_mu": (167.362, 150.293, 116.988), "mean_sigma": (30.767, 9.184, 7.463),
                          "std_mu": (38.191, 7.936, 7.474), "std_sigma": (11.374, 3.08, 2.618)},
        oversampling={"multipliers": (1.0, 1.0, 1.0, 1.0), "clip_percentile": 98.5}),
    "conic": DatasetSpec(
        "conic", "CoNIC challenge patches (Lizard), 20x, 6 classes", "conic",
        class_names=("Neutrophil", "Epithelial", "Lymphocyte", "Plasma", "Eosinophil", "Connective"),
        mpp={20: 0.5}, min_cell_size={20: 26},  # T_small chosen on validation for CoNIC
        protocols=(ProtocolSpec("cisca", "skip", "cisca", "CISCA split (METHOD.md §6.2): source images grouped, "
                                                          "cohort-stratified 80/20 then 90/10, seeded; empty images "
                                                          "excluded from metrics"),),
        stain_statistics={"mean_mu": (174.419, 151.99, 109.463), "mean_sigma": (37.615, 11.55, 8.624),
                          "std_mu": (35.016, 8.581, 8.452), "std_sigma": (10.965, 3.324, 2.924)},
        oversampling={"multipliers": (1.6, 1.6, 0.9, 0.9, 0.9), "clip_percentile": 97.0}),
    "cytodark0": DatasetSpec(
        "cytodark0", "CytoDArk0 Nissl brain, 20x or 40x, 1 class", "cytodark0", class_names=("Cell",),
        mpp={20: 0.548, 40: 0.274}, min_cell_size={20: 20, 40: 80},  # set from prior knowledge for CytoDArk0
        protocols=(
            ProtocolSpec("area_holdout", "skip", "cisca", "CISCA test images (METHOD.md §6.3; visual cortex held out "
                                                          "at 20x), seeded area-stratified 10% validation; empty tiles "
                                                          "excluded"),
            ProtocolSpec("zenodo", "skip", "cisca", "the folds.csv shipped with the release (0 train, 1 val, 2 test)"),
        ),
        stain="nissl",
        stain_statistics={"mean_mu": (204.961, 133.763, 113.567), "mean_sigma": (19.332, 3.781, 6.932),
                          "std_mu": (31.206, 9.215, 12.727), "std_sigma": (10.322, 2.043, 3.177)}),
    # your own tiles: H&E assumed for the augmentation's stain jitter (generic H&E statistics)
    "folder": DatasetSpec("folder", "your own images/ + labels/ (+ classes/) folder", "folder", downloadable=False),
}


def get(name: str) -> DatasetSpec:
    key = str(name).strip().lower()
    if key not in DATASETS:
        raise ValueError(f"dataset: expected one of {sorted(DATASETS)}, got {name!r}")
    return DATASETS[key]


def _is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


def prepare_dataset(name: str, raw_dir_or_url: str | os.PathLike | None, out_dir: str | os.PathLike, download: bool = False,
                    raw_dir: str | os.PathLike | None = None, archives=None, overwrite: bool = False, progress: bool = True,
                    **options) -> Path:
    """Download (if asked) and convert dataset ``name`` into the prepared layout at ``out_dir``.

    ``raw_dir_or_url`` is one of:

    * a folder with the native files (already extracted) — converted as is, or first filled from
      the official source with ``download=True``;
    * a URL — downloaded into ``raw_dir`` (default ``<out_dir>_raw``): the full URL of a dataset's
      single archive, or a base URL under which its files live;
    * a local archive or file (e.g. ``fold_1.zip``) — verified and extracted into ``raw_dir``.

    ``archives``: more local archives (or a folder of them) to use instead of downloading.
    ``options`` go to the converter (e.g. ``protocol``, ``magnification``, ``tile_size``).
    Returns ``out_dir``.
    """
    entry = get(name)
    if not entry.needs_raw:
        return entry.convert(out_dir, overwrite=overwrite, progress=progress, **options)
    if raw_dir_or_url is None:
        raise ValueError(f"{entry.name}: give the raw folder, a URL or an archive of the native files")
    source = str(raw_dir_or_url)
    default_raw = Path(out_dir).with_name(Path(out_dir).name + "_raw")
    if _is_url(source) or Path(source).is_file():
        if entry.download is None:
            raise ValueError(f"{entry.name}: has no downloadable files; give its folder")
        raw = Path(raw_dir) if raw_dir is not None else default_raw
        if _is_url(source):
            entry.download(raw, urls=source, archives=archives, progress=progress)
        else:
            extra = [] if archives is None else ([archives] if isinstance(archives, (str, os.PathLike)) else list(archives))
            entry.download(raw, archives=[source, *extra], progress=progress)
    else:
        raw = Path(source).expanduser()
        if download or archives is not None:
            if entry.download is None:
                raise ValueError(f"{entry.name}: has no downloadable files; its folder must already exist")
            entry.download(raw, archives=archives, progress=progress)
        elif not raw.is_dir():
            raise FileNotFoundError(f"{raw}: raw {entry.name} folder missing; pass download=True (--download) to fetch it")
    return entry.convert(raw, out_dir, overwrite=overwrite, progress=progress, **options)


def protocol_of(root_or_info: str | os.PathLike | DatasetInfo, protocol: str | None = None) -> dict:
    """Split column and empty-image policy of a prepared dataset's protocol (None: its default).

    Returns ``{"protocol", "column", "empty_policy", "description"}``; ``column`` is ``"split"``
    for the default protocol.
    """
    info = root_or_info if isinstance(root_or_info, DatasetInfo) else read_dataset_info(root_or_info)
    table = info.extra.get("protocols", {}) if isinstance(info.extra, dict) else {}
    default = info.extra.get("protocol") if isinstance(info.extra, dict) else None
    if protocol is None or protocol == default:
        entry = table.get(default, {})
        return {"protocol": default, "column": "split", "empty_policy": info.empty_policy,
                "description": entry.get("description", "")}
    if protocol not in table:
        raise ValueError(f"dataset {info.name!r}: protocol {protocol!r} not available; expected one of {sorted(table)}")
    entry = table[protocol]
    return {"protocol": protocol, "column": entry["column"], "empty_policy": entry["empty_policy"],
            "description": entry.get("description", "")}
