"""Choosing a prepared dataset by name for a bundle run: ``dataset=<name>`` of :data:`cellgap.data.registry.DATASETS`.

The selection carries the dataset's facts (classes, magnification, minimum cell size, empty-image
policy) and its protocol's split column, so bundles need no other configuration.  The built-in
synthetic dataset is generated on first use; the others must have been prepared with
``scripts/prepare_data.py``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from . import registry
from .prepared import INFO, DatasetInfo, datalist, read_dataset_info


@dataclass(frozen=True)
class DatasetSelection:
    name: str
    root: Path
    info: DatasetInfo
    protocol: str | None
    split_column: str
    empty_policy: str

    # the facts a bundle config reads (``$@data.class_names`` …)
    @property
    def class_names(self) -> list[str]:
        return list(self.info.class_names)

    @property
    def num_classes(self) -> int:
        return len(self.info.class_names)

    @property
    def magnification(self):
        return self.info.magnification

    @property
    def mpp(self) -> float:
        return self.info.mpp

    @property
    def min_cell_size(self) -> int:
        return self.info.cell_size

    @property
    def spec(self) -> registry.DatasetSpec:
        return registry.get(self.name)

    @property
    def stain_stats(self) -> str | None:
        """The augmentation's stain statistics for this dataset's stain kind (``DatasetSpec.stain_stats``)."""
        return self.spec.stain_stats(self.info.stain_kind)

    def datalist(self, split: str) -> list[dict]:
        return datalist(self.root, split, self.split_column)

    def metric_protocol(self, split: str = "test"):
        """The metric protocol of this dataset and split (:class:`cellgap.metrics.protocol.Protocol`)."""
        from ..metrics.protocol import Protocol

        label = f"{self.name} {self.protocol or 'default'} protocol, {split} split"
        return Protocol.for_dataset(self.info, preset=self.spec.metric_preset(self.protocol), split=label,
                                    empty_policy=self.empty_policy)


def select_dataset(name: str, dataset_dir: str | os.PathLike, protocol: str | None = None,
                   synthetic: dict | None = None) -> DatasetSelection:
    """The prepared dataset ``name`` at ``dataset_dir`` (generated there first for ``synthetic``).

    ``synthetic``: generator options for the synthetic dataset (``n_train``, ``magnification`` …).
    """
    entry = registry.get(name)
    root = Path(dataset_dir).expanduser()
    if entry.name == "synthetic":
        # Cheap when the folder already holds the same tiles; an error when it holds other ones.
        registry.prepare_dataset("synthetic", None, root, **(synthetic or {}))
    elif not (root / INFO).is_file():
        raise FileNotFoundError(
            f"dataset_dir {root}: no prepared {entry.name} dataset there; prepare it first, e.g. "
            f"`python scripts/prepare_data.py {entry.name} --raw <native files or archive> --out {root}`")
    info = read_dataset_info(root)
    if entry.name != "folder" and info.name.split("_")[0] != entry.name:
        raise ValueError(f"dataset_dir {root}: holds dataset {info.name!r}, but dataset={name!r} was asked for")
    chosen = registry.protocol_of(info, protocol)
    return DatasetSelection(entry.name, root, info, chosen["protocol"], chosen["column"], chosen["empty_policy"])
