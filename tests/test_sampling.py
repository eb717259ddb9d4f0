"""Tests of cellgap.data.sampling: the METHOD.md §6.5 oversampling rule and its seeded sampler."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from cellgap.data.prepared import DatasetInfo, PreparedWriter, datalist
from cellgap.data.sampling import (
    OVERSAMPLING_PRESETS,
    ClassBalancedSampler,
    dataset_class_counts,
    instance_class_counts,
    oversampling_weights,
)

# Ten tiles, three classes: class 1 common (60 cells), class 2 rarer (10), class 3 rarest (2).
COUNTS = np.array([[10, 0, 0]] * 6 + [[0, 4, 0], [0, 4, 0], [0, 0, 1], [0, 2, 1]])


def rule_by_hand(multiplier_rarest: float = 1.0, multiplier_second: float = 1.0) -> np.ndarray:
    """§6.5 worked through for COUNTS without a percentile cap."""
    n_tiles, total = 10, 72
    n3 = n_tiles * multiplier_rarest  # the rarest class gets as many copies as there are tiles
    n2 = n_tiles * math.sqrt(total / 10) / math.sqrt(total / 2) * multiplier_second
    weights = np.ones(10)
    weights[[6, 7]] += n2 * 4 / 10
    weights[9] += n2 * 2 / 10 + n3 * 1 / 2
    weights[8] += n3 * 1 / 2
    return weights


def test_weights_follow_the_rule():
    np.testing.assert_allclose(oversampling_weights(COUNTS, clip_percentile=100), rule_by_hand())


def test_multipliers_apply_in_ascending_count_order():
    weights = oversampling_weights(COUNTS, multipliers=(2.0, 0.5), clip_percentile=100)
    np.testing.assert_allclose(weights, rule_by_hand(multiplier_rarest=2.0, multiplier_second=0.5))


def test_counts_are_clipped_at_the_percentile_of_tiles_holding_the_class():
    counts = np.zeros((6, 2), dtype=int)
    counts[:, 0] = 50
    counts[:, 1] = [0, 1, 1, 1, 1, 40]  # one outlier tile with many rare cells
    capped = oversampling_weights(counts, clip_percentile=50)  # median over the 5 holders = 1
    np.testing.assert_allclose(capped[1:], 1 + 6 / 5)  # the outlier no longer dominates
    uncapped = oversampling_weights(counts, clip_percentile=100)
    np.testing.assert_allclose(uncapped[5], 1 + 6 * 40 / 44)


def test_single_class_or_empty_counts_give_uniform_weights():
    np.testing.assert_array_equal(oversampling_weights(np.array([[3], [0], [5]])), np.ones(3))
    np.testing.assert_array_equal(oversampling_weights(np.zeros((4, 3))), np.ones(4))


def test_sampler_draws_rare_class_tiles_in_proportion_to_the_rule():
    sampler = ClassBalancedSampler(COUNTS, clip_percentile=100, num_samples=40000, seed=3)
    expected = rule_by_hand()
    np.testing.assert_allclose(sampler.probabilities, expected / expected.sum())
    frequency = np.bincount(list(sampler), minlength=10) / 40000
    np.testing.assert_allclose(frequency, expected / expected.sum(), atol=0.01)
    assert frequency[9] > 5 * frequency[0]  # the tile with both rare classes is drawn far more often


def test_default_epoch_length_is_the_oversampled_list():
    sampler = ClassBalancedSampler(COUNTS, clip_percentile=100)
    assert len(sampler) == round(rule_by_hand().sum())
    assert len(list(sampler)) == len(sampler)


def test_balance_switch_gives_uniform_sampling():
    sampler = ClassBalancedSampler(COUNTS, balance=False, num_samples=20000, seed=0)
    assert len(ClassBalancedSampler(COUNTS, balance=False)) == 10
    np.testing.assert_allclose(sampler.probabilities, np.full(10, 0.1))
    frequency = np.bincount(list(sampler), minlength=10) / 20000
    np.testing.assert_allclose(frequency, 0.1, atol=0.015)
    permutation = list(ClassBalancedSampler(COUNTS, balance=False, replacement=False, seed=0))
    assert sorted(permutation) == list(range(10))


def test_sampler_is_seeded_and_advances_per_epoch():
    first, second = ClassBalancedSampler(COUNTS, seed=5), ClassBalancedSampler(COUNTS, seed=5)
    epoch0, epoch1 = list(first), list(first)
    assert epoch0 == list(second) and epoch1 == list(second)
    assert epoch0 != epoch1
    first.set_epoch(0)
    assert list(first) == epoch0
    assert list(ClassBalancedSampler(COUNTS, seed=6)) != epoch0


def test_replicas_split_one_draw():
    full = ClassBalancedSampler(COUNTS, num_samples=31, seed=2)
    parts = [list(ClassBalancedSampler(COUNTS, num_samples=31, seed=2, num_replicas=3, rank=r)) for r in range(3)]
    assert all(len(p) == 11 for p in parts)
    reference = torch.multinomial(full.weights, 33, replacement=True, generator=torch.Generator().manual_seed(2)).tolist()
    assert [x for r in range(3) for x in parts[r]] == [reference[i] for r in range(3) for i in range(r, 33, 3)]


def test_sampler_works_with_a_dataloader():
    loader = DataLoader(list(range(10)), batch_size=4, sampler=ClassBalancedSampler(COUNTS, num_samples=12, seed=1))
    batches = list(loader)
    assert [len(b) for b in batches] == [4, 4, 4]


def test_instance_class_is_the_largest_class_inside():
    label = np.array([[1, 1, 2, 2], [1, 1, 2, 2], [0, 0, 3, 3], [4, 4, 0, 0]])
    classes = np.array([[1, 3, 2, 2], [1, 1, 2, 2], [0, 0, 0, 0], [2, 2, 0, 0]])
    # Instance 1 holds classes 1 and 3 → 3; instance 2 → 2; instance 3 only background → not counted.
    np.testing.assert_array_equal(instance_class_counts(label, classes, 3), [0, 2, 1])
    np.testing.assert_array_equal(instance_class_counts(label[None], classes[None], 3), [0, 2, 1])
    np.testing.assert_array_equal(instance_class_counts(label, None, 2), [4, 0])
    with pytest.raises(ValueError, match="classes: found class id 3"):
        instance_class_counts(label, classes, 2)


def test_dataset_class_counts_read_a_prepared_dataset(tmp_path):
    info = DatasetInfo(name="toy", class_names=("a", "b"), magnification=40, mpp=0.25)
    label = np.zeros((16, 16), np.int32)
    label[2:6, 2:6], label[8:12, 8:12] = 1, 2
    classes = np.where(label == 1, 1, np.where(label == 2, 2, 0)).astype(np.uint8)
    image = np.full((16, 16, 3), 200, np.uint8)
    with PreparedWriter(tmp_path / "toy", info) as writer:
        writer.add("t0", image, label, classes, split="train")
        writer.add("t1", image, label, np.where(label > 0, 2, 0).astype(np.uint8), split="train")
        writer.add("t2", image, np.zeros_like(label), None, split="train")
    items = datalist(tmp_path / "toy", "train")
    np.testing.assert_array_equal(dataset_class_counts(items, 2), [[1, 1], [0, 2], [0, 0]])
    with pytest.raises(ValueError, match=r"items\[0\]\['label'\]: cannot read"):
        dataset_class_counts([{"label": str(tmp_path / "missing.tif")}], 2)


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="class_counts"):
        oversampling_weights(np.ones(5))
    with pytest.raises(ValueError, match="class_counts"):
        oversampling_weights(-np.ones((3, 2)))
    with pytest.raises(ValueError, match="multipliers: expected 2"):
        oversampling_weights(COUNTS, multipliers=OVERSAMPLING_PRESETS["conic"]["multipliers"])
    with pytest.raises(ValueError, match="clip_percentile"):
        oversampling_weights(COUNTS, clip_percentile=0)
    with pytest.raises(ValueError, match="num_samples"):
        ClassBalancedSampler(COUNTS, num_samples=0)
    with pytest.raises(ValueError, match="rank"):
        ClassBalancedSampler(COUNTS, num_replicas=2, rank=2)


def test_more_draws_than_tiles_without_replacement_are_whole_permutations():
    """Every tile once per pass, as a re-iterated shuffled loader (a few images, a long epoch)."""
    draw = list(ClassBalancedSampler(COUNTS, balance=False, replacement=False, num_samples=25, seed=3))
    assert len(draw) == 25
    assert sorted(draw[:10]) == sorted(draw[10:20]) == list(range(10)) and len(set(draw[20:])) == 5
