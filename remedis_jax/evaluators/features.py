"""Frozen-encoder features of a whole source: what the kNN monitor and the linear probe read."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from remedis_jax import sharding


def make_embed_fn(model, l2_normalize: bool = False) -> Callable:
  """Jitted `(params, uint8 images) -> (B, D)` float32 pooled `pre_logits`.

  Args:
    model: the pretraining model (encoder + head; `params` has "encoder" and "head").
    l2_normalize: return unit-length features (cosine similarity as a dot product).
  """

  def embed(params, images):
    images = images.astype(jnp.float32) * (1.0 / 127.5) - 1.0
    _, intermediates = model.apply(
        {"params": {"encoder": params["encoder"], "head": params["head"]}}, images, train=False)
    features = intermediates["pre_logits"].astype(jnp.float32)
    if l2_normalize:
      features = features / jnp.linalg.norm(features, axis=-1, keepdims=True).clip(1e-12)
    return features

  return jax.jit(embed)


def embed_source(embed_fn: Callable, params: Any, source, *, ops, batch_size: int,
                 batch_sharding, num_channels: int) -> tuple[np.ndarray, np.ndarray]:
  """(features, labels) of every record of `source`, on every process, in source order.

  Args:
    embed_fn: e.g. `make_embed_fn(model)`.
    params: what `embed_fn` takes.
    source: a labeled source.
    ops: deterministic evaluation ops.
    batch_size: GLOBAL batch size (split over processes).
    batch_sharding: the NamedSharding of a global batch.
    num_channels: channels the model expects.
  """
  from data_pipelines import pipeline  # pylint: disable=g-import-not-at-top
  per_process = batch_size // jax.process_count()
  dataset = pipeline.make_eval_dataset(source, batch_size=per_process, ops=ops,
                                       num_channels=num_channels)
  features, labels = [], []
  for batch in dataset:
    images = sharding.shard_host_batch({"image": batch["image"]}, batch_sharding)["image"]
    out = multihost_utils.process_allgather(embed_fn(params, images), tiled=True)
    valid = multihost_utils.process_allgather(np.asarray(batch["valid"]), tiled=True)
    label = multihost_utils.process_allgather(np.asarray(batch["label"]), tiled=True)
    features.append(np.asarray(out)[valid])
    labels.append(np.asarray(label)[valid])
  return np.concatenate(features), np.concatenate(labels)
