"""remedis_jax/writers.py and progress.py: TensorBoard event files written without TensorFlow and
read back by TensorBoard's own reader, the progress report, and a runtime that never imports
TensorFlow."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from remedis_jax import progress, writers
from tests.fakes import read_tensorboard_events as read_events

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_event_file_holds_the_scalars_and_hparams_tensorboard_reads(tmp_path):
  writer = writers.create_writer(str(tmp_path))
  writer.write_hparams(writers.flatten_config({"optimizer": {"lr": 0.1}, "model": "R_micro",
                                               "crop": (0.8, 1.0), "clip": None}))
  for step in (1, 2, 10):
    writer.write_scalars(step, {"train/loss": np.float32(1.0 / step), "train/acc": step / 20})
  writer.close()
  names = [n for n in os.listdir(tmp_path) if n.startswith(writers.EVENT_FILE_PREFIX)]
  assert len(names) == 1 and names[0].endswith(".v2")
  events = read_events(tmp_path)
  assert sorted(events.Tags()["scalars"]) == ["train/acc", "train/loss"]
  losses = {e.step: e.value for e in events.Scalars("train/loss")}
  assert losses == pytest.approx({1: 1.0, 2: 0.5, 10: 0.1})
  # The same numbers as metrics.jsonl, which scripts read.
  jsonl = {r["step"]: r["train/loss"] for r in writers.read_metrics(str(tmp_path))}
  assert jsonl == pytest.approx(losses)
  # The HParams dashboard's session start, with every flattened key.
  from tensorboard.plugins.hparams import plugin_data_pb2  # pylint: disable=g-import-not-at-top
  content = events.PluginTagToContent("hparams")
  start = plugin_data_pb2.HParamsPluginData.FromString(
      content["_hparams_/session_start_info"]).session_start_info
  assert set(start.hparams) == {"optimizer.lr", "model", "crop", "clip"}
  assert start.hparams["optimizer.lr"].number_value == 0.1
  assert start.hparams["crop"].string_value == "(0.8, 1.0)"


def test_two_writers_in_one_folder_keep_separate_files(tmp_path):
  """A resumed run in the same process (the tests, a sweep in-process) starts a new file."""
  for step in (1, 2):
    writer = writers.create_writer(str(tmp_path))
    writer.write_scalars(step, {"loss": float(step)})
    writer.close()
  assert len([n for n in os.listdir(tmp_path) if n.startswith(writers.EVENT_FILE_PREFIX)]) == 2
  assert {e.step: e.value for e in read_events(tmp_path).Scalars("loss")} == {1: 1.0, 2: 2.0}


class FakeClock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


class Recorder(writers.MetricWriter):
  def __init__(self):
    self.records = []

  def write_scalars(self, step, scalars):
    self.records.append((step, dict(scalars)))


def test_progress_reports_rate_eta_and_timed_fractions(caplog):
  clock, recorder = FakeClock(), Recorder()
  report = progress.ReportProgress(num_train_steps=100, writer=recorder, every_secs=10.0,
                                   clock=clock)
  caplog.set_level("INFO")
  clock.now = 5.0
  assert not report(1)  # the first step (compilation) only starts the clock
  for step in range(2, 17):  # 15 steps in 10 s, 2.5 s of them in an evaluation
    clock.now += 0.5
    if step == 11:
      with report.timed("eval"):
        clock.now += 2.5
    reported = report(step)
  assert reported and len(recorder.records) == 1
  step, scalars = recorder.records[0]
  assert step == 16
  assert scalars["steps_per_sec"] == pytest.approx(1.5)
  assert scalars["timing/eval_fraction"] == pytest.approx(0.25)
  line = [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress:")][-1]
  assert "1.5 steps/s, 16.0% (16/100), ETA 56s; eval 25.0%" in line
  # Nothing until the interval has passed again; the last step always reports.
  clock.now += 1.0
  assert not report(22)
  clock.now += 1.0
  assert report(100)
  assert recorder.records[-1][0] == 100 and "timing/eval_fraction" not in recorder.records[-1][1]


@pytest.mark.parametrize("seconds, text", [(0.4, "0s"), (59, "59s"), (125, "2m05s"),
                                           (7325, "2h02m")])
def test_format_duration(seconds, text):
  assert progress.format_duration(seconds) == text


def test_the_runtime_never_imports_tensorflow():
  """The entry point, every trainer, the sweeps and studies, and the data layer: none of them
  loads TensorFlow (whether or not it is installed)."""
  modules = ["remedis_jax.main", "remedis_jax.train_simclr", "remedis_jax.train_cluster",
             "remedis_jax.train_gmml", "remedis_jax.train_finetune", "remedis_jax.train_segment",
             "remedis_jax.pretraining", "remedis_jax.supervised", "remedis_jax.export",
             "experiments.label_fraction_sweep", "experiments.study", "experiments.quickstart",
             "experiments.ood_study", "experiments.evaluate_run", "data_pipelines.pipeline",
             "data_pipelines.convert"]
  code = ("import importlib, json, sys\n"
          f"for name in {modules!r}:\n"
          "  importlib.import_module(name)\n"
          "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
          "('tensorflow', 'tf_keras', 'keras'))))\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       check=True, timeout=300)
  assert json.loads(out.stdout.strip().splitlines()[-1]) == []
