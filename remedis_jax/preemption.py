"""Preemption: SIGTERM (how TPU and cluster schedulers announce it) -> save now, exit (status 75).

One process: a SIGTERM handler sets a flag that the train loop polls every step. While the
loop waits for its input pipeline (`interruptible()`), the handler also interrupts that wait at
once: a slow or stuck pipeline (a first batch of 2000 px PNGs, a hung file system) cannot hold
the exit back; the loop then saves the step it has with the iterator position from before
the wait (remedis_jax/loop.py).

Ctrl-C (SIGINT) in one process is the same request: the first saves the current step and
exits with status 75, rather than losing every step since the last periodic checkpoint (up to
`checkpoint_every_steps`) as a KeyboardInterrupt would. A second Ctrl-C stops at once without
saving (the rerun resumes from the last checkpoint); after it Ctrl-C is a plain
KeyboardInterrupt again. Grain's worker processes ignore SIGINT (data_pipelines/stream.py),
so the terminal's Ctrl-C reaches only the main process. A process started with SIGINT ignored
(a background job of a script) keeps ignoring it. With several processes Ctrl-C keeps Python's
default (KeyboardInterrupt): a terminal reaches the processes of one host only, and saving
needs all of them.

Several processes (a TPU pod slice, a SLURM job, the explicit flags): the signal reaches the
hosts at different steps, or only some of them, yet every host must save the same step (a
checkpoint is written by all of them together). JAX's coordination service does that, started
by `jax.distributed.initialize()` (remedis_jax/distributed.py): it installs its own SIGTERM
handler in every process (so this module installs none there), tells all processes when any
one is signalled, and they agree on the step after the furthest one has reached
(`jax.experimental.multihost_utils.reached_preemption_sync_point`, also what Orbax's
`CheckpointManager.reached_preemption` asks). The loop asks `reached(step)` after every step;
it is True at that agreed step on every host, which then saves it and exits; the rerun of
the same command on every host resumes there. Measured with 2 CPU processes (jax 0.10.2): the
hosts agreed on a step 2-4 steps after the signal, whether one host or both got it
(tests/test_preemption_processes.py checks both cases).

JAX's protocol takes "the furthest step" from the step each process last passed to it, 0
before the first call. A resumed run therefore tells it the step it resumed at as soon as the
watcher exists (before the first step's compilation, minutes on a pod), and also checks
whether a notice already came during start-up (restore, set-up): then the agreed step was 1,
in the past, and without this check the run would go on training until the VM is taken away.
Here `reached` is True at the first step instead, on every host.

What several processes cannot do: interrupt a wait for input (a host stuck in its input
pipeline also holds the others in the next step's collectives; the save happens when it
returns). Orbax also reports steps to the protocol when it saves (`reached_preemption`), in
its background thread for asynchronous saves; a notice that comes in the one step between that
and the loop's next report, on every host at once, would be agreed on a step already passed.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading

import jax
from jax.experimental import multihost_utils

from remedis_jax import checkpointing, run_files


# The exit status of an entry point whose run was preempted (saved, not finished): sysexits.h's
# EX_TEMPFAIL, "try again later". Not 0, so that nothing takes a preempted run for a finished
# one: a scheduler that requeues failed jobs reruns (resumes) it, and a chain such as
# `python -m remedis_jax.main ... && python -m experiments.label_fraction_sweep ...` stops
# instead of fine-tuning a half-trained encoder. Used by remedis_jax/main.py and the
# experiment scripts (quickstart, sweeps, OOD and segmentation studies).
EXIT_PREEMPTED = run_files.EXIT_PREEMPTED


class InterruptedWhileWaiting(Exception):
  """SIGTERM or Ctrl-C arrived while the loop waited inside `PreemptionWatcher.interruptible()`."""


class PreemptionWatcher:
  """Tells the train loop when to save and stop because the job is being preempted.

  Create it after the state is restored, just before the loop.

  Args:
    manager: the run's Orbax CheckpointManager; its newest step is the step the loop starts
      from unless `start_step` says otherwise.
    start_step: the step the loop starts from (several processes only).
  """

  def __init__(self, manager=None, *, start_step: int | None = None):
    self._manager = manager
    self._event = threading.Event()
    self._previous = None
    self._previous_sigint = None  # the SIGINT handler to put back; None: not replaced
    self._waiting = False
    self._installed = False
    self._processes = jax.process_count()
    self._sync = False  # JAX's preemption sync point is usable (several processes)
    self._notice_at_start = False
    self._announced = False
    if self._processes == 1:
      if threading.current_thread() is threading.main_thread():
        self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
          self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)
        self._installed = True
    else:
      if start_step is None:
        latest = manager.latest_step() if manager is not None else None
        start_step = int(latest) if latest is not None else 0
      self._sync, self._notice_at_start = _join_sync_protocol(start_step)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self._stop_requested("SIGTERM")

  def _on_sigint(self, signum, frame):
    del signum, frame
    if self._event.is_set():  # a second request: the user does not want to wait for the save
      self._restore_sigint()
      logging.warning("Ctrl-C again: stopping at once without saving; rerun the same command "
                      "to resume from the last checkpoint.")
      raise KeyboardInterrupt()
    self._stop_requested("Ctrl-C (SIGINT)", " (Ctrl-C again to stop at once without saving)")

  def _stop_requested(self, what: str, note: str = ""):
    self._event.set()
    if self._waiting:
      self._waiting = False
      logging.warning("%s received while waiting for input: saving a checkpoint at the current "
                      "step, then exiting%s.", what, note)
      raise InterruptedWhileWaiting()
    logging.warning("%s received: saving a checkpoint at the current step, then exiting%s.",
                    what, note)

  def _restore_sigint(self):
    if self._previous_sigint is not None:
      signal.signal(signal.SIGINT, self._previous_sigint)
      self._previous_sigint = None

  @contextlib.contextmanager
  def interruptible(self):
    """A block (the wait for the next batch) that SIGTERM or Ctrl-C interrupts at once.

    Raises:
      InterruptedWhileWaiting: SIGTERM or Ctrl-C arrived before or during the block (one
        process; with several processes the coordination service decides, see `reached`).
    """
    if self._installed and self._event.is_set():
      raise InterruptedWhileWaiting()
    self._waiting = True
    try:
      yield
    finally:
      self._waiting = False

  def reached(self, step: int) -> bool:
    """Whether the run must save at `step` and stop (the same answer on every process).

    Call it once per step, with consecutive steps, on every process.

    Raises:
      checkpointing.CheckpointSaveError: a background checkpoint save has failed (a full
        disk): the run stops here instead of training on past what it can save.
    """
    if self._manager is not None:
      checkpointing.check_saves(self._manager)
    if self._processes == 1:
      return self._event.is_set()
    if not self._sync:
      return False
    reached = multihost_utils.reached_preemption_sync_point(step)
    if self._notice_at_start:
      self._notice_at_start = False
      reached = True
    if reached and not self._announced:
      self._announced = True
      logging.warning("Preemption: SIGTERM reached at least one of the %d processes; all of "
                      "them save step %d and exit.", self._processes, step)
    return reached

  def close(self):
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous)
      self._restore_sigint()
      self._installed = False


def _join_sync_protocol(start_step: int) -> tuple[bool, bool]:
  """Tells JAX's preemption protocol the step this run starts from.

  Returns:
    (usable, notice_at_start): whether the protocol runs at all, and whether a preemption
    notice already came during start-up (then the agreed step was 1, passed or never to come).
  """
  if not jax.distributed.is_initialized():
    logging.warning(
        "%d processes but jax.distributed is not initialised, so nothing makes the hosts agree "
        "on a step to save at: SIGTERM will not save a checkpoint in this run. Start it through "
        "remedis_jax.main, which initialises jax.distributed (remedis_jax/distributed.py).",
        jax.process_count())
    return False, False
  try:
    # Before any call JAX counts this process at step 0: a notice during start-up makes the
    # agreed step 1. Asking about step 1 first finds that case (True on every process: they
    # all reported 0, and each query waits for its host's protocol to finish); then the real
    # step replaces it. A notice in the microseconds between the two calls can still be
    # missed (the agreed step would be 2).
    notice_at_start = start_step >= 1 and multihost_utils.reached_preemption_sync_point(1)
    multihost_utils.reached_preemption_sync_point(start_step)
  except RuntimeError as error:  # jax_enable_preemption_service=False
    logging.warning("JAX's preemption service is off (%s): SIGTERM will not save a checkpoint "
                    "in this %d-process run.", error, jax.process_count())
    return False, False
  if notice_at_start:
    logging.warning("Preemption notice received during start-up (resuming at step %d): every "
                    "process saves after the first step and exits.", start_step)
  return True, notice_at_start
