r"""Converts any source into ArrayRecord shards (+ JSON + index) for `source='array_record'`.

  python -m data_pipelines.convert --source=folder --root=/data/cxr --manifest=train.csv \
      --label_columns=nodule,effusion --split=train --out=/data/cxr_ar --num_shards=16

Every key of `data_pipelines.sources.default_data_config()` is a flag of the same name
(per-split keys of the synthetic set, `num_examples` and `sites`, take the value for --split).
Bad records (BadRecordError) are skipped, counted, listed in <split>.json and printed, unless
--strict; more than --max_bad_record_share of the split (the readers' limit) is an error. Images
are stored as lossless PNG; 16-bit stays 16-bit with --keep_bit_depth. Images keep their full
resolution (the readers' automatic --decode_size=-1 is not applied here); a positive
--decode_size stores them reduced, the shorter side >= that size (448 for 224 px training).
--out may be a local folder or a gs:// bucket.

This process is the reference. With --beam_pipeline_options the same shards are written by an
Apache Beam pipeline, on this machine's cores or a cluster (data_pipelines/convert_beam.py,
docs/convert_at_scale.md). Both go through the same pieces: `shard_ranges` (contiguous index
ranges), `encode_shard` (one shard, moved to its name only complete) and `write_side_files`
(JSON and index from every shard's report).
"""
from __future__ import annotations

import copy
import io
import os
import socket
import tempfile
import time
import uuid
from typing import Any, Callable, Sequence

import numpy as np
from absl import app, flags

from data_pipelines import storage
from data_pipelines.errors import BadRecordError, TooManyBadRecordsError
from data_pipelines.sources import array_record, build_source, default_data_config


def define_flags() -> None:
  """The command's flags: the run's own, then one per `data` config field (`--source`,
  `--root`, ...). Defined only when the module runs as the command; importing the converter
  (the Beam workers, tests) defines none, so the two copies of this module that `python -m`
  makes never define a flag twice."""
  flags.DEFINE_string("split", "train", "Split to convert.")
  flags.DEFINE_string("out", None, "Output folder (created).")
  flags.DEFINE_integer("num_shards", 1, "Number of ArrayRecord shards.")
  flags.DEFINE_bool("strict", False, "Fail on the first bad record instead of skipping.")
  flags.DEFINE_integer("limit", 0, "Convert only the first N records (0 = all).")
  flags.DEFINE_float(
      "max_bad_record_share", 0.1,
      "More bad (skipped) records than this share of the split is an error, as in the readers.")
  flags.DEFINE_string(
      "beam_pipeline_options", None,
      "Run as an Apache Beam pipeline with these comma-separated options, e.g. "
      "'direct_num_workers=2,direct_running_mode=multi_processing' (this machine) or "
      "'runner=DataflowRunner,project=...,region=...' (a cluster); see "
      "docs/convert_at_scale.md. Unset: one process, no Beam.")
  _define_data_flags()


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


def data_config_from_flags():
  config = default_data_config()
  for key, value in config.items():
    flag_value = flags.FLAGS[key].value
    if hasattr(value, "items"):
      if flag_value is not None:
        sub = {k: v for k, v in value.items()}
        cast = type(next(iter(sub.values())))
        sub[flags.FLAGS.split] = cast(flag_value)
        config[key] = type(value)(sub)
    else:
      config[key] = flag_value
  return config


# The readers' default share of bad records (data_pipelines.pipeline.DEFAULT_MAX_BAD_RECORD_SHARE,
# config.data.max_bad_record_share): a folder that bad is more likely a wrong root or manifest
# than a few broken files. Kept here so that the converter imports neither Grain nor JAX.
DEFAULT_MAX_BAD_RECORD_SHARE = 0.1
# Bad records listed by name in <split>.json (all are counted).
MAX_LISTED_SKIPPED = 1000


def conversion_config(data_config):
  """`data_config` as the converter reads it: the readers' automatic reduction (-1) is off.

  Auto reduction is for training reads: a converted corpus keeps its full resolution unless a
  positive decode_size asks for a size.
  """
  if int(data_config.get("decode_size", 0) or 0) < 0:
    data_config = copy.deepcopy(data_config)
    data_config["decode_size"] = 0
  return data_config


def shard_ranges(total: int, num_shards: int) -> list[tuple[int, int]]:
  """[start, stop) of each shard: contiguous index ranges, record i in shard i * S // total.

  Contiguous ranges keep the source order across shards, so the reader sees the records in the
  order of the source. Asking for more shards than records gives one shard per record.

  Raises:
    ValueError: num_shards < 1.
  """
  if num_shards < 1:
    raise ValueError(f"--num_shards must be >= 1, got {num_shards}")
  num_shards = max(1, min(num_shards, total))
  bounds = [-(-k * total // num_shards) for k in range(num_shards + 1)]  # ceil(k * total / S)
  return list(zip(bounds[:-1], bounds[1:]))


def source_info(source) -> dict[str, Any]:
  """What <split>.json says about the source itself (the same for every shard)."""
  return {"name": source.name, "num_classes": int(source.num_classes),
          "multi_label": bool(source.multi_label), "class_names": list(source.class_names),
          "num_channels": int(source.num_channels)}


def prepare_output(out: str, split: str) -> None:
  """Creates `out` and removes the split's side files and shards of an earlier run.

  Without this a run that fails half-way would leave the old <split>.json beside a mix of new
  and old shards, which a reader could take for a complete corpus; with no JSON, it refuses.
  """
  storage.makedirs(out)
  stale = [storage.join(out, f"{split}{suffix}") for suffix in (".json", ".index.npz")]
  for path in stale + storage.glob(storage.join(out, f"{split}.array_record-*")):
    if storage.exists(path):
      storage.remove(path)


def encode_shard(source, split: str, out: str, shard: int, num_shards: int, start: int,
                 stop: int, *, strict: bool = False,
                 progress: Callable[[str], None] | None = None) -> dict[str, Any]:
  """Encodes records [start, stop) of `source` into one shard file under `out`.

  The shard is written to a local temporary file first (ArrayRecord's writer needs a local
  file) and only then moved or uploaded to its name (`storage.put_file`): a shard is never
  half-written at its final name, and writing it again (a retried work item) gives the same
  bytes under the same name.

  Args:
    source: the source to read.
    split: split name (the shard's file name starts with it).
    out: output folder, local or a URL (gs://).
    shard: this shard's index; num_shards: how many shards the split has.
    start: first record index; stop: one past the last.
    strict: raise on the first bad record instead of skipping it.
    progress: called with a progress line every few seconds and at the end.

  Returns:
    The shard's report: name, index range, count, bytes, seconds, the writing process
    (host:pid), and for the side files: ids, labels, sites, skipped (record, reason),
    has_lung_mask.

  Raises:
    BadRecordError: with strict=True, the first bad record.
  """
  from array_record.python.array_record_module import ArrayRecordWriter

  name = array_record.shard_name(split, shard, num_shards)
  final = storage.join(out, name)
  # Beside the output when it is local (the move is a rename), else in the local temp folder.
  folder = None if storage.is_url(out) else out
  if folder is not None:
    os.makedirs(folder, exist_ok=True)
  # A fresh name, created by the writer itself with the usual permissions (mkstemp's are 0600).
  local = os.path.join(folder or tempfile.gettempdir(), f".{name}.{uuid.uuid4().hex}.tmp")
  labels, sites, ids, skipped = [], [], [], []
  has_mask = False
  began = last = time.time()
  where = f"{split} shard {shard + 1}/{num_shards} (records {start}..{stop - 1})"
  try:
    writer = ArrayRecordWriter(local, "group_size:1")
    try:
      for i in range(start, stop):
        try:
          example = source[i]
        except BadRecordError as e:
          if strict:
            raise
          skipped.append((e.record, e.reason))
          continue
        writer.write(array_record.encode_record(example))
        labels.append(np.asarray(example["label"]))
        sites.append(int(example["site"]))
        ids.append(str(example["id"]))
        has_mask = has_mask or "lung_mask" in example
        if progress is not None and time.time() - last > 5:
          last = time.time()
          done = i + 1 - start
          progress(f"{where}: {done}/{stop - start} read, {len(skipped)} skipped, "
                   f"{done / max(last - began, 1e-9):.1f} records/s")
    finally:
      writer.close()
    size = os.path.getsize(local)
    storage.put_file(local, final)
  finally:
    if os.path.exists(local):
      os.remove(local)
  seconds = time.time() - began
  if progress is not None:
    progress(f"{where}: {stop - start}/{stop - start} read, {len(ids)} written, "
             f"{len(skipped)} skipped, {size / 1e6:.1f} MB, {seconds:.1f} s")
  return {"shard": shard, "name": name, "start": start, "stop": stop, "count": len(ids),
          "bytes": size, "seconds": round(seconds, 3),
          "writer": f"{socket.gethostname()}:{os.getpid()}", "ids": ids,
          "labels": np.stack(labels) if labels else None, "sites": sites, "skipped": skipped,
          "has_lung_mask": has_mask}


def write_side_files(out: str, split: str, info: dict[str, Any], reports: list[dict[str, Any]],
                     *, earlier_skipped: Sequence[tuple[str, str]] = (), data_source: str = "",
                     max_bad_record_share: float = DEFAULT_MAX_BAD_RECORD_SHARE
                     ) -> dict[str, Any]:
  """Writes <split>.index.npz and <split>.json from every shard's report, once.

  Args:
    out: output folder (local or URL).
    split: split name.
    info: `source_info` of the source.
    reports: every shard's `encode_shard` report, in any order.
    earlier_skipped: records the source dropped before any was read (bad manifest rows).
    data_source: data.source, recorded in the JSON.
    max_bad_record_share: more bad records than this share of all is an error.

  Returns:
    The JSON info.

  Raises:
    ValueError: shards missing from `reports`, or listed twice.
    TooManyBadRecordsError: more bad records than max_bad_record_share; nothing is written,
      so no reader takes the shards for a complete corpus.
  """
  reports = sorted(reports, key=lambda r: r["shard"])
  num_shards = len(reports)
  expected = [array_record.shard_name(split, k, num_shards) for k in range(num_shards)]
  if [r["name"] for r in reports] != expected:
    raise ValueError(f"{out}: shard reports {[r['name'] for r in reports]} are not the "
                     f"{num_shards} shards {split}.array_record-*-of-{num_shards:05d}")
  ids = [i for r in reports for i in r["ids"]]
  skipped = [tuple(s) for s in earlier_skipped] + [tuple(s) for r in reports
                                                   for s in r["skipped"]]
  seen = len(ids) + len(skipped)
  if skipped and len(skipped) > max_bad_record_share * seen:
    record, reason = skipped[0]
    raise TooManyBadRecordsError(
        f"{info['name']} ({split}): {len(skipped)} of its {seen} records are bad "
        f"({len(skipped) / seen:.1%}), more than --max_bad_record_share="
        f"{max_bad_record_share:g} allows; the first: {record}: {reason}. No {split}.json was "
        f"written to {out}, so its shards are not read. Fix the files (or the root / manifest), "
        "or raise --max_bad_record_share if losing them is acceptable.")
  label_dtype = np.float32 if info["multi_label"] else np.int32
  parts = [r["labels"] for r in reports if r["labels"] is not None]
  labels = (np.concatenate(parts).astype(label_dtype) if parts else
            np.zeros((0, info["num_classes"]) if info["multi_label"] else (0,), label_dtype))
  buffer = io.BytesIO()
  np.savez(buffer, labels=labels, sites=np.array([s for r in reports for s in r["sites"]],
                                                 np.int32),
           ids=np.array(ids, dtype=str))
  storage.write_bytes(storage.join(out, f"{split}.index.npz"), buffer.getvalue())
  result = {"format_version": array_record.FORMAT_VERSION, "name": info["name"], "split": split,
            "num_classes": info["num_classes"], "multi_label": info["multi_label"],
            "class_names": info["class_names"], "num_channels": info["num_channels"],
            "count": len(ids), "num_skipped": len(skipped),
            "skipped": [list(s) for s in skipped[:MAX_LISTED_SKIPPED]],
            "has_lung_mask": any(r["has_lung_mask"] for r in reports), "shards": expected,
            "source": data_source,
            "shard_reports": [{k: r[k] for k in ("name", "start", "stop", "count", "bytes",
                                                 "seconds", "writer")} | {
                                   "skipped": len(r["skipped"])} for r in reports]}
  storage.write_json(storage.join(out, f"{split}.json"), result, indent=1)
  return result


def convert(data_config, split: str, out: str, num_shards: int = 1, strict: bool = False,
            limit: int = 0, log=print,
            max_bad_record_share: float = DEFAULT_MAX_BAD_RECORD_SHARE) -> dict:
  """Writes `split` of the source described by `data_config` as ArrayRecord shards, in this
  process (the reference; `convert_beam.convert_with_beam` runs the same shards on Beam).

  Args:
    data_config: the `data` config section (see default_data_config).
    split: split to convert.
    out: output folder, local or a URL (gs://).
    num_shards: number of shards (records are assigned in contiguous index ranges, so the
      reader sees them in source order).
    strict: raise on the first bad record instead of skipping it.
    limit: convert only the first `limit` records (0 = all).
    log: progress printer.
    max_bad_record_share: more bad records than this share of the split is an error.

  Returns:
    The JSON info written next to the shards.

  Raises:
    BadRecordError: with strict=True, the first bad record.
    TooManyBadRecordsError: more bad records than max_bad_record_share.
  """
  data_config = conversion_config(data_config)
  source = build_source(data_config, split)
  total = len(source) if not limit else min(limit, len(source))
  ranges = shard_ranges(total, num_shards)
  prepare_output(out, split)
  start = time.time()
  reports = []
  for shard, (first, stop) in enumerate(ranges):
    report = encode_shard(source, split, out, shard, len(ranges), first, stop, strict=strict,
                          progress=log)
    for record, reason in report["skipped"]:
      log(f"skipped bad record {record}: {reason}")
    reports.append(report)
  info = write_side_files(out, split, source_info(source), reports,
                          earlier_skipped=getattr(source, "skipped", []),
                          data_source=str(data_config.get("source", "")),
                          max_bad_record_share=max_bad_record_share)
  log(f"done: {split} of {source.name}: {info['count']} records in {len(ranges)} shards at "
      f"{out}, {info['num_skipped']} bad records skipped, {time.time() - start:.1f} s")
  return info


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  flag = flags.FLAGS
  if not flag.out:
    raise app.UsageError("--out is required (the output folder)")
  log = lambda s: print(s, flush=True)
  args = dict(strict=flag.strict, limit=flag.limit, log=log,
              max_bad_record_share=flag.max_bad_record_share)
  if flag.beam_pipeline_options is not None:
    try:
      from data_pipelines import convert_beam  # Only Beam runs need apache-beam installed.
    except ModuleNotFoundError as error:
      if error.name != "apache_beam":
        raise
      raise app.UsageError(
          "--beam_pipeline_options needs Apache Beam, which is not installed: "
          "pip install -e \".[beam]\" (or leave the flag out to convert in this one "
          "process)") from error
    convert_beam.convert_with_beam(data_config_from_flags(), flag.split, flag.out,
                                   flag.num_shards, pipeline_options=flag.beam_pipeline_options,
                                   **args)
  else:
    convert(data_config_from_flags(), flag.split, flag.out, flag.num_shards, **args)


if __name__ == "__main__":
  define_flags()
  app.run(main)
