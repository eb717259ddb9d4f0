"""MONAI bundles generated from the encoder registry.

Every encoder gets ``bundles/cisca_<key>/`` with the same configs apart from its encoder-specific
fields, so one template here is the source of truth; ``scripts/build_bundles.py`` writes them and a
test fails when a committed bundle differs from what this module renders.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from . import __version__
from .atomic import atomic_write_text
from .data.registry import DATASETS
from .encoders import ENCODERS, EncoderSpec, get_encoder_spec
from .slide.bundle_config import segment_config

SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
BUNDLE_PREFIX = "cisca_"
BUNDLE_VERSION = "0.1.0"
# The versions a bundle's metadata pins; a test checks they equal requirements.txt.
PINNED = {"monai": "1.6.1", "torch": "2.14.1", "numpy": "2.4.6", "timm": "1.0.31", "pytorch-ignite": "0.5.5",
          "scikit-image": "0.26.0", "tifffile": "2026.3.3", "tensorboard": "2.21.0", "huggingface_hub": "2.4.0"}


def bundle_name(spec: EncoderSpec | str) -> str:
    return BUNDLE_PREFIX + get_encoder_spec(spec).key


# --------------------------------------------------------------------------------------------------
# configs/train.json
# --------------------------------------------------------------------------------------------------
# The logic of the configs lives in cellgap.workflow (named builders); the configs hold options, references
# and _target_ entries.  W: the builders' module path, spelled once here.
W = "cellgap.workflow."


def _common(spec: EncoderSpec) -> dict:
    """Fields shared by train.json and inference.json: paths, device, encoder, decoder."""
    return {
        "bundle_root": ".",
        "ckpt_dir": {"_target_": W + "path_in", "folder": "@bundle_root", "name": "models"},
        "ckpt_path": {"_target_": W + "path_in", "folder": "@ckpt_dir", "name": "model.pt"},
        "output_dir": {"_target_": W + "path_in", "folder": "@bundle_root", "name": "runs"},
        "device": {"_target_": W + "default_device"},
        "amp": {"_target_": "torch.cuda.is_available"},
        "encoder": spec.key,
        "_desc_encoder_weights": "'hub' (timm / Hugging Face; set HF_TOKEN for gated models), or a local folder "
                                 "(config.json + model.safetensors) or weights file; 'none' with allow_random_encoder",
        "encoder_weights": "hub",
        "allow_random_encoder": False,
        "reduced_encoder": False,
        "num_contour_classes": 3,
        "num_distance_maps": 4,
        "decoder": {"widths": [64, 64, 64, 128, 256, 512], "head_features": 256, "head_width": 32, "norm": None},
        "tile_size": 256,
        "sw_batch_size": 8,
        "amp_kwargs": {"dtype": "$torch.bfloat16"},
    }


def _network_def() -> dict:
    return {"_target_": "cellgap.network.CellGapNet", "encoder": "@encoder", "num_classes": "@num_classes",
            "encoder_weights": "@encoder_weights", "allow_random_encoder": "@allow_random_encoder",
            "reduced_encoder": "@reduced_encoder", "num_contour_classes": "@num_contour_classes",
            "num_distance_maps": "@num_distance_maps", "decoder": "@decoder"}


def _sliding_window(**extra) -> dict:
    return {"_target_": "SlidingWindowInferer", "roi_size": ["@tile_size", "@tile_size"], "sw_batch_size": "@sw_batch_size",
            "overlap": 0.25, "mode": "gaussian", "padding_mode": "reflect", **extra}


def _evaluator(**parts) -> dict:
    return {"_target_": "SupervisedEvaluator", "device": "@device", **parts, "network": "@network",
            "prepare_batch": "@prepare_batch", "amp": "@amp", "amp_kwargs": "@amp_kwargs"}


# how the training and validation items are chosen (train.json's train_val, evaluate.json's data list)
_SPLIT_OPTIONS = {"data": "@data", "train_split": "@train_split", "val_split": "@val_split", "validation": "@validation",
                  "val_fraction": "@val_fraction", "seed": "@seed", "holdout_dir": "@holdout_dir",
                  "tile_size": "@tile_size", "crop_size": "@train_crop_size"}


def _checkpoint_meta(**extra) -> dict:
    return {"_target_": "cellgap.checkpoint.CheckpointMeta", "encoder": "@encoder", "class_names": "@class_names",
            "num_contour_classes": "@num_contour_classes", "num_distance_maps": "@num_distance_maps",
            "decoder_config": "@decoder", "reduced_encoder": "@reduced_encoder", "encoder_weights": "@encoder_weights", **extra}


def _checkpoint_loader(**extra) -> dict:
    """Loads a decoder checkpoint (meta first: a checkpoint of another encoder, weights or class set is refused)."""
    return {"_target_": "cellgap.checkpoint.CheckpointLoader", "map_location": "@device",
            "load_dict": {"_target_": "cellgap.checkpoint.checkpoint_objects", "meta": "@checkpoint_meta",
                          "network": "@network_def"},
            "load_path": {"_target_": "cellgap.checkpoint.existing_checkpoint", "path": "@ckpt_path"}, **extra}


# evaluation and inference rebuild the network as the checkpoint says (its decoder, its encoder's weights)
_TRAINED_NETWORK = {"trained": {"_target_": W + "TrainedFor", "path": "@ckpt_path"},
                    "decoder": "$@trained.decoder", "reduced_encoder": "$@trained.reduced_encoder",
                    "encoder_weights": "$@trained.encoder_weights", "allow_random_encoder": "$@trained.random_encoder"}


def train_config(spec: EncoderSpec) -> dict:
    cfg = _common(spec)
    cfg.update({
        "_desc_dataset": " | ".join(DATASETS) + "; dataset_dir holds it prepared "
                         "(scripts/prepare_data.py); synthetic is generated there on first use",
        "dataset": "synthetic",
        "dataset_dir": {"_target_": W + "path_in", "folder": "@bundle_root", "name": "data", "subfolder": "@dataset"},
        "protocol": None,
        "synthetic": {"n_train": 160, "n_val": 24, "n_test": 24, "seed": 0, "magnification": 40},
        "data": {"_target_": "cellgap.data.selection.select_dataset", "name": "@dataset", "dataset_dir": "@dataset_dir",
                 "protocol": "@protocol", "synthetic": "@synthetic"},
        # the dataset's facts; each can be overridden
        "dataset_name": "$@data.info.name",
        "class_names": "$@data.class_names",
        "num_classes": "$@data.num_classes",
        "magnification": "$@data.magnification",
        "min_cell_size": "$@data.min_cell_size",
        "stain_stats": "$@data.stain_stats",
        "_desc_min_cell_size_candidates": "a list of sizes: validation post-processes once per size and scores each "
                                          "(the study's choice of the minimum cell size)",
        "min_cell_size_candidates": None,
        "_desc_train_crop_size": "side of the random training crops (tiles larger than it are cropped)",
        "train_crop_size": "@tile_size",
        "train_split": "train",
        "val_split": "val",
        "_desc_validation": "false: train without validation or model selection and keep the last checkpoint",
        "validation": True,
        "_desc_val_fraction": "without a val split: the seeded share of the training images held out for validation "
                              "(cellgap.data.splits.holdout_validation; fewer than 4 images give tiles cut from each)",
        "val_fraction": 0.1,
        "holdout_dir": {"_target_": W + "path_in", "folder": "@output_dir", "name": "holdout"},
        "train_val": {"_target_": W + "train_and_validation", **_SPLIT_OPTIONS},
        "epochs": 300,
        "epoch_length": None,
        "batch_size": 4,
        "val_batch_size": 4,
        "num_workers": 4,
        "cache_rate": 0.0,
        "learning_rate": 0.0005,
        "lr_patience": 10,
        "early_stop_patience": 20,
        "val_interval": 1,
        "_desc_key_metric": "scalar that selects the checkpoint and stops early: pq, bpq, mpq, mpq+, f1d, aji, aji+, dice "
                            "(default: mpq+ for multi-class data, else pq)",
        "key_metric": {"_target_": W + "default_key_metric", "num_classes": "@num_classes"},
        "grad_clip_norm": 0.001,
        "grad_clip_mode": "global",
        "loss_weights": None,
        "tversky": "region",
        "augment_prob_scale": 1.0,
        "_desc_photometric_on_device": "GPU training: run the stain, blur/noise, contrast, colour and noise steps on the training "
                                       "batch on the GPU (cellgap.data.device_augmentation) instead of in the loader workers, "
                                       "whose CPU time per tile falls by 40–50 %; cache_mode 'off' only. Leave it off on a "
                                       "CPU: there the batch step costs more than the workers' per-sample steps",
        "photometric_on_device": False,
        "_desc_targets_on_device": "GPU training: the loader workers send the relabelled instance map instead of the distance "
                                   "maps and weight mask, which cellgap.targets.DenseTargets computes on the training batch "
                                   "on the GPU (same values; ≈1 ms less of a worker's CPU and 40 % fewer bytes per tile). "
                                   "Leave it off on a CPU: there the batch step costs more than the workers' numpy",
        "targets_on_device": False,
        "balanced_sampling": False,
        "_desc_cache_mode": "embedding cache of the frozen encoder's maps: off (features on the fly, random augmentation), "
                            "clean (no augmentation), views (cache_views fixed augmented views per tile); see docs/cache.md",
        "cache_mode": "off",
        "cache_views": 4,
        "cache_dtype": "float16",
        "cache_dir": {"_target_": W + "path_in", "folder": "@bundle_root", "name": "cache"},
        "seed": 0,
        "view_spec": {"_target_": W + "view_spec", "cache_mode": "@cache_mode", "cache_views": "@cache_views",
                      "seed": "@seed", "stain_stats": "@stain_stats", "crop_size": "@train_crop_size",
                      "prob_scale": "@augment_prob_scale"},
        "embedding_cache": {"_target_": W + "embedding_cache", "cache_mode": "@cache_mode", "cache_dir": "@cache_dir",
                            "network": "@network_def", "encoder_weights": "@encoder_weights",
                            "datalist": "@train#datalist", "view_spec": "@view_spec", "dataset_id": "@dataset_name",
                            "dtype": "@cache_dtype"},
        "is_not_rank0": {"_target_": W + "is_not_rank0"},
        "network_def": _network_def(),
        "network": "$@network_def.to(@device)",
        "_desc_network_pred": "the contour logits alone, for single-tensor tools: monai.bundle verify_net_in_out network_pred",
        "network_pred": {"_target_": "cellgap.network.ContourLogits", "network": "@network_def"},
        "loss": {"_target_": "cellgap.losses.CISCALoss", "num_classes": "@num_classes",
                 "num_contour_classes": "@num_contour_classes", "weights": "@loss_weights", "tversky": "@tversky"},
        "optimizer": {"_target_": "torch.optim.Adam", "params": "$@network_def.decoder.parameters()",
                      "lr": "@learning_rate", "amsgrad": True, "eps": 1e-07},
        "lr_scheduler": {"_target_": "torch.optim.lr_scheduler.ReduceLROnPlateau", "optimizer": "@optimizer", "mode": "max",
                         "factor": 0.5, "patience": "@lr_patience"},
        "checkpoint_meta": _checkpoint_meta(extra={
            "dataset": "@dataset_name", "magnification": "@magnification", "mpp": "$@data.mpp",
            "min_cell_size": "@min_cell_size", "key_metric": "@key_metric", "cellgap_version": __version__}),
        "_desc_resume": "continue from ckpt_dir's last.pt when there is one (a killed run restarted with the same command)",
        "resume": True,
        "prepare_batch": {"_target_": "cellgap.training.PrepareCISCABatch"},
        "train_prepare_batch": {"_target_": W + "train_prepare_batch", "cache_mode": "@cache_mode", "network": "@network_def",
                                "cache": "@embedding_cache", "photometric_on_device": "@photometric_on_device",
                                "targets_on_device": "@targets_on_device", "stain_stats": "@stain_stats",
                                "prob_scale": "@augment_prob_scale", "seed": "@seed"},
        "train": {
            "datalist": "$@train_val[0]",
            "preprocessing": {"_target_": W + "train_preprocessing", "num_classes": "@num_classes",
                              "magnification": "@magnification", "num_contour_classes": "@num_contour_classes",
                              "view_spec": "@view_spec", "photometric_on_device": "@photometric_on_device",
                              "targets_on_device": "@targets_on_device", "cache": "@embedding_cache"},
            "dataset": {"_target_": "CacheDataset", "data": "@train#datalist", "transform": "@train#preprocessing",
                        "cache_rate": "@cache_rate", "num_workers": "@num_workers"},
            # epoch_length full batches per epoch from any number of tiles (with replacement when too few)
            "sampler": {"_target_": "cellgap.data.sampling.training_sampler", "datalist": "@train#datalist",
                        "batch_size": "@batch_size", "epoch_length": "@epoch_length", "num_classes": "@num_classes",
                        "balanced": "@balanced_sampling", "preset": "@dataset", "seed": "@seed"},
            "dataloader": {"_target_": W + "data_loader", "dataset": "@train#dataset", "batch_size": "@batch_size",
                           "device": "@device", "num_workers": "@num_workers", "sampler": "@train#sampler", "train": True},
            "inferer": {"_target_": "SimpleInferer"},
            "handlers": [
                {"_target_": "cellgap.training.DataWait"},  # first: its epoch time ends before validation
                {"_target_": "cellgap.data.trainable.EpochStepsCheck"},  # an epoch of zero steps is an error
                {"_target_": "ValidationHandler", "validator": "@validate#evaluator", "epoch_level": True,
                 "interval": "@val_interval", "_disabled_": "$not @validation"},
                # after the ValidationHandler: the epoch's score is known when it saves; resumes on start; writes and
                # locks on the first rank only (model.pt: the best, or the latest without validation; last.pt: resume)
                {"_target_": "cellgap.checkpoint.TrainingCheckpoints", "save_dir": "@ckpt_dir", "meta": "@checkpoint_meta",
                 "network": "@network_def", "optimizer": "@optimizer", "lr_scheduler": "@lr_scheduler",
                 "validator": "@validate#evaluator", "validation": "@validation", "key_metric_name": "val_key_metric",
                 "early_stop": "@validate#early_stop", "random_sources": "@train#dataset", "resume": "@resume",
                 "lock": "@output_dir"},
                {"_target_": "cellgap.training.GradientClipping", "parameters": "$@network_def.decoder.parameters()",
                 "max_norm": "@grad_clip_norm", "mode": "@grad_clip_mode"},
                {"_target_": W + "TrainingLogs", "log_dir": "@output_dir", "optimizer": "@optimizer",
                 "_disabled_": "@is_not_rank0"},
            ],
            "trainer": {"_target_": "SupervisedTrainer", "max_epochs": "@epochs", "epoch_length": "@epoch_length",
                        "device": "@device", "train_data_loader": "@train#dataloader", "network": "@network",
                        "loss_function": "@loss", "optimizer": "@optimizer", "prepare_batch": "@train_prepare_batch",
                        "inferer": "@train#inferer", "train_handlers": "@train#handlers", "amp": "@amp",
                        "amp_kwargs": "@amp_kwargs", "decollate": False},
        },
        "validate": {
            "datalist": "$@train_val[1]",
            "preprocessing": {"_target_": W + "eval_preprocessing", "num_classes": "@num_classes"},
            "dataset": {"_target_": "CacheDataset", "data": "@validate#datalist", "transform": "@validate#preprocessing",
                        "cache_rate": "@cache_rate", "num_workers": "@num_workers"},
            "dataloader": {"_target_": W + "data_loader", "dataset": "@validate#dataset", "batch_size": "@val_batch_size",
                           "device": "@device", "num_workers": "@num_workers"},
            "inferer": _sliding_window(),
            "postprocessing": {"_target_": W + "validation_postprocessing", "magnification": "@magnification",
                               "min_cell_size": "@min_cell_size", "num_classes": "@num_classes",
                               "min_cell_size_candidates": "@min_cell_size_candidates"},
            "key_metric": {"_target_": W + "cell_metrics", "class_names": "@class_names", "key_metric": "@key_metric",
                           "data": "@data", "split": "@val_split", "prefix": "val_",
                           "min_cell_size_candidates": "@min_cell_size_candidates"},
            "early_stop": {"_target_": "EarlyStopHandler", "trainer": None, "patience": "@early_stop_patience",
                           "score_function": {"_target_": "monai.handlers.stopping_fn_from_metric",
                                              "metric_name": "val_key_metric"}},
            "handlers": [
                "@validate#early_stop",
                {"_target_": "LrScheduleHandler", "lr_scheduler": "@lr_scheduler", "print_lr": False,
                 "step_transform": {"_target_": "monai.handlers.stopping_fn_from_metric", "metric_name": "val_key_metric"}},
                {"_target_": W + "ValidationLogs", "log_dir": "@output_dir", "key_metric": "@key_metric", "max_images": 4,
                 "_disabled_": "@is_not_rank0"},
            ],
            "evaluator": _evaluator(val_data_loader="@validate#dataloader", inferer="@validate#inferer",
                                    postprocessing="@validate#postprocessing", key_val_metric="@validate#key_metric",
                                    val_handlers="@validate#handlers"),
        },
        "initialize": _initialize(),
        "run": [{"_target_": W + "run_training", "early_stop": "@validate#early_stop", "trainer": "@train#trainer"}],
    })
    return cfg


def _initialize() -> list:
    # MetaTensor tracking costs ~50% of the augmentation time and training needs no metadata.
    return [{"_target_": "monai.utils.set_determinism", "seed": "@seed"},
            {"_target_": "monai.data.set_track_meta", "val": False},
            {"_target_": W + "fill_embedding_cache", "cache": "@embedding_cache", "network": "@network",
             "datalist": "@train#datalist", "view_spec": "@view_spec", "num_classes": "@num_classes"}]


# --------------------------------------------------------------------------------------------------
# configs/evaluate.json (an override of train.json)
# --------------------------------------------------------------------------------------------------
def evaluate_config() -> dict:
    return {
        "imports": ["$import os"],
        "eval_split": "test",
        "eval_dir": "$os.path.join(@output_dir, 'eval_' + @eval_split)",
        "bootstrap": 1000,
        # the split, or for the val split the share of the training images held out for it when the dataset has none
        "validate#datalist": {"_target_": W + "evaluation_datalist", "split": "@eval_split", **_SPLIT_OPTIONS},
        "validate#key_metric#split": "@eval_split",
        "validate#key_metric#prefix": "",
        **_TRAINED_NETWORK,
        "validate#checkpoint_loader": _checkpoint_loader(),
        "validate#handlers": [
            "@validate#checkpoint_loader",
            {"_target_": "cellgap.locking.OutputLock", "folder": "@eval_dir", "what": "evaluation"},
            {"_target_": "StatsHandler", "iteration_log": False},
            {"_target_": "cellgap.metrics.handlers.MetricsReportSaver", "output_dir": "@eval_dir",
             "bootstrap": "@bootstrap", "extra": {"encoder": "@encoder", "checkpoint": "@ckpt_path",
                                                  "min_cell_size": "@min_cell_size"}},
            {"_target_": "cellgap.visualization.OverlayHandler", "png_dir": "@eval_dir", "max_images": 4},
        ],
        "run": ["$@validate#evaluator.run()"],
    }


# --------------------------------------------------------------------------------------------------
# configs/inference.json (standalone)
# --------------------------------------------------------------------------------------------------
def inference_config(spec: EncoderSpec) -> dict:
    cfg = _common(spec)
    cfg.update({
        "_desc_input_dir": "folder of RGB tiles (.png, .tif, .tiff, .jpg) of any size",
        "input_dir": {"_target_": W + "path_in", "folder": "@bundle_root", "name": "data", "subfolder": "inference"},
        "output_dir": {"_target_": W + "path_in", "folder": "@bundle_root", "name": "runs", "subfolder": "inference"},
        **_TRAINED_NETWORK,
        "num_contour_classes": "$@trained.num_contour_classes",
        "num_distance_maps": "$@trained.num_distance_maps",
        "class_names": "$@trained.class_names",
        "num_classes": "$@trained.num_classes",
        "magnification": "$@trained.magnification",
        "mpp": "$@trained.mpp",
        "min_cell_size": "$@trained.min_cell_size",
        "write_geojson": True,
        "datalist": {"_target_": W + "image_datalist", "folder": "@input_dir"},
        "network_def": _network_def(),
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": W + "eval_preprocessing", "keys": ["image"]},
        # a file that cannot be loaded, run or written is named and skipped; the run ends non-zero (cellgap.inference)
        "dataset": {"_target_": "cellgap.inference.TolerantDataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {"_target_": "cellgap.data.dataloader.ForkSafeDataLoader", "dataset": "@dataset", "batch_size": 1,
                       "shuffle": False, "num_workers": 2},
        "inferer": _sliding_window(progress=True, _target_="cellgap.inference.TilePaddingInferer"),
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "cellgap.postprocessing.CISCAPostProcessingd", "magnification": "@magnification",
             "min_cell_size": "@min_cell_size", "num_classes": "@num_classes", "pred_key": "pred"},
            {"_target_": "cellgap.export.SaveCellOutputsd", "output_dir": "@output_dir", "class_names": "@class_names",
             "mpp": "@mpp", "geojson": "@write_geojson"},
        ]},
        "handlers": [
            _checkpoint_loader(),
            {"_target_": "cellgap.locking.OutputLock", "folder": "@output_dir", "what": "inference"},
            {"_target_": "StatsHandler", "iteration_log": False},
        ],
        "checkpoint_meta": _checkpoint_meta(),
        "prepare_batch": {"_target_": "cellgap.training.PrepareCISCABatch"},
        "evaluator": _evaluator(val_data_loader="@dataloader", inferer="@inferer", postprocessing="@postprocessing",
                                val_handlers="@handlers", _target_="cellgap.inference.IsolatingEvaluator",
                                summary_file={"_target_": W + "path_in", "folder": "@output_dir", "name": "summary.json"}),
        "initialize": [],
        "run": ["$@evaluator.run()"],
    })
    # dataset_dir is a required inference property of MONAI bundles; here it is the input folder.
    cfg["dataset_dir"] = "@input_dir"
    return cfg


# --------------------------------------------------------------------------------------------------
# configs/multi_gpu_train.json (an override of train.json, run under torchrun)
# --------------------------------------------------------------------------------------------------
def multi_gpu_config() -> dict:
    return {
        "_desc_": "torchrun --standalone --nproc_per_node=N -m monai.bundle run --config_file "
                  "\"['configs/train.json','configs/multi_gpu_train.json']\"; NCCL on GPUs, gloo on CPU",
        "backend": {"_target_": W + "distributed_backend"},
        "device": {"_target_": W + "distributed_device"},
        "network": {"_target_": W + "distributed_network", "network": "@network_def", "device": "@device"},
        "train#sampler": {"_target_": "DistributedSampler", "dataset": "@train#dataset", "even_divisible": True,
                          "shuffle": True},
        "validate#sampler": {"_target_": "DistributedSampler", "dataset": "@validate#dataset", "even_divisible": False,
                             "shuffle": False},
        "validate#dataloader#sampler": "@validate#sampler",
        "initialize": [{"_target_": W + "init_distributed", "backend": "@backend", "device": "@device"}, *_initialize()],
        "run": [{"_target_": W + "run_training", "early_stop": "@validate#early_stop", "trainer": "@train#trainer",
                 "distributed": True}],
        "finalize": [{"_target_": W + "end_distributed"}],
    }


# --------------------------------------------------------------------------------------------------
# metadata, docs, licence, logging
# --------------------------------------------------------------------------------------------------
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


JSON_WIDTH = 120


def _json_lines(obj, indent: int, lead: str) -> list[str]:
    """``obj`` as JSON after ``lead``: on one line where it fits JSON_WIDTH; a dict or list of one-line items
    packed several to a line (as Python is wrapped); else one entry a line."""
    flat = json.dumps(obj, ensure_ascii=False)
    if not isinstance(obj, (dict, list)) or not obj or len(lead) + len(flat) + 1 <= JSON_WIDTH:
        return [lead + flat]
    is_dict = isinstance(obj, dict)
    entries = ([json.dumps(k, ensure_ascii=False) + ": " for k in obj] if is_dict else [""] * len(obj))
    values = list(obj.values()) if is_dict else obj
    flats = [e + json.dumps(v, ensure_ascii=False) for e, v in zip(entries, values)]
    pad = " " * (len(lead) + 1)
    if all(not isinstance(v, (dict, list)) or len(pad) + len(f) + 2 <= JSON_WIDTH for v, f in zip(values, flats)):
        lines, line = [], lead + ("{" if is_dict else "[")
        for i, f in enumerate(flats):
            f += "," if i < len(flats) - 1 else ("}" if is_dict else "]")
            if len(line) + len(f) + 1 > JSON_WIDTH and line.strip() not in ("{", "["):
                lines.append(line.rstrip())
                line = pad
            line += f + " "
        return lines + [line.rstrip()]
    pad = " " * (indent + 2)
    lines = [lead + ("{" if is_dict else "[")]
    for i, (entry, value) in enumerate(zip(entries, values)):
        part = _json_lines(value, indent + 2, pad + entry)
        if i < len(values) - 1:
            part[-1] += ","
        lines += part
    return lines + [" " * indent + ("}" if is_dict else "]")]


def _json(obj: dict) -> str:
    """Indented JSON whose short dicts and lists stay on one line (the configs read as a list of options)."""
    return "\n".join(_json_lines(obj, 0, "")) + "\n"


def render_bundle(spec: EncoderSpec | str) -> dict[str, str]:
    """Relative path → text of every generated file of one bundle."""
    spec = get_encoder_spec(spec)
    return {
        "configs/metadata.json": _json(metadata(spec)),
        "configs/train.json": _json(train_config(spec)),
        "configs/evaluate.json": _json(evaluate_config()),
        "configs/inference.json": _json(inference_config(spec)),
        "configs/segment.json": _json(segment_config()),
        "configs/multi_gpu_train.json": _json(multi_gpu_config()),
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


# --------------------------------------------------------------------------------------------------
# Model-zoo export: a self-contained bundle with the library vendored into scripts/
# --------------------------------------------------------------------------------------------------
VENDORED = "scripts.cellgap"


def _vendor_strings(obj):
    """Point every config string at the vendored copy (``cellgap.x`` → ``scripts.cellgap.x``)."""
    if isinstance(obj, dict):
        return {k: _vendor_strings(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_vendor_strings(v) for v in obj]
    if isinstance(obj, str):
        return obj.replace("cellgap.", VENDORED + ".") if "cellgap." in obj else obj
    return obj


def export_bundle(spec: EncoderSpec | str, out_dir: str | os.PathLike, checkpoint: str | os.PathLike | None = None) -> Path:
    """Write ``<out_dir>/<bundle>_v<version>.zip``: the bundle with the cellgap library copied into its
    ``scripts/`` (configs pointing at ``scripts.cellgap``), so that it runs with ``python -m monai.bundle run``
    from its folder on a machine without cellgap.  ``checkpoint``: a trained ``models/model.pt`` to include.

    The library uses relative imports internally, so the copy needs no rewriting."""
    import shutil
    import tempfile
    import zipfile

    spec = get_encoder_spec(spec)
    name = bundle_name(spec)
    library = Path(__file__).resolve().parent
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / name
        for rel, text in render_bundle(spec).items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if rel.endswith(".json") and rel != "configs/metadata.json":
                text = _json(_vendor_strings(json.loads(text)))
            elif rel == "configs/metadata.json":  # cellgap is vendored in scripts/; no package index has it
                meta = json.loads(text)
                meta["required_packages_version"].pop("cellgap", None)
                text = _json(meta)
            path.write_text(text, encoding="utf-8")
        shutil.copytree(library, root / "scripts" / "cellgap", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        (root / "scripts" / "__init__.py").write_text('"""Custom code of this bundle: a copy of the cellgap library."""\n')
        if checkpoint is not None:
            (root / "models").mkdir()
            shutil.copy(checkpoint, root / "models" / "model.pt")
        archive = out_dir / f"{name}_v{BUNDLE_VERSION}.zip"
        partial = archive.with_name(archive.name + ".partial")
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as zf:
            for path in sorted(p for p in root.rglob("*") if p.is_file()):
                info = zipfile.ZipInfo(str(path.relative_to(root.parent)), date_time=(2020, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info, path.read_bytes())  # fixed timestamps: the same bundle gives the same archive
        os.replace(partial, archive)
    return archive
