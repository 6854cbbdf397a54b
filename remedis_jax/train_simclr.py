"""SimCLR contrastive pretraining of a BiT encoder on unlabeled medical images (REMEDIS stage 2).

What is SimCLR-specific lives here: the model (encoder + projection head), the pure update step
(NT-Xent + optional online probe) and the two-view input pipeline. The loop it runs in (restore,
log window, kNN monitor, checkpoints, preemption) is shared with the other pretraining
objectives: remedis_jax/pretraining.py. Entry point: `python -m remedis_jax.main --config=configs/
pretrain_simclr.py:tiny --workdir=DIR` (see the config files for the commands per dataset).

The loss is NT-Xent over the GLOBAL batch: the update step is plain jnp under `jax.jit` with
NamedSharding in/out shardings, so negatives come from every device and host (XLA inserts the
collectives). Images arrive as uint8 and are normalised here, on the device.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from data_pipelines import pipeline, presets, stream
from remedis_jax import losses, models, optimizers, pretraining
from remedis_jax.train_state import (TrainSetup, TrainState, apply_gradients, build_step,
                                     make_metrics_cls, normalize_images)


# ------------------------------------------------------------------------------------- model
def build_model(config: ml_collections.ConfigDict) -> nn.Module:
  model_cfg = config.model
  return models.create_contrastive_model(
      model_cfg.name,
      head_hidden_dims=tuple(model_cfg.head_hidden_dims),
      projection_dim=model_cfg.projection_dim,
      head_norm=model_cfg.head_norm,
      dtype=models.DTYPES[model_cfg.dtype],
      remat=model_cfg.remat,
      stem=model_cfg.get("stem", "bit"),
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
                   site_metrics: bool = False, metrics_cls=None) -> Callable:
  """Builds the pure update step `update_fn(state, batch) -> (state, metrics)`.

  `batch["views"]` is uint8 (B, V, H, W, C), sharded over the batch axis; the first two views
  are the positive pair. A non-finite loss or gradient leaves the state unchanged and is
  counted in `nonfinite_steps`, so a checkpoint never holds NaNs; the loop stops the run.
  With `site_metrics`, `batch["site"]` (B,) feeds `losses.site_negative_metrics`.
  """

  def loss_fn(params, views, labels, sites):
    batch, num_views = views.shape[:2]
    images = normalize_images(views.reshape((batch * num_views,) + views.shape[2:]))
    z, intermediates = model.apply({"params": {"encoder": params["encoder"],
                                               "head": params["head"]}}, images, train=True)
    z = z.reshape((batch, num_views, -1))
    loss, metrics = losses.nt_xent_with_metrics(z[:, 0], z[:, 1], temperature)
    if site_metrics:
      metrics.update(losses.site_negative_metrics(z[:, 0], z[:, 1], sites, temperature))
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
        state.params, batch["views"], labels, batch.get("site"))
    new_state, metrics = apply_gradients(state, tx, total, grads, metrics)
    return new_state, metrics_cls.single_from_model_output(**metrics)

  return update_fn


def create_train_setup(config: ml_collections.ConfigDict, mesh, *, num_classes: int,
                       multi_label: bool, total_steps: int, warmup_steps: int,
                       site_metrics: bool = False) -> TrainSetup:
  """Model, optimiser, sharded-state initialiser and the jitted update step for `config`.

  Args:
    config: the run config (model, optimizer, loss, param_sharding, data.image_size/num_channels).
    mesh: the device mesh.
    num_classes: classes of the online linear probe; 0 disables the probe.
    multi_label: whether probe labels are multi-hot (sigmoid) rather than indices (softmax).
    total_steps: schedule length.
    warmup_steps: linear warm-up length.
    site_metrics: log whether the hardest negatives share the anchor's site (the data must
      carry more than one site).
  """
  model = build_model(config)
  probe = nn.Dense(num_classes, name="probe") if num_classes > 0 else None
  tx, schedule, opt_config = optimizers.from_run_config(config, total_steps=total_steps,
                                                       warmup_steps=warmup_steps)
  image_shape = (config.data.image_size, config.data.image_size, config.data.num_channels)

  def init_state(rng):
    params = init_params(model, probe, image_shape, rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  metric_names = ["loss", "contrastive_accuracy", "contrastive_entropy", "grad_norm",
                  "param_norm"]
  if probe is not None:
    metric_names += ["probe_loss"] + ([] if multi_label else ["probe_accuracy"])
  if site_metrics:
    metric_names += ["top1_negative_same_site", "same_site_negative_share"]
  update_fn = make_update_fn(model, tx, temperature=config.loss.temperature, probe=probe,
                             multi_label=multi_label, site_metrics=site_metrics,
                             metrics_cls=make_metrics_cls(metric_names))
  abstract_state, state_shardings, update_fn = build_step(
      init_state, update_fn, mesh, param_sharding=config.get("param_sharding", "replicate"))
  batch_keys = ("views",) + (("label",) if probe is not None else ()) + (
      ("site",) if site_metrics else ())
  return TrainSetup(model, tx, schedule, opt_config, init_state, abstract_state,
                    state_shardings, update_fn, batch_keys=batch_keys)


# ------------------------------------------------------------------------------------ train
def make_dataset(config: ml_collections.ConfigDict, source, local_batch_size: int):
  """Two augmented views per record (the modality preset's pretraining recipe)."""
  ops = presets.get_preset(config.data.preset, "pretrain", config.data.image_size)
  return pipeline.make_pretrain_dataset(source, batch_size=local_batch_size, ops=ops,
                                       options=stream.StreamOptions.from_config(config),
                                       num_views=2)


def create_setup_for_source(config: ml_collections.ConfigDict, mesh, source, *,
                            total_steps: int, warmup_steps: int) -> TrainSetup:
  """`create_train_setup` with the online probe on when enabled and the source has labels, and
  the site diagnostics when the data has several sites."""
  use_probe = config.probe.enabled and source.num_classes > 0
  return create_train_setup(config, mesh, num_classes=source.num_classes if use_probe else 0,
                            multi_label=source.multi_label, total_steps=total_steps,
                            warmup_steps=warmup_steps, site_metrics=has_sites(source))


def has_sites(source) -> bool:
  """Whether the source's records come from more than one site (hospital, scanner)."""
  sites = getattr(source, "sites", None)
  if sites is None:
    sites = getattr(source, "site_names", ())
  return len(sites) > 1


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       dataset=None) -> dict[str, Any]:
  """Pretrains with SimCLR; returns a summary (steps, final loss, checkpoint, ...).

  Args:
    config: the run config (configs/pretrain_simclr.py).
    workdir: checkpoints, logs and summaries go here; an existing run there is resumed.
    dataset: optional Grain dataset of host batches ({"views": uint8 (B, 2, H, W, C), ...})
      used instead of the one `config.data` describes (benchmarks use it to take input
      preprocessing out of the measurement). The source still sets the epoch length.
  """
  return pretraining.run(
      config, workdir, title="SimCLR", make_dataset=make_dataset,
      create_setup=create_setup_for_source, dataset=dataset,
      distinct_batch_reason="its NT-Xent loss uses the other images of a batch as negatives")
