"""The bundle's documents besides its configs: metadata.json, the README, the licence, logging.conf and
large_files.yml."""

from __future__ import annotations

from .. import __version__
from ..data.registry import DATASETS
from ..encoders import EncoderSpec
from .naming import BUNDLE_VERSION, bundle_name

SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
# The versions a bundle's metadata pins; a test checks they equal requirements.txt.
PINNED = {"monai": "1.6.1", "torch": "2.14.1", "numpy": "2.4.6", "timm": "1.0.31", "pytorch-ignite": "0.5.5",
          "scikit-image": "0.26.0", "tifffile": "2026.3.3", "tensorboard": "2.21.0", "huggingface_hub": "2.4.0"}


def metadata(spec: EncoderSpec) -> dict:
    side = "224" if spec.input_size != 256 else "256"
    return {
        "schema": SCHEMA_URL,
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: f"first release: frozen {spec.display_name} encoder + shared CISCA decoder"},
        "monai_version": PINNED["monai"],
        "pytorch_version": PINNED["torch"],
        "numpy_version": PINNED["numpy"],
        "required_packages_version": {"cellgap": __version__, **{k: v for k, v in PINNED.items()
                                                                  if k not in ("monai", "torch", "numpy")}},
        "name": f"CISCA cell segmentation and classification, frozen {spec.display_name}",
        "task": "Cell (nucleus) instance segmentation and classification in histopathology / Nissl tiles",
        "description": (f"A frozen {spec.display_name} encoder ({spec.pretraining}) with the shared CISCA decoder: "
                        "a 3-class boundary/body/background map, four directional distance maps and a cell-type map, "
                        "turned into cell instances by a marker-controlled watershed. Trained per dataset."),
        "authors": "cellgap contributors",
        "copyright": "Copyright (c) cellgap contributors",
        "data_source": "PanNuke, CoNIC (Lizard), CytoDArk0, or your own annotated tiles; a synthetic dataset for demos",
        "data_type": "png / tiff tiles",
        "image_classes": "RGB tile, uint8, scaled to [0, 1]",
        "label_classes": "instance map (0 background, 1..N cells) and class map (0 background, 1..C)",
        "pred_classes": "contour logits (boundary, body, background); distance maps (h, v, tl, bl); class logits",
        "intended_use": "Research only; not for clinical or diagnostic use.",
        "references": [
            "Vadori et al., Mind the Gap: Evaluating Patch Embeddings from General-Purpose and Histopathology Foundation "
            "Models for Cell Segmentation and Classification, arXiv:2502.02471, 2025",
            "Vadori et al., CISCA and CytoDArk0: a Cell Instance Segmentation and Classification method for "
            "histo(patho)logical image Analyses and a new, open, Nissl-stained dataset for brain cytoarchitecture studies",
            spec.citation,
        ],
        "encoder": {"key": spec.key, "model_id": spec.model_id, "architecture": spec.architecture,
                    "pretraining": spec.pretraining, "domain": spec.domain, "gated": spec.gated,
                    "license": spec.license, "taps": list(spec.taps), "input_size": spec.input_size},
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "magnitude", "modality": "light microscopy", "num_channels": 3,
                                 "spatial_shape": ["32*n", "32*n"], "dtype": "float32", "value_range": [0, 1],
                                 "is_patch_data": True,
                                 "channel_def": {"0": "R", "1": "G", "2": "B"}}},
            "outputs": {
                "pred": {"type": "image", "format": "labels", "modality": "light microscopy", "num_channels": 3, "spatial_shape": ["32*n", "32*n"],
                         "dtype": "float32", "value_range": [], "is_patch_data": True,
                         "channel_def": {"0": "boundary between touching cells", "1": "cell body", "2": "background"}},
                "distance": {"type": "image", "format": "magnitude", "modality": "light microscopy", "num_channels": 4, "spatial_shape": ["32*n", "32*n"],
                             "dtype": "float32", "value_range": [-1, 1], "is_patch_data": True,
                             "channel_def": {"0": "h", "1": "v", "2": "tl", "3": "bl"}},
                "type": {"type": "image", "format": "labels", "modality": "light microscopy", "num_channels": "C+1",
                         "spatial_shape": ["32*n", "32*n"], "dtype": "float32", "value_range": [], "is_patch_data": True,
                         "channel_def": {"0": "background", "1..C": "cell classes of the training dataset"}},
            },
        },
        "_note_input_size": f"the encoder sees {side}² per 256² tile",
    }


def readme(spec: EncoderSpec) -> str:
    name = bundle_name(spec)
    gated = (f"\n**Gated weights.** {spec.display_name} is gated on the Hugging Face hub: accept its terms at "
             f"{spec.url} with your account, then `export HF_TOKEN=<your token>`; or download the folder "
             f"(config.json + model.safetensors) once and pass it with `--encoder_weights /path/to/folder`.\n"
             if spec.gated else "")
    return f"""# {name}: CISCA cell segmentation and classification with a frozen {spec.display_name}

Part of [cellgap](../../README.md). Generated from the encoder registry by `scripts/build_bundles.py`; do not
edit by hand.

## Model Overview
A frozen **{spec.display_name}** encoder (`{spec.model_id}`, pretrained on {spec.pretraining}) feeds the shared
CISCA decoder of cellgap: four encoder maps ({"stages" if spec.family == "hierarchical" else "blocks"}
{", ".join(str(t + 1) for t in spec.taps)}, 1-based) are brought to strides 4–32, joined with a trainable
full-resolution image stem, and decoded by a U-Net path into three heads: a 3-class contour map
(boundary between touching cells / cell body / background), four directional distance maps (h, v, tl, bl)
and a cell-type map (C+1 classes). A marker-controlled watershed turns them into cells with one class each.
Only the decoder is trained; the encoder stays frozen (eval mode, no gradients, bf16 on GPU).
{"Patch-14 encoders see each 256² tile resized to 224² (a 16×16 token grid)." if spec.input_size != 256 else ""}

## Data
Choose with `--dataset {"|".join(DATASETS)} --dataset_dir <prepared folder>`.
Real datasets are prepared once with `python scripts/prepare_data.py <name> ...` (see docs/datasets.md);
`synthetic` (the default) is generated on first use and needs no download.

## Training configuration
Adam (AMSGrad), learning rate 5e-4, batch 4, ReduceLROnPlateau (×0.5, patience 10) and early stopping
(patience 20) on the validation key metric (`mpq+` for multi-class data, `pq` for single-class), CISCA loss
(contour CCE + Dice, distance MAE + MSGE, type CE + Tversky), METHOD.md §7 augmentation, targets recomputed
after augmentation. GPU: bf16 autocast. Checkpoints: `models/model.pt`, the best model (replaced only by a
better one), holds the decoder plus what rebuilds the network (encoder and its weights' identity, decoder
architecture, classes, magnification); `models/last.pt` the state a killed run resumes from with the same
command (`--resume false` starts afresh). See cellgap's docs/guarantees.md.
Monitoring: `tensorboard --logdir runs` shows the training loss, learning rate, validation metrics and
overlays, and `data_wait_share`, the share of each epoch the loop waited for data. On a GPU above 10 % a
warning suggests more `--num_workers`, a packed dataset (`prepare_data.py --pack`), `--photometric_on_device true`
or `--targets_on_device true`.

## Input
RGB tiles scaled to [0, 1]; any size at inference (sliding window of 256², Gaussian blending).

## Output
Per tile: `<name>_instances.tif` (int32 instance map), `<name>_classes.tif` (uint8 class map),
`<name>_cells.csv` (id, centroid, area, class, class probability), `<name>_overlay.png`,
`<name>_cells.geojson` (QuPath detections).

## Performance
No pretrained decoder ships with this bundle yet: train it on your dataset. Evaluation writes per-image,
per-class and per-tissue metrics and a summary with the protocol to `runs/eval_test/` (see docs/metrics.md).

## MONAI Bundle Commands
Train (from this folder, with cellgap installed):
```
python -m monai.bundle run --config_file configs/train.json --dataset pannuke --dataset_dir /data/pannuke_prepared
```
Multi-GPU:
```
torchrun --standalone --nnodes=1 --nproc_per_node=2 -m monai.bundle run --config_file "['configs/train.json','configs/multi_gpu_train.json']"
```
Evaluate on the test split:
```
python -m monai.bundle run --config_file "['configs/train.json','configs/evaluate.json']"
```
Inference on a folder of tiles:
```
python -m monai.bundle run --config_file configs/inference.json --input_dir /data/tiles --output_dir /data/cells
```
Whole slides (SVS, NDPI, MRXS, OME-TIFF, pyramidal TIFF; streamed in bounded memory, resumable, QuPath GeoJSON,
cell tables; the same engine as `cellgap segment`, see cellgap's docs/slides.md):
```
python -m monai.bundle run --config_file configs/segment.json --input /data/slides --out /data/slide_cells
```
{gated}
## Encoder licence
{spec.license}. The encoder weights are not part of this bundle and keep their own terms.

# References
- Vadori et al., Mind the Gap (arXiv:2502.02471), 2025.
- {spec.citation}

# License
The configs and cellgap code: Apache-2.0 (see LICENSE). Encoder weights: see above.
"""


LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""

LARGE_FILES = """# Decoder weights trained by you (or published later) go here; the frozen encoder's weights come from the
# hub or a local folder (see configs: encoder_weights). file:// URLs work for local copies.
large_files: []
"""


def license_text() -> str:
    return ("Copyright cellgap contributors\n\nLicensed under the Apache License, Version 2.0 (the \"License\");\n"
            "you may not use this bundle's configs and code except in compliance with the License.\n"
            "You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0\n\n"
            "Encoder weights are not included and are governed by their own licences (see docs/README.md).\n")
