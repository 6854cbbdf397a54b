"""Preemption: SIGTERM (how TPU and cluster schedulers announce it) -> save now, exit cleanly.

Single process: a SIGTERM handler sets a flag that the train loop polls every step.
Several processes: the signal may reach hosts at different steps, so every host must agree on
the step at which to save; JAX's coordination service does that (it listens for SIGTERM itself)
and Orbax exposes it as `CheckpointManager.reached_preemption(step)`.
"""

from __future__ import annotations

import logging
import signal
import threading

import jax


class PreemptionWatcher:
  """Tells the train loop when to save and stop because the job is being preempted."""

  def __init__(self, manager=None):
    self._manager = manager
    self._event = threading.Event()
    self._previous = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint at the current step, then exiting.")
    self._event.set()

  def reached(self, step: int) -> bool:
    """Whether the run must save at `step` and stop (the same answer on every process)."""
    if jax.process_count() > 1:
      return self._manager is not None and self._manager.reached_preemption(step)
    return self._event.is_set()

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
