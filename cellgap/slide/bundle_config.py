"""The bundle's slide config, ``configs/segment.json``: the bundle runs :func:`cellgap.slide.command.segment_slides`
on its own checkpoint, so ``cellgap segment`` and the bundle are one engine::

    python -m monai.bundle run --config_file configs/segment.json --input "['slides/']" --out runs/segment

The bundle renderer (cellgap/bundle/render.py) writes :func:`segment_config` as ``configs/segment.json``.
"""

from __future__ import annotations

from .tiling import DEFAULT_TILE


def segment_config() -> dict:
    path_in = "cellgap.workflow.path_in"
    return {
        "bundle_root": ".",
        "ckpt_path": {"_target_": path_in, "folder": "@bundle_root", "name": "models", "subfolder": "model.pt"},
        "_desc_input": "slides, images, folders of them or @list files (one string or a list of strings)",
        "input": {"_target_": path_in, "folder": "@bundle_root", "name": "data", "subfolder": "slides"},
        "out": {"_target_": path_in, "folder": "@bundle_root", "name": "runs", "subfolder": "segment"},
        "_desc_encoder_weights": "None: what the checkpoint names (its stored random encoder, or the hub); or a local folder / file",
        "encoder_weights": None,
        "device": {"_target_": "cellgap.workflow.default_device"},
        "_desc_mpp": "level-0 µm per pixel for slides that record none (None: from the file)",
        "mpp": None,
        "roi": None,
        "tile_size": DEFAULT_TILE,
        "batch_size": 4,
        "num_workers": 2,
        "postprocess_workers": None,
        "gzip": False,
        "labels": False,
        "overwrite": False,
        "options": {"_target_": "cellgap.slide.run.SlideOptions", "mpp": "@mpp", "roi": "@roi", "tile_size": "@tile_size",
                    "batch_size": "@batch_size", "workers": "@num_workers", "postprocess_workers": "@postprocess_workers",
                    "gzip": "@gzip", "labels": "@labels", "overwrite": "@overwrite"},
        "run": [{"_target_": "cellgap.slide.command.segment_slides", "inputs": "@input", "model": "@ckpt_path",
                 "out": "@out", "encoder_weights": "@encoder_weights", "device": "$str(@device)", "options": "@options"}],
    }
