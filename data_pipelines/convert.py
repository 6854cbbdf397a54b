r"""Converts any source into ArrayRecord shards (+ JSON + index) for `source='array_record'`.

  python -m data_pipelines.convert --source=folder --root=/data/cxr --manifest=train.csv \
      --label_columns=nodule,effusion --split=train --out=/data/cxr_ar --num_shards=16

Every key of `data_pipelines.sources.default_data_config()` is a flag of the same name
(per-split keys of the synthetic set, `num_examples` and `sites`, take the value for --split).
Bad records (BadRecordError) are skipped, counted, listed in <split>.json and printed, unless
--strict. Images are stored as lossless PNG; 16-bit stays 16-bit with --keep_bit_depth. Images
keep their full resolution (the readers' automatic --decode_size=-1 is not applied here); a
positive --decode_size stores them reduced to that shorter side.
"""
from __future__ import annotations

import copy
import json
import os
import sys
import time
from typing import Sequence

import numpy as np
from absl import app, flags

from data_pipelines.errors import BadRecordError
from data_pipelines.sources import array_record, build_source, default_data_config

_SPLIT = flags.DEFINE_string("split", "train", "Split to convert.")
_OUT = flags.DEFINE_string("out", None, "Output folder (created).")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 1, "Number of ArrayRecord shards.")
_STRICT = flags.DEFINE_bool("strict", False, "Fail on the first bad record instead of skipping.")
_LIMIT = flags.DEFINE_integer("limit", 0, "Convert only the first N records (0 = all).")


def _define_data_flags():
  defaults = default_data_config()
  for key, value in defaults.items():
    if key in flags.FLAGS:
      continue
    if isinstance(value, bool):
      flags.DEFINE_bool(key, value, f"data.{key}")
    elif isinstance(value, int):
      flags.DEFINE_integer(key, value, f"data.{key}")
    elif isinstance(value, float):
      flags.DEFINE_float(key, value, f"data.{key}")
    elif hasattr(value, "items"):  # Per-split values: the flag gives the value for --split.
      flags.DEFINE_string(key, None, f"data.{key} for --split (default: the config's)")
    else:
      flags.DEFINE_string(key, value, f"data.{key}")


_define_data_flags()


def data_config_from_flags():
  config = default_data_config()
  for key, value in config.items():
    flag_value = flags.FLAGS[key].value
    if hasattr(value, "items"):
      if flag_value is not None:
        sub = {k: v for k, v in value.items()}
        cast = type(next(iter(sub.values())))
        sub[_SPLIT.value] = cast(flag_value)
        config[key] = type(value)(sub)
    else:
      config[key] = flag_value
  return config


def convert(data_config, split: str, out: str, num_shards: int = 1, strict: bool = False,
            limit: int = 0, log=print) -> dict:
  """Writes `split` of the source described by `data_config` as ArrayRecord shards.

  Args:
    data_config: the `data` config section (see default_data_config).
    split: split to convert.
    out: output folder.
    num_shards: number of shards (records are assigned in contiguous index ranges, so the
      reader sees them in source order).
    strict: raise on the first bad record instead of skipping it.
    limit: convert only the first `limit` records (0 = all).
    log: progress printer.

  Returns:
    The JSON info written next to the shards.

  Raises:
    BadRecordError: with strict=True, the first bad record.
  """
  from array_record.python.array_record_module import ArrayRecordWriter

  if int(data_config.get("decode_size", 0) or 0) < 0:
    # Auto reduction is for training reads: a converted corpus keeps its full resolution
    # unless --decode_size asks for a size.
    data_config = copy.deepcopy(data_config)
    data_config["decode_size"] = 0
  source = build_source(data_config, split)
  total = len(source) if not limit else min(limit, len(source))
  if num_shards < 1:
    raise ValueError(f"--num_shards must be >= 1, got {num_shards}")
  num_shards = max(1, min(num_shards, total))
  os.makedirs(out, exist_ok=True)
  for old in os.listdir(out):  # A re-run must not leave shards of a previous shard count.
    if old.startswith(f"{split}.array_record-"):
      os.remove(os.path.join(out, old))
  paths = [os.path.join(out, array_record.shard_name(split, k, num_shards))
           for k in range(num_shards)]
  writers = [ArrayRecordWriter(p, "group_size:1") for p in paths]
  labels, sites, ids, skipped = [], [], [], list(getattr(source, "skipped", []))
  has_mask = False
  start = last = time.time()
  try:
    for i in range(total):
      try:
        example = source[i]
      except BadRecordError as e:
        if strict:
          raise
        skipped.append((e.record, e.reason))
        log(f"skipped bad record {e.record}: {e.reason}")
        continue
      writers[i * num_shards // total].write(array_record.encode_record(example))
      labels.append(np.asarray(example["label"]))
      sites.append(int(example["site"]))
      ids.append(example["id"])
      has_mask = has_mask or "lung_mask" in example
      if time.time() - last > 5 or i + 1 == total:
        last = time.time()
        log(f"{split}: {i + 1}/{total} read, {len(ids)} written, {len(skipped)} skipped, "
            f"{(i + 1) / max(last - start, 1e-9):.0f} records/s")
  finally:
    for writer in writers:
      writer.close()
  label_dtype = np.float32 if source.multi_label else np.int32
  label_array = (np.stack(labels).astype(label_dtype) if labels else
                 np.zeros((0, source.num_classes) if source.multi_label else (0,), label_dtype))
  np.savez(os.path.join(out, f"{split}.index.npz"), labels=label_array,
           sites=np.array(sites, np.int32), ids=np.array(ids, dtype=str))
  info = {"format_version": array_record.FORMAT_VERSION, "name": source.name, "split": split,
          "num_classes": source.num_classes, "multi_label": source.multi_label,
          "class_names": list(source.class_names), "num_channels": source.num_channels,
          "count": len(ids), "num_skipped": len(skipped), "skipped": skipped[:1000],
          "has_lung_mask": has_mask, "shards": [os.path.basename(p) for p in paths],
          "source": str(data_config.get("source", "")) if hasattr(data_config, "get") else ""}
  with open(os.path.join(out, f"{split}.json"), "w") as f:
    json.dump(info, f, indent=1)
  log(f"done: {split} of {source.name}: {len(ids)} records in {num_shards} shards at {out}, "
      f"{len(skipped)} bad records skipped, {time.time() - start:.1f} s")
  return info


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not _OUT.value:
    raise app.UsageError("--out is required (the output folder)")
  convert(data_config_from_flags(), _SPLIT.value, _OUT.value, _NUM_SHARDS.value,
          strict=_STRICT.value, limit=_LIMIT.value, log=lambda s: print(s, flush=True))


if __name__ == "__main__":
  app.run(main)
