"""k-nearest-neighbour monitor of a representation during pretraining.

Embeds a labeled "bank" split and a "query" split with the current encoder (pooled
`pre_logits`, L2-normalised) and classifies each query by a similarity-weighted vote of its k
nearest bank neighbours (weights exp(cos / tau), as in Wu et al. 2018 / DINO). It needs no
training, so it is the cheap signal to watch during long pretraining runs: if kNN accuracy or AUC
stops improving, so will fine-tuning.
"""

from __future__ import annotations

from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from remedis_jax import sharding
from remedis_jax.evaluators import metrics


class FirstN:
  """The first `n` records of a source, with the source's attributes (a cheap, fixed view)."""

  def __init__(self, source, n: int):
    self._source = source
    self._n = min(int(n), len(source)) if n and n > 0 else len(source)

  def __len__(self):
    return self._n

  def __getitem__(self, index):
    if not 0 <= index < self._n:
      raise IndexError(index)
    return self._source[index]

  def __getattr__(self, name):
    if name == "_source":
      raise AttributeError(name)
    value = getattr(self._source, name)
    if name in ("labels", "ids"):
      return value[: self._n]
    return value


def knn_scores(query: np.ndarray, bank: np.ndarray, bank_labels: np.ndarray, *, k: int,
               temperature: float, num_classes: int, multi_label: bool) -> np.ndarray:
  """Class scores (Q, K) of each query from its k nearest bank rows (inputs L2-normalised)."""
  similarity = query @ bank.T
  k = min(k, bank.shape[0])
  neighbours = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
  neighbour_sim = np.take_along_axis(similarity, neighbours, axis=1)
  weights = np.exp(neighbour_sim / temperature)
  if multi_label:
    votes = bank_labels[neighbours].astype(np.float64)  # (Q, k, K)
  else:
    votes = np.eye(num_classes)[bank_labels[neighbours]]
  return (weights[..., None] * votes).sum(axis=1) / weights.sum(axis=1, keepdims=True)


class KnnEvaluator:
  """`run(params)` yields ('accuracy' | 'auc', value) for the current encoder."""

  def __init__(self, model, bank_source, query_source, *, ops, batch_size: int, mesh,
               num_channels: int, k: int = 20, temperature: float = 0.07):
    from data_pipelines import pipeline  # pylint: disable=g-import-not-at-top
    self._pipeline = pipeline
    self._bank, self._query = bank_source, query_source
    self._ops, self._batch_size, self._num_channels = ops, batch_size, num_channels
    self._k, self._temperature = k, temperature
    self._batch_sharding = sharding.batch_sharding(mesh)
    self._multi_label = bool(getattr(query_source, "multi_label", False))
    self._num_classes = int(query_source.num_classes)

    def embed(params, images):
      images = images.astype(jnp.float32) * (1.0 / 127.5) - 1.0
      _, intermediates = model.apply(
          {"params": {"encoder": params["encoder"], "head": params["head"]}}, images, train=False)
      features = intermediates["pre_logits"].astype(jnp.float32)
      return features / jnp.linalg.norm(features, axis=-1, keepdims=True).clip(1e-12)

    self._embed = jax.jit(embed)

  @classmethod
  def from_config(cls, config, model, mesh) -> "KnnEvaluator":
    from data_pipelines import presets, sources  # pylint: disable=g-import-not-at-top
    bank = FirstN(sources.build_source(config.data, config.knn.bank_split), config.knn.bank_size)
    query = FirstN(sources.build_source(config.data, config.knn.query_split),
                   config.knn.query_size)
    ops = presets.get_preset(config.data.preset, "eval", config.data.image_size)
    return cls(model, bank, query, ops=ops, batch_size=config.knn.batch_size, mesh=mesh,
               num_channels=config.data.num_channels, k=config.knn.k,
               temperature=config.knn.temperature)

  def _features(self, params, source) -> tuple[np.ndarray, np.ndarray]:
    per_process = self._batch_size // jax.process_count()
    dataset = self._pipeline.make_eval_dataset(source, batch_size=per_process, ops=self._ops,
                                               num_channels=self._num_channels)
    features, labels = [], []
    for batch in dataset:
      images = sharding.shard_host_batch({"image": batch["image"]}, self._batch_sharding)["image"]
      out = multihost_utils.process_allgather(self._embed(params, images), tiled=True)
      valid = multihost_utils.process_allgather(np.asarray(batch["valid"]), tiled=True)
      label = multihost_utils.process_allgather(np.asarray(batch["label"]), tiled=True)
      features.append(np.asarray(out)[valid])
      labels.append(np.asarray(label)[valid])
    return np.concatenate(features), np.concatenate(labels)

  def run(self, params: Any) -> Iterator[tuple[str, float]]:
    bank_features, bank_labels = self._features(params, self._bank)
    query_features, query_labels = self._features(params, self._query)
    if not self._multi_label:
      keep = bank_labels >= 0
      bank_features, bank_labels = bank_features[keep], bank_labels[keep]
      keep = query_labels >= 0
      query_features, query_labels = query_features[keep], query_labels[keep]
    scores = knn_scores(query_features, bank_features, bank_labels, k=self._k,
                        temperature=self._temperature, num_classes=self._num_classes,
                        multi_label=self._multi_label)
    auc, _ = metrics.macro_auc(query_labels, scores)
    yield "auc", auc
    if not self._multi_label:
      yield "accuracy", float(np.mean(scores.argmax(axis=1) == query_labels))
