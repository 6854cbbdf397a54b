"""AUC and kNN scoring against scikit-learn."""

import numpy as np
import pytest
from sklearn import metrics as sk_metrics
from sklearn import neighbors

from remedis_jax.evaluators import knn, metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_auc_matches_sklearn_with_ties(seed):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, size=200)
  scores = np.round(rng.normal(size=200) + labels, 1)  # rounding creates ties
  assert metrics.roc_auc(labels, scores) == pytest.approx(
      sk_metrics.roc_auc_score(labels, scores), abs=1e-12)


def test_roc_auc_undefined_for_one_class():
  assert np.isnan(metrics.roc_auc(np.ones(5), np.arange(5)))


def test_macro_auc_multilabel_matches_sklearn():
  rng = np.random.default_rng(3)
  labels = rng.integers(0, 2, size=(150, 4))
  scores = rng.normal(size=(150, 4)) + labels * np.array([0.1, 0.5, 1.0, 2.0])
  macro, per_class = metrics.macro_auc(labels, scores)
  expected = sk_metrics.roc_auc_score(labels, scores, average=None)
  np.testing.assert_allclose(per_class, expected, atol=1e-12)
  assert macro == pytest.approx(expected.mean(), abs=1e-12)


def test_macro_auc_multiclass_matches_sklearn_ovr():
  rng = np.random.default_rng(4)
  labels = rng.integers(0, 3, size=120)
  logits = rng.normal(size=(120, 3)) + np.eye(3)[labels]
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  macro, _ = metrics.macro_auc(labels, probs)
  assert macro == pytest.approx(
      sk_metrics.roc_auc_score(labels, probs, multi_class="ovr", average="macro"), abs=1e-12)


def test_knn_scores_match_sklearn_uniform_vote():
  rng = np.random.default_rng(5)
  bank = rng.normal(size=(60, 8))
  bank /= np.linalg.norm(bank, axis=1, keepdims=True)
  query = rng.normal(size=(20, 8))
  query /= np.linalg.norm(query, axis=1, keepdims=True)
  bank_labels = rng.integers(0, 3, size=60)
  # A huge temperature makes every neighbour's weight equal: sklearn's uniform kNN vote.
  scores = knn.knn_scores(query, bank, bank_labels, k=5, temperature=1e9, num_classes=3,
                          multi_label=False)
  reference = neighbors.KNeighborsClassifier(n_neighbors=5, metric="cosine").fit(
      bank, bank_labels).predict_proba(query)
  np.testing.assert_allclose(scores, reference, atol=1e-9)


def test_knn_scores_weighting_prefers_closer_neighbour():
  bank = np.array([[1.0, 0.0], [0.0, 1.0]])
  query = np.array([[0.9, np.sqrt(1 - 0.81)]])
  scores = knn.knn_scores(query, bank, np.array([0, 1]), k=2, temperature=0.1, num_classes=2,
                          multi_label=False)
  w0, w1 = np.exp(0.9 / 0.1), np.exp(np.sqrt(0.19) / 0.1)
  np.testing.assert_allclose(scores, [[w0 / (w0 + w1), w1 / (w0 + w1)]], rtol=1e-12)


def test_knn_scores_multilabel_is_weighted_mean_of_neighbour_labels():
  bank = np.eye(3)
  labels = np.array([[1, 0], [1, 1], [0, 1]], np.float32)
  query = np.array([[1.0, 0.0, 0.0]])
  scores = knn.knn_scores(query, bank, labels, k=3, temperature=1.0, num_classes=2,
                          multi_label=True)
  w = np.exp(np.array([1.0, 0.0, 0.0]))
  np.testing.assert_allclose(scores[0], (w[:, None] * labels).sum(0) / w.sum(), rtol=1e-6)
