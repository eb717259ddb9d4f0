"""Golden outputs of the CISCA training targets: every change to cellgap/targets/ must give
bit-identical arrays (np.array_equal, dtypes included; float maps too, no tolerance).

tests/data/targets_golden.npz holds the instance maps and the outputs of ``contour_levels``,
``distance_maps``, ``weight_mask`` and ``CISCATargetsd`` produced by the code of commit
"targets: golden outputs" (before the speed-ups). Regenerate it only for an intended change of the
targets:  python tests/test_targets_equivalence.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cellgap.magnification import PROFILE_20X, PROFILE_40X
from cellgap.targets import CISCATargetsd, contour_levels, distance_maps, weight_mask
from cellgap.testing.fixtures import overlapping_ellipses

GOLDEN = Path(__file__).parent / "data" / "targets_golden.npz"
PROFILES = {20: PROFILE_20X, 40: PROFILE_40X}


def golden_tiles() -> dict[str, tuple[np.ndarray, np.ndarray | None, int]]:
    """name → (instance map, class map or None, magnification of the transform)."""
    from cellgap.data.synthetic import generate_tile

    tiles = {}
    for seed, magnification in ((1, 40), (2, 20)):
        tile = generate_tile(seed, 256 if magnification == 40 else 160, magnification)
        tiles[f"synthetic{magnification}"] = (tile.label.astype(np.int32), tile.classes.astype(np.int32), magnification)
    rng = np.random.default_rng(0)
    crowded = overlapping_ellipses(rng, 192, 65, (6.0, 12.0))
    tiles["ellipses40_nonsequential"] = (np.where(crowded > 0, crowded * 7 + 3, 0).astype(np.int32), None, 40)
    tiles["ellipses20_huge_ids"] = (np.where((x := overlapping_ellipses(rng, 160, 60, (3.0, 6.0))) > 0, x * 100003 + 5, 0), None, 20)
    edge = np.zeros((64, 80), dtype=np.int32)  # cells cut by the border, touching pairs, single pixels
    edge[:10, :10], edge[:10, 10:30], edge[54:, 70:], edge[30:40, :5], edge[30:40, 5:9] = 1, 2, 3, 4, 5
    for i, (r, c) in enumerate([(20, 20), (21, 22), (20, 23), (50, 50), (0, 60), (63, 79), (45, 45), (45, 46)]):
        edge[r, c] = 10 + i
    tiles["border_single_pixels"] = (edge, None, 40)
    noise = rng.integers(0, 6, (40, 40)) * (rng.random((40, 40)) < 0.5)
    tiles["noise"] = (noise.astype(np.int32), None, 20)
    tiles["empty"] = (np.zeros((32, 48), dtype=np.int32), None, 40)
    return tiles


def golden_outputs(label: np.ndarray, classes: np.ndarray | None, magnification: int) -> dict[str, np.ndarray]:
    out = {}
    for mag, profile in PROFILES.items():
        out[f"levels{mag}"] = contour_levels(label, profile)
    out["distance_fullrange"] = distance_maps(label)
    out["distance_tips"] = distance_maps(label, "tips", PROFILES[magnification])
    out["weight_mask"] = weight_mask(label)
    sample = {"label": torch.from_numpy(label[None].astype(np.float32))}  # float, as LoadImaged gives it
    if classes is not None:
        sample["classes"] = torch.from_numpy(classes[None])
    for name, kwargs in {
        "transform": {},
        "transform_k4_tips": {"num_contour_classes": 4, "distance_mode": "tips", "relabel": False, "weight_radius": 3},
    }.items():
        result = CISCATargetsd(magnification=magnification, **kwargs)(dict(sample))
        for key in ("label", "contour_target", "distance_target", "weight_mask", "type_target"):
            value = result[key]
            out[f"{name}.{key}"] = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    return out


def _load_golden() -> dict[str, dict[str, np.ndarray]]:
    """tile → {"label", "magnification", "classes" (if any), output name → array}. Equal arrays
    are stored once ("array<i>"); "index" lists "tile/name=array<i>"."""
    with np.load(GOLDEN) as data:
        golden: dict[str, dict[str, np.ndarray]] = {}
        for entry in data["index"].tolist():
            path, stored = entry.split("=")
            tile, name = path.split("/")
            golden.setdefault(tile, {})[name] = data[stored]
    return golden


GOLDEN_TILES = _load_golden() if GOLDEN.exists() else {}


@pytest.mark.parametrize("name", sorted(GOLDEN_TILES))
def test_targets_equal_the_golden_outputs(name):
    golden = GOLDEN_TILES[name]
    outputs = golden_outputs(golden["label"], golden.get("classes"), int(golden["magnification"]))
    assert set(outputs) == set(golden) - {"label", "classes", "magnification"}
    for key, value in outputs.items():
        expected = golden[key]
        if key.endswith(("contour_target", "type_target")):  # int64 in the golden file, uint8 since 2026-11-27: same values
            assert value.dtype == np.uint8 and expected.dtype == np.int64, key
        else:
            assert value.dtype == expected.dtype, key
        assert value.shape == expected.shape, key
        assert np.array_equal(value, expected), f"{name}/{key}: {np.count_nonzero(value != expected)} pixels differ"


def test_golden_file_covers_every_kind_of_tile():
    assert len(GOLDEN_TILES) == 7 and GOLDEN.stat().st_size < 300_000


if __name__ == "__main__":
    arrays, index, seen = {}, [], {}
    for tile, (label, classes, magnification) in golden_tiles().items():
        entries = {"label": label, "magnification": np.array(magnification)}
        if classes is not None:
            entries["classes"] = classes
        entries.update(golden_outputs(label, classes, magnification))
        for name, value in entries.items():
            key = (value.dtype.str, value.shape, value.tobytes())
            if key not in seen:
                seen[key] = f"array{len(seen)}"
                arrays[seen[key]] = value
            index.append(f"{tile}/{name}={seen[key]}")
    GOLDEN.parent.mkdir(exist_ok=True)
    np.savez_compressed(GOLDEN, index=np.array(index), **arrays)
    print(f"{GOLDEN}: {len(index)} outputs, {len(arrays)} distinct arrays, {GOLDEN.stat().st_size / 1e3:.0f} kB")
