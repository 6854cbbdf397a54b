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

from configs import pretrain_simclr
from data_pipelines import pipeline, presets
from data_pipelines import sources as data_sources
from remedis_jax import checkpointing, pretraining, sharding, train_simclr, writers

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


def test_two_processes_agree_with_one_process_on_the_same_global_batch(tmp_path):
  num_steps = 4  # the `:smoke` length: the one-process side below is test_train_simclr's program
  port = _free_port()
  workdir = str(tmp_path / "two_process")
  flags = [f"--config.total_steps={num_steps}", "--config.checkpoint_every_steps=100",
           f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
  procs = [subprocess.Popen(_main(workdir, *flags, f"--process_id={i}"), cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
  outputs = [p.communicate(timeout=300)[0].decode() for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  # Only process 0 writes the metrics file and summaries.
  assert os.path.exists(os.path.join(workdir, writers.METRICS_FILE))
  multi_params, step = checkpointing.load_params(workdir)
  assert step == num_steps
  multi_losses = [r["train/loss"] for r in writers.read_metrics(workdir) if "train/loss" in r]

  # One process, 8 devices, fed the concatenation of the two processes' shards; the update step
  # is built as train_and_evaluate builds it (online probe and site metrics included).
  config = pretrain_simclr.get_config("smoke")
  config.total_steps = num_steps
  source = data_sources.build_source(config.data, config.data.pretrain_split,
                                     labels_optional=True)
  ops = presets.get_preset(config.data.preset, "pretrain", config.data.image_size)
  iterators = [iter(pipeline.make_pretrain_dataset(
      source, batch_size=8, ops=ops, num_views=2, seed=config.seed, shard_index=i,
      shard_count=2, num_channels=3)) for i in range(2)]
  total, warmup, _ = pretraining.steps_from_config(config, len(source))
  mesh = sharding.make_mesh(None)
  setup = train_simclr.create_setup_for_source(config, mesh, source, total_steps=total,
                                               warmup_steps=warmup)
  state = sharding.create_sharded(setup.init_state, jax.random.key(config.seed),
                                  shardings=setup.state_shardings)
  losses = []
  for _ in range(num_steps):
    parts = [next(it) for it in iterators]
    batch = {k: np.concatenate([p[k] for p in parts]) for k in setup.batch_keys}
    state, metrics = setup.update_fn(
        state, sharding.shard_host_batch(batch, sharding.batch_sharding(mesh)))
    losses.append(float(metrics.compute()["loss"]))
  np.testing.assert_allclose(multi_losses, losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               multi_params, jax.device_get(state.params))


def test_mistyped_config_override_is_an_error(tmp_path):
  result = subprocess.run(_main(str(tmp_path / "w"), "--config.modle.name=R50x1"), cwd=REPO,
                          env=_env(), capture_output=True, timeout=120)
  assert result.returncode != 0
  assert b"modle" in result.stderr
