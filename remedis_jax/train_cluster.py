"""Contrastive learning with online feature clustering, optionally hybrid with a supervised loss.

The second pretraining method (Ghesu et al. 2022, "Contrastive self-supervised learning from 100
million medical images with optional supervision"): NT-Xent between the two global views (as in
SimCLR) plus SwAV-style online clustering (Caron et al. 2020): every view's projection is scored
against K learnable, L2-normalised prototypes; the two global views get cluster codes from
Sinkhorn-Knopp over the GLOBAL batch (equipartition: every prototype gets its share), and every
other view (the other global view and the small local crops of multi-crop) must predict them.
The hybrid mode adds a supervised loss on the labeled part of the batch.

  loss = contrastive_weight * NT-Xent(global views)
       + cluster_weight     * swapped prediction(codes of the global views, all views' scores)
       + supervised_weight  * cross-entropy(classifier(features), labels) on labeled records

Entry point: `python -m remedis_jax.main --config=configs/pretrain_cluster.py:tiny --workdir=DIR`
(`:hybrid_tiny` for the hybrid). The loop (restore, log window, kNN monitor, checkpoints,
preemption, multi-host) is the one SimCLR uses: remedis_jax/pretraining.py. Encoder and
projection head have the SimCLR model's names, so an export or a workdir of this trainer
initialises fine-tuning exactly like a SimCLR one (`config.model.init`).

Details that follow SwAV: codes carry no gradient; prototypes get no update for the first
`cluster.freeze_prototypes_steps` steps (otherwise they chase random features and collapse);
with small per-device batches an optional queue of past global-view projections joins the
Sinkhorn balancing (it only starts once full). Prototype normalisation happens in the forward
pass (models.Prototypes) instead of SwAV's in-place renormalisation after each step.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from data_pipelines import pipeline, presets, stream, subset
from remedis_jax import clustering, losses, models, optimizers, pretraining
from remedis_jax.train_simclr import build_model
from remedis_jax.train_state import (TrainSetup, TrainState as CoreTrainState, apply_gradients,
                                     build_step, make_metrics_cls, normalize_images)


@flax.struct.dataclass
class TrainState(CoreTrainState):
  """The shared state plus the feature queue."""
  # (queue_size, projection_dim) past global-view projections, newest first; None without a
  # queue (Orbax cannot save a zero-size array).
  queue: jax.Array | None = None


def _l2_normalize(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))


def queue_full_step(queue_size: int, global_batch: int, num_global: int) -> int:
  """First step at which a queue of `queue_size` rows is full of real projections."""
  if queue_size <= 0:
    return 0
  return int(math.ceil(queue_size / (global_batch * num_global)))


def supervised_loss(logits: jax.Array, labels: jax.Array, labeled: jax.Array, *,
                    multi_label: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Cross-entropy over the labeled records only (0 when the batch has none).

  Args:
    logits: (N, C) classifier outputs.
    labels: (N,) int class indices or (N, C) multi-hot; negative entries mean "no label".
    labeled: (N,) float 1/0: the record's label may be used (hybrid label fraction).
    multi_label: sigmoid (multi-hot) or softmax (indices) cross-entropy.
  """
  logits = logits.astype(jnp.float32)
  if multi_label:
    weights = labeled * jnp.all(labels >= 0, axis=-1).astype(jnp.float32)
    loss = losses.sigmoid_cross_entropy(logits, jnp.maximum(labels, 0), weights)
    return loss, {"supervised_loss": loss, "labeled_fraction": jnp.mean(weights)}
  weights = labeled * (labels >= 0).astype(jnp.float32)
  loss = losses.softmax_cross_entropy(logits, jnp.maximum(labels, 0).astype(jnp.int32), weights)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32) * weights
  return loss, {"supervised_loss": loss, "labeled_fraction": jnp.mean(weights),
                "supervised_accuracy": correct.sum() / jnp.maximum(weights.sum(), 1.0)}


# ------------------------------------------------------------------------------ update step
def make_update_fn(model: nn.Module, prototypes: nn.Module, tx: optax.GradientTransformation, *,
                   config: ml_collections.ConfigDict, global_batch: int,
                   classifier: nn.Module | None = None, probe: nn.Module | None = None,
                   multi_label: bool = False, metrics_cls=None) -> Callable:
  """Builds the pure update step `update_fn(state, batch) -> (state, metrics)`.

  `batch["global_views"]` is uint8 (B, G, H, W, C) and `batch["local_views"]` (B, L, h, w, C)
  (absent when L = 0), sharded over the batch axis; `label` and `labeled` feed the hybrid loss
  and the probe. A non-finite loss or gradient leaves the state unchanged (counted in
  `nonfinite_steps`; the loop stops the run).
  """
  loss_cfg, cluster_cfg = config.loss, config.cluster
  num_global = 2
  freeze_steps = int(cluster_cfg.freeze_prototypes_steps)
  queue_size = int(cluster_cfg.queue_size)
  queue_ready_step = queue_full_step(queue_size, global_batch, num_global) + int(
      cluster_cfg.queue_start_step)

  def encode(params, views):
    batch, num_views = views.shape[:2]
    images = normalize_images(views.reshape((batch * num_views,) + views.shape[2:]))
    z, intermediates = model.apply({"params": {"encoder": params["encoder"],
                                               "head": params["head"]}}, images, train=True)
    features = intermediates["pre_logits"].reshape((batch, num_views, -1))
    return z.reshape((batch, num_views, -1)), features

  def loss_fn(params, batch, queue, step):
    z_global, features = encode(params, batch["global_views"])
    z_all = z_global
    if "local_views" in batch:
      z_local, _ = encode(params, batch["local_views"])
      z_all = jnp.concatenate([z_global, z_local], axis=1)
    b, num_views, dim = z_all.shape

    metrics = {}
    total = 0.0
    contrastive, contrastive_metrics = losses.nt_xent_with_metrics(
        z_global[:, 0], z_global[:, 1], loss_cfg.temperature)
    metrics.update(contrastive_metrics)
    if loss_cfg.contrastive_weight:
      total = total + loss_cfg.contrastive_weight * contrastive

    # Scores of every view against the prototypes; codes of the global views over the global
    # batch (plus the queue once it is full), without gradient.
    scores = prototypes.apply({"params": params["prototypes"]},
                              z_all.reshape((b * num_views, dim))).reshape((b, num_views, -1))
    queue_scores = None
    if queue_size > 0:
      # Until the queue is full it joins as zeros: all-zero score rows are empty slots that
      # codes_with_queue leaves out, so one Sinkhorn per view covers both cases.
      ready = (step >= queue_ready_step).astype(jnp.float32)
      queue_scores = prototypes.apply({"params": params["prototypes"]}, queue * ready)
    codes = jnp.stack([
        clustering.codes_with_queue(scores[:, view], queue_scores,
                                    num_iters=cluster_cfg.sinkhorn_iters,
                                    epsilon=cluster_cfg.sinkhorn_epsilon)
        for view in range(num_global)], axis=1)
    cluster, cluster_metrics = clustering.swapped_prediction_loss(
        scores, codes, temperature=cluster_cfg.temperature)
    metrics.update(cluster_metrics)
    if loss_cfg.cluster_weight:
      total = total + loss_cfg.cluster_weight * cluster

    labels, labeled = batch.get("label"), batch.get("labeled")
    if classifier is not None:
      # Both global views of a labeled record are supervised (the labels hold for either).
      logits = classifier.apply({"params": params["classifier"]},
                                features.reshape((b * num_global, -1)))
      repeat = lambda x: jnp.repeat(x, num_global, axis=0)  # noqa: E731
      supervised, supervised_metrics = supervised_loss(
          logits, repeat(labels), repeat(labeled.astype(jnp.float32)), multi_label=multi_label)
      metrics.update(supervised_metrics)
      total = total + loss_cfg.supervised_weight * supervised
    metrics["loss"] = total  # the pretraining objective (the probe's loss is logged apart)

    if probe is not None:
      probe_logits = probe.apply({"params": params["probe"]},
                                 jax.lax.stop_gradient(features[:, 0]))
      # The probe watches every record with a label, labeled fraction or not: it is a monitor.
      probe_loss, probe_metrics = supervised_loss(
          probe_logits, labels, jnp.ones((b,), jnp.float32), multi_label=multi_label)
      metrics["probe_loss"] = probe_loss
      if "supervised_accuracy" in probe_metrics:
        metrics["probe_accuracy"] = probe_metrics["supervised_accuracy"]
      total = total + probe_loss
    new_queue_rows = jax.lax.stop_gradient(_l2_normalize(z_global.reshape((b * num_global, -1))))
    return total, (metrics, new_queue_rows)

  def update_fn(state: TrainState, batch: dict[str, jax.Array]):
    (total, (metrics, new_rows)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch, state.queue, state.step)
    frozen = state.step < freeze_steps
    # Prototypes stay where they were initialised while the encoder's features are still
    # random (SwAV's freeze_prototypes_niters): zero gradient AND zero update (weight decay).
    grads = dict(grads)
    grads["prototypes"] = jax.tree.map(lambda g: jnp.where(frozen, 0.0, g), grads["prototypes"])

    def freeze_prototypes(updates):
      updates = dict(updates)
      updates["prototypes"] = jax.tree.map(lambda u: jnp.where(frozen, 0.0, u),
                                           updates["prototypes"])
      return updates

    queue = state.queue
    if queue_size > 0:
      queue = clustering.update_queue(state.queue, new_rows.astype(state.queue.dtype))
    new_state, metrics = apply_gradients(state, tx, total, grads, metrics,
                                         transform_updates=freeze_prototypes, queue=queue)
    return new_state, metrics_cls.single_from_model_output(**metrics)

  return update_fn


def create_train_setup(config: ml_collections.ConfigDict, mesh, *, num_classes: int,
                       multi_label: bool, total_steps: int, warmup_steps: int) -> TrainSetup:
  """Model, prototypes, optimiser, sharded-state initialiser and the jitted update step.

  Args:
    config: the run config (configs/pretrain_cluster.py).
    mesh: the device mesh.
    num_classes: classes of the source (0: unlabeled): sizes the hybrid classifier and probe.
    multi_label: whether labels are multi-hot (sigmoid) rather than indices (softmax).
    total_steps: schedule length.
    warmup_steps: linear warm-up length.

  Raises:
    ValueError: the hybrid loss is on but the source has no labels.
  """
  hybrid = bool(config.loss.supervised_weight)
  if hybrid and num_classes <= 0:
    raise ValueError(
        "config.loss.supervised_weight > 0 (hybrid) needs labels, but the pretraining split "
        f"config.data.pretrain_split={config.data.get('pretrain_split')!r} has none; use a "
        "labeled split or set config.loss.supervised_weight=0.")
  model = build_model(config)
  prototypes = models.Prototypes(num_prototypes=config.cluster.num_prototypes, name="prototypes")
  classifier = nn.Dense(num_classes, kernel_init=nn.initializers.zeros,
                        name="classifier") if hybrid else None
  probe = nn.Dense(num_classes, name="probe") if (
      config.probe.enabled and num_classes > 0) else None
  tx, schedule, opt_config = optimizers.from_run_config(config, total_steps=total_steps,
                                                       warmup_steps=warmup_steps)
  size = config.data.image_size
  image_shape = (size, size, config.data.num_channels)
  projection_dim = config.model.projection_dim

  def init_state(rng):
    model_rng, proto_rng, cls_rng, probe_rng = jax.random.split(rng, 4)
    dummy = jnp.zeros((1,) + image_shape, jnp.float32)
    variables = model.init(model_rng, dummy, train=False)
    params = dict(variables["params"])
    _, intermediates = model.apply(variables, dummy, train=False)
    features = intermediates["pre_logits"]
    params["prototypes"] = prototypes.init(
        proto_rng, jnp.zeros((1, projection_dim), jnp.float32))["params"]
    if classifier is not None:
      params["classifier"] = classifier.init(cls_rng, features)["params"]
    if probe is not None:
      params["probe"] = probe.init(probe_rng, features)["params"]
    queue = None
    if config.cluster.queue_size > 0:
      queue = jnp.zeros((int(config.cluster.queue_size), projection_dim), jnp.float32)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), queue=queue)

  metric_names = ["loss", "contrastive_loss", "contrastive_accuracy", "contrastive_entropy",
                  "cluster_loss", "cluster_usage_entropy", "cluster_code_entropy",
                  "cluster_num_used", "grad_norm", "param_norm"]
  if classifier is not None:
    metric_names += ["supervised_loss", "labeled_fraction"] + (
        [] if multi_label else ["supervised_accuracy"])
  if probe is not None:
    metric_names += ["probe_loss"] + ([] if multi_label else ["probe_accuracy"])
  update_fn = make_update_fn(
      model, prototypes, tx, config=config, global_batch=config.batch_size,
      classifier=classifier, probe=probe, multi_label=multi_label,
      metrics_cls=make_metrics_cls(metric_names))
  # The queue is read whole by every device (it joins the global Sinkhorn): replicated.
  abstract_state, state_shardings, update_fn = build_step(
      init_state, update_fn, mesh, param_sharding=config.get("param_sharding", "replicate"),
      replicated_fields=("queue",))
  batch_keys = ["global_views"]
  if config.multicrop.num_local > 0:
    batch_keys.append("local_views")
  if classifier is not None or probe is not None:
    batch_keys += ["label", "labeled"]
  return TrainSetup(model, tx, schedule, opt_config, init_state, abstract_state,
                    state_shardings, update_fn, batch_keys=tuple(batch_keys))


# ------------------------------------------------------------------------------------ train
def labeled_indices(config: ml_collections.ConfigDict, source) -> np.ndarray | None:
  """Source indices whose labels the hybrid loss may use (None: every labeled record)."""
  fraction = float(config.hybrid.label_fraction)
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"config.hybrid.label_fraction must be in (0, 1]; got {fraction}")
  if fraction == 1.0:
    return None
  return subset.subset_indices(source, fraction, int(config.hybrid.label_fraction_seed))


def make_dataset(config: ml_collections.ConfigDict, source, local_batch_size: int):
  """Multi-crop: two global views at data.image_size and `multicrop.num_local` small views."""
  global_ops, local_ops = presets.get_multicrop_ops(
      config.data.preset, config.data.image_size, config.multicrop.local_size)
  hybrid = bool(config.loss.supervised_weight)
  return pipeline.make_multicrop_dataset(
      source, batch_size=local_batch_size, global_ops=global_ops, local_ops=local_ops,
      options=stream.StreamOptions.from_config(config), num_global=2,
      num_local=config.multicrop.num_local,
      labeled_indices=labeled_indices(config, source) if hybrid else None)


def create_setup_for_source(config: ml_collections.ConfigDict, mesh, source, *,
                            total_steps: int, warmup_steps: int) -> TrainSetup:
  return create_train_setup(config, mesh, num_classes=source.num_classes,
                            multi_label=source.multi_label, total_steps=total_steps,
                            warmup_steps=warmup_steps)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       dataset=None) -> dict[str, Any]:
  """Pretrains with contrastive + clustering (+ supervised) losses; returns a run summary.

  Args:
    config: the run config (configs/pretrain_cluster.py).
    workdir: checkpoints, logs and summaries go here; an existing run there is resumed.
    dataset: optional Grain dataset of host multi-crop batches used instead of the configured
      one. The source still sets the epoch length.
  """
  title = "Hybrid clustering" if config.loss.supervised_weight else "Clustering"
  return pretraining.run(config, workdir, title=title, make_dataset=make_dataset,
                         create_setup=create_setup_for_source, dataset=dataset,
                         distinct_batch_reason=distinct_batch_reason(config))


def distinct_batch_reason(config: ml_collections.ConfigDict) -> str:
  """Why this objective needs distinct images in a batch ("": it does not, supervised only)."""
  reasons = []
  if config.loss.contrastive_weight:
    reasons.append("its NT-Xent term uses the other images of a batch as negatives")
  if config.loss.cluster_weight:
    reasons.append("its clustering term splits the batch evenly over the prototypes "
                   "(Sinkhorn), which copies of one image cannot follow")
  return " and ".join(reasons)
