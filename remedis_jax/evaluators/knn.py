"""k-nearest-neighbour monitor of a representation during pretraining.

Embeds a labeled "bank" split and a "query" split with the current encoder (pooled
`pre_logits`, L2-normalised) and classifies each query by a similarity-weighted vote of its k
nearest bank neighbours (weights exp(cos / tau), as in Wu et al. 2018 / DINO). It needs no
training, so it is the cheap signal to watch during long pretraining runs: if kNN accuracy or AUC
stops improving, so will fine-tuning.

The bank and the query are seeded, class-stratified random samples of `knn.bank_size` /
`knn.query_size` records of their splits (`data_pipelines.subset.sample`; seed
`knn.sample_seed` if the config has it, else 0), fixed for the whole run so the curve compares
like with like. Never the first records: real splits are often sorted by class
(PneumoniaMNIST's training split starts with 3494 pneumonia images), and a one-class bank gives
AUC 0.5 at every step.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

import numpy as np

from remedis_jax import sharding
from remedis_jax.evaluators import features, metrics


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
    self._bank, self._query = bank_source, query_source
    self._ops, self._batch_size, self._num_channels = ops, batch_size, num_channels
    self._k, self._temperature = k, temperature
    self._batch_sharding = sharding.batch_sharding(mesh)
    self._multi_label = bool(getattr(query_source, "multi_label", False))
    self._num_classes = int(query_source.num_classes)

    self._embed = features.make_embed_fn(model, l2_normalize=True)

  @classmethod
  def from_config(cls, config, model, mesh) -> "KnnEvaluator | None":
    """The monitor of `config.knn`, or None (with one log line saying why) without labels.

    Bank and query are seeded, class-stratified samples of `bank_split` / `query_split`.
    """
    from data_pipelines import presets, sources, subset  # pylint: disable=g-import-not-at-top
    seed = int(config.knn.get("sample_seed", 0))
    splits = {}
    for role in ("bank", "query"):
      split = config.knn[f"{role}_split"]
      try:
        source = sources.build_source(config.data, split)
      except (ValueError, KeyError, FileNotFoundError) as error:
        logging.info("kNN monitor off: the data has no labeled %r split (%s).", split, error)
        return None
      labels = np.asarray(source.labels)
      labeled = np.all(labels >= 0, axis=-1) if source.multi_label else labels >= 0
      if len(source) == 0 or source.num_classes < 1 or not labeled.any():
        logging.info("kNN monitor off: split %r (%s) has no labeled records.", split,
                     source.name)
        return None
      splits[role] = source
    bank = subset.sample(splits["bank"], int(config.knn.bank_size), seed)
    query = subset.sample(splits["query"], int(config.knn.query_size), seed)
    ops = presets.get_preset(config.data.preset, "eval", config.data.image_size)
    return cls(model, bank, query, ops=ops, batch_size=config.knn.batch_size, mesh=mesh,
               num_channels=config.data.num_channels, k=config.knn.k,
               temperature=config.knn.temperature)

  def _features(self, params, source) -> tuple[np.ndarray, np.ndarray]:
    return features.embed_source(self._embed, params, source, ops=self._ops,
                                 batch_size=self._batch_size,
                                 batch_sharding=self._batch_sharding,
                                 num_channels=self._num_channels)

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
