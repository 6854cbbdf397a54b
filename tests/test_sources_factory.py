"""build_source / default_data_config: dispatch, per-split synthetic keys, errors."""
import numpy as np
import pytest

from data_pipelines.sources import SOURCES, build_source, default_data_config


def test_default_is_synthetic_64px_with_every_key():
  config = default_data_config()
  for key in ("source", "path", "root", "manifest", "image_column", "label_columns",
              "patient_column", "split_column", "mask_column", "tfds_name", "data_dir",
              "num_examples", "image_size", "sites", "seed"):
    assert key in config, key
  source = build_source(config, "train")
  assert config.source == "synthetic" and source[0]["image"].shape == (64, 64, 1)
  assert len(source) == config.num_examples.train


def test_per_split_sites():
  config = default_data_config()
  config.num_examples.train, config.num_examples.test = 50, 60
  config.sites.train, config.sites.test = "A", "B,C"
  train, test = build_source(config, "train"), build_source(config, "test")
  assert len(train) == 50 and set(np.unique(train.record_sites)) == {0}
  assert len(test) == 60 and set(np.unique(test.record_sites)) == {1, 2}
  assert (build_source(config, "unlabeled").labels == -1).all()


def test_unknown_source_lists_valid_ones():
  config = default_data_config()
  config.source = "nifti"
  with pytest.raises(ValueError, match="valid sources are: " + ", ".join(SOURCES)):
    build_source(config, "train")


@pytest.mark.parametrize("source,key", [("folder", "manifest"), ("array_record", "path")])
def test_missing_key_is_named(source, key):
  config = default_data_config()
  config.source = source
  with pytest.raises(ValueError, match=f"data.{key} is required for data.source='{source}'"):
    build_source(config, "train")


def test_joined_splits_read_every_record_once_in_order(tmp_path):
  rng = np.random.default_rng(0)
  arrays = {}
  for split, n in (("train", 7), ("val", 3), ("test", 4)):
    arrays[f"{split}_images"] = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    arrays[f"{split}_labels"] = rng.integers(0, 2, size=(n, 1)).astype(np.uint8)
  path = tmp_path / "pneumoniamnist.npz"
  np.savez(path, **arrays)
  config = default_data_config()
  config.source, config.path = "medmnist", str(path)
  joined = build_source(config, "train+val")
  assert len(joined) == 10 and joined.num_classes == 2 and joined.num_channels == 1
  images = np.concatenate([arrays["train_images"], arrays["val_images"]])
  labels = np.concatenate([arrays["train_labels"], arrays["val_labels"]])[:, 0]
  np.testing.assert_array_equal(joined.labels, labels)
  for i in range(10):
    np.testing.assert_array_equal(joined[i]["image"][..., 0], images[i])
  assert joined[-1]["id"] == joined.ids[-1] and len(set(joined.ids)) == 10
  with pytest.raises(IndexError):
    joined[10]
  for bad in ("train+", "train+train", "+val"):
    with pytest.raises(ValueError, match="distinct split names joined by"):
      build_source(config, bad)
  with pytest.raises(KeyError, match="no key 'holdout_images'"):
    build_source(config, "train+holdout")


def test_joined_splits_must_agree():
  config = default_data_config()
  config.num_examples.train, config.num_examples.val = 5, 5
  config.task = "multilabel"
  multilabel = build_source(config, "train")
  config.task = "any_finding"
  binary = build_source(config, "val")
  from data_pipelines.sources import ConcatSource  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="num_classes 4 vs 2"):
    ConcatSource([multilabel, binary])
