"""Small pieces every train loop uses, whatever it trains.

- `RunAhead`: JAX dispatches steps asynchronously; without a bound the host runs ahead until
  something reads a value (the logging window's `float()`), and a SIGTERM handler only runs
  then. Waiting on step t-1 before dispatching step t+1 keeps at most two steps in flight: the
  device never idles (step t is queued while the host waits), and a preemption notice is acted
  on within about two steps plus the save, whatever `log_every_steps` is.
- `next_batch`: fetches the next host batch so that SIGTERM or Ctrl-C interrupts the wait at
  once (a stuck or slow input pipeline cannot delay the exit), with the iterator position taken
  just before, which is what a checkpoint at the current step must hold.
- `save_at_interrupt`: saves the current step with that position.
- `epochs_to_steps` and `evaluation_steps`: a schedule stated in epochs, and when validation
  runs, for loops whose length depends on the size of a (labeled) subset.
- `DivergenceMonitor`: a warning when the loss or the parameter norm blows up while staying
  finite (a runaway learning rate drives weights to 1e11 at chance-level loss; no NaN guard
  fires).
"""

from __future__ import annotations

import collections
import json
import logging
import math
from typing import Any, NamedTuple

import jax
import ml_collections
import optax

from remedis_jax import checkpointing, preemption, profiling, progress, writers


def epochs_to_steps(epochs: float, num_examples: int, batch_size: int) -> int:
  """The steps that show the model `epochs` x `num_examples` examples at `batch_size`.

  ceil, at least 1: the epochs a config states are the epochs that run, also when the subset
  is smaller than one batch (then one step holds several passes over it).
  """
  if epochs <= 0 or num_examples <= 0 or batch_size <= 0:
    raise ValueError(f"epochs={epochs}, num_examples={num_examples} and batch_size={batch_size} "
                     "must be positive")
  # The small tolerance keeps 3 epochs of 160 at batch 16 at 30 steps despite rounding.
  return max(math.ceil(epochs * num_examples / batch_size - 1e-9), 1)


def evaluation_steps(total_steps: int, num_evaluations: int = 0,
                     eval_every_steps: int = 0) -> frozenset[int]:
  """The steps after which validation runs: always the last one, and

  - `num_evaluations` > 0: that many evenly spaced steps, ceil(k x total / N) for k = 1..N
    (every step when the run is shorter than N), so that best-checkpoint selection has the same
    number of candidates at any label fraction;
  - else every `eval_every_steps`-th step.
  """
  if total_steps <= 0:
    return frozenset()
  if num_evaluations and num_evaluations > 0:
    count = min(int(num_evaluations), total_steps)
    steps = {math.ceil(k * total_steps / count) for k in range(1, count + 1)}
  elif eval_every_steps and eval_every_steps > 0:
    steps = set(range(eval_every_steps, total_steps + 1, eval_every_steps))
  else:
    raise ValueError("set num_evaluations or eval_every_steps to a positive number")
  return frozenset(steps | {total_steps})


class RunAhead:
  """Bounds how many dispatched train steps may be unfinished at once."""

  def __init__(self, max_in_flight: int = 2):
    if max_in_flight < 1:
      raise ValueError(f"max_in_flight must be >= 1; got {max_in_flight}")
    self._max_in_flight = max_in_flight
    self._pending = collections.deque()

  def dispatched(self, outputs: Any) -> None:
    """Call right after dispatching a step with (part of) its outputs, e.g. its metrics.

    Blocks until all but the newest `max_in_flight - 1` steps have finished.
    """
    self._pending.append(outputs)
    while len(self._pending) >= self._max_in_flight:
      jax.block_until_ready(self._pending.popleft())

  @property
  def in_flight(self) -> int:
    """Steps dispatched and possibly unfinished (after `dispatched` returned: at most max-1)."""
    return len(self._pending)


class IteratorSnapshot:
  """A Grain iterator position that `checkpointing.save` writes like a live iterator's."""

  def __init__(self, state: Any):
    self._state = state

  def get_state(self) -> bytes:
    # Grain's checkpoint handler writes `get_state().decode()` for non-Grain iterators.
    return json.dumps(self._state, indent=4).encode()


def next_batch(data_iterator, watcher: preemption.PreemptionWatcher):
  """(host batch, position before it), or (None, position) on SIGTERM or Ctrl-C while waiting."""
  position = data_iterator.get_state()
  try:
    with watcher.interruptible():
      batch = next(data_iterator)
  except preemption.InterruptedWhileWaiting:
    return None, position
  return batch, position


def save_at_interrupt(manager, step: int, state: Any, position: Any,
                      counters: dict[str, Any] | None = None) -> bool:
  """Saves `state` at `step` with the iterator `position` unless that step is already saved.

  For SIGTERM or Ctrl-C during the wait for a batch; logs what it did. Returns whether it saved.
  """
  if manager.latest_step() == step:
    logging.warning("Preempted before step %d: nothing new to save (the newest checkpoint is "
                    "step %d); rerun the same command to resume.", step + 1, step)
    return False
  checkpointing.save(manager, step, state, IteratorSnapshot(position), counters=counters,
                     force=True)
  logging.warning("Preempted: saved step %d; rerun the same command to resume.", step)
  return True


@jax.jit
def param_norm(params: Any) -> jax.Array:
  """Global L2 norm of all parameters (one compiled reduction, also for sharded params)."""
  return optax.tree.norm(params)


class DivergenceMonitor:
  """Warns (once per kind) when the loss or the parameter norm blows up but stays finite.

  Args:
    initial_param_norm: the parameter norm at the start of this run (after init or restore).
    norm_growth: warn when the norm exceeds this multiple of the initial one.
    loss_growth: warn when a logged loss exceeds this multiple of the first logged loss
      (plus 1, so that near-zero losses do not warn on noise).
  """

  def __init__(self, initial_param_norm: float, *, norm_growth: float = 100.0,
               loss_growth: float = 3.0):
    self.initial_param_norm = float(initial_param_norm)
    self.norm_growth, self.loss_growth = norm_growth, loss_growth
    self.first_loss = None
    self.warnings: list[str] = []
    self._warned = set()

  def _warn(self, kind: str, message: str) -> list[str]:
    if kind in self._warned:
      return []
    self._warned.add(kind)
    self.warnings.append(message)
    logging.warning("Divergence: %s", message)
    return [message]

  def update(self, step: int, loss: float, norm: float) -> list[str]:
    """Checks one logged window; returns the warnings issued now (each kind at most once)."""
    new = []
    if self.first_loss is None and math.isfinite(loss):
      self.first_loss = loss
    if (self.initial_param_norm > 0 and math.isfinite(norm)
        and norm > self.norm_growth * self.initial_param_norm):
      new += self._warn("param_norm", (
          f"at step {step} the parameter norm is {norm:.3g}, {norm / self.initial_param_norm:.0f}x "
          f"its {self.initial_param_norm:.3g} at the start: the learning rate is probably far "
          "too high (the run goes on; the loss can look flat while the weights run away)"))
    if (self.first_loss is not None and math.isfinite(loss)
        and loss > self.loss_growth * self.first_loss + 1.0):
      new += self._warn("loss", (
          f"at step {step} the loss is {loss:.4g}, up from {self.first_loss:.4g} in the first "
          "logged window: training is diverging (lower the learning rate, or clip gradients "
          "with config.optimizer.grad_clip_norm)"))
    return new


class LoopTools(NamedTuple):
  """What every train loop runs beside its step, built by `loop_tools`."""
  report_progress: progress.ReportProgress  # steps/s and ETA, to the log and writer
  watcher: preemption.PreemptionWatcher  # SIGTERM (agreed on by every process), Ctrl-C
  run_ahead: RunAhead  # at most two steps in flight
  profiler: profiling.StepProfiler  # config.profile's window
  divergence: DivergenceMonitor  # parameter norm warnings
  skipped_records: int  # bad records skipped so far, resumes included


def loop_tools(config: ml_collections.ConfigDict, workdir: str, manager, writer, *,
               total_steps: int, start_step: int, params: Any) -> LoopTools:
  """The loop's progress report, preemption watcher, run-ahead bound, profiler, divergence
  monitor and the skipped-record count saved with the checkpoint it resumes from.

  Also drops the records of metrics.jsonl that this run writes again: those of the steps after
  `start_step` that a killed run had logged after its last checkpoint.
  """
  dropped = writers.drop_records_after(writer, start_step)
  if dropped:
    logging.info("%s: dropped %d records of steps after %d, which this run trains again.",
                 writers.METRICS_FILE, dropped, start_step)
  return LoopTools(
      report_progress=progress.ReportProgress(
          num_train_steps=total_steps, writer=writer,
          every_secs=config.get("progress_every_secs", 60)),
      watcher=preemption.PreemptionWatcher(manager),
      run_ahead=RunAhead(max_in_flight=2),
      profiler=profiling.StepProfiler(config, config.get("tensorboard_dir") or workdir),
      divergence=DivergenceMonitor(float(param_norm(params))),
      skipped_records=int(checkpointing.read_counters(manager, start_step or None).get(
          "skipped_records", 0)))
