"""Running a label-fraction sweep's runs: in this process, as a local process pool, or as a job
list for a scheduler; and what a run's folder says about it (finished, failed, held elsewhere).

Every run has its own folder WORKDIR/init=<name>/frac=<f>/seed=<s> (`run_dir`). A run whose
results.json says finished is never started again; a failed one (exception or non-zero exit) is
recorded in its folder (sweep_error.txt) and retried on the next call; a run whose workdir lock
another process holds is "running elsewhere", not failed: the sweep goes on with the other runs
and then waits for it (every HELD_RUN_POLL_S seconds). The Ray executor (experiments/sweep_ray.py)
starts the same `run_command` and reads its exit the same way (`exit_outcome`).

Imports no JAX (`run_in_process` loads the fine-tuning trainer when it is called).
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Sequence

import ml_collections

from experiments import sweep_plan
from data_pipelines import storage
from remedis_jax import compilation_cache, run_files, workdir_lock

JOBS_FILE = "jobs.txt"
ERROR_FILE = "sweep_error.txt"
LOG_FILE = "log.txt"
CACHE_SUBDIR = ".jax_cache"
# How often a URL workdir's log.txt is refreshed from a running subprocess's local log file.
LOG_UPLOAD_INTERVAL_S = 60.0
# How often a run that another process holds (running elsewhere) is checked again.
HELD_RUN_POLL_S = 10.0


def _flag_value(value: Any) -> str:
  """A config value as ml_collections.config_flags parses it back."""
  if isinstance(value, (tuple, list)):
    return repr(tuple(value))
  if isinstance(value, float):
    return repr(value)
  return str(value)


def run_command(sweep_config: ml_collections.ConfigDict, run: sweep_plan.Run, workdir: str, *,
                python: str = sys.executable) -> list[str]:
  """argv of `python -m remedis_jax.main` for one run (to be started in the repository root,
  sweep_plan.REPO_ROOT)."""
  base = sweep_plan.resolve_config_path(sweep_config.base)
  argv = [python, "-m", "remedis_jax.main", f"--config={base}",
          f"--workdir={storage.absolute(run_dir(workdir, run))}"]
  argv += [f"--config.{key}={_flag_value(value)}" for key, value in run.overrides]
  return argv


# -------------------------------------------------------------------------------- running
RUNNING_ELSEWHERE = "running elsewhere"


@dataclasses.dataclass
class RunOutcome:
  run: sweep_plan.Run
  status: str  # "finished" | "skipped" (finished before) | "failed" | "interrupted"
  wall_time_s: float = 0.0
  error: str = ""


class _HeldRuns:
  """Runs that another process holds: reported once each, checked again after a wait."""

  def __init__(self, num_runs: int, log):
    self._num_runs, self._log, self._reported = num_runs, log, set()

  def report(self, i: int, run: sweep_plan.Run, holder: str) -> None:
    if i not in self._reported:
      self._reported.add(i)
      self._log(f"[{i + 1}/{self._num_runs}] {run.run_id}: {RUNNING_ELSEWHERE} ({holder}); "
                "not failed: the sweep goes on and waits for it")

  def finished_elsewhere(self, i: int, run: sweep_plan.Run) -> RunOutcome:
    self._log(f"[{i + 1}/{self._num_runs}] {run.run_id}: finished by another process")
    return RunOutcome(run, "finished")

  def claim(self, i: int, run: sweep_plan.Run, path: str, outcomes: dict[int, RunOutcome]
            ) -> bool:
    """Whether this sweep may start the run now: False when another process finished it since
    the sweep started (its outcome is recorded) or holds it (reported; look again later)."""
    if is_finished(path):
      outcomes[i] = self.finished_elsewhere(i, run)
      return False
    holder = workdir_lock.holder(path)
    if holder is not None:
      self.report(i, run, holder)
      return False
    return True


def run_dir(workdir: str, run: sweep_plan.Run) -> str:
  return storage.join(workdir, run.run_id)


def is_finished(path: str) -> bool:
  """Whether RUN_DIR/results.json exists and says finished (one read, also on a URL)."""
  try:
    return bool(storage.read_json(storage.join(path, run_files.RESULTS_FILE)).get("finished"))
  except (FileNotFoundError, IsADirectoryError, NotADirectoryError, ValueError):
    return False  # absent, or cut short by a killed writer (a local file): not finished


def compilation_cache_dir(workdir: str) -> str:
  """JAX_COMPILATION_CACHE_DIR when set (e.g. by the tests), else WORKDIR/.jax_cache."""
  return os.environ.get("JAX_COMPILATION_CACHE_DIR") or storage.join(
      storage.absolute(workdir), CACHE_SUBDIR)


def enable_compilation_cache(cache_dir: str) -> None:
  """Turns on JAX's persistent compilation cache in this process (if not configured already):
  the sweep's runs share one cache, in-process or in subprocesses (JAX_COMPILATION_CACHE_DIR)."""
  compilation_cache.enable(cache_dir)


def record_failure(path: str, error: str) -> None:
  """RUN_DIR/sweep_error.txt: why the run failed (reported, and retried by the next sweep)."""
  storage.makedirs(path)
  storage.write_text(storage.join(path, ERROR_FILE), error)


def clear_failure(path: str) -> None:
  """Removes RUN_DIR/sweep_error.txt (an earlier attempt's) once the run has finished."""
  error_path = storage.join(path, ERROR_FILE)
  if storage.exists(error_path):
    storage.remove(error_path)


def failed_outcome(run: sweep_plan.Run, path: str, elapsed: float, error: str) -> RunOutcome:
  """A failed run: the error is recorded in its folder and reported, never dropped."""
  record_failure(path, error)
  return RunOutcome(run, "failed", elapsed, error.strip())


def exit_outcome(run: sweep_plan.Run, path: str, returncode: int | None, elapsed: float
                 ) -> RunOutcome | None:
  """The outcome of a run's process that exited with 0 or EXIT_PREEMPTED; None otherwise.

  Args:
    run: the run.
    path: its folder.
    returncode: the exit status of its `python -m remedis_jax.main` process.
    elapsed: its wall time in seconds.

  Returns:
    "finished" (results.json says so; an earlier failure record is removed), "interrupted"
    (saved on SIGTERM, not finished: the rerun resumes it), or None for any other exit status
    (the caller tells a failure from a run another process held).
  """
  if returncode == 0 and is_finished(path):
    clear_failure(path)
    return RunOutcome(run, "finished", elapsed)
  if returncode in (0, run_files.EXIT_PREEMPTED):
    return RunOutcome(run, "interrupted", elapsed)
  return None


def run_in_process(sweep_config: ml_collections.ConfigDict, runs: Sequence[sweep_plan.Run],
                   workdir: str, log) -> list[RunOutcome]:
  """Runs `runs` one after another in this process (`train_finetune.train_and_evaluate`).

  A run another process holds is waited for; a preempted run (SIGTERM) stops the sweep.

  Returns:
    The outcomes, in the order of `runs`.
  """
  from remedis_jax import train_finetune  # pylint: disable=g-import-not-at-top
  base = sweep_plan.load_config_file(sweep_config.base)
  outcomes: dict[int, RunOutcome] = {}
  held = _HeldRuns(len(runs), log)
  ready, waiting = list(enumerate(runs)), []
  while ready or waiting:
    if not ready:  # only runs held by other processes are left: wait, then look again
      time.sleep(HELD_RUN_POLL_S)
      ready, waiting = waiting, []
    i, run = ready.pop(0)
    path = run_dir(workdir, run)
    if not held.claim(i, run, path, outcomes):
      if i not in outcomes:  # held by another process: look again after the others
        waiting.append((i, run))
      continue
    log(f"[{i + 1}/{len(runs)}] {run.run_id}: fine-tuning -> {path}")
    start = time.time()
    try:
      results = train_finetune.train_and_evaluate(
          sweep_plan.build_run_config(sweep_config, run, base), path)
    except workdir_lock.WorkdirInUseError as e:  # taken by another process since the probe
      held.report(i, run, str(e))
      waiting.append((i, run))
      continue
    except Exception:  # pylint: disable=broad-except
      # One bad run must not lose the others; it is recorded and reported, never dropped.
      error = traceback.format_exc()
      outcomes[i] = failed_outcome(run, path, time.time() - start, error)
      log(f"[{i + 1}/{len(runs)}] {run.run_id}: FAILED ({error.strip().splitlines()[-1]}); "
          f"traceback in {storage.join(path, ERROR_FILE)}")
      continue
    status = "finished" if results.get("finished") else "interrupted"
    if status == "finished":
      clear_failure(path)
    outcomes[i] = RunOutcome(run, status, time.time() - start)
    log(f"[{i + 1}/{len(runs)}] {run.run_id}: {status} in {time.time() - start:.1f} s")
    if status == "interrupted":
      # The run saved and returned on a preemption notice (SIGTERM): this process is asked to
      # stop, so no further run starts; the rerun resumes this one and then the rest.
      log(f"Preempted: {len(runs) - len(outcomes)} run(s) not started; rerun the sweep to "
          "resume.")
      break
  return [outcomes[i] for i in sorted(outcomes)]


class RunLog:
  """Where a subprocess's stdout and stderr go: RUN_DIR/log.txt, appended across attempts.

  A local log.txt is the subprocess's own output file. An object (a URL) cannot be appended to
  or streamed into, so there the subprocess writes a local temporary file; `upload` writes the
  object as what it held before this attempt followed by the temporary file so far (called
  every LOG_UPLOAD_INTERVAL_S and at the end), and `close` uploads a last time and deletes the
  temporary file (kept if that upload fails).
  """

  def __init__(self, path: str):
    self.path = path
    self.remote = storage.is_url(path)
    if self.remote:
      try:  # earlier attempts of the run (a retry after a failure, a resumed run) stay in front
        self._earlier = storage.read_bytes(path)
      except FileNotFoundError:
        self._earlier = b""
      fd, self.local_path = tempfile.mkstemp(prefix="remedis_sweep_log_", suffix=".txt")
      self.file = os.fdopen(fd, "wb")
    else:
      storage.makedirs(storage.dirname(path))
      self.local_path = path
      self.file = open(path, "ab")  # pylint: disable=consider-using-with
    self.last_upload = time.time()

  def upload(self) -> None:
    """Refreshes a URL's log.txt (the subprocess writes the file itself: nothing to flush)."""
    if self.remote:
      with open(self.local_path, "rb") as f:
        storage.write_bytes(self.path, self._earlier + f.read())
      self.last_upload = time.time()

  def tail(self, num_lines: int) -> str:
    with open(self.local_path, encoding="utf-8", errors="replace") as f:
      return "".join(f.readlines()[-num_lines:])

  def close(self) -> None:
    if self.file.closed:
      return
    self.file.close()
    if self.remote:
      self.upload()
      os.remove(self.local_path)


def run_subprocesses(sweep_config: ml_collections.ConfigDict, runs: Sequence[sweep_plan.Run],
                     workdir: str, parallel: int, cache_dir: str, python: str, log
                     ) -> list[RunOutcome]:
  """Runs `runs` as at most `parallel` local `python -m remedis_jax.main` processes at a time.

  A run another process holds is looked at again every HELD_RUN_POLL_S seconds; stopping the
  sweep (an exception, Ctrl-C) terminates its own children only.

  Returns:
    The outcomes, in the order of `runs`.
  """
  env = dict(os.environ)
  env.setdefault("JAX_COMPILATION_CACHE_DIR", cache_dir)
  env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
  repo = sweep_plan.REPO_ROOT
  env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
  pending = [(i, run, 0.0) for i, run in enumerate(runs)]  # (index, run, not before)
  active: dict[int, tuple[subprocess.Popen, sweep_plan.Run, float, RunLog]] = {}
  outcomes: dict[int, RunOutcome] = {}
  held = _HeldRuns(len(runs), log)
  try:
    while pending or active:
      now = time.time()
      for entry in [e for e in pending if e[2] <= now]:
        if len(active) >= parallel:
          break
        pending.remove(entry)
        i, run, _ = entry
        path = run_dir(workdir, run)
        if not held.claim(i, run, path, outcomes):
          if i not in outcomes:  # held by another process: look again later
            pending.append((i, run, now + HELD_RUN_POLL_S))
          continue
        storage.makedirs(path)
        run_log = RunLog(storage.join(path, LOG_FILE))
        process = subprocess.Popen(run_command(sweep_config, run, workdir, python=python),
                                   cwd=repo, env=env, stdout=run_log.file,
                                   stderr=subprocess.STDOUT)
        active[i] = (process, run, time.time(), run_log)
        where = (f"{run_log.local_path}, uploaded to {run_log.path}" if run_log.remote
                 else run_log.path)
        log(f"[{i + 1}/{len(runs)}] {run.run_id}: started (pid {process.pid}, log {where})")
      time.sleep(0.2)
      for process, _, _, run_log in active.values():
        if (process.poll() is None
            and time.time() - run_log.last_upload >= LOG_UPLOAD_INTERVAL_S):
          run_log.upload()
      for i in [i for i, (p, *_) in active.items() if p.poll() is not None]:
        process, run, start, run_log = active.pop(i)
        path, elapsed = run_dir(workdir, run), time.time() - start
        tail = run_log.tail(25) if process.returncode != 0 else ""
        run_log.close()
        outcome = exit_outcome(run, path, process.returncode, elapsed)
        if outcome is not None:
          outcomes[i] = outcome
        elif is_finished(path):  # another process held and finished it
          outcomes[i] = held.finished_elsewhere(i, run)
          continue
        elif "WorkdirInUseError" in tail or workdir_lock.holder(path) is not None:
          # Taken by another process between the probe and the start: not a failure.
          held.report(i, run, workdir_lock.holder(path) or "it was in use when this run started")
          pending.append((i, run, time.time() + HELD_RUN_POLL_S))
          continue
        else:
          error = f"exit status {process.returncode}; last lines of {LOG_FILE}:\n{tail}"
          outcomes[i] = failed_outcome(run, path, elapsed, error)
        log(f"[{i + 1}/{len(runs)}] {run.run_id}: {outcomes[i].status} in {elapsed:.1f} s")
  finally:
    for process, *_ in active.values():  # interrupted sweep: stop only our own children
      process.terminate()
    for process, _, _, run_log in active.values():
      try:
        process.wait(timeout=30)
      except subprocess.TimeoutExpired:
        pass
      run_log.close()  # what the stopped runs logged reaches a URL workdir too
  return [outcomes[i] for i in sorted(outcomes)]


# ------------------------------------------------------------------------------- job lists
def write_job_list(sweep_config: ml_collections.ConfigDict, runs: Sequence[sweep_plan.Run],
                   workdir: str, *, python: str = sys.executable) -> str:
  """WORKDIR/jobs.txt: one shell command per line (unfinished runs only).

  Each line is `cd <repo> && [env] python -m remedis_jax.main ...`; a line is independent of
  the others, so any scheduler can run them in any order or all at once.

  Returns:
    The path of the job list.
  """
  workdir = storage.absolute(workdir)
  cache = f"JAX_COMPILATION_CACHE_DIR={shlex.quote(compilation_cache_dir(workdir))}"
  lines = [f"cd {shlex.quote(sweep_plan.REPO_ROOT)} && {cache} "
           + " ".join(shlex.quote(a) for a in run_command(sweep_config, r, workdir, python=python))
           for r in runs if not is_finished(run_dir(workdir, r))]
  path = storage.join(workdir, JOBS_FILE)
  storage.write_text(path, "".join(line + "\n" for line in lines))
  return path


def slurm_hint(jobs_path: str, num_jobs: int, sweep_spec: str, workdir: str) -> str:
  """How to run the job list: a SLURM array, or xargs on this machine; then aggregate."""
  if storage.is_url(jobs_path):  # sed and xargs read the job list from the store's CLI
    line = (f"gcloud storage cat {jobs_path} | sed -n \"${{SLURM_ARRAY_TASK_ID}}p\"")
    local = f"gcloud storage cat {jobs_path} | xargs -P 2 -I{{}} bash -c {{}}"
  else:
    line = f"sed -n \"${{SLURM_ARRAY_TASK_ID}}p\" {jobs_path}"
    local = f"xargs -P 2 -I{{}} bash -c {{}} < {jobs_path}"
  return (f"{num_jobs} jobs in {jobs_path}. With SLURM, one array task per line:\n"
          f"  sbatch --array=1-{num_jobs} --wrap 'bash -c \"$({line})\"'\n"
          f"or locally: {local}\n"
          f"Then: python -m experiments.label_fraction_sweep --config={sweep_spec} "
          f"--workdir={workdir} --mode=aggregate")


# ------------------------------------------------------------------ what a run's folder says
def run_status(workdir: str, run: sweep_plan.Run) -> str:
  """"finished" (results.json says so), "running elsewhere" (another process holds its lock),
  "failed" (sweep_error.txt), "unfinished" (the folder exists: interrupted or preempted) or
  "missing" (never started)."""
  path = run_dir(workdir, run)
  if is_finished(path):
    return "finished"
  if workdir_lock.holder(path) is not None:
    return RUNNING_ELSEWHERE
  if storage.isfile(storage.join(path, ERROR_FILE)):
    return "failed"
  return "unfinished" if storage.isdir(path) else "missing"


def unfinished_statuses(workdir: str, runs: Sequence[sweep_plan.Run]
                        ) -> tuple[dict[str, str], dict[str, str]]:
  """Why runs that have not finished did not, for a sweep that only aggregates.

  Args:
    workdir: the sweep's folder.
    runs: runs whose results.json does not say finished.

  Returns:
    ({run id: "running elsewhere", "failed" or "missing"}, {run id: the error of a failed run
    (its sweep_error.txt)}). A run another process holds is running elsewhere even when an
    earlier attempt left an error file.
  """
  status, failed = {}, {}
  for r in runs:
    if workdir_lock.holder(run_dir(workdir, r)) is not None:
      status[r.run_id] = RUNNING_ELSEWHERE
      continue
    try:
      failed[r.run_id] = storage.read_text(storage.join(run_dir(workdir, r), ERROR_FILE)).strip()
      status[r.run_id] = "failed"
    except FileNotFoundError:
      status[r.run_id] = "missing"
  return status, failed
