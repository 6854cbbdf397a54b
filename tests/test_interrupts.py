"""Interrupts and a full disk: Ctrl-C saves the current step and exits 75 (a second one stops
at once), a resumed run does not log steps twice, a checkpoint save that fails on a full disk
stops the run with one line and keeps the older checkpoints, and Grain's worker processes and
shared memory end cleanly."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
# Orbax's private module where TensorStore's array writes start (in its background threads).
from orbax.checkpoint._src.serialization import serialization as orbax_serialization
import pytest

from configs import common, pretrain_simclr
from data_pipelines import pipeline, presets, stream
from data_pipelines.sources.synthetic import SyntheticCXR
from remedis_jax import checkpointing, preemption, train_simclr, writers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SigintReached(Exception):
  """Ctrl-C reached the test's own handler: nothing in the code under test handled it."""


@pytest.fixture
def sigint_guard():
  """A SIGINT handler for the test's duration, so that an unhandled Ctrl-C fails the test
  instead of stopping pytest (its default handler raises KeyboardInterrupt)."""
  def handler(signum, frame):
    del signum, frame
    raise SigintReached()
  previous = signal.signal(signal.SIGINT, handler)
  yield handler
  signal.signal(signal.SIGINT, previous)


def _config(**overrides):
  # A constant learning rate after the warm-up: a cosine bakes total_steps into the compiled
  # update step, so every run length here (and a resume's) would compile its own; constant, the
  # runs of this module (the subprocess's too) and test_run_config.py's share one program.
  config = pretrain_simclr.get_config("smoke")
  config.mesh.devices = 1
  config.knn.every_steps = 0
  config.optimizer.schedule = "constant"
  return common.override(config, overrides)


def _dataset(config, source=None):
  source = source or SyntheticCXR(split="train", num_examples=96, image_size=32)
  return pipeline.make_pretrain_dataset(
      source, batch_size=config.batch_size, ops=presets.get_preset("cxr", "pretrain", 32),
      options=stream.StreamOptions(seed=0, read_threads=1, prefetch_buffer_size=2))


# ---------------------------------------------------------------------------------- Ctrl-C


def test_second_ctrl_c_stops_at_once_and_the_handler_is_put_back(sigint_guard):
  watcher = preemption.PreemptionWatcher()
  try:
    os.kill(os.getpid(), signal.SIGINT)  # handled at once, in this thread
    assert watcher.reached(1)  # the first: save the current step, then exit
    with pytest.raises(preemption.InterruptedWhileWaiting):  # the wait for input ends, too
      with watcher.interruptible():
        pass
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)  # the second: stop now
    # After the second the handler from before the run is back.
    assert signal.getsignal(signal.SIGINT) is sigint_guard
  finally:
    watcher.close()
  assert signal.getsignal(signal.SIGINT) is sigint_guard
  # A process that ignores SIGINT (a background job) keeps ignoring it.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  watcher = preemption.PreemptionWatcher()
  assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
  watcher.close()
  assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


class CtrlCAfter:
  """A source that sends this process SIGINT (the terminal's Ctrl-C) at its `at`-th read."""

  def __init__(self, source, at):
    self.source, self.at, self.reads, self.name = source, at, 0, source.name

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    self.reads += 1
    if self.reads == self.at:
      os.kill(os.getpid(), signal.SIGINT)
    return self.source[index]


def test_ctrl_c_saves_the_current_step_and_the_resumed_run_logs_no_step_twice(
    tmp_path, sigint_guard):
  del sigint_guard
  # Checkpoints only at the end: without the interrupt save, everything would be lost.
  config = _config(total_steps=40, checkpoint_every_steps=1000)
  workdir = str(tmp_path / "run")
  source = CtrlCAfter(SyntheticCXR(split="train", num_examples=96, image_size=32),
                      at=3 * config.batch_size + 1)  # while the loop reads the 4th batch
  summary = train_simclr.train_and_evaluate(config, workdir, dataset=_dataset(config, source))
  steps = summary["steps"]
  assert summary["preempted"] and 1 <= steps < config.total_steps
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [str(steps)]

  # A run killed after that checkpoint (kill -9, a second Ctrl-C) had logged later steps.
  stale = {"train/loss": -1.0, "time": 0.0}
  with open(os.path.join(workdir, writers.METRICS_FILE), "a") as f:
    for later in range(steps + 1, steps + 4):
      f.write(json.dumps({"step": later, **stale}) + "\n")
  config.total_steps = steps + 2
  again = train_simclr.train_and_evaluate(config, workdir, dataset=_dataset(config))
  assert again["initialisation"].startswith("resumed") and not again["preempted"]
  logged = [r["step"] for r in writers.read_metrics(workdir) if "train/loss" in r]
  assert logged == list(range(1, steps + 3)), logged  # each step once, in order
  assert all(r["train/loss"] != -1.0 for r in writers.read_metrics(workdir) if "train/loss" in r)


def test_drop_records_after_keeps_earlier_records_and_the_writer_appends_on(tmp_path):
  path = tmp_path / writers.METRICS_FILE
  lines = [json.dumps({"hparams": {"lr": "0.1"}}), *[json.dumps({"step": s, "x": s})
                                                     for s in (1, 2, 3, 4, 5)],
           '{"step": 6, "x"',  # cut short by a kill: kept (it is not ours to judge)
           json.dumps({"hparams": {"lr": "0.1"}})]
  path.write_text("\n".join(lines) + "\n")
  writer = writers.JsonlWriter(str(path))
  assert writers.drop_records_after(writer, 3) == 2
  writer.write_scalars(4, {"x": 40})
  writer.close()
  text = path.read_text().splitlines()
  assert text == [lines[0], *lines[1:4], lines[6], lines[7], text[-1]]
  assert json.loads(text[-1])["x"] == 40
  # Starting over (step 0): every step record goes, hparams stay.
  writer = writers.JsonlWriter(str(path))
  assert writers.drop_records_after(writer, 0) == 4
  writer.close()
  assert [json.loads(line) for line in path.read_text().splitlines()
          if line.startswith('{"hparams"')] == [{"hparams": {"lr": "0.1"}}] * 2


# --------------------------------------------------------------------------- a full disk


def _fail_saves_from(monkeypatch, first_failing_step):
  """Array writes of checkpoints from `first_failing_step` on raise ENOSPC, in Orbax's
  background threads, where a full disk shows up in an asynchronous save."""
  original = orbax_serialization.async_serialize_from_host
  failed = []

  async def write(rslices, tensorstore_spec, **kwargs):
    step = int(json.dumps(tensorstore_spec).split(".orbax-checkpoint-tmp")[0]
               .rsplit("/", 1)[-1])
    if step >= first_failing_step:
      failed.append(step)
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return await original(rslices, tensorstore_spec, **kwargs)

  monkeypatch.setattr(orbax_serialization, "async_serialize_from_host", write)
  return failed


def test_disk_full_during_an_asynchronous_save_stops_at_once_with_one_line(
    tmp_path, monkeypatch, caplog):
  config = _config(total_steps=30, checkpoint_every_steps=4, keep_checkpoints=1,
                   async_checkpointing=True)
  failed = _fail_saves_from(monkeypatch, 8)
  workdir = str(tmp_path / "run")
  with pytest.raises(checkpointing.CheckpointSaveError) as error:
    train_simclr.train_and_evaluate(config, workdir, dataset=_dataset(config))
  checkpoints = os.path.join(workdir, "checkpoints")
  assert str(error.value) == (f"saving step 8 to {checkpoints} failed: no space left on device; "
                              "the last good checkpoint is step 4; free space and rerun")
  assert error.value.__cause__ is None and failed
  # Stopped at the step after the failure, not at the next save or the end of the run.
  last_logged = max(r["step"] for r in writers.read_metrics(workdir))
  assert 8 <= last_logged <= 10, last_logged
  # The older checkpoint is kept although keep_checkpoints=1; the partial one is gone.
  assert sorted(os.listdir(checkpoints)) == ["4"]
  # Orbax's threads logged no tracebacks of their own.
  assert not [r for r in caplog.records if r.exc_info and "orbax" in r.pathname]


def test_disk_full_on_a_real_small_file_system(tmp_path):
  mount_point = tmp_path / "small"
  mount_point.mkdir()
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
                           capture_output=True, text=True, check=False)
  if mounted.returncode:
    pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or mounted.returncode}); "
                "test_disk_full_during_an_asynchronous_save_stops_at_once_with_one_line "
                "injects the error instead")
  try:
    manager = checkpointing.make_manager(str(mount_point / "run"), max_to_keep=1,
                                         with_data=False)
    small = {"w": jnp.zeros((16,), jnp.float32)}
    assert checkpointing.save(manager, 1, small)
    manager.wait_until_finished()
    big = {"w": jnp.asarray(np.random.default_rng(0).random((256, 256), np.float32))}
    with pytest.raises(checkpointing.CheckpointSaveError) as error:
      checkpointing.save(manager, 2, big)
      manager.wait_until_finished()
    assert str(error.value) == (
        f"saving step 2 to {mount_point}/run/checkpoints failed: no space left on device; "
        "the last good checkpoint is step 1; free space and rerun")
    manager.close()  # no second report
    assert sorted(os.listdir(mount_point / "run" / "checkpoints")) == ["1"]
  finally:
    subprocess.run(["umount", str(mount_point)], check=False)


# ---------------------------------------------------------- the terminal's Ctrl-C, end to end


def test_ctrl_c_from_a_terminal_exits_75_without_tracebacks_or_leaked_shared_memory(tmp_path):
  # The real entry point with one Grain worker process; the terminal sends SIGINT to the whole
  # process group, workers included.
  workdir = tmp_path / "run"
  command = [sys.executable, "-m", "remedis_jax.main", "--config=configs/pretrain_simclr.py:smoke",
             f"--workdir={workdir}", "--config.mesh.devices=1", "--config.knn.every_steps=0",
             "--config.data.worker_count=1",
             # Far more steps than the Ctrl-C needs: on a loaded machine the signal may come
             # seconds after step 2, and the run must still be running then.
             "--config.total_steps=1000",
             "--config.optimizer.schedule=constant",
             "--config.checkpoint_every_steps=1000"]  # the update step compiled in-process above
  metrics = workdir / writers.METRICS_FILE
  with open(tmp_path / "stdout", "w+") as stdout, open(tmp_path / "stderr", "w+") as stderr:
    # Its own process group, as in a shell; SIGINT at its default, as in a terminal (a suite
    # started in the background of a non-interactive shell inherits SIGINT ignored).
    process = subprocess.Popen(command, cwd=REPO, stdout=stdout, stderr=stderr,
                               start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
      deadline = time.monotonic() + 300
      while time.monotonic() < deadline and process.poll() is None:
        if metrics.exists() and '"step": 2,' in metrics.read_text():
          break
        time.sleep(0.2)
      os.killpg(process.pid, signal.SIGINT)
      process.wait(timeout=120)
    finally:
      if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    stdout.seek(0)
    stderr.seek(0)
    stdout, stderr = stdout.read(), stderr.read()
  assert process.returncode == preemption.EXIT_PREEMPTED, stderr[-3000:]
  saved = sorted(os.listdir(workdir / "checkpoints"))
  assert len(saved) == 1 and 2 <= int(saved[0]) < 1000, saved
  assert "SimCLR pretraining preempted" in stdout
  for noise in ("Traceback", "KeyboardInterrupt", "leaked shared_memory", "Exception ignored"):
    assert noise not in stderr, stderr[-3000:]
