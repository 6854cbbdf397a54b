"""A train loop's progress: steps/s, how far, ETA, and where the time went.

Every `every_secs` seconds (and at the last step) one log line, e.g.

  progress: 12.4 steps/s, 40.0% (400/1000), ETA 48s; knn 6.1%

and the same numbers as scalars (`steps_per_sec`, `timing/<name>_fraction`) to the run's
writer, so TensorBoard and metrics.jsonl show the speed over time. What clu's ReportProgress
reports, without its import of TensorFlow.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import time
from typing import Callable, Iterator


def format_duration(seconds: float) -> str:
  """12 -> '12s', 125 -> '2m05s', 7325 -> '2h02m'."""
  seconds = max(0, int(round(seconds)))
  if seconds < 60:
    return f"{seconds}s"
  if seconds < 3600:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class ReportProgress:
  """Call once per finished step; reports at most every `every_secs` seconds.

  The first call only starts the clock (the first step compiles the program and would skew the
  rate). Work run inside `with report.timed("name"):` (a kNN monitor, an evaluation) is reported
  as a fraction of the interval's wall time.
  """

  def __init__(self, *, num_train_steps: int, writer=None, every_secs: float | None = 60.0,
               clock: Callable[[], float] = time.monotonic):
    self.num_train_steps = int(num_train_steps)
    self.writer = writer
    self.every_secs = every_secs
    self._clock = clock
    self._last_step: int | None = None
    self._last_time = 0.0
    self._timings: dict[str, float] = collections.defaultdict(float)

  def __call__(self, step: int) -> bool:
    """Notes that `step` finished; returns whether it reported."""
    now = self._clock()
    if self._last_step is None:
      self._last_step, self._last_time = step, now
      self._timings.clear()
      return False
    elapsed = now - self._last_time
    due = (step >= self.num_train_steps
           or (self.every_secs is not None and elapsed >= self.every_secs))
    if not due or step <= self._last_step or elapsed <= 0:
      return False
    rate = (step - self._last_step) / elapsed
    remaining = max(self.num_train_steps - step, 0) / rate
    fractions = {name: spent / elapsed for name, spent in sorted(self._timings.items())}
    message = (f"progress: {rate:.3g} steps/s, {step / max(self.num_train_steps, 1):.1%} "
               f"({step}/{self.num_train_steps}), ETA {format_duration(remaining)}")
    if fractions:
      message += "; " + ", ".join(f"{name} {value:.1%}" for name, value in fractions.items())
    logging.info(message)
    if self.writer is not None:
      scalars = {"steps_per_sec": rate}
      scalars.update({f"timing/{name}_fraction": value for name, value in fractions.items()})
      self.writer.write_scalars(step, scalars)
    self._last_step, self._last_time = step, now
    self._timings.clear()
    return True

  @contextlib.contextmanager
  def timed(self, name: str) -> Iterator[None]:
    """Counts the wall time inside the block as `name` in the next report."""
    start = self._clock()
    try:
      yield
    finally:
      self._timings[name] += self._clock() - start
