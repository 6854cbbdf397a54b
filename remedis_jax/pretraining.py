"""The pretraining loop every self-supervised objective shares, and its small helpers.

A trainer (train_simclr.py, train_cluster.py) owns what is specific to its objective: the model,
the pure update step, and which input pipeline feeds it. This module owns what is the same for
all of them, so that resume, preemption, NaN handling, metrics and the kNN monitor behave
identically whichever objective is trained:

  source (checked against the batch before the workdir is touched) -> workdir + config -> mesh
  -> trainer's dataset -> trainer's TrainSetup (model, optimiser, sharded state, jitted update
  step) -> restore (own checkpoint, else config.model.init, else scratch) -> loop (log window,
  kNN, checkpoints, preemption) -> run summary.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
from clu import parameter_overview

from data_pipelines import sources as data_sources
from data_pipelines import storage
from remedis_jax import checkpointing, initialization, loop, models, optimizers
from remedis_jax import run_config, sharding, workdir_lock, writers
from remedis_jax.train_state import merge_metrics, put_host_tree
from remedis_jax.evaluators import knn as knn_evaluator
from remedis_jax.evaluators import linear_probe


class TrainSetup(NamedTuple):
  """Everything the loop needs besides data: built by a trainer's `create_train_setup`."""
  model: nn.Module  # the encoder + projection head (kNN monitor and export read it)
  tx: optax.GradientTransformation
  schedule: Callable[[int], float]
  optimizer_config: ml_collections.ConfigDict
  init_state: Callable[[jax.Array], Any]
  abstract_state: Any  # a state with .step and .params (params["encoder"], params["head"])
  state_shardings: Any
  update_fn: Callable  # jitted (state, batch) -> (state, metrics); donates `state`
  batch_keys: tuple[str, ...] = ("views",)  # host batch entries the update step reads
  # Optional objective-specific monitor (e.g. GMML's held-out reconstruction): an object with
  # `every_steps` and `run(params, step) -> {name: float}`, run like the kNN monitor (at step 0
  # of a fresh run, every `every_steps` steps and at the last step); its values go to the
  # writer as logged.
  monitor: Any = None


def steps_from_config(config, num_examples: int) -> tuple[int, int, int]:
  """(total_steps, warmup_steps, steps_per_epoch): durations converted once, here."""
  steps_per_epoch = max(num_examples // config.batch_size, 1)
  if config.get("total_steps", -1) and config.total_steps > 0:
    total_steps = int(config.total_steps)
  elif config.get("total_epochs", -1) and config.total_epochs > 0:
    total_steps = int(round(config.total_epochs * steps_per_epoch))
  else:
    raise ValueError("set config.total_steps or config.total_epochs to a positive number")
  if config.optimizer.get("warmup_epochs", -1) is not None and \
      config.optimizer.get("warmup_epochs", -1) >= 0:
    warmup_steps = int(round(config.optimizer.warmup_epochs * steps_per_epoch))
  else:
    warmup_steps = int(config.optimizer.warmup_steps)
  return total_steps, min(warmup_steps, total_steps), steps_per_epoch


def make_optimizer(config, *, total_steps: int, warmup_steps: int):
  """(tx, schedule, resolved optimiser config) with the warm-up given in steps."""
  opt_config = config.optimizer.copy_and_resolve_references()
  with opt_config.unlocked():
    opt_config.warmup_steps = warmup_steps
    if "warmup_epochs" in opt_config:
      del opt_config["warmup_epochs"]
  tx, schedule = optimizers.make_optimizer(opt_config, total_steps=total_steps,
                                           batch_size=config.batch_size)
  return tx, schedule, opt_config


def write_run_config(config, workdir: str) -> None:
  """WORKDIR/config.json, after checking that a run already there may be resumed with `config`
  (remedis_jax/run_config.py: an architecture, resolution or objective change is refused before
  anything is written; other changes keep the earlier file as config.<UTC time>.json)."""
  run_config.write(config, workdir, run_config.PRETRAINING_INCOMPATIBLE)


def _restore_or_init(config, setup: TrainSetup, manager, data_iterator, rng):
  """(state, start_step, description): own checkpoint -> config.model.init -> scratch."""
  abstract_state, state_shardings = setup.abstract_state, setup.state_shardings
  restored = checkpointing.restore_latest(
      manager, checkpointing.abstract_with_shardings(abstract_state, state_shardings),
      data_iterator)
  if restored is not None:
    state, start_step = restored
    return state, start_step, f"resumed from {manager.directory}/{start_step}"
  state = sharding.create_sharded(setup.init_state, rng, shardings=state_shardings)
  loaded = initialization.load_init(config.model.init, config.model.name,
                                    stem=config.model.get("stem", "bit"))
  if loaded is None:
    return state, 0, "scratch"
  # Checked against the abstract tree (names, shapes; dtype cast), then placed with the run's
  # shardings: works for FSDP-sharded parameters across hosts, too. Parts the init does not
  # have (prototypes, classifier, probe) keep their fresh initialisation.
  params = dict(state.params)
  parts = ["encoder"] + (["head"] if loaded.head is not None and config.model.init_head else [])
  for part in parts:
    merged = models.merge_params(getattr(loaded, part), abstract_state.params[part])
    params[part] = put_host_tree(merged, state_shardings.params[part])
  state = state.replace(params=params)
  return state, 0, loaded.description + (" (with projection head)" if "head" in parts else "")


def check_distinct_batch(batch_size: int, num_examples: int, *, title: str, data: str,
                         reason: str) -> None:
  """Refuses a global batch larger than the dataset for a loss that needs distinct images.

  With 3 images and a batch of 64, every batch holds ~21 copies of each image: for NT-Xent an
  image's copies are its own negatives, so the loss sits at chance and nothing is learnt, while
  the run looks healthy.

  Raises:
    ValueError: `batch_size > num_examples`, naming both and the fix.
  """
  if batch_size > num_examples:
    copies = batch_size / max(num_examples, 1)
    raise ValueError(
        f"{title}: config.batch_size={batch_size} is larger than the pretraining data ({data}: "
        f"{num_examples} images), so every batch would hold about {copies:.0f} copies of each "
        f"image; {reason}, so copies break it (the loss stays at chance). Set "
        f"--config.batch_size=N with N <= {num_examples} (and divisible by the number of "
        "devices), or pretrain on more images.")


def run(config: ml_collections.ConfigDict, workdir: str, *, title: str,
        make_dataset: Callable[..., Any], create_setup: Callable[..., TrainSetup],
        dataset=None, distinct_batch_reason: str = "") -> dict[str, Any]:
  """Runs (or resumes) one pretraining job; returns its summary.

  Args:
    config: the run config (configs/pretrain_*.py).
    workdir: checkpoints, logs and summaries go here; an existing run there is resumed.
    title: the objective's name in messages ("SimCLR", "Clustering").
    make_dataset: `(config, source, local_batch_size) -> Grain dataset` of host batches.
    create_setup: `(config, mesh, source, total_steps=, warmup_steps=) -> TrainSetup`.
    dataset: optional dataset used instead of `make_dataset`'s (benchmarks use it to take
      input preprocessing out of the measurement). The source still sets the epoch length.
    distinct_batch_reason: why the objective's loss needs the images of a batch to be distinct
      (e.g. "its NT-Xent loss uses the other images of a batch as negatives"); when set and
      the batches come from the source (no `dataset`), a batch larger than the source is
      refused (`check_distinct_batch`) before the workdir is touched. "" (GMML's
      reconstruction): repeats in a batch are harmless.

  Returns:
    {steps, total_steps, preempted, final_loss, skipped_records, input_wait_ms_per_step,
     first_batch_s, wall_time_s, checkpoint, initialisation, divergence_warnings, ...}.

  Raises:
    workdir_lock.WorkdirInUseError: another live run holds the workdir.
    ValueError: a batch larger than the data for an objective that needs distinct images.
  """
  workdir = storage.absolute(workdir)
  # The source is opened before the lock and config.json: a run refused for its data (missing
  # files, too few images) leaves nothing in the workdir.
  source = data_sources.build_source(config.data, config.data.get("pretrain_split", "train"),
                                     labels_optional=True)
  if distinct_batch_reason and dataset is None:  # a given dataset's batches are the caller's
    check_distinct_batch(config.batch_size, len(source), title=title, data=source.name,
                         reason=distinct_batch_reason)
  with workdir_lock.WorkdirLock(workdir):
    return _run(config, workdir, source, title=title, make_dataset=make_dataset,
                create_setup=create_setup, dataset=dataset)


def _run(config, workdir, source, *, title, make_dataset, create_setup, dataset):
  start_time = time.time()
  write_run_config(config, workdir)
  writer = writers.create_writer(workdir, config.get("tensorboard_dir", ""))
  writer.write_hparams(writers.flatten_config(config.to_dict()))

  # ---- mesh
  mesh = sharding.make_mesh(config.get("mesh"))
  logging.info("Mesh: %s", sharding.describe_mesh(mesh))
  batch_sharding = sharding.batch_sharding(mesh)
  if config.batch_size % jax.process_count():
    raise ValueError(f"config.batch_size={config.batch_size} must be divisible by the number of "
                     f"processes ({jax.process_count()})")
  if config.batch_size % mesh.size:
    raise ValueError(f"config.batch_size={config.batch_size} must be divisible by the number of "
                     f"devices ({mesh.size})")
  local_batch_size = config.batch_size // jax.process_count()

  # ---- data (the source was opened by `run`)
  if dataset is None:
    dataset = make_dataset(config, source, local_batch_size)
  data_iterator = iter(dataset)
  total_steps, warmup_steps, steps_per_epoch = steps_from_config(config, len(source))
  logging.info("Data: %s, %d examples, %d steps/epoch, %d total steps (%d warm-up).",
               source.name, len(source), steps_per_epoch, total_steps, warmup_steps)

  # ---- model, optimiser, sharded state and the jitted update step
  setup = create_setup(config, mesh, source, total_steps=total_steps, warmup_steps=warmup_steps)
  update_fn, schedule = setup.update_fn, setup.schedule

  # ---- restore: own checkpoint -> config.model.init -> scratch
  manager = checkpointing.make_manager(
      workdir, max_to_keep=config.keep_checkpoints,
      asynchronous=config.get("async_checkpointing", True))
  state, start_step, init_description = _restore_or_init(
      config, setup, manager, data_iterator, jax.random.key(config.seed))
  logging.info("Initialisation: %s", init_description)
  if jax.process_index() == 0:
    parameter_overview.log_parameter_overview(state.params)
    logging.info("Optimiser masks:\n%s",
                 optimizers.describe_masks(state.params, setup.optimizer_config))

  # ---- evaluators
  knn = None
  if config.knn.every_steps > 0:
    knn = knn_evaluator.KnnEvaluator.from_config(config, setup.model, mesh)  # None: no labels

  # ---- loop
  report_progress, watcher, run_ahead, profiler, divergence, skipped_records = loop.loop_tools(
      config, workdir, manager, writer, total_steps=total_steps, start_step=start_step,
      params=state.params)
  window_metrics = []  # per-step metric collections of the current logging window
  input_wait = 0.0
  # Run totals for the summary; the first batch (pipeline and worker start-up) is kept apart.
  run_input_wait, run_waited_steps, first_batch_wait = 0.0, 0, None
  window_start, window_steps = time.monotonic(), 0
  step = start_step
  last_loss = float("nan")
  preempted = False
  try:
    if knn is not None and start_step == 0 and config.knn.get("at_start", False):
      with report_progress.timed("knn"):
        knn_values = dict(knn.run(state.params))
      writer.write_scalars(0, {f"knn/{k}": v for k, v in knn_values.items()})
      logging.info("kNN at initialisation: %s", knn_values)
    if setup.monitor is not None and start_step == 0:
      writer.write_scalars(0, setup.monitor.run(state.params, 0))
    while step < total_steps:
      wait_start = time.monotonic()
      host_batch, position = loop.next_batch(data_iterator, watcher)
      if host_batch is None:  # SIGTERM while waiting for input
        preempted = True
        loop.save_at_interrupt(manager, step, state, position,
                               {"skipped_records": skipped_records})
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
        state, step_metrics = update_fn(state, batch)
      run_ahead.dispatched(step_metrics)  # waits for step - 1: at most 2 steps in flight
      step += 1
      profiler.after_step(step, step_metrics)
      window_steps += 1
      window_metrics.append(step_metrics)
      report_progress(step)
      preempted = watcher.reached(step)
      is_last = step == total_steps

      if step % config.log_every_steps == 0 or is_last or preempted:
        train_metrics = merge_metrics(tuple(window_metrics))
        values = {f"train/{k}": float(v) for k, v in train_metrics.compute().items()}
        elapsed = time.monotonic() - window_start
        values["train/learning_rate"] = float(schedule(step - 1))
        values["train/input_wait_ms_per_step"] = 1000.0 * input_wait / window_steps
        values["train/input_wait_fraction"] = input_wait / max(elapsed, 1e-9)
        values["train/skipped_records"] = float(skipped_records)
        values["train/images_per_s"] = window_steps * config.batch_size / max(elapsed, 1e-9)
        values["train/param_norm"] = float(loop.param_norm(state.params))
        writer.write_scalars(step, values)
        last_loss = values["train/loss"]
        divergence.update(step, last_loss, values["train/param_norm"])
        if values["train/nonfinite_steps"] > 0:
          raise FloatingPointError(
              f"non-finite loss or gradients in the {window_steps} steps before step {step} "
              f"(those updates were skipped). The last good checkpoint is kept: "
              f"{manager.directory}/{manager.latest_step()}. Lower the learning rate, enable "
              "gradient clipping (config.optimizer.grad_clip_norm) or check the input data.")
        window_metrics, input_wait, window_steps = [], 0.0, 0
        window_start = time.monotonic()

      if knn is not None and (step % config.knn.every_steps == 0 or is_last):
        with report_progress.timed("knn"):
          knn_values = dict(knn.run(state.params))
        writer.write_scalars(step, {f"knn/{k}": v for k, v in knn_values.items()})

      if setup.monitor is not None and (step % setup.monitor.every_steps == 0 or is_last):
        writer.write_scalars(step, setup.monitor.run(state.params, step))

      if step % config.checkpoint_every_steps == 0 or is_last or preempted:
        checkpointing.save(manager, step, state, data_iterator, force=preempted or is_last,
                           counters={"skipped_records": skipped_records})
      if preempted:
        logging.warning("Preempted: saved step %d; rerun the same command to resume.", step)
        break
  finally:
    profiler.stop()
    try:
      manager.wait_until_finished()
    finally:
      data_iterator.close()  # Grain's worker processes and shared memory, now (not at exit)
    watcher.close()
    writer.flush()

  # ---- the read-out: a linear probe on the frozen encoder beside a random encoder's
  probe_values = {}
  if step == total_steps and not preempted:
    probe = linear_probe.LinearProbe.from_config(config, setup.model, mesh)
    if probe is not None:
      with report_progress.timed("linear_probe"):
        random_state = sharding.create_sharded(setup.init_state, jax.random.key(config.seed),
                                               shardings=setup.state_shardings)
        probe_values = {"linear_probe/auc": probe.run(state.params),
                        "linear_probe/random_encoder_auc": probe.run(random_state.params)}
        del random_state
      writer.write_scalars(step, probe_values)
      writer.flush()
      logging.info("Linear probe (validation macro AUC): %s", probe_values)

  summary = {
      "steps": step,
      "total_steps": total_steps,
      "preempted": preempted,
      "final_loss": last_loss,
      "skipped_records": skipped_records,
      "input_wait_ms_per_step": 1000.0 * run_input_wait / max(run_waited_steps, 1),
      "first_batch_s": first_batch_wait,
      "wall_time_s": time.time() - start_time,
      "checkpoint": f"{manager.directory}/{manager.latest_step()}",
      "initialisation": init_description,
      "linear_probe_auc": probe_values.get("linear_probe/auc"),
      "linear_probe_random_encoder_auc": probe_values.get("linear_probe/random_encoder_auc"),
      "divergence_warnings": divergence.warnings,
  }
  manager.close()
  if jax.process_index() == 0:
    logging.info("Run summary: %s", summary)
    print("\n".join([f"{title} pretraining {'preempted' if preempted else 'finished'}:",
                     f"  steps          {step}/{total_steps}",
                     f"  time           {summary['wall_time_s']:.1f} s",
                     f"  final loss     {last_loss:.4f}" if step > start_step else
                     "  final loss     - (no step run: the checkpoint was already at the end)",
                     f"  input wait     {summary['input_wait_ms_per_step']:.1f} ms/step "
                     f"(after the first batch)",
                     f"  skipped bad    {skipped_records} records (in the batches trained on, "
                     "resumes included)",
                     *[f"  WARNING        {w}" for w in divergence.warnings],
                     *([f"  linear probe   validation macro AUC "
                        f"{probe_values['linear_probe/auc']:.3f} (random encoder "
                        f"{probe_values['linear_probe/random_encoder_auc']:.3f})"]
                       if probe_values else []),
                     f"  checkpoint     {summary['checkpoint']}",
                     f"  TensorBoard    tensorboard --logdir {workdir}"]), flush=True)
  return summary
