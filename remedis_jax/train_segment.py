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
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from data_pipelines import sources as data_sources
from data_pipelines import storage
from remedis_jax import initialization, models, supervised, train_state
from remedis_jax.evaluators import segmentation as seg_metrics
from remedis_jax.models import segmentation as seg_models
from remedis_jax.test_sets import TestSet, build_eval_sources, parse_test_sets
from remedis_jax.train_state import normalize_images

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
  init = supervised.check_common_config(
      config, "a pretraining workdir (e.g. workdirs/gmml/pretrain), an export folder, a BiT .npz")
  if config.freeze_encoder and init.lower() in initialization.SCRATCH:
    raise ValueError("config.freeze_encoder=True with config.model.init='' would train a decoder "
                     "on random features; set config.model.init to a pretraining run")
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
      dtype=models.DTYPES[model_cfg.dtype], remat=model_cfg.remat)
  # create_segmentation_model takes no stem: the encoder is rebuilt with the config's.
  return model.clone(encoder=models.create_model(
      model_cfg.name, num_classes=None, dtype=models.DTYPES[model_cfg.dtype],
      remat=model_cfg.remat, stem=model_cfg.get("stem", "bit")))


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
def make_loss_fn(model: seg_models.SegmentationModel, dice_weight: float) -> Callable:
  """`loss_fn(params, images, masks) -> (loss, metrics)` for the supervised update step:
  `images` uint8 (B, H, W, C), `masks` uint8 (B, H, W)."""

  def loss_fn(params, images, masks):
    logits, _ = model.apply({"params": params}, normalize_images(images), train=True)
    loss, metrics = segmentation_loss(logits[..., 0], masks, dice_weight)
    metrics["loss"] = loss
    return loss, metrics

  return loss_fn


def make_predict_fn(model: seg_models.SegmentationModel) -> Callable:
  """`predict(params, images uint8) -> lung probabilities (B, H, W)`, jitted."""

  def predict(params, images):
    logits, _ = model.apply({"params": params}, normalize_images(images), train=False)
    return jax.nn.sigmoid(logits[..., 0])

  return jax.jit(predict)


def create_train_setup(config: ml_collections.ConfigDict, mesh, *, total_steps: int,
                       warmup_steps: int) -> train_state.TrainSetup:
  """Model, optimiser (frozen encoder if asked), sharded state init and jitted steps.

  Args:
    config: the run config (model, optimizer, loss, freeze_encoder, batch_size,
      data.image_size and data.num_channels, param_sharding).
    mesh: the device mesh.
    total_steps: schedule length.
    warmup_steps: linear warm-up length.
  """
  model = build_model(config)
  return supervised.build_setup(
      config, mesh, model, total_steps=total_steps, warmup_steps=warmup_steps,
      frozen=("encoder/.*",) if config.freeze_encoder else (),
      loss_fn=make_loss_fn(model, float(config.loss.dice_weight)), target_key="lung_mask",
      metric_names=("loss", "bce", "soft_dice_loss", "dice"), predict_fn=make_predict_fn(model))


def load_pretrained(config, state: train_state.TrainState,
                    setup: train_state.TrainSetup) -> tuple[train_state.TrainState, str]:
  """Fills the encoder from `config.model.init` (the decoder stays fresh); else keeps `state`."""
  state, loaded = supervised.load_encoder(config, state, setup)
  return state, "scratch" if loaded is None else loaded.description


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

  `config`: a configs/segment.py config. Data without masks is refused before training; the
  rest is `train_finetune.train_and_evaluate`'s contract (results.json schema above).
  """
  return supervised.run(config, workdir, check_config, _train_and_evaluate)


def _train_and_evaluate(config, workdir, start_time, test_sets):
  writer, mesh = supervised.start(config, workdir)

  # ---- data: the label-fraction subset of the training masks
  full_train = data_sources.build_source(config.data, config.data.train_split)
  require_masks(full_train, f"data.train_split={config.data.train_split!r}")
  stream = supervised.training_stream(config, full_train, workdir)
  train_source, total_steps = stream.source, stream.total_steps
  eval_ops = supervised.eval_ops(config)

  # ---- model, optimiser, sharded state and the jitted steps
  setup = create_train_setup(config, mesh, total_steps=total_steps,
                             warmup_steps=stream.warmup_steps)
  logging.info("Frozen encoder: %s", config.freeze_encoder)
  evaluator_kwargs = dict(ops=eval_ops, batch_size=config.eval_batch_size, mesh=mesh,
                          num_channels=config.data.num_channels, threshold=config.threshold)
  val_source, test_sources = build_eval_sources(config, test_sets)
  require_masks(val_source, f"data.val_split={config.data.val_split!r}")
  for test_set in test_sets:
    require_masks(test_sources[test_set.name], f"config.test_sets {test_set.name!r}")
  val_evaluator = seg_metrics.SegmentationEvaluator(setup.predict_fn, val_source,
                                                    **evaluator_kwargs)

  # ---- the shared supervised loop: restore or init, train, keep the best on validation
  outcome = supervised.train(
      config, workdir, setup=setup, mesh=mesh, writer=writer, stream=stream,
      init=lambda state: load_pretrained(config, state, setup),
      validate=val_evaluator.run, best_metric=BEST_METRIC)
  if outcome.preempted:
    return supervised.preempted_results(outcome)

  # ---- final evaluation of the BEST checkpoint
  step, best_state = outcome.steps, outcome.best
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
          samples, storage.join(workdir, figure), threshold=config.threshold,
          title=f"{test_set.name} ({test_set.split}@{test_set.sites or 'config sites'}): "
                f"Dice {metrics['dice']:.3f}, {outcome.initialisation}")
    test_results[test_set.name] = {"split": test_set.split, "sites": test_set.sites,
                                   "num_examples": metrics["num_examples"],
                                   "figure": figure if config.num_figure_examples > 0 else None,
                                   "metrics": metrics}
    writer.write_scalars(step, {f"test/{test_set.name}/{k}": v for k, v in metrics.items()})
  writer.flush()

  return supervised.finish(workdir, RESULTS_FORMAT, outcome, start_time, {
      "config": {"variant": config.get("variant"), "seed": config.seed,
                 "label_fraction": config.label_fraction,
                 "label_fraction_seed": config.label_fraction_seed,
                 "init": config.model.init, "model": config.model.name,
                 "freeze_encoder": config.freeze_encoder, "data_source": config.data.source,
                 "dice_weight": config.loss.dice_weight, "threshold": config.threshold},
      "initialisation": outcome.initialisation,
      "divergence_warnings": outcome.divergence_warnings,
      "num_train_masks": len(train_source),
      "subset_manifest": supervised.SUBSET_MANIFEST_FILE,
      "best": {"metric": BEST_METRIC, "split": config.data.val_split,
               "step": int(best_state.step), "value": float(best_state.value)},
      "val": val_metrics,
      "test_sets": test_results,
  }, headline=(f"Segmentation fine-tuning finished: {step} steps, {len(train_source)} masks, "
               f"{outcome.initialisation}; best validation Dice {float(best_state.value):.4f} "
               f"at step {int(best_state.step)}"), table=format_results)
