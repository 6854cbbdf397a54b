"""Lung segmentation fine-tuning of a ViT or BiT encoder, and its evaluation under site drift.

One readable trainer, top to bottom, in the shape of train_finetune.py (whose config parsing,
schedule, state and result-file helpers it reuses): config check -> mesh -> data (a label
fraction of the training MASKS) -> model (encoder + decoder, models/segmentation.py) and
optimiser -> sharded state -> update step -> restore -> loop (validation Dice picks the best
checkpoint) -> final evaluation of the BEST checkpoint on every named test set, with a PNG grid of
predictions per test set. Entry point:

  python -m remedis_jax.main --config=configs/segment.py:tiny --workdir=workdirs/segment

Initialisation (`config.model.init`): scratch, a pretraining workdir (GMML, SimCLR, ...), an
export, or a BiT .npz (initialization.load_init); only `params["encoder"]` is loaded, the decoder
always starts fresh (its last layer at zero: p = 0.5 everywhere).
`config.freeze_encoder=True` trains the decoder only (optimiser `frozen` mask).

Loss, per pixel: sigmoid cross-entropy averaged over pixels, plus `config.loss.dice_weight` x
the soft Dice loss 1 - (2 sum(p g) + 1) / (sum(p) + sum(g) + 1) averaged over images (the +1
keeps an image with an empty mask and an empty prediction at loss 0).

Label fraction. `config.label_fraction` keeps that share of the training records (and so of
their masks), uniformly at random by default (`label_fraction_stratify=False`; True stratifies
by the classification labels, see data_pipelines/subset.py); the subset is nested across
fractions for one seed and its ids go to WORKDIR/subset_manifest.json.

Augmentation: the ops (data_pipelines/ops_geometric.py) move `lung_mask` together with the image
(nearest-neighbour resampling for the mask); intensity ops touch the image only.

Resume: rerunning the same command continues from WORKDIR/checkpoints/; a run whose
results.json exists returns it without doing anything.

WORKDIR/results.json, schema "remedis-jax-segment-results/1":
  format, finished, steps, total_steps, wall_time_s
  config            {variant, seed, label_fraction, label_fraction_seed, init, model,
                     freeze_encoder, data_source, dice_weight, threshold}
  initialisation    how the encoder was initialised (text)
  divergence_warnings  the loss or parameter norm blew up while finite (texts; [] normally)
  num_train_masks   training records (masks) used after the label fraction
  subset_manifest   "subset_manifest.json"
  best              {metric: "dice", split, step, value}
  val               metrics of the best checkpoint on the validation split
  test_sets         {name: {split, sites, num_examples, figure, metrics}}
Metric keys (evaluators/segmentation.py): dice, dice_std, dice_global, iou, iou_std,
iou_global, num_examples, num_empty_targets. WORKDIR/predictions/<test set>.png: image, ground
truth, prediction and overlay of `config.num_figure_examples` test images: a seeded,
stratified random sample of the test set (seed `config.figure_seed` if the config has it, else
0: the same images in every run; never the first ones of a file sorted by site or class).
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import parameter_overview, periodic_actions

from data_pipelines import pipeline, presets
from data_pipelines import sources as data_sources
from data_pipelines import subset as subset_lib
from remedis_jax import checkpointing, initialization, loop, models, optimizers, preemption
from remedis_jax import sharding, workdir_lock, writers
from remedis_jax.evaluators import segmentation as seg_metrics
from remedis_jax.models import segmentation as seg_models
from remedis_jax.train_finetune import (BEST_DIR, RESULTS_FILE, SUBSET_MANIFEST_FILE, BestState,
                                        TestSet, TrainState, _improved, build_eval_sources,
                                        make_metrics_cls, parse_test_sets, read_results,
                                        schedule_from_config, write_json)
from remedis_jax.train_simclr import DTYPES, normalize_images, put_host_tree, write_run_config

RESULTS_FORMAT = "remedis-jax-segment-results/1"
FIGURE_DIR = "predictions"
BEST_METRIC = "dice"


# ------------------------------------------------------------------------------ config check
def check_config(config: ml_collections.ConfigDict) -> list[TestSet]:
  """Fails fast, before any data or model is built, on values that cannot work.

  Returns:
    The parsed test sets.

  Raises:
    ValueError / FileNotFoundError: naming the config key, the value and the fix.
  """
  if not 0.0 < float(config.label_fraction) <= 1.0:
    raise ValueError(f"config.label_fraction={config.label_fraction} must be in (0, 1] (e.g. "
                     "0.05 for 5% of the training masks, 1.0 for all)")
  init = str(config.model.init or "").strip()
  if init.lower() not in initialization.SCRATCH and "://" not in init and not os.path.exists(init):
    raise FileNotFoundError(
        f"config.model.init={init!r} does not exist; give a pretraining workdir (e.g. "
        "workdirs/gmml/pretrain), an export folder, a BiT .npz, or '' to train from scratch")
  if config.freeze_encoder and init.lower() in initialization.SCRATCH:
    raise ValueError("config.freeze_encoder=True with config.model.init='' would train a decoder "
                     "on random features; set config.model.init to a pretraining run")
  if config.batch_size <= 0 or config.eval_batch_size <= 0:
    raise ValueError(f"config.batch_size={config.batch_size} and config.eval_batch_size="
                     f"{config.eval_batch_size} must be positive")
  if config.eval_every_steps <= 0:
    raise ValueError(f"config.eval_every_steps={config.eval_every_steps} must be positive")
  if config.loss.dice_weight < 0:
    raise ValueError(f"config.loss.dice_weight={config.loss.dice_weight} must be >= 0")
  if not 0.0 < float(config.threshold) < 1.0:
    raise ValueError(f"config.threshold={config.threshold} must be in (0, 1)")
  return parse_test_sets(config.test_sets, config.data.source)


def require_masks(source: Any, what: str) -> None:
  """Raises ValueError unless the source's records carry `lung_mask` (reads record 0)."""
  if len(source) == 0:
    raise ValueError(f"{what}: {source.name} is empty")
  if "lung_mask" not in source[0]:
    raise ValueError(f"{what}: {source.name} records have no 'lung_mask'; segmentation needs "
                     "masks (folder source: set data.mask_column to the CSV column of mask "
                     "image paths; synthetic: masks are built in)")


# ------------------------------------------------------------------------------------ model
def build_model(config: ml_collections.ConfigDict) -> seg_models.SegmentationModel:
  model_cfg = config.model
  model = seg_models.create_segmentation_model(
      model_cfg.name, num_classes=1, decoder_width=model_cfg.decoder.width,
      decoder_groups=model_cfg.decoder.num_groups, skip_keys=model_cfg.decoder.skips,
      dtype=DTYPES[model_cfg.dtype], remat=model_cfg.remat)
  # create_segmentation_model takes no stem: the encoder is rebuilt with the config's.
  return model.clone(encoder=models.create_model(
      model_cfg.name, num_classes=None, dtype=DTYPES[model_cfg.dtype], remat=model_cfg.remat,
      stem=model_cfg.get("stem", "bit")))


# ------------------------------------------------------------------------------------- loss
def segmentation_loss(logits: jax.Array, masks: jax.Array,
                      dice_weight: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Pixel-wise sigmoid cross-entropy (+ dice_weight x soft Dice loss) and metrics.

  Args:
    logits: (B, H, W) float32.
    masks: (B, H, W) in {0, 1}.
    dice_weight: weight of the soft Dice loss (0: cross-entropy only).

  Returns:
    (loss, {"bce", "soft_dice_loss", "dice"}) where "dice" is the hard Dice of the batch's
    thresholded predictions, averaged over images (empty-mask convention of
    evaluators/segmentation.py).
  """
  masks = masks.astype(jnp.float32)
  bce = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, masks))
  probs = jax.nn.sigmoid(logits)
  intersection = jnp.sum(probs * masks, axis=(1, 2))
  sizes = jnp.sum(probs, axis=(1, 2)) + jnp.sum(masks, axis=(1, 2))
  soft_dice_loss = jnp.mean(1.0 - (2.0 * intersection + 1.0) / (sizes + 1.0))
  predicted = (logits >= 0).astype(jnp.float32)
  hard_intersection = jnp.sum(predicted * masks, axis=(1, 2))
  hard_sizes = jnp.sum(predicted, axis=(1, 2)) + jnp.sum(masks, axis=(1, 2))
  hard_dice = jnp.where(hard_sizes > 0, 2.0 * hard_intersection / jnp.maximum(hard_sizes, 1.0),
                        seg_metrics.EMPTY_SCORE)
  loss = bce + dice_weight * soft_dice_loss
  return loss, {"bce": bce, "soft_dice_loss": soft_dice_loss, "dice": jnp.mean(hard_dice)}


# ------------------------------------------------------------------------------ update step
def make_update_fn(model: seg_models.SegmentationModel, tx: optax.GradientTransformation, *,
                   dice_weight: float, metrics_cls) -> Callable:
  """The pure update step `update_fn(state, batch) -> (state, metrics)`.

  `batch["image"]` is uint8 (B, H, W, C), `batch["lung_mask"]` uint8 (B, H, W). A non-finite
  loss or gradient leaves the state unchanged and is counted in `nonfinite_steps`.
  """

  def loss_fn(params, images, masks):
    logits, _ = model.apply({"params": params}, normalize_images(images), train=True)
    loss, metrics = segmentation_loss(logits[..., 0], masks, dice_weight)
    metrics["loss"] = loss
    return loss, metrics

  def update_fn(state: TrainState, batch: dict[str, jax.Array]):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch["image"], batch["lung_mask"])
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.all(
        jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    metrics["nonfinite_steps"] = 1.0 - finite.astype(jnp.float32)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["param_norm"] = optax.tree.norm(state.params)
    return new_state, metrics_cls.single_from_model_output(**metrics)

  return update_fn


def make_predict_fn(model: seg_models.SegmentationModel) -> Callable:
  """`predict(params, images uint8) -> lung probabilities (B, H, W)`, jitted."""

  def predict(params, images):
    logits, _ = model.apply({"params": params}, normalize_images(images), train=False)
    return jax.nn.sigmoid(logits[..., 0])

  return jax.jit(predict)


class TrainSetup(NamedTuple):
  """Everything the loop needs besides data: built by `create_train_setup`."""
  model: seg_models.SegmentationModel
  tx: optax.GradientTransformation
  schedule: Callable[[int], float]
  optimizer_config: ml_collections.ConfigDict
  init_state: Callable[[jax.Array], TrainState]
  abstract_state: TrainState
  state_shardings: TrainState
  update_fn: Callable  # jitted (state, batch) -> (state, metrics); donates `state`
  predict_fn: Callable  # jitted (params, images) -> probabilities


def create_train_setup(config: ml_collections.ConfigDict, mesh, *, total_steps: int,
                       warmup_steps: int) -> TrainSetup:
  """Model, optimiser (frozen encoder if asked), sharded state init and jitted steps.

  Args:
    config: the run config (model, optimizer, loss, freeze_encoder, batch_size,
      data.image_size and data.num_channels, param_sharding).
    mesh: the device mesh.
    total_steps: schedule length.
    warmup_steps: linear warm-up length.

  Returns:
    A TrainSetup.
  """
  model = build_model(config)
  opt_config = config.optimizer.copy_and_resolve_references()
  with opt_config.unlocked():
    opt_config.warmup_steps = warmup_steps
    if config.freeze_encoder:
      opt_config.frozen = tuple(opt_config.frozen) + ("encoder/.*",)
  tx, schedule = optimizers.make_optimizer(opt_config, total_steps=total_steps,
                                           batch_size=config.batch_size)
  image_shape = (config.data.image_size, config.data.image_size, config.data.num_channels)

  def init_state(rng):
    params = dict(model.init(rng, jnp.zeros((1,) + image_shape, jnp.float32),
                             train=False)["params"])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  abstract_state = jax.eval_shape(init_state, jax.random.key(0))
  state_shardings = sharding.param_shardings(abstract_state, mesh,
                                             strategy=config.get("param_sharding", "replicate"))
  metrics_cls = make_metrics_cls(["loss", "bce", "soft_dice_loss", "dice", "grad_norm",
                                  "param_norm", "nonfinite_steps"])
  update_fn = make_update_fn(model, tx, dice_weight=float(config.loss.dice_weight),
                             metrics_cls=metrics_cls)
  update_fn = jax.jit(update_fn, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                      out_shardings=(state_shardings, sharding.replicated(mesh)),
                      donate_argnums=(0,))
  return TrainSetup(model, tx, schedule, opt_config, init_state, abstract_state, state_shardings,
                    update_fn, make_predict_fn(model))


def load_pretrained(config, state: TrainState, setup: TrainSetup) -> tuple[TrainState, str]:
  """Fills the encoder from `config.model.init` (the decoder stays fresh); else keeps `state`.

  Raises:
    ValueError: the weights do not fit the encoder (merge_params names every key).
  """
  loaded = initialization.load_init(config.model.init, config.model.name,
                                    stem=config.model.get("stem", "bit"))
  if loaded is None:
    return state, "scratch"
  params = dict(state.params)
  params["encoder"] = put_host_tree(
      models.merge_params(loaded.encoder, setup.abstract_state.params["encoder"]),
      setup.state_shardings.params["encoder"])
  return state.replace(params=params), loaded.description


def format_results(results: dict[str, Any]) -> str:
  """A table of Dice / IoU per test set."""
  columns = ("dice", "dice_std", "dice_global", "iou", "iou_global")
  fmt = lambda v: "   n/a" if v is None else f"{v:6.3f}"
  width = max([len(n) for n in results["test_sets"]] + [12])
  lines = ["  " + "test set".ljust(width) + "  " + "  ".join(c.rjust(11) for c in columns)]
  for name, entry in results["test_sets"].items():
    m = entry["metrics"]
    lines.append("  " + name.ljust(width) + "  " + "  ".join(fmt(m.get(c)).rjust(11)
                                                           for c in columns))
  return "\n".join(lines)


# ------------------------------------------------------------------------------------ train
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Fine-tunes for segmentation, keeps the best validation Dice, evaluates every test set.

  Args:
    config: a configs/segment.py config.
    workdir: the run's folder (created); rerunning resumes.

  Returns:
    The results.json contents (schema in the module docstring).

  Raises:
    ValueError / FileNotFoundError: a bad config or data without masks (before training).
    FloatingPointError: non-finite loss or gradients.
    workdir_lock.WorkdirInUseError: another live run holds the workdir.
  """
  start_time = time.time()
  test_sets = check_config(config)
  workdir = os.path.abspath(workdir)
  finished = read_results(workdir)
  if finished is not None:
    logging.info("%s/%s exists: the run is finished; returning its results.", workdir,
                 RESULTS_FILE)
    return finished
  with workdir_lock.WorkdirLock(workdir):
    return _train_and_evaluate(config, workdir, start_time=start_time, test_sets=test_sets)


def _train_and_evaluate(config, workdir, *, start_time, test_sets):
  write_run_config(config, workdir)
  writer = writers.create_writer(workdir)
  writer.write_hparams(writers.flatten_config(config.to_dict()))

  # ---- mesh
  mesh = sharding.make_mesh(config.get("mesh"))
  batch_sharding = sharding.batch_sharding(mesh)
  for key in ("batch_size", "eval_batch_size"):
    if config[key] % mesh.size or config[key] % jax.process_count():
      raise ValueError(f"config.{key}={config[key]} must be divisible by the number of devices "
                       f"({mesh.size}) and processes ({jax.process_count()})")
  local_batch_size = config.batch_size // jax.process_count()

  # ---- data: the label-fraction subset of the training masks
  full_train = data_sources.build_source(config.data, config.data.train_split)
  require_masks(full_train, f"data.train_split={config.data.train_split!r}")
  train_source = subset_lib.subset(full_train, config.label_fraction, config.label_fraction_seed,
                                   stratify=config.label_fraction_stratify)
  if jax.process_index() == 0:
    train_source.write_manifest(os.path.join(workdir, SUBSET_MANIFEST_FILE))
  logging.info("Masks: %d of %d training records (label_fraction=%g, seed %d); manifest %s",
               len(train_source), len(full_train), config.label_fraction,
               config.label_fraction_seed, os.path.join(workdir, SUBSET_MANIFEST_FILE))
  train_ops = config.data.train_ops or presets.get_preset(config.data.preset, "finetune",
                                                          config.data.image_size)
  eval_ops = config.data.eval_ops or presets.get_preset(config.data.preset, "eval",
                                                        config.data.image_size)
  dataset = pipeline.make_train_dataset(
      train_source, batch_size=local_batch_size, ops=train_ops, seed=config.seed,
      num_channels=config.data.num_channels, skip_bad_records=config.data.skip_bad_records,
      max_bad_record_share=config.data.get("max_bad_record_share", 0.1),
      worker_count=config.data.get("worker_count", 0))
  data_iterator = iter(dataset)
  total_steps, warmup_steps, steps_per_epoch = schedule_from_config(config, len(train_source))
  logging.info("Schedule: %d total steps (%d warm-up), %d steps/epoch of the subset.",
               total_steps, warmup_steps, steps_per_epoch)

  # ---- model, optimiser, sharded state and the jitted steps
  setup = create_train_setup(config, mesh, total_steps=total_steps, warmup_steps=warmup_steps)
  abstract_state, state_shardings = setup.abstract_state, setup.state_shardings
  evaluator_kwargs = dict(ops=eval_ops, batch_size=config.eval_batch_size, mesh=mesh,
                          num_channels=config.data.num_channels, threshold=config.threshold)
  val_source, test_sources = build_eval_sources(config, test_sets)
  require_masks(val_source, f"data.val_split={config.data.val_split!r}")
  for test_set in test_sets:
    require_masks(test_sources[test_set.name], f"config.test_sets {test_set.name!r}")
  val_evaluator = seg_metrics.SegmentationEvaluator(setup.predict_fn, val_source,
                                                    **evaluator_kwargs)

  # ---- restore: own checkpoint -> config.model.init -> scratch
  manager = checkpointing.make_manager(workdir, max_to_keep=config.keep_checkpoints,
                                       asynchronous=config.get("async_checkpointing", True))
  best_manager = checkpointing.make_manager(os.path.join(workdir, BEST_DIR), max_to_keep=1,
                                            asynchronous=False, with_data=False)
  abstract_best = BestState(step=jax.ShapeDtypeStruct((), jnp.int32),
                            value=jax.ShapeDtypeStruct((), jnp.float32),
                            params=abstract_state.params)
  best_shardings = BestState(step=sharding.replicated(mesh), value=sharding.replicated(mesh),
                             params=state_shardings.params)
  abstract_best = checkpointing.abstract_with_shardings(abstract_best, best_shardings)
  restored = checkpointing.restore_latest(
      manager, checkpointing.abstract_with_shardings(abstract_state, state_shardings),
      data_iterator)
  best_value, best_step = -math.inf, -1
  if restored is not None:
    state, start_step = restored
    init_description = f"resumed from {manager.directory}/{start_step}"
    best_restored = checkpointing.restore_latest(best_manager, abstract_best)
    if best_restored is not None:
      best_value, best_step = float(best_restored[0].value), int(best_restored[0].step)
  else:
    start_step = 0
    state = sharding.create_sharded(setup.init_state, jax.random.key(config.seed),
                                    shardings=state_shardings)
    state, init_description = load_pretrained(config, state, setup)
  logging.info("Initialisation: %s; frozen encoder: %s", init_description, config.freeze_encoder)
  if jax.process_index() == 0:
    parameter_overview.log_parameter_overview(state.params)

  def validate(step: int) -> None:
    nonlocal best_value, best_step
    values = dict(val_evaluator.run(state.params))
    writer.write_scalars(step, {f"val/{k}": v for k, v in values.items()})
    value = values[BEST_METRIC]
    if _improved(value, best_value) or best_step < 0:
      best_value, best_step = value, step
      best = BestState(step=jnp.asarray(step, jnp.int32), value=jnp.asarray(value, jnp.float32),
                       params=state.params)
      checkpointing.save(best_manager, step, best, force=True)
      best_manager.wait_until_finished()
      logging.info("Step %d: best validation Dice so far, %.4f", step, value)

  # ---- loop
  report_progress = periodic_actions.ReportProgress(
      num_train_steps=total_steps, writer=writer, every_secs=config.get("progress_every_secs", 60))
  progress_bar = writers.ProgressBar(total_steps, initial_step=start_step)
  watcher = preemption.PreemptionWatcher(manager)
  run_ahead = loop.RunAhead(max_in_flight=2)
  divergence = loop.DivergenceMonitor(float(loop.param_norm(state.params)))
  train_metrics = None
  # Run totals continue across resumes (saved with every checkpoint).
  skipped_records = int(checkpointing.read_counters(manager, start_step or None).get(
      "skipped_records", 0))
  window_start, window_steps = time.monotonic(), 0
  step = start_step
  preempted = False
  try:
    while step < total_steps:
      host_batch, position = loop.next_batch(data_iterator, watcher)
      if host_batch is None:  # SIGTERM while waiting for input
        preempted = True
        loop.save_at_interrupt(manager, step, state, position,
                               {"skipped_records": skipped_records})
        break
      skipped_records += int(np.sum(host_batch.get("skipped_records", 0)))
      batch = sharding.shard_host_batch({k: host_batch[k] for k in ("image", "lung_mask")},
                                        batch_sharding)
      state, step_metrics = setup.update_fn(state, batch)
      run_ahead.dispatched(step_metrics)  # waits for step - 1: at most 2 steps in flight
      step += 1
      window_steps += 1
      train_metrics = step_metrics if train_metrics is None else train_metrics.merge(step_metrics)
      report_progress(step)
      progress_bar.update(step)
      preempted = watcher.reached(step)
      is_last = step == total_steps

      if step % config.log_every_steps == 0 or is_last or preempted:
        values = {f"train/{k}": float(v) for k, v in train_metrics.compute().items()}
        elapsed = time.monotonic() - window_start
        values["train/learning_rate"] = float(setup.schedule(step - 1))
        values["train/images_per_s"] = window_steps * config.batch_size / max(elapsed, 1e-9)
        values["train/skipped_records"] = float(skipped_records)
        values["train/param_norm"] = float(loop.param_norm(state.params))
        writer.write_scalars(step, values)
        divergence.update(step, values["train/loss"], values["train/param_norm"])
        progress_bar.set_postfix(f"loss {values['train/loss']:.4f} dice "
                                 f"{values['train/dice']:.3f}")
        if values["train/nonfinite_steps"] > 0:
          raise FloatingPointError(
              f"non-finite loss or gradients in the {window_steps} steps before step {step} "
              f"(those updates were skipped); the last good checkpoint is "
              f"{manager.directory}/{manager.latest_step()}. Lower config.optimizer."
              "learning_rate or set config.optimizer.grad_clip_norm.")
        train_metrics, window_steps, window_start = None, 0, time.monotonic()

      if step % config.eval_every_steps == 0 or is_last:
        with report_progress.timed("validation"):
          validate(step)

      if step % config.checkpoint_every_steps == 0 or is_last or preempted:
        checkpointing.save(manager, step, state, data_iterator, force=preempted or is_last,
                           counters={"skipped_records": skipped_records})
      if preempted:
        logging.warning("Preempted: saved step %d; rerun the same command to resume.", step)
        break
    if not preempted and best_step < 0:
      validate(step)  # resumed at the last step before any best was kept
  finally:
    manager.wait_until_finished()
    progress_bar.close()
    watcher.close()
    writer.flush()
  manager.close()
  if preempted:
    best_manager.close()
    return {"finished": False, "steps": step, "total_steps": total_steps, "preempted": True}

  # ---- final evaluation of the BEST checkpoint
  best_state, _ = checkpointing.restore_latest(best_manager, abstract_best)
  best_manager.close()
  params = best_state.params
  val_counts, _ = val_evaluator.predict(params)
  val_metrics = seg_metrics.segmentation_metrics(val_counts)
  test_results = {}
  for test_set in test_sets:
    source = test_sources[test_set.name]
    evaluator = seg_metrics.SegmentationEvaluator(setup.predict_fn, source, **evaluator_kwargs)
    counts, samples = evaluator.predict(params, num_samples=config.num_figure_examples,
                                        sample_seed=config.get("figure_seed", 0))
    metrics = seg_metrics.segmentation_metrics(counts)
    figure = os.path.join(FIGURE_DIR, f"{test_set.name}.png")
    if jax.process_index() == 0 and config.num_figure_examples > 0:
      seg_metrics.save_prediction_grid(
          samples, os.path.join(workdir, figure), threshold=config.threshold,
          title=f"{test_set.name} ({test_set.split}@{test_set.sites or 'config sites'}): "
                f"Dice {metrics['dice']:.3f}, {init_description}")
    test_results[test_set.name] = {"split": test_set.split, "sites": test_set.sites,
                                   "num_examples": metrics["num_examples"],
                                   "figure": figure if config.num_figure_examples > 0 else None,
                                   "metrics": metrics}
    writer.write_scalars(step, {f"test/{test_set.name}/{k}": v for k, v in metrics.items()})
  writer.flush()

  results = {
      "format": RESULTS_FORMAT,
      "finished": True,
      "steps": step,
      "total_steps": total_steps,
      "wall_time_s": time.time() - start_time,
      "config": {"variant": config.get("variant"), "seed": config.seed,
                 "label_fraction": config.label_fraction,
                 "label_fraction_seed": config.label_fraction_seed,
                 "init": config.model.init, "model": config.model.name,
                 "freeze_encoder": config.freeze_encoder, "data_source": config.data.source,
                 "dice_weight": config.loss.dice_weight, "threshold": config.threshold},
      "initialisation": init_description,
      "divergence_warnings": divergence.warnings,
      "num_train_masks": len(train_source),
      "subset_manifest": SUBSET_MANIFEST_FILE,
      "best": {"metric": BEST_METRIC, "split": config.data.val_split,
               "step": int(best_state.step), "value": float(best_state.value)},
      "val": val_metrics,
      "test_sets": test_results,
  }
  write_json(os.path.join(workdir, RESULTS_FILE), results)
  if jax.process_index() == 0:
    print(f"Segmentation fine-tuning finished: {step} steps, {len(train_source)} masks, "
          f"{init_description}; best validation Dice {results['best']['value']:.4f} at step "
          f"{results['best']['step']} ({time.time() - start_time:.1f} s)\n"
          + format_results(results) + f"\n  results        {workdir}/{RESULTS_FILE}", flush=True)
  return results
