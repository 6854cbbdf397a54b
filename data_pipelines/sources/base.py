"""What every source shares: the record contract, label helpers and index views.

A source is a Grain random-access data source (`__len__`, `__getitem__(int) -> dict`) that is
picklable and cheap to construct, so Grain worker processes can rebuild it. Every record is a
dict with

  image: np.ndarray (H, W, C), C in {1, 3}, uint8 (uint16 only with keep_bit_depth=True).
  label: np.int32 scalar class index (multi-class, -1 = unlabeled) or np.float32 (K,) multi-hot
         (multi-label, all -1 = unlabeled).
  id:    str, unique and stable.
  site:  np.int32 scalar (0 when unknown).
  lung_mask (optional): uint8 (H, W) in {0, 1}.

and every source has the attributes `name`, `num_classes`, `multi_label`, `class_names`,
`num_channels`, `labels` (all labels, without decoding an image) and `ids`.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np

from data_pipelines.errors import BadRecordError


class Source:
  """Base class holding the attributes of the record contract.

  Subclasses set `name`, `num_classes`, `multi_label`, `class_names`, `num_channels` and
  provide `labels`, `ids`, `__len__` and `__getitem__`. `skipped` lists (record, reason) for
  rows that were dropped at construction with `skip_bad_records=True`.
  """

  name: str = ""
  num_classes: int = 0
  multi_label: bool = False
  class_names: list[str] = []
  num_channels: int = 1
  skipped: list[tuple[str, str]]

  @property
  def labels(self) -> np.ndarray:
    raise NotImplementedError

  @property
  def ids(self) -> list[str]:
    raise NotImplementedError

  def __len__(self) -> int:
    raise NotImplementedError

  def __getitem__(self, index: int) -> dict[str, Any]:
    raise NotImplementedError

  def __repr__(self) -> str:
    kind = "multi-label" if self.multi_label else "multi-class"
    return (f"{type(self).__name__}(name={self.name!r}, n={len(self)}, "
            f"{kind}, num_classes={self.num_classes}, channels={self.num_channels})")


def unlabeled_label(num_classes: int, multi_label: bool) -> np.ndarray:
  """The label of an unlabeled record: int32 -1, or a float32 vector of -1."""
  if multi_label:
    return np.full((num_classes,), -1.0, np.float32)
  return np.int32(-1)


def check_index(index: int, length: int, what: str) -> int:
  """Python-style index check (negative indices count from the end)."""
  index = int(index)
  if index < 0:
    index += length
  if not 0 <= index < length:
    raise IndexError(f"{what}: index {index} out of range for {length} records")
  return index


def as_hwc(image: np.ndarray, record: str) -> np.ndarray:
  """Returns (H, W, C) with C in {1, 3}; raises BadRecordError on other shapes or zero size."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[:, :, None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise BadRecordError(record, f"image shape {image.shape} is not (H, W), (H, W, 1) or (H, W, 3)")
  if image.shape[0] == 0 or image.shape[1] == 0:
    raise BadRecordError(record, f"zero-size image {image.shape}")
  return image


def to_channels(image: np.ndarray, num_channels: int) -> np.ndarray:
  """Converts (H, W, 1) <-> (H, W, 3) so that every record of a source has the same C.

  RGB -> gray uses the ITU-R 601 luma weights (what PIL's convert("L") does), so a colour
  screenshot of a radiograph becomes the grayscale image it shows.
  """
  channels = image.shape[-1]
  if channels == num_channels:
    return image
  if num_channels == 3:
    return np.repeat(image, 3, axis=-1)
  weights = np.array([0.299, 0.587, 0.114], np.float64)
  gray = image.astype(np.float64) @ weights
  info = np.iinfo(image.dtype)
  return np.clip(np.rint(gray), info.min, info.max).astype(image.dtype)[:, :, None]


def class_names_or_default(names: Sequence[str] | None, num_classes: int) -> list[str]:
  if names:
    return [str(n) for n in names]
  return [f"class_{i}" for i in range(num_classes)]


class IndexView(Source):
  """A source restricted to `indices` of a parent source (subsets, patient splits).

  Keeps the record format and attributes of the parent; records are read from the parent, so a
  view pickles as (parent, indices).
  """

  def __init__(self, parent: Source, indices: np.ndarray, name: str | None = None):
    self.parent = parent
    self.indices = np.asarray(indices, np.int64)
    self.name = name or parent.name
    self.num_classes = parent.num_classes
    self.multi_label = parent.multi_label
    self.class_names = list(parent.class_names)
    self.num_channels = parent.num_channels
    self.skipped = list(getattr(parent, "skipped", []))

  @property
  def labels(self) -> np.ndarray:
    return np.asarray(self.parent.labels)[self.indices]

  @property
  def ids(self) -> list[str]:
    parent_ids = self.parent.ids
    return [parent_ids[i] for i in self.indices]

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = check_index(index, len(self.indices), self.name)
    return self.parent[int(self.indices[index])]


def log_skipped(name: str, skipped: list[tuple[str, str]]) -> None:
  """Logs rows dropped at construction, so a run states what it left out."""
  if not skipped:
    return
  logging.warning("%s: skipped %d bad records at construction; first: %s",
                  name, len(skipped), "; ".join(f"{r}: {why}" for r, why in skipped[:5]))


class ConcatSource(Source):
  """Several splits of one dataset read as one source, e.g. "train+val" for pretraining.

  SimCLR needs only images, so stage 2 of REMEDIS can read every split except the test split.
  All parts must agree on the class set, the task type and the channel count (checked); ids are
  kept as the parts give them (MedMNIST ids carry their split, "train/00012").
  """

  def __init__(self, parts: Sequence[Source], name: str | None = None):
    if not parts:
      raise ValueError("ConcatSource needs at least one source")
    first = parts[0]
    for part in parts[1:]:
      for attribute in ("num_classes", "multi_label", "num_channels"):
        if getattr(part, attribute) != getattr(first, attribute):
          raise ValueError(
              f"cannot concatenate {first.name} and {part.name}: {attribute} "
              f"{getattr(first, attribute)} vs {getattr(part, attribute)}")
    self.parts = list(parts)
    self.name = name or "+".join(part.name for part in parts)
    self.num_classes = first.num_classes
    self.multi_label = first.multi_label
    self.class_names = list(first.class_names)
    self.num_channels = first.num_channels
    self.skipped = [row for part in parts for row in getattr(part, "skipped", [])]
    self._offsets = np.cumsum([0] + [len(part) for part in parts])

  @property
  def labels(self) -> np.ndarray:
    return np.concatenate([np.asarray(part.labels) for part in self.parts])

  @property
  def ids(self) -> list[str]:
    return [example_id for part in self.parts for example_id in part.ids]

  def __len__(self) -> int:
    return int(self._offsets[-1])

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = check_index(index, len(self), self.name)
    part = int(np.searchsorted(self._offsets, index, side="right")) - 1
    return self.parts[part][index - int(self._offsets[part])]
