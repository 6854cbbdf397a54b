"""Data sources: Grain random-access sources that all return the same record format.

`build_source(data_config, split)` builds one from the `data` section of a config;
`default_data_config()` lists every key with its default (the built-in synthetic set, 64 px).
The record format and source attributes are described in `data_pipelines/sources/base.py`.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import ml_collections

from data_pipelines.sources.base import ConcatSource, IndexView, Source
from data_pipelines.sources.folder import FolderSource, parse_columns, split_by_patient
from data_pipelines.sources.synthetic import SyntheticCXR

SOURCES = ("synthetic", "medmnist", "folder", "tfds", "array_record")


def default_data_config() -> ml_collections.ConfigDict:
  """Every `data` key with its default: the built-in synthetic CXR set at 64 px.

  Returns:
    A ConfigDict (unlocked; the trainer configs lock it).
  """
  return ml_collections.ConfigDict(dict(
      source="synthetic",       # One of SOURCES.
      # medmnist: the .npz file. array_record: the converter's folder or a shard glob.
      path="",
      # folder: images are under `root`, listed by the CSV `manifest`.
      root="",
      manifest="",
      manifest_encoding="utf-8",  # The manifest's text encoding, e.g. "cp1252" (Excel, Windows).
      image_column="path",
      label_columns="label",    # One column (multi-class), several (multi-label), "" (none).
      classes="",               # Declared class names of a multi-class column, in order.
      patient_column="",
      split_column="",
      split_fractions="",       # "train=0.8,val=0.1,test=0.1": patient-level split when the
      split_seed=0,             #   manifest has no split column.
      mask_column="",
      site_column="",
      # tfds: a dataset prepared with file_format="array_record".
      tfds_name="",
      data_dir="",
      image_key="image",
      label_key="label",
      # synthetic: records per split; sites each split draws from ("all", "A", "B,C").
      num_examples=ml_collections.ConfigDict(dict(train=2048, val=512, test=512, unlabeled=8192)),
      image_size=64,
      sites=ml_collections.ConfigDict(dict(train="all", val="all", test="all", unlabeled="all")),
      seed=0,
      task="multilabel",        # synthetic: "multilabel", "any_finding" or one finding name.
      # All file sources.
      num_channels=1,
      keep_bit_depth=False,
      skip_bad_records=False,
      # folder: decode large images at reduced size, the shorter side >= decode_size (JPEG by
      # DCT scaling, PNG / DICOM by a box filter after decoding); 0 = full resolution;
      # -1 = auto = 2 x image_size. See `resolve_decode_size`.
      decode_size=-1,
  ))


def resolve_decode_size(data_config: ml_collections.ConfigDict | Mapping[str, Any]) -> int:
  """`data.decode_size` in pixels: 0 (full resolution), the value given, or for -1 (auto)
  2 x `data.image_size`.

  Why 2 x image_size keeps the augmentations' quality: every recipe resizes to image_size, so
  detail beyond what its crops use is thrown away anyway. An eval view (shorter side resized to
  image_size / crop fraction, >= 0.875) and every training crop of at least 1/4 of the area are
  still downsampled. RandomResizedCrop's smallest crops (8% of the area, SimCLR's default; 20%
  in the cxr preset) are upsampled by up to 1.8x (1.1x), the same regime as SimCLR on ImageNet,
  whose images (~400 px on the shorter side) are about 1.8 x 224. A 2000 px radiograph at
  image_size 224 is then decoded at 500 px (JPEG: 1/4 DCT scale; PNG: 4 x 4 box means).
  """
  value = int(_get(data_config, "decode_size", -1))
  if value < -1:
    raise ValueError(f"data.decode_size={value}: expected -1 (auto), 0 (full resolution) or a "
                     "size in pixels")
  if value == -1:
    return 2 * int(_get(data_config, "image_size", 64))
  return value


def _get(config: Mapping[str, Any] | ml_collections.ConfigDict, key: str, default: Any = None):
  try:
    value = config[key]
  except (KeyError, AttributeError):
    return default
  return default if value is None else value


def _require(config, key: str, source: str, what: str) -> Any:
  value = _get(config, key)
  if value in (None, ""):
    raise ValueError(f"data.{key} is required for data.source='{source}' ({what})")
  return value


def _per_split(value: Any, split: str, default: Any) -> Any:
  """A scalar applies to every split; a mapping gives one value per split."""
  if isinstance(value, (Mapping, ml_collections.ConfigDict)):
    return value.get(split, value.get("train", default)) if hasattr(value, "get") else default
  return default if value is None else value


# Another dataset in a split name ("SPLIT@SOURCE:LOCATION"): the data key LOCATION sets.
OTHER_DATASET_LOCATION = {"medmnist": "path", "folder": "manifest", "array_record": "path",
                          "tfds": "tfds_name"}


def other_dataset_config(data_config, source: str, location: str, *, what: str
                         ) -> dict[str, Any]:
  """`data_config` reading another dataset: its source and location replaced (a folder's root
  becomes the manifest's folder), every other key (image size, channels, ...) kept.

  Raises:
    ValueError: an unknown source or an empty location, naming `what`.
  """
  if source not in OTHER_DATASET_LOCATION:
    raise ValueError(f"{what}: source {source!r} cannot be read as another dataset; expected "
                     f"one of {', '.join(OTHER_DATASET_LOCATION)} (SPLIT@SOURCE:LOCATION)")
  if not location:
    raise ValueError(f"{what}: no location after '{source}:' (SPLIT@SOURCE:LOCATION)")
  data = (data_config.to_dict() if isinstance(data_config, ml_collections.ConfigDict)
          else dict(data_config))
  data.update({"source": source, OTHER_DATASET_LOCATION[source]: location})
  if source == "folder":
    data["root"] = os.path.dirname(location)
  return data


def build_source(data_config: ml_collections.ConfigDict | Mapping[str, Any], split: str, *,
                 labels_optional: bool = False) -> Source:
  """Builds the source named by `data_config.source` for `split`.

  Args:
    data_config: the `data` section (see `default_data_config`).
    split: "train", "val", "test", "unlabeled" (synthetic), or any split the data has;
      "train+val" joins splits into one source (pretraining on every image but the test set's);
      "SPLIT@SOURCE:LOCATION" reads SPLIT of another dataset with this config's other keys, e.g.
      "train+train@medmnist:/data/adult_cxr.npz" (pretraining on two hospitals' images).
    labels_optional: a folder manifest without the label column is read unlabeled instead of
      being an error (pretraining needs only images).

  Returns:
    A source following the record format of data_pipelines/sources/base.py.

  Raises:
    ValueError: unknown source (lists the valid ones) or a missing key (names it).
  """
  if "+" in split:
    parts = [part.strip() for part in split.split("+")]
    if any(not part for part in parts) or len(set(parts)) != len(parts):
      raise ValueError(f"split {split!r}: expected distinct split names joined by '+', "
                       "e.g. 'train+val'")
    return ConcatSource([build_source(data_config, part, labels_optional=labels_optional)
                         for part in parts])
  name, at, where = split.partition("@")
  kind, colon, location = where.partition(":")
  if at and colon:
    return build_source(other_dataset_config(data_config, kind.strip(), location.strip(),
                                             what=f"split {split!r}"),
                        name.strip(), labels_optional=labels_optional)
  source = _get(data_config, "source", "synthetic")
  skip = bool(_get(data_config, "skip_bad_records", False))
  keep_bit_depth = bool(_get(data_config, "keep_bit_depth", False))
  if source == "synthetic":
    return SyntheticCXR(
        split=split,
        num_examples=int(_per_split(_get(data_config, "num_examples"), split, 1024)),
        image_size=int(_get(data_config, "image_size", 64)),
        sites=_per_split(_get(data_config, "sites"), split, "all"),
        seed=int(_get(data_config, "seed", 0)),
        task=_get(data_config, "task", "multilabel"))
  if source == "medmnist":
    from data_pipelines.sources.medmnist import MedMNISTSource
    path = _require(data_config, "path", source, "the MedMNIST .npz file")
    return MedMNISTSource(path, split, skip_bad_records=skip,
                          class_names=parse_columns(_get(data_config, "classes")) or None)
  if source == "folder":
    _require(data_config, "manifest", source, "the CSV listing the images")
    split_column = _get(data_config, "split_column", "") or None
    fractions = _get(data_config, "split_fractions", "")
    kwargs = dict(
        root=_get(data_config, "root", ""), manifest=_get(data_config, "manifest"),
        image_column=_get(data_config, "image_column", "path"),
        label_columns=_get(data_config, "label_columns", "label"),
        classes=parse_columns(_get(data_config, "classes")) or None,
        patient_column=_get(data_config, "patient_column", "") or None,
        split_column=split_column, mask_column=_get(data_config, "mask_column", "") or None,
        site_column=_get(data_config, "site_column", "") or None,
        num_channels=int(_get(data_config, "num_channels", 1)), keep_bit_depth=keep_bit_depth,
        skip_bad_records=skip, decode_size=resolve_decode_size(data_config),
        labels_optional=labels_optional,
        manifest_encoding=_get(data_config, "manifest_encoding", "utf-8"))
    if split_column:
      return FolderSource(split=split, **kwargs)
    if fractions:
      whole = FolderSource(split=None, **kwargs)
      splits = split_by_patient(whole, fractions, int(_get(data_config, "split_seed", 0)))
      if split not in splits:
        raise ValueError(f"split {split!r} is not in data.split_fractions={fractions!r}")
      return splits[split]
    if split not in ("train", "unlabeled", "all"):
      raise ValueError(f"split {split!r} asked of a folder manifest without splits: set "
                       "data.split_column (a column of split names) or data.split_fractions "
                       "(e.g. 'train=0.8,val=0.1,test=0.1')")
    return FolderSource(split=None, **kwargs)
  if source == "tfds":
    from data_pipelines.sources.tfds_source import TFDSSource
    return TFDSSource(_require(data_config, "tfds_name", source, "a TFDS dataset name"),
                      split=split, data_dir=_get(data_config, "data_dir", "") or None,
                      image_key=_get(data_config, "image_key", "image"),
                      label_key=_get(data_config, "label_key", "label"),
                      keep_bit_depth=keep_bit_depth)
  if source == "array_record":
    from data_pipelines.sources.array_record import ArrayRecordSource
    return ArrayRecordSource(
        _require(data_config, "path", source, "the converter's output folder or a shard glob"),
        split=split, keep_bit_depth=keep_bit_depth)
  raise ValueError(f"data.source={source!r} unknown; valid sources are: {', '.join(SOURCES)}")


__all__ = ["SOURCES", "Source", "IndexView", "ConcatSource", "SyntheticCXR", "FolderSource",
           "build_source", "default_data_config", "resolve_decode_size", "split_by_patient"]
