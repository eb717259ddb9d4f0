"""The embedding cache: training from it gives the loss of on-the-fly features, its key, resumable fills,
corruption detection, and clear errors."""

import os
import pickle
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedTrainer
from monai.transforms import Compose, SelectItemsd

from cellgap.cache import (
    CACHE_KEYS,
    CachedFeaturesd,
    EmbeddingCache,
    PrepareCachedCISCABatch,
    ViewSpec,
    bytes_per_row,
    encoder_identity,
    fill_cache,
    weights_identity,
)
from cellgap.data.augmentation import ClipIntensityd
from cellgap.data.loading import LoadTiled
from cellgap.data.prepared import datalist
from cellgap.data.synthetic import prepare_synthetic
from cellgap.encoders import get_encoder_spec
from cellgap.losses import CISCALoss
from cellgap.network import CellGapNet
from cellgap.targets import CISCATargetsd
from cellgap.training import TARGET_KEYS

SMALL = {"widths": (8, 8, 16, 16, 32, 32), "head_features": 8, "head_width": 8}
TILE = 64  # small tiles keep the decoder fast on CPU; the ViT-L/16 entry is built for them (fixed position embeddings)
VIT = get_encoder_spec("vit_l16_21k")
VIT_SMALL_TILE = replace(VIT, kwargs={**VIT.kwargs, "img_size": TILE})
NUM_CLASSES = 3
HALF_LOSS_RTOL = 1e-3  # float16 / bfloat16 storage; documented in docs/cache.md
CLEAN = ViewSpec("clean", augmentation={"crop_size": TILE})


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Two cores shared with other jobs: more threads than free cores makes small convolutions ~10× slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = prepare_synthetic(tmp_path_factory.mktemp("data") / "synthetic", n_train=4, n_val=0, n_test=0, size=TILE,
                             progress=False)
    return datalist(root, "train")


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CellGapNet(VIT_SMALL_TILE, num_classes=NUM_CLASSES, reduced_encoder=True, encoder_weights=None,
                          allow_random_encoder=True, decoder=SMALL)


def _cache(root, data, spec, dtype="float32", net=None, **kwargs) -> EmbeddingCache:
    if net is not None:
        return EmbeddingCache.for_encoder(root, net, None, data, spec, dataset_id="synthetic", dtype=dtype, weights_seed=0, **kwargs)
    return EmbeddingCache(root, "vit_l16_21k", "random:0", "synthetic", spec, dtype, tile_ids=[d["id"] for d in data], **kwargs)


def _pipeline(spec: ViewSpec, cache: EmbeddingCache | None = None) -> Compose:
    transforms = [LoadTiled(num_classes=NUM_CLASSES), spec.augmentation_transform(),
                  CISCATargetsd(magnification=40, num_classes=NUM_CLASSES),
                  ClipIntensityd("image", 0.0, 255.0, dtype="uint8")]
    keys = ["image", *TARGET_KEYS, "view"]
    if cache is not None:
        transforms.append(CachedFeaturesd(cache))
        keys += list(CACHE_KEYS)
    transforms.append(SelectItemsd(keys, allow_missing_keys=True))
    return Compose(transforms).set_random_state(seed=7)  # the same view draws in every run


def _train(net, data, transform, epochs=1) -> tuple[list[float], list[list[int]], int]:
    """Iteration losses, views per batch and encoder calls of a real SupervisedTrainer run from a fixed decoder."""
    torch.manual_seed(1)
    net.decoder.load_state_dict(net.initial_decoder)
    loader = DataLoader(Dataset(data, transform), batch_size=2, shuffle=False, num_workers=0)
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=epochs, train_data_loader=loader, network=net,
                                optimizer=torch.optim.Adam(net.decoder.parameters(), lr=1e-3),
                                loss_function=CISCALoss(num_classes=NUM_CLASSES),
                                prepare_batch=PrepareCachedCISCABatch(encoder=net.encoder), decollate=False)
    losses, views = [], []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["loss"].item()))
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: views.append(e.state.batch["view"].tolist()))
    calls = []
    hook = net.encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        trainer.run()
    finally:
        hook.remove()
    return losses, views, len(calls)


@pytest.fixture(scope="module", autouse=True)
def _fixed_decoder(net):
    net.initial_decoder = {k: v.clone() for k, v in net.decoder.state_dict().items()}


@pytest.mark.parametrize("mode", ["clean", "views"])
def test_training_from_the_cache_gives_the_on_the_fly_loss(net, data, tmp_path, mode):
    spec = ViewSpec(mode, num_views=2 if mode == "views" else 1, seed=3,
                    augmentation={"crop_size": TILE, "stain_stats": "he", **({"prob_scale": 1.0} if mode == "views" else {})})
    epochs = 2 if mode == "views" else 1
    reference, ref_views, ref_calls = _train(net, data, _pipeline(spec), epochs)
    assert ref_calls == len(reference) and len(reference) == 2 * epochs

    f32 = _cache(tmp_path, data, spec, "float32", net=net)
    summary = fill_cache(net.encoder, data, f32, batch_size=3, progress=False)
    assert summary == {"rows": 4 * spec.views, "reused": 0, "computed": 4 * spec.views, "corrupted": 0, "remaining": 0}
    losses, views, calls = _train(net, data, _pipeline(spec, f32), epochs)
    assert calls == 0  # the encoder never ran: every map came from the cache
    assert views == ref_views
    assert losses == reference  # float32 cache: exactly the on-the-fly loss, step after step

    for dtype in ("float16", "bfloat16"):
        half = _cache(tmp_path, data, spec, dtype, net=net)
        assert half.path != f32.path
        fill_cache(net.encoder, data, half, progress=False)
        rounded, _, _ = _train(net, data, _pipeline(spec, half), epochs)
        np.testing.assert_allclose(rounded, reference, rtol=HALF_LOSS_RTOL, err_msg=dtype)
        assert rounded != reference  # it really went through 16-bit storage

    if mode == "views":
        drawn = {v for batch in ref_views for v in batch}
        assert drawn == {0, 1}  # each epoch draws one of the K views per tile


def test_views_are_fixed_per_tile_and_differ_between_views(data, tmp_path):
    spec = ViewSpec("views", num_views=3, seed=0, augmentation={"crop_size": TILE // 2})
    images = {}
    for run in range(2):
        transform = _pipeline(spec)
        for view in range(3):
            images[run, view] = transform({**data[0], "view": view})["image"]
    for view in range(3):
        assert torch.equal(images[0, view], images[1, view])
        assert images[0, view].shape[-2:] == (TILE // 2, TILE // 2)
    assert not torch.equal(images[0, 0], images[0, 1]) and not torch.equal(images[0, 1], images[0, 2])


def test_every_part_of_the_key_names_another_folder(data, tmp_path):
    ids = [d["id"] for d in data]
    base = dict(encoder_key="vit_l16_21k:abc", weights_id="random:0", dataset_id="synthetic", view_spec=ViewSpec("clean"),
                dtype="float16", tile_ids=ids, input_size=TILE)
    variants = {
        "encoder": {"encoder_key": "dinov2_vitl14:abc"},
        "weights": {"weights_id": "random:1"},
        "dataset": {"dataset_id": "pannuke"},
        "tiles": {"tile_ids": ids[:3]},
        "input size": {"input_size": TILE // 2},
        "mode": {"view_spec": ViewSpec("views", num_views=1)},
        "views": {"view_spec": ViewSpec("views", num_views=2)},
        "seed": {"view_spec": ViewSpec("clean", seed=1)},
        "augmentation": {"view_spec": ViewSpec("clean", augmentation={"stain_stats": "pannuke"})},
        "dtype": {"dtype": "float32"},
    }
    reference = EmbeddingCache(tmp_path, **base).path
    assert EmbeddingCache(tmp_path, **{**base, "tile_ids": list(reversed(ids))}).path == reference  # order does not matter
    paths = {name: EmbeddingCache(tmp_path, **{**base, **change}).path for name, change in variants.items()}
    assert reference not in paths.values() and len(set(paths.values())) == len(paths)
    assert reference.name.startswith("vit_l16_21k-synthetic-")


def test_identities_follow_the_encoder_build_and_the_weights_file(net, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        narrower = {"depth": 4, "embed_dim": 48, "num_heads": 2}
        other = CellGapNet(replace(VIT_SMALL_TILE, reduced_kwargs=narrower), reduced_encoder=True, encoder_weights=None, allow_random_encoder=True,
                                decoder=SMALL)
    assert encoder_identity(net).startswith("vit_l16_21k:") and encoder_identity(net) != encoder_identity(other)
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(b"0" * 10)
    first = weights_identity(weights)
    os.utime(weights, ns=(1, 1))
    assert weights_identity(weights) != first  # a new file at the same path is new weights
    assert weights_identity("hub", net) == "hub:vit_large_patch16_224.augreg_in21k"
    assert weights_identity(None, seed=3) == "random:3"
    assert weights_identity(None, net) == weights_identity("random", net.encoder)  # parameter fingerprint
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        weights_identity(tmp_path / "missing.bin")


def _flip_row_bytes(cache: EmbeddingCache, level: int, row: int) -> None:
    mapped = np.load(cache.path / f"level{level}.npy", mmap_mode="r")
    offset = mapped.offset + row * mapped[0].nbytes + 100
    del mapped
    with open(cache.path / f"level{level}.npy", "r+b") as f:
        f.seek(offset)
        chunk = bytearray(f.read(8))
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in chunk))


def test_a_corrupted_row_is_detected_and_recomputed(net, data, tmp_path):
    spec = ViewSpec("clean", augmentation={"crop_size": TILE})
    cache = _cache(tmp_path, data, spec, "float16", net=net)
    fill_cache(net.encoder, data, cache, progress=False)
    original = [cache.read(r) for r in range(cache.num_rows)]
    row = cache.row(data[2]["id"])
    _flip_row_bytes(cache, 1, row)

    fresh = _cache(tmp_path, data, spec, "float16", net=net)  # as a new run would open it
    assert fresh.read(row) is None and all(fresh.read(r) is not None for r in range(fresh.num_rows) if r != row)
    # during training: the sample is flagged, the prepare_batch recomputes it and writes it back
    sample = _pipeline(spec, fresh)(data[2])
    assert sample["features_ok"] is False and sample["cache_row"] == row
    batch = DataLoader([sample], batch_size=1)
    image, _, args, kwargs = PrepareCachedCISCABatch(encoder=net.encoder, cache=fresh)(next(iter(batch)))
    assert args == () and torch.equal(kwargs["features"][1][0], torch.from_numpy(original[row][1]))
    assert all(np.array_equal(a, b) for a, b in zip(fresh.read(row), original[row]))
    # before training: the fill's verification pass finds it
    _flip_row_bytes(cache, 3, row)
    summary = fill_cache(net.encoder, data, fresh, progress=False)
    assert summary["corrupted"] == 1 and summary["computed"] == 1 and summary["reused"] == cache.num_rows - 1
    assert all(np.array_equal(a, b) for a, b in zip(fresh.read(row), original[row]))


def test_without_an_encoder_a_corrupted_row_is_an_error(net, data, tmp_path):
    cache = _cache(tmp_path, data, CLEAN, net=net)
    fill_cache(net.encoder, data, cache, progress=False)
    _flip_row_bytes(cache, 0, 0)
    sample = _pipeline(CLEAN, _cache(tmp_path, data, CLEAN, net=net))(data[0])
    with pytest.raises(RuntimeError, match="no valid cached features"):
        PrepareCachedCISCABatch()(next(iter(DataLoader([sample], batch_size=1))))


class _CountingEncoder(torch.nn.Module):
    """Wraps the frozen encoder; counts tiles and stops ("is killed") after ``fail_after`` batches."""

    def __init__(self, encoder, fail_after=None):
        super().__init__()
        self.encoder, self.fail_after, self.tiles, self.batches = encoder, fail_after, 0, 0

    def forward(self, x):
        if self.fail_after is not None and self.batches >= self.fail_after:
            raise KeyboardInterrupt("fill killed")
        self.batches += 1
        self.tiles += x.shape[0]
        return self.encoder(x)


def test_a_killed_fill_resumes_with_the_missing_rows_only(net, data, tmp_path):
    spec = ViewSpec("views", num_views=2, augmentation={"crop_size": TILE})
    cache = _cache(tmp_path, data, spec, net=net)
    budget = fill_cache(net.encoder, data, cache, batch_size=2, max_rows=3, progress=False)
    assert (budget["computed"], budget["remaining"]) == (3, 5) and cache.complete.sum() == 3

    killed = _CountingEncoder(net.encoder, fail_after=1)
    with pytest.raises(KeyboardInterrupt):
        fill_cache(killed, data, cache, batch_size=2, progress=False)
    assert cache.complete.sum() == 5  # the batch finished before the kill is kept

    half_written = int(np.flatnonzero(cache.complete)[0])
    flags = np.load(cache.path / "complete.npy", mmap_mode="r+")
    flags[half_written] = 0  # maps on disk, flag never set: a crash before the last step
    flags.flush()
    del flags

    counting = _CountingEncoder(net.encoder)
    resumed = fill_cache(counting, data, _cache(tmp_path, data, spec, net=net), batch_size=2, progress=False)
    assert counting.tiles == resumed["computed"] == 4 and resumed["reused"] == 4 and resumed["remaining"] == 0
    assert fill_cache(counting, data, cache, progress=False)["computed"] == 0 and counting.tiles == 4


def test_a_truncated_file_rebuilds_the_cache(net, data, tmp_path):
    cache = _cache(tmp_path, data, CLEAN, net=net)
    fill_cache(net.encoder, data, cache, progress=False)
    with open(cache.path / "level2.npy", "r+b") as f:
        f.truncate(1000)
    reopened = _cache(tmp_path, data, CLEAN, net=net)
    assert reopened.complete.sum() == 0
    assert fill_cache(net.encoder, data, reopened, progress=False)["computed"] == 4


def test_storage_dtypes_round_trip_and_report_their_size(tmp_path, data):
    rng = np.random.default_rng(0)
    features = [torch.from_numpy(rng.normal(size=(2, 8, 4, 4)).astype(np.float32) * 100) for _ in range(4)]
    for dtype, tensor_dtype in (("float32", torch.float32), ("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        cache = _cache(tmp_path, data, ViewSpec("clean"), dtype)
        cache.write([1, 3], features)
        restored = cache.read_tensors(3)
        assert restored[0].dtype == tensor_dtype and torch.equal(restored[2], features[2][1].to(tensor_dtype))
        assert cache.read(0) is None and cache.complete.tolist() == [False, True, False, True]
        assert bytes_per_row(cache.geometry, dtype) == 4 * 8 * 4 * 4 * tensor_dtype.itemsize
        again = pickle.loads(pickle.dumps(cache))  # DataLoader workers get a copy that reopens the files
        assert torch.equal(again.read_tensors(3)[0], restored[0])


def test_bad_configurations_are_refused_with_clear_errors(net, data, tmp_path):
    with pytest.raises(ValueError, match=r"'clean'.*random augmentation.*prob_scale"):
        ViewSpec("clean", augmentation={"prob_scale": 1.0})
    with pytest.raises(ValueError, match="cache mode"):
        ViewSpec("fast")
    with pytest.raises(ValueError, match="num_views"):
        ViewSpec("views", num_views=0)
    with pytest.raises(ValueError, match="one view per tile"):
        ViewSpec("clean", num_views=2)
    with pytest.raises(ValueError, match=r"unknown argument.*'rotate'"):
        ViewSpec("views", augmentation={"rotate": True})
    ids = [d["id"] for d in data]
    with pytest.raises(ValueError, match="'off'"):
        EmbeddingCache(tmp_path, "e", "w", "d", "off", tile_ids=ids)
    with pytest.raises(ValueError, match="dtype"):
        EmbeddingCache(tmp_path, "e", "w", "d", "clean", "int8", tile_ids=ids)
    with pytest.raises(ValueError, match="at least one tile"):
        EmbeddingCache(tmp_path, "e", "w", "d", "clean", tile_ids=[])
    with pytest.raises(ValueError, match="input_size"):
        EmbeddingCache(tmp_path, "e", "w", "d", "clean", tile_ids=ids, input_size=(0, 256))

    cache = _cache(tmp_path, data, CLEAN, "float16", net=net)
    with pytest.raises(ValueError, match="'not_a_tile'"):
        cache.row("not_a_tile")
    with pytest.raises(ValueError, match="view 1"):
        cache.row(ids[0], 1)
    with pytest.raises(ValueError, match=r"lacks 1 tile"):
        fill_cache(net.encoder, data[1:], cache, progress=False)
    with pytest.raises(ValueError, match="float16 range.*bfloat16"):
        cache.write([0], [torch.full((1, 8, 2, 2), 1e6)] * 4)
    with pytest.raises(ValueError, match="NaN or infinite.*" + ids[0]):
        cache.write([0], [torch.full((1, 8, 2, 2), float("nan"))] * 4)

    small = _cache(tmp_path, data, CLEAN, net=net, input_size=TILE // 2)
    with pytest.raises(ValueError, match=r"\(64, 64\) after the view transform.*\(32, 32\)"):
        fill_cache(net.encoder, data, small, progress=False)
    fill_cache(net.encoder, data, cache, progress=False)
    with pytest.raises(RuntimeError, match="CachedFeaturesd") as error:  # MONAI's Compose names the failing transform
        _pipeline(ViewSpec("clean", augmentation={"crop_size": TILE // 2}), cache)(data[0])
    assert isinstance(error.value.__cause__, ValueError) and "crop size" in str(error.value.__cause__)


def test_the_store_sits_on_a_low_floor_and_rounds_bfloat16_as_torch():
    """cellgap/cache/store.py imports neither torch nor MONAI at module level; its own bfloat16 rounding is torch's."""
    import ast
    from pathlib import Path

    from cellgap.cache import store

    tree = ast.parse(Path(store.__file__).read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    modules = {a.name for n in top if isinstance(n, ast.Import) for a in n.names} | {n.module or "" for n in top if isinstance(n, ast.ImportFrom)}
    assert not {m for m in modules if m.split(".")[0] in ("torch", "monai", "ignite")}, modules
    values = torch.randn(100_000) * torch.logspace(-30, 30, 100_000)
    np.testing.assert_array_equal(store.to_storage(values.numpy(), "bfloat16"), values.to(torch.bfloat16).view(torch.uint16).numpy())
