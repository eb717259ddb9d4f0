"""Network input checks, decoder variants, the CISCA loss, and learning on a few tiles."""

import warnings

import numpy as np
import pytest
import torch

from cellgap.decoder import CISCADecoder
from cellgap.derivatives import derivative_kernels
from cellgap.losses import CISCALoss, soft_dice
from cellgap.network import CellGapNet

SMALL = {"widths": (8, 8, 16, 16, 32, 32), "head_features": 8, "head_width": 8}


@pytest.fixture(scope="module")
def net():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CellGapNet("convnext_atto", num_classes=3, encoder_weights=None, allow_random_encoder=True, decoder=SMALL)


def test_input_errors_name_what_was_expected(net):
    with pytest.raises(ValueError, match="multiples of 32"):
        net(torch.rand(1, 3, 100, 128))
    with pytest.raises(ValueError, match=r"\(B,3,H,W\)"):
        net(torch.rand(1, 4, 64, 64))
    with pytest.raises(ValueError, match="floating point"):
        net(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


def test_single_class_has_no_type_head():
    dec = CISCADecoder([16, 32, 64, 128], [4, 8, 16, 32], num_classes=1, **SMALL)
    feats = [torch.rand(1, c, 64 // r, 64 // r) for c, r in zip([16, 32, 64, 128], [4, 8, 16, 32])]
    out = dec(torch.rand(1, 3, 64, 64), feats)
    assert set(out) == {"contour", "distance"}


def test_decoder_variants_and_bad_arguments():
    feats = [torch.rand(1, 24, 4, 4) for _ in range(4)]  # a ViT grid at stride 16 of a 64² input
    for k, m, norm in [(2, 2, "batch"), (3, 4, "group")]:
        dec = CISCADecoder([24] * 4, [16] * 4, num_classes=2, num_contour_classes=k, num_distance_maps=m, norm=norm, **SMALL)
        out = dec(torch.rand(1, 3, 64, 64), feats)
        assert out["contour"].shape[1] == k and out["distance"].shape[1] == m and out["type"].shape[1] == 3
    with pytest.raises(ValueError, match="num_contour_classes"):
        CISCADecoder([24] * 4, [16] * 4, num_classes=2, num_contour_classes=4)
    with pytest.raises(ValueError, match="4 encoder maps"):
        CISCADecoder([24] * 3, [16] * 3, num_classes=2)
    with pytest.raises(ValueError, match="norm"):
        CISCADecoder([24] * 4, [16] * 4, num_classes=2, norm="layer")
    dec = CISCADecoder([24] * 4, [8] * 4, num_classes=2, **SMALL)  # told stride 8, given stride 16
    with pytest.raises(ValueError, match="reductions mismatch"):
        dec(torch.rand(1, 3, 64, 64), feats)


def test_derivative_kernels_follow_the_map_directions():
    k = derivative_kernels()
    ramp = torch.arange(9.0)
    rows, cols = torch.meshgrid(ramp, ramp, indexing="ij")
    maps = torch.stack([cols, rows, rows + cols, cols - rows])[:, None]  # h, v, tl, bl increase along their axis
    response = torch.nn.functional.conv2d(maps, k[:, None], groups=1)[range(4), range(4)]  # own kernel per map
    assert (response > 0).all()
    np.testing.assert_allclose(np.rot90(k[2].numpy()), k[3].numpy())
    assert k[:, 2, 2].abs().max() == 0


def _targets(b=2, h=32, w=32, classes=4):
    g = torch.Generator().manual_seed(0)
    weight = torch.where(torch.rand(b, 1, h, w, generator=g) > 0.5, 1.0, 0.05)
    return {"contour_target": torch.randint(0, 3, (b, 1, h, w), generator=g),
            "distance_target": (torch.rand(b, 4, h, w, generator=g) * 2 - 1) * (weight == 1),  # 0 far from cells
            "weight_mask": weight,
            "type_target": torch.randint(0, classes, (b, 1, h, w), generator=g)}


def _perfect(t, classes=4, scale=30.0):
    onehot = lambda x, n: torch.nn.functional.one_hot(x[:, 0], n).permute(0, 3, 1, 2).float()  # noqa: E731
    return {"contour": onehot(t["contour_target"], 3) * scale, "distance": t["distance_target"].clone(),
            "type": onehot(t["type_target"], classes) * scale}


def test_loss_is_near_zero_for_perfect_predictions_and_larger_otherwise():
    loss = CISCALoss(num_classes=3)
    t = _targets()
    perfect = loss.components(_perfect(t), t)
    assert perfect["mae"] < 1e-6 and perfect["msge"] < 1e-6 and perfect["contour"] < 0.01
    assert perfect["type"] < 0.01
    noisy = _perfect(t)
    noisy["distance"] = noisy["distance"] + 0.3 * torch.randn_like(noisy["distance"])
    worse = loss.components(noisy, t)
    assert worse["mae"] > 0.01 and worse["msge"] > 0.01


def test_loss_weights_follow_method_indexing():
    multi = CISCALoss(num_classes=5)
    assert multi.contour_weights == pytest.approx([2 / 14, 1 / 14, 2 / 14])
    assert multi.type_weight == pytest.approx(5 / 14) and multi.mae_weight == pytest.approx(2 / 14)
    single = CISCALoss(num_classes=1)
    assert single.contour_weights == pytest.approx([2 / 9, 1 / 9, 2 / 9]) and single.type_weight == 0
    assert single.msge_weight == pytest.approx(2 / 9)
    k2 = CISCALoss(num_classes=1, num_contour_classes=2)
    assert len(k2.contour_weights) == 2
    with pytest.raises(ValueError, match="expected 6 values"):
        CISCALoss(num_classes=5, weights=[1, 1, 1])
    with pytest.raises(ValueError, match="tversky"):
        CISCALoss(num_classes=5, tversky="focal")


def test_loss_reports_mismatched_heads():
    loss = CISCALoss(num_classes=3)
    t = _targets()
    pred = _perfect(t)
    pred["type"] = pred["type"][:, :3]
    with pytest.raises(ValueError, match="does the dataset match the bundle"):
        loss(pred, t)
    with pytest.raises(KeyError, match="CISCATargetsd"):
        loss(pred, {"contour_target": t["contour_target"]})


def test_pixel_tversky_is_the_reference_variant():
    t = _targets()
    pred = _perfect(t, scale=2.0)
    region = CISCALoss(num_classes=3, tversky="region").type_loss(pred["type"], t["type_target"])
    pixel = CISCALoss(num_classes=3, tversky="pixel").type_loss(pred["type"], t["type_target"])
    assert region.item() != pytest.approx(pixel.item())
    assert soft_dice(torch.ones(4), torch.ones(4)) == pytest.approx(1.0)


def test_decoder_learns_a_few_tiles():
    """Overfitting four synthetic tiles: the loss must fall well below its starting value."""
    from cellgap.data.synthetic import generate_tile
    from cellgap.targets import CISCATargetsd

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = CellGapNet("convnext_atto", num_classes=3, encoder_weights=None, allow_random_encoder=True, decoder=SMALL)
    make = CISCATargetsd(magnification=40, num_classes=3)
    items = []
    for seed in range(2):
        tile = generate_tile(seed, size=64, magnification=40)
        items.append(make({"label": torch.from_numpy(tile.label[None].astype(np.int32)),
                           "classes": torch.from_numpy(tile.classes[None].astype(np.int32))}))
        items[-1]["image"] = torch.from_numpy(tile.image).permute(2, 0, 1).float() / 255
    batch = {k: torch.stack([torch.as_tensor(i[k]) for i in items]) for k in
             ("image", "contour_target", "distance_target", "weight_mask", "type_target")}
    loss_fn = CISCALoss(num_classes=3)
    opt = torch.optim.Adam(net.decoder.parameters(), lr=3e-3)
    losses = []
    net.train()
    for _ in range(40):
        opt.zero_grad()
        loss = loss_fn(net(batch["image"]), batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_loss_follows_the_predictions_device():
    # Bundles build the loss on the CPU and never move it: its buffers must follow the network outputs
    # (here the meta device stands in for CUDA, which CI lacks).
    loss = CISCALoss(num_classes=3)
    meta = {k: v.to("meta") for k, v in _targets().items()}
    assert loss(_perfect(meta), meta).device.type == "meta"


def test_gradient_clipping_unscales_amp_gradients_first():
    from types import SimpleNamespace

    from cellgap.training import GradientClipping

    weight = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    scaler.scale((weight * 10.0).sum()).backward()  # true gradient: 10 per element, norm 20
    GradientClipping([weight], max_norm=1.0)(SimpleNamespace(scaler=scaler, optimizer=optimizer))
    assert torch.linalg.vector_norm(weight.grad).item() == pytest.approx(1.0, rel=1e-5)
    scaler.step(optimizer)  # knows the gradients are unscaled already: the step is the clipped one
    assert weight.detach() == pytest.approx(torch.full((4,), 0.5), rel=1e-5)


def test_loss_of_bf16_outputs_is_the_float32_loss_with_or_without_autocast():
    # Under the bundles' bf16 autocast the network's outputs are bf16.  Outside autocast they met the
    # float32 targets in the MSGE convolution (a dtype error); inside it the Dice/Tversky sums and the
    # targets' derivatives ran in bf16 (CPU autocast stands in for CUDA's here).
    loss = CISCALoss(num_classes=3)
    t = _targets()
    pred = _perfect(t, scale=2.0)
    pred["distance"] = pred["distance"] + 0.1 * torch.randn(pred["distance"].shape, generator=torch.Generator().manual_seed(1))
    bf16 = {k: v.to(torch.bfloat16).requires_grad_() for k, v in pred.items()}
    expected = loss.components({k: v.detach().float() for k, v in bf16.items()}, t)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            parts = loss.components(bf16, t)
        for key, value in parts.items():
            assert value.dtype == torch.float32 and value.item() == pytest.approx(expected[key].item(), rel=1e-6), (autocast, key)
    sum(parts.values()).backward()
    assert all(v.grad is not None and v.grad.dtype == torch.bfloat16 for v in bf16.values())


@pytest.mark.parametrize("channels_last", [None, True])
def test_prepare_layout_sets_the_weight_layout_before_the_first_forward(channels_last):
    # DDP builds its gradient buckets from the weights' layout when it wraps the model: the layout must
    # not change afterwards, in the first forward (multi_gpu_train.json calls prepare_layout first).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = CellGapNet("convnext_atto", num_classes=3, encoder_weights=None, allow_random_encoder=True,
                         decoder={**SMALL, "channels_last": channels_last})
    assert net.prepare_layout("cpu") is net
    strides = {name: p.stride() for name, p in net.decoder.named_parameters()}
    with torch.no_grad():
        net(torch.rand(1, 3, 64, 64))
    assert {name: p.stride() for name, p in net.decoder.named_parameters()} == strides
    four_d = [p for p in net.decoder.parameters() if p.ndim == 4 and p.shape[-1] > 1]
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in four_d) == bool(channels_last)
