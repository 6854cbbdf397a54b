"""Classification metrics in plain NumPy (no scikit-learn at run time; tests compare with it)."""

from __future__ import annotations

import numpy as np
from scipy import stats


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
  """Area under the ROC curve of binary `labels` (0/1) ranked by `scores`.

  Computed as the Mann-Whitney U statistic with average ranks for ties, which equals the
  trapezoidal ROC area. Returns NaN when only one class is present (AUC is undefined).
  """
  labels = np.asarray(labels).astype(bool).ravel()
  scores = np.asarray(scores, np.float64).ravel()
  if labels.shape != scores.shape:
    raise ValueError(f"labels {labels.shape} and scores {scores.shape} differ in shape")
  num_pos = int(labels.sum())
  num_neg = labels.size - num_pos
  if num_pos == 0 or num_neg == 0:
    return float("nan")
  ranks = stats.rankdata(scores)  # average ranks for ties
  return float((ranks[labels].sum() - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg))


def macro_auc(labels: np.ndarray, scores: np.ndarray) -> tuple[float, np.ndarray]:
  """Per-class one-vs-rest AUC and their mean over classes where it is defined.

  Args:
    labels: (N,) class indices or (N, K) multi-hot.
    scores: (N, K) scores per class.

  Returns:
    (macro, per_class): the NaN-ignoring mean and the (K,) per-class AUCs.
  """
  scores = np.asarray(scores)
  labels = np.asarray(labels)
  if labels.ndim == 1:
    labels = np.eye(scores.shape[1], dtype=bool)[labels]
  per_class = np.array([roc_auc(labels[:, k], scores[:, k]) for k in range(scores.shape[1])])
  if scores.shape[1] == 2 and labels.shape[1] == 2:
    per_class[:] = roc_auc(labels[:, 1], scores[:, 1] - scores[:, 0])
  defined = per_class[~np.isnan(per_class)]
  return (float(defined.mean()) if defined.size else float("nan")), per_class
