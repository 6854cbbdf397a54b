"""Supervised fine-tuning and evaluation of a BiT encoder (REMEDIS stage 3).

One readable trainer, top to bottom: config check -> mesh -> data (label-fraction subset) ->
model and optimiser -> sharded state -> update step -> restore -> loop (validation picks the
best checkpoint) -> final evaluation of the BEST checkpoint on every named test set, plus
robustness under test-time perturbations. Entry point:

  python -m remedis_jax.main --config=configs/finetune.py:tiny --workdir=workdirs/ft

Initialisation (`config.model.init`): scratch, a BiT `.npz`, a pretraining workdir or an export
(initialization.load_init). `config.finetune_mode="linear"` freezes the encoder (optimiser
`frozen` mask: zero updates, no optimiser state; features also get a stop-gradient so no
backward pass runs through the encoder). `config.model.from_head_layer=True` puts the first
layer of the pretrained SimCLR projection head between the encoder and the classifier (SimCLR
v2 fine-tunes from there). The classifier is a zero-initialised Dense layer (BiT), trained with
softmax cross-entropy (multi-class) or sigmoid cross-entropy (multi-label).

Best checkpoint. Validation runs every `eval_every_steps` and at the last step; when
`config.best_metric` on the validation split improves (strictly; NaN never counts as an
improvement unless nothing was kept yet), the parameters are saved to WORKDIR/best/ together
with the step and the value. WORKDIR/checkpoints/ keeps the latest training state for resume.
The final evaluation restores WORKDIR/best/, chooses the operating thresholds on validation
(Youden's J, evaluators/classification.py) and evaluates every test set.

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
  task              {multi_label, num_classes, class_names}
  best              {metric, split, step, value}
  thresholds        {method: "youden_j_on_validation", values: [...] (one per thresholded
                     column: 1 for binary, K otherwise)}
  val               {metric: value} on the validation split at the thresholds
  test_sets         {name: {split, sites, num_examples, roc_file, metrics: {metric: value}}}
  robustness        {test set name: {perturbation: {metric: value}}}
  baselines         {model: {metric: value}} (published numbers, when the config has them)
Metric keys (classification_metrics): macro_auc, auc/<class>, accuracy, balanced_accuracy, ece,
sensitivity, specificity (+ /<class> and threshold/<class> for more than one column; threshold
for binary), num_examples. NaN (e.g. AUC of a class absent from a test set) is written as null.
WORKDIR/roc/<name>.json: {class: {fpr: [...], tpr: [...], thresholds: [...]}} per test set.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Callable, NamedTuple, Sequence

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
from data_pipelines import subset as subset_lib
from remedis_jax import checkpointing, initialization, losses, models, optimizers
from remedis_jax import loop, preemption, sharding, workdir_lock, writers
from remedis_jax.evaluators import classification, robustness
from remedis_jax.train_simclr import DTYPES, normalize_images, put_host_tree, write_run_config

RESULTS_FILE = "results.json"
RESULTS_FORMAT = "remedis-jax-finetune-results/1"
SUBSET_MANIFEST_FILE = "subset_manifest.json"
ROC_DIR = "roc"
BEST_DIR = "best"
FINETUNE_MODES = ("full", "linear")
BEST_METRICS = ("macro_auc", "accuracy", "balanced_accuracy")
# BiT-HyperRule schedule by training-set size: (max examples, warm-up steps, total steps).
HYPERRULE = ((20_000, 100, 500), (500_000, 500, 10_000), (math.inf, 500, 20_000))


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


@flax.struct.dataclass
class BestState:
  """What WORKDIR/best/ holds: the best parameters, their step and validation value."""
  step: jax.Array
  value: jax.Array
  params: Any


# ------------------------------------------------------------------------------ config check
class TestSet(NamedTuple):
  name: str
  split: str
  sites: str  # "" = the data config's own sites for that split


def parse_test_sets(specs, source: str) -> list[TestSet]:
  """`("name=split@sites", "split", ...)` -> TestSets (see configs/finetune.py).

  Raises:
    ValueError: empty list, a malformed or duplicate entry, or sites with a non-synthetic source.
  """
  if isinstance(specs, str):
    specs = [s for s in specs.split(",")]
  specs = [str(s).strip() for s in specs if str(s).strip()]
  if not specs:
    raise ValueError("config.test_sets is empty; give at least one, e.g. ('test',) or "
                     "('in_distribution=test@A', 'site_B=test@B')")
  test_sets = []
  for spec in specs:
    name, _, rest = spec.rpartition("=")
    split, _, sites = rest.partition("@")
    split, sites = split.strip(), sites.strip()
    if not split:
      raise ValueError(f"config.test_sets entry {spec!r} has no split; expected 'name=split', "
                       "'name=split@sites' or 'split'")
    if sites and source != "synthetic":
      raise ValueError(f"config.test_sets entry {spec!r}: '@sites' selects sites of the "
                       f"synthetic source only; data.source is {source!r}")
    name = name.strip() or (f"{split}_{sites.replace(',', '')}" if sites else split)
    test_sets.append(TestSet(name, split, sites))
  names = [t.name for t in test_sets]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise ValueError(f"config.test_sets has duplicate names {duplicates}; name them "
                     "'name=split@sites'")
  return test_sets


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
  init = str(config.model.init or "").strip()
  if init.lower() not in initialization.SCRATCH and "://" not in init and not os.path.exists(init):
    raise FileNotFoundError(
        f"config.model.init={init!r} does not exist; give a BiT .npz, a pretraining workdir, an "
        "export folder, or '' to train from scratch")
  if config.model.from_head_layer and init.lower() in initialization.SCRATCH:
    raise ValueError("config.model.from_head_layer=True needs a pretrained projection head: set "
                     "config.model.init to a SimCLR workdir or an export written with "
                     "--include_head")
  if config.batch_size <= 0 or config.eval_batch_size <= 0:
    raise ValueError(f"config.batch_size={config.batch_size} and config.eval_batch_size="
                     f"{config.eval_batch_size} must be positive")
  if config.eval_every_steps <= 0:
    raise ValueError(f"config.eval_every_steps={config.eval_every_steps} must be positive")
  robustness.parse_perturbations(config.robustness.perturbations)
  test_sets = parse_test_sets(config.test_sets, config.data.source)
  names = [t.name for t in test_sets]
  for name in config.robustness.test_sets:
    if name and name not in names:
      raise ValueError(f"config.robustness.test_sets names {name!r}, which is not in "
                       f"config.test_sets ({', '.join(names)})")
  return test_sets


def build_test_source(config, test_set: TestSet):
  """The source of one test set: the data config, with the synthetic sites overridden."""
  data = config.data.to_dict()
  if test_set.sites:
    data["sites"] = dict(data["sites"], **{test_set.split: test_set.sites})
  return data_sources.build_source(data, test_set.split)


def build_eval_sources(config, test_sets: Sequence[TestSet]):
  """(validation source, {test set name: source}), each checked record by record up front.

  A bad record in an evaluation split used to stop the run at the first validation (or at the
  test after all training), after the time was spent. With `config.data.check_eval_splits`
  (default on) every evaluation record is read once before training: a bad one is an error
  naming it, or, with `data.skip_bad_records`, left out and counted under
  `data.max_bad_record_share` (`data_pipelines.pipeline.check_records`).
  """
  def checked(source):
    if not config.data.get("check_eval_splits", True):
      return source
    return pipeline.check_records(
        source, skip_bad_records=config.data.skip_bad_records,
        max_bad_record_share=config.data.get("max_bad_record_share", 0.1))
  val_source = checked(data_sources.build_source(config.data, config.data.val_split))
  return val_source, {t.name: checked(build_test_source(config, t)) for t in test_sets}


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


def schedule_from_config(config, num_examples: int) -> tuple[int, int, int]:
  """(total_steps, warmup_steps, steps_per_epoch), converted once from the labeled subset size.

  total_steps > 0 wins, then total_epochs > 0, else BiT-HyperRule by dataset size. Warm-up:
  optimizer.warmup_steps >= 0 as given; -1 takes BiT-HyperRule's warm-up share of the schedule.
  """
  steps_per_epoch = max(num_examples // config.batch_size, 1)
  _, rule_warmup, rule_total = next(r for r in HYPERRULE if num_examples < r[0])
  if config.total_steps and config.total_steps > 0:
    total_steps = int(config.total_steps)
  elif config.total_epochs and config.total_epochs > 0:
    total_steps = max(int(round(config.total_epochs * steps_per_epoch)), 1)
  else:
    total_steps = rule_total
  warmup = int(config.optimizer.warmup_steps)
  if warmup < 0:
    warmup = int(round(total_steps * rule_warmup / rule_total))
  return total_steps, min(warmup, total_steps), steps_per_epoch


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
  encoder = models.create_model(model_cfg.name, num_classes=None, dtype=DTYPES[model_cfg.dtype],
                                remat=model_cfg.remat, stem=model_cfg.get("stem", "bit"))
  head_width = int(model_cfg.head_hidden_dims[0]) if model_cfg.from_head_layer else 0
  return FinetuneModel(encoder=encoder, num_classes=num_classes, head_width=head_width,
                       head_norm=model_cfg.head_norm, linear=config.finetune_mode == "linear")


def frozen_regexes(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Linear evaluation freezes everything below the classifier."""
  if config.finetune_mode != "linear":
    return ()
  return ("encoder/.*",) + (("head/.*",) if config.model.from_head_layer else ())


# ------------------------------------------------------------------------------ update step
def make_metrics_cls(names):
  fields = {name: clu_metrics.Average.from_output(name) for name in names}
  return clu_metrics.Collection.create(**fields)


def make_update_fn(model: nn.Module, tx: optax.GradientTransformation, *, multi_label: bool,
                   class_weights: np.ndarray | None, metrics_cls) -> Callable:
  """The pure update step `update_fn(state, batch) -> (state, metrics)`.

  `batch["image"]` is uint8 (B, H, W, C); `batch["label"]` int32 (B,) or float32 (B, K), -1 for
  unlabeled records (weight 0). A non-finite loss or gradient leaves the state unchanged and
  is counted in `nonfinite_steps`.
  """
  weights_per_class = None if class_weights is None else jnp.asarray(class_weights, jnp.float32)

  def loss_fn(params, images, labels):
    logits, _ = model.apply({"params": params}, normalize_images(images), train=True)
    metrics = {}
    if multi_label:
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

  def update_fn(state: TrainState, batch: dict[str, jax.Array]):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch["image"], batch["label"])
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


def make_predict_fn(model: nn.Module, multi_label: bool) -> Callable:
  """`predict(params, images uint8) -> probabilities` (sigmoid or softmax), jitted."""

  def predict(params, images):
    logits, _ = model.apply({"params": params}, normalize_images(images), train=False)
    return jax.nn.sigmoid(logits) if multi_label else jax.nn.softmax(logits, axis=-1)

  return jax.jit(predict)


class TrainSetup(NamedTuple):
  """Everything the loop needs besides data: built by `create_train_setup`."""
  model: FinetuneModel
  tx: optax.GradientTransformation
  schedule: Callable[[int], float]
  optimizer_config: ml_collections.ConfigDict
  init_state: Callable[[jax.Array], TrainState]
  abstract_state: TrainState
  state_shardings: TrainState
  update_fn: Callable  # jitted (state, batch) -> (state, metrics); donates `state`
  predict_fn: Callable  # jitted (params, images) -> probs


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
                       class_weights: np.ndarray | None = None) -> TrainSetup:
  """Model, optimiser (frozen encoder in linear mode), sharded state init and jitted steps.

  Args:
    config: the run config (model, optimizer, finetune_mode, batch_size, data.image_size and
      data.num_channels, param_sharding).
    mesh: the device mesh.
    num_classes: K, the classifier's outputs.
    multi_label: sigmoid (True) or softmax (False) cross-entropy.
    total_steps: schedule length.
    warmup_steps: linear warm-up length.
    class_weights: optional (K,) loss weights.

  Returns:
    A TrainSetup.
  """
  model = build_model(config, num_classes)
  opt_config = config.optimizer.copy_and_resolve_references()
  with opt_config.unlocked():
    opt_config.warmup_steps = warmup_steps
    opt_config.frozen = tuple(opt_config.frozen) + frozen_regexes(config)
  tx, schedule = optimizers.make_optimizer(opt_config, total_steps=total_steps,
                                           batch_size=config.batch_size)
  frozen_fraction = float(config.get("encoder_frozen_fraction", 0.0))
  if not 0.0 <= frozen_fraction < 1.0:
    raise ValueError(f"config.encoder_frozen_fraction={frozen_fraction} must be in [0, 1)")
  tx = scale_encoder_updates(tx, multiplier=float(config.get("encoder_lr_multiplier", 1.0)),
                             frozen_steps=int(round(frozen_fraction * total_steps)))
  image_shape = (config.data.image_size, config.data.image_size, config.data.num_channels)

  def init_state(rng):
    params = model.init(rng, jnp.zeros((1,) + image_shape, jnp.float32), train=False)["params"]
    params = dict(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  abstract_state = jax.eval_shape(init_state, jax.random.key(0))
  state_shardings = sharding.param_shardings(abstract_state, mesh,
                                             strategy=config.get("param_sharding", "replicate"))
  names = ["loss", "grad_norm", "param_norm", "nonfinite_steps"]
  if not multi_label:
    names.append("accuracy")
  update_fn = make_update_fn(model, tx, multi_label=multi_label, class_weights=class_weights,
                             metrics_cls=make_metrics_cls(names))
  update_fn = jax.jit(update_fn, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                      out_shardings=(state_shardings, sharding.replicated(mesh)),
                      donate_argnums=(0,))
  return TrainSetup(model, tx, schedule, opt_config, init_state, abstract_state, state_shardings,
                    update_fn, make_predict_fn(model, multi_label))


def load_pretrained(config, state: TrainState, setup: TrainSetup) -> tuple[TrainState, str]:
  """Fills the encoder (and the first head layer) from `config.model.init`; else keeps `state`.

  Raises:
    ValueError: the weights do not fit the model (merge_params names every key), or
      from_head_layer without a head in the init.
  """
  loaded = initialization.load_init(config.model.init, config.model.name,
                                    stem=config.model.get("stem", "bit"))
  if loaded is None:
    return state, "scratch"
  params = dict(state.params)
  params["encoder"] = put_host_tree(
      models.merge_params(loaded.encoder, setup.abstract_state.params["encoder"]),
      setup.state_shardings.params["encoder"])
  description = loaded.description
  if config.model.from_head_layer:
    if loaded.head is None:
      raise ValueError(f"config.model.from_head_layer=True but config.model.init="
                       f"{config.model.init} has no projection head; export it with "
                       "--include_head or use the pretraining workdir")
    first_layer = {k: v for k, v in loaded.head.items() if k in ("hidden_0", "hidden_0_norm")}
    params["head"] = put_host_tree(
        models.merge_params(first_layer, setup.abstract_state.params["head"]),
        setup.state_shardings.params["head"])
    description += " (from the first projection-head layer)"
  return state.replace(params=params), description


# ---------------------------------------------------------------------------------- helpers
def _json_safe(value):
  if isinstance(value, dict):
    return {str(k): _json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(v) for v in value]
  if isinstance(value, (float, np.floating)):
    return None if not math.isfinite(float(value)) else float(value)
  if isinstance(value, (np.integer,)):
    return int(value)
  if isinstance(value, np.bool_):
    return bool(value)
  return value


def write_json(path: str, payload: Any) -> None:
  """Atomic JSON write (tmp + rename) on process 0; NaN/inf become null."""
  if jax.process_index() != 0:
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(_json_safe(payload), f, indent=2, sort_keys=False, allow_nan=False)
  os.replace(path + ".tmp", path)


def read_results(workdir: str) -> dict[str, Any] | None:
  """WORKDIR/results.json of a finished run, or None."""
  path = os.path.join(workdir, RESULTS_FILE)
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    results = json.load(f)
  return results if results.get("finished") else None


def _improved(value: float, best: float) -> bool:
  return math.isfinite(value) and (not math.isfinite(best) or value > best)


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

  Args:
    config: a configs/finetune.py config.
    workdir: the run's folder (created); rerunning resumes.

  Returns:
    The results.json contents (schema in the module docstring).

  Raises:
    ValueError / FileNotFoundError: a bad config (before anything is built).
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

  # ---- data: the label-fraction subset of the training split
  full_train = data_sources.build_source(config.data, config.data.train_split)
  if full_train.num_classes < 1:
    raise ValueError(f"{full_train.name} has no classes: fine-tuning needs labeled data "
                     f"(data.train_split={config.data.train_split!r})")
  train_source = subset_lib.subset(full_train, config.label_fraction, config.label_fraction_seed,
                                   stratify=config.label_fraction_stratify)
  if jax.process_index() == 0:
    train_source.write_manifest(os.path.join(workdir, SUBSET_MANIFEST_FILE))
  num_classes, multi_label = full_train.num_classes, full_train.multi_label
  class_names = list(full_train.class_names)
  logging.info("Labels: %d of %d training records (label_fraction=%g, seed %d); per class %s; "
               "manifest %s", len(train_source), len(full_train), config.label_fraction,
               config.label_fraction_seed, train_source.class_counts(),
               os.path.join(workdir, SUBSET_MANIFEST_FILE))
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
  logging.info("Schedule: %d total steps (%d warm-up), %d steps/epoch of the labeled subset.",
               total_steps, warmup_steps, steps_per_epoch)
  class_weights = class_weights_from_config(config.loss.class_weights, train_source.labels,
                                            num_classes, multi_label)

  # ---- model, optimiser, sharded state and the jitted steps
  setup = create_train_setup(config, mesh, num_classes=num_classes, multi_label=multi_label,
                             total_steps=total_steps, warmup_steps=warmup_steps,
                             class_weights=class_weights)
  abstract_state, state_shardings = setup.abstract_state, setup.state_shardings

  evaluator_kwargs = dict(ops=eval_ops, batch_size=config.eval_batch_size, mesh=mesh,
                          num_channels=config.data.num_channels, num_bins=config.ece_bins)
  val_source, test_sources = build_eval_sources(config, test_sets)
  val_evaluator = classification.ClassificationEvaluator(setup.predict_fn, val_source,
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
  logging.info("Initialisation: %s; mode %s", init_description, config.finetune_mode)
  if jax.process_index() == 0:
    parameter_overview.log_parameter_overview(state.params)
    logging.info("Optimiser masks:\n%s",
                 optimizers.describe_masks(state.params, setup.optimizer_config))

  def validate(step: int) -> None:
    nonlocal best_value, best_step
    values = dict(val_evaluator.run(state.params))
    writer.write_scalars(step, {f"val/{k}": v for k, v in values.items()})
    value = values[config.best_metric]
    if _improved(value, best_value) or best_step < 0:
      best_value, best_step = value, step
      best = BestState(step=jnp.asarray(step, jnp.int32), value=jnp.asarray(value, jnp.float32),
                       params=state.params)
      checkpointing.save(best_manager, step, best, force=True)
      best_manager.wait_until_finished()
      logging.info("Step %d: best validation %s so far, %.4f (kept in %s)", step,
                   config.best_metric, value, best_manager.directory)

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
      batch = sharding.shard_host_batch({k: host_batch[k] for k in ("image", "label")},
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
        progress_bar.set_postfix(f"loss {values['train/loss']:.4f}")
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
    labels, probs = evaluator.predict(params)
    metrics = evaluator.metrics(labels, probs, thresholds)
    roc_file = os.path.join(ROC_DIR, f"{test_set.name}.json")
    write_json(os.path.join(workdir, roc_file), classification.roc_curves(
        labels, probs, multi_label=multi_label, class_names=class_names))
    test_results[test_set.name] = {"split": test_set.split, "sites": test_set.sites,
                                   "num_examples": int(labels.shape[0]), "roc_file": roc_file,
                                   "metrics": metrics}
    writer.write_scalars(step, {f"test/{test_set.name}/{k}": v for k, v in metrics.items()})
    if test_set.name in robust_names:
      robust_results[test_set.name] = robustness.evaluate_robustness(
          evaluator, params, perturbations, thresholds)
      writer.write_scalars(step, {
          f"robustness/{test_set.name}/{p}/{k}": v
          for p, m in robust_results[test_set.name].items() for k, v in m.items()
          if k in ("macro_auc", "accuracy")})
  writer.flush()

  results = {
      "format": RESULTS_FORMAT,
      "finished": True,
      "steps": step,
      "total_steps": total_steps,
      "wall_time_s": time.time() - start_time,
      "config": {"variant": config.get("variant"), "recipe": config.get("recipe"),
                 "seed": config.seed, "finetune_mode": config.finetune_mode,
                 "label_fraction": config.label_fraction,
                 "label_fraction_seed": config.label_fraction_seed,
                 "init": config.model.init, "from_head_layer": config.model.from_head_layer,
                 "model": config.model.name, "data_source": config.data.source,
                 "task": config.data.get("task")},
      "initialisation": init_description,
      "divergence_warnings": divergence.warnings,
      "num_train_labels": len(train_source),
      "subset_manifest": SUBSET_MANIFEST_FILE,
      "task": {"multi_label": multi_label, "num_classes": num_classes,
               "class_names": class_names},
      "best": {"metric": config.best_metric, "split": config.data.val_split,
               "step": int(best_state.step), "value": float(best_state.value)},
      "thresholds": {"method": "youden_j_on_validation", "values": thresholds.tolist()},
      "val": val_metrics,
      "test_sets": test_results,
      "robustness": robust_results,
      "baselines": config.baselines.to_dict() if config.get("baselines") else {},
  }
  results = _json_safe(results)
  write_json(os.path.join(workdir, RESULTS_FILE), results)
  if jax.process_index() == 0:
    print(f"Fine-tuning finished: {step} steps, {len(train_source)} labels, "
          f"{init_description}, mode {config.finetune_mode}; best validation "
          f"{config.best_metric} {results['best']['value']:.4f} at step "
          f"{results['best']['step']} ({time.time() - start_time:.1f} s)\n"
          + format_results(results) + f"\n  results        {workdir}/{RESULTS_FILE}", flush=True)
  return results
