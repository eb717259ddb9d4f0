"""The shared CISCA decoder (METHOD.md §2, decoder side and heads).

One decoder serves every encoder.  The four encoder maps are brought to strides 4, 8, 16 and 32 of the
tile (identity-like for hierarchical encoders; transposed convolutions / strided convolutions for ViT
token grids, UNETR-style), a trainable image stem supplies full- and half-resolution features, and a
U-Net path upsamples (nearest ×2, as CISCA) with skip connections back to full resolution.  Three heads
follow METHOD.md §2: contour (K-class), directional distance maps, and cell type (C+1 classes,
background included; absent for single-class datasets).
"""

from __future__ import annotations

import math

import torch
from torch import nn

STRIDES = (1, 2, 4, 8, 16, 32)  # decoder levels; encoder taps feed strides 4..32, the stem feeds 1 and 2
# The study's decoder: the bundles' default ``decoder`` option, and what a checkpoint without its own config was built with.
DEFAULT_DECODER = {"widths": [64, 64, 64, 128, 256, 512], "head_features": 256, "head_width": 32, "norm": None}


def _norm(kind: str | None, channels: int) -> nn.Module:
    if kind is None or kind in ("none", "null"):  # "null": a JSON value passed through the command line
        return nn.Identity()
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(8, channels), channels)
    raise ValueError(f"decoder norm: expected None, 'batch' or 'group', got {kind!r}")


class ConvBlock(nn.Sequential):
    """conv3×3 → norm → ReLU."""

    def __init__(self, in_ch: int, out_ch: int, norm: str | None = None, stride: int = 1):
        super().__init__(nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=norm in (None, "none")),
                         _norm(norm, out_ch), nn.ReLU(inplace=True))


class ResidualBlock(nn.Module):
    """conv3×3 → ReLU → conv3×3, plus a shortcut (1×1 conv when the width changes), then ReLU (METHOD.md §2)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.residual = nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.ReLU(inplace=True),
                                      nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.shortcut = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)
        self.act = nn.ReLU(inplace=True)
        for m in self.residual:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")  # he-normal in the head blocks, as CISCA

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.residual(x) + self.shortcut(x))


class FeatureAdapter(nn.Module):
    """Bring one encoder map from its reduction to the decoder stride it feeds, with ``width`` channels."""

    def __init__(self, in_ch: int, reduction: int, stride: int, width: int, norm: str | None):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_ch, width, 1), _norm(norm, width), nn.ReLU(inplace=True)]
        if reduction > stride:
            for _ in range(int(round(math.log2(reduction / stride)))):
                layers += [nn.ConvTranspose2d(width, width, 2, stride=2), ConvBlock(width, width, norm)]
        elif reduction < stride:
            for _ in range(int(round(math.log2(stride / reduction)))):
                layers.append(ConvBlock(width, width, norm, stride=2))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _head(in_ch: int, block_width: int, out_ch: int, features: int | None, norm: str | None) -> nn.Sequential:
    layers: list[nn.Module] = []
    if features:
        layers.append(ConvBlock(in_ch, features, norm))
        in_ch = features
    layers += [ResidualBlock(in_ch, block_width), ResidualBlock(block_width, block_width), nn.Conv2d(block_width, out_ch, 1)]
    return nn.Sequential(*layers)


class CISCADecoder(nn.Module):
    """Decoder + heads shared by all encoders.

    Args:
        encoder_channels: channels of the four encoder maps.
        encoder_reductions: their reductions relative to the input tile (e.g. 4, 8, 16, 32 or 16 ×4).
        num_classes: cell classes C (background excluded); C == 1 builds no type head.
        num_contour_classes: K (3: boundary / body / background; 2: foreground / background).
        num_distance_maps: 4 (h, v, tl, bl) or 2 (h, v).
        widths: channels at strides 1, 2, 4, 8, 16, 32.
        head_features: width of the shared ``features`` conv (and of the separate class features conv).
        head_width: width of the residual blocks of the three heads.
        distance_width: width of the distance head's residual blocks; default ``head_width``.  CISCA uses
            one channel per map (4), a ReLU bottleneck through which four signed ramps learn slowly
            (measured: no progress in 200 steps where width 8+ learns); pass 4 to reproduce it.
        norm: None (CISCA: no normalisation), "batch" or "group".
        channels_last: run the convolutions channels-last; None: on CUDA only (the layout tensor cores
            prefer; on CPU it speeds up narrow decoders but slows the backward pass of wide ones).
    """

    def __init__(self, encoder_channels: list[int], encoder_reductions: list[int], num_classes: int,
                 num_contour_classes: int = 3, num_distance_maps: int = 4,
                 widths: tuple[int, ...] = (64, 64, 64, 128, 256, 512), head_features: int = 256, head_width: int = 32,
                 norm: str | None = None, channels_last: bool | None = None, distance_width: int | None = None):
        super().__init__()
        if len(encoder_channels) != 4 or len(encoder_reductions) != 4:
            raise ValueError(f"decoder: expected 4 encoder maps, got channels {encoder_channels}, reductions {encoder_reductions}")
        if len(widths) != len(STRIDES):
            raise ValueError(f"decoder widths: expected {len(STRIDES)} values for strides {STRIDES}, got {widths}")
        if num_classes < 1:
            raise ValueError(f"num_classes: expected ≥ 1 cell class, got {num_classes}")
        if num_contour_classes not in (2, 3):
            raise ValueError(f"num_contour_classes: expected 2 or 3, got {num_contour_classes}")
        if num_distance_maps not in (2, 4):
            raise ValueError(f"num_distance_maps: expected 2 (h, v) or 4 (h, v, tl, bl), got {num_distance_maps}")
        self.num_classes = num_classes
        widths = tuple(int(w) for w in widths)
        self.adapters = nn.ModuleList(
            FeatureAdapter(c, r, s, w, norm) for c, r, s, w in zip(encoder_channels, encoder_reductions, STRIDES[2:], widths[2:])
        )
        self.stem = nn.ModuleList([nn.Sequential(ConvBlock(3, widths[0], norm), ConvBlock(widths[0], widths[0], norm)),
                                   nn.Sequential(nn.MaxPool2d(2), ConvBlock(widths[0], widths[1], norm),
                                                 ConvBlock(widths[1], widths[1], norm))])
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        # Level i (stride STRIDES[i]) fuses the upsampled level i+1 with its own skip.
        self.fuse = nn.ModuleList(
            nn.Sequential(ConvBlock(widths[i + 1] + widths[i], widths[i], norm), ConvBlock(widths[i], widths[i], norm))
            for i in range(len(STRIDES) - 1)
        )
        self.contour_head = _head(widths[0], head_width, num_contour_classes, head_features, norm)
        self.distance_head = _head(head_features, distance_width or head_width, num_distance_maps, None, norm)
        self.type_head = _head(widths[0], head_width, num_classes + 1, head_features, norm) if num_classes > 1 else None
        # glorot-uniform in the U-Net convs as CISCA; the heads' residual blocks keep their he-normal init
        for name, m in self.named_modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and ".residual." not in name:
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.channels_last = channels_last
        self._weights_channels_last = False

    def prepare_layout(self, device: torch.device | str) -> CISCADecoder:
        """Switch the weights to channels-last now if the forward pass on ``device`` will use it; returns
        self. Call it before wrapping in DDP, whose gradient buckets keep the layout they were built with."""
        if self.channels_last if self.channels_last is not None else torch.device(device).type == "cuda":
            if not self._weights_channels_last:  # in place: optimizer references stay valid
                self.to(memory_format=torch.channels_last)
                self._weights_channels_last = True
        return self

    def forward(self, image: torch.Tensor, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.channels_last if self.channels_last is not None else image.is_cuda:
            self.prepare_layout(image.device)
            image = image.contiguous(memory_format=torch.channels_last)
            features = [f.contiguous(memory_format=torch.channels_last) for f in features]
        skips = [self.stem[0](image)]
        skips.append(self.stem[1](skips[0]))
        skips += [adapter(f) for adapter, f in zip(self.adapters, features)]
        for i, (skip, s) in enumerate(zip(skips, STRIDES)):
            expected = (image.shape[-2] // s, image.shape[-1] // s)
            if tuple(skip.shape[-2:]) != expected:
                raise ValueError(f"decoder: feature map {i} has size {tuple(skip.shape[-2:])}, expected {expected} at "
                                 f"stride {s} for a {tuple(image.shape[-2:])} input (encoder reductions mismatch?)")
        x = skips[-1]
        for i in range(len(STRIDES) - 2, -1, -1):
            x = self.fuse[i](torch.cat([self.up(x), skips[i]], dim=1))
        shared = self.contour_head[0](x)  # CISCA's shared `features` conv feeds the contour and distance heads
        out = {"contour": self.contour_head[1:](shared), "distance": self.distance_head(shared)}
        if self.type_head is not None:
            out["type"] = self.type_head(x)
        return out
