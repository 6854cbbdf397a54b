"""Multi-host start-up decisions (remedis_jax/distributed.py) with a faked environment.

`jax.distributed.initialize` is replaced by a recorder: nothing here starts a real service.
"""

import jax
import pytest

from remedis_jax import distributed

NO_TPU = dict(platforms=None, explicit=False, already=False, libtpu=False, tpu_chips=0,
              accel_devices=0)


def _decide(environ=None, **facts):
  return distributed.decide(environ or {}, **{**NO_TPU, **facts})


def test_plain_cpu_machine_starts_nothing():
  assert _decide().method == "none"
  assert _decide({"SLURM_NTASKS": "1"}).method == "none"


def test_tpu_vm_is_detected_from_libtpu_and_chips_single_host_included():
  # A single-host TPU VM (v4-8: 4 chips) also initialises: JAX's TPU cluster detection then
  # reports one process; on a pod slice the same call finds every host.
  start = _decide(libtpu=True, tpu_chips=4)
  assert start.method == "tpu" and "4 TPU chip" in start.reason
  assert _decide(libtpu=True, accel_devices=4).method == "tpu"  # v2-v4 drivers
  assert _decide(libtpu=True, platforms="tpu,cpu", tpu_chips=8).method == "tpu"
  # Chips without the TPU runtime: JAX cannot use them, so nothing to coordinate.
  assert _decide(tpu_chips=4).method == "none"
  # The runtime installed on a machine without chips (a CPU VM with jax[tpu]).
  assert _decide(libtpu=True).method == "none"


@pytest.mark.parametrize("name, value", [
    ("TPU_WORKER_HOSTNAMES", "t1k-w-0,t1k-w-1"),  # GKE
    ("TPU_WORKER_HOSTNAMES", "t1k-w-0"),          # GKE, one host
    ("TPU_ACCELERATOR_TYPE", "v5litepod-16"),
    ("MEGASCALE_COORDINATOR_ADDRESS", "10.0.0.2"),
])
def test_tpu_job_variables_are_enough(name, value):
  start = _decide({name: value})
  assert start.method == "tpu" and name in start.reason


def test_jax_platforms_without_tpu_wins_over_the_hardware():
  # E.g. the CPU test suite run on a TPU VM: every host would otherwise try to coordinate.
  start = _decide({"TPU_WORKER_HOSTNAMES": "a,b"}, platforms="cpu", libtpu=True, tpu_chips=4)
  assert start.method == "none" and "cpu" in start.reason


def test_slurm_explicit_and_already_initialised():
  assert _decide({"SLURM_NTASKS": "8"}).method == "slurm"
  assert _decide({"SLURM_NTASKS": "8"}, explicit=True).method == "explicit"
  assert _decide({"SLURM_NTASKS": "8"}, already=True).method == "already"
  assert _decide(libtpu=True, tpu_chips=4, already=True).method == "already"


def _fake_sysfs(root, devices):
  for i, (vendor, device) in enumerate(devices):
    folder = root / f"0000:00:{i:02x}.0"
    folder.mkdir(parents=True)
    (folder / "vendor").write_text(vendor + "\n")
    (folder / "device").write_text(device + "\n")
  return str(root)


def test_tpu_chips_are_counted_from_sysfs(tmp_path):
  sysfs = _fake_sysfs(tmp_path / "pci", [
      ("0x1ae0", "0x0063"), ("0x1ae0", "0x0063"),  # two v5e chips
      ("0x1ae0", "0x0042"),                        # Google's gVNIC network card: not a TPU
      ("0x10de", "0x2330"),                        # an NVIDIA GPU
  ])
  assert distributed.tpu_chips_on_pci(sysfs) == 2
  assert distributed.tpu_chips_on_pci(str(tmp_path / "absent")) == 0


@pytest.fixture
def recorder(monkeypatch):
  """Fakes the facts `initialize` gathers and records jax.distributed.initialize calls."""
  calls = []
  facts = {"platforms": None, "libtpu": False, "chips": 0}
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(distributed, "_platforms", lambda: facts["platforms"])
  monkeypatch.setattr(distributed, "_libtpu_installed", lambda environ: facts["libtpu"])
  monkeypatch.setattr(distributed, "tpu_chips_on_pci", lambda: facts["chips"])
  monkeypatch.setattr(distributed, "_accel_devices", lambda: [])
  for name in ("SLURM_NTASKS", *distributed._TPU_ENVIRONMENT):
    monkeypatch.delenv(name, raising=False)
  return calls, facts


def test_initialize_auto_detects_on_a_tpu_host(recorder):
  calls, facts = recorder
  facts.update(libtpu=True, chips=4)
  assert distributed.initialize().method == "tpu"
  assert calls == [((), {})]  # no arguments: JAX's own TPU cluster detection


def test_initialize_does_nothing_on_cpu(recorder):
  calls, facts = recorder
  assert distributed.initialize().method == "none"
  facts.update(libtpu=True, chips=4, platforms="cpu")
  assert distributed.initialize().method == "none"
  assert calls == []


def test_initialize_passes_explicit_flags(recorder):
  calls, _ = recorder
  distributed.initialize("127.0.0.1:1234", 2, 1)
  assert calls == [((), {"coordinator_address": "127.0.0.1:1234", "num_processes": 2,
                         "process_id": 1})]
  with pytest.raises(ValueError, match="must be given together"):
    distributed.initialize("127.0.0.1:1234", 2, None)
  with pytest.raises(ValueError, match="outside"):
    distributed.initialize("127.0.0.1:1234", 2, 2)


def test_slurm_job_auto_detects(recorder, monkeypatch):
  calls, _ = recorder
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert distributed.initialize().method == "slurm"
  assert calls == [((), {})]


def test_tpu_host_without_a_cluster_description(recorder, monkeypatch, caplog):
  _, facts = recorder
  facts.update(libtpu=True, chips=4)

  def no_cluster(*args, **kwargs):
    raise ValueError("coordinator_address should be defined.")

  monkeypatch.setattr(jax.distributed, "initialize", no_cluster)
  # One process (a TPU VM without a metadata server): a warning, then a one-process run.
  with caplog.at_level("WARNING"):
    assert distributed.initialize().method == "none"
  assert "running as one process" in caplog.text
  # Several processes without a coordination service could not agree on checkpoints.
  monkeypatch.setattr(jax, "process_count", lambda: 4)
  with pytest.raises(RuntimeError, match="--coordinator_address"):
    distributed.initialize()

