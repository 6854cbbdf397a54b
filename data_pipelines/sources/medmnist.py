"""MedMNIST `.npz` files (keys train_images, train_labels, val_*, test_*), any resolution.

Images are (N, H, W) grayscale or (N, H, W, 3) RGB uint8; labels are (N, 1) class indices
(multi-class) or (N, K) 0/1 (multi-label, e.g. ChestMNIST, K = 14). The dataset flag
("pneumoniamnist", "chestmnist", ...) is taken from the file name (pneumoniamnist_224.npz ->
pneumoniamnist) and gives the class names where known.

Labels are validated at construction (they are all in memory): a multi-class label must be a
class id (a non-negative integer value; 1.0 counts, 0.5, -1 or NaN do not) inside the classes,
else it fails with the key, the row and the value, or -- with `skip_bad_records=True` -- the row is
dropped and counted in `source.skipped`.
"""
from __future__ import annotations

import os
import re
import zipfile
from typing import Any

import numpy as np

from data_pipelines.errors import BadRecordError
from data_pipelines import storage
from data_pipelines.sources.base import (Source, check_index, class_names_or_default,
                                         log_skipped)

# Class names of the MedMNIST v2 flags whose label order is documented by the dataset's INFO.
KNOWN_CLASSES = {
    "pneumoniamnist": ["normal", "pneumonia"],
    "chestmnist": ["atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule",
                   "pneumonia", "pneumothorax", "consolidation", "edema", "emphysema",
                   "fibrosis", "pleural", "hernia"],
    "breastmnist": ["malignant", "normal, benign"],
}
# Number of classes of other flags, so that out-of-range labels are caught.
KNOWN_NUM_CLASSES = {"pathmnist": 9, "dermamnist": 7, "octmnist": 4, "retinamnist": 5,
                     "bloodmnist": 8, "tissuemnist": 8, "organamnist": 11, "organcmnist": 11,
                     "organsmnist": 11}
SPLITS = ("train", "val", "test")


def flag_from_path(path: str) -> str:
  """"/x/pneumoniamnist_224.npz" -> "pneumoniamnist"."""
  stem = os.path.splitext(os.path.basename(path))[0].lower()
  return re.sub(r"_\d+$", "", stem)


class MedMNISTSource(Source):
  """One split of a MedMNIST-layout `.npz` file."""

  def __init__(self, path: str, split: str = "train", num_classes: int | None = None,
               class_names: list[str] | None = None, skip_bad_records: bool = False,
               name: str | None = None):
    """Opens the file and validates the split's labels.

    Args:
      path: the `.npz` file.
      split: "train", "val" or "test".
      num_classes: overrides the class count (default: known flag, else inferred).
      class_names: overrides the class names.
      skip_bad_records: drop rows whose label is out of range (counted in `skipped`) instead of
        raising.
      name: source name; default "<flag>/<split>".

    Raises:
      FileNotFoundError: no such file.
      KeyError: the file lacks `<split>_images` / `<split>_labels` (message lists its keys).
      ValueError: bad shapes, or labels out of range without skip_bad_records.
    """
    if not storage.isfile(path):
      raise FileNotFoundError(f"MedMNIST file {path} does not exist (data.path)")
    self.path = str(path)
    self.split = split
    self.flag = flag_from_path(path)
    self.name = name or f"{self.flag}/{split}"
    self.image_key, self.label_key = f"{split}_images", f"{split}_labels"
    with storage.open_npz(self.path) as npz:
      keys = sorted(npz.files)
      for key in (self.image_key, self.label_key):
        if key not in keys:
          raise KeyError(f"{self.path} has no key '{key}' (split {split!r}); keys are: "
                         f"{', '.join(keys)}")
      labels = np.asarray(npz[self.label_key])
      image_shape = _npy_shape(self.path, self.image_key)
      other_labels = [np.asarray(npz[f"{s}_labels"]) for s in SPLITS if f"{s}_labels" in keys]
    if labels.ndim == 1:
      labels = labels[:, None]
    if labels.ndim != 2:
      raise ValueError(f"{self.path}: '{self.label_key}' has shape {labels.shape}; expected (N, 1) "
                       "or (N, K)")
    if len(image_shape) not in (3, 4) or (len(image_shape) == 4 and image_shape[-1] not in (1, 3)):
      raise ValueError(f"{self.path}: '{self.image_key}' has shape {image_shape}; expected "
                       "(N, H, W) or (N, H, W, 3)")
    if image_shape[0] != labels.shape[0]:
      raise ValueError(f"{self.path}: {image_shape[0]} images but {labels.shape[0]} labels in "
                       f"split {split!r}")
    self.num_channels = 3 if len(image_shape) == 4 and image_shape[-1] == 3 else 1
    self.multi_label = labels.shape[1] > 1
    if self.multi_label:
      self.num_classes = labels.shape[1]
    elif num_classes is not None:
      self.num_classes = int(num_classes)
    elif class_names:
      self.num_classes = len(class_names)
    elif self.flag in KNOWN_CLASSES:
      self.num_classes = len(KNOWN_CLASSES[self.flag])
    elif self.flag in KNOWN_NUM_CLASSES:
      self.num_classes = KNOWN_NUM_CLASSES[self.flag]
    else:  # Unknown flag: every split's labels, so train and test agree on the class count.
      ids = [l[_is_class_id(l)] for l in other_labels]
      self.num_classes = int(max((int(i.max()) for i in ids if i.size), default=-1)) + 1
    self.class_names = class_names_or_default(
        class_names or KNOWN_CLASSES.get(self.flag), self.num_classes)
    if len(self.class_names) != self.num_classes:
      raise ValueError(f"{self.name}: {len(self.class_names)} class names for "
                       f"{self.num_classes} classes")

    if self.multi_label:
      bad = ~np.isin(labels, (0, 1)).all(axis=1)
      reason = lambda i: f"multi-hot label {labels[i].tolist()} has values other than 0/1"
    else:
      is_id = _is_class_id(labels[:, 0])
      bad = ~is_id | (labels[:, 0] >= self.num_classes)
      reason = lambda i: (
          f"label {labels[i, 0].item()!r} is not an integer class id" if not is_id[i] else
          f"label {int(labels[i, 0])} outside classes 0..{self.num_classes - 1}"
          f" ({', '.join(self.class_names)})")
    self.skipped = [(f"{self.label_key}[{i}]", reason(i)) for i in np.flatnonzero(bad)]
    if self.skipped and not skip_bad_records:
      record, why = self.skipped[0]
      raise BadRecordError(f"{self.path}: {record}",
                           f"{why}; {len(self.skipped)} bad rows in all (set "
                           "skip_bad_records=True to drop and count them)")
    log_skipped(self.name, self.skipped)
    self._rows = np.flatnonzero(~bad)
    if self.multi_label:
      self._labels = labels[self._rows].astype(np.float32)
    else:
      self._labels = labels[self._rows, 0].astype(np.int32)
    self._width = max(5, len(str(max(labels.shape[0] - 1, 0))))
    self._images = None  # Loaded on first access, in the process that reads.

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_images"] = None  # Workers reload from the file instead of pickling the array.
    return state

  def _image_array(self) -> np.ndarray:
    if self._images is None:
      with storage.open_npz(self.path) as npz:
        self._images = np.asarray(npz[self.image_key])
    return self._images

  @property
  def labels(self) -> np.ndarray:
    return self._labels

  @property
  def ids(self) -> list[str]:
    return [f"{self.split}/{r:0{self._width}d}" for r in self._rows]

  def __len__(self) -> int:
    return len(self._rows)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = check_index(index, len(self._rows), self.name)
    row = int(self._rows[index])
    image = self._image_array()[row]
    if image.ndim == 2:
      image = image[:, :, None]
    if image.dtype != np.uint8:
      record = f"{self.path}: {self.image_key}[{row}]"
      if np.issubdtype(image.dtype, np.floating) and image.max() <= 1.0:
        image = np.rint(image * 255)  # Some re-exports store [0, 1] floats.
      if image.min() < 0 or image.max() > 255:
        raise BadRecordError(record, f"{image.dtype} pixel values outside 0..255")
      image = image.astype(np.uint8)
    return {"image": np.ascontiguousarray(image), "label": np.copy(self._labels[index])[()],
            "id": f"{self.split}/{row:0{self._width}d}", "site": np.int32(0)}


def _is_class_id(values: np.ndarray) -> np.ndarray:
  """Elementwise: a non-negative integer value (1.0 counts; 0.5, -1, NaN do not)."""
  values = np.asarray(values)
  if values.dtype == np.bool_:
    return np.ones(values.shape, bool)
  if not np.issubdtype(values.dtype, np.number) or np.issubdtype(values.dtype, np.complexfloating):
    return np.zeros(values.shape, bool)
  if np.issubdtype(values.dtype, np.integer):
    return values >= 0
  with np.errstate(invalid="ignore"):
    return np.isfinite(values) & (values >= 0) & (values == np.floor(values))


def _npy_shape(path: str, key: str) -> tuple[int, ...]:
  """Shape of an array inside an .npz without loading it (reads the .npy header)."""
  with storage.open_file(path, "rb") as file, zipfile.ZipFile(file) as archive:
    with archive.open(f"{key}.npy") as f:
      version = np.lib.format.read_magic(f)
      if version == (1, 0):
        shape, _, _ = np.lib.format.read_array_header_1_0(f)
      else:
        shape, _, _ = np.lib.format.read_array_header_2_0(f)
  return tuple(shape)
