"""Profiler traces of a few train steps (`config.profile`), for TensorBoard's Profile tab.

  python -m remedis_jax.main --config=... --workdir=W --config.profile.num_steps=5
  tensorboard --logdir W      # Profile tab (tensorboard-plugin-profile, a dependency)

Process 0 traces steps `first_step` .. `first_step + num_steps - 1` (1-based step numbers, as
logged) with `jax.profiler` into `<tensorboard dir>/plugins/profile/<time>/`. Start after the
first step or two, which compile. Every step carries a `StepTraceAnnotation`, so the trace
viewer shows the steps as steps and the overview page computes step times. The trace ends
after the last profiled step's results are ready (or when the run ends or is preempted first).
`num_steps` = 0 (the default) switches it off; the annotations then cost nothing measurable.
"""

from __future__ import annotations

import contextlib
import logging

import jax
import ml_collections

from data_pipelines import storage


class StepProfiler:
  """Starts and stops one `jax.profiler` trace around a window of train steps."""

  def __init__(self, config: ml_collections.ConfigDict, logdir: str):
    profile = config.get("profile") or {}  # absent (an older config): off
    self.first_step = int(profile.get("first_step", 10))
    self.num_steps = int(profile.get("num_steps", 0))
    if self.num_steps < 0 or (self.num_steps and self.first_step < 1):
      raise ValueError(f"config.profile: first_step={self.first_step} must be >= 1 and "
                       f"num_steps={self.num_steps} >= 0 (0 = no profile)")
    self.logdir = logdir
    self.enabled = self.num_steps > 0 and jax.process_index() == 0
    self.active = False
    self.done = False

  @contextlib.contextmanager
  def step(self, step: int):
    """Around the dispatch of train step `step` (1-based): annotates it, starts the trace."""
    if self.enabled and not self.active and not self.done and step >= self.first_step:
      storage.makedirs(self.logdir)
      jax.profiler.start_trace(self.logdir)
      self.active = True
      self._last = step + self.num_steps - 1
      logging.info("Profiling steps %d-%d into %s", step, self._last, self.logdir)
    with jax.profiler.StepTraceAnnotation("train", step_num=step):
      yield

  def after_step(self, step: int, outputs) -> None:
    """Ends the trace once `outputs` of the last profiled step are computed."""
    if self.active and step >= self._last:
      self.stop(outputs)

  def stop(self, outputs=None) -> None:
    if not self.active:
      return
    if outputs is not None:
      jax.block_until_ready(outputs)
    jax.profiler.stop_trace()
    self.active, self.done = False, True
    logging.info("Profile written to %s (tensorboard --logdir %s, Profile tab)",
                 self.logdir, self.logdir)
