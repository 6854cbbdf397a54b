"""Where a run reports: TensorBoard + log (clu), a plain-text JSONL file, a terminal progress bar.

Only process 0 writes files; the other processes log to their own stderr.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Mapping

import jax
import numpy as np
from clu import metric_writers

METRICS_FILE = "metrics.jsonl"


def _to_python(value: Any) -> Any:
  value = np.asarray(value)
  return value.item() if value.ndim == 0 else value.tolist()


class JsonlWriter(metric_writers.MetricWriter):
  """Appends one JSON object per `write_scalars` call to `workdir/metrics.jsonl`.

  Plain text that a person can `tail -f` and a script (the sweeps, the tests) can read back
  without TensorBoard.
  """

  def __init__(self, path: str):
    self._path = path
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    self._file = open(path, "a", encoding="utf-8")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    record = {"step": int(step), "time": time.time()}
    record.update({k: _to_python(v) for k, v in scalars.items()})
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()

  def write_hparams(self, hparams: Mapping[str, Any]):
    self._file.write(json.dumps({"hparams": {k: str(v) for k, v in hparams.items()}}) + "\n")
    self._file.flush()

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


def create_writer(workdir: str) -> metric_writers.MetricWriter:
  """TensorBoard summaries + logging + metrics.jsonl on process 0; logging elsewhere."""
  if jax.process_index() != 0:
    return metric_writers.create_default_writer(just_logging=True)
  default = metric_writers.create_default_writer(workdir, asynchronous=False)
  return metric_writers.MultiWriter([default, JsonlWriter(os.path.join(workdir, METRICS_FILE))])


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """Reads back the scalar records of `workdir/metrics.jsonl` (hparams lines skipped)."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    records = [json.loads(line) for line in f if line.strip()]
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


class ProgressBar:
  """A one-line progress bar on an interactive terminal of process 0; silent otherwise.

  Non-interactive runs (CI, cluster logs) get periodic log lines from clu's ReportProgress
  instead, which do not fill log files with carriage returns.
  """

  def __init__(self, total_steps: int, initial_step: int = 0, stream=None):
    self._stream = stream or sys.stderr
    self._enabled = jax.process_index() == 0 and self._stream.isatty()
    self._total = max(total_steps, 1)
    self._initial = initial_step
    self._start = time.monotonic()
    self._last_draw = 0.0
    self._postfix = ""

  def set_postfix(self, text: str):
    self._postfix = text

  def update(self, step: int):
    if not self._enabled:
      return
    now = time.monotonic()
    if now - self._last_draw < 0.2 and step < self._total:
      return
    self._last_draw = now
    done = step - self._initial
    rate = done / max(now - self._start, 1e-9)
    eta = (self._total - step) / rate if rate > 0 else float("inf")
    width = 30
    filled = int(width * step / self._total)
    bar = "#" * filled + "-" * (width - filled)
    eta_text = f"{eta:6.0f}s" if eta != float("inf") else "   ?  "
    self._stream.write(
        f"\r[{bar}] {step}/{self._total} {rate:5.2f} step/s ETA {eta_text} {self._postfix}")
    if step >= self._total:
      self._stream.write("\n")
    self._stream.flush()

  def close(self):
    if self._enabled:
      self._stream.write("\n")
      self._stream.flush()
