"""The train loop every trainer runs, and the small pieces it is made of.

`train` is the one loop, pretraining and supervised alike: restore (own checkpoint, else the
trainer's initialisation) -> per step: next batch (interruptible), the jitted update, the log
window with its NaN stop, the hooks, the checkpoint -> preemption and clean-up. What differs
between objectives plugs in as hooks (`Hook`: the kNN monitor, GMML's reconstruction monitor,
validation with best-checkpoint keeping), the way big_vision loops over its evaluators.
`start_run` is the start-up both kinds share (config.json, writer, mesh, batch-size checks).

The pieces:

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
import time
from typing import Any, Callable, Iterable, NamedTuple

import jax
import ml_collections
import numpy as np
import optax
from clu import parameter_overview

from remedis_jax import checkpointing, optimizers, preemption, profiling, progress
from remedis_jax import run_config, sharding, writers
from remedis_jax.train_state import TrainSetup, merge_metrics


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


# ------------------------------------------------------------------------------ the loop
def start_run(config: ml_collections.ConfigDict, workdir: str, incompatible,
              batch_size_keys: Iterable[str] = ("batch_size",)):
  """(writer, mesh): WORKDIR/config.json and the hyper-parameters written, the mesh made and
  the batch sizes checked against it.

  The config is checked against a run already in the workdir before anything is written
  (remedis_jax/run_config.py refuses the `incompatible` changes, e.g. another architecture).

  Raises:
    run_config.IncompatibleRunConfigError: the workdir holds another kind of run.
    ValueError: a batch size not divisible by the number of devices or processes.
  """
  run_config.write(config, workdir, incompatible)
  writer = writers.create_writer(workdir, config.get("tensorboard_dir", ""))
  writer.write_hparams(writers.flatten_config(config.to_dict()))
  mesh = sharding.make_mesh(config.get("mesh"))
  logging.info("Mesh: %s", sharding.describe_mesh(mesh))
  for key in batch_size_keys:
    if config[key] % mesh.size or config[key] % jax.process_count():
      raise ValueError(f"config.{key}={config[key]} must be divisible by the number of devices "
                       f"({mesh.size}) and processes ({jax.process_count()})")
  return writer, mesh


class Hook:
  """Periodic work beside the update step; the loop calls, in this order:

  - `start(step, state)` once before the first step of this run (`step` 0: a fresh run; else
    the step it resumed from);
  - after every step, `run(step, state)` when `due(step, is_last)`, after the log window and
    before the checkpoint, its wall time counted as `name` in the progress report;
  - `end(step, state)` once after the last step, unless the run was preempted.
  A hook reads `state`; it never changes what is trained.
  """
  name = "hook"

  def start(self, step: int, state: Any) -> None:
    pass

  def due(self, step: int, is_last: bool) -> bool:
    return is_last

  def run(self, step: int, state: Any) -> None:
    pass

  def end(self, step: int, state: Any) -> None:
    pass


class PeriodicEvaluation(Hook):
  """Writes `evaluate(params, step)` every `every_steps` steps and at the last step.

  Args:
    name: its name in the progress report (and the log).
    every_steps: the interval.
    evaluate: `(params, step) -> {name: float}`.
    writer: the run's metric writer.
    prefix: put before every name written ("knn/").
    at_start: also evaluate the initial parameters at step 0 of a fresh run.
  """

  def __init__(self, name: str, every_steps: int, evaluate: Callable[[Any, int], Any],
               writer, *, prefix: str = "", at_start: bool = False):
    self.name, self.every_steps, self.evaluate = name, int(every_steps), evaluate
    self.writer, self.prefix, self.at_start = writer, prefix, at_start

  def start(self, step: int, state: Any) -> None:
    if self.at_start and step == 0:
      values = self._write(0, state)
      logging.info("%s at initialisation: %s", self.name, values)

  def due(self, step: int, is_last: bool) -> bool:
    return step % self.every_steps == 0 or is_last

  def run(self, step: int, state: Any) -> None:
    self._write(step, state)

  def _write(self, step: int, state: Any) -> dict[str, float]:
    values = dict(self.evaluate(state.params, step))
    self.writer.write_scalars(step, {f"{self.prefix}{k}": v for k, v in values.items()})
    return values


class LoopResult(NamedTuple):
  """How the loop ended, and what the run summary reports."""
  state: Any  # the state after the last step run
  steps: int
  total_steps: int
  start_step: int  # the step this run began at (0, or the checkpoint it resumed from)
  preempted: bool
  last_loss: float  # the last logged window's mean loss (NaN: no window logged)
  skipped_records: int  # bad records in the batches trained on, resumes included
  input_wait_ms_per_step: float  # after the first batch (pipeline start-up kept apart)
  first_batch_s: float | None
  checkpoint: str  # the newest checkpoint
  initialisation: str  # "resumed from ...", "scratch", or what the trainer's init loaded
  divergence_warnings: list[str]


def train(config: ml_collections.ConfigDict, workdir: str, *, setup: TrainSetup, mesh, writer,
          data_iterator, total_steps: int,
          init: Callable[[Any], tuple[Any, str]], hooks: Iterable[Hook] = ()) -> LoopResult:
  """Trains `setup.update_fn` to `total_steps`, resuming the run in `workdir` if there is one.

  Args:
    config: the run config (seed, batch_size, log_every_steps, checkpoint_every_steps,
      keep_checkpoints, async_checkpointing, progress_every_secs, profile).
    workdir: checkpoints go here; metrics.jsonl is the writer's.
    setup: the trainer's TrainSetup.
    mesh: the device mesh.
    writer: the run's metric writer.
    data_iterator: a Grain iterator of host batches (restored in place on resume; closed at
      the end).
    total_steps: the run's length.
    init: `fresh state -> (state, description)`: the trainer's initialisation of a run that has
      no checkpoint yet (pretrained weights; `(state, "scratch")` for none).
    hooks: periodic work (`Hook`), run in the given order.

  Returns:
    A LoopResult.

  Raises:
    FloatingPointError: non-finite loss or gradients in a logging window (those updates were
      skipped; the last good checkpoint is kept and named).
  """
  hooks = tuple(hooks)
  batch_sharding = sharding.batch_sharding(mesh)

  # ---- restore: own checkpoint -> the trainer's init
  manager = checkpointing.make_manager(workdir, max_to_keep=config.keep_checkpoints,
                                       asynchronous=config.get("async_checkpointing", True))
  restored = checkpointing.restore_latest(
      manager, checkpointing.abstract_with_shardings(setup.abstract_state, setup.state_shardings),
      data_iterator)
  if restored is not None:
    state, start_step = restored
    initialisation = f"resumed from {manager.directory}/{start_step}"
  else:
    start_step = 0
    state = sharding.create_sharded(setup.init_state, jax.random.key(config.seed),
                                    shardings=setup.state_shardings)
    state, initialisation = init(state)
  logging.info("Initialisation: %s", initialisation)
  if jax.process_index() == 0:
    parameter_overview.log_parameter_overview(state.params)
    logging.info("Optimiser masks:\n%s",
                 optimizers.describe_masks(state.params, setup.optimizer_config))

  # ---- loop
  report_progress, watcher, run_ahead, profiler, divergence, skipped_records = loop_tools(
      config, workdir, manager, writer, total_steps=total_steps, start_step=start_step,
      params=state.params)
  window_metrics = []  # per-step metric collections of the current logging window
  window_start, window_steps, input_wait = time.monotonic(), 0, 0.0
  # Run totals for the summary; the first batch (pipeline and worker start-up) is kept apart.
  run_input_wait, run_waited_steps, first_batch_wait = 0.0, 0, None
  step = start_step
  last_loss = float("nan")
  preempted = False
  try:
    for hook in hooks:
      with report_progress.timed(hook.name):
        hook.start(start_step, state)
    while step < total_steps:
      wait_start = time.monotonic()
      host_batch, position = next_batch(data_iterator, watcher)
      if host_batch is None:  # SIGTERM or Ctrl-C while waiting for input
        preempted = True
        save_at_interrupt(manager, step, state, position, {"skipped_records": skipped_records})
        break
      waited = time.monotonic() - wait_start
      input_wait += waited
      if first_batch_wait is None:
        first_batch_wait = waited
      else:
        run_input_wait += waited
        run_waited_steps += 1
      skipped_records += int(np.sum(host_batch.get("skipped_records", 0)))
      batch = sharding.shard_host_batch({k: host_batch[k] for k in setup.batch_keys},
                                        batch_sharding)
      with profiler.step(step + 1):
        state, step_metrics = setup.update_fn(state, batch)
      run_ahead.dispatched(step_metrics)  # waits for step - 1: at most 2 steps in flight
      step += 1
      profiler.after_step(step, step_metrics)
      window_steps += 1
      window_metrics.append(step_metrics)
      report_progress(step)
      preempted = watcher.reached(step)
      is_last = step == total_steps

      if step % config.log_every_steps == 0 or is_last or preempted:
        values = {f"train/{k}": float(v)
                  for k, v in merge_metrics(tuple(window_metrics)).compute().items()}
        elapsed = time.monotonic() - window_start
        values["train/learning_rate"] = float(setup.schedule(step - 1))
        values["train/input_wait_ms_per_step"] = 1000.0 * input_wait / window_steps
        values["train/input_wait_fraction"] = input_wait / max(elapsed, 1e-9)
        values["train/skipped_records"] = float(skipped_records)
        values["train/images_per_s"] = window_steps * config.batch_size / max(elapsed, 1e-9)
        values["train/param_norm"] = float(param_norm(state.params))
        writer.write_scalars(step, values)
        last_loss = values["train/loss"]
        divergence.update(step, last_loss, values["train/param_norm"])
        if values["train/nonfinite_steps"] > 0:
          raise FloatingPointError(
              f"non-finite loss or gradients in the {window_steps} steps before step {step} "
              f"(those updates were skipped). The last good checkpoint is kept: "
              f"{manager.directory}/{manager.latest_step()}. Lower the learning rate "
              "(config.optimizer.learning_rate), enable gradient clipping "
              "(config.optimizer.grad_clip_norm) or check the input data.")
        window_metrics, window_steps, input_wait = [], 0, 0.0
        window_start = time.monotonic()

      for hook in hooks:
        if hook.due(step, is_last):
          with report_progress.timed(hook.name):
            hook.run(step, state)

      if step % config.checkpoint_every_steps == 0 or is_last or preempted:
        checkpointing.save(manager, step, state, data_iterator, force=preempted or is_last,
                           counters={"skipped_records": skipped_records})
      if preempted:
        logging.warning("Preempted: saved step %d; rerun the same command to resume.", step)
        break
    if not preempted:
      for hook in hooks:
        hook.end(step, state)
  finally:
    profiler.stop()
    try:
      manager.wait_until_finished()
    finally:
      data_iterator.close()  # Grain's worker processes and shared memory, now (not at exit)
    watcher.close()
    writer.flush()
  checkpoint = f"{manager.directory}/{manager.latest_step()}"
  manager.close()
  return LoopResult(
      state=state, steps=step, total_steps=total_steps, start_step=start_step,
      preempted=preempted, last_loss=last_loss, skipped_records=skipped_records,
      input_wait_ms_per_step=1000.0 * run_input_wait / max(run_waited_steps, 1),
      first_batch_s=first_batch_wait, checkpoint=checkpoint, initialisation=initialisation,
      divergence_warnings=divergence.warnings)
