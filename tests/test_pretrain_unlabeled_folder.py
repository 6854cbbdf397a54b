"""Stage 2 on the common case: a folder of images and a CSV with only an image column."""

import csv
import logging

import numpy as np
from PIL import Image

from configs import pretrain_simclr
from data_pipelines import sources
from remedis_jax import train_simclr, writers


def _unlabeled_folder(root, count=20):
  rng = np.random.default_rng(0)
  with open(root / "images.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["path"])
    for i in range(count):
      Image.fromarray(rng.integers(0, 256, (40, 36), np.uint8)).save(root / f"{i}.png")
      writer.writerow([f"{i}.png"])


def test_folder_without_label_column_is_read_unlabeled_only_when_labels_are_optional(tmp_path):
  _unlabeled_folder(tmp_path)
  data = {"source": "folder", "root": str(tmp_path), "manifest": "images.csv"}
  source = sources.build_source(data, "train", labels_optional=True)
  assert len(source) == 20 and source.num_classes == 0 and int(source[3]["label"]) == -1
  # Where labels are needed (fine-tuning), the missing column stays an error naming it.
  try:
    sources.build_source(data, "train")
  except ValueError as error:
    assert "images.csv has no column 'label' (data.label_columns)" in str(error)
  else:
    raise AssertionError("expected a ValueError")


def test_pretraining_on_an_unlabeled_folder_needs_no_overrides(tmp_path, caplog):
  # The defaults (label column "label", kNN monitor and linear probe on)
  # used to fail first on the label column, then on the kNN monitor's 'val' split.
  _unlabeled_folder(tmp_path)
  config = pretrain_simclr.get_config("smoke")
  config.mesh.devices = 1
  config.data.source = "folder"
  config.data.root = str(tmp_path)
  config.data.manifest = "images.csv"
  config.data.num_examples = None
  config.batch_size = 8
  config.total_steps = 2
  config.knn.every_steps = 1
  config.linear_probe.enabled = True
  workdir = str(tmp_path / "run")
  with caplog.at_level(logging.INFO):
    summary = train_simclr.train_and_evaluate(config, workdir)
  assert summary["steps"] == 2 and summary["linear_probe_auc"] is None
  messages = [r.getMessage() for r in caplog.records]
  assert any("reading its images without labels" in m for m in messages)
  assert sum("kNN monitor off" in m for m in messages) == 1
  assert sum("Linear probe off" in m for m in messages) == 1
  losses = [r["train/loss"] for r in writers.read_metrics(workdir) if "train/loss" in r]
  assert len(losses) == 2 and np.all(np.isfinite(losses))
