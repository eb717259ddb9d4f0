"""The datasets cellgap can prepare, by name, and one call that downloads and converts any of them.

``DATASETS[name]`` holds the dataset's facts factory (``info``), its converter (native files →
prepared layout) and its downloader (None where there is nothing to download).  Names:
``synthetic``, ``pannuke``, ``conic``, ``cytodark0``, ``folder``.

Bundles pick a protocol's split column and empty-image policy from the prepared dataset itself
with :func:`protocol_of`, so no extra configuration is needed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import conic, cytodark0, folder, pannuke, synthetic
from .prepared import DatasetInfo, read_dataset_info


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    info: Callable[..., DatasetInfo]
    convert: Callable[..., Path]
    download: Callable[..., Path] | None
    needs_raw: bool = True
    description: str = ""


DATASETS: dict[str, DatasetEntry] = {
    "synthetic": DatasetEntry("synthetic", synthetic.synthetic_info, synthetic.prepare_synthetic, None, needs_raw=False,
                              description="generated tiles for tests and demos"),
    "pannuke": DatasetEntry("pannuke", pannuke.dataset_info, pannuke.convert, pannuke.download,
                            description="PanNuke, 40x, 5 classes, 19 tissues, 3 folds"),
    "conic": DatasetEntry("conic", conic.dataset_info, conic.convert, conic.download,
                          description="CoNIC challenge patches (Lizard), 20x, 6 classes"),
    "cytodark0": DatasetEntry("cytodark0", cytodark0.dataset_info, cytodark0.convert, cytodark0.download,
                              description="CytoDArk0 Nissl brain, 20x or 40x, 1 class"),
    "folder": DatasetEntry("folder", folder.dataset_info, folder.convert, None,
                           description="your own images/ + labels/ (+ classes/) folder"),
}


def get(name: str) -> DatasetEntry:
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
