"""config.profile: a jax.profiler trace of a window of train steps, for TensorBoard's Profile tab.

A real pretraining run with a profile: tests/test_train_simclr.py's end-to-end run.
"""

import glob
import os

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from remedis_jax import profiling


def _traces(logdir) -> list[str]:
  return glob.glob(os.path.join(str(logdir), "plugins", "profile", "*", "*.xplane.pb"))


def _config(first_step, num_steps):
  return ml_collections.ConfigDict({"profile": {"first_step": first_step, "num_steps": num_steps}})


def test_profiler_traces_exactly_its_window(tmp_path):
  f = jax.jit(lambda x: jnp.sin(x) @ x)
  x = jnp.ones((64, 64))
  profiler = profiling.StepProfiler(_config(first_step=3, num_steps=2), str(tmp_path))
  traced, stopped = [], []
  for step in range(1, 7):
    with profiler.step(step):
      y = f(x)
    if profiler.active:
      traced.append(step)
    profiler.after_step(step, y)
    if profiler.done and not stopped:
      stopped.append(step)
  assert traced == [3, 4] and stopped == [4]  # steps 3 and 4 traced, then closed
  traces = _traces(tmp_path)
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0


def test_profiler_off_by_default_and_checked(tmp_path):
  profiler = profiling.StepProfiler(ml_collections.ConfigDict(), str(tmp_path))
  for step in range(1, 4):
    with profiler.step(step):
      pass
    profiler.after_step(step, None)
  profiler.stop()
  assert not profiler.enabled and not _traces(tmp_path)
  with pytest.raises(ValueError, match="config.profile"):
    profiling.StepProfiler(_config(first_step=0, num_steps=2), str(tmp_path))
