r"""Runs a sweep's fine-tuning runs as Ray tasks: on this machine's cores or on a Ray cluster.

  python -m experiments.label_fraction_sweep --config=configs/sweeps/quickstart_pneumoniamnist.py \
    --workdir=workdirs/sweep --executor=ray --parallel=4           # local Ray, 4 runs at once
  ray job submit --working-dir . -- python -m experiments.label_fraction_sweep \
    --config=configs/sweeps/paper.py --workdir=gs://bucket/sweep --executor=ray \
    --ray_address=auto --ray_gpus_per_run=1                       # a Ray cluster (GPU VMs)

Each run is one Ray task that starts the run's `python -m remedis_jax.main` command (the same
command as a job-list line) in the repository root of the node that runs it, with the sweep's
compilation cache, and streams its output to RUN_DIR/log.txt (uploaded when the workdir is a
URL). A task asks for `ray_cpus_per_run` CPUs and `ray_gpus_per_run` GPUs (`ray_tpus_per_run`
TPU chips, the "TPU" resource of KubeRay's TPU node pools), so Ray never runs more at once
than the resources allow: locally `ray.init(num_cpus=parallel)` with one CPU per run gives at
most `parallel` runs at a time. On a cluster the workdir must be reachable from every node (a
bucket, or a shared file system), as it is for SLURM.

Each task also writes RUN_DIR/ray_task.json (node, pid, start and end time, exit status), so a
sweep shows where and when each run went. A run that fails, is preempted or whose node is lost
is reported and not retried within the sweep; rerunning the sweep resumes it from its last
checkpoint, like every other executor.

The built-in process pool (`--parallel=N` without `--executor`) stays the default: it needs no
Ray (a 200 MB install and a few seconds of start-up), and it also waits for runs that another
sweep process holds. Ray is for sweeps larger than one machine.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from typing import Any, Sequence

from experiments import sweep_plan, sweep_run
from data_pipelines import storage
from remedis_jax import workdir_lock

TASK_FILE = "ray_task.json"
UPLOAD_INTERVAL_S = 30.0


@dataclasses.dataclass(frozen=True)
class Resources:
  """What one run asks of Ray."""
  cpus: float = 1.0
  gpus: float = 0.0
  tpus: float = 0.0

  def options(self) -> dict[str, Any]:
    out: dict[str, Any] = {"num_cpus": self.cpus, "num_gpus": self.gpus, "max_retries": 0}
    if self.tpus:
      out["resources"] = {"TPU": self.tpus}
    return out


def execute(args: Sequence[str], python: str, env_updates: dict[str, str], run_path: str
            ) -> dict[str, Any]:
  """The Ray task: one run's command, its log, and RUN_DIR/ray_task.json.

  Args:
    args: the command after the interpreter (`-m remedis_jax.main --config=... ...`).
    python: the driver's interpreter; the node's own (`sys.executable`) where that path does
      not exist.
    env_updates: variables for the run (the compilation cache).
    run_path: the run's folder (local or a URL).
  """
  repo = sweep_plan.REPO_ROOT  # the node's own copy under `ray job submit --working-dir`
  python = python if os.path.exists(python) else sys.executable
  env = dict(os.environ)
  env.update(env_updates)
  env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
  storage.makedirs(run_path)
  run_log = sweep_run.RunLog(storage.join(run_path, sweep_run.LOG_FILE))
  record: dict[str, Any] = {"node": socket.gethostname(), "start": time.time()}
  process = subprocess.Popen([python, *args], cwd=repo, env=env, stdout=run_log.file,
                             stderr=subprocess.STDOUT)
  record["pid"] = process.pid
  storage.write_json(storage.join(run_path, TASK_FILE), record)
  try:
    while process.poll() is None:
      time.sleep(0.2)
      if run_log.remote and time.time() - run_log.last_upload >= UPLOAD_INTERVAL_S:
        run_log.upload()
  except BaseException:  # the task was cancelled (the sweep stopped): the run saves and exits
    process.terminate()
    try:
      process.wait(timeout=60)
    except subprocess.TimeoutExpired:
      process.kill()
    raise
  finally:
    record.update(end=time.time(), returncode=process.returncode)
    record["tail"] = run_log.tail(25) if process.returncode not in (0, None) else ""
    run_log.close()
    storage.write_json(storage.join(run_path, TASK_FILE), record)
  return record


def _start_ray(parallel: int, address: str, log) -> bool:
  """Connects to Ray; returns whether this call started a local instance (to shut it down)."""
  try:
    import ray  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("--executor=ray needs Ray: pip install -e '.[ray]' (or pip install "
                      "ray==2.60.0)") from e
  if ray.is_initialized():
    return False
  # Tasks import this module on the workers: locally from this checkout.
  runtime_env = {"env_vars": {"PYTHONPATH": sweep_plan.REPO_ROOT}}
  if address:
    ray.init(address=address, runtime_env=None if address == "auto" else runtime_env,
             log_to_driver=False)
    log(f"Ray: connected to {address} ({ray.cluster_resources()})")
    return False
  ray.init(num_cpus=parallel, include_dashboard=False, log_to_driver=False,
           runtime_env=runtime_env)
  log(f"Ray: started a local instance with {parallel} CPU(s)")
  return True


def run(sweep_config, runs: Sequence[sweep_plan.Run], workdir: str, *, parallel: int,
        address: str, resources: Resources, cache_dir: str, python: str, log
        ) -> list[sweep_run.RunOutcome]:
  """Runs `runs` as Ray tasks; returns their outcomes in the order of `runs`."""
  import ray  # pylint: disable=g-import-not-at-top
  started_here = _start_ray(parallel, address, log)
  task = ray.remote(execute).options(**resources.options())
  env_updates = {"JAX_COMPILATION_CACHE_DIR": os.environ.get("JAX_COMPILATION_CACHE_DIR")
                 or cache_dir,
                 "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"}
  refs: dict[Any, tuple[int, sweep_plan.Run]] = {}
  outcomes: dict[int, sweep_run.RunOutcome] = {}
  try:
    for i, r in enumerate(runs):
      path = sweep_run.run_dir(workdir, r)
      holder = workdir_lock.holder(path)
      if holder is not None:  # another sweep process holds it: not this sweep's to run
        outcomes[i] = sweep_run.RunOutcome(r, "failed", 0.0, f"held by another process "
                                           f"({holder}); rerun the sweep once it is done")
        log(f"[{i + 1}/{len(runs)}] {r.run_id}: {outcomes[i].error}")
        continue
      command = sweep_run.run_command(sweep_config, r, workdir, python=python)
      refs[task.remote(command[1:], command[0], env_updates, path)] = (i, r)
      log(f"[{i + 1}/{len(runs)}] {r.run_id}: queued ({resources})")
    pending = list(refs)
    while pending:
      done, pending = ray.wait(pending, num_returns=1)
      i, r = refs[done[0]]
      path = sweep_run.run_dir(workdir, r)
      try:
        record = ray.get(done[0])
      except ray.exceptions.RayError as e:  # the task or its node was lost
        record = {"returncode": None, "start": 0.0, "end": 0.0,
                  "tail": f"{type(e).__name__}: {str(e).strip().splitlines()[-1]}"}
      outcomes[i] = _outcome(r, path, record)
      log(f"[{i + 1}/{len(runs)}] {r.run_id}: {outcomes[i].status} in "
          f"{outcomes[i].wall_time_s:.1f} s" + (f" on {record['node']}" if "node" in record
                                                else ""))
  except BaseException:
    for ref in refs:  # stop what is still queued or running; the runs save on SIGTERM
      ray.cancel(ref)
    raise
  finally:
    if started_here:
      ray.shutdown()
  return [outcomes[i] for i in sorted(outcomes)]


def _outcome(r: sweep_plan.Run, path: str, record: dict[str, Any]) -> sweep_run.RunOutcome:
  code = record.get("returncode")
  elapsed = max(float(record.get("end", 0.0)) - float(record.get("start", 0.0)), 0.0)
  outcome = sweep_run.exit_outcome(r, path, code, elapsed)
  if outcome is not None:
    return outcome
  error = (f"exit status {code}; last lines of {sweep_run.LOG_FILE}:\n{record.get('tail', '')}"
           if code is not None else f"the Ray task was lost: {record.get('tail', '')}")
  return sweep_run.failed_outcome(r, path, elapsed, error)


def read_task_records(workdir: str, runs: Sequence[sweep_plan.Run]
                      ) -> dict[str, dict[str, Any]]:
  """{run id: RUN_DIR/ray_task.json} of the runs that have one."""
  out = {}
  for r in runs:
    path = storage.join(sweep_run.run_dir(workdir, r), TASK_FILE)
    if storage.exists(path):
      out[r.run_id] = json.loads(storage.read_text(path))
  return out
