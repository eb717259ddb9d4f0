"""The stain kind of a dataset and where the H&E stain jitter means something.

``stain_kind`` (a dataset fact: ``dataset.json``, a user folder's ``cellgap.json``): ``he`` (haematoxylin and
eosin), ``ihc`` (immunohistochemistry, e.g. DAB + haematoxylin), ``nissl`` (cresyl violet / thionine),
``fluorescence`` (fluorescent nuclear stains such as DAPI / Hoechst) or ``other``.

The stain jitter of the augmentations (METHOD.md §7) draws LAB statistics of H&E (or of the dataset's own
scans): it applies to H&E datasets and to the built-in datasets whose statistics were measured (PanNuke,
CoNIC, CytoDArk0's Nissl scans); on IHC, fluorescence or other images it would paint H&E colours, so it is
left out there (``cellgap.data.registry.DatasetSpec.stain_stats``). The other augmentations (geometry, blur, contrast, colour, noise) stay for every kind.
"""

from __future__ import annotations

STAIN_KINDS = ("he", "ihc", "nissl", "fluorescence", "other")


def check_stain_kind(value, where: str = "stain_kind") -> str:
    if value not in STAIN_KINDS:
        raise ValueError(f"{where}: {value!r} is not a stain kind; expected one of {list(STAIN_KINDS)}")
    return value


__all__ = ["STAIN_KINDS", "check_stain_kind"]
