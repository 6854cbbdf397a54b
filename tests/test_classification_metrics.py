"""Fine-tuning metrics vs scikit-learn / hand computations; robustness perturbations vs NumPy."""

import json

import numpy as np
import pytest
from sklearn import metrics as sk

from remedis_jax.evaluators import classification as cls
from remedis_jax.evaluators import robustness


def _binary(seed, n=300, ties=True):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, size=n)
  scores = rng.normal(size=n) + 1.2 * labels
  if ties:
    scores = np.round(scores, 1)  # many tied scores
  return labels, scores


@pytest.mark.parametrize("seed", [0, 1])
def test_roc_curve_matches_sklearn(seed):
  labels, scores = _binary(seed)
  fpr, tpr, thresholds = cls.roc_curve(labels, scores)
  sk_fpr, sk_tpr, sk_thresholds = sk.roc_curve(labels, scores, drop_intermediate=False)
  np.testing.assert_allclose(fpr, sk_fpr, atol=1e-12)
  np.testing.assert_allclose(tpr, sk_tpr, atol=1e-12)
  np.testing.assert_array_equal(thresholds, sk_thresholds)


def test_youden_threshold_is_sklearn_argmax_and_breaks_ties_high():
  labels, scores = _binary(2)
  sk_fpr, sk_tpr, sk_thresholds = sk.roc_curve(labels, scores, drop_intermediate=False)
  j = sk_tpr - sk_fpr
  expected = sk_thresholds[np.flatnonzero(j == j.max())].max()
  assert cls.youden_threshold(labels, scores) == expected
  # Hand example: positives score 0.8, 0.6; negatives 0.7, 0.2. At 0.6: tpr 1, fpr 0.5 (J 0.5);
  # at 0.8: tpr 0.5, fpr 0 (J 0.5): the tie goes to the higher threshold.
  assert cls.youden_threshold([1, 1, 0, 0], [0.8, 0.6, 0.7, 0.2]) == 0.8
  assert cls.youden_threshold([1, 1, 1], [0.1, 0.2, 0.3]) == cls.DEFAULT_THRESHOLD


def test_sensitivity_specificity_match_confusion_matrix():
  labels, scores = _binary(3)
  threshold = 0.4
  tn, fp, fn, tp = sk.confusion_matrix(labels, scores >= threshold).ravel()
  sens, spec = cls.sensitivity_specificity(labels, scores, threshold)
  assert sens == pytest.approx(tp / (tp + fn), abs=1e-15)
  assert spec == pytest.approx(tn / (tn + fp), abs=1e-15)
  # A score equal to the threshold counts as positive.
  assert cls.sensitivity_specificity([1, 0], [0.5, 0.5], 0.5) == (1.0, 0.0)


def test_balanced_accuracy_matches_sklearn():
  rng = np.random.default_rng(4)
  labels = rng.integers(0, 4, size=200)
  predictions = np.where(rng.random(200) < 0.6, labels, rng.integers(0, 4, size=200))
  assert cls.balanced_accuracy(labels, predictions) == pytest.approx(
      sk.balanced_accuracy_score(labels, predictions), abs=1e-12)


def test_expected_calibration_error_by_hand():
  # 2 bins: (0, 0.5], (0.5, 1]. Top-label confidences 0.9, 0.8, 0.6 (bin 1) and 0.5 (bin 0).
  probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.5, 0.5]])
  labels = np.array([0, 0, 0, 1])  # correct: yes, no, yes, no (argmax of a tie is class 0)
  # bin 1: 3 items, accuracy 2/3, mean confidence 2.3/3 -> |2 - 2.3| / 4;
  # bin 0: 1 item, accuracy 0, confidence 0.5 -> 0.5 / 4.
  expected = (abs(2 - 2.3) + 0.5) / 4
  assert cls.expected_calibration_error(labels, probs, num_bins=2) == pytest.approx(expected)
  # Binary ECE on p(positive) with 4 bins of width 0.25: values 0.1 (bin 0), 0.3, 0.25 (bin 0,
  # the upper edge is inclusive), 0.9 (bin 3); outcomes 0, 1, 0, 1.
  p, y = np.array([0.1, 0.3, 0.25, 0.9]), np.array([0, 1, 0, 1])
  expected = (abs(0 - 0.35) + abs(1 - 0.3) + abs(1 - 0.9)) / 4
  assert cls.binary_expected_calibration_error(y, p, num_bins=4) == pytest.approx(expected)
  # Perfectly calibrated in every bin -> 0.
  assert cls.binary_expected_calibration_error([0, 1], [0.0, 1.0], num_bins=10) == 0.0


def test_multiclass_metrics_match_sklearn():
  rng = np.random.default_rng(5)
  labels = rng.integers(0, 3, size=240)
  logits = rng.normal(size=(240, 3)) + 1.5 * np.eye(3)[labels]
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  names = ["a", "b", "c"]
  thresholds = cls.choose_thresholds(labels, probs, multi_label=False)
  assert thresholds.shape == (3,)
  out = cls.classification_metrics(labels, probs, multi_label=False, class_names=names,
                                   thresholds=thresholds)
  per_class = sk.roc_auc_score(labels, probs, multi_class="ovr", average=None)
  for name, value in zip(names, per_class):
    assert out[f"auc/{name}"] == pytest.approx(value, abs=1e-12)
  assert out["macro_auc"] == pytest.approx(per_class.mean(), abs=1e-12)
  assert out["accuracy"] == pytest.approx(sk.accuracy_score(labels, probs.argmax(1)))
  assert out["balanced_accuracy"] == pytest.approx(
      sk.balanced_accuracy_score(labels, probs.argmax(1)))
  for c, name in enumerate(names):
    tn, fp, fn, tp = sk.confusion_matrix(labels == c, probs[:, c] >= thresholds[c]).ravel()
    assert out[f"sensitivity/{name}"] == pytest.approx(tp / (tp + fn))
    assert out[f"specificity/{name}"] == pytest.approx(tn / (tn + fp))


def test_binary_softmax_metrics_match_sklearn():
  labels, scores = _binary(6, ties=False)
  p1 = 1 / (1 + np.exp(-scores))
  probs = np.stack([1 - p1, p1], axis=1)
  val_labels, val_scores = _binary(7, ties=False)
  val_p1 = 1 / (1 + np.exp(-val_scores))
  thresholds = cls.choose_thresholds(val_labels, np.stack([1 - val_p1, val_p1], 1), False)
  assert thresholds.shape == (1,)
  out = cls.classification_metrics(labels, probs, multi_label=False, class_names=["no", "yes"],
                                   thresholds=thresholds)
  assert out["macro_auc"] == pytest.approx(sk.roc_auc_score(labels, p1), abs=1e-12)
  assert out["accuracy"] == pytest.approx(sk.accuracy_score(labels, p1 > 0.5))
  tn, fp, fn, tp = sk.confusion_matrix(labels, p1 >= thresholds[0]).ravel()
  assert out["sensitivity"] == pytest.approx(tp / (tp + fn))
  assert out["specificity"] == pytest.approx(tn / (tn + fp))
  assert out["threshold"] == thresholds[0]
  curves = cls.roc_curves(labels, probs, multi_label=False, class_names=["no", "yes"])
  assert list(curves) == ["yes"] and curves["yes"]["thresholds"][0] is None
  json.dumps(curves, allow_nan=False)  # JSON-safe


def test_multilabel_metrics_match_sklearn():
  rng = np.random.default_rng(8)
  labels = rng.integers(0, 2, size=(200, 3))
  probs = 1 / (1 + np.exp(-(rng.normal(size=(200, 3)) + 1.5 * labels - 0.5)))
  names = ["x", "y", "z"]
  thresholds = cls.choose_thresholds(labels, probs, multi_label=True)
  out = cls.classification_metrics(labels, probs, multi_label=True, class_names=names,
                                   thresholds=thresholds, num_bins=10)
  auc = sk.roc_auc_score(labels, probs, average=None)
  assert out["macro_auc"] == pytest.approx(auc.mean(), abs=1e-12)
  hard = probs >= 0.5
  assert out["accuracy"] == pytest.approx(np.mean(
      [sk.accuracy_score(labels[:, c], hard[:, c]) for c in range(3)]))
  assert out["balanced_accuracy"] == pytest.approx(np.mean(
      [sk.balanced_accuracy_score(labels[:, c], hard[:, c]) for c in range(3)]))
  assert out["ece"] == pytest.approx(np.mean(
      [cls.binary_expected_calibration_error(labels[:, c], probs[:, c], 10) for c in range(3)]))
  sens = []
  for c, name in enumerate(names):
    tn, fp, fn, tp = sk.confusion_matrix(labels[:, c], probs[:, c] >= thresholds[c]).ravel()
    assert out[f"sensitivity/{name}"] == pytest.approx(tp / (tp + fn))
    sens.append(tp / (tp + fn))
  assert out["sensitivity"] == pytest.approx(np.mean(sens))


def test_class_absent_from_test_set_gives_nan_auc_not_an_error():
  labels = np.array([[1, 0], [1, 0], [0, 0]])
  probs = np.array([[0.9, 0.2], [0.6, 0.1], [0.3, 0.4]])
  out = cls.classification_metrics(labels, probs, multi_label=True, class_names=["a", "b"],
                                   thresholds=np.array([0.5, 0.5]))
  assert np.isnan(out["auc/b"]) and out["macro_auc"] == out["auc/a"] == 1.0
  assert np.isnan(out["sensitivity/b"])


def test_bad_shapes_are_named():
  with pytest.raises(ValueError, match="labels must have shape"):
    cls.classification_metrics(np.zeros(4, int), np.zeros((5, 2)), multi_label=False,
                               class_names=["a", "b"])
  with pytest.raises(ValueError, match="thresholds"):
    cls.classification_metrics(np.array([0, 1]), np.eye(2), multi_label=False,
                               class_names=["a", "b"], thresholds=np.array([0.5, 0.5]))


# ----------------------------------------------------------------------- robustness
def _batch(seed=0, size=16, channels=1):
  return np.random.default_rng(seed).integers(0, 256, size=(2, size, size, channels), dtype=np.uint8)


def test_intensity_and_gamma_perturbations_match_numpy():
  images = _batch()
  x = images.astype(np.float64)
  expected = {
      "intensity_scale(0.8)": np.clip(np.rint(x * 0.8), 0, 255),
      "intensity_shift(-0.1)": np.clip(np.rint(x - 25.5), 0, 255),
      "gamma(1.5)": np.clip(np.rint(255 * (x / 255) ** 1.5), 0, 255),
  }
  for spec, want in expected.items():
    perturbation = robustness.parse_perturbation(spec)
    assert perturbation.name == spec
    got = perturbation(images)
    assert got.dtype == np.uint8 and got.shape == images.shape
    np.testing.assert_array_equal(got, want.astype(np.uint8))


def test_geometric_perturbations():
  images = _batch(channels=3)
  np.testing.assert_array_equal(robustness.parse_perturbation("rotate(0)")(images), images)
  np.testing.assert_array_equal(robustness.parse_perturbation("scale(1)")(images), images)
  # 90 degrees counter-clockwise on a square image is np.rot90 of the (H, W) axes.
  np.testing.assert_array_equal(robustness.parse_perturbation("rotate(90)")(images),
                                np.rot90(images, k=1, axes=(1, 2)))
  flat = np.full((1, 16, 16, 1), 200, np.uint8)
  shrunk = robustness.parse_perturbation("scale(0.5)")(flat)[0, :, :, 0]
  assert shrunk[0, 0] == 0 and shrunk[8, 8] == 200  # borders padded, centre kept
  # Zooming 2x about the centre keeps a vertical edge through the centre where it is and
  # pushes everything else outwards: columns far from the edge keep their side's value.
  halves = np.zeros((1, 16, 16, 1), np.uint8)
  halves[:, :, 8:] = 200
  enlarged = robustness.parse_perturbation("scale(2)")(halves)[0, :, :, 0]
  assert (enlarged[:, :6] == 0).all() and (enlarged[:, 10:] == 200).all()
  # A bright 4x4 centre square grows to 8x8.
  square = np.zeros((1, 16, 16, 1), np.uint8)
  square[:, 6:10, 6:10] = 255
  grown = robustness.parse_perturbation("scale(2)")(square)[0, :, :, 0]
  assert (grown[5:11, 5:11] == 255).all() and (grown[:3] == 0).all()


@pytest.mark.parametrize("spec", ["gamma(0)", "blur(1)", "rotate", "scale(-1)", "gamma(1, 2)"])
def test_bad_perturbation_specs(spec):
  with pytest.raises(ValueError, match="perturbation"):
    robustness.parse_perturbation(spec)
