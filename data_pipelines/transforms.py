"""Per-record transforms, one per objective: record + generator -> the arrays a batch holds.

- `AugmentViews`: SimCLR, V augmented views (`views`).
- `AugmentMultiCrop`: multi-crop (SwAV; Ghesu et al. 2022), global and local views, `labeled`.
- `AugmentOne`: supervised training, one augmented `image` (and its `lung_mask`).
- `EvalTransform`: evaluation, deterministic, with `id` and `valid`.
- `AugmentGMML` (+ `FillFromOtherImages`, per batch): GMML's clean and group-masked views.

Each applies a list of ops (data_pipelines/ops*.py) drawn from the record's own generator, so
a record at a given stream position always gets the same views (exact resume, any topology).
Module-level classes, so Grain's worker processes can pickle them. A bad-record marker
(data_pipelines/bad_records.py) passes through untouched. Outputs are uint8: normalising is
the train step's job, on the device.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from data_pipelines import bad_records
from data_pipelines import ops as ops_lib
from data_pipelines import ops_geometric
from data_pipelines import ops_intensity
from data_pipelines import ops_masking

# Ops that end in a fixed spatial size, so records of different sizes batch together.
_SIZE_FIXING_OPS = (ops_geometric.RandomResizedCrop, ops_geometric.Resize,
                    ops_geometric.CentralCrop)


def check_ops(ops: Sequence[ops_lib.Op], what: str) -> list[ops_lib.Op]:
  ops = ops_lib.parse_ops(ops)
  if not any(isinstance(op, _SIZE_FIXING_OPS) for op in ops):
    raise ValueError(
        f"{what}: the ops must contain random_resized_crop, resize or central_crop so that "
        f"every record ends at the same size and records batch together; got {ops}")
  return ops


def _prepare_features(record: dict[str, Any], ops: Sequence[ops_lib.Op]) -> dict[str, Any]:
  """The ops' input: image (uint8, unless the ops start with intensity_window) and lung_mask."""
  image = np.asarray(record["image"])
  if image.ndim == 2:
    image = image[..., None]
  features = {"image": image}
  if image.dtype != np.uint8 and not (ops and isinstance(ops[0], ops_intensity.IntensityWindow)):
    # High-bit-depth source without an explicit window: map the image's own range to 0..255.
    features = ops_intensity.IntensityWindow()(features, None)
  if "lung_mask" in record:
    features["lung_mask"] = np.asarray(record["lung_mask"], np.uint8)
  return features


def _metadata(record: dict[str, Any]) -> dict[str, Any]:
  return {"label": record["label"], "site": np.int32(record.get("site", 0))}


class AugmentViews:
  """Record + rng -> {"views": (V, H, W, C) uint8, label, site}: V independent augmentations."""

  def __init__(self, ops: Sequence[ops_lib.Op], num_views: int, num_channels: int):
    self.ops, self.num_views, self.num_channels = list(ops), num_views, num_channels

  def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    if bad_records.BAD_RECORD in record:
      return record
    features = _prepare_features(record, self.ops)
    views = [ops_lib.set_channels(ops_lib.apply_ops(self.ops, features, rng)["image"],
                                  self.num_channels) for _ in range(self.num_views)]
    return {"views": np.stack(views), **_metadata(record)}


class AugmentOne:
  """Record + rng -> {"image": (H, W, C) uint8, label, site (, lung_mask)}: one augmentation."""

  def __init__(self, ops: Sequence[ops_lib.Op], num_channels: int):
    self.ops, self.num_channels = list(ops), num_channels

  def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    if bad_records.BAD_RECORD in record:
      return record
    features = ops_lib.apply_ops(self.ops, _prepare_features(record, self.ops), rng)
    image = ops_lib.set_channels(features["image"], self.num_channels)
    out = {"image": np.ascontiguousarray(image), **_metadata(record)}
    if "lung_mask" in features:
      out["lung_mask"] = np.ascontiguousarray(features["lung_mask"])
    return out


class AugmentMultiCrop:
  """Record + rng -> global views, local views, label, labeled, site (multi-crop).

  The views are drawn from the record's generator in a fixed order (all global views, then all
  local ones), so the same record at the same stream position always gets the same crops.
  """

  def __init__(self, global_ops: Sequence[ops_lib.Op], local_ops: Sequence[ops_lib.Op],
               num_global: int, num_local: int, num_channels: int,
               labeled_indices: np.ndarray | None):
    self.global_ops, self.local_ops = list(global_ops), list(local_ops)
    self.num_global, self.num_local, self.num_channels = num_global, num_local, num_channels
    self.labeled_indices = labeled_indices  # Sorted unique int64, or None.

  def _is_labeled(self, record: dict[str, Any]) -> bool:
    if self.labeled_indices is None:
      # No explicit subset: a record is labeled when its source gives a label (-1 = unlabeled,
      # all -1 for multi-label; see data_pipelines/sources/base.py).
      return bool(np.all(np.asarray(record["label"]) >= 0))
    index = record[bad_records.SOURCE_INDEX]
    position = int(np.searchsorted(self.labeled_indices, index))
    return position < len(self.labeled_indices) and self.labeled_indices[position] == index

  def _views(self, ops: list[ops_lib.Op], record: dict[str, Any], count: int,
             rng: np.random.Generator) -> np.ndarray:
    features = _prepare_features(record, ops)
    return np.stack([ops_lib.set_channels(ops_lib.apply_ops(ops, features, rng)["image"],
                                          self.num_channels) for _ in range(count)])

  def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    if bad_records.BAD_RECORD in record:
      return record
    out = {"global_views": self._views(self.global_ops, record, self.num_global, rng)}
    if self.num_local > 0:
      out["local_views"] = self._views(self.local_ops, record, self.num_local, rng)
    out["labeled"] = np.float32(self._is_labeled(record))
    out.update(_metadata(record))
    return out


class EvalTransform:
  """(index, record) -> deterministic eval example; `index` seeds any randomness in the ops."""

  def __init__(self, ops: Sequence[ops_lib.Op], num_channels: int, num_real: int):
    self.ops, self.num_channels, self.num_real = list(ops), num_channels, num_real

  def __call__(self, index: int, record: dict[str, Any]) -> dict[str, Any]:
    rng = np.random.default_rng(index % self.num_real)
    out = AugmentOne(self.ops, self.num_channels)(record, rng)
    out["id"] = str(record.get("id", ""))
    out["valid"] = np.bool_(index < self.num_real)
    return out


def check_labeled_indices(labeled_indices: Any, num_records: int) -> np.ndarray:
  """Sorted unique int64 source indices, or a ValueError naming the problem."""
  indices = np.asarray(labeled_indices)
  if indices.ndim != 1 or not (indices.size == 0 or np.issubdtype(indices.dtype, np.integer)):
    hint = (" (a boolean mask? pass np.flatnonzero(mask))" if indices.dtype == np.bool_ else "")
    raise ValueError("labeled_indices must be a 1-D integer array of source indices, e.g. from "
                     "data_pipelines.subset.subset_indices; got dtype "
                     f"{indices.dtype}, shape {indices.shape}{hint}")
  indices = np.unique(indices.astype(np.int64))
  if indices.size and (indices[0] < 0 or indices[-1] >= num_records):
    raise ValueError(f"labeled_indices must lie in [0, {num_records}) (the source has "
                     f"{num_records} records); got values from {indices[0]} to {indices[-1]}")
  return indices


def check_intensity_only(ops: Sequence[ops_lib.Op], what: str) -> list[ops_lib.Op]:
  """The corrupted view's ops must keep the geometry: the clean view is its pixel target."""
  ops = ops_lib.parse_ops(ops)
  geometric = [op for op in ops if type(op).__module__ == ops_geometric.__name__]
  if geometric:
    raise ValueError(
        f"{what}: the corrupted view must have the clean view's geometry (the clean view is its "
        f"pixel-wise reconstruction target), so its ops must not move pixels; got geometric "
        f"ops {geometric}. Put crops and flips in clean_ops.")
  masking = [op for op in ops if isinstance(op, ops_masking.GroupMask)]
  if masking:
    raise ValueError(f"{what}: give the group mask through make_gmml_dataset's mask arguments "
                     f"(patch_size, coverage, ...), not as an op; got {masking}")
  return ops


class AugmentGMML:
  """Record + rng -> clean view, corrupted view (same geometry), patch mask, fill kind.

  Draw order per record (fixed, so resume is exact): clean ops, corrupted-view intensity ops,
  group mask (target, groups, fill kind, donor offset, noise).
  """

  def __init__(self, clean_ops: Sequence[ops_lib.Op], corrupt_ops: Sequence[ops_lib.Op],
               mask_op: ops_masking.GroupMask, num_channels: int):
    self.clean_ops, self.corrupt_ops = list(clean_ops), list(corrupt_ops)
    self.mask_op, self.num_channels = mask_op, num_channels

  def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    if bad_records.BAD_RECORD in record:
      return record
    clean = ops_lib.apply_ops(self.clean_ops, _prepare_features(record, self.clean_ops), rng)
    # Masking runs on the source's own channels (grey noise on a grey image), before the
    # channel repetition; the corrupted view's ops see the clean image only.
    corrupted = ops_lib.apply_ops(self.corrupt_ops, {"image": clean["image"]}, rng)
    corrupted = self.mask_op(corrupted, rng)
    return {
        "clean": np.ascontiguousarray(ops_lib.set_channels(clean["image"], self.num_channels)),
        "corrupted": np.ascontiguousarray(
            ops_lib.set_channels(corrupted["image"], self.num_channels)),
        "mask": corrupted["gmml_mask"],
        "fill": corrupted["gmml_fill"],
        "gmml_donor_offset": corrupted["gmml_donor_offset"],
        **_metadata(record),
    }


class FillFromOtherImages:
  """Batch -> batch: other-image fills copied from the donor's clean view (host, numpy)."""

  def __init__(self, patch_size: int):
    self.patch_size = patch_size

  def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
    batch = dict(batch)
    offsets = batch.pop("gmml_donor_offset")
    batch["corrupted"] = ops_masking.fill_from_other_images(
        batch["corrupted"], batch["clean"], batch["mask"], batch["fill"], offsets,
        self.patch_size)
    return batch
