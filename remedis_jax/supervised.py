"""The supervised loop that fine-tuning and segmentation share: the counterpart of pretraining.py.

A trainer (train_finetune.py, train_segment.py) owns what is its own: the data and its subset,
the model and update step, the evaluator and the final evaluation. This module owns the rest, so
that resume, preemption, the NaN stop, validation and the best checkpoint behave the same in
both:

  the shared loop (remedis_jax/loop.py: restore (own checkpoint, else the trainer's init), log
  window, checkpoints, preemption) with validation as its hook (`BestCheckpoint`: at
  `num_evaluations` evenly spaced steps, or every `eval_every_steps`, keeping the best
  parameters in WORKDIR/best/) -> the best state, for the trainer's final evaluation.

It also builds what both trainers build alike: the state and jitted update step around the
trainer's loss (`build_setup`), the encoder from `config.model.init` (`load_encoder`), the
config checks they share (`check_common_config`) and the results' common part.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Callable, NamedTuple

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from data_pipelines import pipeline, presets, storage, stream
from data_pipelines import subset as subset_lib
from remedis_jax import checkpointing, initialization, loop, models, optimizers, run_config
from remedis_jax import run_files, sharding, workdir_lock
from remedis_jax.train_state import (TrainSetup, TrainState, apply_gradients, build_step,
                                     make_metrics_cls, put_host_tree)

BEST_DIR = "best"
RESULTS_FILE = run_files.RESULTS_FILE
SUBSET_MANIFEST_FILE = "subset_manifest.json"  # ids of the labeled records the run used
# BiT-HyperRule schedule by training-set size: (max examples, warm-up steps, total steps).
HYPERRULE = ((20_000, 100, 500), (500_000, 500, 10_000), (math.inf, 500, 20_000))


def check_common_config(config: ml_collections.ConfigDict, init_hint: str) -> str:
  """The checks both trainers need; returns `config.model.init` stripped.

  Raises:
    ValueError / FileNotFoundError: naming the config key, the value and the fix.
  """
  init = str(config.model.init or "").strip()
  if init.lower() not in initialization.SCRATCH and not storage.exists(init):
    raise FileNotFoundError(f"config.model.init={init!r} does not exist; give {init_hint}, or '' "
                            "to train from scratch")
  if config.batch_size <= 0 or config.eval_batch_size <= 0:
    raise ValueError(f"config.batch_size={config.batch_size} and config.eval_batch_size="
                     f"{config.eval_batch_size} must be positive")
  if config.get("num_evaluations", 0) <= 0 and config.eval_every_steps <= 0:
    raise ValueError(f"config.eval_every_steps={config.eval_every_steps} must be positive "
                     "(or set config.num_evaluations > 0)")
  return init


def build_setup(config: ml_collections.ConfigDict, mesh, model: nn.Module, *,
                total_steps: int, warmup_steps: int, frozen: tuple[str, ...],
                wrap_optimizer: Callable[[optax.GradientTransformation],
                                         optax.GradientTransformation] = lambda tx: tx,
                loss_fn: Callable, target_key: str, metric_names: tuple[str, ...],
                predict_fn: Callable) -> TrainSetup:
  """Optimiser, sharded state init and the jitted update step around a trainer's loss.

  Args:
    config: the run config (optimizer, batch_size, data.image_size and data.num_channels,
      param_sharding).
    mesh: the device mesh.
    model: the trainer's model; `model.init(rng, images, train=False)` gives its parameters.
    total_steps: schedule length.
    warmup_steps: linear warm-up length.
    frozen: regexes of parameters that do not train (added to `config.optimizer.frozen`).
    wrap_optimizer: applied to the optimiser before its state is built.
    loss_fn: `(params, images uint8, targets) -> (loss, {name: value})`, traced in the step.
    target_key: the batch entry passed to `loss_fn` as targets.
    metric_names: what `loss_fn` returns (the step adds grad_norm, param_norm and
      nonfinite_steps).
    predict_fn: the trainer's jitted `(params, images) -> probabilities`.

  Returns:
    A TrainSetup; its update step skips a non-finite update and counts it in
    `nonfinite_steps`.
  """
  tx, schedule, opt_config = optimizers.from_run_config(
      config, total_steps=total_steps, warmup_steps=warmup_steps, frozen=frozen)
  tx = wrap_optimizer(tx)
  image_shape = (config.data.image_size, config.data.image_size, config.data.num_channels)

  def init_state(rng):
    params = dict(model.init(rng, jnp.zeros((1,) + image_shape, jnp.float32),
                             train=False)["params"])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  metrics_cls = make_metrics_cls(tuple(metric_names) + ("grad_norm", "param_norm"))

  def update_fn(state: TrainState, batch: dict[str, jax.Array]):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch["image"], batch[target_key])
    state, metrics = apply_gradients(state, tx, loss, grads, metrics)
    return state, metrics_cls.single_from_model_output(**metrics)

  abstract_state, state_shardings, update_fn = build_step(
      init_state, update_fn, mesh, param_sharding=config.get("param_sharding", "replicate"))
  return TrainSetup(model, tx, schedule, opt_config, init_state, abstract_state, state_shardings,
                    update_fn, batch_keys=("image", target_key), predict_fn=predict_fn)


def load_encoder(config: ml_collections.ConfigDict, state: TrainState, setup: TrainSetup):
  """`state` with its encoder from `config.model.init`, and what was loaded (None: scratch,
  `state` unchanged).

  Raises:
    ValueError: the weights do not fit the encoder (merge_params names every key).
  """
  loaded = initialization.load_init(config.model.init, config.model.name,
                                    stem=config.model.get("stem", "bit"))
  if loaded is None:
    return state, None
  params = dict(state.params)
  params["encoder"] = put_host_tree(
      models.merge_params(loaded.encoder, setup.abstract_state.params["encoder"]),
      setup.state_shardings.params["encoder"])
  return state.replace(params=params), loaded


@flax.struct.dataclass
class BestState:
  """What WORKDIR/best/ holds: the best parameters, their step and validation value."""
  step: jax.Array
  value: jax.Array
  params: Any


def improved(value: float, best: float) -> bool:
  """Whether `value` beats `best` (higher is better; a non-finite value never does)."""
  return math.isfinite(value) and (not math.isfinite(best) or value > best)


def run(config: ml_collections.ConfigDict, workdir: str, check_config: Callable[[Any], Any],
        train_and_evaluate: Callable[..., dict[str, Any]]) -> dict[str, Any]:
  """A trainer's entry point: `checked = check_config(config)` before anything is built, then
  the finished run's results, or `train_and_evaluate(config, workdir, start_time, checked)`
  under the workdir lock.

  Raises:
    What `check_config` raises (ValueError / FileNotFoundError naming the key); what
    `train_and_evaluate` raises; workdir_lock.WorkdirInUseError: another live run holds the
    workdir; run_config.IncompatibleRunConfigError: the workdir's run (finished or not) was
    another model, data or labeled subset (its config.json names them).
  """
  checked = check_config(config)
  start_time = time.time()
  workdir = storage.absolute(workdir)
  finished = read_results(workdir)
  if finished is not None:
    # Not another run's results under this config's name; nothing is written here.
    run_config.check(config, workdir, run_config.SUPERVISED_INCOMPATIBLE)
    logging.info("%s/%s exists: the run is finished; returning its results.", workdir,
                 RESULTS_FILE)
    return finished
  with workdir_lock.WorkdirLock(workdir):
    return train_and_evaluate(config, workdir, start_time, checked)


def start(config: ml_collections.ConfigDict, workdir: str):
  """(writer, mesh): the run's config and hyper-parameters written, batch sizes checked.

  The config is checked against a run already in the workdir before anything is written
  (remedis_jax/run_config.py: a change of model, data, labels or labeled subset is refused)."""
  return loop.start_run(config, workdir, run_config.SUPERVISED_INCOMPATIBLE,
                        batch_size_keys=("batch_size", "eval_batch_size"))


class TrainingStream(NamedTuple):
  """The labeled training subset, its input iterator and the run's schedule.

  `trained_on` is what the iterator reads: `source` itself, or what `training_stream`'s
  `train_on` made of it (distillation: every training record with a target)."""
  source: Any
  data_iterator: Any
  total_steps: int
  warmup_steps: int
  steps_per_epoch: float
  trained_on: Any = None


def training_stream(config: ml_collections.ConfigDict, full_train, workdir: str,
                    train_on: Callable[[Any], Any] | None = None) -> TrainingStream:
  """The `config.label_fraction` subset of `full_train` (its ids written to the workdir), the
  augmented input pipeline over it, and the schedule converted from its size.

  `train_on(subset) -> source`, when given, replaces the subset as what the pipeline reads and
  the schedule counts (distillation reads every training record); the manifest still lists the
  labeled subset."""
  train_source = subset_lib.subset(full_train, config.label_fraction, config.label_fraction_seed,
                                   stratify=config.label_fraction_stratify)
  if jax.process_index() == 0:
    train_source.write_manifest(storage.join(workdir, SUBSET_MANIFEST_FILE))
  logging.info("Labels: %d of %d training records (label_fraction=%g, seed %d); manifest %s",
               len(train_source), len(full_train), config.label_fraction,
               config.label_fraction_seed, storage.join(workdir, SUBSET_MANIFEST_FILE))
  train_ops = config.data.train_ops or presets.get_preset(config.data.preset, "finetune",
                                                          config.data.image_size)
  read = train_source if train_on is None else train_on(train_source)
  dataset = pipeline.make_train_dataset(
      read, batch_size=config.batch_size // jax.process_count(), ops=train_ops,
      options=stream.StreamOptions.from_config(config))
  total_steps, warmup_steps, steps_per_epoch = schedule_from_config(config, len(read))
  logging.info("Schedule: %d total steps (%d warm-up), %.2f steps/epoch of the %d training "
               "records read (%.1f epochs); validation at %d steps.", total_steps, warmup_steps,
               steps_per_epoch, len(read), total_steps / max(steps_per_epoch, 1e-9),
               len(loop.evaluation_steps(total_steps, config.get("num_evaluations", 0),
                                         config.eval_every_steps)))
  return TrainingStream(train_source, iter(dataset), total_steps, warmup_steps, steps_per_epoch,
                        read)


def eval_ops(config: ml_collections.ConfigDict):
  return config.data.eval_ops or presets.get_preset(config.data.preset, "eval",
                                                    config.data.image_size)


class Outcome(NamedTuple):
  """How the loop ended. `best` is None when it was preempted."""
  steps: int
  total_steps: int
  preempted: bool
  best: BestState | None
  initialisation: str
  divergence_warnings: list[str]


class BestCheckpoint(loop.Hook):
  """Validation at the run's evaluation steps, keeping the best parameters in WORKDIR/best/.

  Args:
    workdir: the run's workdir.
    setup: the trainer's setup (abstract state and shardings of the parameters).
    mesh: the device mesh.
    writer: the run's metric writer (`val/<name>` at each validation).
    validate: params -> validation metrics ({name: value}, `best_metric` among them).
    best_metric: the validation metric to maximise.
    eval_at: the steps after which validation runs (and always the last).
  """
  name = "validation"

  def __init__(self, workdir: str, *, setup: TrainSetup, mesh, writer,
               validate: Callable[[Any], dict[str, float]], best_metric: str,
               eval_at: frozenset[int]):
    self.writer, self.validate, self.best_metric, self.eval_at = (writer, validate, best_metric,
                                                                  eval_at)
    self.manager = checkpointing.make_manager(storage.join(workdir, BEST_DIR), max_to_keep=1,
                                              asynchronous=False, with_data=False)
    self.abstract = checkpointing.abstract_with_shardings(
        BestState(step=jax.ShapeDtypeStruct((), jnp.int32),
                  value=jax.ShapeDtypeStruct((), jnp.float32),
                  params=setup.abstract_state.params),
        BestState(step=sharding.replicated(mesh), value=sharding.replicated(mesh),
                  params=setup.state_shardings.params))
    self.best_value, self.best_step = -math.inf, -1

  def start(self, step: int, state) -> None:
    if step > 0:  # resumed: the best so far (a fresh run starts over)
      restored = checkpointing.restore_latest(self.manager, self.abstract)
      if restored is not None:
        self.best_value, self.best_step = float(restored[0].value), int(restored[0].step)

  def due(self, step: int, is_last: bool) -> bool:
    return step in self.eval_at or is_last

  def run(self, step: int, state) -> None:
    values = dict(self.validate(state.params))
    self.writer.write_scalars(step, {f"val/{k}": v for k, v in values.items()})
    value = values[self.best_metric]
    if improved(value, self.best_value) or self.best_step < 0:
      self.best_value, self.best_step = value, step
      best = BestState(step=jnp.asarray(step, jnp.int32), value=jnp.asarray(value, jnp.float32),
                       params=state.params)
      checkpointing.save(self.manager, step, best, force=True)
      self.manager.wait_until_finished()
      logging.info("Step %d: best validation %s so far, %.4f (kept in %s)", step,
                   self.best_metric, value, self.manager.directory)

  def end(self, step: int, state) -> None:
    if self.best_step < 0:  # resumed at the last step before any best was kept
      self.run(step, state)

  def restore(self) -> BestState:
    """The best parameters kept (after a run that was not preempted)."""
    best, _ = checkpointing.restore_latest(self.manager, self.abstract)
    return best

  def close(self) -> None:
    self.manager.close()


def train(config: ml_collections.ConfigDict, workdir: str, *, setup: TrainSetup, mesh, writer,
          stream: TrainingStream, init: Callable[[Any], tuple[Any, str]],
          validate: Callable[[Any], dict[str, float]], best_metric: str) -> Outcome:
  """Trains `setup.update_fn` for `stream.total_steps` in the shared loop (remedis_jax/loop.py),
  keeping the best validation checkpoint.

  Args:
    config: the run config (batch_size, log/eval/checkpoint intervals, keep_checkpoints, seed).
    workdir: checkpoints/ and best/ go here; an existing run there is resumed.
    setup: the trainer's setup.
    mesh: the device mesh.
    writer: the run's metric writer.
    stream: the training stream: its iterator of host batches (restored in place on resume)
      and the run's total steps.
    init: fresh state -> (initialised state, description): the trainer's pretrained weights.
    validate: params -> validation metrics ({name: value}, `best_metric` among them).
    best_metric: the validation metric to maximise.

  Returns:
    An Outcome; its `best` holds the best parameters unless the run was preempted.

  Raises:
    FloatingPointError: non-finite loss or gradients in a logging window.
  """
  eval_at = loop.evaluation_steps(stream.total_steps, config.get("num_evaluations", 0),
                                  config.eval_every_steps)
  best_checkpoint = BestCheckpoint(workdir, setup=setup, mesh=mesh, writer=writer,
                                   validate=validate, best_metric=best_metric, eval_at=eval_at)
  try:
    result = loop.train(config, workdir, setup=setup, mesh=mesh, writer=writer,
                        data_iterator=stream.data_iterator, total_steps=stream.total_steps,
                        init=init, hooks=[best_checkpoint])
    best = None if result.preempted else best_checkpoint.restore()
  finally:
    best_checkpoint.close()
  return Outcome(steps=result.steps, total_steps=result.total_steps, preempted=result.preempted,
                 best=best, initialisation=result.initialisation,
                 divergence_warnings=result.divergence_warnings)


def preempted_results(outcome: Outcome) -> dict[str, Any]:
  """What a trainer returns when the loop was preempted (nothing is written)."""
  return {"finished": False, "steps": outcome.steps, "total_steps": outcome.total_steps,
          "preempted": True}


def finish(workdir: str, results_format: str, outcome: Outcome, start_time: float,
           results: dict[str, Any], *, headline: str,
           table: Callable[[dict[str, Any]], str]) -> dict[str, Any]:
  """Writes WORKDIR/results.json (the common keys first, then the trainer's `results`; NaN and
  inf become null) and prints `headline` and `table(results)` on process 0; returns them."""
  results = storage.json_safe({
      "format": results_format, "finished": True, "steps": outcome.steps,
      "total_steps": outcome.total_steps, "wall_time_s": time.time() - start_time, **results})
  write_json(storage.join(workdir, RESULTS_FILE), results)
  if jax.process_index() == 0:
    print(f"{headline} ({time.time() - start_time:.1f} s)\n{table(results)}\n"
          f"  results        {workdir}/{RESULTS_FILE}", flush=True)
  return results


# ------------------------------------------------------------------ workdir and schedule
def schedule_from_config(config, num_examples: int) -> tuple[int, int, float]:
  """(total_steps, warmup_steps, steps_per_epoch), converted once from the labeled subset size.

  total_steps > 0 wins, then total_epochs > 0, else BiT-HyperRule by dataset size. An epoch is
  `num_examples` examples seen, so `total_epochs` E runs ceil(E x num_examples / batch_size)
  steps at any subset size: with 39 labels and batch 128, 100 epochs are 31 steps, not 100
  (a step holds more than one pass over such a subset). Warm-up: optimizer.warmup_steps >= 0 as
  given; -1 takes BiT-HyperRule's warm-up share of the schedule.
  """
  steps_per_epoch = num_examples / config.batch_size
  _, rule_warmup, rule_total = next(r for r in HYPERRULE if num_examples < r[0])
  if config.total_steps and config.total_steps > 0:
    total_steps = int(config.total_steps)
  elif config.total_epochs and config.total_epochs > 0:
    total_steps = loop.epochs_to_steps(config.total_epochs, num_examples, config.batch_size)
  else:
    total_steps = rule_total
  warmup = int(config.optimizer.warmup_steps)
  if warmup < 0:
    warmup = int(round(total_steps * rule_warmup / rule_total))
  return total_steps, min(warmup, total_steps), steps_per_epoch


def write_json(path: str, payload: Any) -> None:
  """Atomic JSON write (tmp + rename) on process 0; NaN/inf become null."""
  if jax.process_index() != 0:
    return
  storage.write_text(path, json.dumps(storage.json_safe(payload), indent=2, sort_keys=False,
                                     allow_nan=False))


def read_results(workdir: str) -> dict[str, Any] | None:
  """WORKDIR/results.json of a finished run, or None."""
  path = storage.join(workdir, RESULTS_FILE)
  if not storage.isfile(path):
    return None
  results = storage.read_json(path)
  return results if results.get("finished") else None
