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

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      tempfile.mkdtemp(prefix="remedis_jax_test_compilation_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import pathlib

import pytest

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data_dir():
  """The real data beside the checkout (../shared/data); skips when it is absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"real data folder {SHARED_DATA} is absent (only developers and CI have it)")
  return SHARED_DATA
