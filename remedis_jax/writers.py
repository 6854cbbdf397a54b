"""Where a run reports: TensorBoard + log (clu) and a plain-text JSONL file; progress lines come
from clu's ReportProgress (steps/s, ETA) in the loops.

Only process 0 writes files; the other processes log to their own stderr.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Mapping

import jax
import numpy as np
from clu import metric_writers

from remedis_jax import storage

METRICS_FILE = "metrics.jsonl"


def _to_python(value: Any) -> Any:
  value = np.asarray(value)
  return value.item() if value.ndim == 0 else value.tolist()


class JsonlWriter(metric_writers.MetricWriter):
  """Appends one JSON object per `write_scalars` call to `workdir/metrics.jsonl`.

  Plain text that a person can `tail -f` and a script (the sweeps, the tests) can read back
  without TensorBoard. Local or on an object store (`storage.Appender`).
  """

  def __init__(self, path: str):
    self._path = path
    self._file = storage.Appender(path)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    record = {"step": int(step), "time": time.time()}
    record.update({k: _to_python(v) for k, v in scalars.items()})
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()

  def write_hparams(self, hparams: Mapping[str, Any]):
    self._file.write(json.dumps({"hparams": {k: str(v) for k, v in hparams.items()}}) + "\n")
    self._file.flush()

  def drop_records_after(self, step: int) -> int:
    """Removes the records that a run resumed at `step` writes again; returns how many.

    A run killed after its last checkpoint (kill -9, a second Ctrl-C, a full disk) has written
    records for steps after it; the resumed run trains those steps again and would write them a
    second time. Records with a step after `step` go (all records when `step` is 0: the run
    starts over); hparams lines and unreadable lines stay. The file is replaced whole
    (`storage.write_text`: a temporary file renamed), never left half-written.
    """
    self._file.close()
    try:
      text = storage.read_text(self._path) if storage.exists(self._path) else ""
      kept, dropped = [], 0
      for line in text.splitlines(keepends=True):
        try:
          record = json.loads(line)
        except ValueError:
          record = None
        if (isinstance(record, dict) and isinstance(record.get("step"), int)
            and (record["step"] > step or step == 0)):
          dropped += 1
        else:
          kept.append(line)
      if dropped:
        storage.write_text(self._path, "".join(kept))
    finally:
      self._file = storage.Appender(self._path)
    return dropped

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def flush(self):
    self._file.flush()

  def close(self):
    self._file.close()


def drop_records_after(writer: metric_writers.MetricWriter, step: int) -> int:
  """`JsonlWriter.drop_records_after` for `writer` or the JsonlWriter inside it (0 if none)."""
  if isinstance(writer, JsonlWriter):
    return writer.drop_records_after(step)
  # clu's MultiWriter (what `create_writer` returns on process 0) keeps its writers here.
  return sum(drop_records_after(w, step) for w in getattr(writer, "_writers", ()))


def create_writer(workdir: str, tensorboard_dir: str = "") -> metric_writers.MetricWriter:
  """TensorBoard summaries + logging + metrics.jsonl on process 0; logging elsewhere.

  Args:
    workdir: where metrics.jsonl goes (a folder or a gs:// URL).
    tensorboard_dir: where the TensorBoard event files go; "" = the workdir. They are written
      through TensorFlow's file system, which reaches Cloud Storage itself (gs:// URLs as they
      are) but cannot be pointed at a local emulator.
  """
  if jax.process_index() != 0:
    return metric_writers.create_default_writer(just_logging=True)
  default = metric_writers.create_default_writer(tensorboard_dir or workdir, asynchronous=False)
  return metric_writers.MultiWriter([default,
                                     JsonlWriter(storage.join(workdir, METRICS_FILE))])


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """Reads back the scalar records of `workdir/metrics.jsonl` (hparams lines skipped).

  A line that is not a JSON object (cut short when a run was killed mid-write or the disk filled
  up) is skipped; how many were skipped is logged as a warning naming the file. The records
  before and after it still count.
  """
  path = storage.join(workdir, METRICS_FILE)
  if not storage.exists(path):
    return []
  records, unreadable = [], 0
  for line in storage.read_lines(path):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except ValueError:
      record = None
    if isinstance(record, dict):
      records.append(record)
    else:
      unreadable += 1
  if unreadable:
    logging.warning("%s: skipped %d unreadable line(s) (cut short by a killed run or a full "
                    "disk?); the other %d records are read.", path, unreadable, len(records))
  return [r for r in records if "step" in r]


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}: how hparams are written to TensorBoard."""
  flat = {}
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(flatten_config(value, name + "."))
    elif isinstance(value, (list, tuple)):
      flat[name] = str(value)
    else:
      flat[name] = value
  return flat
