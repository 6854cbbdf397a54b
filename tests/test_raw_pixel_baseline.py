"""experiments/raw_pixel_baseline.py: the fine-tuning runs' subsets, C chosen on validation,
test scored by the chosen model (checked against scikit-learn fitted here)."""

import numpy as np
import pytest
from sklearn import linear_model, metrics, pipeline, preprocessing

from data_pipelines import subset as subset_lib
from data_pipelines.sources.medmnist import MedMNISTSource
from experiments import raw_pixel_baseline


def write_npz(path, seed, shift=0.0):
  rng = np.random.default_rng(seed)
  arrays = {}
  for split, n in (("train", 80), ("val", 40), ("test", 40)):
    labels = (np.arange(n) % 3 == 0).astype(np.uint8)  # imbalanced, like the real files
    images = rng.normal(100 + shift, 40, (n, 8, 8))
    images[:, 2:5, 2:5] += labels[:, None, None] * 25
    arrays[f"{split}_images"] = np.clip(images, 0, 255).astype(np.uint8)
    arrays[f"{split}_labels"] = labels[:, None]
  np.savez(path, **arrays)
  return str(path)


def test_rows_match_scikit_learn_on_the_runs_subsets(tmp_path):
  train = write_npz(tmp_path / "a.npz", 0)
  other = write_npz(tmp_path / "b.npz", 1, shift=20.0)
  rows = raw_pixel_baseline.run(train, test_data=other, test_name="site_b",
                                label_fractions=(0.25, 1.0), seeds=(0, 1),
                                out=str(tmp_path / "out"), log=lambda *a: None)
  assert [(r["label_fraction"], r["seed"]) for r in rows] == [(0.25, 0), (0.25, 1), (1.0, 0),
                                                             (1.0, 1)]
  load = lambda path, split: raw_pixel_baseline.load_split(path, split)
  x, y, _ = load(train, "train")
  x_val, y_val, _ = load(train, "val")
  x_test, y_test, _ = load(other, "test")
  source = MedMNISTSource(train, "train")
  for row in rows:
    index = subset_lib.subset_indices(source, row["label_fraction"], row["seed"])
    assert row["num_train_labels"] == len(index) and row["test_set"] == "site_b"
    # Independently: every C on validation, the best one scored on test.
    scores = {}
    for c in raw_pixel_baseline.C_GRID:
      model = pipeline.make_pipeline(preprocessing.StandardScaler(),
                                     linear_model.LogisticRegression(C=c, max_iter=2000))
      model.fit(x[index], y[index])
      scores[c] = (metrics.roc_auc_score(y_val, model.predict_proba(x_val)[:, 1]),
                   metrics.roc_auc_score(y_test, model.predict_proba(x_test)[:, 1]))
    best = max(raw_pixel_baseline.C_GRID, key=lambda c: scores[c][0])
    assert row["error"] == f"C={best:g}"
    assert row["best_val"] == pytest.approx(scores[best][0])
    assert row["auc"] == pytest.approx(scores[best][1])
  assert (tmp_path / "out" / "summary.md").read_text().count("raw_pixels") == 1


def test_a_subset_with_one_class_is_refused(tmp_path):
  path = write_npz(tmp_path / "a.npz", 0)
  with np.load(path) as f:
    arrays = dict(f)
  arrays["train_labels"][:] = 0  # no pneumonia in the training split at all
  np.savez(path, **arrays)
  with pytest.raises(ValueError, match="keeps one class only"):
    raw_pixel_baseline.run(path, label_fractions=(0.01,), log=lambda *a: None)
