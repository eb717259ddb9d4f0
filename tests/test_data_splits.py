"""Split protocols: proportions, stratification, grouping, official folds, split files."""

import numpy as np
import pytest

from cellgap.data import splits
from cellgap.testing.fixtures import PANNUKE_TISSUES


def pannuke_like_tissues(seed=0):
    rng = np.random.default_rng(seed)
    counts = rng.integers(25, 900, len(PANNUKE_TISSUES))
    return np.repeat(np.array(PANNUKE_TISSUES), counts)


def test_cisca_split_proportions_and_every_tissue_in_every_split():
    tissues = pannuke_like_tissues()
    split = splits.cisca_split(tissues, seed=5)
    n = len(tissues)
    sizes = splits.split_sizes(split)
    assert sizes["test"] == int(np.ceil(0.2 * n))
    assert sizes["val"] == int(np.ceil(0.1 * (n - sizes["test"])))
    assert sizes["train"] + sizes["val"] + sizes["test"] == n
    for tissue in np.unique(tissues):
        members = split[tissues == tissue]
        assert set(members) == {"train", "val", "test"}, tissue
        # stratified: each tissue's test share within one tile of 20 %
        assert abs((members == "test").sum() - 0.2 * len(members)) <= 1.5


def test_cisca_split_7901_tiles_gives_the_studys_sizes():
    # METHOD.md §6.1: 7,901 pooled tiles → train 5,688 / val 632 / test 1,581 (sizes, not the same draw).
    tissues = np.repeat(np.array(PANNUKE_TISSUES), 7901 // 19 + 1)[:7901]
    assert splits.split_sizes(splits.cisca_split(tissues)) == {"train": 5688, "val": 632, "test": 1581}


def test_cisca_split_is_seeded():
    tissues = pannuke_like_tissues()
    a, b, c = splits.cisca_split(tissues, seed=5), splits.cisca_split(tissues, seed=5), splits.cisca_split(tissues, seed=6)
    assert (a == b).all()
    assert (a != c).any()


def test_small_strata_still_reach_both_sides():
    strata = ["a"] * 2 + ["b"] * 3 + ["c"] * 40
    chosen = splits.stratified_split(strata, 0.2, np.random.default_rng(0))
    strata = np.array(strata)
    for s in "abc":
        assert chosen[strata == s].any() and (~chosen[strata == s]).any()
    assert chosen.sum() == 9


def test_grouped_split_keeps_source_images_together_and_stratifies_cohorts():
    rng = np.random.default_rng(1)
    groups, cohorts = [], []
    for cohort, n_sources in (("consep", 20), ("crag", 60), ("dpath", 70), ("glas", 50), ("pannuke", 15)):
        for s in range(n_sources):
            for _ in range(int(rng.integers(1, 12))):
                groups.append(f"{cohort}_{s}")
                cohorts.append(cohort)
    split = splits.grouped_split(groups, cohorts, seed=5)
    groups, cohorts = np.array(groups), np.array(cohorts)
    for g in np.unique(groups):
        assert len(set(split[groups == g])) == 1, f"source image {g} in two splits"
    for cohort in np.unique(cohorts):
        assert set(split[cohorts == cohort]) == {"train", "val", "test"}
    sources = np.unique(groups)
    test_sources = {g for g in sources if split[groups == g][0] == "test"}
    assert len(test_sources) == int(np.ceil(0.2 * len(sources)))


def test_grouped_split_rejects_a_group_in_two_strata():
    with pytest.raises(ValueError, match="spans strata"):
        splits.grouped_split(["s1", "s1", "s2"], ["crag", "glas", "glas"])


def test_pannuke_official_splits():
    folds = np.array([1, 1, 2, 2, 3, 3])
    assert list(splits.pannuke_official_split(folds, 1)) == ["train", "train", "val", "val", "test", "test"]
    assert list(splits.pannuke_official_split(folds, 2)) == ["val", "val", "train", "train", "test", "test"]
    assert list(splits.pannuke_official_split(folds, 3)) == ["test", "test", "val", "val", "train", "train"]
    with pytest.raises(ValueError, match="folds 1, 2, 3"):
        splits.pannuke_official_split([1, 4], 1)


def test_holdout_split_keeps_test_groups_and_stratifies_validation():
    groups = [f"img{i}" for i in range(40) for _ in range(2)]
    areas = ["auditory" if i < 30 else "cerebellum" for i in range(40) for _ in range(2)]
    split = splits.holdout_split(groups, {"img3", "img35"}, areas, seed=5)
    groups = np.array(groups)
    assert set(split[np.isin(groups, ["img3", "img35"])]) == {"test"}
    assert (split == "test").sum() == 4
    val_groups = set(groups[split == "val"])
    assert len(val_groups) == int(np.ceil(0.1 * 38))
    assert any(g in val_groups for g in [f"img{i}" for i in range(30, 40)])
    for g in np.unique(groups):
        assert len(set(split[groups == g])) == 1


def test_read_split_csv_accepts_cisca_folds_and_merges_duplicates(tmp_path):
    path = tmp_path / "folds.csv"
    path.write_text("img_id,fold\na,0\nb,1\nc,2\na,0\n")
    assert splits.read_split_csv(path, ["a", "b", "c"]) == {"a": "train", "b": "val", "c": "test"}


def test_read_split_csv_names_missing_images_and_unlisted_ones(tmp_path):
    path = tmp_path / "split.csv"
    path.write_text("id,split\na,train\nghost,test\n")
    with pytest.raises(ValueError, match=r"split.csv, row 3: id 'ghost' names no image"):
        splits.read_split_csv(path, ["a", "b"])
    path.write_text("id,split\na,train\n")
    with pytest.raises(ValueError, match=r"1 image\(s\) have no split, e.g. \['b'\]"):
        splits.read_split_csv(path, ["a", "b"])
    path.write_text("id,split\na,training\nb,holdout\n")
    with pytest.raises(ValueError, match="row 3: split 'holdout' is not one of"):
        splits.read_split_csv(path, ["a", "b"])
    path.write_text("id,split\na,train\na,test\n")
    with pytest.raises(ValueError, match="listed in both"):
        splits.read_split_csv(path, ["a"])
