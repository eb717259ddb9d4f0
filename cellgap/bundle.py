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
from .encoders import ENCODERS, EncoderSpec, get_encoder_spec

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
def _common(spec: EncoderSpec) -> dict:
    """Fields shared by train.json and inference.json: paths, device, encoder, decoder."""
    return {
        # MONAI binds `import a.b` as the name "a.b": import the package, then the submodules it must hold.
        "imports": ["$import os", "$import torch", "$import ignite", "$import monai", "$import cellgap",
                    "$import cellgap.cache", "$import cellgap.data.augmentation", "$import cellgap.data.device_augmentation",
                    "$import cellgap.data.sampling", "$import cellgap.data.selection", "$import cellgap.training",
                    "$import cellgap.checkpoint", "$import cellgap.locking", "$import cellgap.inference"],
        "bundle_root": ".",
        "ckpt_dir": "$os.path.join(@bundle_root, 'models')",
        "ckpt_path": "$os.path.join(@ckpt_dir, 'model.pt')",
        "output_dir": "$os.path.join(@bundle_root, 'runs')",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "amp": "$torch.cuda.is_available()",
        "encoder": spec.key,
        "_desc_encoder_weights": "'hub' (timm / Hugging Face; set HF_TOKEN for gated models), or a local folder "
                                 "(config.json + model.safetensors) or weights file",
        "encoder_weights": "hub",
        "allow_random_encoder": False,
        "reduced_encoder": False,
        "num_contour_classes": 3,
        "num_distance_maps": 4,
        "decoder": {"widths": [64, 64, 64, 128, 256, 512], "head_features": 256, "head_width": 32, "norm": None},
        "tile_size": 256,
        "sw_batch_size": 8,
    }


def _network_def() -> dict:
    return {
        "_target_": "cellgap.network.CellGapNet",
        "encoder": "@encoder",
        "num_classes": "@num_classes",
        "encoder_weights": "$None if @allow_random_encoder and @encoder_weights in (None, 'none', 'random') else @encoder_weights",
        "allow_random_encoder": "@allow_random_encoder",
        "reduced_encoder": "@reduced_encoder",
        "num_contour_classes": "@num_contour_classes",
        "num_distance_maps": "@num_distance_maps",
        "decoder": "@decoder",
    }


def _postprocessing(extra: list | None = None) -> dict:
    return {"_target_": "Compose", "transforms": [
        {"_target_": "cellgap.postprocessing.CISCAPostProcessingd", "magnification": "@magnification",
         "min_cell_size": "@min_cell_size", "num_classes": "@num_classes", "pred_key": "pred"},
        *(extra or []),
    ]}


def train_config(spec: EncoderSpec) -> dict:
    cfg = _common(spec)
    cfg.update({
        "_desc_dataset": "synthetic | pannuke | conic | cytodark0 | folder; dataset_dir holds it prepared "
                         "(scripts/prepare_data.py); synthetic is generated there on first use",
        "dataset": "synthetic",
        "dataset_dir": "$os.path.join(@bundle_root, 'data', @dataset)",
        "protocol": None,
        "synthetic": {"n_train": 160, "n_val": 24, "n_test": 24, "seed": 0, "magnification": 40},
        "data": "$cellgap.data.selection.select_dataset(@dataset, @dataset_dir, @protocol, synthetic=@synthetic)",
        "dataset_info": "$@data.info",
        "class_names": "$list(@dataset_info.class_names)",
        "num_classes": "$len(@class_names)",
        "magnification": "$@dataset_info.magnification",
        "min_cell_size": "$@dataset_info.cell_size",
        "_desc_train_crop_size": "side of the random training crops (tiles larger than it are cropped)",
        "train_crop_size": "@tile_size",
        "train_split": "train",
        "val_split": "val",
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
        "_desc_key_metric": "scalar that selects the checkpoint and stops early: pq, bpq, mpq, mpq+, f1d, aji, aji+, dice",
        "key_metric": "$'mpq+' if @num_classes > 1 else 'pq'",
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
        "batch_photometric": "$cellgap.data.device_augmentation.BatchPhotometricAugmentation(stain_stats=@stain_stats, "
                             "prob_scale=@augment_prob_scale, seed=@seed) if @photometric_on_device else None",
        "_desc_targets_on_device": "GPU training: the loader workers send the relabelled instance map instead of the distance "
                                   "maps and weight mask, which cellgap.targets.DenseTargets computes on the training batch "
                                   "on the GPU (same values; ≈1 ms less of a worker's CPU and 40 % fewer bytes per tile). "
                                   "Leave it off on a CPU: there the batch step costs more than the workers' numpy",
        "targets_on_device": False,
        "batch_dense_targets": "$cellgap.targets.DenseTargets() if @targets_on_device else None",
        "stain_stats": "$@dataset if @dataset in ('pannuke', 'conic', 'cytodark0') else 'he'",
        "balanced_sampling": False,
        "_desc_cache_mode": "embedding cache of the frozen encoder's maps: off (features on the fly, random augmentation), "
                            "clean (no augmentation), views (cache_views fixed augmented views per tile); see docs/cache.md",
        "cache_mode": "off",
        "cache_views": 4,
        "cache_dtype": "float16",
        "cache_dir": "$os.path.join(@bundle_root, 'cache')",
        "view_spec": {"_target_": "cellgap.cache.ViewSpec", "mode": "@cache_mode",
                      "num_views": "$1 if @cache_mode == 'clean' else @cache_views", "seed": "@seed",
                      "augmentation": {"stain_stats": "@stain_stats", "crop_size": "@train_crop_size",
                                       "prob_scale": "$0.0 if @cache_mode == 'clean' else @augment_prob_scale"}},
        "embedding_cache": "$None if @cache_mode == 'off' else cellgap.cache.EmbeddingCache.for_encoder(@cache_dir, "
                           "@network_def, @encoder_weights, @train#datalist, @view_spec, dataset_id=@dataset_info.name, "
                           "dtype=@cache_dtype)",
        "seed": 0,
        "is_not_rank0": "$torch.distributed.is_available() and torch.distributed.is_initialized() "
                        "and torch.distributed.get_rank() > 0",
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
        "checkpoint_meta": {"_target_": "cellgap.checkpoint.CheckpointMeta", "encoder": "@encoder", "class_names": "@class_names",
                            "num_contour_classes": "@num_contour_classes", "num_distance_maps": "@num_distance_maps",
                            "decoder_config": "@decoder", "reduced_encoder": "@reduced_encoder",
                            "encoder_weights": "@network_def#encoder_weights",
                            "extra": {"dataset": "$@dataset_info.name", "magnification": "@magnification",
                                      "mpp": "$@dataset_info.mpp", "min_cell_size": "@min_cell_size",
                                      "key_metric": "@key_metric", "cellgap_version": __version__}},
        "_desc_resume": "continue from ckpt_dir's last.pt when there is one (a killed run restarted with the same command)",
        "resume": True,
        "prepare_batch": {"_target_": "cellgap.training.PrepareCISCABatch"},
        "train_prepare_batch": "$cellgap.training.PrepareCISCABatch(photometric=@batch_photometric, dense_targets=@batch_dense_targets) "
                               "if @cache_mode == 'off' else cellgap.cache.PrepareCachedCISCABatch(encoder=@network_def.encoder, "
                               "cache=@embedding_cache, dense_targets=@batch_dense_targets)",
        "train": {
            "datalist": "$@data.datalist(@train_split)",
            "preprocessing": {"_target_": "Compose", "transforms": [
                {"_target_": "cellgap.data.loading.LoadTiled", "num_classes": "@num_classes",
                 "keys": ["image", "label", "classes", "contour_levels"]},
                {"_target_": "cellgap.targets.ContourLevelsd", "magnification": "@magnification"},
                "$@view_spec.augmentation_transform(photometric=not @photometric_on_device)",
                {"_target_": "cellgap.targets.CISCATargetsd", "magnification": "@magnification",
                 "num_contour_classes": "@num_contour_classes", "num_classes": "@num_classes",
                 "dense_targets": "$not @targets_on_device"},
                # an 8-bit image (as the reference's augmentations keep it): half the bytes of float16 through the
                # workers' shared memory; PrepareCISCABatch scales it to 0..1 on the device
                {"_target_": "cellgap.data.augmentation.ClipIntensityd", "keys": "image", "low": 0.0, "high": 255.0,
                 "dtype": "uint8"},
                "$cellgap.cache.CachedFeaturesd(@embedding_cache) if @embedding_cache is not None else monai.transforms.Identityd('image')",
                {"_target_": "SelectItemsd", "keys": "$['image', 'contour_target', 'type_target'] + (['label'] if "
                                                     "@targets_on_device else ['distance_target', 'weight_mask']) + "
                                                     "(list(cellgap.cache.CACHE_KEYS) if @embedding_cache is not None else [])"},
                # half the bytes of float32; PrepareCISCABatch restores float32 on the device
                {"_target_": "CastToTyped", "keys": "$list(cellgap.training.HALF_PRECISION_KEYS)", "dtype": "$torch.float16",
                 "allow_missing_keys": "@targets_on_device"},
            ]},
            "dataset": {"_target_": "CacheDataset", "data": "@train#datalist", "transform": "@train#preprocessing",
                        "cache_rate": "@cache_rate", "num_workers": "@num_workers"},
            "sampler": "$cellgap.data.sampling.ClassBalancedSampler(cellgap.data.sampling.dataset_class_counts("
                       "@train#datalist, @num_classes), seed=@seed, **cellgap.data.sampling.OVERSAMPLING_PRESETS.get("
                       "@dataset, {})) if @balanced_sampling else None",
            "dataloader": {"_target_": "cellgap.data.dataloader.ForkSafeDataLoader", "dataset": "@train#dataset", "batch_size": "@batch_size",
                           "shuffle": "$@train#sampler is None", "sampler": "@train#sampler",
                           "num_workers": "@num_workers", "drop_last": True, "pin_memory": "$@device.type == 'cuda'"},
            "inferer": {"_target_": "SimpleInferer"},
            "handlers": [
                {"_target_": "cellgap.training.DataWait"},  # first: its epoch time ends before validation
                {"_target_": "ValidationHandler", "validator": "@validate#evaluator", "epoch_level": True,
                 "interval": "@val_interval"},
                # after the ValidationHandler: the epoch's score is known when it saves; resumes on start
                {"_target_": "cellgap.checkpoint.TrainingCheckpoints", "save_dir": "@ckpt_dir", "meta": "@checkpoint_meta",
                 "network": "@network_def", "optimizer": "@optimizer", "lr_scheduler": "@lr_scheduler",
                 "validator": "@validate#evaluator", "key_metric_name": "val_key_metric",
                 "early_stop": "@validate#handlers#0", "random_sources": "@train#dataset", "resume": "@resume",
                 "lock": "@output_dir"},
                {"_target_": "cellgap.training.GradientClipping", "parameters": "$@network_def.decoder.parameters()",
                 "max_norm": "@grad_clip_norm", "mode": "@grad_clip_mode"},
                {"_target_": "StatsHandler", "tag_name": "train_loss", "iteration_log": False,
                 "output_transform": "$lambda output: output['loss']", "_disabled_": "@is_not_rank0"},
                {"_target_": "TensorBoardStatsHandler", "log_dir": "@output_dir", "tag_name": "train_loss",
                 "output_transform": "$lambda output: output['loss']", "_disabled_": "@is_not_rank0"},
                {"_target_": "TensorBoardStatsHandler", "log_dir": "@output_dir", "iteration_log": False,
                 "epoch_event_writer": "$lambda engine, writer: writer.add_scalar('learning_rate', "
                                       "@optimizer.param_groups[0]['lr'], engine.state.epoch)",
                 "_disabled_": "@is_not_rank0"},
                {"_target_": "ignite.handlers.ProgressBar", "persist": True, "_disabled_": "@is_not_rank0"},
            ],
            "trainer": {"_target_": "SupervisedTrainer", "max_epochs": "@epochs", "epoch_length": "@epoch_length",
                        "device": "@device", "train_data_loader": "@train#dataloader", "network": "@network",
                        "loss_function": "@loss", "optimizer": "@optimizer", "prepare_batch": "@train_prepare_batch",
                        "inferer": "@train#inferer", "train_handlers": "@train#handlers", "amp": "@amp",
                        "amp_kwargs": {"dtype": "$torch.bfloat16"}, "decollate": False},
        },
        "validate": {
            "datalist": "$@data.datalist(@val_split)",
            "preprocessing": {"_target_": "Compose", "transforms": [
                {"_target_": "cellgap.data.loading.LoadTiled", "num_classes": "@num_classes"},
                {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": 0.0, "a_max": 255.0, "b_min": 0.0,
                 "b_max": 1.0, "clip": True},
            ]},
            "dataset": {"_target_": "CacheDataset", "data": "@validate#datalist", "transform": "@validate#preprocessing",
                        "cache_rate": "@cache_rate", "num_workers": "@num_workers"},
            "dataloader": {"_target_": "cellgap.data.dataloader.ForkSafeDataLoader", "dataset": "@validate#dataset", "batch_size": "@val_batch_size",
                           "shuffle": False, "num_workers": "@num_workers", "pin_memory": "$@device.type == 'cuda'"},
            "inferer": {"_target_": "SlidingWindowInferer", "roi_size": ["@tile_size", "@tile_size"],
                        "sw_batch_size": "@sw_batch_size", "overlap": 0.25, "mode": "gaussian", "padding_mode": "reflect"},
            "postprocessing": _postprocessing([
                {"_target_": "CopyItemsd", "keys": ["label", "classes"], "names": ["gt_instances", "gt_types"]},
            ]),
            "metric_protocol": "$@data.metric_protocol(@val_split)",
            "key_metric": {"val_key_metric": {
                "_target_": "cellgap.metrics.handlers.CellMetrics", "class_names": "@class_names",
                "key_metric": "@key_metric", "protocol": "@validate#metric_protocol", "prefix": "val_"}},
            "handlers": [
                {"_target_": "EarlyStopHandler", "trainer": None, "patience": "@early_stop_patience",
                 "score_function": "$monai.handlers.stopping_fn_from_metric('val_key_metric')"},
                {"_target_": "LrScheduleHandler", "lr_scheduler": "@lr_scheduler", "print_lr": False,
                 "step_transform": "$lambda engine: engine.state.metrics['val_key_metric']"},
                {"_target_": "StatsHandler", "iteration_log": False, "_disabled_": "@is_not_rank0"},
                {"_target_": "TensorBoardStatsHandler", "log_dir": "@output_dir", "iteration_log": False,
                 "_disabled_": "@is_not_rank0"},
                {"_target_": "cellgap.visualization.OverlayHandler", "log_dir": "@output_dir", "max_images": 4,
                 "_disabled_": "@is_not_rank0"},
            ],
            "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@validate#dataloader",
                          "network": "@network", "prepare_batch": "@prepare_batch", "inferer": "@validate#inferer",
                          "postprocessing": "@validate#postprocessing", "key_val_metric": "@validate#key_metric",
                          "val_handlers": "@validate#handlers", "amp": "@amp", "amp_kwargs": {"dtype": "$torch.bfloat16"}},
        },
        # MetaTensor tracking costs ~50% of the augmentation time and training needs no metadata.
        "initialize": ["$monai.utils.set_determinism(seed=@seed)", "$monai.data.set_track_meta(False)",
                       "$@embedding_cache is None or cellgap.cache.fill_cache(@network.encoder if hasattr(@network, 'encoder') "
                       "else @network.module.encoder, @train#datalist, @embedding_cache, "
                       "transform=cellgap.cache.default_fill_transform(@view_spec, @num_classes))"],
        "run": [
            "$@validate#handlers#0.set_trainer(trainer=@train#trainer)",
            "$@train#trainer.add_event_handler(ignite.engine.Events.ITERATION_COMPLETED, ignite.handlers.TerminateOnNan())",
            "$@train#trainer.run()",
        ],
    })
    return cfg


# --------------------------------------------------------------------------------------------------
# configs/evaluate.json (an override of train.json)
# --------------------------------------------------------------------------------------------------
def evaluate_config() -> dict:
    return {
        "eval_split": "test",
        "eval_dir": "$os.path.join(@output_dir, 'eval_' + @eval_split)",
        "bootstrap": 1000,
        "validate#datalist": "$@data.datalist(@eval_split)",
        "validate#metric_protocol": "$@data.metric_protocol(@eval_split)",
        "validate#key_metric#val_key_metric#prefix": "",
        # the network is rebuilt as the checkpoint says: its decoder, its encoder weights (a random one is stored in it)
        "checkpoint": "$cellgap.checkpoint.read_checkpoint(@ckpt_path)",
        "decoder": "$cellgap.checkpoint.decoder_config(@checkpoint)",
        "reduced_encoder": "$@checkpoint['meta'].get('reduced_encoder', False)",
        "encoder_weights": "$cellgap.checkpoint.default_encoder_weights(@checkpoint)",
        "allow_random_encoder": "$@checkpoint['meta'].get('encoder_weights_id') == 'random'",
        "validate#handlers": [
            {"_target_": "cellgap.checkpoint.CheckpointLoader", "load_path": "$cellgap.checkpoint.existing_checkpoint(@ckpt_path)",
             "load_dict": "$cellgap.checkpoint.checkpoint_objects(@checkpoint_meta, @network_def)", "map_location": "@device"},
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
    cfg["imports"] = cfg["imports"] + ["$import glob"]
    cfg.update({
        "_desc_input_dir": "folder of RGB tiles (.png, .tif, .tiff, .jpg) of any size",
        "input_dir": "$os.path.join(@bundle_root, 'data', 'inference')",
        "output_dir": "$os.path.join(@bundle_root, 'runs', 'inference')",
        "checkpoint": "$cellgap.checkpoint.read_checkpoint(@ckpt_path)",
        # the network is rebuilt as the checkpoint says: its decoder, its encoder weights (a random one is stored in it)
        "decoder": "$cellgap.checkpoint.decoder_config(@checkpoint)",
        "reduced_encoder": "$@checkpoint['meta'].get('reduced_encoder', False)",
        "num_contour_classes": "$@checkpoint['meta'].get('num_contour_classes', 3)",
        "num_distance_maps": "$@checkpoint['meta'].get('num_distance_maps', 4)",
        "encoder_weights": "$cellgap.checkpoint.default_encoder_weights(@checkpoint)",
        "allow_random_encoder": "$@checkpoint['meta'].get('encoder_weights_id') == 'random'",
        "class_names": "$@checkpoint['meta']['class_names']",
        "num_classes": "$len(@class_names)",
        "magnification": "$@checkpoint['meta']['magnification']",
        "mpp": "$@checkpoint['meta'].get('mpp')",
        "min_cell_size": "$@checkpoint['meta']['min_cell_size']",
        "write_geojson": True,
        "datalist": "$[{'image': f} for f in cellgap.training.image_files(@input_dir)]",
        "network_def": _network_def(),
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "cellgap.data.loading.LoadTiled", "keys": ["image"]},
            {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": 0.0, "a_max": 255.0, "b_min": 0.0, "b_max": 1.0,
             "clip": True},
        ]},
        # a file that cannot be loaded, run or written is named and skipped; the run ends non-zero (cellgap.inference)
        "dataset": {"_target_": "cellgap.inference.TolerantDataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {"_target_": "cellgap.data.dataloader.ForkSafeDataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False, "num_workers": 2},
        "inferer": {"_target_": "cellgap.inference.TilePaddingInferer", "roi_size": ["@tile_size", "@tile_size"],
                    "sw_batch_size": "@sw_batch_size", "overlap": 0.25, "mode": "gaussian", "padding_mode": "reflect",
                    "progress": True},
        "postprocessing": _postprocessing([
            {"_target_": "cellgap.export.SaveCellOutputsd", "output_dir": "@output_dir", "class_names": "@class_names",
             "mpp": "@mpp", "geojson": "@write_geojson"},
        ]),
        "handlers": [
            {"_target_": "cellgap.checkpoint.CheckpointLoader", "load_path": "@ckpt_path", "map_location": "@device",
             "load_dict": "$cellgap.checkpoint.checkpoint_objects(@checkpoint_meta, @network_def)"},
            {"_target_": "cellgap.locking.OutputLock", "folder": "@output_dir", "what": "inference"},
            {"_target_": "StatsHandler", "iteration_log": False},
        ],
        "checkpoint_meta": {"_target_": "cellgap.checkpoint.CheckpointMeta", "encoder": "@encoder", "class_names": "@class_names",
                            "num_contour_classes": "@num_contour_classes", "num_distance_maps": "@num_distance_maps",
                            "decoder_config": "@decoder", "reduced_encoder": "@reduced_encoder",
                            "encoder_weights": "@network_def#encoder_weights"},
        "prepare_batch": {"_target_": "cellgap.training.PrepareCISCABatch"},
        "evaluator": {"_target_": "cellgap.inference.IsolatingEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "prepare_batch": "@prepare_batch", "inferer": "@inferer",
                      "postprocessing": "@postprocessing", "val_handlers": "@handlers", "amp": "@amp",
                      "amp_kwargs": {"dtype": "$torch.bfloat16"},
                      "summary_file": "$os.path.join(@output_dir, 'summary.json')"},
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
        "backend": "$'nccl' if torch.cuda.is_available() else 'gloo'",
        "device": "$torch.device(f\"cuda:{os.environ['LOCAL_RANK']}\") if torch.cuda.is_available() else torch.device('cpu')",
        "network": {"_target_": "torch.nn.parallel.DistributedDataParallel", "module": "$@network_def.to(@device).prepare_layout(@device)",
                    "device_ids": "$[@device] if torch.cuda.is_available() else None"},
        "train#sampler": {"_target_": "DistributedSampler", "dataset": "@train#dataset", "even_divisible": True,
                          "shuffle": True},
        "train#dataloader#shuffle": False,
        "validate#sampler": {"_target_": "DistributedSampler", "dataset": "@validate#dataset", "even_divisible": False,
                             "shuffle": False},
        "validate#dataloader#sampler": "@validate#sampler",
        "initialize": [
            "$import torch.distributed as dist",
            "$dist.is_initialized() or dist.init_process_group(backend=@backend)",
            "$torch.cuda.set_device(@device) if torch.cuda.is_available() else None",
            "$monai.utils.set_determinism(seed=@seed)",
            "$monai.data.set_track_meta(False)",
            "$@embedding_cache is None or cellgap.cache.fill_cache(@network.module.encoder, @train#datalist, "
            "@embedding_cache, transform=cellgap.cache.default_fill_transform(@view_spec, @num_classes))",
        ],
        "run": [
            "$@validate#handlers#0.set_trainer(trainer=@train#trainer)",
            "$@train#sampler.set_epoch(0)",
            "$@train#trainer.add_event_handler(ignite.engine.Events.EPOCH_STARTED, "
            "lambda engine: @train#sampler.set_epoch(engine.state.epoch))",
            "$@train#trainer.run()",
            # one string, one write: the ranks share stdout, and print's separate pieces interleave
            "$print('rank %d trained %d iterations' % (torch.distributed.get_rank(), @train#trainer.state.iteration), "
            "flush=True)",
        ],
        # every rank leaves its last collective before any tears the group down (one rank of the two-process
        # gloo test aborted at teardown once in ≈15 runs without it)
        "finalize": ["$torch.distributed.is_initialized() and torch.distributed.barrier()",
                     "$torch.distributed.is_initialized() and torch.distributed.destroy_process_group()"],
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
Choose with `--dataset synthetic|pannuke|conic|cytodark0|folder --dataset_dir <prepared folder>`.
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


def _json(obj: dict) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def render_bundle(spec: EncoderSpec | str) -> dict[str, str]:
    """Relative path → text of every generated file of one bundle."""
    spec = get_encoder_spec(spec)
    return {
        "configs/metadata.json": _json(metadata(spec)),
        "configs/train.json": _json(train_config(spec)),
        "configs/evaluate.json": _json(evaluate_config()),
        "configs/inference.json": _json(inference_config(spec)),
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
        if obj == "$import cellgap":
            return "$import scripts"  # MONAI binds `import a.b` as the name "a.b"; expressions need `scripts`
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
