"""Label fractions: deterministic, class-stratified, nested subsets of a labeled source.

REMEDIS reports fine-tuning with 1%, 10%, ... of the labels; this module picks those labels.

* Stratified: records are grouped into strata and a stratum of n records keeps
  max(1, floor(fraction * n + 0.5)) of them, so every class is present and the class balance is
  kept (totals can exceed fraction * N by up to one record per stratum).
* Nested: each stratum has ONE permutation, seeded by (seed, stratum) and independent of the
  fraction; a subset takes a prefix of it. For one seed the 1% subset lies inside the 10% one.
* Strata: multi-class -> the class index. Multi-label -> "no finding" when the record has no
  positive label, else its RAREST positive label (rarest over the source), so rare findings get
  their own stratum instead of drowning in common co-occurrences. In addition every class with a
  positive keeps its first positive in a seeded order (fraction independent, so nesting holds),
  which guarantees at least one positive per class. Unlabeled records (label -1) form their own
  stratum and are never forced in.
* `stratify=False`: one stratum (a uniform sample of max(1, round(fraction * N)) records).

The result is a view with the source's record format and attributes, plus `write_manifest` /
`read_manifest` so a run records exactly which labels it saw.

`sample(source, n, seed)` is the fixed-SIZE counterpart, for evaluation subsets (kNN bank and
query, held-out monitor batches, figure grids): exactly n records, allocated to the same strata
in proportion to their sizes (largest-remainder rounding; every stratum gets one when n allows),
each stratum's records drawn by a seeded permutation. Never the first n records: real files are
often sorted by class, site or date (PneumoniaMNIST's training split starts with 3494 pneumonia
images, so a first-n kNN bank held one class and its AUC sat at 0.5).
"""
from __future__ import annotations

import math
import zlib
from typing import Any

import numpy as np

from data_pipelines.sources.base import IndexView, Source
from data_pipelines import storage

NO_FINDING = "no_finding"
UNLABELED = "unlabeled"


def stratum_keys(labels: np.ndarray, multi_label: bool, class_names: list[str]) -> list[str]:
  """The stratum of every record (see module docstring)."""
  labels = np.asarray(labels)
  if not multi_label:
    return [UNLABELED if l < 0 else class_names[int(l)] for l in labels]
  positives = labels == 1
  prevalence = positives.sum(axis=0)
  # Rarest first; ties broken by class order so the key is deterministic.
  order = np.lexsort((np.arange(labels.shape[1]), prevalence))
  keys = []
  for row, label in zip(positives, labels):
    if np.all(label < 0):
      keys.append(UNLABELED)
    elif not row.any():
      keys.append(NO_FINDING)
    else:
      keys.append(class_names[next(c for c in order if row[c])])
  return keys


def _permutation(seed: int, key: str, n: int) -> np.ndarray:
  # crc32, not hash(): Python salts str hashes per process.
  return np.random.default_rng([int(seed), zlib.crc32(key.encode("utf-8"))]).permutation(n)


def keep_count(fraction: float, n: int) -> int:
  """How many of a stratum of n records a fraction keeps: max(1, round half up)."""
  return 0 if n == 0 else max(1, min(n, math.floor(fraction * n + 0.5)))


def subset_indices(source: Source, fraction: float, seed: int, stratify: bool = True) -> np.ndarray:
  """Sorted record indices of the subset (see `subset`)."""
  if not 0.0 < float(fraction) <= 1.0:
    raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
  labels = np.asarray(source.labels)
  n = len(labels)
  if fraction == 1.0:
    return np.arange(n)
  keys = (stratum_keys(labels, source.multi_label, list(source.class_names)) if stratify
          else ["all"] * n)
  strata: dict[str, list[int]] = {}
  for i, key in enumerate(keys):
    strata.setdefault(key, []).append(i)
  chosen = []
  for key in sorted(strata):
    members = np.array(strata[key], np.int64)
    prefix = keep_count(fraction, len(members))
    chosen.append(members[_permutation(seed, key, len(members))[:prefix]])
  if stratify and source.multi_label:
    for c, name in enumerate(source.class_names):
      positive = np.flatnonzero(labels[:, c] == 1)
      if len(positive):
        chosen.append(positive[_permutation(seed, f"first_positive/{name}", len(positive))[:1]])
  return np.unique(np.concatenate(chosen)) if chosen else np.zeros((0,), np.int64)


class SubsetView(IndexView):
  """A label-fraction subset of a source; records as the source, plus its provenance."""

  def __init__(self, parent: Source, indices: np.ndarray, fraction: float, seed: int,
               stratify: bool):
    super().__init__(parent, indices, name=parent.name)
    self.fraction, self.seed, self.stratify = float(fraction), int(seed), bool(stratify)

  def class_counts(self) -> dict[str, int]:
    """Records per class (multi-class) or positives per class (multi-label), plus unlabeled."""
    labels = self.labels
    if self.multi_label:
      counts = {name: int((labels[:, c] == 1).sum()) for c, name in enumerate(self.class_names)}
      counts[NO_FINDING] = int(((labels == 1).sum(axis=1) == 0).sum())
    else:
      counts = {name: int((labels == c).sum()) for c, name in enumerate(self.class_names)}
      counts[UNLABELED] = int((labels < 0).sum())
    return counts

  def write_manifest(self, path: str) -> None:
    """Writes JSON: source name, fraction, seed, stratify, counts and the ids, in order."""
    manifest = {"source": self.parent.name, "fraction": self.fraction, "seed": self.seed,
                "stratify": self.stratify, "num_examples": len(self),
                "source_num_examples": len(self.parent), "class_counts": self.class_counts(),
                "ids": self.ids}
    storage.write_json(path, manifest, indent=1)


def subset(source: Source, fraction: float, seed: int = 0, stratify: bool = True) -> SubsetView:
  """A deterministic, class-stratified, nested subset with >= 1 example per class.

  Args:
    source: a labeled source (any of data_pipelines.sources).
    fraction: share of labels to keep, in (0, 1]; 1.0 keeps everything.
    seed: subset seed; the same seed gives nested subsets across fractions.
    stratify: stratify by class (see module docstring); False samples uniformly.

  Returns:
    A SubsetView (same records and attributes; `.ids`, `.write_manifest(path)`).

  Raises:
    ValueError: fraction outside (0, 1].
  """
  indices = subset_indices(source, fraction, seed, stratify)
  return SubsetView(source, indices, fraction, seed, stratify)


def sample_counts(stratum_sizes: dict[str, int], n: int) -> dict[str, int]:
  """Records per stratum of an n-record sample: proportional, exactly n in all.

  Each stratum's quota is n * size / total; every stratum gets the floor of its quota and the
  records left over go to the largest fractional parts (largest-remainder / Hamilton rounding;
  ties to the larger stratum, then the key, so the result does not depend on record order).
  When n >= the number of non-empty strata, a stratum left with none takes one record from the
  stratum whose count exceeds its quota the most (among those with two or more).

  Args:
    stratum_sizes: {stratum key: number of records}.
    n: sample size; at most the total (larger values keep every record).

  Returns:
    {stratum key: records to draw}, summing to min(n, total) (0 for n <= 0).
  """
  sizes = {key: int(size) for key, size in stratum_sizes.items() if size > 0}
  total = sum(sizes.values())
  n = max(0, min(int(n), total))
  if n == total:
    return dict(sizes)
  counts = {key: 0 for key in sizes}
  if n == 0:
    return counts
  quota = {key: n * size / total for key, size in sizes.items()}
  for key in sizes:
    counts[key] = math.floor(quota[key])
  by_remainder = sorted(sizes, key=lambda k: (-(quota[k] - counts[k]), -sizes[k], k))
  for key in by_remainder[:n - sum(counts.values())]:
    counts[key] += 1
  if n >= len(sizes):
    for key in sorted((k for k in sizes if counts[k] == 0), key=lambda k: (-quota[k], k)):
      donor = min((k for k in sizes if counts[k] > 1),
                  key=lambda k: (-(counts[k] - quota[k]), -counts[k], k))
      counts[donor] -= 1
      counts[key] = 1
  return counts


def sample_indices(source: Source, n: int, seed: int = 0) -> np.ndarray:
  """Sorted record indices of a seeded, class-stratified sample of n records (see `sample`)."""
  labels = np.asarray(source.labels)
  total = len(labels)
  if n <= 0 or n >= total:
    return np.arange(total, dtype=np.int64)
  keys = stratum_keys(labels, source.multi_label, list(source.class_names))
  strata: dict[str, list[int]] = {}
  for i, key in enumerate(keys):
    strata.setdefault(key, []).append(i)
  counts = sample_counts({key: len(members) for key, members in strata.items()}, n)
  chosen = []
  for key in sorted(strata):
    members = np.array(strata[key], np.int64)
    # Salted apart from `subset`'s permutations: a monitor sample of a split is not the
    # label-fraction subset of the same seed.
    chosen.append(members[_permutation(seed, f"sample/{key}", len(members))[:counts[key]]])
  return np.sort(np.concatenate(chosen))


def sample(source: Source, n: int, seed: int = 0) -> SubsetView:
  """A seeded, class-stratified random sample of exactly n records, for evaluation subsets.

  Use it for every fixed evaluation subset (kNN bank, monitor batch, figure grid) instead of
  the first n records, which on a file sorted by class hold a single class.

  Args:
    source: any source (labels are read without decoding images).
    n: number of records; n <= 0 or n >= len(source) keeps every record.
    seed: sample seed; the same seed gives the same records, whatever the source's class order.

  Returns:
    A SubsetView (records in source order; `.ids`, `.write_manifest(path)`) of min(n, len)
    records (all for n <= 0). Strata as in `subset` (class; rarest positive finding or
    "no finding" for multi-label; unlabeled records their own stratum), allocated by
    `sample_counts`. Unlike `subset`, no extra positive per finding is forced in: the size
    stays exactly n.
  """
  indices = sample_indices(source, n, seed)
  fraction = len(indices) / len(source) if len(source) else 1.0
  return SubsetView(source, indices, fraction, seed, stratify=True)


def read_manifest(path: str, source: Source) -> SubsetView:
  """Recreates the subset a manifest describes, from the same source.

  Args:
    path: a JSON written by `SubsetView.write_manifest`.
    source: the source it was drawn from.

  Returns:
    The SubsetView with exactly the manifest's ids.

  Raises:
    ValueError: the manifest names another source, or ids missing from the source.
  """
  manifest: dict[str, Any] = storage.read_json(path)
  if manifest["source"] != source.name:
    raise ValueError(f"{path} is a subset of source {manifest['source']!r}, not {source.name!r}")
  position = {example_id: i for i, example_id in enumerate(source.ids)}
  missing = [i for i in manifest["ids"] if i not in position]
  if missing:
    raise ValueError(f"{path}: {len(missing)} ids are not in source {source.name!r}, e.g. "
                     f"{', '.join(missing[:3])}")
  indices = np.array([position[i] for i in manifest["ids"]], np.int64)
  return SubsetView(source, indices, manifest["fraction"], manifest["seed"], manifest["stratify"])
