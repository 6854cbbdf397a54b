r"""Label-fraction sweep: fine-tune every (initialisation, label fraction, seed) and compare.

  python -m experiments.label_fraction_sweep --config=configs/sweeps/tiny.py \
    --workdir=workdirs/sweep_tiny [--parallel=2] [--mode=run|plan|joblist|aggregate]

The REMEDIS headline ("matches the supervised baseline with 1-33% of the labels") is the output
of this script: a grid over label fractions x initialisations x seeds of
`remedis_jax.train_finetune` runs, then one table and one plot.

The grid (sweep config, configs/sweeps/*.py):
  base                the fine-tuning config every run starts from, "configs/finetune.py:tiny".
  overrides           nested keys of the base config applied to every run (e.g. total_steps).
  init_overrides      init name -> nested keys applied to that init's runs only, after
                      `overrides` (e.g. a ViT init: init_overrides.gmml_vit.model.name=
                      "ViT-tiny/4", so scratch stays a ResNet); absent or empty: no change. A
                      name that is not in `inits`, or a key the grid sets itself (model.init,
                      label_fraction, label_fraction_seed, seed), is an error.
  label_fractions     shares of the training labels, each in (0, 1].
  seeds               one run per seed; a run uses it as `seed` (model init, augmentation, data
                      order) AND as `label_fraction_seed`, so every seed sees a different
                      labeled subset (nested across fractions within one seed). The std over
                      seeds therefore covers both optimisation noise and the choice of labels.
  inits               name -> `config.model.init`: "" (scratch), a BiT .npz, a pretraining
                      workdir, or an export folder, local or a URL (gs://...). Relative paths
                      are relative to the current directory and are made absolute before any
                      run starts; URLs are kept as they are.
  baseline            the init whose run at `baseline_fraction` (default: scratch at 100%) is the
                      reference; those runs are added to the grid if the fractions lack it.
  metric              "macro_auc" (column `auc`), "accuracy" or "balanced_accuracy".
  match_tolerance     an init "matches" the baseline at fraction f when its mean metric over
                      seeds at f is >= the baseline's mean - match_tolerance (0: no worse).
  finetune_mode       "" (the base config's), "full" or "linear".

Every run has its own folder WORKDIR/init=<name>/frac=<f>/seed=<s> (the run id). A run whose
results.json exists is skipped without starting anything; an interrupted one resumes from its
checkpoint (the fine-tuning trainer does that); a failed one (exception or non-zero exit) is
recorded in its folder (sweep_error.txt), reported in the summary and retried on the next call.
A run whose workdir lock another process holds (a second sweep on the same WORKDIR, or a job of
the job list) is "running elsewhere", not failed: it is reported, the sweep goes on with the
other runs and then waits for it (checking every sweep_run.HELD_RUN_POLL_S seconds); once its holder
finishes it, it counts as finished, and if the holder stops without finishing it, this sweep
runs it. Two sweeps on one WORKDIR thus share the grid and both end with every run finished.
The whole grid is checked (unknown init, fraction outside (0, 1], missing checkpoint, a typo in
`overrides`, bad test sets) before any run starts or any file is written.

Modes:
  run        train the grid here: sequentially in this process (--parallel=1) or as N local
             `python -m remedis_jax.main` processes; then aggregate.
  plan       print the grid (run ids and their status) and exit.
  joblist    write WORKDIR/jobs.txt, one shell command per unfinished run, for a scheduler
             (SLURM array example printed); afterwards `--mode=aggregate`.
  aggregate  read the finished runs and write the outputs below.

Outputs (sweep_results.py): WORKDIR/results.csv and results.json (one row per run and test set;
mean/std over seeds per cell, std with ddof=1, 0 for one seed, and the 95% Student-t interval
of the mean; per init, fraction and test set the paired difference to the baseline at the same
fraction, seed by seed, with its 95% interval), data_efficiency.png (metric vs % labels on a
log axis, one line per init with +-1 std error bars, one panel per test set, the baseline as a
dashed line) and summary.md (the smallest label fraction at which each init matches the
baseline, the grid of cells, and the paired differences).

Object stores: WORKDIR and the inits may be URLs (gs://bucket/sweep); every file of the sweep
goes through data_pipelines/storage.py, so a URL is never turned into a local path. An object
cannot grow while a subprocess writes it, so with --parallel=N and a URL workdir each run's
stdout and stderr go to a local temporary file (its path is printed), which is uploaded to
WORKDIR/<run>/log.txt every sweep_run.LOG_UPLOAD_INTERVAL_S seconds and when the run ends,
after what earlier attempts of the run logged there; the temporary file is then deleted. A
local WORKDIR gets log.txt appended to directly.

Compilation: every run of a grid compiles the same programs (same model, same batch shapes);
the sweep shares a persistent JAX compilation cache (WORKDIR/.jax_cache unless
JAX_COMPILATION_CACHE_DIR is set; a gs:// cache works too) so only the first run pays for XLA.

Code: this file is the command line and `run_sweep`, which calls
  experiments/sweep_plan.py     the grid of runs from the sweep config, and its checks;
  experiments/sweep_run.py      running the runs (this process, a local process pool, job lists)
                                and what a run's folder says (finished, failed, held elsewhere);
  experiments/sweep_ray.py      the Ray executor, built on sweep_run's pieces;
  experiments/sweep_results.py  the aggregation: rows, cells, intervals, tables, plot.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import ml_collections

from experiments import sweep_plan, sweep_results, sweep_run
from data_pipelines import storage
from remedis_jax import run_files

MODES = ("run", "plan", "joblist", "aggregate")
EXECUTORS = ("local", "ray")


def run_sweep(sweep_config: ml_collections.ConfigDict, workdir: str, *, parallel: int = 1,
              mode: str = "run", python: str = sys.executable, verbose: bool = True,
              title: str = "", sweep_spec: str = "", executor: str = "local",
              ray_address: str = "", ray_resources=None) -> dict[str, Any]:
  """Plans, validates, runs and aggregates a label-fraction sweep.

  Args:
    sweep_config: a sweep config (module docstring; configs/sweeps/*.py).
    workdir: the sweep's folder, local or a URL (gs://...); one subfolder per run. Rerunning
      skips finished runs.
    parallel: 1 = sequential in this process; N > 1 = N `python -m remedis_jax.main` processes
      (with executor="ray" and no ray_address: a local Ray instance with N CPUs).
    mode: "run", "plan", "joblist" or "aggregate" (module docstring).
    python: the interpreter for subprocesses and job lists.
    verbose: print progress and where the outputs are.
    title: a title for the table and the plot (default: the base config).
    sweep_spec: how the user named the sweep config (for the printed aggregate command).
    executor: "local" (this process, or the built-in process pool) or "ray" (each run a Ray
      task: experiments/sweep_ray.py).
    ray_address: "" = start a local Ray instance; "auto" or an address = join that cluster.
    ray_resources: a `sweep_ray.Resources` (CPUs, GPUs, TPU chips per run); default 1 CPU.

  Returns:
    A summary: {"mode", "workdir", "num_runs", "counts" (status -> runs), "runs" (run id ->
    status), "failed" (run id -> error), "wall_time_s"} plus, after aggregation, the
    sweep_results.write_outputs keys ("results_csv", "results_json", "plot", "table",
    "table_file", "matches", "cells"); with mode="joblist": "jobs_file".

  Raises:
    ValueError / KeyError / TypeError / FileNotFoundError: a bad sweep config, before anything
      is written.
  """
  start = time.time()
  log = print if verbose else (lambda *a, **k: None)
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}; expected one of {MODES}")
  if int(parallel) < 1:
    raise ValueError(f"parallel={parallel} must be >= 1 (1 = in this process)")
  if executor not in EXECUTORS:
    raise ValueError(f"executor={executor!r}; expected one of {EXECUTORS}")
  runs = sweep_plan.validate(sweep_config, check_runs=mode != "aggregate")
  workdir = storage.absolute(workdir)
  status = {r.run_id: "finished" if sweep_run.is_finished(sweep_run.run_dir(workdir, r))
            else "pending" for r in runs}
  summary: dict[str, Any] = {"mode": mode, "workdir": workdir, "num_runs": len(runs)}
  if mode == "plan":
    for r in runs:
      log(f"  {r.run_id:40s} {status[r.run_id]}")
    log(f"{len(runs)} runs, {sum(s == 'finished' for s in status.values())} finished")
    summary.update(runs=status, counts=_counts(status), failed={}, wall_time_s=0.0)
    return summary
  storage.makedirs(workdir)
  sweep_plan.write_plan(sweep_config, runs, workdir)

  if mode == "joblist":
    path = sweep_run.write_job_list(sweep_config, runs, workdir, python=python)
    num_jobs = sum(s != "finished" for s in status.values())
    log(sweep_run.slurm_hint(path, num_jobs, sweep_spec or "<sweep config>", workdir))
    summary.update(jobs_file=path, runs=status, counts=_counts(status), failed={},
                   wall_time_s=time.time() - start)
    return summary

  failed: dict[str, str] = {}
  if mode == "run":
    todo = [r for r in runs if status[r.run_id] != "finished"]
    for r in runs:
      if status[r.run_id] == "finished":
        status[r.run_id] = "skipped"
    where = ("as Ray tasks" if executor == "ray" else
             "in this process" if parallel == 1 else f"in {parallel} processes")
    log(f"Sweep {workdir}: {len(runs)} runs, {len(runs) - len(todo)} already finished (skipped), "
        f"{len(todo)} to run {where}")
    cache_dir = sweep_run.compilation_cache_dir(workdir)
    if todo and executor == "ray":
      from experiments import sweep_ray  # pylint: disable=g-import-not-at-top
      outcomes = sweep_ray.run(sweep_config, todo, workdir, parallel=int(parallel),
                               address=ray_address,
                               resources=ray_resources or sweep_ray.Resources(),
                               cache_dir=cache_dir, python=python, log=log)
    elif todo and parallel == 1:
      sweep_run.enable_compilation_cache(cache_dir)
      outcomes = sweep_run.run_in_process(sweep_config, todo, workdir, log)
    elif todo:
      outcomes = sweep_run.run_subprocesses(sweep_config, todo, workdir, int(parallel),
                                            cache_dir, python, log)
    else:
      outcomes = []
    for outcome in outcomes:
      status[outcome.run.run_id] = outcome.status
      if outcome.status == "failed":
        failed[outcome.run.run_id] = outcome.error
    for run_id in list(failed):  # finished by another process after this one's attempt failed
      if sweep_run.is_finished(storage.join(workdir, run_id)):
        status[run_id] = "finished"
        del failed[run_id]
  else:  # aggregate
    unfinished, failed = sweep_run.unfinished_statuses(
        workdir, [r for r in runs if status[r.run_id] != "finished"])
    status.update(unfinished)

  rows = sweep_results.collect_rows(workdir, runs, failed)
  outputs = sweep_results.write_outputs(
      rows, workdir, metric=sweep_config.metric, baseline=sweep_config.baseline,
      baseline_fraction=float(sweep_config.baseline_fraction),
      tolerance=float(sweep_config.match_tolerance), inits=list(sweep_config.inits.keys()),
      title=title or f"{sweep_config.base}", sweep_config=sweep_config.to_dict(),
      run_status=status)
  summary.update(outputs)
  summary.update(runs=status, counts=_counts(status), failed=failed,
                 wall_time_s=time.time() - start)
  log("\n" + outputs["table"])
  log(f"\nResults: {outputs['results_csv']}\n         {outputs['results_json']}\n"
      f"Plot:    {outputs['plot']}\nTable:   {outputs['table_file']}")
  if failed:
    log(f"{len(failed)} run(s) FAILED: {', '.join(failed)} (see {sweep_run.ERROR_FILE} in their "
        "folders; rerun the same command to retry them)")
  return summary


def _counts(status: dict[str, str]) -> dict[str, int]:
  counts: dict[str, int] = {}
  for s in status.values():
    counts[s] = counts.get(s, 0) + 1
  return counts


# ------------------------------------------------------------------------------------ CLI
def main(argv):
  from absl import flags, logging  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  flag_values = flags.FLAGS
  logging.set_verbosity(logging.WARNING)
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  summary = run_sweep(flag_values.config, flag_values.workdir, parallel=flag_values.parallel,
                      mode=flag_values.mode,
                      sweep_spec=config_flags.get_config_filename(flag_values["config"]),
                      **executor_options(flag_values))
  if summary["mode"] == "joblist":
    print(f"Job list: {summary['jobs_file']}")
  if summary.get("failed"):
    sys.exit(1)
  if summary.get("counts", {}).get("interrupted"):  # a run was preempted and saved
    sys.exit(run_files.EXIT_PREEMPTED)


def define_flags(default_config: str | None = None) -> None:
  """The CLI flags (shared with experiments/ood_study.py)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", default_config, "Sweep config "
                                  "(configs/sweeps/*.py).", lock_config=True)
  flags.DEFINE_string("workdir", None, "The sweep's folder (one subfolder per run); a local "
                      "path or a URL (gs://bucket/sweep).")
  flags.DEFINE_integer("parallel", 1, "1: runs in this process, one after another; N > 1: N "
                       "local `python -m remedis_jax.main` processes.")
  flags.DEFINE_enum("mode", "run", list(MODES), "run | plan | joblist | aggregate.")
  flags.DEFINE_enum("executor", "local", list(EXECUTORS), "local: this process or --parallel "
                    "local processes; ray: one Ray task per run (experiments/sweep_ray.py).")
  flags.DEFINE_string("ray_address", "", "With --executor=ray: '' starts a local Ray instance "
                      "with --parallel CPUs; 'auto' (under `ray job submit`) or an address joins "
                      "that cluster.")
  flags.DEFINE_float("ray_cpus_per_run", 1.0, "CPUs each run asks of Ray.")
  flags.DEFINE_float("ray_gpus_per_run", 0.0, "GPUs each run asks of Ray.")
  flags.DEFINE_float("ray_tpus_per_run", 0.0, "TPU chips each run asks of Ray (the 'TPU' "
                     "resource).")
  flags.mark_flags_as_required(["config", "workdir"])


def executor_options(flag_values) -> dict[str, Any]:
  """run_sweep's executor keywords from the flags of `define_flags`."""
  if flag_values.executor != "ray":
    return {"executor": flag_values.executor}
  from experiments import sweep_ray  # pylint: disable=g-import-not-at-top
  return {"executor": "ray", "ray_address": flag_values.ray_address,
          "ray_resources": sweep_ray.Resources(cpus=flag_values.ray_cpus_per_run,
                                               gpus=flag_values.ray_gpus_per_run,
                                               tpus=flag_values.ray_tpus_per_run)}


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  define_flags()
  app.run(main)
