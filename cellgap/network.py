"""The network every bundle trains: a frozen encoder joined to the shared CISCA decoder."""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn

from .decoder import CISCADecoder
from .encoders import EncoderSpec, FrozenEncoder

INPUT_MULTIPLE = 32  # the decoder's deepest level is at stride 32
COST_TILE = 256  # FLOPs are reported per 256² tile, the reference tile


class CellGapNet(nn.Module):
    """Frozen encoder + trainable CISCA decoder.

    Input (B,3,H,W) RGB in [0,1], H and W multiples of 32.  Output dict of full-resolution maps:
    ``contour`` (B,K,H,W) logits, ``distance`` (B,4,H,W), ``type`` (B,C+1,H,W) logits (absent when C == 1).

    Only ``decoder`` has trainable parameters; checkpoints need only ``decoder.state_dict()``.
    ``encoder_weights``: "hub", a local folder/file, or None with ``allow_random_encoder=True`` (demo only).
    """

    def __init__(self, encoder: str | EncoderSpec = "convnext_b_22k", num_classes: int = 1,
                 encoder_weights: str | os.PathLike | None = "hub", allow_random_encoder: bool = False,
                 reduced_encoder: bool = False, num_contour_classes: int = 3, num_distance_maps: int = 4,
                 decoder: dict | None = None):
        super().__init__()
        self.encoder = FrozenEncoder(encoder, weights=encoder_weights, allow_random=allow_random_encoder, reduced=reduced_encoder)
        self.decoder = CISCADecoder(self.encoder.channels, self.encoder.reductions, num_classes=num_classes,
                                    num_contour_classes=num_contour_classes, num_distance_maps=num_distance_maps,
                                    **(decoder or {}))
        self.num_classes = num_classes

    def check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"network input: expected a (B,3,H,W) RGB tensor, got {getattr(x, 'shape', type(x))}")
        if not x.is_floating_point():
            raise ValueError(f"network input: expected floating point RGB scaled to [0,1], got {x.dtype}")
        h, w = x.shape[-2:]
        if h % INPUT_MULTIPLE or w % INPUT_MULTIPLE:
            raise ValueError(f"network input: height and width must be multiples of {INPUT_MULTIPLE}, got {h}×{w}; "
                             f"pad the image or use a sliding-window inferer with a 256×256 window")

    def prepare_layout(self, device: torch.device | str) -> CellGapNet:
        """The decoder's memory layout for ``device`` set now (see :meth:`CISCADecoder.prepare_layout`); returns self."""
        self.decoder.prepare_layout(device)
        return self

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The frozen encoder's four maps (what the embedding cache stores)."""
        self.check_input(x)
        return self.encoder(x)

    def decode(self, x: torch.Tensor, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.decoder(x, features)

    def forward(self, x: torch.Tensor, features: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """``features``: the encoder's maps for ``x`` if already known (from the embedding cache)."""
        if features is None:
            return self.decode(x, self.forward_features(x))
        self.check_input(x)
        return self.decode(x, [f.to(device=x.device, dtype=x.dtype) for f in features])


class ContourLogits(nn.Module):
    """The network's ``contour`` logits alone, as one tensor: what MONAI's ``verify_net_in_out`` (and
    other single-output tools) can check, since they cannot read a dict of outputs."""

    def __init__(self, network: CellGapNet):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)["contour"]


def network_cost(encoder: str, num_classes: int, decoder: dict | None = None, reduced: bool = False,
                 num_contour_classes: int = 3, num_distance_maps: int = 4, tile: int = COST_TILE) -> dict:
    """Parameters (frozen encoder as run, trainable decoder) and forward GFLOPs of one ``tile``² tile.

    Counted with ``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add = 2 FLOPs) on a network built
    on the meta device (no memory, no weights); a random CPU build is the fallback.
    """
    from torch.utils.flop_counter import FlopCounterMode

    def measure(device: str) -> dict:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.device(device):
                net = CellGapNet(encoder, num_classes=num_classes, encoder_weights=None, allow_random_encoder=True,
                                 reduced_encoder=reduced, num_contour_classes=num_contour_classes,
                                 num_distance_maps=num_distance_maps, decoder=decoder)
                x = torch.zeros(1, 3, tile, tile)
            net.eval()
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                net(x)
        by_module = counter.get_flop_counts()
        encoder_flops = sum(by_module.get(f"{type(net).__name__}.encoder", {}).values())
        return {"encoder_params": sum(p.numel() for p in net.encoder.parameters()),
                "decoder_params": sum(p.numel() for p in net.decoder.parameters()),
                "gflops": counter.get_total_flops() / 1e9, "encoder_gflops": encoder_flops / 1e9, "counted_on": device}

    try:
        return measure("meta")
    except Exception:  # an op without a meta kernel: count on a random CPU build instead
        return measure("cpu")
