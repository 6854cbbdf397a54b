"""The end-of-pretraining linear probe: the regression against scikit-learn, and the read-out."""

import numpy as np
import pytest
from sklearn import linear_model, metrics as sk_metrics

from remedis_jax.evaluators import linear_probe


def _blobs(rng, n, num_classes, dim, separation):
  labels = rng.integers(0, num_classes, size=n)
  centres = rng.normal(size=(num_classes, dim)) * separation
  return centres[labels] + rng.normal(size=(n, dim)), labels


@pytest.mark.parametrize("l2", [0.1, 1.0, 10.0])
def test_multiclass_fit_equals_scikit_learn(l2):
  rng = np.random.default_rng(0)
  x, y = _blobs(rng, 300, 3, 8, separation=1.0)
  weights, bias = linear_probe.fit_logistic_regression(x, y, num_classes=3, multi_label=False,
                                                       l2=l2)
  reference = linear_model.LogisticRegression(C=1.0 / l2, tol=1e-10, max_iter=10_000).fit(x, y)
  logits = x @ weights + bias
  ours = np.exp(logits - logits.max(axis=1, keepdims=True))
  ours /= ours.sum(axis=1, keepdims=True)
  # Softmax logits are defined up to a shared shift (the bias is not penalised): compare the
  # probabilities, and the weights, which the penalty makes unique.
  np.testing.assert_allclose(ours, reference.predict_proba(x), atol=1e-4)
  np.testing.assert_allclose(weights.T, reference.coef_, atol=1e-3)


def test_multilabel_fit_equals_one_scikit_learn_model_per_class():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(200, 6))
  y = np.stack([(x[:, 0] + 0.5 * rng.normal(size=200)) > 0,
                (x[:, 1] - x[:, 2] + rng.normal(size=200)) > 0.3], axis=1).astype(np.float32)
  weights, bias = linear_probe.fit_logistic_regression(x, y, num_classes=2, multi_label=True,
                                                       l2=1.0)
  for k in range(2):
    reference = linear_model.LogisticRegression(C=1.0, tol=1e-10, max_iter=10_000).fit(x, y[:, k])
    np.testing.assert_allclose(weights[:, k], reference.coef_[0], atol=1e-4)
    np.testing.assert_allclose(bias[k], reference.intercept_[0], atol=1e-4)


def test_probe_auc_sees_signal_and_reports_chance_without_it():
  rng = np.random.default_rng(2)
  x, y = _blobs(rng, 600, 2, 16, separation=0.6)
  informative = linear_probe.probe_auc(x[:400], y[:400], x[400:], y[400:], num_classes=2,
                                       multi_label=False)
  # The same number from scikit-learn on the same standardised features.
  mean, std = x[:400].mean(0), x[:400].std(0) + 1e-6
  reference = linear_model.LogisticRegression(C=1.0, max_iter=10_000).fit((x[:400] - mean) / std,
                                                                          y[:400])
  expected = sk_metrics.roc_auc_score(y[400:], reference.decision_function((x[400:] - mean) / std))
  assert informative > 0.9
  assert informative == pytest.approx(expected, abs=2e-3)
  noise = rng.normal(size=x.shape)
  chance = linear_probe.probe_auc(noise[:400], y[:400], noise[400:], y[400:], num_classes=2,
                                  multi_label=False)
  assert abs(chance - 0.5) < 0.1


def test_unlabeled_rows_are_left_out():
  rng = np.random.default_rng(3)
  x, y = _blobs(rng, 300, 2, 4, separation=2.0)
  with_unlabeled = y.copy()
  with_unlabeled[::3] = -1  # an unlabeled record must not count as a class
  auc = linear_probe.probe_auc(x[:200], with_unlabeled[:200], x[200:], with_unlabeled[200:],
                               num_classes=2, multi_label=False)
  keep_train, keep_eval = with_unlabeled[:200] >= 0, with_unlabeled[200:] >= 0
  expected = linear_probe.probe_auc(x[:200][keep_train], y[:200][keep_train],
                                    x[200:][keep_eval], y[200:][keep_eval], num_classes=2,
                                    multi_label=False)
  # The same fit on the same rows, up to rounding (the rows are copied differently, and BLAS
  # results can depend on memory alignment); counting an unlabeled row moves the AUC far more.
  assert auc == pytest.approx(expected, rel=0, abs=1e-9)
