"""experiments/sweep_ray.py: a sweep's runs as Ray tasks on a local Ray instance (2 CPUs).

A real `configs/finetune.py:smoke` run killed after its first checkpoint fails, the rerun
resumes it from that checkpoint, and the results.csv equals the in-process sweep's
(`--parallel=1`); stand-in runs (a fake interpreter) show Ray never runs more at once than its
CPUs allow, from the start and end times each task records.
"""

import csv
import json
import os
import stat
import sys

import ml_collections
import pytest

from configs.sweeps import common as sweep_configs
from experiments import label_fraction_sweep as sweep
from experiments import sweep_plan
from experiments import sweep_run
from remedis_jax import run_files

ray = pytest.importorskip("ray", reason="the Ray executor needs ray (the dev extra installs it)")
from experiments import sweep_ray  # pylint: disable=g-import-not-at-top,wrong-import-position

NUM_CPUS = 2


@pytest.fixture(scope="module")
def local_ray():
  """One local Ray instance for the module (a start costs seconds); the sweeps reuse it."""
  ray.init(num_cpus=NUM_CPUS, include_dashboard=False, log_to_driver=False,
           runtime_env={"env_vars": {"PYTHONPATH": sweep_plan.REPO_ROOT}})
  yield
  ray.shutdown()


def tiny_sweep(seeds=(0, 1)):
  config = sweep_configs.default_sweep_config()
  config.base = "configs/finetune.py:smoke"
  config.inits = ml_collections.ConfigDict({"scratch": ""})
  config.label_fractions = (0.5,)
  config.seeds = tuple(seeds)
  config.baseline = "scratch"
  config.baseline_fraction = 0.5
  config.overrides = ml_collections.ConfigDict({
      "robustness": {"perturbations": ()}, "test_sets": ("in_distribution=test@A",),
      "checkpoint_every_steps": 1, "mesh": {"devices": 1}})
  return config


def sweep_results_json(run_dir):
  with open(os.path.join(run_dir, run_files.RESULTS_FILE), encoding="utf-8") as f:
    return json.load(f)


def results_rows(workdir):
  """results.csv without the columns that differ between two sweeps of the same runs."""
  with open(os.path.join(workdir, "results.csv"), encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  for row in rows:
    for key in ("run_dir", "wall_time_s"):
      row.pop(key, None)
  return rows


# Runs the real entry point, but kills the run of seed {seed} (SIGKILL, no chance to save) as
# soon as its first checkpoint is complete (Orbax renames a finished step folder to its number).
KILLING_PYTHON = r"""#!{python}
import os, subprocess, sys, time
flags = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--"))
if flags.get("config.seed") != "{seed}":
  os.execv({python!r}, [{python!r}, *sys.argv[1:]])
process = subprocess.Popen([{python!r}, *sys.argv[1:]])
checkpoints = os.path.join(flags["workdir"], "checkpoints")
while process.poll() is None:
  if os.path.isdir(checkpoints) and any(n.isdigit() for n in os.listdir(checkpoints)):
    process.kill()
    process.wait()
    sys.exit(137)
  time.sleep(0.05)
sys.exit(process.returncode)
"""


def executable(path, text):
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)
  return str(path)


@pytest.mark.slow
def test_ray_sweep_matches_the_in_process_sweep_and_resumes_a_killed_run(local_ray, tmp_path):
  # One run (each real run costs seconds of CPU): killed, then resumed, it must end where the
  # in-process sweep's run ends.
  config = tiny_sweep(seeds=(0,))
  reference = str(tmp_path / "in_process")
  summary = sweep.run_sweep(config, reference, parallel=1, verbose=False)
  assert summary["counts"] == {"finished": 1}

  workdir = str(tmp_path / "ray")
  killing = executable(tmp_path / "killing_python",
                       KILLING_PYTHON.format(python=sys.executable, seed=0))
  summary = sweep.run_sweep(config, workdir, executor="ray", python=killing, verbose=False)
  assert summary["counts"] == {"failed": 1}
  killed = "init=scratch/frac=0.5/seed=0"
  assert summary["failed"][killed].startswith("exit status 137")
  assert os.path.exists(os.path.join(workdir, killed, sweep_run.ERROR_FILE))
  tasks = sweep_ray.read_task_records(workdir, sweep_plan.plan_runs(config))
  assert [r["returncode"] for r in tasks.values()] == [137]

  # The rerun resumes the killed run from its checkpoint and finishes it.
  again = sweep.run_sweep(config, workdir, executor="ray", verbose=False)
  assert again["counts"] == {"finished": 1} and not again["failed"]
  results = sweep_results_json(os.path.join(workdir, killed))
  assert results["initialisation"].startswith("resumed from")
  assert not os.path.exists(os.path.join(workdir, killed, sweep_run.ERROR_FILE))
  assert results_rows(workdir) == results_rows(reference)


# Stands in for `python -m remedis_jax.main`: half a second of "training", then results.json.
SLEEPING_PYTHON = r"""#!{python}
import json, os, sys, time
flags = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--"))
time.sleep(0.5)
with open(os.path.join(flags["workdir"], "results.json"), "w") as f:
  json.dump({{"finished": True, "test_sets": {{
      "in_distribution": {{"metrics": {{"macro_auc": 0.7}}}}}}}}, f)
"""


def test_ray_never_runs_more_runs_at_once_than_its_cpus(local_ray, tmp_path):
  config = tiny_sweep(seeds=(0, 1, 2, 3, 4))
  python = executable(tmp_path / "sleeping_python", SLEEPING_PYTHON.format(python=sys.executable))
  workdir = str(tmp_path / "sweep")
  summary = sweep.run_sweep(config, workdir, executor="ray", python=python, verbose=False)
  assert summary["counts"] == {"finished": 5}
  tasks = sweep_ray.read_task_records(workdir, sweep_plan.plan_runs(config))
  assert len(tasks) == 5
  events = sorted([(r["start"], 1) for r in tasks.values()] + [(r["end"], -1)
                                                               for r in tasks.values()])
  running, most = 0, 0
  for _, change in events:  # an end at the same instant as a start counts first
    running += change
    most = max(most, running)
  assert most <= NUM_CPUS
  with pytest.raises(ValueError, match="executor='dask'"):
    sweep.run_sweep(config, workdir, executor="dask", verbose=False)
