"""Linear probe on frozen features: the read-out that says whether pretraining learned anything.

At the end of every pretraining run the loop embeds a seeded, class-stratified sample of a
labeled training split and the whole validation split with the frozen encoder (pooled
`pre_logits`), fits an L2-regularised logistic regression on the training features and reports
the validation macro AUC, beside the same probe on a randomly initialised encoder of the same
architecture. A pretrained encoder that does not beat the random one learned nothing a classifier
can use; a monitor that cannot tell them apart is broken (the kNN monitor once scored chance
because it took the first records of a class-sorted file).

The regression is fitted with SciPy's L-BFGS on standardised features (multinomial softmax for
multi-class tasks, one sigmoid per class for multi-label ones); `tests/test_linear_probe.py`
checks it against scikit-learn's `LogisticRegression` with the same penalty.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import scipy.optimize
import scipy.special

from remedis_jax import sharding
from remedis_jax.evaluators import features, metrics


def fit_logistic_regression(features: np.ndarray, labels: np.ndarray, *, num_classes: int,
                            multi_label: bool, l2: float = 1.0,
                            max_iterations: int = 500) -> tuple[np.ndarray, np.ndarray]:
  """L2-regularised logistic regression, scikit-learn's objective with C = 1 / l2.

  Minimises sum_i loss_i + l2 / 2 * ||W||^2 (the bias is not penalised), with the multinomial
  cross-entropy for multi-class labels and per-class sigmoid cross-entropies for multi-label ones.

  Args:
    features: (N, D) float features (standardise them first; `LinearProbe` does).
    labels: (N,) class indices, or (N, K) multi-hot for multi-label tasks.
    num_classes: K.
    multi_label: the task type.
    l2: the penalty's weight (1 / C of scikit-learn).
    max_iterations: L-BFGS iterations.

  Returns:
    (weights (D, K), bias (K,)) in float64.
  """
  x = np.asarray(features, np.float64)
  d = x.shape[1]
  if multi_label:
    targets = np.asarray(labels, np.float64)
  else:
    targets = np.eye(num_classes)[np.asarray(labels, np.int64)]

  def objective(theta):
    weights, bias = theta[:d * num_classes].reshape(d, num_classes), theta[d * num_classes:]
    logits = x @ weights + bias
    if multi_label:
      # log(1 + exp(z)) - y z, and its gradient sigmoid(z) - y.
      loss = np.sum(np.logaddexp(0.0, logits) - targets * logits)
      residual = scipy.special.expit(logits) - targets
    else:
      log_norm = scipy.special.logsumexp(logits, axis=1, keepdims=True)
      loss = -np.sum(targets * (logits - log_norm))
      residual = np.exp(logits - log_norm) - targets
    loss += 0.5 * l2 * np.sum(weights ** 2)
    grad_w = x.T @ residual + l2 * weights
    grad_b = residual.sum(axis=0)
    return loss, np.concatenate([grad_w.ravel(), grad_b])

  theta0 = np.zeros(d * num_classes + num_classes)
  result = scipy.optimize.minimize(objective, theta0, jac=True, method="L-BFGS-B",
                                   options={"maxiter": max_iterations})
  theta = result.x
  return theta[:d * num_classes].reshape(d, num_classes), theta[d * num_classes:]


def probe_auc(train_features: np.ndarray, train_labels: np.ndarray, eval_features: np.ndarray,
              eval_labels: np.ndarray, *, num_classes: int, multi_label: bool,
              l2: float = 1.0) -> float:
  """Macro AUC on the eval features of a logistic regression fitted on the train features.

  Features are standardised with the training set's mean and standard deviation; unlabeled
  rows (label -1) are dropped from both sets.
  """
  train_features, train_labels = _labeled(train_features, train_labels, multi_label)
  eval_features, eval_labels = _labeled(eval_features, eval_labels, multi_label)
  mean = train_features.mean(axis=0)
  std = train_features.std(axis=0) + 1e-6
  weights, bias = fit_logistic_regression((train_features - mean) / std, train_labels,
                                          num_classes=num_classes, multi_label=multi_label,
                                          l2=l2)
  scores = ((eval_features - mean) / std) @ weights + bias
  auc, _ = metrics.macro_auc(eval_labels, scores)
  return auc


def _labeled(features, labels, multi_label):
  features, labels = np.asarray(features, np.float64), np.asarray(labels)
  keep = np.all(labels >= 0, axis=1) if multi_label else labels >= 0
  return features[keep], labels[keep]


class LinearProbe:
  """`run(params)` -> validation macro AUC of a logistic regression on frozen features."""

  def __init__(self, model, train_source, eval_source, *, ops, batch_size: int, mesh,
               num_channels: int, l2: float = 1.0):
    self._train, self._eval = train_source, eval_source
    self._ops, self._batch_size, self._num_channels, self._l2 = ops, batch_size, num_channels, l2
    self._batch_sharding = sharding.batch_sharding(mesh)
    self._embed = features.make_embed_fn(model)
    self.num_classes = int(eval_source.num_classes)
    self.multi_label = bool(getattr(eval_source, "multi_label", False))

  @classmethod
  def from_config(cls, config, model, mesh) -> "LinearProbe | None":
    """The probe of `config.linear_probe`, or None (with one log line saying why) without labels.

    The training features are a seeded, class-stratified sample of `train_size` records of
    `train_split` (all of them when train_size <= 0); the evaluation split is read whole.
    """
    from data_pipelines import presets, sources, subset  # pylint: disable=g-import-not-at-top
    probe_config = config.get("linear_probe")
    if probe_config is None or not probe_config.get("enabled", True):
      return None
    try:
      train = sources.build_source(config.data, probe_config.train_split)
      evaluation = sources.build_source(config.data, probe_config.eval_split)
    except (ValueError, KeyError, FileNotFoundError) as error:
      logging.info("Linear probe off: the data has no labeled %r / %r splits (%s).",
                   probe_config.train_split, probe_config.eval_split, error)
      return None
    for name, source in (("train", train), ("eval", evaluation)):
      labels = np.asarray(source.labels)
      labeled = np.all(labels >= 0, axis=1) if source.multi_label else labels >= 0
      if len(source) == 0 or not labeled.any():
        logging.info("Linear probe off: split %r has no labeled records.",
                     probe_config[f"{name}_split"])
        return None
    train = subset.sample(train, int(probe_config.train_size), seed=int(probe_config.seed))
    ops = presets.get_preset(config.data.preset, "eval", config.data.image_size)
    return cls(model, train, evaluation, ops=ops, batch_size=int(probe_config.batch_size),
               mesh=mesh, num_channels=config.data.num_channels, l2=float(probe_config.l2))

  def run(self, params: Any) -> float:
    kwargs = dict(ops=self._ops, batch_size=self._batch_size,
                  batch_sharding=self._batch_sharding, num_channels=self._num_channels)
    train_features, train_labels = features.embed_source(self._embed, params, self._train,
                                                         **kwargs)
    eval_features, eval_labels = features.embed_source(self._embed, params, self._eval, **kwargs)
    return probe_auc(train_features, train_labels, eval_features, eval_labels,
                     num_classes=self.num_classes, multi_label=self.multi_label, l2=self._l2)
