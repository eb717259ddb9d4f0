"""The 5×5 derivative kernels shared by the MSGE loss and post-processing (METHOD.md §3, §10.4).

``k_h(dy,dx) = dx/(dx²+dy²)``, ``k_v = dy/(dx²+dy²)``, ``k_tl = k_h + k_v`` and
``k_bl = (dx−dy)/(dx²+dy²)`` (``k_tl`` rotated 90° counter-clockwise), in channel order
[h, v, tl, bl].  They are applied by cross-correlation (``torch.nn.functional.conv2d``): each gives
the derivative of its map along the direction in which that map increases.
"""

from __future__ import annotations

import torch


def derivative_kernels(size: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(4, size, size) kernels for the [h, v, tl, bl] maps; rows are dy (down +), columns dx (right +)."""
    r = torch.arange(size, dtype=torch.float64) - size // 2
    dy, dx = torch.meshgrid(r, r, indexing="ij")
    norm = dx**2 + dy**2
    norm[size // 2, size // 2] = 1.0  # the centre weight is 0 for every kernel
    k_h, k_v = dx / norm, dy / norm
    return torch.stack([k_h, k_v, k_h + k_v, (dx - dy) / norm]).to(dtype)
