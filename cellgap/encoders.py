"""The encoder registry and the frozen encoder wrapper.

The registry is the one place that knows each encoder: timm or hub id, the architecture and
constructor kwargs needed to build it without the hub, which stages or blocks feed the decoder,
the input size for a 256² tile, normalisation, licence and gated access.  Bundles, benchmarks and
the study runner all read it.

Weights come from the hub (``weights="hub"``; token from ``HF_TOKEN``), from a local folder in
the hub's own layout (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``), or from a
single local weights file.  When weights cannot be had, :class:`EncoderWeightsError` says which
encoder, why and how to fix it.  Random weights are used only when asked for explicitly.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TILE = 256  # reference tile side; reductions are expressed relative to it


def _swiglu_kwargs() -> dict:
    # Resolved lazily so that the registry stays plain data (JSON-serialisable names).
    return {"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": torch.nn.SiLU}


@dataclass(frozen=True)
class EncoderSpec:
    """Everything cellgap needs to know about one encoder."""

    key: str
    display_name: str
    model_id: str  # what timm.create_model gets for pretrained weights: a timm id or "hf-hub:org/repo"
    architecture: str  # timm architecture that builds the same network without the hub
    kwargs: dict  # constructor kwargs (the hub config's model_args plus what the hub card requires)
    taps: tuple[int, int, int, int]  # 0-based stages (hierarchical) or blocks (ViT) fed to the decoder
    family: str  # "hierarchical" or "vit"
    input_size: int = TILE  # encoder input side for a 256² tile (224 for patch-14 ViTs)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    pretraining: str = ""
    domain: str = "general"  # "general" or "pathology"
    license: str = ""
    gated: bool = False
    url: str = ""
    swiglu: bool = False  # needs timm SwiGLUPacked MLP + SiLU (passed at build time)
    reduced_kwargs: dict = field(default_factory=dict)  # small same-family build for tests and CPU demos
    demo: bool = False  # small enough for CPU demos with real (or random) weights
    citation: str = ""

    @property
    def hub_repo(self) -> str | None:
        return self.model_id.split(":", 1)[1] if self.model_id.startswith(("hf-hub:", "hf_hub:")) else None

    def build_kwargs(self) -> dict:
        kwargs = dict(self.kwargs)
        if self.swiglu:
            kwargs.update(_swiglu_kwargs())
        return kwargs

    def reduced(self) -> EncoderSpec:
        """A shallow, narrow build of the same family (same patching, registers, MLP type) for fast tests."""
        if not self.reduced_kwargs:
            return self
        taps = (0, 1, 2, 3)
        return replace(self, kwargs={**self.kwargs, **self.reduced_kwargs}, taps=taps, reduced_kwargs={})


_VIT_REDUCED = {"depth": 4, "embed_dim": 96, "num_heads": 2}  # 96: SwiGLU hidden sizes stay even
_HIER_REDUCED_CONVNEXT = {"depths": (1, 1, 1, 1), "dims": (16, 32, 64, 128)}

ENCODERS: dict[str, EncoderSpec] = {
    spec.key: spec
    for spec in [
        EncoderSpec(
            key="convnext_b_22k",
            display_name="ConvNeXt-B (ImageNet-22K)",
            model_id="convnext_base.fb_in22k",
            architecture="convnext_base",
            kwargs={},
            taps=(0, 1, 2, 3),
            family="hierarchical",
            pretraining="ImageNet-22K",
            license="Apache-2.0 (timm / Meta ConvNeXt weights)",
            reduced_kwargs=_HIER_REDUCED_CONVNEXT,
            citation="Liu et al., A ConvNet for the 2020s, CVPR 2022",
        ),
        EncoderSpec(
            key="swinv2_b_22k",
            display_name="Swin-V2-B (ImageNet-22K)",
            model_id="swinv2_base_window12_192.ms_in22k",
            architecture="swinv2_base_window12_192",
            # Pretrained at 192 px; SwinV2's continuous position bias adapts to 256 px (window clamped to
            # the 8×8 last stage); the relative-position buffers are rebuilt, not loaded.
            kwargs={"img_size": TILE, "dynamic_img_size": True},
            taps=(0, 1, 2, 3),
            family="hierarchical",
            pretraining="ImageNet-22K",
            license="MIT (Microsoft Swin Transformer weights)",
            reduced_kwargs={"depths": (1, 1, 1, 1), "embed_dim": 16, "num_heads": (1, 2, 4, 8)},
            citation="Liu et al., Swin Transformer V2, CVPR 2022",
        ),
        EncoderSpec(
            key="vit_r50_hybrid_21k",
            display_name="R50+ViT-B/16 hybrid (ImageNet-21K)",
            model_id="vit_base_r50_s16_224.orig_in21k",
            architecture="vit_base_r50_s16_224",
            kwargs={"img_size": TILE, "dynamic_img_size": True},
            taps=(2, 5, 8, 11),
            family="vit",
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            pretraining="ImageNet-21K",
            license="Apache-2.0 (Google ViT weights)",
            reduced_kwargs=_VIT_REDUCED,
            citation="Dosovitskiy et al., An Image is Worth 16x16 Words, ICLR 2021",
        ),
        EncoderSpec(
            key="vit_l16_21k",
            display_name="ViT-L/16 (ImageNet-21K)",
            model_id="vit_large_patch16_224.augreg_in21k",
            architecture="vit_large_patch16_224",
            kwargs={"img_size": TILE, "dynamic_img_size": True},
            taps=(5, 11, 17, 23),
            family="vit",
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            pretraining="ImageNet-21K",
            license="Apache-2.0 (Google AugReg weights)",
            reduced_kwargs=_VIT_REDUCED,
            citation="Steiner et al., How to train your ViT?, TMLR 2022",
        ),
        EncoderSpec(
            key="dinov2_vitl14",
            display_name="DINOv2 ViT-L/14 (LVD-142M)",
            model_id="vit_large_patch14_dinov2.lvd142m",
            architecture="vit_large_patch14_dinov2",
            kwargs={"img_size": 224, "dynamic_img_size": True},
            taps=(5, 11, 17, 23),
            family="vit",
            input_size=224,
            pretraining="LVD-142M",
            license="Apache-2.0 (Meta DINOv2 weights)",
            reduced_kwargs=_VIT_REDUCED,
            citation="Oquab et al., DINOv2, TMLR 2024",
        ),
        EncoderSpec(
            key="uni",
            display_name="UNI (ViT-L/16, 100k WSIs)",
            model_id="hf-hub:MahmoodLab/uni",
            architecture="vit_large_patch16_224",
            kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0, "dynamic_img_size": True},
            taps=(5, 11, 17, 23),
            family="vit",
            pretraining="Mass-100K (100k H&E WSIs)",
            domain="pathology",
            license="CC-BY-NC-ND-4.0, gated: accept the terms at https://huggingface.co/MahmoodLab/UNI",
            gated=True,
            url="https://huggingface.co/MahmoodLab/UNI",
            reduced_kwargs=_VIT_REDUCED,
            citation="Chen et al., Towards a general-purpose foundation model for computational pathology, Nat Med 2024",
        ),
        EncoderSpec(
            key="virchow2",
            display_name="Virchow2 (ViT-H/14, 3.1M WSIs)",
            model_id="hf-hub:paige-ai/Virchow2",
            architecture="vit_huge_patch14_224",
            kwargs={"img_size": 224, "init_values": 1e-5, "num_classes": 0, "mlp_ratio": 5.3375, "reg_tokens": 4,
                    "global_pool": "", "dynamic_img_size": True},
            taps=(7, 15, 23, 31),
            family="vit",
            input_size=224,
            pretraining="3.1M WSIs (Paige)",
            domain="pathology",
            license="CC-BY-NC-ND-4.0, gated: accept the terms at https://huggingface.co/paige-ai/Virchow2",
            gated=True,
            url="https://huggingface.co/paige-ai/Virchow2",
            swiglu=True,
            reduced_kwargs=_VIT_REDUCED,
            citation="Zimmermann et al., Virchow2: Scaling self-supervised mixed magnification models in pathology, 2024",
        ),
        EncoderSpec(
            key="prov_gigapath",
            display_name="Prov-GigaPath tile encoder (ViT-g/16, 171k WSIs)",
            model_id="hf-hub:prov-gigapath/prov-gigapath",
            architecture="vit_giant_patch14_dinov2",
            kwargs={"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40, "num_heads": 24,
                    "init_values": 1e-5, "mlp_ratio": 5.33334, "num_classes": 0, "dynamic_img_size": True},
            taps=(9, 19, 29, 39),
            family="vit",
            pretraining="Prov-Path (171k WSIs)",
            domain="pathology",
            license="Apache-2.0 weights, gated: accept the terms at https://huggingface.co/prov-gigapath/prov-gigapath",
            gated=True,
            url="https://huggingface.co/prov-gigapath/prov-gigapath",
            reduced_kwargs=_VIT_REDUCED,
            citation="Xu et al., A whole-slide foundation model for digital pathology from real-world data, Nature 2024",
        ),
        EncoderSpec(
            key="uni2_h",
            display_name="UNI2-h (ViT-H/14, 350k WSIs)",
            model_id="hf-hub:MahmoodLab/UNI2-h",
            architecture="vit_huge_patch14_224",
            kwargs={"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5, "embed_dim": 1536,
                    "mlp_ratio": 2.66667 * 2, "num_classes": 0, "no_embed_class": True, "reg_tokens": 8, "dynamic_img_size": True},
            taps=(5, 11, 17, 23),
            family="vit",
            input_size=224,
            pretraining="350k H&E and IHC WSIs",
            domain="pathology",
            license="CC-BY-NC-ND-4.0, gated: accept the terms at https://huggingface.co/MahmoodLab/UNI2-h",
            gated=True,
            url="https://huggingface.co/MahmoodLab/UNI2-h",
            swiglu=True,
            reduced_kwargs=_VIT_REDUCED,
            citation="Chen et al., Nat Med 2024 (UNI2-h model card)",
        ),
        EncoderSpec(
            key="h_optimus_0",
            display_name="H-optimus-0 (ViT-g/14, >500k WSIs)",
            model_id="hf-hub:bioptimus/H-optimus-0",
            architecture="vit_giant_patch14_reg4_dinov2",
            kwargs={"img_size": 224, "init_values": 1e-5, "num_classes": 0, "dynamic_img_size": True},
            taps=(9, 19, 29, 39),
            family="vit",
            input_size=224,
            mean=(0.707223, 0.578729, 0.703617),
            std=(0.211883, 0.230117, 0.177517),
            pretraining=">500k H&E WSIs (Bioptimus)",
            domain="pathology",
            license="Apache-2.0 weights, gated: accept the terms at https://huggingface.co/bioptimus/H-optimus-0",
            gated=True,
            url="https://huggingface.co/bioptimus/H-optimus-0",
            reduced_kwargs=_VIT_REDUCED,
            citation="Saillard et al., H-optimus-0, 2024",
        ),
        EncoderSpec(
            key="convnext_atto",
            display_name="ConvNeXt-atto (ImageNet-1K; small CPU demo encoder)",
            model_id="convnext_atto.d2_in1k",
            architecture="convnext_atto",
            kwargs={},
            taps=(0, 1, 2, 3),
            family="hierarchical",
            pretraining="ImageNet-1K",
            license="Apache-2.0 (timm weights)",
            demo=True,
            citation="Liu et al., A ConvNet for the 2020s, CVPR 2022 (timm atto variant)",
        ),
    ]
}

STUDY_ENCODERS = ("convnext_b_22k", "swinv2_b_22k", "vit_r50_hybrid_21k", "vit_l16_21k", "dinov2_vitl14", "uni",
                  "virchow2", "prov_gigapath")
EXTRA_ENCODERS = ("uni2_h", "h_optimus_0")
DEMO_ENCODER = "convnext_atto"


def get_encoder_spec(key: str | EncoderSpec) -> EncoderSpec:
    if isinstance(key, EncoderSpec):
        return key
    try:
        return ENCODERS[key]
    except KeyError:
        raise KeyError(f"encoder {key!r} is not in the registry; known encoders: {sorted(ENCODERS)}") from None


class EncoderWeightsError(RuntimeError):
    """Pretrained weights could not be obtained; the message says which encoder, why, and how to fix it."""


def _hub_failure_reason(spec: EncoderSpec, error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    name = type(error).__name__
    if name == "GatedRepoError" or "gated" in text.lower() or "401" in text or "403" in text:
        how = ("accept the model's terms on its hub page, then set HF_TOKEN to a token of that account"
               if not token else "HF_TOKEN is set but that account has no access yet: accept the terms on the hub page")
        return f"the repository is gated ({spec.url or spec.model_id}); {how}"
    if offline or name in ("LocalEntryNotFoundError", "OfflineModeIsEnabled") or "offline" in text.lower() \
            or any(s in text for s in ("ConnectionError", "Max retries", "Name or service", "timed out", "Temporary failure",
                                       "Failed to resolve", "Network is unreachable", "ConnectError")):
        gate = " (gated: also accept its terms and set HF_TOKEN)" if spec.gated else ""
        return (f"the hub cannot be reached (offline{' — HF_HUB_OFFLINE is set' if offline else ''}); download the "
                f"weights on a connected machine{gate} and pass the folder (config.json + model.safetensors or "
                f"pytorch_model.bin) or the weights file as `weights=`")
    return f"{text}; check the id {spec.model_id!r}, your network and HF_TOKEN, or pass a local folder/file as `weights=`"


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe of the hub (skipped behind a proxy, where only the proxy is reachable)."""
    from huggingface_hub import constants

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return True
    try:
        socket.create_connection((urlparse(constants.ENDPOINT).hostname, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextmanager
def _offline_unless_hub_reachable():
    """Use the local hub cache only when the hub cannot be reached: cached weights then load at once,
    and missing ones fail at once instead of after a minute of download retries."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or _hub_reachable():
        yield
        return
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = False


def _load_timm_model(spec: EncoderSpec, weights: str | os.PathLike | None) -> nn.Module:
    """Build the timm model of ``spec``: random init (weights=None), hub ("hub") or a local folder/file."""
    kwargs = spec.build_kwargs()
    kwargs.setdefault("num_classes", 0)
    if weights is None:
        return timm.create_model(spec.architecture, pretrained=False, **kwargs)
    if str(weights) == "hub":
        try:
            with _offline_unless_hub_reachable():
                return timm.create_model(spec.model_id, pretrained=True, **kwargs)
        except Exception as e:  # hub, network and auth errors come in many types
            raise EncoderWeightsError(f"encoder {spec.key!r}: cannot load pretrained weights from the hub "
                                      f"({spec.model_id}): {_hub_failure_reason(spec, e)}") from e
    path = Path(weights).expanduser()
    if not path.exists():
        raise EncoderWeightsError(f"encoder {spec.key!r}: weights path {path} does not exist; expected a folder in the hub "
                                  f"layout (config.json + model.safetensors or pytorch_model.bin) or a weights file")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise EncoderWeightsError(f"encoder {spec.key!r}: {path} has no config.json; expected the hub layout "
                                      f"(config.json + model.safetensors or pytorch_model.bin)")
        try:
            arch = json.loads((path / "config.json").read_text()).get("architecture")
        except json.JSONDecodeError as e:
            raise EncoderWeightsError(f"encoder {spec.key!r}: {path / 'config.json'} is not valid JSON ({e})") from e
        if arch and arch != spec.architecture:
            raise EncoderWeightsError(f"encoder {spec.key!r}: {path / 'config.json'} describes architecture {arch!r}, "
                                      f"but this encoder is {spec.architecture!r}; wrong weights folder?")
        try:
            return timm.create_model(f"local-dir:{path.resolve()}", pretrained=True, **kwargs)
        except RuntimeError as e:
            raise EncoderWeightsError(f"encoder {spec.key!r}: cannot load weights from {path}: {e}") from e
    try:
        return timm.create_model(spec.architecture, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs)
    except (RuntimeError, ValueError, OSError) as e:
        raise EncoderWeightsError(f"encoder {spec.key!r}: cannot load weights file {path}: {e}") from e


class FrozenEncoder(nn.Module):
    """A timm encoder that returns four feature maps and never trains.

    - No parameter requires grad; ``train()`` keeps the encoder in eval mode (MONAI's
      ``SupervisedTrainer`` calls ``network.train()`` every iteration).
    - Features are computed under ``torch.no_grad()`` and, on CUDA, bf16 autocast.
    - Input: (B,3,H,W) RGB in [0,1]; it is normalised with the encoder's mean/std and, for patch-14
      models, resized so that a 256² tile becomes 224² (a 16×16 token grid).
    - Output: 4 maps (B,C_i,h_i,w_i); ``channels`` and ``reductions`` (relative to the input tile).

    ``weights``: None (random init; requires ``allow_random``, which also takes ``"none"`` / ``"random"``),
    ``"hub"``, or a local folder/file.
    """

    def __init__(self, encoder: str | EncoderSpec, weights: str | os.PathLike | None = "hub", allow_random: bool = False,
                 reduced: bool = False):
        super().__init__()
        spec = get_encoder_spec(encoder)
        if reduced:
            spec = spec.reduced()
        self.spec = spec
        if allow_random and weights in ("none", "random"):  # how a config spells "no weights" (JSON has null too)
            weights = None
        if weights is None and not allow_random:
            raise EncoderWeightsError(f"encoder {spec.key!r}: no weights given; pass weights='hub', a local folder or file, "
                                      f"or allow_random=True to use random weights on purpose")
        self.model = _load_timm_model(spec, weights)
        self.random_weights = weights is None
        if self.random_weights:
            warnings.warn(f"encoder {spec.key!r} is RANDOMLY INITIALISED (no pretrained weights): "
                          f"results are a demo of the pipeline, not of the encoder", stacklevel=2)
        self.taps = tuple(spec.taps)
        self._prune()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        self.scale = spec.input_size / TILE
        self.channels, self.reductions = self._feature_geometry()

    def _prune(self) -> None:
        # Drop blocks after the last tap and the classifier head: they would cost compute for nothing.
        if hasattr(self.model, "prune_intermediate_layers"):
            self.taps = tuple(self.model.prune_intermediate_layers(list(self.taps), prune_norm=True, prune_head=True))

    def _feature_geometry(self) -> tuple[list[int], list[int]]:
        info = self.model.feature_info
        channels = [int(info[i]["num_chs"]) for i in self.taps]
        # timm reports reductions relative to the encoder's own input; express them relative to the tile.
        reductions = [round(int(info[i]["reduction"]) / self.scale) for i in self.taps]
        return channels, reductions

    def train(self, mode: bool = True) -> FrozenEncoder:
        super().train(mode)
        self.model.eval()  # frozen: BatchNorm statistics, dropout and drop-path never switch to training behaviour
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"encoder input: expected (B,3,H,W) RGB, got shape {tuple(x.shape)}")
        x = (x - self.mean) / self.std
        if self.scale != 1.0:
            size = [round(s * self.scale) for s in x.shape[-2:]]
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda):
            feats = self.model.forward_intermediates(x, indices=list(self.taps), intermediates_only=True)
        return [f.float() for f in feats]
