"""A multi-slice mesh (`mesh.dcn_data`) in real processes: two processes on 127.0.0.1, each taken
as a slice of two CPU devices, against four devices in one slice.

The multi-slice job puts 'fsdp' inside each process (its ICI) and data parallelism across the
two (DCN); the reference is the ('data': 2, 'fsdp': 2) mesh of four of this process's devices.
Same global batches (data_pipelines/stream.py), same global NT-Xent negatives: the logged
losses must agree.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from remedis_jax import train_simclr, writers
from tests import fakes, processes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 2
FLAGS = ["--config=configs/pretrain_simclr.py:smoke", f"--config.total_steps={STEPS}",
         "--config.log_every_steps=1", "--config.checkpoint_every_steps=100",
         "--config.knn.every_steps=0", "--config.linear_probe.enabled=False",
         "--config.data.worker_count=0"]


def _pair(make_command, tmp_path, name):
  """Two processes (2 devices each); returns their outputs after both exit with status 0."""
  port = processes.free_port()
  procs = []
  for i in range(2):
    log = open(tmp_path / f"{name}.{i}.log", "wb")  # pylint: disable=consider-using-with
    process = subprocess.Popen(make_command(f"127.0.0.1:{port}", i), cwd=REPO,
                               env=processes.cpu_env(2), stdout=log, stderr=subprocess.STDOUT)
    procs.append((process, log))
  texts = []
  for proc, log in procs:
    proc.wait(timeout=300)
    log.close()
    with open(log.name, encoding="utf-8", errors="replace") as f:
      texts.append(f.read())
    assert proc.returncode == 0, texts[-1][-3000:]
  return texts


@pytest.mark.slow
def test_two_slices_train_like_one_slice_with_the_same_devices(tmp_path):
  multislice = str(tmp_path / "multislice")
  logs = _pair(lambda address, i: [sys.executable, "-m", "remedis_jax.main", *FLAGS,
                                   f"--workdir={multislice}", "--config.mesh.dcn_data=2",
                                   "--config.mesh.fsdp=2", f"--coordinator_address={address}",
                                   "--num_processes=2", f"--process_id={i}"], tmp_path, "train")
  # 'data' = 2 slices x 1, 'fsdp' = 2 inside a slice: each mesh row is one process's devices.
  for text in logs:
    assert "Mesh: data=2, fsdp=2 over 4 devices; process of each device: [[0, 0], [1, 1]]" in text
  # The reference in this process: 4 of its 8 simulated devices, one slice, data=2 x fsdp=2.
  reference = str(tmp_path / "reference")
  config = fakes.smoke_config("pretrain_simclr", devices=4, **{
      "total_steps": STEPS, "log_every_steps": 1, "checkpoint_every_steps": 100,
      "knn.every_steps": 0, "linear_probe.enabled": False, "data.worker_count": 0,
      "mesh.data": 2, "mesh.fsdp": 2})
  train_simclr.train_and_evaluate(config, reference)

  def losses(workdir):
    return {r["step"]: r["train/loss"] for r in writers.read_metrics(workdir) if "train/loss" in r}

  got, want = losses(multislice), losses(reference)
  assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
  # Sums over the devices may be ordered differently: equal up to float32 rounding.
  np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)],
                             rtol=1e-5)
