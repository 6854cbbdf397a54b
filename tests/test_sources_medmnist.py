"""MedMNIST .npz source: layouts, multi-label, errors, and the real PneumoniaMNIST file."""
import pickle

import numpy as np
import pytest

from data_pipelines.errors import BadRecordError
from data_pipelines.sources import build_source, default_data_config
from data_pipelines.sources.medmnist import MedMNISTSource


def _write(path, **arrays):
  np.savez(path, **arrays)
  return str(path)


def test_grayscale_multiclass(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)
  labels = np.array([[0], [1], [1], [0], [1], [1]], np.uint8)
  path = _write(tmp_path / "pneumoniamnist.npz", train_images=images, train_labels=labels,
                test_images=images[:2], test_labels=labels[:2])
  source = pickle.loads(pickle.dumps(MedMNISTSource(path, "train")))
  assert source.class_names == ["normal", "pneumonia"] and source.num_classes == 2
  assert not source.multi_label and source.num_channels == 1 and len(source) == 6
  example = source[4]
  np.testing.assert_array_equal(example["image"][:, :, 0], images[4])
  assert example["label"] == 1 and example["label"].dtype == np.int32 and example["id"] == "train/00004"
  np.testing.assert_array_equal(source.labels, labels[:, 0])


def test_rgb_multilabel_unknown_flag(tmp_path):
  images = np.arange(3 * 64 * 64 * 3, dtype=np.uint32).reshape(3, 64, 64, 3).astype(np.uint8)
  labels = np.array([[0, 1, 1], [0, 0, 0], [1, 0, 0]], np.uint8)
  path = _write(tmp_path / "mychest_64.npz", val_images=images, val_labels=labels)
  source = MedMNISTSource(path, "val")
  assert source.multi_label and source.num_classes == 3 and source.num_channels == 3
  assert source.class_names == ["class_0", "class_1", "class_2"] and source.name == "mychest/val"
  example = source[0]
  assert example["image"].shape == (64, 64, 3)
  np.testing.assert_array_equal(example["label"], [0, 1, 1])
  assert example["label"].dtype == np.float32


def test_missing_key_names_key_and_keys(tmp_path):
  path = _write(tmp_path / "x.npz", train_images=np.zeros((1, 4, 4), np.uint8),
                train_labels=np.zeros((1, 1)))
  with pytest.raises(KeyError, match=r"no key 'test_images'.*keys are: train_images, train_labels"):
    MedMNISTSource(path, "test")


def test_label_out_of_range(tmp_path):
  path = _write(tmp_path / "pneumoniamnist.npz", train_images=np.zeros((3, 4, 4), np.uint8),
                train_labels=np.array([[0], [2], [1]]))
  with pytest.raises(BadRecordError, match=r"train_labels\[1\].*label 2 outside classes 0..1"):
    MedMNISTSource(path, "train")
  source = MedMNISTSource(path, "train", skip_bad_records=True)
  assert len(source) == 2 and source.ids == ["train/00000", "train/00002"]
  assert source.skipped == [("train_labels[1]", "label 2 outside classes 0..1 (normal, pneumonia)")]


def test_build_source_requires_path():
  config = default_data_config()
  config.source = "medmnist"
  with pytest.raises(ValueError, match="data.path is required"):
    build_source(config, "train")


def test_real_pneumoniamnist_counts(shared_data_dir):
  config = default_data_config()
  config.source, config.path = "medmnist", str(shared_data_dir / "pneumoniamnist.npz")
  expected = {"train": (3882, 388), "val": (524, 135), "test": (624, 234)}
  for split, (n, normal) in expected.items():
    source = build_source(config, split)
    assert len(source) == n and int((source.labels == 0).sum()) == normal
  example = source[0]
  assert example["image"].shape == (28, 28, 1) and example["image"].dtype == np.uint8
  assert 30 < example["image"].mean() < 220  # A radiograph, not a blank array.


def test_fractional_and_nan_labels_are_bad_not_truncated(tmp_path):
  # Float labels of an unknown flag: 2.0 is class 2; 0.5 and NaN were cast to 0 (NaN: a crash).
  path = _write(tmp_path / "mine.npz", train_images=np.zeros((5, 4, 4), np.uint8),
                train_labels=np.array([[0.0], [2.0], [0.5], [np.nan], [1.0]]))
  with pytest.raises(BadRecordError, match=r"train_labels\[2\].*label 0.5 is not an integer class "
                     r"id; 2 bad rows"):
    MedMNISTSource(path, "train")
  source = MedMNISTSource(path, "train", skip_bad_records=True)
  assert source.num_classes == 3 and source.labels.tolist() == [0, 2, 1]
  assert [r for r, _ in source.skipped] == ["train_labels[2]", "train_labels[3]"]
