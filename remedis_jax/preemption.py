"""Preemption: SIGTERM (how TPU and cluster schedulers announce it) -> save now, exit cleanly.

Single process: a SIGTERM handler sets a flag that the train loop polls every step. While the
loop waits for its input pipeline (`interruptible()`), the handler also interrupts that wait at
once: a slow or stuck pipeline (a first batch of 2000 px PNGs, a hung file system) cannot hold
the exit back; the loop then saves the step it has with the iterator position from before
the wait (remedis_jax/loop.py).
Several processes: the signal may reach hosts at different steps, so every host must agree on
the step at which to save; JAX's coordination service does that (it listens for SIGTERM itself)
and Orbax exposes it as `CheckpointManager.reached_preemption(step)`.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading

import jax


class InterruptedWhileWaiting(Exception):
  """SIGTERM arrived while the loop waited inside `PreemptionWatcher.interruptible()`."""


class PreemptionWatcher:
  """Tells the train loop when to save and stop because the job is being preempted."""

  def __init__(self, manager=None):
    self._manager = manager
    self._event = threading.Event()
    self._previous = None
    self._waiting = False
    self._installed = False
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
      self._installed = True

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self._event.set()
    if self._waiting:
      self._waiting = False
      logging.warning("SIGTERM received while waiting for input: saving a checkpoint at the "
                      "current step, then exiting.")
      raise InterruptedWhileWaiting()
    logging.warning("SIGTERM received: saving a checkpoint at the current step, then exiting.")

  @contextlib.contextmanager
  def interruptible(self):
    """A block (the wait for the next batch) that SIGTERM interrupts at once.

    Raises:
      InterruptedWhileWaiting: SIGTERM arrived before or during the block (single process;
        with several processes the coordination service decides, see `reached`).
    """
    if self._installed and self._event.is_set():
      raise InterruptedWhileWaiting()
    self._waiting = True
    try:
      yield
    finally:
      self._waiting = False

  def reached(self, step: int) -> bool:
    """Whether the run must save at `step` and stop (the same answer on every process)."""
    if jax.process_count() > 1:
      return self._manager is not None and self._manager.reached_preemption(step)
    return self._event.is_set()

  def close(self):
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous)
      self._installed = False
