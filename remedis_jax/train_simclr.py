"""SimCLR contrastive pretraining of a BiT encoder on unlabeled medical images (REMEDIS stage 2).

One readable trainer, top to bottom: mesh -> data -> model and optimiser -> sharded state ->
update step -> restore -> loop. Entry point: `python -m remedis_jax.main --config=configs/
pretrain_simclr.py:tiny --workdir=DIR` (see the config files for the commands per dataset).

The loss is NT-Xent over the GLOBAL batch: the update step is plain jnp under `jax.jit` with
NamedSharding in/out shardings, so negatives come from every device and host (XLA inserts the
collectives). Images arrive as uint8 and are normalised here, on the device.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from typing import Any, Callable, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metrics as clu_metrics
from clu import parameter_overview, periodic_actions

from data_pipelines import pipeline, presets
from data_pipelines import sources as data_sources
from remedis_jax import checkpointing, export, initialization, losses, models, optimizers
from remedis_jax import preemption, sharding, writers
from remedis_jax.evaluators import knn as knn_evaluator

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def normalize_images(images: jax.Array) -> jax.Array:
  """uint8 pixels -> float32 in [-1, 1] (BiT convention); runs on the device."""
  return images.astype(jnp.float32) * (1.0 / 127.5) - 1.0


# ------------------------------------------------------------------------------------- model
def build_model(config: ml_collections.ConfigDict) -> nn.Module:
  model_cfg = config.model
  return models.create_contrastive_model(
      model_cfg.name,
      head_hidden_dims=tuple(model_cfg.head_hidden_dims),
      projection_dim=model_cfg.projection_dim,
      head_norm=model_cfg.head_norm,
      dtype=DTYPES[model_cfg.dtype],
      remat=model_cfg.remat,
  )


def init_params(model: nn.Module, probe: nn.Module | None, image_shape, rng) -> dict[str, Any]:
  """All trainable parameters: {"encoder", "head"} of the model, plus "probe" when used."""
  model_rng, probe_rng = jax.random.split(rng)
  dummy = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  variables = model.init(model_rng, dummy, train=False)
  params = dict(variables["params"])
  if probe is not None:
    _, intermediates = model.apply(variables, dummy, train=False)
    features = intermediates["pre_logits"]
    params["probe"] = probe.init(probe_rng, features)["params"]
  return params


# ------------------------------------------------------------------------------ update step
def make_update_fn(model: nn.Module, tx: optax.GradientTransformation, *, temperature: float,
                   probe: nn.Module | None = None, multi_label: bool = False,
                   metrics_cls=None) -> Callable:
  """Builds the pure update step `update_fn(state, batch) -> (state, metrics)`.

  `batch["views"]` is uint8 (B, V, H, W, C), sharded over the batch axis; the first two views
  are the positive pair. A non-finite loss or gradient leaves the state unchanged and is
  counted in `nonfinite_steps`, so a checkpoint never holds NaNs; the loop stops the run.
  """

  def loss_fn(params, views, labels):
    batch, num_views = views.shape[:2]
    images = normalize_images(views.reshape((batch * num_views,) + views.shape[2:]))
    z, intermediates = model.apply({"params": {"encoder": params["encoder"],
                                               "head": params["head"]}}, images, train=True)
    z = z.reshape((batch, num_views, -1))
    loss, metrics = losses.nt_xent_with_metrics(z[:, 0], z[:, 1], temperature)
    total = loss
    if probe is not None:
      # Online linear probe on stop-gradient features of the first view: it watches the
      # representation without shaping it (SimCLR's monitoring head).
      features = jax.lax.stop_gradient(
          intermediates["pre_logits"].reshape((batch, num_views, -1))[:, 0])
      logits = probe.apply({"params": params["probe"]}, features).astype(jnp.float32)
      if multi_label:
        weights = jnp.all(labels >= 0, axis=-1).astype(jnp.float32)
        probe_loss = losses.sigmoid_cross_entropy(logits, jnp.maximum(labels, 0), weights)
      else:
        weights = (labels >= 0).astype(jnp.float32)
        probe_loss = losses.softmax_cross_entropy(logits, jnp.maximum(labels, 0), weights)
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32) * weights
        metrics["probe_accuracy"] = correct.sum() / jnp.maximum(weights.sum(), 1.0)
      metrics["probe_loss"] = probe_loss
      total = total + probe_loss
    metrics["loss"] = loss  # the contrastive objective (the probe's loss is logged apart)
    return total, metrics

  def update_fn(state: TrainState, batch: dict[str, jax.Array]):
    labels = batch.get("label")
    (total, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch["views"], labels)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(total) & jnp.all(
        jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
    # Keep the last good state when anything is non-finite (cheap select, no host sync).
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    metrics["nonfinite_steps"] = 1.0 - finite.astype(jnp.float32)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["param_norm"] = optax.tree.norm(state.params)
    return new_state, metrics_cls.single_from_model_output(**metrics)

  return update_fn


@jax.jit
def merge_metrics(window):
  """Merges one logging window's per-step metric collections in a single compiled call.

  Merging eagerly after every step dispatches a few tiny device ops per metric per step, which
  shows up as loop overhead when steps are short; this runs once per `log_every_steps`.
  """
  return functools.reduce(lambda a, b: a.merge(b), window)


def make_metrics_cls(names):
  """A clu Collection averaging every named per-step metric over the logging window."""
  fields = {name: clu_metrics.Average.from_output(name) for name in names}
  fields["nonfinite_steps"] = clu_metrics.Average.from_output("nonfinite_steps")
  return clu_metrics.Collection.create(**fields)


class TrainSetup(NamedTuple):
  """Everything the loop needs besides data: built by `create_train_setup`."""
  model: nn.Module
  tx: optax.GradientTransformation
  schedule: Callable[[int], float]
  optimizer_config: ml_collections.ConfigDict
  init_state: Callable[[jax.Array], TrainState]
  abstract_state: TrainState
  state_shardings: TrainState
  update_fn: Callable  # jitted (state, batch) -> (state, metrics); donates `state`


def create_train_setup(config: ml_collections.ConfigDict, mesh, *, num_classes: int,
                       multi_label: bool, total_steps: int, warmup_steps: int) -> TrainSetup:
  """Model, optimiser, sharded-state initialiser and the jitted update step for `config`.

  Args:
    config: the run config (model, optimizer, loss, param_sharding, data.image_size/num_channels).
    mesh: the device mesh.
    num_classes: classes of the online linear probe; 0 disables the probe.
    multi_label: whether probe labels are multi-hot (sigmoid) rather than indices (softmax).
    total_steps: schedule length.
    warmup_steps: linear warm-up length.
  """
  model = build_model(config)
  probe = nn.Dense(num_classes, name="probe") if num_classes > 0 else None
  opt_config = config.optimizer.copy_and_resolve_references()
  with opt_config.unlocked():
    opt_config.warmup_steps = warmup_steps
    if "warmup_epochs" in opt_config:
      del opt_config["warmup_epochs"]
  tx, schedule = optimizers.make_optimizer(opt_config, total_steps=total_steps,
                                           batch_size=config.batch_size)
  image_shape = (config.data.image_size, config.data.image_size, config.data.num_channels)

  def init_state(rng):
    params = init_params(model, probe, image_shape, rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  abstract_state = jax.eval_shape(init_state, jax.random.key(0))
  state_shardings = sharding.param_shardings(abstract_state, mesh,
                                             strategy=config.get("param_sharding", "replicate"))
  metric_names = ["loss", "contrastive_accuracy", "contrastive_entropy", "grad_norm",
                  "param_norm"]
  if probe is not None:
    metric_names += ["probe_loss"] + ([] if multi_label else ["probe_accuracy"])
  update_fn = make_update_fn(model, tx, temperature=config.loss.temperature, probe=probe,
                             multi_label=multi_label, metrics_cls=make_metrics_cls(metric_names))
  update_fn = jax.jit(update_fn, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                      out_shardings=(state_shardings, sharding.replicated(mesh)),
                      donate_argnums=(0,))
  return TrainSetup(model, tx, schedule, opt_config, init_state, abstract_state,
                    state_shardings, update_fn)


# ---------------------------------------------------------------------------------- helpers
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


def write_run_config(config, workdir: str) -> None:
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, export.RUN_CONFIG_FILE)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(config.to_dict(), f, indent=2, sort_keys=True, default=str)
  os.replace(path + ".tmp", path)


def put_host_tree(tree, shardings):
  """Host numpy tree -> global jax.Arrays with `shardings` (the same values on every process)."""
  def put(value, sharding_):
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding_, lambda index: value[index])
  return jax.tree.map(put, tree, shardings)


# ------------------------------------------------------------------------------------ train
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       dataset=None) -> dict[str, Any]:
  """Pretrains with SimCLR; returns a summary (steps, final loss, checkpoint and export paths).

  Args:
    config: the run config (configs/pretrain_simclr.py).
    workdir: checkpoints, logs and summaries go here; an existing run there is resumed.
    dataset: optional Grain dataset of host batches ({"views": uint8 (B, 2, H, W, C), ...})
      used instead of the one `config.data` describes (benchmarks use it to take input
      preprocessing out of the measurement). The source still sets the epoch length.
  """
  start_time = time.time()
  workdir = os.path.abspath(workdir)
  write_run_config(config, workdir)
  writer = writers.create_writer(workdir)
  writer.write_hparams(writers.flatten_config(config.to_dict()))

  # ---- mesh
  mesh = sharding.make_mesh(config.get("mesh"))
  batch_sharding = sharding.batch_sharding(mesh)
  if config.batch_size % jax.process_count():
    raise ValueError(f"config.batch_size={config.batch_size} must be divisible by the number of "
                     f"processes ({jax.process_count()})")
  if config.batch_size % mesh.size:
    raise ValueError(f"config.batch_size={config.batch_size} must be divisible by the number of "
                     f"devices ({mesh.size})")
  local_batch_size = config.batch_size // jax.process_count()

  # ---- data
  source = data_sources.build_source(config.data, config.data.get("pretrain_split", "train"))
  ops = presets.get_preset(config.data.preset, "pretrain", config.data.image_size)
  if dataset is None:
    dataset = pipeline.make_pretrain_dataset(
        source, batch_size=local_batch_size, ops=ops, num_views=2, seed=config.seed,
        num_channels=config.data.num_channels, skip_bad_records=config.data.skip_bad_records,
        worker_count=config.data.get("worker_count", 0))
  data_iterator = iter(dataset)
  total_steps, warmup_steps, steps_per_epoch = steps_from_config(config, len(source))
  logging.info("Data: %s, %d examples, %d steps/epoch, %d total steps (%d warm-up).",
               source.name, len(source), steps_per_epoch, total_steps, warmup_steps)

  # ---- model, optimiser, sharded state and the jitted update step
  use_probe = config.probe.enabled and source.num_classes > 0
  setup = create_train_setup(config, mesh, num_classes=source.num_classes if use_probe else 0,
                             multi_label=source.multi_label, total_steps=total_steps,
                             warmup_steps=warmup_steps)
  model, tx, schedule, update_fn = setup.model, setup.tx, setup.schedule, setup.update_fn
  abstract_state, state_shardings = setup.abstract_state, setup.state_shardings
  rng = jax.random.key(config.seed)

  # ---- restore: own checkpoint -> config.model.init -> scratch
  manager = checkpointing.make_manager(
      workdir, max_to_keep=config.keep_checkpoints,
      asynchronous=config.get("async_checkpointing", True))
  restored = checkpointing.restore_latest(
      manager, checkpointing.abstract_with_shardings(abstract_state, state_shardings),
      data_iterator)
  if restored is not None:
    state, start_step = restored
    init_description = f"resumed from {manager.directory}/{start_step}"
  else:
    start_step = 0
    state = sharding.create_sharded(setup.init_state, rng, shardings=state_shardings)
    loaded = initialization.load_init(config.model.init, config.model.name)
    init_description = "scratch"
    if loaded is not None:
      # Checked against the abstract tree (names, shapes; dtype cast), then placed with the
      # run's shardings: works for FSDP-sharded parameters across hosts, too.
      params = dict(state.params)
      parts = ["encoder"] + (["head"] if loaded.head is not None and config.model.init_head else [])
      for part in parts:
        merged = models.merge_params(getattr(loaded, part), abstract_state.params[part])
        params[part] = put_host_tree(merged, state_shardings.params[part])
      state = state.replace(params=params)
      init_description = loaded.description + (" (with projection head)" if "head" in parts else "")
  logging.info("Initialisation: %s", init_description)
  if jax.process_index() == 0:
    parameter_overview.log_parameter_overview(state.params)
    logging.info("Optimiser masks:\n%s", optimizers.describe_masks(state.params, setup.optimizer_config))

  # ---- evaluators
  knn = None
  if config.knn.every_steps > 0:
    knn = knn_evaluator.KnnEvaluator.from_config(config, model, mesh)

  # ---- loop
  report_progress = periodic_actions.ReportProgress(
      num_train_steps=total_steps, writer=writer, every_secs=config.get("progress_every_secs", 60))
  progress_bar = writers.ProgressBar(total_steps, initial_step=start_step)
  watcher = preemption.PreemptionWatcher(manager)
  device_keys = ("views", "label") if use_probe else ("views",)
  window_metrics = []  # per-step metric collections of the current logging window
  input_wait = 0.0
  # Run totals for the summary; the first batch (pipeline and worker start-up) is kept apart.
  run_input_wait, run_waited_steps, first_batch_wait = 0.0, 0, None
  skipped_records = 0
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
    while step < total_steps:
      wait_start = time.monotonic()
      host_batch = next(data_iterator)
      waited = time.monotonic() - wait_start
      input_wait += waited
      if first_batch_wait is None:
        first_batch_wait = waited
      else:
        run_input_wait += waited
        run_waited_steps += 1
      skipped_records += int(np.sum(host_batch.get("skipped_records", 0)))
      batch = sharding.shard_host_batch({k: host_batch[k] for k in device_keys}, batch_sharding)
      state, step_metrics = update_fn(state, batch)
      step += 1
      window_steps += 1
      window_metrics.append(step_metrics)
      report_progress(step)
      progress_bar.update(step)
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
        writer.write_scalars(step, values)
        last_loss = values["train/loss"]
        progress_bar.set_postfix(f"loss {last_loss:.4f}")
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

      if step % config.checkpoint_every_steps == 0 or is_last or preempted:
        checkpointing.save(manager, step, state, data_iterator, force=preempted or is_last)
      if preempted:
        logging.warning("Preempted: saved step %d; rerun the same command to resume.", step)
        break
  finally:
    manager.wait_until_finished()
    progress_bar.close()
    watcher.close()
    writer.flush()

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
  }
  manager.close()
  if jax.process_index() == 0:
    logging.info("Run summary: %s", summary)
    print("\n".join([f"SimCLR pretraining {'preempted' if preempted else 'finished'}:",
                     f"  steps          {step}/{total_steps}",
                     f"  time           {summary['wall_time_s']:.1f} s",
                     f"  final loss     {last_loss:.4f}",
                     f"  input wait     {summary['input_wait_ms_per_step']:.1f} ms/step "
                     f"(after the first batch)",
                     f"  skipped bad    {skipped_records} records",
                     f"  checkpoint     {summary['checkpoint']}",
                     f"  TensorBoard    tensorboard --logdir {workdir}"]), flush=True)
  return summary
