"""The bundle's slide config, ``configs/segment.json``: the bundle runs :func:`cellgap.slide.command.segment_slides`
on its own checkpoint, so ``cellgap segment`` and the bundle are one engine::

    python -m monai.bundle run --config_file configs/segment.json --input "['slides/']" --out runs/segment

The bundle renderer (cellgap/bundle.py) writes :func:`segment_config` as ``configs/segment.json``.
"""

from __future__ import annotations

from .tiling import DEFAULT_TILE


def segment_config() -> dict:
    return {
        "imports": ["$import os", "$import torch", "$import cellgap", "$import cellgap.slide.command", "$import cellgap.slide.run"],
        "bundle_root": ".",
        "ckpt_path": "$os.path.join(@bundle_root, 'models', 'model.pt')",
        "_desc_input": "slides, images, folders of them or @list files (a list of strings or one string)",
        "input": "$os.path.join(@bundle_root, 'data', 'slides')",
        "out": "$os.path.join(@bundle_root, 'runs', 'segment')",
        "_desc_encoder_weights": "None: 'hub', or the random encoder stored in the checkpoint; or a local folder / file",
        "encoder_weights": None,
        "device": "$'cuda' if torch.cuda.is_available() else 'cpu'",
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
        "run": ["$cellgap.slide.command.segment_slides(@input if isinstance(@input, list) else [@input], @ckpt_path, @out, "
                "encoder_weights=@encoder_weights, device=@device, options=@options)"],
    }
