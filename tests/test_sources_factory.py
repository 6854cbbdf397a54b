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
