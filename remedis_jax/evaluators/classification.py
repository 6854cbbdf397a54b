"""Classification metrics for fine-tuning, and the evaluator that runs a model over a split.

Plain NumPy (no scikit-learn at run time; tests/test_classification_metrics.py compares every
function with scikit-learn or a hand computation). Two label formats:

* multi-class: `labels` (N,) int class indices, `probs` (N, K) softmax probabilities.
  Accuracy and balanced accuracy use the argmax prediction (for K = 2 that is p(class 1) > 0.5,
  MedMNIST's ACC). AUC is one-vs-rest per class; for K = 2 both entries are the AUC of class 1.
* multi-label: `labels` (N, K) 0/1, `probs` (N, K) sigmoid probabilities. Accuracy and balanced
  accuracy are per class at the fixed threshold 0.5, then averaged over classes (MedMNIST's
  multi-label ACC averages per-class accuracies the same way).

Operating point. Sensitivity and specificity need a threshold; it is chosen on the VALIDATION
split by Youden's J statistic (Youden 1950): the ROC threshold maximising
sensitivity + specificity - 1, ties broken towards the higher threshold (fewer positive calls).
A score counts as positive when `score >= threshold` (scikit-learn's roc_curve convention).
Multi-label: one threshold per class. Multi-class K = 2: one threshold on p(class 1).
Multi-class K > 2: one-vs-rest, one threshold per class. A class whose validation labels hold a
single value has no ROC curve; its threshold falls back to 0.5 (`DEFAULT_THRESHOLD`).

Calibration. `expected_calibration_error` (multi-class, K = 2 included) is the top-label ECE of
Guo et al. 2017: confidence = max probability, correctness = argmax == label.
`binary_expected_calibration_error` (used per class for multi-label, then averaged) bins the
predicted probability of the positive class and compares it with the observed positive rate.
Both use `num_bins` equal-width bins over [0, 1]; bin b holds values in (b/B, (b+1)/B], and a
value of exactly 0 falls in the first bin. ECE = sum over bins of (bin count / N) *
|mean target - mean confidence|; empty bins contribute nothing.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import numpy as np

from remedis_jax.evaluators import metrics as auc_metrics

DEFAULT_THRESHOLD = 0.5
DEFAULT_NUM_BINS = 15


# ------------------------------------------------------------------------------- binary pieces
def _binary_inputs(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  labels = np.asarray(labels).ravel()
  scores = np.asarray(scores, np.float64).ravel()
  if labels.shape != scores.shape:
    raise ValueError(f"labels {labels.shape} and scores {scores.shape} differ in shape")
  return labels.astype(bool), scores


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Every point of the ROC curve of binary `labels` ranked by `scores`.

  Equals `sklearn.metrics.roc_curve(labels, scores, drop_intermediate=False)`: one point per
  distinct score, in decreasing threshold order, starting at (0, 0) with threshold +inf.

  Args:
    labels: (N,) 0/1 (or bool).
    scores: (N,) scores; higher means more likely positive.

  Returns:
    (fpr, tpr, thresholds), each (M + 1,) for M distinct scores. With no positives (or no
    negatives) the tpr (fpr) is NaN, as in scikit-learn.

  Raises:
    ValueError: labels and scores differ in shape.
  """
  labels, scores = _binary_inputs(labels, scores)
  order = np.argsort(-scores, kind="mergesort")
  scores, labels = scores[order], labels[order]
  # Last index of every run of equal scores: the curve moves once per distinct threshold.
  distinct = np.flatnonzero(np.diff(scores) != 0)
  ends = np.concatenate([distinct, [scores.size - 1]]) if scores.size else np.zeros(0, int)
  true_positives = np.cumsum(labels)[ends].astype(np.float64)
  false_positives = (ends + 1 - true_positives)
  num_pos, num_neg = labels.sum(), labels.size - labels.sum()
  with np.errstate(invalid="ignore", divide="ignore"):
    tpr = np.concatenate([[0.0], true_positives]) / num_pos
    fpr = np.concatenate([[0.0], false_positives]) / num_neg
  thresholds = np.concatenate([[np.inf], scores[ends]])
  return fpr, tpr, thresholds


def youden_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
  """The threshold maximising Youden's J = sensitivity + specificity - 1 (see module docstring).

  Args:
    labels: (N,) 0/1 validation labels.
    scores: (N,) validation scores.

  Returns:
    A finite threshold (a score value); `DEFAULT_THRESHOLD` when `labels` hold one class only.
  """
  labels, scores = _binary_inputs(labels, scores)
  if labels.all() or not labels.any():
    return DEFAULT_THRESHOLD
  fpr, tpr, thresholds = roc_curve(labels, scores)
  j = tpr[1:] - fpr[1:]  # drop the +inf point: it calls nothing positive (J = 0)
  return float(thresholds[1:][int(np.argmax(j))])  # argmax: first = highest threshold


def sensitivity_specificity(labels: np.ndarray, scores: np.ndarray,
                            threshold: float) -> tuple[float, float]:
  """(TP / (TP + FN), TN / (TN + FP)) when `score >= threshold` is called positive.

  Returns NaN for a rate whose denominator is 0 (no positives / no negatives).
  """
  labels, scores = _binary_inputs(labels, scores)
  predicted = scores >= threshold
  num_pos, num_neg = labels.sum(), (~labels).sum()
  sensitivity = (predicted & labels).sum() / num_pos if num_pos else float("nan")
  specificity = (~predicted & ~labels).sum() / num_neg if num_neg else float("nan")
  return float(sensitivity), float(specificity)


def binary_expected_calibration_error(labels: np.ndarray, probs: np.ndarray,
                                      num_bins: int = DEFAULT_NUM_BINS) -> float:
  """ECE of positive-class probabilities against 0/1 outcomes (binning in the module docstring).

  Args:
    labels: (N,) 0/1 outcomes.
    probs: (N,) predicted probability of the positive class, in [0, 1].
    num_bins: equal-width bins over [0, 1].

  Returns:
    The ECE in [0, 1]; NaN for N = 0.
  """
  labels, probs = _binary_inputs(labels, probs)
  return _binned_calibration_gap(probs, labels.astype(np.float64), num_bins)


def _binned_calibration_gap(confidence: np.ndarray, target: np.ndarray, num_bins: int) -> float:
  if num_bins < 1:
    raise ValueError(f"num_bins must be >= 1; got {num_bins}")
  if confidence.size == 0:
    return float("nan")
  # (b/B, (b+1)/B] -> b; 0 -> bin 0.
  bins = np.clip(np.ceil(confidence * num_bins).astype(np.int64) - 1, 0, num_bins - 1)
  counts = np.bincount(bins, minlength=num_bins).astype(np.float64)
  confidence_sum = np.bincount(bins, weights=confidence, minlength=num_bins)
  target_sum = np.bincount(bins, weights=target, minlength=num_bins)
  return float(np.abs(target_sum - confidence_sum).sum() / confidence.size)


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray,
                               num_bins: int = DEFAULT_NUM_BINS) -> float:
  """Top-label ECE of multi-class probabilities (Guo et al. 2017; binning in module docstring).

  Args:
    labels: (N,) class indices.
    probs: (N, K) probabilities (rows sum to 1).
    num_bins: equal-width confidence bins over [0, 1].

  Returns:
    The ECE in [0, 1]; NaN for N = 0.
  """
  probs = np.asarray(probs, np.float64)
  labels = np.asarray(labels).ravel()
  if probs.ndim != 2 or probs.shape[0] != labels.shape[0]:
    raise ValueError(f"expected probs (N, K) and labels (N,); got {probs.shape} and {labels.shape}")
  correct = (probs.argmax(axis=1) == labels).astype(np.float64)
  return _binned_calibration_gap(probs.max(axis=1), correct, num_bins)


def balanced_accuracy(labels: np.ndarray, predictions: np.ndarray) -> float:
  """Mean over the classes present in `labels` of their recall (= sklearn balanced_accuracy_score)."""
  labels, predictions = np.asarray(labels).ravel(), np.asarray(predictions).ravel()
  recalls = [np.mean(predictions[labels == c] == c) for c in np.unique(labels)]
  return float(np.mean(recalls)) if recalls else float("nan")


# ----------------------------------------------------------------------------- task helpers
def _one_vs_rest(labels: np.ndarray, probs: np.ndarray, multi_label: bool) -> tuple[
    np.ndarray, np.ndarray]:
  """(N, C) binary labels and scores, one column per thresholded class.

  Multi-label and multi-class K > 2: one column per class. Multi-class K = 2: a single
  column, class 1 against class 0.
  """
  probs = np.asarray(probs, np.float64)
  labels = np.asarray(labels)
  if multi_label:
    return labels.astype(bool), probs
  num_classes = probs.shape[1]
  one_hot = np.eye(num_classes, dtype=bool)[labels.astype(np.int64)]
  if num_classes == 2:
    return one_hot[:, 1:], probs[:, 1:]
  return one_hot, probs


def check_predictions(labels: np.ndarray, probs: np.ndarray, multi_label: bool) -> None:
  """Raises ValueError naming the mismatch between labels and probs."""
  labels, probs = np.asarray(labels), np.asarray(probs)
  if probs.ndim != 2:
    raise ValueError(f"probs must be (N, K); got shape {probs.shape}")
  expected = probs.shape if multi_label else probs.shape[:1]
  if labels.shape != expected:
    kind = "multi-label (N, K) 0/1" if multi_label else "multi-class (N,) indices"
    raise ValueError(f"{kind} labels must have shape {expected}; got {labels.shape}")


def choose_thresholds(labels: np.ndarray, probs: np.ndarray, multi_label: bool) -> np.ndarray:
  """Per-column operating points by Youden's J on validation predictions (module docstring).

  Returns:
    (C,) thresholds: C = K for multi-label and multi-class K > 2, C = 1 for K = 2.
  """
  check_predictions(labels, probs, multi_label)
  binary_labels, scores = _one_vs_rest(labels, probs, multi_label)
  return np.array([youden_threshold(binary_labels[:, c], scores[:, c])
                   for c in range(scores.shape[1])])


def _nanmean(values: Sequence[float]) -> float:
  values = np.asarray(values, np.float64)
  values = values[~np.isnan(values)]
  return float(values.mean()) if values.size else float("nan")


def classification_metrics(labels: np.ndarray, probs: np.ndarray, *, multi_label: bool,
                           class_names: Sequence[str], thresholds: np.ndarray | None = None,
                           num_bins: int = DEFAULT_NUM_BINS) -> dict[str, float]:
  """All fine-tuning metrics of one split, as a flat dict of floats.

  Keys: `macro_auc`, `auc/<class>`, `accuracy`, `balanced_accuracy`, `ece`, `num_examples`;
  with `thresholds`: `sensitivity`, `specificity` (macro over thresholded columns) and, when
  there is more than one column, `sensitivity/<class>`, `specificity/<class>`,
  `threshold/<class>`; for K = 2, `threshold`.

  Args:
    labels: (N,) class indices or (N, K) 0/1 multi-hot; unlabeled rows must be removed first.
    probs: (N, K) softmax (multi-class) or sigmoid (multi-label) probabilities.
    multi_label: the label format.
    class_names: K names.
    thresholds: operating points from `choose_thresholds` on validation, or None to skip
      sensitivity / specificity.
    num_bins: ECE bins.

  Returns:
    {name: float}; undefined values (e.g. AUC of a class absent from the split) are NaN.

  Raises:
    ValueError: shapes do not fit, or the number of thresholds is wrong.
  """
  check_predictions(labels, probs, multi_label)
  labels, probs = np.asarray(labels), np.asarray(probs, np.float64)
  num_classes = probs.shape[1]
  if len(class_names) != num_classes:
    raise ValueError(f"{len(class_names)} class names for {num_classes} probability columns")
  out: dict[str, float] = {"num_examples": float(labels.shape[0])}
  binary_labels, scores = _one_vs_rest(labels, probs, multi_label)
  if multi_label or num_classes > 2:
    per_class = [auc_metrics.roc_auc(binary_labels[:, c], scores[:, c])
                 for c in range(num_classes)]
  else:  # K = 2: one AUC (class 1 vs class 0), reported for both classes
    per_class = [auc_metrics.roc_auc(binary_labels[:, 0], scores[:, 0])] * 2
  # metrics.macro_auc is not used: it treats any 2-column input as a binary softmax, which is
  # wrong for 2-label multi-label data.
  out["macro_auc"] = _nanmean(per_class)
  for name, value in zip(class_names, per_class):
    out[f"auc/{name}"] = float(value)

  if multi_label:
    hard = probs >= DEFAULT_THRESHOLD
    truth = labels.astype(bool)
    out["accuracy"] = float(np.mean(hard == truth))  # = mean over classes (same N each)
    out["balanced_accuracy"] = _nanmean(
        [balanced_accuracy(truth[:, c], hard[:, c]) for c in range(num_classes)])
    out["ece"] = _nanmean([binary_expected_calibration_error(truth[:, c], probs[:, c], num_bins)
                           for c in range(num_classes)])
  else:
    predictions = probs.argmax(axis=1)
    out["accuracy"] = float(np.mean(predictions == labels))
    out["balanced_accuracy"] = balanced_accuracy(labels, predictions)
    out["ece"] = expected_calibration_error(labels, probs, num_bins)

  if thresholds is not None:
    thresholds = np.asarray(thresholds, np.float64).ravel()
    if thresholds.shape[0] != scores.shape[1]:
      raise ValueError(f"{thresholds.shape[0]} thresholds for {scores.shape[1]} thresholded "
                       "columns; pass choose_thresholds(...) of the validation split")
    pairs = [sensitivity_specificity(binary_labels[:, c], scores[:, c], thresholds[c])
             for c in range(scores.shape[1])]
    out["sensitivity"] = _nanmean([p[0] for p in pairs])
    out["specificity"] = _nanmean([p[1] for p in pairs])
    if scores.shape[1] == 1:
      out["threshold"] = float(thresholds[0])
    else:
      for name, (sens, spec), threshold in zip(class_names, pairs, thresholds):
        out[f"sensitivity/{name}"] = sens
        out[f"specificity/{name}"] = spec
        out[f"threshold/{name}"] = float(threshold)
  return out


def roc_curves(labels: np.ndarray, probs: np.ndarray, *, multi_label: bool,
               class_names: Sequence[str]) -> dict[str, dict[str, list[float]]]:
  """ROC points per class, JSON-ready: {class: {"fpr": [...], "tpr": [...], "thresholds": [...]}}.

  Multi-class K = 2 gives one curve, named after class 1. The first threshold (+inf) and
  undefined rates (NaN) are written as `null`: JSON has neither.
  """
  check_predictions(labels, probs, multi_label)
  binary_labels, scores = _one_vs_rest(labels, probs, multi_label)
  names = list(class_names) if scores.shape[1] > 1 else [class_names[1]]
  curves = {}
  for c, name in enumerate(names):
    fpr, tpr, thresholds = roc_curve(binary_labels[:, c], scores[:, c])
    curves[name] = {
        "fpr": [None if np.isnan(v) else float(v) for v in fpr],
        "tpr": [None if np.isnan(v) else float(v) for v in tpr],
        "thresholds": [None if not np.isfinite(v) else float(v) for v in thresholds],
    }
  return curves


def drop_unlabeled(labels: np.ndarray, probs: np.ndarray, multi_label: bool,
                   *extra: np.ndarray) -> tuple[np.ndarray, ...]:
  """Removes rows without a label (-1, or all -1 for multi-label); filters `extra` alike."""
  labels = np.asarray(labels)
  keep = np.all(labels >= 0, axis=1) if multi_label else labels >= 0
  return (labels[keep], np.asarray(probs)[keep]) + tuple(np.asarray(e)[keep] for e in extra)


# ------------------------------------------------------------------------------ the evaluator
class ClassificationEvaluator:
  """Runs a jitted `predict_fn(params, images) -> probs` over one source; yields the metrics.

  `predict(params)` returns (labels, probs) of every labeled record, gathered over processes;
  `run(params, thresholds)` yields `(name, value)` pairs of `classification_metrics`.
  An optional `perturb(images, index) -> images` maps each host batch of uint8 images (B, H, W,
  C) before it reaches the device (robustness evaluation, see evaluators/robustness.py).
  """

  def __init__(self, predict_fn: Callable, source: Any, *, ops: Any, batch_size: int, mesh: Any,
               num_channels: int, perturb: Callable[[np.ndarray], np.ndarray] | None = None,
               num_bins: int = DEFAULT_NUM_BINS):
    from remedis_jax import sharding  # pylint: disable=g-import-not-at-top
    self._sharding = sharding
    self._predict_fn, self._source, self._ops = predict_fn, source, ops
    self._batch_size, self._num_channels = batch_size, num_channels
    self._batch_sharding = sharding.batch_sharding(mesh)
    self._perturb, self._num_bins = perturb, num_bins
    self.multi_label = bool(source.multi_label)
    self.class_names = list(source.class_names)

  def with_perturbation(self, perturb: Callable[[np.ndarray], np.ndarray]) -> "ClassificationEvaluator":
    """A copy that perturbs every batch with `perturb` (same source, ops and model)."""
    clone = object.__new__(ClassificationEvaluator)
    clone.__dict__.update(self.__dict__)
    clone._perturb = perturb  # pylint: disable=protected-access
    return clone

  def predict(self, params: Any) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probs) of the labeled records of the source, in source order per process."""
    import jax  # pylint: disable=g-import-not-at-top
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    from data_pipelines import pipeline  # pylint: disable=g-import-not-at-top
    per_process = self._batch_size // jax.process_count()
    dataset = pipeline.make_eval_dataset(self._source, batch_size=per_process, ops=self._ops,
                                         num_channels=self._num_channels)
    all_labels, all_probs = [], []
    for batch in dataset:
      images = np.asarray(batch["image"])
      if self._perturb is not None:
        images = self._perturb(images)
      images = self._sharding.shard_host_batch({"image": images}, self._batch_sharding)["image"]
      probs = multihost_utils.process_allgather(self._predict_fn(params, images), tiled=True)
      valid = multihost_utils.process_allgather(np.asarray(batch["valid"]), tiled=True)
      labels = multihost_utils.process_allgather(np.asarray(batch["label"]), tiled=True)
      all_probs.append(np.asarray(probs, np.float64)[valid])
      all_labels.append(np.asarray(labels)[valid])
    labels, probs = np.concatenate(all_labels), np.concatenate(all_probs)
    return drop_unlabeled(labels, probs, self.multi_label)

  def metrics(self, labels: np.ndarray, probs: np.ndarray,
              thresholds: np.ndarray | None = None) -> dict[str, float]:
    return classification_metrics(labels, probs, multi_label=self.multi_label,
                                  class_names=self.class_names, thresholds=thresholds,
                                  num_bins=self._num_bins)

  def run(self, params: Any, thresholds: np.ndarray | None = None) -> Iterator[tuple[str, float]]:
    labels, probs = self.predict(params)
    yield from self.metrics(labels, probs, thresholds).items()
