"""Label-fraction sweep: grid planning, validation before anything is written, skipping finished
runs, failure accounting, aggregation vs NumPy, the "smallest matching fraction" rule, CSV/JSON/
PNG outputs, job lists that reproduce the in-process config. Real runs: the in-process real sweep
is test_gcs_sweep.py's (workdir and REMEDIS init in a bucket), a real run started by the parallel
mode test_robustness_report.py's."""

import csv
import json
import math
import os
import shlex
import stat
import sys

import ml_collections
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from configs import common, finetune as finetune_config
from configs.sweeps import common as sweep_configs
from experiments import label_fraction_sweep as sweep
from experiments import sweep_plan
from experiments import sweep_run
from experiments import sweep_results
from remedis_jax import run_files, train_finetune, workdir_lock


def write_fake_export(path, model_name="R_micro"):
  """An export folder that passes the cheap init check (model.json only, no weights)."""
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "model.json"), "w") as f:
    json.dump({"model_name": model_name}, f)
  return str(path)


def smoke_sweep(inits, fractions=(0.25, 0.5), seeds=(0,), baseline_fraction=0.5, **overrides):
  config = sweep_configs.default_sweep_config()
  config.base = "configs/finetune.py:smoke"
  config.inits = ml_collections.ConfigDict(dict(inits))
  config.label_fractions = tuple(fractions)
  config.seeds = tuple(seeds)
  config.baseline = "scratch"
  config.baseline_fraction = baseline_fraction
  config.overrides = ml_collections.ConfigDict({
      "robustness": {"perturbations": ()}, "test_sets": ("in_distribution=test@A",
                                                         "site_C=test@C")})
  for key, value in overrides.items():
    config[key] = value
  return config


# --------------------------------------------------------------------------- plan + validate
def test_plan_is_the_full_grid_plus_the_baseline_cell(tmp_path):
  bit = write_fake_export(tmp_path / "bit")
  config = smoke_sweep({"scratch": "", "bit": bit}, fractions=(0.1, 0.5), seeds=(0, 3),
                       baseline_fraction=1.0)
  runs = sweep_plan.plan_runs(config)
  ids = [r.run_id for r in runs]
  expected = [f"init={i}/frac={f}/seed={s}" for i in ("bit", "scratch") for f in ("0.1", "0.5")
              for s in (0, 3)]
  expected += ["init=scratch/frac=1/seed=0", "init=scratch/frac=1/seed=3"]
  assert sorted(ids) == sorted(expected) and len(set(ids)) == len(ids) == 10
  for run in runs:
    overrides = dict(run.overrides)
    # The label subset follows the seed: different labeled subsets per seed.
    assert overrides["seed"] == overrides["label_fraction_seed"] == run.seed
    assert overrides["label_fraction"] == run.label_fraction
    assert overrides["model.init"] == ("" if run.init == "scratch" else os.path.abspath(bit))
    assert overrides["test_sets"] == ("in_distribution=test@A", "site_C=test@C")
  sweep_plan.validate(config, runs)  # a good grid passes


def test_relative_init_paths_become_absolute(tmp_path, monkeypatch):
  write_fake_export(tmp_path / "exports" / "remedis")
  monkeypatch.chdir(tmp_path)
  config = smoke_sweep({"scratch": "", "remedis": "exports/remedis"})
  runs = sweep_plan.validate(config)
  assert {r.init_path for r in runs} == {"", str(tmp_path / "exports" / "remedis")}


@pytest.mark.parametrize("change, error, match", [
    (dict(label_fractions=(0.0, 0.5)), ValueError, r"every fraction must be in \(0, 1\]"),
    (dict(label_fractions=(0.5, 1.5)), ValueError, r"every fraction must be in \(0, 1\]"),
    (dict(label_fractions=()), ValueError, "label_fractions is empty"),
    (dict(seeds=()), ValueError, "seeds="),
    (dict(baseline="supervised"), ValueError, "unknown init"),
    (dict(inits={"scratch": "", "remedis": "/nonexistent/pretrain_simclr"}), FileNotFoundError,
     r"inits.remedis='/nonexistent/pretrain_simclr' does not exist; fix --config.inits.remedis"),
    (dict(inits={"scratch": "", "bit": "/nonexistent/BiT-M-R50x1.npz"}), FileNotFoundError,
     "inits.bit='/nonexistent/BiT-M-R50x1.npz' does not exist"),
    (dict(inits={"scratch": "", "remedis": "EMPTY_DIR"}), FileNotFoundError,
     "holds no checkpoint"),
    (dict(metric="f1"), ValueError, "metric='f1'"),
    (dict(overrides={"total_stepz": 3}), KeyError, "'total_stepz' is not a key of the base"),
    (dict(overrides={"data": {"sitez": {"train": "B"}}}), KeyError, "'data.sitez' is not a"),
    (dict(overrides={"test_sets": ("a=test@A", "a=test@B")}), ValueError,
     "run init=scratch/frac=0.25/seed=0: config.test_sets has duplicate names"),
    (dict(base="configs/nope.py:tiny"), FileNotFoundError, "configs/nope.py"),
    (dict(base="configs/pretrain_simclr.py:smoke"), ValueError, "needs a fine-tuning config"),
])
def test_config_mistakes_are_rejected_before_anything_is_written(tmp_path, monkeypatch, change,
                                                                 error, match):
  def no_training(*args):
    raise AssertionError("a bad sweep config reached training")
  monkeypatch.setattr(train_finetune, "train_and_evaluate", no_training)
  empty = tmp_path / "empty_workdir"
  empty.mkdir()
  change = dict(change)
  if "inits" in change:
    change["inits"] = ml_collections.ConfigDict(
        {k: (str(empty) if v == "EMPTY_DIR" else v) for k, v in change["inits"].items()})
  if "overrides" in change:
    change["overrides"] = ml_collections.ConfigDict(change["overrides"])
  config = smoke_sweep({"scratch": ""})
  for key, value in change.items():
    config[key] = value
  workdir = tmp_path / "sweep"
  with pytest.raises(error, match=match):
    sweep.run_sweep(config, str(workdir), verbose=False)
  assert not workdir.exists()
  with pytest.raises(ValueError, match="parallel=0"):
    sweep.run_sweep(smoke_sweep({"scratch": ""}), str(workdir), parallel=0, verbose=False)
  assert not workdir.exists()


# -------------------------------------------------------------------------- results by hand
def fake_results(test_metrics, *, num_train_labels=10, best_step=4):
  """A results.json in the train_finetune schema with the given per-test-set metrics."""
  return {"format": train_finetune.RESULTS_FORMAT, "finished": True, "steps": 4,
          "total_steps": 4, "wall_time_s": 1.0, "num_train_labels": num_train_labels,
          "best": {"metric": "macro_auc", "split": "val", "step": best_step, "value": 0.5},
          "test_sets": {name: {"split": "test", "sites": "", "num_examples": 32, "roc_file": "",
                               "metrics": m} for name, m in test_metrics.items()}}


def write_results(path, results):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "results.json"), "w") as f:
    json.dump(results, f)


def test_aggregation_matches_numpy_on_hand_made_results(tmp_path):
  config = smoke_sweep({"scratch": ""}, fractions=(0.1, 1.0), seeds=(0, 1, 2), baseline_fraction=1.0)
  runs = sweep_plan.plan_runs(config)
  rng = np.random.default_rng(0)
  values = {}
  for run in runs:
    m = {name: {"macro_auc": float(rng.uniform(0.5, 1)), "accuracy": float(rng.uniform()),
                "balanced_accuracy": float(rng.uniform()), "ece": float(rng.uniform(0, 0.2))}
         for name in ("in_distribution", "site_C")}
    values[run.run_id] = m
    write_results(tmp_path / run.run_id, fake_results(m, num_train_labels=int(run.label_fraction * 100)))
  rows = sweep_results.collect_rows(str(tmp_path), runs)
  assert len(rows) == len(runs) * 2
  cells = sweep_results.summarize(rows)
  assert len(cells) == 2 * 2  # fractions x test sets
  for cell in cells:
    ids = [sweep_plan.run_id("scratch", cell["label_fraction"], s) for s in (0, 1, 2)]
    for column, key in (("auc", "macro_auc"), ("accuracy", "accuracy"), ("ece", "ece")):
      x = np.array([values[i][cell["test_set"]][key] for i in ids])
      assert cell[f"{column}_mean"] == pytest.approx(np.mean(x), abs=1e-12)
      assert cell[f"{column}_std"] == pytest.approx(np.std(x, ddof=1), abs=1e-12)
    assert cell["n"] == 3 and cell["n_failed"] == 0
  # One seed: std 0 (ddof=1 is undefined); a NaN value makes the mean NaN, not dropped.
  rows = [dict(r, auc=math.nan) if r["run_id"].endswith("seed=2") else r for r in rows]
  one = sweep_results.summarize([r for r in rows if r["seed"] == 0])
  assert all(c["auc_std"] == 0.0 and c["n"] == 1 for c in one)
  assert all(math.isnan(c["auc_mean"]) for c in sweep_results.summarize(rows))


def cells_from(table, test_set="test"):
  """{(init, fraction): mean} -> summarize-style cells."""
  return [{"init": i, "label_fraction": f, "test_set": test_set, "n": 3, "n_failed": 0,
           "auc_mean": m, "auc_std": 0.01} for (i, f), m in table.items()]


def test_smallest_matching_fraction_rule():
  cells = cells_from({
      ("scratch", 0.01): 0.60, ("scratch", 0.1): 0.70, ("scratch", 1.0): 0.80,
      ("remedis", 0.01): 0.75, ("remedis", 0.1): 0.80, ("remedis", 1.0): 0.79,  # first crossing
      ("bit", 0.01): 0.70, ("bit", 0.1): 0.78, ("bit", 1.0): 0.799,             # never
  })
  matches = {m["init"]: m for m in sweep_results.matching_fractions(
      cells, metric="auc", baseline="scratch", baseline_fraction=1.0,
      inits=["scratch", "remedis", "bit"])}
  assert matches["scratch"]["match_fraction"] == 1.0  # the baseline matches itself
  assert matches["remedis"]["status"] == "matches" and matches["remedis"]["match_fraction"] == 0.1
  assert matches["bit"]["status"] == "never" and matches["bit"]["match_fraction"] is None
  assert (matches["bit"]["best_fraction"], matches["bit"]["best_mean"]) == (1.0, 0.799)
  table = sweep_results.format_match_table(list(matches.values()), metric="auc",
                                           baseline="scratch", baseline_fraction=1.0,
                                           tolerance=0.0)
  assert "| test | 0.800 | 100% (0.800) | 10% (0.800) | never (best 0.799 at 100%) |" in table
  assert ">= the baseline's mean - 0 (tolerance)" in table
  # A tolerance of 0.06 (threshold 0.74) lets bit match at 10% and remedis at 1%.
  tolerant = {m["init"]: m["match_fraction"] for m in sweep_results.matching_fractions(
      cells, metric="auc", baseline="scratch", baseline_fraction=1.0, tolerance=0.06)}
  assert tolerant == {"scratch": 1.0, "remedis": 0.01, "bit": 0.1}
  # Without the baseline cell there is nothing to match.
  no_baseline = sweep_results.matching_fractions(
      [c for c in cells if c["init"] != "scratch"], metric="auc", baseline="scratch")
  assert {m["status"] for m in no_baseline} == {"no baseline"}


# --------------------------------------------------------------------- run logic, fake trainer
class FakeTrainer:
  """Stands in for train_finetune.train_and_evaluate: writes results.json from the config;
  a run whose init path contains 'broken' raises."""

  def __init__(self):
    self.calls = []

  def __call__(self, config, workdir):
    self.calls.append(workdir)
    if "broken" in config.model.init:
      raise ValueError("weights do not fit the model")
    base = 0.9 if config.model.init else 0.7
    auc = base - 0.1 * (1 - config.label_fraction) + 0.001 * config.seed
    results = fake_results({name.partition("=")[0]: {"macro_auc": auc, "accuracy": 0.5,
                                                     "balanced_accuracy": 0.5, "ece": 0.1}
                            for name in config.test_sets})
    write_results(workdir, results)
    return results


def test_finished_runs_are_skipped_and_failures_are_recorded(tmp_path, monkeypatch):
  fake = FakeTrainer()
  monkeypatch.setattr(train_finetune, "train_and_evaluate", fake)
  good, broken = write_fake_export(tmp_path / "good"), write_fake_export(tmp_path / "broken")
  config = smoke_sweep({"scratch": "", "remedis": good, "other": broken}, seeds=(0, 1))
  workdir = tmp_path / "sweep"
  summary = sweep.run_sweep(config, str(workdir), verbose=False)
  assert len(fake.calls) == summary["num_runs"] == 12
  assert summary["counts"] == {"finished": 8, "failed": 4}
  assert sorted(summary["failed"]) == sorted(
      sweep_plan.run_id("other", f, s) for f in (0.25, 0.5) for s in (0, 1))
  assert "weights do not fit the model" in summary["failed"]["init=other/frac=0.5/seed=1"]
  error_file = workdir / "init=other" / "frac=0.5" / "seed=1" / sweep_run.ERROR_FILE
  assert "ValueError: weights do not fit the model" in error_file.read_text()
  # Failed runs are rows of the CSV (status failed, error kept), not silently dropped.
  with open(summary["results_csv"]) as f:
    rows = list(csv.DictReader(f))
  failed_rows = [r for r in rows if r["status"] == "failed"]
  assert len(failed_rows) == 4 and all("weights do not fit" in r["error"] for r in failed_rows)
  assert "4 run(s) did not finish" in summary["table"]
  # The matches: remedis (0.9 - 0.1 * (1 - f)) beats the scratch baseline at 50% already.
  matches = {(m["test_set"], m["init"]): m for m in summary["matches"]}
  assert matches[("in_distribution", "remedis")]["match_fraction"] == 0.25
  assert matches[("in_distribution", "other")]["status"] == "never"

  mtimes = {p: os.path.getmtime(p) for p in workdir.glob("init=*/frac=*/seed=*/results.json")}
  fake.calls.clear()
  again = sweep.run_sweep(config, str(workdir), verbose=False)
  # Only the failed runs ran again; the finished ones were not touched.
  assert sorted(os.path.relpath(c, workdir) for c in fake.calls) == sorted(summary["failed"])
  assert again["counts"] == {"skipped": 8, "failed": 4}
  assert mtimes == {p: os.path.getmtime(p) for p in mtimes}

  # Aggregate-only mode reads the same failures back from the run folders.
  fake.calls.clear()
  aggregated = sweep.run_sweep(config, str(workdir), mode="aggregate", verbose=False)
  assert not fake.calls and aggregated["counts"] == {"finished": 8, "failed": 4}
  assert aggregated["matches"] == summary["matches"]


# ------------------------------------------------------------------------------ job lists
def parse_job_line(line):
  """The fine-tuning config a job-list line builds, parsed by ml_collections' own flags."""
  env, python, *argv = shlex.split(line.partition("&&")[2])
  assert env.startswith("JAX_COMPILATION_CACHE_DIR=") and os.path.basename(python).startswith(
      "python")
  assert argv[:2] == ["-m", "remedis_jax.main"]
  main_args = argv[2:]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True,
                                  sys_argv=["prog"] + main_args)
  flags.DEFINE_string("workdir", None, "", flag_values=flag_values)
  flag_values(["prog"] + main_args)
  return flag_values.config, flag_values.workdir


def test_job_list_reproduces_the_in_process_configs(tmp_path):
  config = smoke_sweep({"scratch": "", "remedis": write_fake_export(tmp_path / "export")},
                       seeds=(0, 1))
  workdir = tmp_path / "sweep"
  runs = sweep_plan.plan_runs(config)
  write_results(workdir / runs[0].run_id, fake_results({"a": {"macro_auc": 0.5}}))
  summary = sweep.run_sweep(config, str(workdir), mode="joblist", verbose=False)
  lines = (workdir / "jobs.txt").read_text().splitlines()
  assert summary["jobs_file"] == str(workdir / "jobs.txt")
  assert len(lines) == len(runs) - 1  # the finished run is not listed
  base = sweep_plan.load_config_file(config.base)
  for line, run in zip(lines, runs[1:]):
    assert line.startswith(f"cd {shlex.quote(sweep_plan.REPO_ROOT)} && JAX_COMPILATION_CACHE_DIR=")
    parsed, run_workdir = parse_job_line(line)
    assert run_workdir == str(workdir / run.run_id)
    assert parsed.to_dict() == sweep_plan.build_run_config(config, run, base).to_dict()
  plan = json.loads((workdir / sweep_plan.PLAN_FILE).read_text())
  assert plan["runs"][1]["run_id"] == runs[1].run_id


def test_dotted_overrides_are_strict_and_in_place():
  # configs/common.override: the tests' and the sweeps' one way to set dotted keys.
  config = common.override(finetune_config.get_config("smoke"), {"model.init": "x.npz",
                                                                 "seed": 3})
  assert (config.model.init, config.seed) == ("x.npz", 3)
  with pytest.raises(KeyError, match="'model.nmae' is not a key of the base config; known keys"):
    common.override(config, {"model.nmae": "R_tiny"})
  with pytest.raises(KeyError, match="'modell' is not a config block"):
    common.override(config, [("modell.name", "R_tiny")], where="mine")
  with pytest.raises(TypeError, match="seed='three' does not fit"):
    common.override(config, {"seed": "three"})


# Stands in for `python -m remedis_jax.main ...` in a parallel sweep: the run whose seed is
# FAKE_PREEMPT_SEED is "preempted" (saves nothing, exits with EXIT_PREEMPTED), the others finish.
FAKE_PYTHON = r"""#!{python}
import json, os, sys
flags = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--"))
if flags["config.seed"] == os.environ.get("FAKE_PREEMPT_SEED"):
  sys.exit({code})
with open(os.path.join(flags["workdir"], "results.json"), "w") as f:
  json.dump({{"finished": True, "test_sets": {{
      "in_distribution": {{"metrics": {{"macro_auc": 0.7}}}}}}}}, f)
"""


def test_a_subprocess_preempted_with_its_exit_status_is_interrupted_not_failed(tmp_path,
                                                                              monkeypatch):
  from remedis_jax import preemption  # pylint: disable=g-import-not-at-top
  assert run_files.EXIT_PREEMPTED == preemption.EXIT_PREEMPTED == 75  # one name (run_files.py)
  python = tmp_path / "fake_python"
  python.write_text(FAKE_PYTHON.format(python=sys.executable, code=run_files.EXIT_PREEMPTED))
  python.chmod(python.stat().st_mode | stat.S_IEXEC)
  monkeypatch.setenv("FAKE_PREEMPT_SEED", "1")
  config = smoke_sweep({"scratch": ""}, fractions=(0.5,), seeds=(0, 1))
  workdir = str(tmp_path / "sweep")
  summary = sweep.run_sweep(config, workdir, parallel=2, python=str(python), verbose=False)
  assert summary["counts"] == {"finished": 1, "interrupted": 1} and not summary["failed"]
  assert not os.path.exists(os.path.join(workdir, "init=scratch/frac=0.5/seed=1",
                                         sweep_run.ERROR_FILE))
  # Any other non-zero status is a failure, with its error file.
  python.write_text(FAKE_PYTHON.format(python=sys.executable, code=3))
  again = sweep.run_sweep(config, workdir, parallel=2, python=str(python), verbose=False)
  assert again["counts"] == {"skipped": 1, "failed": 1}
  assert again["failed"]["init=scratch/frac=0.5/seed=1"].startswith("exit status 3")


def test_a_preempted_run_stops_the_in_process_sweep_and_the_rerun_resumes(tmp_path, monkeypatch):
  """A run that returns unfinished saved on a preemption notice: no further run may start."""
  fake = FakeTrainer()
  preempted = []

  def preempted_first(config, workdir):
    if not preempted:  # the first run is preempted: it returns unfinished, writing nothing
      preempted.append(workdir)
      return {"finished": False}
    return fake(config, workdir)

  monkeypatch.setattr(train_finetune, "train_and_evaluate", preempted_first)
  config = smoke_sweep({"scratch": ""}, seeds=(0, 1))
  workdir = tmp_path / "sweep"
  summary = sweep.run_sweep(config, str(workdir), verbose=False)
  assert len(preempted) == 1 and not fake.calls
  assert summary["counts"] == {"interrupted": 1, "pending": 3}
  again = sweep.run_sweep(config, str(workdir), verbose=False)
  assert sorted(fake.calls) == sorted(str(workdir / r.run_id) for r in sweep_plan.plan_runs(config))
  assert again["counts"] == {"finished": 4}


# ------------------------------------------------------------- a second sweep on the workdir
def finish_when_probed_twice(monkeypatch, held_path, lock, results):
  """`workdir_lock.holder`, which lets the run at `held_path` be found held twice (the sweep saw
  it held, waited and looked again) before its holder, the other sweep, finishes it."""
  real_holder = workdir_lock.holder
  probes = []

  def holder(path):
    answer = real_holder(path)
    if os.path.abspath(path) == os.path.abspath(held_path) and answer is not None:
      probes.append(answer)
      if len(probes) == 2:
        write_results(held_path, results)
        lock.release()
    return answer

  monkeypatch.setattr(workdir_lock, "holder", holder)
  monkeypatch.setattr(sweep_run, "HELD_RUN_POLL_S", 0.01)
  return probes


def test_a_run_another_sweep_holds_is_waited_for_not_failed(tmp_path, monkeypatch, capsys):
  fake = FakeTrainer()

  def locked_trainer(config, workdir):  # the real trainer runs under the workdir lock
    with workdir_lock.WorkdirLock(workdir):
      return fake(config, workdir)

  monkeypatch.setattr(train_finetune, "train_and_evaluate", locked_trainer)
  config = smoke_sweep({"scratch": ""}, fractions=(0.5,), seeds=(0, 1))
  workdir = tmp_path / "sweep"
  held = workdir / sweep_plan.run_id("scratch", 0.5, 0)
  lock = workdir_lock.WorkdirLock(str(held)).acquire()  # the other sweep is running seed 0
  probes = finish_when_probed_twice(monkeypatch, held, lock,
                                    fake_results({"in_distribution": {"macro_auc": 0.6}}))
  summary = sweep.run_sweep(config, str(workdir))
  assert len(probes) == 2 and f"pid {os.getpid()}" in probes[0]
  assert summary["counts"] == {"finished": 2} and not summary["failed"]  # main() exits 0
  assert fake.calls == [str(workdir / sweep_plan.run_id("scratch", 0.5, 1))]  # not run twice
  assert not (held / sweep_run.ERROR_FILE).exists()
  out = capsys.readouterr().out
  assert f"{held.relative_to(workdir)}: running elsewhere (host" in out
  assert "finished by another process" in out and "FAILED" not in out
  results = json.loads(open(summary["results_json"]).read())
  assert set(results["run_status"].values()) == {"finished"}


# Stands in for `python -m remedis_jax.main`: takes the run's workdir lock as the trainer does,
# failing like it (a WorkdirInUseError traceback, exit status 1) when another process holds it.
LOCKING_FAKE_PYTHON = r"""#!{python}
import fcntl, json, os, sys
flags = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--"))
lock = open(os.path.join(flags["workdir"], ".lock"), "a+")
try:
  fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
except BlockingIOError:
  sys.exit("remedis_jax.workdir_lock.WorkdirInUseError: in use by another run")
with open(os.path.join(flags["workdir"], "results.json"), "w") as f:
  json.dump({{"finished": True, "test_sets": {{
      "in_distribution": {{"metrics": {{"macro_auc": 0.7}}}}}}}}, f)
"""


def test_a_parallel_sweep_that_loses_the_race_for_a_run_waits_for_it(tmp_path, monkeypatch):
  python = tmp_path / "fake_python"
  python.write_text(LOCKING_FAKE_PYTHON.format(python=sys.executable))
  python.chmod(python.stat().st_mode | stat.S_IEXEC)
  config = smoke_sweep({"scratch": ""}, fractions=(0.5,), seeds=(0, 1))
  workdir = tmp_path / "sweep"
  held = workdir / sweep_plan.run_id("scratch", 0.5, 1)
  lock = workdir_lock.WorkdirLock(str(held)).acquire()
  probes = finish_when_probed_twice(monkeypatch, held, lock,
                                    fake_results({"in_distribution": {"macro_auc": 0.6}}))
  # The probe before the start misses the holder (it took the lock just after): the run starts,
  # and its subprocess fails on the lock.
  missed = []
  probe = workdir_lock.holder

  def late_holder(path):
    if os.path.abspath(path) == str(held) and not missed:
      missed.append(path)
      return None
    return probe(path)

  monkeypatch.setattr(workdir_lock, "holder", late_holder)
  summary = sweep.run_sweep(config, str(workdir), parallel=2, python=str(python), verbose=False)
  assert summary["counts"] == {"finished": 2} and not summary["failed"]
  assert len(probes) == 2 and not (held / sweep_run.ERROR_FILE).exists()
  assert "WorkdirInUseError" in (held / sweep_run.LOG_FILE).read_text()
