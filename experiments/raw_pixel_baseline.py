r"""The raw-pixel floor: a logistic regression on pixels, at the label fractions of a study.

  python -m experiments.raw_pixel_baseline --train_data=../shared/data/adult_cxr.npz \
    --label_fractions=0.01,0.1,1.0 --seeds=0,1,2,3,4 --out=workdirs/raw_pixels_adult

  # zero-shot: trained on PneumoniaMNIST, scored on the adult test split
  python -m experiments.raw_pixel_baseline --train_data=../shared/data/pneumoniamnist.npz \
    --test_data=../shared/data/adult_cxr.npz --test_name=adult_cxr --out=workdirs/raw_pixels_zs

When the classes of a dataset come from different sources, acquisition differences alone can
separate them; a representation that does not beat this row has not shown it learned anything
about the disease. Per (fraction, seed) the training subset is the one the fine-tuning runs of
that seed use (data_pipelines/subset.py, stratified), pixels are standardised on it, and the
inverse regularisation strength C is chosen on the training data's VALIDATION split (largest
AUC; ties to the smaller C); the chosen model scores the test split of `--test_data` once.
Outputs in OUT: results.csv (sweep_results rows, init "raw_pixels"), summary.md (mean, std and
95% interval per fraction) and results.json.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from data_pipelines import subset as subset_lib
from data_pipelines.sources.medmnist import MedMNISTSource
from experiments import sweep_results
from data_pipelines import storage

C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
INIT = "raw_pixels"


def load_split(path: str, split: str) -> tuple[np.ndarray, np.ndarray, MedMNISTSource]:
  """(pixels (N, D) float32 in [0, 1], class ids (N,), the source) of one split of an .npz."""
  source = MedMNISTSource(path, split)
  if source.multi_label:
    raise ValueError(f"{path}: '{source.label_key}' is multi-label; the raw-pixel baseline "
                     "takes one class per image")
  with storage.open_npz(path) as npz:
    images = np.asarray(npz[source.image_key])
    labels = np.asarray(npz[source.label_key]).reshape(len(images), -1)[:, 0]
  return images.reshape(len(images), -1).astype(np.float32) / 255.0, labels.astype(np.int64), source


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
  from sklearn import metrics  # pylint: disable=g-import-not-at-top
  if scores.ndim == 2 and scores.shape[1] == 2:
    scores = scores[:, 1]
  if scores.ndim == 1:
    return float(metrics.roc_auc_score(labels, scores))
  return float(metrics.roc_auc_score(labels, scores, multi_class="ovr", average="macro"))


def fit_and_score(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
                  test: tuple[np.ndarray, np.ndarray], c_grid: Sequence[float] = C_GRID
                  ) -> dict[str, Any]:
  """C chosen on validation AUC; the chosen model's test AUC and accuracy."""
  # pylint: disable=g-import-not-at-top
  from sklearn.linear_model import LogisticRegression
  from sklearn.pipeline import make_pipeline
  from sklearn.preprocessing import StandardScaler
  # pylint: enable=g-import-not-at-top
  best = None
  for c in c_grid:
    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
    model.fit(*train)
    value = _auc(val[1], model.predict_proba(val[0]))
    if best is None or value > best[0]:
      best = (value, c, model)
  value, c, model = best
  probabilities = model.predict_proba(test[0])
  return {"C": c, "val_auc": value, "auc": _auc(test[1], probabilities),
          "accuracy": float(np.mean(model.predict(test[0]) == test[1]))}


def run(train_data: str, *, test_data: str = "", test_name: str = "test",
        label_fractions: Sequence[float] = (1.0,), seeds: Sequence[int] = (0,),
        out: str = "", log=print) -> list[dict[str, Any]]:
  """The baseline's rows (sweep_results.COLUMNS), written to `out` when given."""
  x_train, y_train, source = load_split(train_data, "train")
  val = load_split(train_data, "val")[:2]
  test = load_split(test_data or train_data, "test")[:2]
  rows = []
  for fraction in label_fractions:
    for seed in seeds:
      index = subset_lib.subset_indices(source, float(fraction), int(seed))
      if len(np.unique(y_train[index])) < 2:
        raise ValueError(f"{train_data}: label fraction {fraction} with seed {seed} keeps one "
                         "class only; use a larger fraction")
      scores = fit_and_score((x_train[index], y_train[index]), val, test)
      row = {c: "" for c in sweep_results.COLUMNS}
      row.update({"run_id": f"init={INIT}/frac={fraction:g}/seed={seed}", "init": INIT,
                  "label_fraction": float(fraction), "seed": int(seed), "test_set": test_name,
                  "status": "finished", "auc": scores["auc"], "accuracy": scores["accuracy"],
                  "balanced_accuracy": float("nan"), "ece": float("nan"),
                  "sensitivity": float("nan"), "specificity": float("nan"),
                  "num_train_labels": int(len(index)), "best_val": scores["val_auc"],
                  "error": f"C={scores['C']:g}"})
      rows.append(row)
      log(f"  {fraction:>6g} seed {seed}: {len(index):5d} labels, C={scores['C']:g}, validation "
          f"AUC {scores['val_auc']:.4f}, {test_name} AUC {scores['auc']:.4f}")
  if out:
    storage.makedirs(out)
    cells = sweep_results.summarize(rows)
    sweep_results.write_csv(rows, storage.join(out, sweep_results.CSV_FILE))
    sweep_results.write_json({"train_data": train_data, "test_data": test_data or train_data,
                              "c_grid": list(C_GRID), "rows": rows, "cells": cells},
                             storage.join(out, sweep_results.JSON_FILE))
    table = sweep_results.format_grid_table(cells, metric="auc")
    storage.write_text(storage.join(out, sweep_results.TABLE_FILE),
                       f"# Logistic regression on raw pixels: trained on {train_data}, tested "
                       f"on {test_data or train_data} ({test_name})\n\n{table}\n")
    log(table)
  return rows


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  run(f.train_data, test_data=f.test_data, test_name=f.test_name,
      label_fractions=[float(x) for x in f.label_fractions], seeds=[int(x) for x in f.seeds],
      out=f.out)


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("train_data", None, "MedMNIST-layout .npz: its train split trains, its "
                      "val split chooses C.")
  flags.DEFINE_string("test_data", "", "MedMNIST-layout .npz whose test split is scored "
                      "(default: --train_data).")
  flags.DEFINE_string("test_name", "test", "The test set's name in the rows.")
  flags.DEFINE_list("label_fractions", ["1.0"], "Shares of the training labels.")
  flags.DEFINE_list("seeds", ["0"], "Subset seeds (the fine-tuning runs' label_fraction_seed).")
  flags.DEFINE_string("out", "", "Output folder (results.csv, results.json, summary.md).")
  flags.mark_flags_as_required(["train_data"])
  app.run(main)
