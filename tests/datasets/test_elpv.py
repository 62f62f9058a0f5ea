"""The fixed ELPV split: the committed file follows DESIGN.md's rule, and validation never touches test."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datasets.elpv import (
    SPLIT_FILE,
    DatasetError,
    elpv_root,
    fixed_test_indices,
    read_labels,
    read_split_file,
    split_indices,
    stratified_pick,
)


@pytest.fixture(scope="module")
def labels() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return read_labels(elpv_root() / "labels.csv")


def test_committed_split_follows_the_rule(labels: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    names, probabilities, types = labels
    committed = read_split_file(SPLIT_FILE)
    assert committed == names[fixed_test_indices(probabilities, types)].tolist()
    assert len(committed) == 654
    assert committed[:3] == ["images/cell0001.png", "images/cell0013.png", "images/cell0017.png"]


def test_validation_is_carved_from_training_cells_only(
    labels: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    _, probabilities, types = labels
    train, validation, test = split_indices(probabilities, types)
    assert not set(train) & set(test)
    assert not set(validation) & set(test)
    assert not set(train) & set(validation)
    assert len(train) + len(validation) + len(test) == len(probabilities)
    # stratified: every (probability, type) stratum is represented in validation in proportion
    for key, count in Counter(zip(probabilities.round(2), types, strict=True)).items():
        in_validation = sum(1 for i in validation if (round(probabilities[i], 2), types[i]) == key)
        assert abs(in_validation - 0.15 * (count - round(0.25 * count))) <= 1.5


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from([0.0, 0.33, 0.67, 1.0]), st.sampled_from(["mono", "poly"])),
        min_size=1,
        max_size=200,
    )
)
def test_stratified_pick_takes_the_rounded_share_of_each_stratum(keys: list[tuple[float, str]]) -> None:
    picked = stratified_pick(keys, 0.25, seed=0)
    assert list(picked) == sorted(set(picked.tolist()))
    for key, count in Counter(keys).items():
        assert sum(1 for i in picked if keys[i] == key) == round(0.25 * count)


def test_missing_data_says_what_was_expected(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("PVQC_ELPV_ROOT", str(tmp_path))
    with pytest.raises(DatasetError, match="expected ELPV labels"):
        elpv_root()
