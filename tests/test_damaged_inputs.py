"""Damaged files and mismatched inputs stop with an error that names the file and the fix:
a truncated config.json (export, init), a metrics.jsonl cut mid-line (the next record starts on
its own line; readers skip and count the bad line), a manifest with a non-UTF-8 byte, a
truncated .npz, an init of another architecture, and a contrastive batch larger than the
dataset (refused before the workdir is touched). No training: every check runs before it."""

import csv
import io
import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from configs import pretrain_cluster, pretrain_simclr
from data_pipelines.sources import build_source, default_data_config
from data_pipelines.sources.medmnist import MedMNISTSource
from remedis_jax import export, initialization, train_cluster, train_simclr, writers


# ------------------------------------------------------------------------- workdir files
def _truncated_config(workdir):
  os.makedirs(workdir, exist_ok=True)
  text = json.dumps({"model": {"name": "R_micro", "stem": "bit"}, "data": {"image_size": 32}})
  path = os.path.join(workdir, export.RUN_CONFIG_FILE)
  with open(path, "w") as f:
    f.write(text[:len(text) // 2])  # a copy or a write cut short
  return path


def test_a_truncated_config_json_is_named_by_export_and_init(tmp_path):
  path = _truncated_config(tmp_path / "run")
  with pytest.raises(ValueError, match=f"{path} is not valid JSON \\(truncated or corrupt"):
    export.export_workdir(str(tmp_path / "run"), str(tmp_path / "export"))
  with pytest.raises(ValueError, match=f"{path} is not valid JSON"):
    initialization.load_init(str(tmp_path / "run"), "R_micro")
  assert not (tmp_path / "export").exists()


def test_a_metrics_file_cut_mid_line_keeps_later_records_readable(tmp_path, caplog):
  path = tmp_path / writers.METRICS_FILE
  path.write_text(json.dumps({"step": 1, "train/loss": 2.0}) + "\n" + '{"step": 2, "train/lo')
  writer = writers.JsonlWriter(str(path))  # the resumed run appends
  writer.write_scalars(3, {"train/loss": 1.5})
  writer.close()
  lines = path.read_text().splitlines()
  assert lines[1] == '{"step": 2, "train/lo' and json.loads(lines[2])["step"] == 3
  with caplog.at_level(logging.WARNING):
    records = writers.read_metrics(str(tmp_path))
  assert [r["step"] for r in records] == [1, 3]
  assert any(f"{path}: skipped 1 unreadable line" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- data files
def test_a_manifest_with_a_non_utf8_byte_names_the_line_and_the_fix(tmp_path):
  for i in range(2):
    Image.fromarray(np.full((8, 8), 50 * i, np.uint8)).save(tmp_path / f"{i}.png")
  # "Hôpital" as Excel on Windows saves it (cp1252), on the manifest's third line.
  (tmp_path / "m.csv").write_bytes(b"path,label,site\n0.png,0,A\n1.png,1,H\xf4pital\n")
  data = default_data_config()
  data.update(source="folder", root=str(tmp_path), manifest="m.csv")
  with pytest.raises(ValueError) as error:
    build_source(data, "train")
  message = str(error.value)
  assert f"manifest {tmp_path / 'm.csv'} line 3: byte 0xf4 is not valid utf-8" in message
  assert "Re-save the file as UTF-8" in message
  assert "--config.data.manifest_encoding=" in message
  data.manifest_encoding = "cp1252"
  source = build_source(data, "train")
  assert len(source) == 2 and int(source[1]["label"]) == 1
  data.manifest_encoding = "utf-16-whatever"
  with pytest.raises(ValueError, match="data.manifest_encoding='utf-16-whatever' is not a known"):
    build_source(data, "train")


def test_a_truncated_npz_is_named_as_a_bad_download(tmp_path):
  buffer = io.BytesIO()
  np.savez(buffer, train_images=np.zeros((4, 8, 8), np.uint8),
           train_labels=np.zeros((4, 1), np.uint8))
  path = tmp_path / "pneumoniamnist.npz"
  for size in (len(buffer.getvalue()) - 10, 0):
    path.write_bytes(buffer.getvalue()[:size])
    with pytest.raises(ValueError, match=f"{path} is not a valid .npz: truncated or corrupt "
                                         "download\\?"):
      MedMNISTSource(str(path), "train")
  path.write_bytes(buffer.getvalue())
  assert len(MedMNISTSource(str(path), "train")) == 4


# --------------------------------------------------------------------------- model inits
def test_an_init_of_another_architecture_names_it_and_the_flag(tmp_path):
  workdir = tmp_path / "pretrain_tiny"
  workdir.mkdir()
  (workdir / export.RUN_CONFIG_FILE).write_text(json.dumps({"model": {"name": "R_tiny"}}))
  with pytest.raises(ValueError) as error:
    initialization.load_init(str(workdir), "R50x1")
  message = str(error.value)
  assert message.startswith(f"config.model.init={workdir} is a workdir whose model is R_tiny "
                            f"(model.name in {workdir / export.RUN_CONFIG_FILE})")
  assert "config.model.name='R50x1'; set --config.model.name=R_tiny" in message


# ------------------------------------------------------------------ contrastive batches
def _three_images(root):
  with open(root / "images.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["path"])
    for i in range(3):
      Image.fromarray(np.full((8, 8), 60 * i, np.uint8)).save(root / f"{i}.png")
      writer.writerow([f"{i}.png"])


@pytest.mark.parametrize("trainer, config_module, title", [
    (train_simclr, pretrain_simclr, "SimCLR"),
    (train_cluster, pretrain_cluster, "Clustering")])
def test_a_contrastive_batch_larger_than_the_data_is_refused_before_any_write(
    tmp_path, trainer, config_module, title):
  _three_images(tmp_path)
  config = config_module.get_config("smoke")
  config.data.update(source="folder", root=str(tmp_path), manifest="images.csv",
                     pretrain_split="train")
  config.batch_size = 64
  workdir = tmp_path / "run"
  with pytest.raises(ValueError) as error:
    trainer.train_and_evaluate(config, str(workdir))
  message = str(error.value)
  assert message.startswith(f"{title}: config.batch_size=64 is larger than the pretraining data "
                            "(images: 3 images), so every batch would hold about 21 copies")
  assert "--config.batch_size=N with N <= 3" in message
  assert not workdir.exists()


def test_only_objectives_with_batch_level_terms_need_distinct_images():
  config = pretrain_cluster.get_config("smoke")
  assert "NT-Xent" in train_cluster.distinct_batch_reason(config)
  config.loss.contrastive_weight = 0.0
  assert "Sinkhorn" in train_cluster.distinct_batch_reason(config)
  config.loss.cluster_weight = 0.0
  assert train_cluster.distinct_batch_reason(config) == ""
