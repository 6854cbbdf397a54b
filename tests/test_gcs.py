"""gs:// workdirs and inputs against a real Cloud Storage server (fake-gcs-server on 127.0.0.1).

The `gcs` fixture (tests/conftest.py) starts the emulator and points every client at it. The
runs are the `:smoke` configs (R_micro, 32 px, a few steps); everything of a run, TensorBoard
event files included, lives in the bucket.
"""

import os
import signal

import jax
import numpy as np
from PIL import Image
import pytest

from configs import common, finetune as finetune_configs
from configs import pretrain_simclr
from data_pipelines import convert, pipeline, presets, stream
from data_pipelines import sources as data_sources
from data_pipelines.sources.synthetic import SyntheticCXR
from data_pipelines import storage
from remedis_jax import checkpointing, export, initialization, supervised
from remedis_jax import train_finetune, train_simclr, writers
from remedis_jax.models import bit
from tests import fakes


def _set(config, **overrides):
  return common.override(config, overrides)


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


def test_json_safe_turns_numpy_and_non_finite_values_into_json():
  value = {"a": np.float32(1.5), "b": float("nan"), 1: [np.int64(3), (np.inf, -np.inf)], "c": "x"}
  assert storage.json_safe(value) == {"a": 1.5, "b": None, "1": [3, [None, None]], "c": "x"}


def test_atomic_local_write_leaves_old_file_on_error(tmp_path):
  path = str(tmp_path / "results.json")
  storage.write_json(path, {"v": 1})

  class Boom:
    pass

  with pytest.raises(TypeError):
    storage.write_json(path, {"v": Boom()})  # fails while serialising: nothing is written
  assert storage.read_json(path) == {"v": 1}
  assert sorted(os.listdir(tmp_path)) == ["results.json"]  # no temporary file left behind


def event_scalars(logdir: str, tmp_path) -> dict[str, dict[int, float]]:
  """{tag: {step: value}} of the event files in `logdir` (local or a bucket), read by
  TensorBoard's own reader from a local copy."""
  local = tmp_path / f"events_{len(os.listdir(tmp_path))}"
  local.mkdir()
  names = [n for n in storage.listdir(logdir) if n.startswith(writers.EVENT_FILE_PREFIX)]
  for name in names:
    (local / name).write_bytes(storage.read_bytes(storage.join(logdir, name)))
  accumulator = fakes.read_tensorboard_events(local)
  return {tag: {e.step: e.value for e in accumulator.Scalars(tag)}
          for tag in accumulator.Tags()["scalars"]}


def test_tensorboard_event_files_go_into_the_bucket(tmp_path, gcs):
  """Event files go through the storage layer: into the bucket, read back by TensorBoard."""
  bucket = gcs.bucket()
  writer = writers.create_writer(f"{bucket}/run")
  writer.write_hparams({"lr": 0.1, "model": "R_micro", "dims": (1, 2)})
  writer.write_scalars(3, {"loss": 1.5, "acc": np.float32(0.25)})
  writer.write_scalars(5, {"loss": 1.25})
  writer.close()
  assert event_scalars(f"{bucket}/run", tmp_path) == {"loss": {3: 1.5, 5: 1.25},
                                                      "acc": {3: 0.25}}
  assert writers.read_metrics(f"{bucket}/run")[0]["loss"] == 1.5
  # tensorboard_dir elsewhere (here a local folder): the event files go there, not to the run.
  writer = writers.create_writer(f"{bucket}/run2", tensorboard_dir=str(tmp_path / "tb"))
  writer.write_scalars(1, {"loss": 2.0})
  writer.close()
  assert event_scalars(str(tmp_path / "tb"), tmp_path) == {"loss": {1: 2.0}}
  assert not [n for n in storage.listdir(f"{bucket}/run2")
              if n.startswith(writers.EVENT_FILE_PREFIX)]


# ---------------------------------------------------------------------------- inputs


def _upload_tree(local_root, url_root) -> None:
  for folder, _, names in os.walk(local_root):
    for name in names:
      relative = os.path.relpath(os.path.join(folder, name), local_root).replace(os.sep, "/")
      with open(os.path.join(folder, name), "rb") as f:
        storage.write_bytes(f"{url_root}/{relative}", f.read())


def _same_records(local, remote, count=3):
  assert len(local) == len(remote)
  for i in range(count):
    a, b = local[i], remote[i]
    assert a["id"] == b["id"]
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])


def test_inputs_read_from_a_bucket(gcs, tmp_path):
  bucket = gcs.bucket()
  local = tmp_path / "local"

  local.mkdir()
  rng = np.random.default_rng(0)
  # BiT weights (.npz, the published layout).
  np.savez(local / "BiT-M-R_tiny.npz",
           **{k: rng.normal(size=shape).astype(np.float32)
              for k, shape in bit.bit_npz_shapes("R_tiny").items()})
  # MedMNIST (.npz).
  np.savez(local / "pneumoniamnist.npz",
           **{f"{split}_images": rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)
              for split in ("train", "val", "test")},
           **{f"{split}_labels": rng.integers(0, 2, (6, 1)) for split in ("train", "val", "test")})
  # A folder of PNGs with a CSV manifest.
  (local / "images").mkdir()
  rows = ["path,label"]
  for i in range(4):
    Image.fromarray(rng.integers(0, 256, (20, 24), dtype=np.uint8)).save(
        local / "images" / f"{i}.png")
    rows.append(f"images/{i}.png,{i % 2}")
  (local / "labels.csv").write_text("\n".join(rows) + "\n")
  # ArrayRecord shards from the converter (its reader opens gs:// shards itself).
  convert.convert(_data(image_size=32, num_examples={"train": 6}), "train",
                  str(local / "shards"), num_shards=2, log=lambda *a: None)
  _upload_tree(local, f"{bucket}/data")
  remote = f"{bucket}/data"

  loaded = initialization.load_init(f"{remote}/BiT-M-R_tiny.npz", "R_tiny")
  expected = initialization.load_init(str(local / "BiT-M-R_tiny.npz"), "R_tiny")
  jax.tree.map(np.testing.assert_array_equal, loaded.encoder, expected.encoder)

  def source(**keys):
    return data_sources.build_source(_data(**keys), "train")

  _same_records(source(source="medmnist", path=str(local / "pneumoniamnist.npz")),
                source(source="medmnist", path=f"{remote}/pneumoniamnist.npz"))
  _same_records(source(source="folder", root=str(local), manifest="labels.csv"),
                source(source="folder", root=remote, manifest="labels.csv"))
  _same_records(source(source="array_record", path=str(local / "shards")),
                source(source="array_record", path=f"{remote}/shards"), count=6)
  _same_records(source(source="array_record", path=str(local / "shards" / "train.array_record-*")),
                source(source="array_record", path=f"{remote}/shards/train.array_record-*"),
                count=6)


def _data(**keys):
  data = data_sources.default_data_config()
  for key, value in keys.items():
    if isinstance(value, dict):
      data[key].update(value)
    else:
      data[key] = value
  return data


# ---------------------------------------------------------------------------- whole runs


class SigtermAfter:
  """A source that sends this process SIGTERM at its `reads`-th read (a preemption notice)."""

  def __init__(self, source, reads):
    self.source, self.reads, self.name = source, reads, source.name

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    self.reads -= 1
    if self.reads == 0:
      os.kill(os.getpid(), signal.SIGTERM)
    return self.source[index]


@pytest.mark.slow
def test_pretrain_preempt_resume_export_and_finetune_in_a_bucket(gcs, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # a mangled URL would appear here as ./gs:/...
  bucket = gcs.bucket()
  workdir = f"{bucket}/simclr"
  # Two of the eight devices: sharded end to end, with two replicas to save and restore (the
  # 8-device update steps: test_train_simclr.py and the others; 8 here cost more CPU).
  config = _set(pretrain_simclr.get_config("smoke"),
                **{"linear_probe.enabled": False, "knn.every_steps": 0, "total_steps": 4,
                   "checkpoint_every_steps": 100, "mesh.devices": 2})

  def dataset(sigterm_at_read=0):
    source = SyntheticCXR(split="train", num_examples=96, image_size=32)
    if sigterm_at_read:
      source = SigtermAfter(source, sigterm_at_read)
    return pipeline.make_pretrain_dataset(
        source, batch_size=config.batch_size, ops=presets.get_preset("cxr", "pretrain", 32),
        options=stream.StreamOptions(seed=0, read_threads=1, prefetch_buffer_size=2))

  # Preempted while reading the third batch: the run saves the step it reached in the bucket.
  # (The reader thread reads up to 2 records ahead, so a notice at a read of the second batch
  # can arrive before the first is handed over: a preemption at step 0.)
  summary = train_simclr.train_and_evaluate(config, workdir,
                                            dataset=dataset(2 * config.batch_size + 2))
  assert summary["preempted"] and 1 <= summary["steps"] < 4
  saved = summary["steps"]
  assert storage.listdir(f"{workdir}/checkpoints") == [str(saved)]
  assert storage.read_json(f"{workdir}/config.json")["model"]["name"] == "R_micro"

  # The rerun resumes from the bucket, finishes, and continues the metrics file there.
  summary = train_simclr.train_and_evaluate(config, workdir, dataset=dataset())
  assert summary["steps"] == 4 and summary["initialisation"].startswith("resumed")
  assert not summary["preempted"]
  logged = [r["step"] for r in writers.read_metrics(workdir) if "train/loss" in r]
  assert logged[-1] == 4 and saved in logged
  # ... and is the uninterrupted run, step for step (a local reference run, same programs).
  reference = str(tmp_path / "reference")
  train_simclr.train_and_evaluate(config, reference, dataset=dataset())
  ref_losses = {r["step"]: r["train/loss"] for r in writers.read_metrics(reference)
                if "train/loss" in r}
  losses = {r["step"]: r["train/loss"] for r in writers.read_metrics(workdir)
            if "train/loss" in r and r["step"] > saved}
  assert losses and all(losses[s] == ref_losses[s] for s in losses), (losses, ref_losses)
  params, step = checkpointing.load_params(workdir)
  expected, _ = checkpointing.load_params(reference)
  jax.tree.map(np.testing.assert_array_equal, params, expected)
  assert step == 4

  # Export into the bucket; fine-tune from that export, with the fine-tuning workdir there too.
  out = f"{bucket}/export"
  export.export_workdir(workdir, out)
  assert export.is_export(out)
  loaded = initialization.load_init(out, "R_micro")
  jax.tree.map(np.testing.assert_array_equal, loaded.encoder, params["encoder"])
  ft_config = _set(finetune_configs.get_config("smoke"),
                   **{"model.init": out, "total_steps": 2, "mesh.devices": 2})
  ft_workdir = f"{bucket}/finetune"
  results = train_finetune.train_and_evaluate(ft_config, ft_workdir)
  assert results["finished"] and results["initialisation"].startswith("export")
  assert supervised.read_results(ft_workdir)["finished"]
  assert storage.isfile(f"{ft_workdir}/{supervised.SUBSET_MANIFEST_FILE}")
  assert storage.listdir(f"{ft_workdir}/roc")
  assert not _local_gs_folders(tmp_path)
  # The event files in the bucket hold the losses of metrics.jsonl (both runs: the resumed one
  # writes steps after the one it resumed at).
  events = event_scalars(workdir, tmp_path)
  logged = {r["step"]: r["train/loss"] for r in writers.read_metrics(workdir) if "train/loss" in r}
  assert {s: pytest.approx(v) for s, v in logged.items()} == events["train/loss"]
  ft_logged = {r["step"] for r in writers.read_metrics(ft_workdir) if "train/loss" in r}
  assert set(event_scalars(ft_workdir, tmp_path)["train/loss"]) == ft_logged
