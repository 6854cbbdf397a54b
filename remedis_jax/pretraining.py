"""The pretraining loop every self-supervised objective shares, and its small helpers.

A trainer (train_simclr.py, train_cluster.py) owns what is specific to its objective: the model,
the pure update step, and which input pipeline feeds it. This module owns what is the same for
all of them, so that resume, preemption, NaN handling, metrics and the kNN monitor behave
identically whichever objective is trained:

  source (checked against the batch before the workdir is touched) -> workdir + config -> mesh
  -> trainer's dataset -> trainer's TrainSetup (model, optimiser, sharded state, jitted update
  step) -> the loop (remedis_jax/loop.py: restore (own checkpoint, else config.model.init, else
  scratch), log window, the kNN and objective monitors as hooks, checkpoints, preemption) ->
  linear probe -> run summary.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import jax
import ml_collections

from data_pipelines import sources as data_sources
from data_pipelines import storage
from remedis_jax import initialization, loop, models, run_config, sharding, workdir_lock
from remedis_jax.train_state import TrainSetup, put_host_tree
from remedis_jax.evaluators import knn as knn_evaluator
from remedis_jax.evaluators import linear_probe


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


def init_from_config(config, setup: TrainSetup):
  """The loop's `init` for pretraining: `config.model.init` (a BiT checkpoint, an earlier run),
  else scratch."""
  def init(state):
    loaded = initialization.load_init(config.model.init, config.model.name,
                                      stem=config.model.get("stem", "bit"))
    if loaded is None:
      return state, "scratch"
    # Checked against the abstract tree (names, shapes; dtype cast), then placed with the run's
    # shardings: works for FSDP-sharded parameters across hosts, too. Parts the init does not
    # have (prototypes, classifier, probe) keep their fresh initialisation.
    params = dict(state.params)
    parts = ["encoder"] + (["head"] if loaded.head is not None and config.model.init_head
                           else [])
    for part in parts:
      merged = models.merge_params(getattr(loaded, part), setup.abstract_state.params[part])
      params[part] = put_host_tree(merged, setup.state_shardings.params[part])
    description = loaded.description + (" (with projection head)" if "head" in parts else "")
    return state.replace(params=params), description
  return init


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
  writer, mesh = loop.start_run(config, workdir, run_config.PRETRAINING_INCOMPATIBLE)
  local_batch_size = config.batch_size // jax.process_count()

  # ---- data (the source was opened by `run`)
  if dataset is None:
    dataset = make_dataset(config, source, local_batch_size)
  total_steps, warmup_steps, steps_per_epoch = steps_from_config(config, len(source))
  logging.info("Data: %s, %d examples, %d steps/epoch, %d total steps (%d warm-up).",
               source.name, len(source), steps_per_epoch, total_steps, warmup_steps)

  # ---- model, optimiser, sharded state and the jitted update step
  setup = create_setup(config, mesh, source, total_steps=total_steps, warmup_steps=warmup_steps)

  # ---- evaluators: the kNN monitor (None without labels), the objective's own monitor
  hooks = []
  if config.knn.every_steps > 0:
    knn = knn_evaluator.KnnEvaluator.from_config(config, setup.model, mesh)
    if knn is not None:
      hooks.append(loop.PeriodicEvaluation(
          "knn", config.knn.every_steps, lambda params, step: knn.run(params), writer,
          prefix="knn/", at_start=config.knn.get("at_start", False)))
  if setup.monitor is not None:
    hooks.append(loop.PeriodicEvaluation("monitor", setup.monitor.every_steps, setup.monitor.run,
                                         writer, at_start=True))

  # ---- restore (own checkpoint -> config.model.init -> scratch) and train
  result = loop.train(config, workdir, setup=setup, mesh=mesh, writer=writer,
                      data_iterator=iter(dataset), total_steps=total_steps,
                      init=init_from_config(config, setup), hooks=hooks)
  step, preempted = result.steps, result.preempted

  # ---- the read-out: a linear probe on the frozen encoder beside a random encoder's
  probe_values = {}
  if step == total_steps and not preempted:
    probe = linear_probe.LinearProbe.from_config(config, setup.model, mesh)
    if probe is not None:
      random_state = sharding.create_sharded(setup.init_state, jax.random.key(config.seed),
                                             shardings=setup.state_shardings)
      probe_values = {"linear_probe/auc": probe.run(result.state.params),
                      "linear_probe/random_encoder_auc": probe.run(random_state.params)}
      del random_state
      writer.write_scalars(step, probe_values)
      writer.flush()
      logging.info("Linear probe (validation macro AUC): %s", probe_values)

  summary = {
      "steps": step,
      "total_steps": total_steps,
      "preempted": preempted,
      "final_loss": result.last_loss,
      "skipped_records": result.skipped_records,
      "input_wait_ms_per_step": result.input_wait_ms_per_step,
      "first_batch_s": result.first_batch_s,
      "wall_time_s": time.time() - start_time,
      "checkpoint": result.checkpoint,
      "initialisation": result.initialisation,
      "linear_probe_auc": probe_values.get("linear_probe/auc"),
      "linear_probe_random_encoder_auc": probe_values.get("linear_probe/random_encoder_auc"),
      "divergence_warnings": result.divergence_warnings,
  }
  if jax.process_index() == 0:
    logging.info("Run summary: %s", summary)
    print("\n".join([f"{title} pretraining {'preempted' if preempted else 'finished'}:",
                     f"  steps          {step}/{total_steps}",
                     f"  time           {summary['wall_time_s']:.1f} s",
                     f"  final loss     {result.last_loss:.4f}" if step > result.start_step else
                     "  final loss     - (no step run: the checkpoint was already at the end)",
                     f"  input wait     {summary['input_wait_ms_per_step']:.1f} ms/step "
                     f"(after the first batch)",
                     f"  skipped bad    {result.skipped_records} records (in the batches "
                     "trained on, resumes included)",
                     *[f"  WARNING        {w}" for w in result.divergence_warnings],
                     *([f"  linear probe   validation macro AUC "
                        f"{probe_values['linear_probe/auc']:.3f} (random encoder "
                        f"{probe_values['linear_probe/random_encoder_auc']:.3f})"]
                       if probe_values else []),
                     f"  checkpoint     {summary['checkpoint']}",
                     f"  TensorBoard    tensorboard --logdir {workdir}"]), flush=True)
  return summary
