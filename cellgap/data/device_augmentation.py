"""The photometric steps of METHOD.md §7 on a collated batch, on the batch's device.

``cisca_augmentations(photometric=False)`` leaves the loader workers the loading, the crop, the turns,
flips and elastic warp and the targets; :class:`BatchPhotometricAugmentation` then applies the stain,
blur/noise, contrast, colour and noise steps to the whole batch where it already is (the GPU in
training), with a parameter draw per sample and the probabilities, ranges and formulas of the
per-sample transforms in ``cellgap.data.augmentation`` (tested against them with the same parameters).
The loader's CPU time per tile falls by 40–50 % (docs/benchmarks.md, "Data pipeline").

Differences from the per-sample pipeline, both small: the stain jitter runs after the turns, flips and
elastic warp instead of before them (a per-pixel colour map commutes with turns and flips; the warp's
bilinear mixing of neighbours comes before the colour map instead of after), and the LAB conversions are
computed with powers rather than the 8-bit tables (differences below one 8-bit step).

Hand-written because MONAI's transforms act on one sample at a time: per sample on the GPU they would
cost a kernel launch per operation and sample in the training process.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .augmentation import recipe
from .augmentation.colour import LAB8_OFFSET, LAB8_SCALE, LAB_DELTA, RGB_TO_XYZN, XYZN_TO_RGB
from .augmentation.filters import gaussian_kernel, median3x3
from .augmentation.samples import INTENSITY_MAX
from .augmentation.stain import StainStatistics, stain_statistics


def _lab8_constants(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (1, 3, 1, 1) scale and offset of OpenCV 8-bit LAB over the opponent f-values (rgb_to_lab8's)."""
    return tuple(torch.as_tensor(c, dtype=like.dtype, device=like.device)[None, :, None, None] for c in (LAB8_SCALE, LAB8_OFFSET))


def _srgb_to_lab8(rgb: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB in 0..255 → CIELAB in OpenCV 8-bit units, read at 8-bit precision like rgb_to_lab8."""
    c = torch.round(rgb.clamp(0, INTENSITY_MAX)) / INTENSITY_MAX
    linear = torch.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = torch.einsum("ij,njhw->nihw", torch.as_tensor(RGB_TO_XYZN, dtype=rgb.dtype, device=rgb.device), linear)
    f = torch.where(xyz > LAB_DELTA**3, xyz.clamp_min(1e-12) ** (1 / 3), xyz / (3 * LAB_DELTA**2) + 4 / 29)
    scale, offset = _lab8_constants(rgb)
    return torch.stack([f[:, 1], f[:, 0] - f[:, 1], f[:, 1] - f[:, 2]], dim=1) * scale + offset


def _lab8_to_srgb(lab: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_srgb_to_lab8`: RGB in 0..255, out-of-gamut colours clipped."""
    scale, offset = _lab8_constants(lab)
    g = (lab - offset) / scale  # f(Y), f(X) − f(Y), f(Y) − f(Z)
    f = torch.stack([g[:, 1] + g[:, 0], g[:, 0], g[:, 0] - g[:, 2]], dim=1)
    xyz = torch.where(f > LAB_DELTA, f * f * f, (f - 4 / 29) * (3 * LAB_DELTA**2))
    linear = torch.einsum("ij,njhw->nihw", torch.as_tensor(XYZN_TO_RGB, dtype=lab.dtype, device=lab.device), xyz)
    linear = linear.clamp(0, 1)
    return torch.where(linear <= 0.0031308, linear * 12.92, 1.055 * linear.clamp_min(1e-12) ** (1 / 2.4) - 0.055) * INTENSITY_MAX


def stain_transfer(images: torch.Tensor, target_mean: torch.Tensor, target_std: torch.Tensor) -> torch.Tensor:
    """Reinhard transfer of each (3, H, W) image's LAB statistics to its (3,) target mean and std
    (``RandLABStainJitterd.transfer`` per sample); RGB in 0..255."""
    lab = _srgb_to_lab8(images)
    mean = lab.mean(dim=(2, 3))
    std = lab.std(dim=(2, 3), correction=0)
    scale = torch.where(std > 1e-6, target_std / std.clamp_min(1e-6), torch.zeros_like(std))
    offset = target_mean - mean * scale
    return _lab8_to_srgb((lab * scale[..., None, None] + offset[..., None, None]).clamp(0, INTENSITY_MAX))


def shift_hsv(images: torch.Tensor, hue: torch.Tensor, saturation: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``cellgap.data.augmentation.shift_hsv`` with per-sample (N,) shifts: hue in degrees, saturation
    as a fraction, value in image units (clipped to 0..255)."""
    r, g, b = images.unbind(1)
    v = torch.maximum(torch.maximum(r, g), b)
    chroma = v - torch.minimum(torch.minimum(r, g), b)
    inverse = torch.where(chroma > 0, 1 / chroma.clamp_min(1e-12), torch.zeros_like(chroma))
    h = torch.where(v == r, (g - b) * inverse, torch.where(v == g, (b - r) * inverse + 2, (r - g) * inverse + 4))
    h = h + (hue / 60.0)[:, None, None]
    h = h - 6 * torch.floor(h / 6)
    s = torch.where(v > 0, chroma / v.clamp_min(1e-12), torch.zeros_like(v))
    s = (s + saturation[:, None, None]).clamp(0, 1)
    v = (v + value[:, None, None]).clamp(0, INTENSITY_MAX)
    chroma = v * s
    out = []
    for n in (5, 3, 1):  # R, G, B offsets of the hexcone formula
        k = h + n
        k = k - 6 * (k >= 6).to(k.dtype)
        out.append(v - chroma * torch.minimum(k, 4 - k).clamp(0, 1))
    return torch.stack(out, dim=1)


def _kernels(sigmas: torch.Tensor) -> torch.Tensor:
    """(N, K) Gaussian kernels of MONAI's GaussianFilter (erf, 4σ), zero-padded to one odd length."""
    kernels = [gaussian_kernel(s) for s in sigmas]
    length = max(k.numel() for k in kernels)
    return torch.stack([F.pad(k, ((length - k.numel()) // 2,) * 2) for k in kernels])


def gaussian_filter(images: torch.Tensor, sigma_rows: torch.Tensor, sigma_cols: torch.Tensor) -> torch.Tensor:
    """Per-sample separable Gaussian filter with zero padding: MONAI's ``GaussianFilter`` on each image."""
    n, c, h, w = images.shape
    rows = _kernels(sigma_rows).to(images).repeat_interleave(c, 0)
    cols = _kernels(sigma_cols).to(images).repeat_interleave(c, 0)
    out = F.conv2d(images.reshape(1, n * c, h, w), rows[:, None, :, None], padding=(rows.shape[1] // 2, 0), groups=n * c)
    out = F.conv2d(out, cols[:, None, None, :], padding=(0, cols.shape[1] // 2), groups=n * c)
    return out.reshape(n, c, h, w)


class BatchPhotometricAugmentation:
    """Steps 1 and 5–8 of METHOD.md §7 (as ``cisca_augmentations``) on an (N, 3, H, W) batch in 0..255.

    Per sample: stain jitter p 0.7 (:func:`stain_transfer` to targets drawn from ``stain_stats``);
    blur/noise p 0.15 (Gaussian blur σ 0.5–1.5 per axis 0.3, 3×3 median 0.15, Gaussian noise σ ≤ √20
    0.2, unsharp mask 0.2); contrast p 0.7 (gamma 0.7–1.4 0.5, contrast about the mean ±15 % 0.5,
    brightness ×(1 ± 0.2) 0.2); colour p 0.65 (HSV ±10°/±30/±20, or hue ±36° and brightness ±25.5,
    equally); additive noise p 0.15 (σ ≤ 0.03·255); clip to 0..255. ``prob_scale`` scales every
    probability (capped at 1). Draws come from a torch generator seeded with ``seed``; returns float32
    on the batch's device. ``None`` stain statistics leave the stain step out.
    """

    def __init__(self, stain_stats: str | Mapping | StainStatistics | None = "he", prob_scale: float = 1.0,
                 seed: int = 0, sigma_scale: float = 0.6, min_std: float = 1.0) -> None:
        if isinstance(prob_scale, bool) or not isinstance(prob_scale, (int, float)) or not (prob_scale >= 0 and np.isfinite(prob_scale)):
            raise ValueError(f"prob_scale: expected a finite number ≥ 0, got {prob_scale!r}")
        self.stats = None if stain_stats is None else stain_statistics(stain_stats)
        self.prob_scale = float(prob_scale)
        self.sigma_scale = float(sigma_scale)
        self.min_std = float(min_std)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.last_choices: dict[str, torch.Tensor] = {}  # per step, the member each sample got (-1: none)

    def _p(self, value: float) -> float:
        return min(1.0, value * self.prob_scale)

    def _uniform(self, n: int, low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=self.generator, dtype=torch.float64)

    def _noise(self, like: torch.Tensor) -> torch.Tensor:
        """Standard normal noise drawn on ``like``'s device, by a generator seeded from ours."""
        seed = int(torch.randint(2**62, (1,), generator=self.generator))
        return torch.randn(like.shape, generator=torch.Generator(device=like.device).manual_seed(seed), device=like.device)

    def _one_of(self, name: str, n: int, weights: Sequence[float], prob: float) -> torch.Tensor:
        """The reference's OneOf(p): per sample, -1 with probability 1 − p, else a member ∝ weights."""
        fires = torch.rand(n, generator=self.generator) < prob
        member = torch.multinomial(torch.tensor(weights, dtype=torch.float64), n, replacement=True, generator=self.generator)
        choice = torch.where(fires, member, torch.full_like(member, -1))
        self.last_choices[name] = choice
        return choice

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected an (N, 3, H, W) RGB batch in 0..255, got shape {tuple(images.shape)}")
        x = images.to(torch.float32, copy=True)
        n = x.shape[0]
        device = x.device

        def on(values: torch.Tensor) -> torch.Tensor:
            return values.to(device=device, dtype=torch.float32)

        def apply(choice: torch.Tensor, member: int, step) -> None:
            rows = (choice == member).nonzero().flatten()
            if rows.numel():
                x[rows.to(device)] = step(x[rows.to(device)], rows)

        if self.stats is not None:
            s = self.stats
            mean = torch.normal(torch.tensor(s.mean_mu).expand(n, 3), torch.tensor(s.mean_sigma).expand(n, 3) * self.sigma_scale,
                                generator=self.generator)
            std = torch.normal(torch.tensor(s.std_mu).expand(n, 3), torch.tensor(s.std_sigma).expand(n, 3) * self.sigma_scale,
                               generator=self.generator).clamp_min(self.min_std)
            stain = self._one_of("stain", n, [1.0], self._p(recipe.STAIN_PROB))
            apply(stain, 0, lambda batch, rows: stain_transfer(batch, on(mean[rows]), on(std[rows])))

        sigma = [self._uniform(n, *recipe.BLUR_SIGMA) for _ in range(2)]
        noise_std = self._uniform(n, 0.0, recipe.BLUR_NOISE_STD)
        sharp = [self._uniform(n, *recipe.SHARPEN_SIGMA1) for _ in range(2)] + [self._uniform(n, *recipe.SHARPEN_SIGMA2) for _ in range(2)]
        alpha = self._uniform(n, *recipe.SHARPEN_ALPHA)
        blur = self._one_of("blur_noise", n, recipe.BLUR_NOISE_WEIGHTS, self._p(recipe.BLUR_NOISE_PROB))
        apply(blur, 0, lambda batch, rows: gaussian_filter(batch, sigma[0][rows], sigma[1][rows]))
        apply(blur, 1, lambda batch, rows: median3x3(batch))
        apply(blur, 2, lambda batch, rows: batch + self._noise(batch) * on(noise_std[rows])[:, None, None, None])

        def sharpen(batch, rows):
            blurred = gaussian_filter(batch, sharp[0][rows], sharp[1][rows])
            return blurred + on(alpha[rows])[:, None, None, None] * (blurred - gaussian_filter(blurred, sharp[2][rows], sharp[3][rows]))

        apply(blur, 3, sharpen)

        gamma = self._uniform(n, *recipe.GAMMA)
        mean_factor = self._uniform(n, -recipe.MEAN_CONTRAST, recipe.MEAN_CONTRAST)
        scale_factor = self._uniform(n, -recipe.BRIGHTNESS_SCALE, recipe.BRIGHTNESS_SCALE)
        contrast = self._one_of("contrast", n, recipe.CONTRAST_WEIGHTS, self._p(recipe.CONTRAST_PROB))

        def gamma_contrast(batch, rows):
            low = batch.amin(dim=(1, 2, 3), keepdim=True)
            spread = batch.amax(dim=(1, 2, 3), keepdim=True) - low
            return ((batch - low) / (spread + 1e-7)) ** on(gamma[rows])[:, None, None, None] * spread + low

        def about_mean(batch, rows):
            mean = batch.mean(dim=(1, 2, 3), keepdim=True)
            return (batch - mean) * (1 + on(mean_factor[rows]))[:, None, None, None] + mean

        apply(contrast, 0, gamma_contrast)
        apply(contrast, 1, about_mean)
        apply(contrast, 2, lambda batch, rows: batch * (1 + on(scale_factor[rows]))[:, None, None, None])

        hsv = [self._uniform(n, -limit, limit) for limit in recipe.HSV_SHIFTS]
        hue = self._uniform(n, -recipe.HUE_SHIFT, recipe.HUE_SHIFT)
        offset = self._uniform(n, -recipe.BRIGHTNESS_SHIFT, recipe.BRIGHTNESS_SHIFT)
        colour = self._one_of("colour", n, recipe.COLOUR_WEIGHTS, self._p(recipe.COLOUR_PROB))
        apply(colour, 0, lambda batch, rows: shift_hsv(batch, *(on(v[rows]) for v in hsv)))
        zero = torch.zeros(n, dtype=torch.float64)
        apply(colour, 1, lambda batch, rows: shift_hsv(batch, on(hue[rows]), on(zero[rows]), on(zero[rows]))
              + on(offset[rows])[:, None, None, None])

        final_std = self._uniform(n, 0.0, recipe.NOISE_STD)
        noise = self._one_of("noise", n, [1.0], self._p(recipe.NOISE_PROB))
        apply(noise, 0, lambda batch, rows: batch + self._noise(batch) * on(final_std[rows])[:, None, None, None])
        return x.clamp_(0, INTENSITY_MAX)


__all__ = ["BatchPhotometricAugmentation", "gaussian_filter", "shift_hsv", "stain_transfer"]
