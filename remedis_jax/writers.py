"""Where a run reports: the log, TensorBoard event files and a plain-text JSONL file.

Written without TensorFlow: the event files are TensorBoard's own record format (its protocol
buffers and record framing, from the `tensorboard` package) written through
`data_pipelines.storage`, so a gs:// workdir (or any object store the storage layer reaches,
emulators included) gets them like any other file. The writer interface is clu's
(`write_scalars`, `write_hparams`, `flush`, `close`), whose own writers import TensorFlow.

Only process 0 writes files; the other processes log to their own stderr.
"""

from __future__ import annotations

import abc
import itertools
import json
import logging
import os
import socket
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.summary.writer import record_writer

from data_pipelines import storage
from remedis_jax import run_files

METRICS_FILE = run_files.METRICS_FILE
EVENT_FILE_PREFIX = "events.out.tfevents"
_event_file_counter = itertools.count()


class MetricWriter(abc.ABC):
  """What the loops write to: scalars per step and the run's hyperparameters once."""

  @abc.abstractmethod
  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Writes scalars (numbers or 0-d arrays) at `step`."""

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """Writes the run's (flattened) hyperparameters."""

  def flush(self) -> None:
    """Makes everything written so far visible to readers."""

  def close(self) -> None:
    self.flush()


class LoggingWriter(MetricWriter):
  """Scalars as one log line per call: `[step] name = value, ...`."""

  def write_scalars(self, step, scalars):
    text = ", ".join(f"{k} = {_format(v)}" for k, v in sorted(scalars.items()))
    logging.info("[%d] %s", step, text)

  def write_hparams(self, hparams):
    logging.info("[hyperparameters] %s", ", ".join(f"{k} = {v}" for k, v in
                                                   sorted(hparams.items())))


class TensorBoardWriter(MetricWriter):
  """A TensorBoard event file in `logdir` (local or gs://), one per writer.

  Scalars are summary values with `simple_value` (what TensorBoard's scalar dashboard and its
  event reader take); hyperparameters go to the HParams dashboard. Each `write_*` call ends in
  a flush: on an object store the event file is uploaded whole, so a reader always sees
  complete records.
  """

  def __init__(self, logdir: str):
    name = (f"{EVENT_FILE_PREFIX}.{int(time.time())}.{socket.gethostname()}.{os.getpid()}."
            f"{next(_event_file_counter)}.v2")
    self.path = storage.join(logdir, name)
    self._file = storage.BinaryAppender(self.path)
    self._records = record_writer.RecordWriter(self._file)
    self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

  def _write(self, event: event_pb2.Event) -> None:
    self._records.write(event.SerializeToString())
    self._file.flush()

  def write_scalars(self, step, scalars):
    values = [summary_pb2.Summary.Value(tag=str(k), simple_value=float(np.asarray(v)))
              for k, v in scalars.items()]
    self._write(event_pb2.Event(wall_time=time.time(), step=int(step),
                                summary=summary_pb2.Summary(value=values)))

  def write_hparams(self, hparams):
    values = {str(k): v if isinstance(v, (bool, int, float, str)) else str(v)
              for k, v in hparams.items()}
    self._write(event_pb2.Event(wall_time=time.time(), step=0,
                                summary=hparams_summary.hparams_pb(values)))

  def flush(self):
    self._file.flush()

  def close(self):
    self._file.close()


class MultiWriter(MetricWriter):
  """Every call goes to each of `writers`, in order."""

  def __init__(self, writers: Sequence[MetricWriter]):
    self.writers = tuple(writers)

  def write_scalars(self, step, scalars):
    for writer in self.writers:
      writer.write_scalars(step, scalars)

  def write_hparams(self, hparams):
    for writer in self.writers:
      writer.write_hparams(hparams)

  def flush(self):
    for writer in self.writers:
      writer.flush()

  def close(self):
    for writer in self.writers:
      writer.close()


def _format(value: Any) -> str:
  value = np.asarray(value)
  if value.ndim == 0 and np.issubdtype(value.dtype, np.floating):
    return f"{float(value):.6g}"
  return str(value.tolist())


def _to_python(value: Any) -> Any:
  value = np.asarray(value)
  return value.item() if value.ndim == 0 else value.tolist()


class JsonlWriter(MetricWriter):
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

  def flush(self):
    self._file.flush()

  def close(self):
    self._file.close()


def drop_records_after(writer: MetricWriter, step: int) -> int:
  """`JsonlWriter.drop_records_after` for `writer` or the JsonlWriter inside it (0 if none)."""
  if isinstance(writer, JsonlWriter):
    return writer.drop_records_after(step)
  return sum(drop_records_after(w, step) for w in getattr(writer, "writers", ()))


def create_writer(workdir: str, tensorboard_dir: str = "") -> MetricWriter:
  """The log, TensorBoard event files and metrics.jsonl on process 0; the log elsewhere.

  Args:
    workdir: where metrics.jsonl goes (a folder or a gs:// URL).
    tensorboard_dir: where the TensorBoard event files go; "" = the workdir. Both go through
      `data_pipelines.storage`: local folders and object-store URLs alike.
  """
  if jax.process_index() != 0:
    return LoggingWriter()
  return MultiWriter([LoggingWriter(), TensorBoardWriter(tensorboard_dir or workdir),
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
