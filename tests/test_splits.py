"""Samples the pipeline draws are class-stratified, seeded and disjoint from what they must not touch."""
from collections import Counter

import pytest

from neuroscribe.datasets.splits import stratified_sample

LABELS = [c for c in range(5) for _ in range(20)]  # class-sorted, as image folders are


def test_spread_over_classes_not_first_n():
    ids = stratified_sample(LABELS, 10, seed=0)
    assert len(ids) == 10 and Counter(LABELS[i] for i in ids) == {c: 2 for c in range(5)}
    assert ids != list(range(10))


def test_seeded_and_purpose_independent():
    assert stratified_sample(LABELS, 15, seed=3) == stratified_sample(LABELS, 15, seed=3)
    assert stratified_sample(LABELS, 15, seed=3) != stratified_sample(LABELS, 15, seed=4)
    assert stratified_sample(LABELS, 15, seed=3, purpose="a") != stratified_sample(LABELS, 15, seed=3, purpose="b")


def test_uneven_classes_and_exclusion():
    labels = [0] * 3 + [1] * 50 + [2] * 50
    ids = stratified_sample(labels, 30, seed=1, exclude=range(2))
    counts = Counter(labels[i] for i in ids)
    assert len(ids) == 30 and counts[0] == 1 and counts[1] + counts[2] == 29 and abs(counts[1] - counts[2]) <= 1
    assert not set(ids) & {0, 1}
    assert stratified_sample(labels, 500, seed=1, exclude=[5]) == [i for i in range(len(labels)) if i != 5]
    assert stratified_sample(labels, 0, seed=1) == []
    with pytest.raises(ValueError, match="n must be"):
        stratified_sample(labels, -1, seed=1)
