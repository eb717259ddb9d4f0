"""Encoder registry, FrozenEncoder freezing, and weight loading from the hub's file layout."""

import json
import warnings

import pytest
import safetensors.torch
import timm
import torch

from cellgap.encoders import (
    DEMO_ENCODER,
    ENCODERS,
    EXTRA_ENCODERS,
    STUDY_ENCODERS,
    EncoderWeightsError,
    FrozenEncoder,
    get_encoder_spec,
)
from cellgap.network import CellGapNet

SMALL_DECODER = {"widths": (8, 8, 16, 16, 32, 32), "head_features": 8, "head_width": 8}
HUB_ENCODERS = [k for k, s in ENCODERS.items() if s.hub_repo]


def random_encoder(key, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return FrozenEncoder(key, weights=None, allow_random=True, reduced=True, **kw)


def test_registry_covers_the_study_and_extras():
    assert set(STUDY_ENCODERS) | set(EXTRA_ENCODERS) | {DEMO_ENCODER} == set(ENCODERS)
    for spec in ENCODERS.values():
        assert spec.family in ("hierarchical", "vit") and len(spec.taps) == 4
        assert spec.license and spec.pretraining
        assert spec.domain in ("general", "pathology")
        assert len(spec.mean) == len(spec.std) == 3
        if spec.gated:
            assert spec.hub_repo and spec.domain == "pathology"
    # patch-14 encoders see 224² per 256² tile, giving a 16×16 token grid
    for key in ("dinov2_vitl14", "virchow2", "uni2_h", "h_optimus_0"):
        assert ENCODERS[key].input_size == 224
    assert ENCODERS["h_optimus_0"].mean != ENCODERS["uni"].mean  # its own normalisation
    with pytest.raises(KeyError, match="not in the registry"):
        get_encoder_spec("resnet9000")


@pytest.mark.parametrize("key", sorted(ENCODERS))
def test_every_encoder_feeds_the_decoder(key):
    x = torch.rand(2, 3, 256, 256)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = CellGapNet(key, num_classes=3, encoder_weights=None, allow_random_encoder=True, reduced_encoder=True,
                         decoder=SMALL_DECODER)
    feats = net.forward_features(x)
    assert len(feats) == 4
    for f, c, r in zip(feats, net.encoder.channels, net.encoder.reductions):
        assert f.shape == (2, c, 256 // r, 256 // r)
    out = net.decode(x, feats)
    assert out["contour"].shape == (2, 3, 256, 256)
    assert out["distance"].shape == (2, 4, 256, 256)
    assert out["type"].shape == (2, 4, 256, 256)
    assert all(torch.isfinite(v).all() for v in out.values())


def test_encoder_is_frozen_and_stays_in_eval_mode():
    net = CellGapNet(DEMO_ENCODER, num_classes=2, encoder_weights=None, allow_random_encoder=True, decoder=SMALL_DECODER)
    assert not any(p.requires_grad for p in net.encoder.parameters())
    assert all(p.requires_grad for p in net.decoder.parameters())
    net.train()
    assert net.decoder.training and not net.encoder.model.training
    assert not any(m.training for m in net.encoder.model.modules())


def test_random_weights_need_consent_and_warn():
    with pytest.raises(EncoderWeightsError, match="convnext_atto.*allow_random"):
        FrozenEncoder(DEMO_ENCODER, weights=None)
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        FrozenEncoder(DEMO_ENCODER, weights=None, allow_random=True)


def _save_hub_layout(model, spec, folder, fmt):
    """Write a timm model the way the hub stores it: config.json + model.safetensors or pytorch_model.bin."""
    folder.mkdir(parents=True, exist_ok=True)
    model_args = {k: v for k, v in spec.kwargs.items() if isinstance(v, (int, float, str, bool, list, tuple))}
    config = {"architecture": spec.architecture, "num_classes": 0, "model_args": model_args,
              "pretrained_cfg": {"tag": "test", "mean": list(spec.mean), "std": list(spec.std),
                                 "input_size": [3, spec.input_size, spec.input_size], "num_classes": 0}}
    (folder / "config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if fmt == "safetensors":
        safetensors.torch.save_file(state, str(folder / "model.safetensors"))
    else:
        torch.save(state, folder / "pytorch_model.bin")


@pytest.mark.parametrize("key", HUB_ENCODERS)
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_local_hub_folder_gives_the_same_outputs(key, fmt, tmp_path):
    spec = get_encoder_spec(key).reduced()
    torch.manual_seed(0)
    source = timm.create_model(spec.architecture, pretrained=False, **{**spec.build_kwargs(), "num_classes": 0}).eval()
    _save_hub_layout(source, spec, tmp_path / key, fmt)
    loaded = FrozenEncoder(key, weights=tmp_path / key, reduced=True)
    assert not loaded.random_weights
    x = torch.rand(1, 3, 256, 256)
    xin = (x - loaded.mean) / loaded.std
    if loaded.scale != 1:
        xin = torch.nn.functional.interpolate(xin, size=(spec.input_size,) * 2, mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        expected = source.forward_intermediates(xin, indices=list(spec.taps), intermediates_only=True)
    for a, b in zip(loaded(x), expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_single_weights_file_for_timm_encoders(suffix, tmp_path):
    spec = get_encoder_spec("convnext_b_22k").reduced()
    torch.manual_seed(1)
    source = timm.create_model(spec.architecture, pretrained=False, num_classes=0, **spec.build_kwargs()).eval()
    path = tmp_path / f"weights{suffix}"
    state = source.state_dict()
    safetensors.torch.save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    loaded = FrozenEncoder("convnext_b_22k", weights=path, reduced=True)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected = source.forward_intermediates((x - loaded.mean) / loaded.std, indices=[0, 1, 2, 3], intermediates_only=True)
    for a, b in zip(loaded(x), expected):
        torch.testing.assert_close(a, b)


def test_swinv2_weights_pretrained_at_192_load_at_256(tmp_path):
    spec = get_encoder_spec("swinv2_b_22k").reduced()
    source = timm.create_model(spec.architecture, pretrained=False, num_classes=0,
                               **{**spec.build_kwargs(), "img_size": 192})  # the checkpoint's native size
    path = tmp_path / "swin.pth"
    torch.save(source.state_dict(), path)
    loaded = FrozenEncoder("swinv2_b_22k", weights=path, reduced=True)
    a = dict(loaded.model.named_parameters())
    for name, p in source.named_parameters():
        if name in a:  # the pruned head is absent
            torch.testing.assert_close(a[name], p)
    out = loaded(torch.rand(1, 3, 256, 256))
    assert [tuple(o.shape[-2:]) for o in out] == [(64, 64), (32, 32), (16, 16), (8, 8)]


def test_weight_errors_name_the_encoder_and_the_fix(tmp_path, monkeypatch):
    with pytest.raises(EncoderWeightsError, match="'uni'.*does not exist"):
        FrozenEncoder("uni", weights=tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EncoderWeightsError, match="'uni'.*no config.json"):
        FrozenEncoder("uni", weights=tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"architecture": "resnet50"}))
    with pytest.raises(EncoderWeightsError, match="'uni'.*resnet50.*wrong weights folder"):
        FrozenEncoder("uni", weights=tmp_path / "other")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(EncoderWeightsError) as info:
        FrozenEncoder("virchow2", weights="hub", reduced=True)
    message = str(info.value)
    assert "virchow2" in message and "offline" in message and "HF_TOKEN" in message and "weights=" in message


def test_hub_weights_load_from_the_local_hub_cache_offline(tmp_path, monkeypatch):
    """On a cluster node without network, weights downloaded earlier into the hub cache still load."""
    import huggingface_hub.constants as hub

    spec = get_encoder_spec(DEMO_ENCODER)
    torch.manual_seed(2)
    source = timm.create_model(spec.architecture, pretrained=False, num_classes=0).eval()
    snapshot = tmp_path / "models--timm--convnext_atto.d2_in1k" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    safetensors.torch.save_file(source.state_dict(), str(snapshot / "model.safetensors"))
    (tmp_path / "models--timm--convnext_atto.d2_in1k" / "refs").mkdir()
    (tmp_path / "models--timm--convnext_atto.d2_in1k" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    loaded = FrozenEncoder(DEMO_ENCODER, weights="hub")
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected = source.forward_intermediates((x - loaded.mean) / loaded.std, indices=[0, 1, 2, 3], intermediates_only=True)
    for a, b in zip(loaded(x), expected):
        torch.testing.assert_close(a, b)


def test_encoder_stays_frozen_through_a_monai_trainer_iteration():
    from monai.engines import SupervisedTrainer

    from cellgap.losses import CISCALoss
    from cellgap.training import PrepareCISCABatch

    net = CellGapNet(DEMO_ENCODER, num_classes=2, encoder_weights=None, allow_random_encoder=True, decoder=SMALL_DECODER)
    before = {k: v.clone() for k, v in net.encoder.state_dict().items()}
    decoder_before = {k: v.clone() for k, v in net.decoder.state_dict().items()}
    batch = {"image": torch.rand(2, 3, 64, 64), "contour_target": torch.randint(0, 3, (2, 1, 64, 64)),
             "distance_target": torch.zeros(2, 4, 64, 64), "weight_mask": torch.ones(2, 1, 64, 64),
             "type_target": torch.randint(0, 3, (2, 1, 64, 64))}
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=[batch, batch], network=net,
                                optimizer=torch.optim.Adam(net.decoder.parameters(), lr=1e-2), loss_function=CISCALoss(2),
                                prepare_batch=PrepareCISCABatch(), decollate=False)
    trainer.run()
    assert trainer.state.iteration == 2
    assert net.decoder.training and not any(m.training for m in net.encoder.model.modules())
    for k, v in net.encoder.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)  # BatchNorm/LayerNorm stats and weights unchanged
    assert any(not torch.equal(v, decoder_before[k]) for k, v in net.decoder.state_dict().items())
