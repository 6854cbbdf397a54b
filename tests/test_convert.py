"""Converter -> ArrayRecord shards -> source round trips (synthetic, folder with a bad record and
16-bit PNGs), and the CLI."""
import csv
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data_pipelines.convert import convert
from data_pipelines.errors import BadRecordError
from data_pipelines.sources import build_source, default_data_config
from data_pipelines.sources.array_record import ArrayRecordSource


def test_synthetic_round_trip(tmp_path):
  config = default_data_config()
  config.num_examples.val = 37
  info = convert(config, "val", str(tmp_path), num_shards=4, log=lambda s: None)
  assert info["count"] == 37 and info["num_skipped"] == 0 and len(info["shards"]) == 4
  original = build_source(config, "val")
  read_config = default_data_config()
  read_config.update(dict(source="array_record", path=str(tmp_path)))
  shards = pickle.loads(pickle.dumps(build_source(read_config, "val")))
  assert len(shards) == 37 and shards.ids == original.ids
  assert shards.class_names == original.class_names and shards.multi_label
  np.testing.assert_array_equal(shards.labels, original.labels)
  for i in range(37):
    a, b = original[i], shards[i]
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["lung_mask"], b["lung_mask"])
    np.testing.assert_array_equal(a["label"], b["label"])
    assert a["id"] == b["id"] and a["site"] == b["site"] and b["label"].dtype == np.float32
  by_glob = ArrayRecordSource(str(tmp_path / "val.array_record-*"), split=None)
  np.testing.assert_array_equal(by_glob[36]["image"], original[36]["image"])


def test_folder_with_bad_record_and_16bit(tmp_path):
  values = np.array([[0, 1000], [3000, 4095]], np.uint16)
  Image.fromarray(values).save(tmp_path / "a.png")
  (tmp_path / "broken.png").write_bytes(b"not a png")
  with open(tmp_path / "m.csv", "w", newline="") as f:
    csv.writer(f).writerows([["path", "label"], ["a.png", 1], ["broken.png", 0], ["a.png", 0]])
  config = default_data_config()
  config.update(dict(source="folder", root=str(tmp_path), manifest="m.csv", keep_bit_depth=True))
  out = str(tmp_path / "out")
  with pytest.raises(BadRecordError, match="broken.png"):
    convert(config, "train", out, strict=True, log=lambda s: None)
  lines = []
  # One of three records is bad: over the default share (0.1), within 0.5.
  info = convert(config, "train", out, num_shards=2, log=lines.append, max_bad_record_share=0.5)
  assert info["count"] == 2 and info["num_skipped"] == 1
  assert info["skipped"][0][0] == str(tmp_path / "broken.png")
  assert any("1 bad records skipped" in line for line in lines)
  with open(os.path.join(out, "train.json")) as f:
    assert json.load(f)["num_skipped"] == 1
  kept = ArrayRecordSource(out, "train", keep_bit_depth=True)
  assert kept.ids == ["a.png", "a.png#row4"] and kept.labels.tolist() == [1, 0]
  assert kept[0]["image"].dtype == np.uint16
  np.testing.assert_array_equal(kept[0]["image"][:, :, 0], values)
  display = ArrayRecordSource(out, "train")[0]["image"]
  assert display.dtype == np.uint8 and display.max() == 255 and display.min() == 0


def test_cli(tmp_path):
  out = tmp_path / "cli"
  result = subprocess.run(
      [sys.executable, "-m", "data_pipelines.convert", "--source=synthetic", "--split=test",
       "--num_examples=12", "--image_size=32", "--sites=B", f"--out={out}", "--num_shards=3"],
      capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)),
      env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120)
  assert result.returncode == 0, result.stderr
  assert "12 records in 3 shards" in result.stdout and "0 bad records skipped" in result.stdout
  source = ArrayRecordSource(str(out), "test")
  assert len(source) == 12 and source[0]["image"].shape == (32, 32, 1)
  assert set(source.labels.shape) == {12, 4} and (np.array([source[i]["site"] for i in range(12)]) == 1).all()
