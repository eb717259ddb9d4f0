"""The CISCA loss (METHOD.md §3): contour CCE + Dice, distance-map MAE + MSGE, cell-type WCCE + Tversky.

Intended behaviour by default; the reference's quirks are options (METHOD.md §10):
- Tversky is computed per class over the batch (``tversky="region"``); ``"pixel"`` reproduces the
  reference's element-wise version, which is almost constant and gives little gradient (§10.8).
- MSGE penalises only the diagonal maps when four maps are predicted (§10.5), as the reference does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .derivatives import derivative_kernels

# METHOD.md §3: unnormalised weights [contour (K values), type (multiclass only), MAE, MSGE].
DEFAULT_WEIGHTS_MULTICLASS = (2.0, 1.0, 2.0, 5.0, 2.0, 2.0)
DEFAULT_WEIGHTS_SINGLE_CLASS = (2.0, 1.0, 2.0, 2.0, 2.0)
EPS = 1e-8  # 0.1 × Keras epsilon, as the reference


def soft_dice(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dice with +1 smoothing, summed over the whole batch: (2Σpt + 1) / (Σp + Σt + 1)."""
    return (2 * (prob * target).sum() + 1) / (prob.sum() + target.sum() + 1)


class CISCALoss(nn.Module):
    """Sum of the three head losses; takes the network's output dict and the target dict.

    Targets (docs/contracts.md): ``contour_target`` (B,1,H,W) int, ``distance_target`` (B,M,H,W),
    ``weight_mask`` (B,1,H,W), ``type_target`` (B,1,H,W) int (multiclass only).

    Args:
        num_classes: cell classes C; the type loss is used only when C > 1.
        num_contour_classes: K = 3 or 2.
        weights: unnormalised weights in METHOD.md order (K contour weights, the type weight if C > 1,
            MAE, MSGE); normalised to sum 1.  Default: [2,1,2,5,2,2] (multiclass) / [2,1,2,2,2].
        class_weights: per-class WCCE weights (C+1 values, background first); default all 1.
        tversky: "region" (default) or "pixel" (reference behaviour).
        tversky_alpha: weight of false negatives (0.7 as the reference; false positives get 1 − α).
        far_penalty: weight of the L1 pull towards 0 of the maps far from cells (0.01 as the reference).
    """

    def __init__(self, num_classes: int, num_contour_classes: int = 3, weights: Sequence[float] | None = None,
                 class_weights: Sequence[float] | None = None, tversky: str = "region", tversky_alpha: float = 0.7,
                 far_penalty: float = 0.01):
        super().__init__()
        if num_contour_classes not in (2, 3):
            raise ValueError(f"num_contour_classes: expected 2 or 3, got {num_contour_classes}")
        if tversky not in ("region", "pixel"):
            raise ValueError(f"tversky: expected 'region' or 'pixel', got {tversky!r}")
        self.num_classes = int(num_classes)
        self.k = num_contour_classes
        multiclass = self.num_classes > 1
        if weights is None:
            weights = DEFAULT_WEIGHTS_MULTICLASS if multiclass else DEFAULT_WEIGHTS_SINGLE_CLASS
            if self.k == 2:  # K=2 drops one contour weight (METHOD.md §3)
                weights = weights[:2] + weights[3:]
        expected = self.k + (1 if multiclass else 0) + 2
        if len(weights) != expected:
            raise ValueError(f"loss weights: expected {expected} values (K={self.k} contour, "
                             f"{'1 type, ' if multiclass else ''}MAE, MSGE), got {list(weights)}")
        w = torch.tensor([float(v) for v in weights])
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"loss weights: expected non-negative values with a positive sum, got {list(weights)}")
        w = w / w.sum()
        self.contour_weights = w[: self.k].tolist()
        self.type_weight = float(w[self.k]) if multiclass else 0.0
        self.mae_weight, self.msge_weight = float(w[-2]), float(w[-1])
        if class_weights is not None and len(class_weights) != self.num_classes + 1:
            raise ValueError(f"class_weights: expected {self.num_classes + 1} values (background + {self.num_classes} "
                             f"classes), got {len(class_weights)}")
        self.register_buffer("class_weights", torch.tensor(class_weights or [1.0] * (self.num_classes + 1), dtype=torch.float32),
                             persistent=False)
        self.tversky = tversky
        self.alpha = tversky_alpha
        self.far_penalty = far_penalty
        self.register_buffer("kernels", derivative_kernels(), persistent=False)

    # -- heads -----------------------------------------------------------------------------------
    def contour_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target[:, 0].long()
        ce = F.cross_entropy(logits, target)
        prob = logits.softmax(dim=1)
        onehot = F.one_hot(target, self.k).permute(0, 3, 1, 2).to(prob.dtype)
        loss = self.contour_weights[0] * ce
        # Dice on boundary and body (K=3) or on foreground (K=2); never on background.
        for c in range(self.k - 1):
            loss = loss + self.contour_weights[c + 1] * (1 - soft_dice(prob[:, c], onehot[:, c]))
        return loss

    def distance_loss(self, pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean_w = weight.mean() + EPS
        mae = (weight * (pred - target).abs()).mean() / mean_w + self.far_penalty * ((1 - weight) * pred.abs()).mean()
        # MSGE along each map's own direction: tl/bl only with four maps (METHOD.md §10.5), h/v with two.
        channels = [2, 3] if pred.shape[1] == 4 else [0, 1]
        k = self.kernels[channels].unsqueeze(1).to(pred.device, pred.dtype)
        grad_pred = F.conv2d(pred[:, channels], k, padding=2, groups=len(channels))
        grad_true = F.conv2d(target[:, channels], k, padding=2, groups=len(channels))
        msge = (weight * (grad_pred - grad_true) ** 2).mean() / mean_w
        return mae, msge

    def type_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target[:, 0].long()
        wcce = F.cross_entropy(logits, target, weight=self.class_weights.to(logits.device, logits.dtype))
        prob = logits.softmax(dim=1)
        onehot = F.one_hot(target, self.num_classes + 1).permute(0, 3, 1, 2).to(prob.dtype)
        if self.tversky == "pixel":
            t = (onehot * prob + EPS) / (self.alpha * onehot + (1 - self.alpha) * prob + EPS)
            tversky = (1 - t.clamp(EPS, 1 - EPS)).mean()
        else:
            dims = (0, 2, 3)
            tp = (onehot * prob).sum(dims)
            fn = (onehot * (1 - prob)).sum(dims)
            fp = ((1 - onehot) * prob).sum(dims)
            tversky = (1 - (tp + 1) / (tp + self.alpha * fn + (1 - self.alpha) * fp + 1)).mean()
        return wcce + tversky

    # -- total -----------------------------------------------------------------------------------
    def components(self, pred: dict, target: dict) -> dict[str, torch.Tensor]:
        """The weighted head losses, computed in float32 with autocast off.

        Under the bundles' bf16 autocast the network's outputs are bf16: the Dice/Tversky sums and the
        derivative convolutions (of the float32 targets too) would run in bf16, and bf16 outputs met the
        float32 targets in a convolution outside autocast (a dtype error).
        """
        if isinstance(pred, dict):
            pred = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in pred.items()}
            device_type = next((v.device.type for v in pred.values() if isinstance(v, torch.Tensor)), "cpu")
            if torch.amp.is_autocast_available(device_type):
                with torch.autocast(device_type, enabled=False):
                    return self._components(pred, target)
        return self._components(pred, target)

    def _components(self, pred: dict, target: dict) -> dict[str, torch.Tensor]:
        for key in ("contour", "distance"):
            if key not in pred:
                raise KeyError(f"loss: network output has no {key!r} map; got keys {sorted(pred)}")
        for key in ("contour_target", "distance_target", "weight_mask"):
            if key not in target:
                raise KeyError(f"loss: target has no {key!r}; got keys {sorted(target)} (is CISCATargetsd in the transforms?)")
        if pred["distance"].shape != target["distance_target"].shape:
            raise ValueError(f"loss: distance output {tuple(pred['distance'].shape)} vs target "
                             f"{tuple(target['distance_target'].shape)}")
        parts = {"contour": self.contour_loss(pred["contour"], target["contour_target"])}
        mae, msge = self.distance_loss(pred["distance"], target["distance_target"], target["weight_mask"])
        parts["mae"], parts["msge"] = self.mae_weight * mae, self.msge_weight * msge
        if self.num_classes > 1:
            if "type" not in pred or "type_target" not in target:
                raise KeyError(f"loss: {self.num_classes} classes need a 'type' output and a 'type_target'")
            if pred["type"].shape[1] != self.num_classes + 1:
                raise ValueError(f"loss: type head has {pred['type'].shape[1]} channels, expected {self.num_classes + 1} "
                                 f"(background + {self.num_classes} classes): does the dataset match the bundle?")
            parts["type"] = self.type_weight * self.type_loss(pred["type"], target["type_target"])
        return parts

    def forward(self, pred: dict, target: dict) -> torch.Tensor:
        return sum(self.components(pred, target).values())
