"""Preemption with several processes: every host saves the same step, exits, and resumes.

First the watcher's multi-process logic against a fake of JAX's preemption protocol (fast),
then the real entry point: two processes on 127.0.0.1 (`--coordinator_address` etc.), SIGTERM
to both mid-run, then to one of them during a resumed run's start-up, with JAX's coordination
service deciding the step (remedis_jax/preemption.py). The uninterrupted reference is the same
run on another topology, one process with two devices: the same global batches
(data_pipelines/stream.py) and, with two participants, the same all-reduce sums, so the
interrupted run must end bit-identical to it (exact resume and topology at once). Its last leg
resumes the two-process checkpoint on that other topology too (one process, two devices).
That test is one of the slowest (two 2-process runs of R_micro at 32 px, then the last leg and
the reference, one after the other in a third process, which saves the ~9 s of imports of a
fourth; they cannot run in this pytest process: its eight simulated devices round a 2-device
step differently from a process that has two).
"""

import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from remedis_jax import checkpointing, preemption, writers
from tests import processes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------- the watcher against a fake preemption protocol


class FakeProtocol:
  """JAX's preemption sync protocol for one host (all hosts behave alike here).

  A notice makes the agreed step the step last passed to `reached_preemption_sync_point`
  (0 before any call) plus one, as in XLA's PreemptionSyncManager.
  """

  def __init__(self):
    self.last_step, self.agreed, self.calls = 0, None, []

  def notice(self):
    self.agreed = self.last_step + 1

  def reached_preemption_sync_point(self, step):
    self.calls.append(step)
    self.last_step = step
    return self.agreed == step


@pytest.fixture
def protocol(monkeypatch):
  fake = FakeProtocol()
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
  monkeypatch.setattr(preemption.multihost_utils, "reached_preemption_sync_point",
                      fake.reached_preemption_sync_point)
  return fake


def test_no_notice_no_stop(protocol):
  watcher = preemption.PreemptionWatcher(start_step=7)
  assert not any(watcher.reached(step) for step in range(8, 12))
  # The start step is passed before the loop's first step (its compilation can take minutes).
  assert protocol.calls == [1, 7, 8, 9, 10, 11]


def test_notice_during_a_step_stops_at_the_agreed_step(protocol):
  watcher = preemption.PreemptionWatcher(start_step=7)
  assert not watcher.reached(8)
  protocol.notice()
  assert watcher.reached(9)


def test_notice_before_the_first_step_of_a_resumed_run_stops_after_it(protocol, caplog):
  protocol.notice()  # during restore: the agreed step is 1, which a run at step 7 never passes
  with caplog.at_level("WARNING"):
    watcher = preemption.PreemptionWatcher(start_step=7)
    assert watcher.reached(8)
  assert "during start-up" in caplog.text and "save step 8" in caplog.text


def test_fresh_run_needs_no_start_up_check(protocol):
  protocol.notice()  # agreed step 1: the first step of a fresh run
  watcher = preemption.PreemptionWatcher(start_step=0)
  assert watcher.reached(1)
  assert protocol.calls == [0, 1]


def test_start_step_defaults_to_the_newest_checkpoint(protocol):
  class Manager:
    def latest_step(self):
      return 5
  preemption.PreemptionWatcher(Manager())
  assert protocol.calls == [1, 5]


def test_without_jax_distributed_sigterm_cannot_be_agreed_on(protocol, monkeypatch, caplog):
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  with caplog.at_level("WARNING"):
    watcher = preemption.PreemptionWatcher(start_step=3)
  protocol.notice()
  assert not watcher.reached(4) and protocol.calls == []
  assert "not initialised" in caplog.text


# ------------------------------------------------------- two real processes on 127.0.0.1


TOTAL_STEPS = 16


def _start_pair(workdir, logs_prefix):
  """Two processes of one run; their stdout+stderr go to <logs_prefix>.<i>.log."""
  port = processes.free_port()
  flags = [f"--config.total_steps={TOTAL_STEPS}", "--config.checkpoint_every_steps=100",
           f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
  procs, logs = [], []
  for i in range(2):
    logs.append(f"{logs_prefix}.{i}.log")
    with open(logs[-1], "wb") as log:
      command = [sys.executable, "-m", "remedis_jax.main", f"--workdir={workdir}",
                 "--config=configs/pretrain_simclr.py:smoke", *flags, f"--process_id={i}"]
      procs.append(subprocess.Popen(command, cwd=REPO, env=processes.cpu_env(), stdout=log,
                                    stderr=subprocess.STDOUT))
  return procs, logs


# The last leg and the reference in one process with two devices: the config the pair's command
# line builds, run for each workdir in turn (INFO logs to stderr, as under remedis_jax.main).
SINGLE_PROCESS_RUNS = f"""
import logging
import sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from configs import pretrain_simclr
from remedis_jax import train_simclr
for workdir in sys.argv[1:]:
  config = pretrain_simclr.get_config("smoke")
  config.total_steps, config.checkpoint_every_steps = {TOTAL_STEPS}, 100
  train_simclr.train_and_evaluate(config, workdir)
"""


def _start_single(workdirs, log_path):
  """One process with two devices: the runs in `workdirs`, one after the other."""
  with open(log_path, "wb") as log:
    return subprocess.Popen([sys.executable, "-c", SINGLE_PROCESS_RUNS, *workdirs], cwd=REPO,
                            env=processes.cpu_env(devices=2), stdout=log, stderr=subprocess.STDOUT)


def _read(path):
  with open(path, encoding="utf-8", errors="replace") as f:
    return f.read()


def _finish(procs, logs, timeout=300, status=0):
  """Waits for `procs`; each must exit with `status` (EXIT_PREEMPTED: saved on SIGTERM)."""
  texts = []
  for proc, log in zip(procs, logs):
    proc.wait(timeout=timeout)
    texts.append(_read(log))
    assert proc.returncode == status, f"{log}:\n{texts[-1][-3000:]}"
  return texts


def _wait_for(condition, procs, what, timeout=300):
  deadline = time.time() + timeout
  while not condition():
    if any(p.poll() is not None for p in procs):
      raise AssertionError(f"a process ended before {what}")
    if time.time() > deadline:
      raise AssertionError(f"timed out waiting for {what}")
    time.sleep(0.05)


def _saved_steps(texts):
  return [[int(s) for s in re.findall(r"Preempted: saved step (\d+)", text)] for text in texts]


def _checkpoint_steps(workdir):
  folder = os.path.join(workdir, checkpointing.CHECKPOINT_SUBDIR)
  return sorted(int(name) for name in os.listdir(folder) if name.isdigit())


def _all_losses(workdir) -> dict[tuple[int, str], float]:
  """Every logged loss of a run: {(step, metric name): value} from WORKDIR/metrics.jsonl."""
  return {(r["step"], k): v for r in writers.read_metrics(workdir) for k, v in r.items()
          if "loss" in k}


def _losses(workdir):
  return {r["step"]: r["train/loss"] for r in writers.read_metrics(workdir) if "train/loss" in r}


@pytest.mark.slow
def test_sigterm_to_two_processes_saves_one_step_and_resume_matches(tmp_path):
  interrupted, reference = str(tmp_path / "interrupted"), str(tmp_path / "one_process")
  logged = lambda: list(_losses(interrupted))  # process 0 writes metrics.jsonl

  # 1. Interrupted mid-run (16 steps of 16 records cross the first epoch's end at 96 records).
  procs, logs = _start_pair(interrupted, str(tmp_path / "run1"))
  _wait_for(lambda: logged() and max(logged()) >= 3, procs, "step 3")
  for proc in procs:
    proc.send_signal(signal.SIGTERM)
  # The entry point exits with EXIT_PREEMPTED (not 0): saved, not finished.
  texts = _finish(procs, logs, status=preemption.EXIT_PREEMPTED)
  saved = _saved_steps(texts)
  # Both processes saved one and the same step: the one JAX's coordination service agreed on.
  assert saved[0] == saved[1] and len(saved[0]) == 1, saved
  step = saved[0][0]
  assert 3 <= step < TOTAL_STEPS - 1, step
  for text in texts:
    assert f"all of them save step {step} and exit" in text
  assert _checkpoint_steps(interrupted) == [step]

  # 2. The rerun is preempted again during start-up (restore, set-up), before its first step,
  #    and only on process 1 (one host's maintenance event): JAX's protocol would agree on
  #    step 1, long passed; both processes save the next step instead.
  procs, logs = _start_pair(interrupted, str(tmp_path / "run2"))
  _wait_for(lambda: all(re.search(r"process \d of 2", _read(log)) for log in logs), procs,
            "jax.distributed to start on both processes")
  procs[1].send_signal(signal.SIGTERM)
  texts = _finish(procs, logs, status=preemption.EXIT_PREEMPTED)
  for text in texts:
    assert "Preemption notice received during start-up (resuming at step %d)" % step in text
  assert _saved_steps(texts) == [[step + 1], [step + 1]]
  assert _checkpoint_steps(interrupted) == [step, step + 1]

  # 3. The next rerun resumes there and finishes, on the other topology: one process with two
  #    devices restores the two processes' checkpoint (arrays and data iterator state). The same
  #    process then runs the uninterrupted reference on that topology (same seed and batches).
  single_log = str(tmp_path / "run3_then_reference.log")
  [text] = _finish([_start_single([interrupted, reference], single_log)], [single_log])
  assert f"/{step + 1} was saved by another number of processes" in text, text[-3000:]

  # Every logged loss of every step (process 0's metrics.jsonl) and the final parameters are the
  # uninterrupted reference's, exactly: resume is exact, and the data and the sums do not depend
  # on the number of processes.
  losses, ref_losses = _all_losses(interrupted), _all_losses(reference)
  assert sorted(_losses(interrupted)) == list(range(1, TOTAL_STEPS + 1))
  assert losses.keys() == ref_losses.keys()
  differing = {k: (losses[k], ref_losses[k]) for k in losses if losses[k] != ref_losses[k]}
  assert not differing, differing
  final, final_step = checkpointing.load_params(interrupted)
  expected, ref_step = checkpointing.load_params(reference)
  assert final_step == ref_step == TOTAL_STEPS
  jax.tree.map(np.testing.assert_array_equal, final, expected)
