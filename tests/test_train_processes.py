"""The real entry point in subprocesses: preemption by SIGTERM + resume, two-process training.

Each subprocess imports JAX and compiles the tiny model, so these are the slowest tests; the
runs are a handful of steps of R_micro at 32 px.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np

from remedis_jax import checkpointing, writers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_FLAGS = ["--config=configs/pretrain_simclr.py:smoke"]


def _env(devices: int = 1) -> dict:
  env = dict(os.environ)
  # The test session's XLA flags (e.g. -O0 from conftest), with this process's device count.
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if "xla_force_host_platform_device_count" not in f]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = REPO
  return env


def _main(workdir, *extra):
  return [sys.executable, "-m", "remedis_jax.main", f"--workdir={workdir}", *TINY_FLAGS, *extra]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_sigterm_saves_and_resume_matches_uninterrupted_run(tmp_path):
  steps = ["--config.total_steps=10", "--config.checkpoint_every_steps=100"]
  reference = str(tmp_path / "reference")
  interrupted = str(tmp_path / "interrupted")
  proc = subprocess.Popen(_main(interrupted, *steps), cwd=REPO, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

  def start_reference():
    return subprocess.Popen(_main(reference, *steps), cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

  # The uninterrupted reference starts once the interrupted run has logged a step: its programs
  # are in the session's compilation cache by then, so they are compiled once, not twice at once.
  ref_proc = None
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    logged = [r["step"] for r in writers.read_metrics(interrupted) if "train/loss" in r]
    if ref_proc is None and logged:
      ref_proc = start_reference()
    if any(step >= 3 for step in logged):
      proc.send_signal(signal.SIGTERM)
      break
    time.sleep(0.05)
  if ref_proc is None:
    ref_proc = start_reference()
  out, _ = proc.communicate(timeout=240)
  assert proc.returncode == 0, out.decode()[-3000:]
  assert b"preempted" in out, out.decode()[-3000:]
  _, saved_step = checkpointing.load_params(interrupted)
  assert 3 <= saved_step < 10, saved_step

  resumed = subprocess.run(_main(interrupted, *steps), cwd=REPO, env=_env(), capture_output=True,
                           timeout=240)
  assert resumed.returncode == 0, resumed.stdout.decode()[-3000:] + resumed.stderr.decode()[-3000:]
  ref_out, _ = ref_proc.communicate(timeout=240)
  assert ref_proc.returncode == 0, ref_out.decode()[-3000:]

  final, step = checkpointing.load_params(interrupted)
  expected, ref_step = checkpointing.load_params(reference)
  assert step == ref_step == 10
  jax.tree.map(np.testing.assert_array_equal, final, expected)
  # The loss curve after the resume point is the uninterrupted one, step for step.
  ref_losses = {r["step"]: r["train/loss"] for r in writers.read_metrics(reference)
                if "train/loss" in r}
  resumed_losses = {r["step"]: r["train/loss"] for r in writers.read_metrics(interrupted)
                    if "train/loss" in r and r["step"] > saved_step}
  assert resumed_losses and all(resumed_losses[s] == ref_losses[s] for s in resumed_losses)


def _losses(workdir) -> dict[tuple[int, str], float]:
  """Every logged loss of a run: {(step, metric name): value} from WORKDIR/metrics.jsonl."""
  return {(r["step"], k): v for r in writers.read_metrics(workdir) for k, v in r.items()
          if "loss" in k}


def test_two_processes_agree_with_one_process_on_the_same_global_batch(tmp_path):
  # Two real processes x 1 device against one process x 2 devices, same seed and global batch:
  # the data pipeline gives every topology the same global batches (tests/test_data_topology.py),
  # so the whole runs agree. 8 steps of 16 records cross the first epoch's end (96 records).
  num_steps = 8
  flags = [f"--config.total_steps={num_steps}", "--config.checkpoint_every_steps=100"]
  port = _free_port()
  two_process = str(tmp_path / "two_process")
  one_process = str(tmp_path / "one_process")
  procs = [subprocess.Popen(
      _main(two_process, *flags, f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2", f"--process_id={i}"),
      cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
  procs.append(subprocess.Popen(_main(one_process, *flags), cwd=REPO, env=_env(devices=2),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
  outputs = [p.communicate(timeout=300)[0].decode() for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  # Only process 0 writes the metrics file and summaries.
  assert os.path.exists(os.path.join(two_process, writers.METRICS_FILE))

  multi_losses, single_losses = _losses(two_process), _losses(one_process)
  assert {step for step, _ in single_losses} == set(range(1, num_steps + 1))  # every step logged
  assert multi_losses.keys() == single_losses.keys()
  keys = sorted(single_losses)
  np.testing.assert_allclose([multi_losses[k] for k in keys], [single_losses[k] for k in keys],
                             rtol=0, atol=1e-4, err_msg=str(keys))
  multi_params, step = checkpointing.load_params(two_process)
  single_params, single_step = checkpointing.load_params(one_process)
  assert step == single_step == num_steps
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               multi_params, single_params)


def test_mistyped_config_override_is_an_error(tmp_path):
  result = subprocess.run(_main(str(tmp_path / "w"), "--config.modle.name=R50x1"), cwd=REPO,
                          env=_env(), capture_output=True, timeout=120)
  assert result.returncode != 0
  assert b"modle" in result.stderr
