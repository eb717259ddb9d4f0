"""The batch photometric steps (cellgap.data.device_augmentation) against the per-sample transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import Compose, GaussianSharpen, GaussianSmooth

from cellgap.cache import ViewSpec
from cellgap.data import augmentation as per_sample
from cellgap.data.device_augmentation import BatchPhotometricAugmentation, gaussian_filter, shift_hsv, stain_transfer
from cellgap.training import PrepareCISCABatch


def images(n: int = 4, height: int = 40, width: int = 36, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(150, 50, (n, 3, height, width)), 0, 255).astype(np.float32)


def test_stain_transfer_matches_the_per_sample_jitter():
    batch = images()
    target_mean = torch.tensor([[160.0, 150, 118], [170, 148, 120], [150, 155, 110], [180, 140, 125]])
    target_std = torch.tensor([[35.0, 8, 7], [40, 7, 8], [30, 9, 6], [38, 8, 7.5]])
    out = stain_transfer(torch.from_numpy(batch), target_mean, target_std).numpy()
    jitter = per_sample.RandLABStainJitterd(stats="pannuke")
    for i in range(len(batch)):
        jitter.target_mean, jitter.target_std = target_mean[i].numpy(), target_std[i].numpy()
        # powers here, 8-bit tables there: well under one 8-bit step apart
        np.testing.assert_allclose(out[i], jitter.transfer(batch[i]), atol=0.5)


def test_shift_hsv_matches_the_per_sample_shift():
    batch = images()
    hue, saturation, value = torch.tensor([5.0, -8, 36, 0]), torch.tensor([0.1, -0.05, 0, 0.1]), torch.tensor([10.0, -15, 0, 5])
    out = shift_hsv(torch.from_numpy(batch), hue, saturation, value).numpy()
    for i in range(len(batch)):
        expected = per_sample.shift_hsv(batch[i], float(hue[i]), float(saturation[i]), float(value[i]))
        np.testing.assert_allclose(out[i], expected, atol=1e-3)


def test_filters_match_monai_and_the_median():
    batch = images()
    rows, cols = torch.tensor([0.5, 0.9, 1.5, 1.2], dtype=torch.float64), torch.tensor([1.0, 0.6, 1.4, 0.5], dtype=torch.float64)
    blurred = gaussian_filter(torch.from_numpy(batch), rows, cols).numpy()
    medians = per_sample.median3x3(torch.from_numpy(batch)).numpy()  # a batch tensor, as the batch step calls it
    for i in range(len(batch)):
        np.testing.assert_allclose(blurred[i], np.asarray(GaussianSmooth(sigma=(float(rows[i]), float(cols[i])))(batch[i])), atol=1e-4)
        np.testing.assert_array_equal(medians[i], per_sample.median3x3(batch[i]))
    # the unsharp mask of the batch step is MONAI's GaussianSharpen formula
    sharpened = GaussianSharpen(sigma1=(0.15, 0.12), sigma2=(0.8, 0.75), alpha=0.6)(batch[0])
    first = gaussian_filter(torch.from_numpy(batch[:1]), torch.tensor([0.15]), torch.tensor([0.12]))
    ours = first + 0.6 * (first - gaussian_filter(first, torch.tensor([0.8]), torch.tensor([0.75])))
    np.testing.assert_allclose(ours[0].numpy(), np.asarray(sharpened), atol=1e-3)


def test_each_step_fires_with_its_probability_and_member_weights():
    augment = BatchPhotometricAugmentation(stain_stats="pannuke", seed=3)
    out = augment(torch.from_numpy(images(n=4000, height=8, width=8)))
    assert out.dtype == torch.float32 and out.shape == (4000, 3, 8, 8) and 0 <= out.min() and out.max() <= 255
    expected = {"stain": (0.7, [1.0]), "blur_noise": (0.15, [0.3, 0.15, 0.2, 0.2]), "contrast": (0.7, [0.5, 0.5, 0.2]),
                "colour": (0.65, [1, 1]), "noise": (0.15, [1.0])}
    for name, (prob, weights) in expected.items():
        choice = augment.last_choices[name]
        assert abs((choice >= 0).float().mean().item() - prob) < 0.03, name
        shares = np.bincount(choice[choice >= 0].numpy(), minlength=len(weights)) / max(int((choice >= 0).sum()), 1)
        np.testing.assert_allclose(shares, np.asarray(weights) / sum(weights), atol=0.04, err_msg=name)


def test_draws_are_seeded_and_prob_scale_zero_changes_nothing():
    batch = torch.from_numpy(images(n=6))
    first = BatchPhotometricAugmentation(seed=1)(batch)
    assert torch.equal(first, BatchPhotometricAugmentation(seed=1)(batch))
    assert not torch.equal(first, BatchPhotometricAugmentation(seed=2)(batch))
    assert torch.equal(BatchPhotometricAugmentation(prob_scale=0.0)(batch), batch)  # the input is in 0..255 already
    loaded = batch.to(torch.uint8)  # LoadTiled's dtype is accepted too
    assert BatchPhotometricAugmentation(seed=1)(loaded).dtype == torch.float32


@pytest.mark.parametrize("bad", [torch.zeros(3, 8, 8), torch.zeros(2, 4, 8, 8)])
def test_a_batch_that_is_not_rgb_is_refused(bad):
    with pytest.raises(ValueError, match=r"images: expected an \(N, 3, H, W\)"):
        BatchPhotometricAugmentation()(bad)


def test_bad_probability_scale_is_refused():
    with pytest.raises(ValueError, match="prob_scale"):
        BatchPhotometricAugmentation(prob_scale=-1)


def test_spatial_only_pipeline_and_its_batch_step():
    steps = per_sample.cisca_augmentations(stain_stats="pannuke", photometric=False)
    names = [type(step).__name__ for step in steps]
    assert names == ["CheckTiled", "RandSquareCropd", "CheckTiled", "RandDihedralElasticd", "CastToTyped"]
    rng = np.random.default_rng(0)
    sample = {"image": torch.from_numpy(rng.integers(0, 256, (3, 32, 32), dtype=np.uint8)),
              "label": torch.from_numpy(rng.integers(0, 3, (1, 32, 32), dtype=np.int32)),
              "classes": torch.from_numpy(rng.integers(0, 3, (1, 32, 32), dtype=np.int32))}
    out = Compose(steps).set_random_state(0)(sample)
    assert out["image"].dtype == torch.float32 and out["image"].max() > 1  # still 0..255: scaled on the device
    prepared, _ = PrepareCISCABatch(photometric=BatchPhotometricAugmentation(seed=0))(
        {"image": out["image"][None], "contour_target": torch.zeros(1, 1, 32, 32)})
    assert prepared.dtype == torch.float32 and 0 <= prepared.min() and prepared.max() <= 1


def test_prepare_batch_scales_8_bit_images_and_takes_float_ones_as_they_are():
    eight_bit = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (2, 3, 8, 8), dtype=np.uint8))
    targets = {"contour_target": torch.zeros(2, 1, 8, 8, dtype=torch.uint8)}
    image, _ = PrepareCISCABatch()({"image": eight_bit, **targets})
    assert image.dtype == torch.float32 and torch.equal(image, eight_bit.float() / 255)
    scaled = torch.rand(2, 3, 8, 8)
    assert PrepareCISCABatch()({"image": scaled, **targets})[0] is scaled  # validation batches: already 0..1
    identity = BatchPhotometricAugmentation(stain_stats=None, prob_scale=0.0, seed=0)  # only the final clip
    image, _ = PrepareCISCABatch(photometric=identity)({"image": eight_bit, **targets})
    assert torch.allclose(image, eight_bit.float() / 255)


def test_cached_views_cannot_leave_the_photometric_steps_to_the_device():
    with pytest.raises(ValueError, match="cache_mode 'off'"):
        ViewSpec("views", num_views=2).augmentation_transform(photometric=False)
    assert isinstance(ViewSpec("off").augmentation_transform(photometric=False), Compose)


def test_additive_noise_has_the_drawn_spread():
    augment = BatchPhotometricAugmentation(stain_stats=None, seed=5)
    flat = torch.full((2000, 3, 16, 16), 128.0)
    out = augment(flat)
    only_noise = torch.ones(2000, dtype=torch.bool)
    for name in ("blur_noise", "contrast", "colour"):
        only_noise &= augment.last_choices[name] < 0
    only_noise &= augment.last_choices["noise"] == 0
    spread = (out[only_noise] - 128.0).std(dim=(1, 2, 3))
    assert only_noise.sum() > 10 and spread.max() <= 0.03 * 255 * 1.15 and spread.mean() > 0.25 * 0.03 * 255
    untouched = (augment.last_choices["noise"] < 0) & (augment.last_choices["blur_noise"] < 0) \
        & (augment.last_choices["contrast"] < 0) & (augment.last_choices["colour"] < 0)
    assert torch.equal(out[untouched], flat[untouched])
