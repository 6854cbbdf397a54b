"""One run per workdir: a lock that a second run on the same workdir hits at once.

Two runs writing one workdir corrupt each other: both append to metrics.jsonl, and the second
dies inside Orbax over a temporary folder. `WorkdirLock` takes an exclusive `fcntl.flock` on
`<workdir>/.lock` and writes who holds it (host, pid, command, start time) into the file, so
the second run stops before doing any work, naming the holder.

- The kernel releases the lock when the holding process exits, however it exits (kill -9
  included): a stale lock file from a dead run is simply taken over.
- A multi-host job holds one lock: process 0 takes it for the whole job (the other processes
  write their checkpoints through Orbax, which coordinates them itself).
- `flock` needs a local (or NFS v4 / Lustre) file system. Object stores (gs://) have no such
  lock: the run logs that it cannot lock and goes on.
- `holder(workdir)` asks, without taking the lock, whether a live run holds it (a sweep uses it
  to tell a run that another sweep is running from a failed one).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket
import sys

LOCK_FILE = ".lock"


class WorkdirInUseError(RuntimeError):
  """Another live run holds the workdir's lock."""


class WorkdirLock:
  """Context manager: holds `<workdir>/.lock` for the duration of a run (process 0 only)."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_FILE)
    self._file = None

  def acquire(self) -> "WorkdirLock":
    # JAX is imported here, not at the top: the sweeps' parent process probes locks (`holder`)
    # without loading JAX.
    import jax  # pylint: disable=g-import-not-at-top
    if jax.process_index() != 0:
      return self
    if "://" in self.workdir:
      logging.info("Workdir %s is not on a local file system: no run lock is taken; make sure "
                   "only one run writes it.", self.workdir)
      return self
    os.makedirs(self.workdir, exist_ok=True)
    # "a+": never truncates a holder's description before we hold the lock ourselves.
    lock_file = open(self.path, "a+", encoding="utf-8")  # pylint: disable=consider-using-with
    try:
      fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      lock_file.seek(0)
      described = _describe(lock_file.read())
      lock_file.close()
      raise WorkdirInUseError(
          f"{self.workdir} is in use by another run ({described}). Wait for it to finish, "
          "stop it, or pass another --workdir.") from None
    except OSError as error:  # e.g. a file system without flock support
      lock_file.close()
      logging.warning("Could not lock %s (%s): make sure only one run writes this workdir.",
                      self.path, error)
      return self
    lock_file.seek(0)
    lock_file.truncate()
    json.dump({"host": socket.gethostname(), "pid": os.getpid(),
               "since": datetime.datetime.now().isoformat(timespec="seconds"),
               "command": " ".join(sys.argv)[:500]}, lock_file)
    lock_file.flush()
    self._file = lock_file
    return self

  def release(self) -> None:
    if self._file is not None:
      # The file stays (unlinking it would race a run that just opened it); unlocked, it is
      # free for the next run.
      fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
      self._file.close()
      self._file = None

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc_info) -> None:
    self.release()


def _describe(text: str) -> str:
  """The holder's description in the lock file ("host h, pid 12, ..."), as readable text."""
  try:
    return ", ".join(f"{k} {v}" for k, v in json.loads(text).items())
  except (ValueError, AttributeError):
    return text.strip() or "a process that wrote no description"


def holder(workdir: str) -> str | None:
  """Who holds the workdir's lock ("host h, pid 12, since ..., command ..."); None: nobody.

  Probes with a non-blocking shared lock, released at once, and creates nothing: None also for
  a workdir without a lock file, an object-store URL or a file system without flock. A run
  that tries to start in the microseconds of the probe sees the workdir in use (its error says
  so); the sweeps treat that like any run held elsewhere.
  """
  if "://" in workdir:
    return None
  path = os.path.join(workdir, LOCK_FILE)
  try:
    lock_file = open(path, encoding="utf-8")  # pylint: disable=consider-using-with
  except OSError:  # no lock file: no run has started there
    return None
  with lock_file:
    try:
      fcntl.flock(lock_file.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
      return _describe(lock_file.read())
    except OSError:
      return None
    fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)
  return None
