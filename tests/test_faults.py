"""Faults in the train loop: bounded run-ahead, SIGTERM while the input is stuck, one run per
workdir, divergence that stays finite."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common, pretrain_simclr
from data_pipelines import pipeline, presets, stream
from data_pipelines.errors import BadRecordError
from data_pipelines.sources.synthetic import SyntheticCXR
from remedis_jax import loop, train_simclr, workdir_lock, writers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------ bounded run-ahead


def test_run_ahead_keeps_at_most_two_steps_in_flight():
  # A deliberately slow step (~0.1 s of matrix products on CPU), dispatched asynchronously.
  @jax.jit
  def step(x):
    for _ in range(8):
      x = jnp.tanh(x @ x.T / x.shape[0])
    return x

  def unfinished_when_dispatching(run_ahead):
    outputs, unfinished = [], []
    x = jnp.ones((700, 700), jnp.float32)
    jax.block_until_ready(step(x))  # compiled before timing anything
    for _ in range(6):
      unfinished.append(sum(not out.is_ready() for out in outputs))
      outputs.append(step(x))
      if run_ahead is not None:
        run_ahead.dispatched(outputs[-1])
    jax.block_until_ready(outputs)
    return unfinished

  # Unbounded, the host dispatches step after step without waiting: JAX's asynchronous
  # dispatch (what let a long logging window hold back the SIGTERM handler).
  assert max(unfinished_when_dispatching(None)) >= 3
  # Bounded: when a step is dispatched at most one earlier step is still unfinished.
  unfinished = unfinished_when_dispatching(loop.RunAhead(max_in_flight=2))
  assert max(unfinished) <= 1, unfinished


# ------------------------------------------------------ SIGTERM while the input pipeline hangs


class StuckAfter:
  """A source that serves `good` reads, then blocks (a hung file system) until released."""

  def __init__(self, source, good):
    self.source, self.good, self.reads = source, good, 0
    self.blocked = threading.Event()
    self.release = threading.Event()
    self.name = source.name

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    self.reads += 1
    if self.reads > self.good:
      self.blocked.set()
      self.release.wait()
    return self.source[index]


class WithBadRecords:
  """Records in `bad` raise BadRecordError (an unreadable file)."""

  def __init__(self, source, bad):
    self.source, self.bad, self.name = source, set(bad), source.name

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    if index in self.bad:
      raise BadRecordError(f"images/{index}.png", "truncated PNG")
    return self.source[index]


def _config(**overrides):
  config = pretrain_simclr.get_config("smoke")
  config.mesh.devices = 1
  config.knn.every_steps = 0
  config.total_steps = 50
  config.checkpoint_every_steps = 1000
  return common.override(config, overrides)


def test_sigterm_while_input_is_stuck_saves_the_current_step_and_exits(tmp_path):
  # One run, two faults (one compile): the input hangs after two batches, and the learning
  # rate runs away. A learning rate of 1e6 used to finish "successfully" at chance-level loss
  # with weights of 1e11: the values stay finite, so no NaN guard fires.
  config = _config(**{"optimizer.learning_rate": 1.0e6})
  source = StuckAfter(WithBadRecords(SyntheticCXR(split="train", num_examples=96,
                                                  image_size=32), bad=range(0, 96, 8)), good=40)
  dataset = pipeline.make_pretrain_dataset(
      source, batch_size=config.batch_size, ops=presets.get_preset("cxr", "pretrain", 32),
      options=stream.StreamOptions(seed=0, read_threads=1, prefetch_buffer_size=4,
                                   skip_bad_records=True, max_bad_record_share=0.5))
  workdir = str(tmp_path / "run")
  sent = {}

  def preempt_once_stuck():
    if source.blocked.wait(timeout=600):  # compiling first can take minutes on a loaded machine
      time.sleep(1.0)  # let the loop reach its wait for the next batch
      sent["at"] = time.monotonic()
      os.kill(os.getpid(), signal.SIGTERM)
    # Never leave the reader thread hanging, whatever happened.
    time.sleep(300)
    source.release.set()

  threading.Thread(target=preempt_once_stuck, daemon=True).start()
  try:
    summary = train_simclr.train_and_evaluate(config, workdir, dataset=dataset)
    # Back while the pipeline still hangs (it is released 300 s after the signal).
    returned_while_stuck = not source.release.is_set()
  finally:
    source.release.set()
  assert summary["preempted"] and "at" in sent and returned_while_stuck
  steps = summary["steps"]
  assert 1 <= steps < config.total_steps
  # The checkpoint holds that step and the iterator position just before the next batch.
  with open(os.path.join(workdir, "checkpoints", str(steps), "data",
                         "process_0-of-1.json")) as f:
    position = json.load(f)
  # The global stream position (steps x global batch), the bad records skipped on the way, and
  # Grain's own position (records consumed: the batches' good ones plus the skipped bad ones).
  assert position["global_position"] == steps * config.batch_size
  assert position["skipped_records"] == summary["skipped_records"]
  assert position["inner"]["next_index"] == steps * config.batch_size + summary["skipped_records"]
  # The skipped bad records are saved with the checkpoint, and a resumed run counts on from
  # there (it used to restart at 0).
  assert summary["skipped_records"] > 0
  config.total_steps = steps  # nothing left to train: the rerun only restores
  again = train_simclr.train_and_evaluate(config, workdir, dataset=pipeline.make_pretrain_dataset(
      WithBadRecords(SyntheticCXR(split="train", num_examples=96, image_size=32), bad=set()),
      batch_size=config.batch_size, ops=presets.get_preset("cxr", "pretrain", 32),
      options=stream.StreamOptions(seed=0)))
  assert again["initialisation"].startswith("resumed")
  assert again["skipped_records"] == summary["skipped_records"]
  # The log window of the last step was written, with the parameter norm, which ran away.
  records = [r for r in writers.read_metrics(workdir) if "train/loss" in r]
  assert records[-1]["step"] == steps
  assert any("parameter norm" in w for w in summary["divergence_warnings"]), summary
  assert records[-1]["train/param_norm"] > 0


# ------------------------------------------------------------------- one run per workdir


def test_second_run_on_a_locked_workdir_stops_at_once_naming_the_holder(tmp_path):
  workdir = str(tmp_path / "run")
  with workdir_lock.WorkdirLock(workdir):
    with pytest.raises(workdir_lock.WorkdirInUseError,
                       match=rf"{workdir} is in use by another run \(host .*pid {os.getpid()}"):
      workdir_lock.WorkdirLock(workdir).acquire()
    started = time.monotonic()
    with pytest.raises(workdir_lock.WorkdirInUseError):
      train_simclr.train_and_evaluate(_config(), workdir)
    assert time.monotonic() - started < 5  # before building or compiling anything
    assert not os.path.exists(os.path.join(workdir, "metrics.jsonl"))
  # Released on exit: the next run can take it.
  with workdir_lock.WorkdirLock(workdir):
    pass


def test_lock_of_a_killed_run_is_taken_over(tmp_path):
  workdir = str(tmp_path / "run")
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from remedis_jax import workdir_lock; "
       "lock = workdir_lock.WorkdirLock(sys.argv[1]).acquire(); print('held', flush=True); "
       "time.sleep(600)", workdir],
      cwd=REPO, stdout=subprocess.PIPE, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  try:
    assert holder.stdout.readline().strip() == b"held"
    with pytest.raises(workdir_lock.WorkdirInUseError, match=f"pid {holder.pid}"):
      workdir_lock.WorkdirLock(workdir).acquire()
  finally:
    holder.kill()  # SIGKILL: no cleanup code runs
    holder.wait()
  with workdir_lock.WorkdirLock(workdir):
    with open(os.path.join(workdir, workdir_lock.LOCK_FILE)) as f:
      assert json.load(f)["pid"] == os.getpid()


# --------------------------------------------------------------------------- divergence


def test_divergence_monitor_warns_once_per_kind():
  monitor = loop.DivergenceMonitor(initial_param_norm=10.0)
  assert monitor.update(1, loss=4.0, norm=12.0) == []
  assert monitor.update(2, loss=5.0, norm=900.0) == []  # 90x: not yet
  warned = monitor.update(3, loss=5.0, norm=1.0e11)
  assert len(warned) == 1 and "parameter norm is 1e+11" in warned[0]
  assert monitor.update(4, loss=5.0, norm=1.0e12) == []  # once per kind
  warned = monitor.update(5, loss=13.5, norm=1.0e12)  # > 3 * 4 + 1
  assert len(warned) == 1 and "loss is 13.5, up from 4" in warned[0]
  assert len(monitor.warnings) == 2
  # Non-finite values are the NaN guard's business, not this monitor's.
  assert loop.DivergenceMonitor(1.0).update(1, loss=float("nan"), norm=float("inf")) == []


def test_param_norm_matches_numpy():
  params = {"a": np.arange(6.0, dtype=np.float32).reshape(2, 3),
            "b": {"c": -np.ones(4, np.float32)}}
  expected = np.sqrt(np.sum(np.arange(6.0) ** 2) + 4.0)
  np.testing.assert_allclose(float(loop.param_norm(params)), expected, rtol=1e-6)
