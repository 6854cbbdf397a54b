"""Label-fraction subsets: nesting, stratified counts vs hand computation, determinism, >= 1 per
class, multi-label strata, manifests."""
import math

import numpy as np
import pytest

from data_pipelines.subset import keep_count, read_manifest, stratum_keys, subset
from tests import fakes




def _multiclass():
  # 3 classes with 900, 90 and 10 records, interleaved.
  labels = np.array([0] * 900 + [1] * 90 + [2] * 10, np.int32)
  return fakes.LabelSource(np.random.default_rng(0).permutation(labels))


def test_counts_match_hand_computation():
  source = _multiclass()
  for fraction in (0.01, 0.1, 0.25, 0.5):
    view = subset(source, fraction, seed=3)
    labels = view.labels
    for c, n in enumerate((900, 90, 10)):
      expected = max(1, math.floor(fraction * n + 0.5))
      assert int((labels == c).sum()) == expected, (fraction, c)
  # 1%: 9 + max(1, 0.9 -> 1) + max(1, 0.1 -> 0 -> 1).
  assert len(subset(source, 0.01, 3)) == 11


def test_nested_and_deterministic():
  source = _multiclass()
  previous = set()
  for fraction in (0.01, 0.02, 0.1, 0.3, 0.7, 1.0):
    ids = set(subset(source, fraction, seed=5).ids)
    assert previous <= ids, fraction
    previous = ids
  assert len(previous) == len(source)
  assert subset(source, 0.1, 5).ids == subset(source, 0.1, 5).ids
  assert subset(source, 0.1, 5).ids != subset(source, 0.1, 6).ids


def test_bad_fraction():
  for fraction in (0.0, -0.1, 1.5):
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
      subset(_multiclass(), fraction, 0)


def test_unstratified_size():
  view = subset(_multiclass(), 0.1, 0, stratify=False)
  assert len(view) == 100


def test_multilabel_rarest_finding_strata_and_one_positive_per_class():
  rng = np.random.default_rng(1)
  labels = (rng.random((2000, 4)) < [0.3, 0.1, 0.02, 0.0]).astype(np.float32)
  labels[7, 3] = 1  # One single positive of class 3, co-occurring with others.
  labels[7, :3] = 1
  source = fakes.LabelSource(labels, multi_label=True, names=["a", "b", "c", "d"])
  keys = stratum_keys(labels, True, source.class_names)
  # Hand computation of the key of record 7: rarest positive class is "d".
  assert keys[7] == "d"
  for i in (0, 1, 2):
    row = labels[i]
    hand = "no_finding" if not row.any() else ["d", "c", "b", "a"][
        next(j for j, c in enumerate([3, 2, 1, 0]) if row[c])]
    assert keys[i] == hand
  view = subset(source, 0.01, seed=0)
  assert (view.labels == 1).sum(axis=0).min() >= 1
  counts = view.class_counts()
  assert counts["d"] == 1
  previous = set()
  for fraction in (0.01, 0.05, 0.2):
    ids = set(subset(source, fraction, 0).ids)
    assert previous <= ids
    previous = ids


def test_manifest_round_trip(tmp_path):
  source = _multiclass()
  view = subset(source, 0.1, seed=2)
  path = tmp_path / "subset.json"
  view.write_manifest(str(path))
  again = read_manifest(str(path), source)
  assert again.ids == view.ids and again.fraction == 0.1 and again.seed == 2
  assert view.class_counts() == {"c0": 90, "c1": 9, "c2": 1, "unlabeled": 0}
  other = fakes.LabelSource(np.zeros(5, np.int32))
  other.name = "other"
  with pytest.raises(ValueError, match="subset of source 'array', not 'other'"):
    read_manifest(str(path), other)


def test_keep_count_rounds_half_up():
  assert [keep_count(0.5, n) for n in (0, 1, 3, 5)] == [0, 1, 2, 3]
