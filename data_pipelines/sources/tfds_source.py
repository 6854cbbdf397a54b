"""TFDS datasets by name, read with `tfds.data_source` (ArrayRecord files, no TensorFlow).

The dataset must have been prepared with `file_format="array_record"` into `data_dir`.
Feature mapping: `image_key` (default "image") -> image ((H, W) or (H, W, C) uint8/uint16);
`label_key` (default "label") -> label: a ClassLabel gives a multi-class int32, a (K,) tensor or
Sequence(ClassLabel) a multi-label float32 multi-hot; no label feature -> unlabeled (-1). An
"id" / "image/filename" / "filename" string feature, when present, becomes the id (otherwise
"<split>/<index>"); a "site" int feature becomes the site.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from data_pipelines.errors import BadRecordError
from data_pipelines.sources.base import (Source, as_hwc, check_index, class_names_or_default,
                                         to_channels)

_ID_FEATURES = ("id", "image/filename", "filename", "image_id")


class TFDSSource(Source):
  """One split of a TFDS dataset prepared in ArrayRecord format."""

  def __init__(self, tfds_name: str, split: str = "train", data_dir: str | None = None,
               image_key: str = "image", label_key: str = "label", num_channels: int | None = None,
               keep_bit_depth: bool = False, name: str | None = None):
    """Opens the dataset's metadata (records are read lazily).

    Args:
      tfds_name: registered name, "name:version" or "name/config".
      split: TFDS split ("train", "test[:10%]", ...).
      data_dir: the TFDS data directory it was prepared into.
      image_key: image feature name.
      label_key: label feature name ("" for none).
      num_channels: 1 or 3; default: the image feature's channel count (1 when unknown).
      keep_bit_depth: keep uint16 images as uint16 (default: min-max to uint8).
      name: source name; default "<tfds_name>/<split>".

    Raises:
      ValueError: the dataset has no `image_key` feature (message lists the features), or it
        was not prepared in array_record format.
    """
    import tensorflow_datasets as tfds  # Heavy import: only when this source is used.

    self.tfds_name, self.split, self.data_dir = tfds_name, split, data_dir
    self.image_key, self.label_key = image_key, label_key
    self.keep_bit_depth = bool(keep_bit_depth)
    self.name = name or f"{tfds_name}/{split}"
    self.skipped = []
    try:
      source = tfds.data_source(tfds_name, split=split, data_dir=data_dir)
    except Exception as e:
      raise ValueError(f"cannot open TFDS dataset {tfds_name!r} split {split!r} in data_dir "
                       f"{data_dir!r} as a data source (it must be prepared with "
                       f"file_format='array_record'): {type(e).__name__}: {e}") from e
    features = source.dataset_info.features
    if image_key not in features:
      raise ValueError(f"TFDS dataset {tfds_name} has no feature '{image_key}' (data.image_column);"
                       f" features are: {', '.join(features.keys())}")
    self._length = len(source)
    image_shape = getattr(features[image_key], "shape", (None, None, 1))
    channels = image_shape[-1] if len(image_shape) == 3 and image_shape[-1] else 1
    self.num_channels = int(num_channels or (3 if channels in (3, 4) else 1))
    self.id_key = next((k for k in _ID_FEATURES if k in features), None)
    self.site_key = "site" if "site" in features else None

    label_feature = features[label_key] if label_key and label_key in features else None
    self.multi_label, self.num_classes, names = False, 0, None
    if label_feature is not None:
      if isinstance(label_feature, tfds.features.ClassLabel):
        self.num_classes, names = label_feature.num_classes, label_feature.names
      elif isinstance(label_feature, tfds.features.Sequence) and isinstance(
          label_feature.feature, tfds.features.ClassLabel):
        # A list of positive class indices -> multi-hot.
        self.multi_label = True
        self.num_classes, names = label_feature.feature.num_classes, label_feature.feature.names
      elif len(getattr(label_feature, "shape", ())) == 1 and label_feature.shape[0]:
        self.multi_label, self.num_classes = True, int(label_feature.shape[0])
      else:
        raise ValueError(f"TFDS feature '{label_key}' of {tfds_name} is {label_feature}; "
                         "expected a ClassLabel, Sequence(ClassLabel) or a (K,) 0/1 tensor")
      self._label_kind = type(label_feature).__name__
    else:
      self._label_kind = None
    self.class_names = class_names_or_default(names, self.num_classes)
    self._source = source
    self._labels = None

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_source"] = None  # Reopened in the worker (tfds.data_source is cheap to open).
    return state

  def _data_source(self):
    if self._source is None:
      import tensorflow_datasets as tfds
      self._source = tfds.data_source(self.tfds_name, split=self.split, data_dir=self.data_dir)
    return self._source

  def _convert_label(self, value) -> np.ndarray:
    if self._label_kind is None:
      return np.full((self.num_classes,), -1, np.float32) if self.multi_label else np.int32(-1)
    if self._label_kind == "Sequence":
      multi_hot = np.zeros((self.num_classes,), np.float32)
      multi_hot[np.asarray(value, np.int64)] = 1.0
      return multi_hot
    if self.multi_label:
      return np.asarray(value, np.float32).reshape(self.num_classes)
    return np.int32(value)

  @property
  def labels(self) -> np.ndarray:
    if self._labels is None:
      # Skips image decoding: reading the label column of a large corpus must not decode it.
      import tensorflow_datasets as tfds
      source = tfds.data_source(self.tfds_name, split=self.split, data_dir=self.data_dir,
                                decoders={self.image_key: tfds.decode.SkipDecoding()})
      labels = [self._convert_label(source[i][self.label_key] if self._label_kind else None)
                for i in range(len(source))]
      self._labels = (np.stack(labels) if labels else
                      np.zeros((0, self.num_classes) if self.multi_label else (0,)))
      self._labels = self._labels.astype(np.float32 if self.multi_label else np.int32)
    return self._labels

  @property
  def ids(self) -> list[str]:
    if self.id_key is None:
      return [self._default_id(i) for i in range(self._length)]
    import tensorflow_datasets as tfds
    source = tfds.data_source(self.tfds_name, split=self.split, data_dir=self.data_dir,
                              decoders={self.image_key: tfds.decode.SkipDecoding()})
    return [_to_str(source[i][self.id_key]) for i in range(len(source))]

  def _default_id(self, index: int) -> str:
    return f"{self.split}/{index:0{max(5, len(str(max(self._length - 1, 0))))}d}"

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = check_index(index, self._length, self.name)
    record = f"{self.tfds_name}/{self.split}[{index}]"
    try:
      features = self._data_source()[index]
    except Exception as e:
      raise BadRecordError(record, f"cannot read or decode the record ({type(e).__name__}: {e})") from None
    image = as_hwc(np.asarray(features[self.image_key]), record)
    if image.dtype == np.uint16 and not self.keep_bit_depth:
      from data_pipelines.decode import min_max_to
      image = np.rint(min_max_to(image, 255)).astype(np.uint8)
    elif image.dtype not in (np.uint8, np.uint16):
      raise BadRecordError(record, f"image dtype {image.dtype}; expected uint8 or uint16")
    label = self._convert_label(features[self.label_key] if self._label_kind else None)
    example_id = _to_str(features[self.id_key]) if self.id_key else self._default_id(index)
    site = np.int32(features[self.site_key]) if self.site_key else np.int32(0)
    return {"image": to_channels(image, self.num_channels), "label": label, "id": example_id,
            "site": site}


def _to_str(value) -> str:
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.ndarray):
    return _to_str(value.item())
  return str(value)
