"""The bundle configs as Python dicts: train.json, evaluate.json (an override of train.json), inference.json
and multi_gpu_train.json (an override of train.json run under torchrun), with their shared pieces.

One template per config for every encoder; only the encoder-specific fields differ (see :mod:`.render`).
"""

from __future__ import annotations

from .. import __version__
from ..data.registry import DATASETS
from ..decoder import DEFAULT_DECODER
from ..encoders import EncoderSpec

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
        "decoder": dict(DEFAULT_DECODER),
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
