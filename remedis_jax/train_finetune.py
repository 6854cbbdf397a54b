"""Supervised fine-tuning and evaluation of a BiT encoder (REMEDIS stage 3).

One readable trainer, top to bottom: config check -> mesh -> data (label-fraction subset) ->
model and optimiser -> sharded state -> update step -> restore -> loop (validation picks the
best checkpoint) -> final evaluation of the BEST checkpoint on every named test set, plus
robustness under test-time perturbations. Entry point:

  python -m remedis_jax.main --config=configs/finetune.py:tiny --workdir=workdirs/ft

Distillation (`config.distill.teacher`, remedis_jax/distillation.py): a finished fine-tuning
run on the same labeled subset labels every other training image, and the student trains on
all of them (SimCLR v2's third step).

Initialisation (`config.model.init`): scratch, a BiT `.npz`, a pretraining workdir or an export
(initialization.load_init). `config.finetune_mode="linear"` freezes the encoder (optimiser
`frozen` mask: zero updates, no optimiser state; features also get a stop-gradient so no
backward pass runs through the encoder). `config.model.from_head_layer=True` puts the first
layer of the pretrained SimCLR projection head between the encoder and the classifier (SimCLR
v2 fine-tunes from there). The classifier is a zero-initialised Dense layer (BiT), trained with
softmax cross-entropy (multi-class) or sigmoid cross-entropy (multi-label).

Best checkpoint. Validation runs at `num_evaluations` evenly spaced steps (or, with 0, every
`eval_every_steps`), always at the last step; when
`config.best_metric` on the validation split improves (strictly; NaN never counts as an
improvement unless nothing was kept yet), the parameters are saved to WORKDIR/best/ together
with the step and the value. WORKDIR/checkpoints/ keeps the latest training state for resume.
The final evaluation restores WORKDIR/best/, chooses the operating thresholds on validation
(Youden's J, evaluators/classification.py) and evaluates every test set.

Test sets (`config.test_sets`, forms in TEST_SET_FORMS): splits of the run's data, or of another
dataset of any file kind (another hospital's MedMNIST-layout .npz, folder + CSV, ArrayRecord
shards, TFDS), read with the run's own image size, channels and eval ops. Before any model runs,
such a dataset is checked against the run (`check_other_dataset`: its labels are the run's
classes, its channels and image size are what the run takes), each failure naming the file and
the field. experiments/evaluate_run.py scores a finished run on such a dataset afterwards.

Resume: rerunning the same command continues from WORKDIR/checkpoints/; a run whose
results.json exists returns it without doing anything (use a fresh workdir for a new run).

WORKDIR/results.json (what sweeps read), schema "remedis-jax-finetune-results/1":
  format            "remedis-jax-finetune-results/1"
  finished          true
  steps, total_steps, wall_time_s
  config            {variant, recipe, seed, finetune_mode, label_fraction, label_fraction_seed,
                     init, from_head_layer, model, data_source, task}
  initialisation    how the encoder was initialised (text)
  divergence_warnings  the loss or parameter norm blew up while finite (texts; [] normally)
  num_train_labels  labeled training records used (after the label fraction)
  subset_manifest   "subset_manifest.json" (ids of the records used, class counts)
  distillation      null, or with config.distill.teacher (remedis_jax/distillation.py):
                    {teacher, teacher_step, teacher_best, temperature, num_records (trained
                    on), num_labeled (of them with their own labels)}
  task              {multi_label, num_classes, class_names}
  best              {metric, split, step, value}
  thresholds        {method: "youden_j_on_validation", values: [...] (one per thresholded
                     column: 1 for binary, K otherwise)}
  val               {metric: value} on the validation split at the thresholds
  test_sets         {name: {split, sites, [data,] num_examples, roc_file, metrics: {metric:
                     value}}}; `data` only for a test set of another dataset: the data keys
                     that replaced the run's ({source, path, ...})
  robustness        {test set name: {perturbation: {metric: value}}}
  baselines         {model: {metric: value}} (published numbers, when the config has them)
Metric keys (classification_metrics): macro_auc, auc/<class>, accuracy, balanced_accuracy, ece,
sensitivity, specificity (+ /<class> and threshold/<class> for more than one column; threshold
for binary), num_examples. NaN (e.g. AUC of a class absent from a test set) is written as null.
WORKDIR/roc/<name>.json: {class: {fpr: [...], tpr: [...], thresholds: [...]}} per test set.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from data_pipelines import sources as data_sources
from data_pipelines import storage
from remedis_jax import distillation, initialization, losses, models, sharding
from remedis_jax import supervised, train_state
from remedis_jax.test_sets import (Task, TestSet, build_eval_sources, check_other_dataset_exists,
                                   parse_test_sets)
from remedis_jax.evaluators import classification, robustness
from remedis_jax.train_state import normalize_images, put_host_tree

RESULTS_FORMAT = "remedis-jax-finetune-results/1"
ROC_DIR = "roc"
FINETUNE_MODES = ("full", "linear")
BEST_METRICS = ("macro_auc", "accuracy", "balanced_accuracy")


# ------------------------------------------------------------------------------ config check
def check_config(config: ml_collections.ConfigDict) -> list[TestSet]:
  """Fails fast, before any data or model is built, on values that cannot work.

  Returns:
    The parsed test sets.

  Raises:
    ValueError / FileNotFoundError: naming the config key, the value and the fix.
  """
  fraction = config.label_fraction
  if not 0.0 < float(fraction) <= 1.0:
    raise ValueError(f"config.label_fraction={fraction} must be in (0, 1] (e.g. 0.01 for 1% of "
                     "the labels, 1.0 for all)")
  if config.finetune_mode not in FINETUNE_MODES:
    raise ValueError(f"config.finetune_mode={config.finetune_mode!r}; expected one of "
                     f"{FINETUNE_MODES}")
  if config.best_metric not in BEST_METRICS:
    raise ValueError(f"config.best_metric={config.best_metric!r}; expected one of {BEST_METRICS}")
  init = supervised.check_common_config(
      config, "a BiT .npz, a pretraining workdir, an export folder")
  if config.model.from_head_layer and init.lower() in initialization.SCRATCH:
    raise ValueError("config.model.from_head_layer=True needs a pretrained projection head: set "
                     "config.model.init to a SimCLR workdir or an export written with "
                     "--include_head")
  distill = config.get("distill")
  if distill is not None and distill.teacher:
    if float(distill.temperature) <= 0:
      raise ValueError(f"config.distill.temperature={distill.temperature} must be > 0")
    if config.loss.class_weights:
      raise ValueError(f"config.loss.class_weights={config.loss.class_weights!r} does not apply "
                       "to distillation targets (config.distill.teacher is set): set it to ''")
    distillation.teacher_path(config)  # placeholders check
  robustness.parse_perturbations(config.robustness.perturbations)
  test_sets = parse_test_sets(config.test_sets, config.data.source)
  names = [t.name for t in test_sets]
  for name in config.robustness.test_sets:
    if name and name not in names:
      raise ValueError(f"config.robustness.test_sets names {name!r}, which is not in "
                       f"config.test_sets ({', '.join(names)})")
  for test_set in test_sets:
    if test_set.data:
      check_other_dataset_exists(test_set)
  return test_sets


def score_test_set(evaluator: classification.ClassificationEvaluator, params,
                   thresholds: np.ndarray | None, test_set: TestSet,
                   workdir: str) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
  """One test set at the validation thresholds: (its results.json entry, labels, probabilities).

  Its ROC curves go to WORKDIR/roc/<name>.json; another dataset's entry also says which
  (`data`: the keys that replaced the run's).
  """
  labels, probs = evaluator.predict(params)
  metrics = evaluator.metrics(labels, probs, thresholds)
  roc_file = os.path.join(ROC_DIR, f"{test_set.name}.json")
  supervised.write_json(storage.join(workdir, roc_file), classification.roc_curves(
      labels, probs, multi_label=evaluator.multi_label, class_names=evaluator.class_names))
  entry = {"split": test_set.split, "sites": test_set.sites}
  if test_set.data:
    entry["data"] = dict(test_set.data)
  entry.update(num_examples=int(labels.shape[0]), roc_file=roc_file, metrics=metrics)
  return entry, labels, probs


def class_weights_from_config(spec: str, labels: np.ndarray, num_classes: int,
                              multi_label: bool) -> np.ndarray | None:
  """`config.loss.class_weights` -> (K,) float32 weights or None.

  "balanced" is scikit-learn's rule n / (K * n_k) over the labeled TRAINING subset (multi-class
  only; a class with no example gets weight 0).

  Raises:
    ValueError: an unparsable list, the wrong length, or "balanced" for multi-label data.
  """
  spec = str(spec or "").strip()
  if not spec:
    return None
  if spec == "balanced":
    if multi_label:
      raise ValueError("config.loss.class_weights='balanced' is defined for multi-class labels; "
                       "for multi-label data give explicit weights 'w1,w2,...'")
    labels = labels[labels >= 0]
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 0.0)
    return weights.astype(np.float32)
  try:
    weights = np.array([float(w) for w in spec.split(",")], np.float32)
  except ValueError:
    raise ValueError(f"config.loss.class_weights={spec!r}: expected '', 'balanced' or "
                     "comma-separated numbers") from None
  if weights.shape != (num_classes,):
    raise ValueError(f"config.loss.class_weights has {weights.size} values for {num_classes} "
                     "classes")
  return weights


# ------------------------------------------------------------------------------------ model
class FirstHeadLayer(nn.Module):
  """Layer 0 of `models.ProjectionHead` (Dense -> LayerNorm -> ReLU), with the same names.

  The parameters (`hidden_0`, `hidden_0_norm`) load from a pretraining run's `head` tree.
  """
  width: int
  norm: str = "layer"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    with_norm = self.norm == "layer"
    x = nn.Dense(self.width, use_bias=not with_norm, dtype=self.dtype, name="hidden_0")(x)
    if with_norm:
      x = nn.LayerNorm(dtype=jnp.float32, name="hidden_0_norm")(x)
    return nn.relu(x).astype(jnp.float32)


class FinetuneModel(nn.Module):
  """Encoder -> [first projection-head layer] -> zero-initialised linear classifier.

  Parameters: `encoder` (a `create_model` tree), `head` (only with a head layer), `classifier`.
  Returns `(logits float32 (B, K), intermediates)`; intermediates are the encoder's plus
  `features` (the classifier's input).

  Attributes:
    encoder: a ResNetV2 without classification head.
    num_classes: K.
    head_width: width of the first projection-head layer; 0 = classify from pre_logits.
    head_norm: "layer" or "none", as in pretraining.
    linear: stop gradients at the classifier input (linear evaluation: no encoder backward).
  """
  encoder: nn.Module
  num_classes: int
  head_width: int = 0
  head_norm: str = "layer"
  linear: bool = False

  @nn.compact
  def __call__(self, images, train: bool = False):
    _, intermediates = self.encoder(images, train=train)
    features = intermediates["pre_logits"]
    if self.head_width:
      features = FirstHeadLayer(self.head_width, self.head_norm, dtype=self.encoder.dtype,
                                name="head")(features)
    if self.linear:
      features = jax.lax.stop_gradient(features)
    # BiT: a zero-initialised head, so fine-tuning starts from a uniform prediction.
    logits = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, dtype=jnp.float32,
                      name="classifier")(features)
    intermediates = dict(intermediates, features=features)
    return logits.astype(jnp.float32), intermediates


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> FinetuneModel:
  model_cfg = config.model
  encoder = models.create_model(model_cfg.name, num_classes=None,
                                dtype=models.DTYPES[model_cfg.dtype], remat=model_cfg.remat,
                                stem=model_cfg.get("stem", "bit"))
  head_width = int(model_cfg.head_hidden_dims[0]) if model_cfg.from_head_layer else 0
  return FinetuneModel(encoder=encoder, num_classes=num_classes, head_width=head_width,
                       head_norm=model_cfg.head_norm, linear=config.finetune_mode == "linear")


def frozen_regexes(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Linear evaluation freezes everything below the classifier."""
  if config.finetune_mode != "linear":
    return ()
  return ("encoder/.*",) + (("head/.*",) if config.model.from_head_layer else ())


# ------------------------------------------------------------------------------ update step
def make_loss_fn(model: nn.Module, *, multi_label: bool, class_weights: np.ndarray | None,
                 soft_targets: bool = False, temperature: float = 1.0) -> Callable:
  """`loss_fn(params, images, labels) -> (loss, metrics)` for the supervised update step.

  `images` are uint8 (B, H, W, C); `labels` int32 (B,) or float32 (B, K), -1 for unlabeled
  records (weight 0). `soft_targets` (distillation): `labels` are float32 (B, K) class
  probabilities, matched by the student's softmax (or sigmoids) at `temperature`.
  """
  weights_per_class = None if class_weights is None else jnp.asarray(class_weights, jnp.float32)

  def loss_fn(params, images, labels):
    logits, _ = model.apply({"params": params}, normalize_images(images), train=True)
    metrics = {}
    if soft_targets:
      weights = jnp.all(labels >= 0, axis=-1).astype(jnp.float32)
      scaled, targets = logits / temperature, jnp.maximum(labels, 0)
      if multi_label:
        loss = losses.sigmoid_cross_entropy(scaled, targets, weights)
      else:
        loss = losses.soft_cross_entropy(scaled, targets, weights)
        agree = jnp.argmax(logits, -1) == jnp.argmax(targets, -1)
        metrics["accuracy"] = (agree * weights).sum() / jnp.maximum(weights.sum(), 1.0)
    elif multi_label:
      weights = jnp.all(labels >= 0, axis=-1).astype(jnp.float32)
      loss = losses.sigmoid_cross_entropy(logits, jnp.maximum(labels, 0), weights,
                                          weights_per_class)
    else:
      weights = (labels >= 0).astype(jnp.float32)
      loss = losses.softmax_cross_entropy(logits, jnp.maximum(labels, 0), weights,
                                          weights_per_class)
      correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32) * weights
      metrics["accuracy"] = correct.sum() / jnp.maximum(weights.sum(), 1.0)
    metrics["loss"] = loss
    return loss, metrics

  return loss_fn


def make_predict_fn(model: nn.Module, multi_label: bool) -> Callable:
  """`predict(params, images uint8) -> probabilities` (sigmoid or softmax), jitted."""

  def predict(params, images):
    logits, _ = model.apply({"params": params}, normalize_images(images), train=False)
    return jax.nn.sigmoid(logits) if multi_label else jax.nn.softmax(logits, axis=-1)

  return jax.jit(predict)


def teacher_predict_fn(teacher: distillation.Teacher, mesh, *, num_classes: int,
                       multi_label: bool, temperature: float) -> Callable:
  """`predict(this process's uint8 images) -> (global batch, K)` teacher probabilities at
  `temperature`: the teacher's own model (its config.json), its parameters replicated."""
  model = build_model(teacher.config, num_classes)
  abstract = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros(
          (1, teacher.config.data.image_size, teacher.config.data.image_size,
           teacher.config.data.num_channels), jnp.float32))["params"])
  params = models.merge_params(teacher.params, abstract)  # names any key that does not fit
  params = put_host_tree(params, jax.tree.map(lambda _: sharding.replicated(mesh), params))
  batch_sharding = sharding.batch_sharding(mesh)

  @jax.jit
  def probabilities(params, images, temperature):  # one program for every temperature
    logits, _ = model.apply({"params": params}, normalize_images(images), train=False)
    logits = logits.astype(jnp.float32) / temperature
    return jax.nn.sigmoid(logits) if multi_label else jax.nn.softmax(logits, axis=-1)

  def predict(local_images):
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    images = sharding.shard_host_batch({"image": local_images}, batch_sharding)["image"]
    return multihost_utils.process_allgather(
        probabilities(params, images, jnp.float32(temperature)), tiled=True)

  return predict


def scale_encoder_updates(tx: optax.GradientTransformation, *, multiplier: float,
                          frozen_steps: int) -> optax.GradientTransformation:
  """Encoder updates x0 for the first `frozen_steps`, then x`multiplier`; others unchanged.

  Fine-tuning a pretrained encoder at the head's learning rate can overwrite what pretraining
  learned before the zero-initialised head is useful. Two remedies (Kumar et al. 2022, "Fine-
  Tuning can Distort Pretrained Features"): train the head alone first (linear probe, then
  fine-tune) and/or a lower encoder learning rate. Scaling the optimiser's final updates is a
  learning-rate multiplier for SGD and Adam alike (AdamW's decoupled decay is scaled with it).
  With the defaults (1.0, 0) `tx` is returned unchanged, so its state matches older checkpoints.

  Args:
    tx: the optimiser.
    multiplier: the encoder's share of the learning rate after the frozen steps (>= 0).
    frozen_steps: leading steps in which the encoder does not move (>= 0).

  Returns:
    The wrapped optimiser.

  Raises:
    ValueError: a negative multiplier or step count.
  """
  if multiplier < 0 or frozen_steps < 0:
    raise ValueError(f"config.encoder_lr_multiplier={multiplier} and config.encoder_frozen_steps="
                     f"{frozen_steps} must be >= 0")
  if multiplier == 1.0 and frozen_steps == 0:
    return tx
  encoder_scale = lambda step: jnp.where(step < frozen_steps, 0.0, multiplier)
  encoder_mask = lambda params: {key: jax.tree.map(lambda _, k=key: k == "encoder", value)
                                 for key, value in params.items()}
  return optax.chain(tx, optax.masked(optax.scale_by_schedule(encoder_scale), encoder_mask))


def create_train_setup(config: ml_collections.ConfigDict, mesh, *, num_classes: int,
                       multi_label: bool, total_steps: int, warmup_steps: int,
                       class_weights: np.ndarray | None = None,
                       soft_targets: bool = False) -> train_state.TrainSetup:
  """Model, optimiser (frozen encoder in linear mode), sharded state init and jitted steps.

  Args:
    config: the run config (model, optimizer, finetune_mode, encoder learning-rate options,
      batch_size, data.image_size and data.num_channels, param_sharding).
    mesh: the device mesh.
    num_classes: K, the classifier's outputs.
    multi_label: sigmoid (True) or softmax (False) cross-entropy.
    total_steps: schedule length.
    warmup_steps: linear warm-up length.
    class_weights: optional (K,) loss weights.
    soft_targets: train on distillation targets (float (B, K) labels) at
      config.distill.temperature.
  """
  model = build_model(config, num_classes)
  frozen_fraction = float(config.get("encoder_frozen_fraction", 0.0))
  if not 0.0 <= frozen_fraction < 1.0:
    raise ValueError(f"config.encoder_frozen_fraction={frozen_fraction} must be in [0, 1)")
  wrap = functools.partial(
      scale_encoder_updates, multiplier=float(config.get("encoder_lr_multiplier", 1.0)),
      frozen_steps=int(round(frozen_fraction * total_steps)))
  return supervised.build_setup(
      config, mesh, model, total_steps=total_steps, warmup_steps=warmup_steps,
      frozen=frozen_regexes(config), wrap_optimizer=wrap,
      loss_fn=make_loss_fn(model, multi_label=multi_label, class_weights=class_weights,
                           soft_targets=soft_targets,
                           temperature=float(config.distill.temperature) if soft_targets else 1.0),
      target_key="label", metric_names=("loss",) if multi_label else ("loss", "accuracy"),
      predict_fn=make_predict_fn(model, multi_label))


def load_pretrained(config, state: train_state.TrainState,
                    setup: train_state.TrainSetup) -> tuple[train_state.TrainState, str]:
  """Fills the encoder (and the first head layer) from `config.model.init`; else keeps `state`.

  Raises:
    ValueError: the weights do not fit the model (merge_params names every key), or
      from_head_layer without a head in the init.
  """
  state, loaded = supervised.load_encoder(config, state, setup)
  if loaded is None:
    return state, "scratch"
  description = loaded.description
  if config.model.from_head_layer:
    if loaded.head is None:
      raise ValueError(f"config.model.from_head_layer=True but config.model.init="
                       f"{config.model.init} has no projection head; export it with "
                       "--include_head or use the pretraining workdir")
    first_layer = {k: v for k, v in loaded.head.items() if k in ("hidden_0", "hidden_0_norm")}
    params = dict(state.params)
    params["head"] = put_host_tree(
        models.merge_params(first_layer, setup.abstract_state.params["head"]),
        setup.state_shardings.params["head"])
    state = state.replace(params=params)
    description += " (from the first projection-head layer)"
  return state, description


# ---------------------------------------------------------------------------------- helpers
def format_results(results: dict[str, Any]) -> str:
  """A table of the final metrics per test set (and the published baselines, if any)."""
  columns = ("macro_auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "ece")
  fmt = lambda v: "   n/a" if v is None else f"{v:6.3f}"
  width = max([len(n) for n in results["test_sets"]] + [len(n) for n in results.get(
      "baselines", {})] + [12])
  lines = ["  " + "test set".ljust(width) + "  " + "  ".join(c[:9].rjust(9) for c in columns)]
  for name, entry in results["test_sets"].items():
    m = entry["metrics"]
    lines.append("  " + name.ljust(width) + "  " + "  ".join(fmt(m.get(c)).rjust(9)
                                                           for c in columns))
  for name, baseline in results.get("baselines", {}).items():
    lines.append("  " + f"[{name}]".ljust(width) + "  " + "  ".join(
        fmt(baseline.get(c)).rjust(9) for c in columns))
  for name, per_perturbation in results.get("robustness", {}).items():
    lines.append(f"  robustness of {name} (macro AUC): " + ", ".join(
        f"{p} {fmt(m.get('macro_auc')).strip()}" for p, m in per_perturbation.items()))
  return "\n".join(lines)


# ------------------------------------------------------------------------------------ train
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Fine-tunes, keeps the best checkpoint on validation, evaluates it on every test set.

  `config`: a configs/finetune.py config. A finished `workdir` returns its results.json (schema
  in the module docstring) at once; an unfinished one resumes. Raises what `check_config` and
  `supervised.run` / `supervised.train` raise.
  """
  return supervised.run(config, workdir, check_config, _train_and_evaluate)


def _train_and_evaluate(config, workdir, start_time, test_sets):
  writer, mesh = supervised.start(config, workdir)

  # ---- data: the label-fraction subset of the training split
  full_train = data_sources.build_source(config.data, config.data.train_split)
  if full_train.num_classes < 1:
    raise ValueError(f"{full_train.name} has no classes: fine-tuning needs labeled data "
                     f"(data.train_split={config.data.train_split!r})")
  num_classes, multi_label = full_train.num_classes, full_train.multi_label
  class_names = list(full_train.class_names)
  distilled = {}  # filled by the teacher's pass when config.distill.teacher is set

  def distillation_targets(labeled):
    teacher = distillation.load_teacher(
        distillation.teacher_path(config), num_classes=num_classes, multi_label=multi_label,
        class_names=class_names, label_fraction=config.label_fraction,
        label_fraction_seed=config.label_fraction_seed, labeled_ids=labeled.ids)
    source = distillation.build_soft_targets(
        full_train, labeled, teacher_predict_fn(teacher, mesh, num_classes=num_classes,
                                                multi_label=multi_label,
                                                temperature=config.distill.temperature),
        ops=supervised.eval_ops(teacher.config), batch_size=config.eval_batch_size,
        num_channels=teacher.config.data.num_channels,
        skip_bad_records=config.data.skip_bad_records,
        max_bad_record_share=config.data.get("max_bad_record_share", 0.1))
    distilled.update(teacher=teacher.workdir, teacher_step=teacher.step,
                     teacher_best=teacher.best, temperature=float(config.distill.temperature),
                     num_records=len(source), num_labeled=source.num_labeled)
    logging.info("Distillation: teacher %s (best step %d), %d training records, %d of them with "
                 "their own labels, temperature %g", teacher.workdir, teacher.step, len(source),
                 source.num_labeled, config.distill.temperature)
    return source

  soft_targets = bool(config.get("distill") and config.distill.teacher)
  stream = supervised.training_stream(config, full_train, workdir,
                                      train_on=distillation_targets if soft_targets else None)
  train_source, total_steps = stream.source, stream.total_steps
  eval_ops = supervised.eval_ops(config)
  logging.info("Labels per class: %s", train_source.class_counts())
  class_weights = class_weights_from_config(config.loss.class_weights, train_source.labels,
                                            num_classes, multi_label)

  # ---- model, optimiser, sharded state and the jitted steps
  setup = create_train_setup(config, mesh, num_classes=num_classes, multi_label=multi_label,
                             total_steps=total_steps, warmup_steps=stream.warmup_steps,
                             class_weights=class_weights, soft_targets=soft_targets)
  logging.info("Fine-tuning mode: %s", config.finetune_mode)

  evaluator_kwargs = dict(ops=eval_ops, batch_size=config.eval_batch_size, mesh=mesh,
                          num_channels=config.data.num_channels, num_bins=config.ece_bins)
  val_source, test_sources = build_eval_sources(
      config, test_sets, Task(num_classes, multi_label, class_names))
  val_evaluator = classification.ClassificationEvaluator(setup.predict_fn, val_source,
                                                         **evaluator_kwargs)

  # ---- the shared supervised loop: restore or init, train, keep the best on validation
  outcome = supervised.train(
      config, workdir, setup=setup, mesh=mesh, writer=writer, stream=stream,
      init=lambda state: load_pretrained(config, state, setup),
      validate=val_evaluator.run, best_metric=config.best_metric)
  if outcome.preempted:
    return supervised.preempted_results(outcome)

  # ---- final evaluation of the BEST checkpoint
  step, best_state = outcome.steps, outcome.best
  params = best_state.params
  val_labels, val_probs = val_evaluator.predict(params)
  thresholds = classification.choose_thresholds(val_labels, val_probs, multi_label)
  val_metrics = val_evaluator.metrics(val_labels, val_probs, thresholds)
  perturbations = robustness.parse_perturbations(config.robustness.perturbations)
  robust_names = {n or test_sets[0].name for n in config.robustness.test_sets} if perturbations \
      else set()
  test_results, robust_results = {}, {}
  for test_set in test_sets:
    evaluator = classification.ClassificationEvaluator(
        setup.predict_fn, test_sources[test_set.name], **evaluator_kwargs)
    test_results[test_set.name], _, _ = score_test_set(evaluator, params, thresholds, test_set,
                                                       workdir)
    metrics = test_results[test_set.name]["metrics"]
    writer.write_scalars(step, {f"test/{test_set.name}/{k}": v for k, v in metrics.items()})
    if test_set.name in robust_names:
      robust_results[test_set.name] = robustness.evaluate_robustness(
          evaluator, params, perturbations, thresholds)
      writer.write_scalars(step, {
          f"robustness/{test_set.name}/{p}/{k}": v
          for p, m in robust_results[test_set.name].items() for k, v in m.items()
          if k in ("macro_auc", "accuracy")})
  writer.flush()

  return supervised.finish(workdir, RESULTS_FORMAT, outcome, start_time, {
      "config": {"variant": config.get("variant"), "recipe": config.get("recipe"),
                 "seed": config.seed, "finetune_mode": config.finetune_mode,
                 "label_fraction": config.label_fraction,
                 "label_fraction_seed": config.label_fraction_seed,
                 "init": config.model.init, "from_head_layer": config.model.from_head_layer,
                 "model": config.model.name, "data_source": config.data.source,
                 "task": config.data.get("task")},
      "initialisation": outcome.initialisation,
      "divergence_warnings": outcome.divergence_warnings,
      "num_train_labels": len(train_source),
      "subset_manifest": supervised.SUBSET_MANIFEST_FILE,
      "distillation": distilled or None,
      "task": {"multi_label": multi_label, "num_classes": num_classes,
               "class_names": class_names},
      "best": {"metric": config.best_metric, "split": config.data.val_split,
               "step": int(best_state.step), "value": float(best_state.value)},
      "thresholds": {"method": "youden_j_on_validation", "values": thresholds.tolist()},
      "val": val_metrics,
      "test_sets": test_results,
      "robustness": robust_results,
      "baselines": config.baselines.to_dict() if config.get("baselines") else {},
  }, headline=(f"Fine-tuning finished: {step} steps, {len(train_source)} labels, "
               + (f"distilled from {distilled['teacher']} on {distilled['num_records']} "
                  "records, " if distilled else "")
               + f"{outcome.initialisation}, mode {config.finetune_mode}; best validation "
               f"{config.best_metric} {float(best_state.value):.4f} at step "
               f"{int(best_state.step)}"), table=format_results)
