"""ArrayRecord shards written by `python -m data_pipelines.convert`: the fast path on pods.

Layout of an output folder, per split:

  <split>.array_record-00000-of-00004 ...   records (msgpack maps, see `encode_record`)
  <split>.json                              name, class names, num_classes, multi_label,
                                            num_channels, count, skipped bad records, shards
  <split>.index.npz                         labels, sites and ids of every record, so `labels`
                                            and `ids` need no pass over the images

A record is a msgpack map {"image": PNG bytes (lossless; 16-bit kept as 16-bit PNG),
"label": int or list of floats, "id": str, "site": int, "lung_mask": PNG bytes (optional)}.
msgpack (not pickle) so that reading a corpus from elsewhere cannot run code.
"""
from __future__ import annotations

import re
from typing import Any

import msgpack
import numpy as np

from data_pipelines import decode
from data_pipelines.errors import BadRecordError
from data_pipelines.sources.base import Source, check_index
from data_pipelines import storage

FORMAT_VERSION = 1
_SHARD_SUFFIX = re.compile(r"\.array_record-\d{5}-of-\d{5}$")


def shard_name(split: str, shard: int, num_shards: int) -> str:
  return f"{split}.array_record-{shard:05d}-of-{num_shards:05d}"


def encode_record(example: dict[str, Any]) -> bytes:
  """One record dict (the source contract) -> msgpack bytes with PNG-encoded images."""
  label = example["label"]
  label = np.asarray(label)
  payload = {
      "image": decode.encode_png(example["image"]),
      "label": label.astype(np.float32).tolist() if label.ndim else int(label),
      "id": str(example["id"]),
      "site": int(example.get("site", 0)),
  }
  if "lung_mask" in example:
    payload["lung_mask"] = decode.encode_png(np.asarray(example["lung_mask"], np.uint8))
  return msgpack.packb(payload, use_bin_type=True)


def decode_record(data: bytes, record: str, multi_label: bool) -> dict[str, Any]:
  """msgpack bytes -> record dict (the source contract)."""
  try:
    payload = msgpack.unpackb(data, raw=False)
  except Exception as e:
    raise BadRecordError(record, f"corrupt record ({type(e).__name__}: {e})") from None
  image = decode.decode_image(payload["image"], record, keep_bit_depth=True)
  if multi_label:
    label = np.asarray(payload["label"], np.float32)
  else:
    label = np.int32(payload["label"])
  example = {"image": image, "label": label, "id": payload["id"], "site": np.int32(payload["site"])}
  if "lung_mask" in payload:
    example["lung_mask"] = decode.decode_image(payload["lung_mask"], record)[:, :, 0]
  return example


def resolve(path: str, split: str | None) -> tuple[list[str], str]:
  """DIR (+ split) or a shard glob -> (sorted shard paths, path of the split's JSON)."""
  if storage.isdir(path):
    if not split:
      raise ValueError(f"array_record path {path} is a folder: a split is needed")
    shards = storage.glob(storage.join(path, f"{split}.array_record-*"))
    info = storage.join(path, f"{split}.json")
  else:
    shards = storage.glob(path)
    if not shards:
      raise FileNotFoundError(f"no ArrayRecord shards match {path} (data.path)")
    info = _SHARD_SUFFIX.sub("", shards[0]) + ".json"
  if not shards:
    raise FileNotFoundError(f"no shards '{split}.array_record-*' in {path} (data.path); "
                            "write them with python -m data_pipelines.convert")
  if not storage.isfile(info):
    raise FileNotFoundError(f"{info} is missing: the converter writes it next to the shards")
  return shards, info


class ArrayRecordSource(Source):
  """Records from converter shards; needs nothing but the output folder."""

  def __init__(self, path: str, split: str | None = "train", keep_bit_depth: bool = False,
               name: str | None = None):
    """Opens the split's JSON and index (shards are opened lazily, per process).

    Args:
      path: the converter's output folder, or a glob of shard files.
      split: split name (needed when `path` is a folder).
      keep_bit_depth: keep 16-bit images as uint16 (default: min-max to uint8).
      name: source name; default from the JSON.

    Raises:
      FileNotFoundError: no shards or no JSON.
      ValueError: a JSON from a newer format, or counts that disagree with the shards.
    """
    self.shards, self.info_path = resolve(path, split)
    info = storage.read_json(self.info_path)
    if info.get("format_version", 0) > FORMAT_VERSION:
      raise ValueError(f"{self.info_path} has format_version {info['format_version']}; this "
                       f"reader understands <= {FORMAT_VERSION}")
    self.info = info
    self.name = name or info["name"]
    self.num_classes = int(info["num_classes"])
    self.multi_label = bool(info["multi_label"])
    self.class_names = list(info["class_names"])
    self.num_channels = int(info["num_channels"])
    self.keep_bit_depth = bool(keep_bit_depth)
    self.skipped = [tuple(s) for s in info.get("skipped", [])]
    index_path = self.info_path[:-len(".json")] + ".index.npz"
    with storage.open_npz(index_path) as index:
      self._labels = index["labels"]
      self._sites = index["sites"]
      self._ids = [str(i) for i in index["ids"]]
    if len(self._ids) != int(info["count"]):
      raise ValueError(f"{index_path} lists {len(self._ids)} records but {self.info_path} says "
                       f"{info['count']}")
    self._reader = None

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_reader"] = None  # File handles do not cross processes; reopened on first read.
    return state

  def _records(self):
    if self._reader is None:
      import grain
      self._reader = grain.sources.ArrayRecordDataSource(self.shards)
      if len(self._reader) != len(self._ids):
        raise ValueError(f"shards of {self.name} hold {len(self._reader)} records; the index has "
                         f"{len(self._ids)}")
    return self._reader

  @property
  def labels(self) -> np.ndarray:
    return self._labels

  @property
  def ids(self) -> list[str]:
    return list(self._ids)

  def __len__(self) -> int:
    return len(self._ids)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = check_index(index, len(self._ids), self.name)
    record = f"{self.name}[{index}] ({self._ids[index]})"
    example = decode_record(self._records()[index], record, self.multi_label)
    if example["image"].dtype == np.uint16 and not self.keep_bit_depth:
      example["image"] = np.rint(decode.min_max_to(example["image"], 255)).astype(np.uint8)
    return example
