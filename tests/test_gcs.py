"""gs:// workdirs and inputs against a real Cloud Storage server (fake-gcs-server on 127.0.0.1).

The `gcs` fixture (tests/conftest.py) starts the emulator and points every client at it. The
runs are the `:smoke` configs (R_micro, 32 px, a few steps); TensorBoard event files, which only
TensorFlow's file system writes and which cannot reach an emulator, go to a local folder
(`config.tensorboard_dir`); everything else of the run lives in the bucket.
"""

import json
import os

import jax
import numpy as np
import pytest

from configs import finetune as finetune_configs
from configs import pretrain_simclr
from remedis_jax import checkpointing, export, initialization, storage, supervised
from remedis_jax import train_finetune, train_simclr, writers


def _set(config, **overrides):
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def _local_gs_folders(root) -> list[str]:
  """Folders named like a mangled URL ('gs:'), anywhere under `root`."""
  return [os.path.join(d, n) for d, names, _ in os.walk(root) for n in names if n.startswith("gs:")]


# ---------------------------------------------------------------------------- the path layer


def test_storage_paths_keep_urls():
  assert storage.join("gs://b/run/", "checkpoints", "4") == "gs://b/run/checkpoints/4"
  assert storage.join("/tmp/x", "gs://b/y") == "gs://b/y"
  assert storage.join("/tmp/x", "a") == os.path.join("/tmp/x", "a")
  assert storage.absolute("gs://b/run") == "gs://b/run"
  assert storage.absolute("rel") == os.path.abspath("rel")
  assert storage.dirname("gs://b/run/x.json") == "gs://b/run"
  assert storage.basename("gs://b/run/x.json") == "x.json"


def test_storage_round_trip_local_and_bucket(gcs, tmp_path):
  bucket = gcs.bucket()
  for root in (str(tmp_path / "local"), f"{bucket}/folder"):
    path = storage.join(root, "sub", "a.json")
    storage.write_json(path, {"a": 1})
    assert storage.read_json(path) == {"a": 1} and storage.isfile(path)
    assert storage.isdir(storage.join(root, "sub"))
    storage.write_bytes(storage.join(root, "sub", "b.bin"), b"\x00\x01")
    assert storage.listdir(storage.join(root, "sub")) == ["a.json", "b.bin"]
    assert storage.glob(storage.join(root, "sub", "*.json")) == [path]
    appender = storage.Appender(storage.join(root, "log.jsonl"))
    appender.write("1\n")
    appender.flush()
    appender.write("2\n")
    appender.close()
    # A second writer (a resumed run) continues the file.
    again = storage.Appender(storage.join(root, "log.jsonl"))
    again.write("3\n")
    again.close()
    assert storage.read_text(storage.join(root, "log.jsonl")) == "1\n2\n3\n"
    np.savez(str(tmp_path / "x.npz"), a=np.arange(3))
    storage.write_bytes(storage.join(root, "x.npz"), (tmp_path / "x.npz").read_bytes())
    with storage.open_npz(storage.join(root, "x.npz")) as npz:
      np.testing.assert_array_equal(npz["a"], np.arange(3))
  # Nothing under the current folder was created for the URL.
  assert not _local_gs_folders(os.getcwd())


def test_atomic_local_write_leaves_old_file_on_error(tmp_path):
  path = str(tmp_path / "results.json")
  storage.write_json(path, {"v": 1})

  class Boom:
    pass

  with pytest.raises(TypeError):
    storage.write_json(path, {"v": Boom()})  # fails while serialising: nothing is written
  assert storage.read_json(path) == {"v": 1}
  assert sorted(os.listdir(tmp_path)) == ["results.json"]  # no temporary file left behind


def test_tensorboard_writer_gets_the_url_unchanged(monkeypatch, tmp_path, gcs):
  """Event files go through TensorFlow's file system, which reaches Cloud Storage itself but not
  the emulator: check the URL it is given is the workdir's, unmangled."""
  seen = {}
  original = writers.metric_writers.create_default_writer

  def fake_default_writer(logdir=None, **kwargs):
    seen["logdir"] = logdir
    return original(just_logging=True)

  monkeypatch.setattr(writers.metric_writers, "create_default_writer", fake_default_writer)
  bucket = gcs.bucket()
  writer = writers.create_writer(f"{bucket}/run")
  writer.write_scalars(3, {"loss": 1.5})
  writer.close()
  assert seen["logdir"] == f"{bucket}/run"
  assert writers.read_metrics(f"{bucket}/run")[0]["loss"] == 1.5
  writers.create_writer(f"{bucket}/run2", tensorboard_dir=str(tmp_path)).close()
  assert seen["logdir"] == str(tmp_path)


# ---------------------------------------------------------------------------- whole runs


@pytest.mark.slow
def test_pretrain_resume_export_and_finetune_in_a_bucket(gcs, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # a mangled URL would appear here as ./gs:/...
  bucket = gcs.bucket()
  workdir = f"{bucket}/simclr"
  config = _set(pretrain_simclr.get_config("smoke"), tensorboard_dir=str(tmp_path / "tb"),
                **{"linear_probe.enabled": False, "total_steps": 2,
                   "checkpoint_every_steps": 1})
  summary = train_simclr.train_and_evaluate(config, workdir)
  assert summary["steps"] == 2
  assert storage.read_json(f"{workdir}/config.json")["model"]["name"] == "R_micro"
  assert [r["step"] for r in writers.read_metrics(workdir) if "train/loss" in r] == [1, 2]
  assert sorted(storage.listdir(f"{workdir}/checkpoints")) == ["1", "2"]

  # A longer rerun resumes from the bucket and continues the metrics file there.
  config.total_steps = 4
  summary = train_simclr.train_and_evaluate(config, workdir)
  assert summary["steps"] == 4 and summary["initialisation"].startswith("resumed")
  assert [r["step"] for r in writers.read_metrics(workdir) if "train/loss" in r] == [1, 2, 3, 4]
  params, step = checkpointing.load_params(workdir)
  assert step == 4

  # Export into the bucket; fine-tune from that export, with the fine-tuning workdir there too.
  out = f"{bucket}/export"
  export.export_workdir(workdir, out)
  assert export.is_export(out)
  loaded = initialization.load_init(out, "R_micro")
  jax.tree.map(np.testing.assert_array_equal, loaded.encoder, params["encoder"])
  ft_config = _set(finetune_configs.get_config("smoke"), tensorboard_dir=str(tmp_path / "tb_ft"),
                   **{"model.init": out, "total_steps": 2})
  ft_workdir = f"{bucket}/finetune"
  results = train_finetune.train_and_evaluate(ft_config, ft_workdir)
  assert results["finished"] and results["initialisation"].startswith("export")
  assert supervised.read_results(ft_workdir)["finished"]
  assert storage.isfile(f"{ft_workdir}/{supervised.SUBSET_MANIFEST_FILE}")
  assert storage.listdir(f"{ft_workdir}/roc")
  assert not _local_gs_folders(tmp_path)
  # The TensorBoard folders got the event files.
  assert any(n.startswith("events.out.tfevents") for n in os.listdir(tmp_path / "tb"))
