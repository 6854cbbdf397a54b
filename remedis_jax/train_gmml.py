"""Group-masked model learning (GMML) pretraining of a Vision Transformer on unlabeled images.

GMML (Atito et al., "SiT: Self-supervised vIsion Transformer", arxiv.org/abs/2104.03602; "GMML
is all you need", arxiv.org/abs/2205.14986), used for chest X-rays by SS-CXR / SPCXR (Anwar
et al., arxiv.org/abs/2211.12944): corrupt connected groups of patches of an image (noise,
zeros, or another image's content; data_pipelines/ops_masking.py), encode the corrupted image
with a ViT, reconstruct the clean image from every output token with a light head, and train
with the L1 distance on the corrupted pixels only:

  loss = sum_{masked pixels, channels} |reconstruction - clean| / (masked pixels * channels)

Model: `GMMLModel` = encoder (a `models.create_model` ViT) + head (`ReconstructionHead`: an
MLP on each output token -> p*p*C pixels, folded back onto the image, the SiT/GMML "RECHead"
without its transposed convolution, which is the same per-token linear map). Parameters live
under `params["encoder"]` and `params["head"]`, and `model.apply(..., images)` returns
`(reconstruction, intermediates)` with the encoder's `pre_logits`: the kNN monitor, export
and fine-tuning initialisation treat a GMML workdir like a SimCLR one.

The loop (restore, log window, kNN, checkpoints, preemption, NaN guard, multi-host) is the one
every pretraining objective shares: remedis_jax/pretraining.py. This trainer adds a
`ReconstructionMonitor`: the masked-pixel L1 on a fixed held-out batch
(`reconstruction/heldout_masked_l1` in metrics.jsonl) and an image grid (input, corrupted,
reconstruction) in `workdir/reconstructions/step_<N>.png`, at step 0, every
`config.gmml.monitor_every_steps` steps and at the end.

Entry point: `python -m remedis_jax.main --config=configs/pretrain_gmml.py:tiny --workdir=DIR`.
"""

from __future__ import annotations

import io
import logging
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from data_pipelines import pipeline, sources, stream
from data_pipelines.subset import sample
from data_pipelines import storage
from remedis_jax import models, optimizers, pretraining, sharding
from remedis_jax.train_state import (TrainSetup, TrainState, apply_gradients, build_step,
                                     make_metrics_cls, normalize_images, put_host_tree)

GRID_FOLDER = "reconstructions"


# ------------------------------------------------------------------------------------- model
class ReconstructionHead(nn.Module):
  """Per-token MLP -> p x p x C pixels, folded back onto the image grid.

  Attributes:
    patch_size: p of the encoder.
    num_channels: C of the reconstructed image.
    hidden_dims: widths of the GELU hidden layers (SiT/GMML: three of the token width).
    dtype: compute dtype of the hidden layers (the output is float32).
  """
  patch_size: int
  num_channels: int
  hidden_dims: Sequence[int] = ()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, feature_map: jax.Array) -> jax.Array:
    """(B, h, w, D) token grid -> (B, h * p, w * p, C) float32 image in [-1, 1] units."""
    x = feature_map
    for i, width in enumerate(self.hidden_dims):
      x = nn.gelu(nn.Dense(width, dtype=self.dtype, name=f"hidden_{i}")(x))
    p, c = self.patch_size, self.num_channels
    x = nn.Dense(p * p * c, dtype=jnp.float32, name="pixels")(x)
    b, h, w, _ = x.shape
    # (B, h, w, p, p, C) -> (B, h, p, w, p, C): row-major patches, as the patch embedding reads.
    x = x.reshape(b, h, w, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * p, w * p, c)


class GMMLModel(nn.Module):
  """ViT encoder + reconstruction head; `(reconstruction, intermediates)` like the others."""
  encoder: nn.Module
  head: ReconstructionHead

  def __call__(self, images: jax.Array, train: bool = False):
    """Reconstructs (B, H, W, C) images in [-1, 1] from the encoder's output tokens.

    Returns:
      (reconstruction float32 (B, H, W, C), the encoder's intermediates: "tokens",
      "feature_map", "pre_logits", ...).
    """
    _, intermediates = self.encoder(images, train=train)
    return self.head(intermediates["feature_map"]), dict(intermediates)


def build_model(config: ml_collections.ConfigDict) -> GMMLModel:
  """The ViT named by config.model.name plus the reconstruction head."""
  model_cfg = config.model
  if not models.is_vit(model_cfg.name):
    raise ValueError(f"config.model.name={model_cfg.name!r}: GMML pretraining needs a ViT "
                     "(patch tokens to reconstruct from), e.g. 'ViT-S/16' or 'ViT-tiny/4'")
  dtype = models.DTYPES[model_cfg.dtype]
  encoder = models.create_model(model_cfg.name, num_classes=None, dtype=dtype,
                                remat=model_cfg.remat)
  head = ReconstructionHead(patch_size=encoder.patch_size,
                            num_channels=config.data.num_channels,
                            hidden_dims=tuple(model_cfg.head_hidden_dims), dtype=dtype)
  return GMMLModel(encoder=encoder, head=head)


# -------------------------------------------------------------------------------------- loss
def expand_patch_mask(mask: jax.Array, patch_size: int) -> jax.Array:
  """(B, h, w) patch mask -> (B, h * p, w * p) pixel mask, on the device."""
  return jnp.repeat(jnp.repeat(mask, patch_size, axis=1), patch_size, axis=2)


def masked_l1_loss(reconstruction: jax.Array, target: jax.Array,
                   pixel_mask: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean absolute error over the masked pixels (and all channels) of the whole batch.

  Normalised by the number of masked pixel-channel values of the GLOBAL batch (as the
  authors' `l1_loss(...)[mask == 1].mean()`), so an image with more masked pixels weighs
  more. Unmasked pixels contribute neither value nor gradient; no masked pixel gives 0.

  Args:
    reconstruction: (B, H, W, C) model output.
    target: (B, H, W, C) clean images, same units.
    pixel_mask: (B, H, W), 1 = masked (any numeric dtype).

  Returns:
    (loss, metrics): metrics hold "masked_fraction" and "visible_l1" (the L1 on unmasked
    pixels, a monitor without gradient).
  """
  reconstruction = reconstruction.astype(jnp.float32)
  target = target.astype(jnp.float32)
  masked = (pixel_mask > 0)[..., None]
  channels = reconstruction.shape[-1]
  error = jnp.abs(reconstruction - target)
  num_masked = jnp.sum(masked) * channels
  loss = jnp.sum(jnp.where(masked, error, 0.0)) / jnp.maximum(num_masked, 1)
  num_visible = error.size - num_masked
  visible = jax.lax.stop_gradient(
      jnp.sum(jnp.where(masked, 0.0, error)) / jnp.maximum(num_visible, 1))
  return loss, {"masked_fraction": num_masked / error.size, "visible_l1": visible}


# ------------------------------------------------------------------------------ update step
def make_update_fn(model: GMMLModel, tx: optax.GradientTransformation, *,
                   weight_decay: float | Callable[[Any], Any], metrics_cls) -> Callable:
  """Builds the pure update step `update_fn(state, batch) -> (state, metrics)`.

  `batch` holds `clean` and `corrupted` uint8 (B, H, W, C) and `mask` uint8 (B, H/p, W/p),
  sharded over the batch axis. A non-finite loss or gradient leaves the state unchanged
  (counted in `nonfinite_steps`; the loop stops the run).
  """
  patch_size = model.encoder.patch_size

  def loss_fn(params, batch):
    reconstruction, _ = model.apply({"params": params}, normalize_images(batch["corrupted"]),
                                    train=True)
    pixel_mask = expand_patch_mask(batch["mask"], patch_size)
    return masked_l1_loss(reconstruction, normalize_images(batch["clean"]), pixel_mask)

  def update_fn(state: TrainState, batch: dict[str, jax.Array]):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
    new_state, metrics = apply_gradients(state, tx, loss, grads, {**metrics, "loss": loss})
    metrics["weight_decay"] = jnp.asarray(
        weight_decay(state.step) if callable(weight_decay) else weight_decay, jnp.float32)
    return new_state, metrics_cls.single_from_model_output(**metrics)

  return update_fn


METRIC_NAMES = ("loss", "masked_fraction", "visible_l1", "grad_norm", "param_norm",
                "weight_decay")


def create_train_setup(config: ml_collections.ConfigDict, mesh, *, total_steps: int,
                       warmup_steps: int, monitor_source=None) -> TrainSetup:
  """Model, optimiser, sharded-state initialiser, jitted update step (and monitor).

  Args:
    config: the run config (configs/pretrain_gmml.py).
    mesh: the device mesh.
    total_steps: schedule length.
    warmup_steps: linear warm-up length.
    monitor_source: source of the held-out reconstruction batch; None: no monitor.
  """
  model = build_model(config)
  tx, schedule, opt_config = optimizers.from_run_config(config, total_steps=total_steps,
                                                       warmup_steps=warmup_steps)
  weight_decay = optimizers.make_weight_decay_schedule(opt_config, total_steps)
  size = config.data.image_size
  image_shape = (size, size, config.data.num_channels)

  def init_state(rng):
    variables = model.init(rng, jnp.zeros((1,) + image_shape, jnp.float32), train=False)
    params = dict(variables["params"])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  update_fn = make_update_fn(model, tx, weight_decay=weight_decay,
                             metrics_cls=make_metrics_cls(METRIC_NAMES))
  abstract_state, state_shardings, update_fn = build_step(
      init_state, update_fn, mesh, param_sharding=config.get("param_sharding", "replicate"))
  monitor = None
  if monitor_source is not None and config.gmml.monitor_every_steps > 0:
    monitor = ReconstructionMonitor(config, model, monitor_source, mesh,
                                    params_sharding=state_shardings.params)
  return TrainSetup(model, tx, schedule, opt_config, init_state, abstract_state,
                    state_shardings, update_fn, batch_keys=("clean", "corrupted", "mask"),
                    monitor=monitor)


# --------------------------------------------------------------------------------- monitor
def gmml_dataset_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """make_gmml_dataset's view and mask arguments from config.gmml / config.data."""
  gmml = config.gmml
  size = config.data.image_size
  return dict(
      clean_ops=gmml.clean_ops.format(size=size), corrupt_ops=gmml.corrupt_ops.format(size=size),
      patch_size=models.create_model(config.model.name).patch_size,
      coverage=tuple(gmml.coverage), max_group_share=gmml.max_group_share,
      fill_shares=tuple(gmml.fill_shares), noise=gmml.noise)


def save_image_grid(path: str, rows: Sequence[np.ndarray], scale: int = 1) -> None:
  """Writes a PNG of rows of uint8 (N, H, W, C) images (one row per array, 2 px gaps)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  num, height, width, channels = rows[0].shape
  gap = 2
  canvas = np.full((len(rows) * (height + gap) - gap, num * (width + gap) - gap, channels), 255,
                   np.uint8)
  for r, images in enumerate(rows):
    for i in range(num):
      top, left = r * (height + gap), i * (width + gap)
      canvas[top:top + height, left:left + width] = images[i]
  if channels == 1:
    canvas = canvas[..., 0]
  image = Image.fromarray(canvas)
  if scale > 1:
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  storage.write_bytes(path, buffer.getvalue())  # atomic, local or gs://


def _to_uint8(images: np.ndarray) -> np.ndarray:
  return np.clip(np.rint((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


class ReconstructionMonitor:
  """Held-out masked-pixel L1 on one fixed batch, and an image grid of it.

  The batch is a seeded, class-stratified random sample of `config.gmml.monitor_images`
  records of `monitor_source` (`data_pipelines.subset.sample`, seed `config.gmml.monitor_seed`;
  never the first records, which in a file sorted by class, site or date are all alike) through
  the training views and masks with that fixed seed (the same on every process and at every
  call), so the number is comparable across steps and runs: "reconstructions improve" as a
  curve. The grid shows the first `config.gmml.grid_images` rows of that batch, which the
  pipeline's seeded shuffle has put in random order. `held_out` is the sample (`.ids`).
  """

  def __init__(self, config: ml_collections.ConfigDict, model: GMMLModel, source, mesh, *,
               params_sharding):
    self.every_steps = int(config.gmml.monitor_every_steps)
    self.grid_images = int(config.gmml.grid_images)
    self.workdir = None  # set by train_and_evaluate; None: no PNG
    self.held_out = sample(source, int(config.gmml.monitor_images), int(config.gmml.monitor_seed))
    # One pass on this process, no workers; a bad record here is an error, not a skip.
    options = stream.StreamOptions.from_config(
        config, seed=int(config.gmml.monitor_seed), shard_index=0, shard_count=1,
        num_epochs=1, skip_bad_records=False, worker_count=0)
    dataset = pipeline.make_gmml_dataset(self.held_out, batch_size=len(self.held_out),
                                         options=options, **gmml_dataset_kwargs(config))
    batch = next(iter(dataset))
    self.batch = {k: np.asarray(batch[k]) for k in ("clean", "corrupted", "mask")}
    patch_size = model.encoder.patch_size
    replicated = sharding.replicated(mesh)

    def evaluate(params, batch):
      reconstruction, _ = model.apply(
          {"params": {"encoder": params["encoder"], "head": params["head"]}},
          normalize_images(batch["corrupted"]), train=False)
      loss, metrics = masked_l1_loss(reconstruction, normalize_images(batch["clean"]),
                                     expand_patch_mask(batch["mask"], patch_size))
      return reconstruction, loss, metrics["visible_l1"]

    self._evaluate = jax.jit(evaluate, in_shardings=(params_sharding, replicated),
                             out_shardings=replicated)
    self._device_batch = put_host_tree(
        self.batch, jax.tree.map(lambda _: replicated, self.batch))

  def run(self, params: Any, step: int) -> dict[str, float]:
    params = {"encoder": params["encoder"], "head": params["head"]}
    reconstruction, loss, visible = self._evaluate(params, self._device_batch)
    if self.workdir is not None and jax.process_index() == 0 and self.grid_images > 0:
      n = self.grid_images
      save_image_grid(storage.join(self.workdir, GRID_FOLDER, f"step_{step:06d}.png"),
                      [self.batch["clean"][:n], self.batch["corrupted"][:n],
                       _to_uint8(np.asarray(reconstruction)[:n])],
                      scale=max(1, 128 // self.batch["clean"].shape[1]))
    return {"reconstruction/heldout_masked_l1": float(loss),
            "reconstruction/heldout_visible_l1": float(visible)}


# ------------------------------------------------------------------------------------ train
def make_dataset(config: ml_collections.ConfigDict, source, local_batch_size: int):
  """Clean + corrupted views per record (config.gmml)."""
  return pipeline.make_gmml_dataset(source, batch_size=local_batch_size,
                                    options=stream.StreamOptions.from_config(config),
                                    **gmml_dataset_kwargs(config))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       dataset=None) -> dict[str, Any]:
  """Pretrains a ViT with GMML; returns the run summary (see pretraining.run).

  Args:
    config: the run config (configs/pretrain_gmml.py).
    workdir: checkpoints, logs, summaries and reconstruction grids go here; an existing run
      there is resumed.
    dataset: optional Grain dataset of host batches ({"clean", "corrupted", "mask"}) used
      instead of the configured one. The source still sets the epoch length.
  """
  workdir = storage.absolute(workdir)

  def create_setup(config, mesh, source, *, total_steps, warmup_steps):
    del source  # GMML reads no labels
    monitor_source = None
    if config.gmml.monitor_every_steps > 0:
      try:
        monitor_source = sources.build_source(config.data, config.gmml.monitor_split,
                                              labels_optional=True)
      except ValueError as error:  # e.g. a folder manifest without splits
        logging.info("Held-out reconstruction monitor off: no %r split (%s).",
                     config.gmml.monitor_split, error)
    setup = create_train_setup(config, mesh, total_steps=total_steps,
                               warmup_steps=warmup_steps, monitor_source=monitor_source)
    if setup.monitor is not None:
      setup.monitor.workdir = workdir
    return setup

  return pretraining.run(config, workdir, title="GMML", make_dataset=make_dataset,
                         create_setup=create_setup, dataset=dataset)
