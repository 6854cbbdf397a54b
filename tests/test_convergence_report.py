"""Convergence report: steps to target vs hand-computed values on fake sweep folders (written
with the real metrics writer and the sweep's own plan file), the reduction formula, not-reached /
failed / unfinished / missing runs, CSV and JSON round trips, the plot, the errors, the CLI, and
the sweep's run listing with and without a plan."""

import csv
import json
import math
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from scipy import stats

from experiments import convergence_report as convergence
from configs.sweeps import common as sweep_configs
from experiments import sweep_plan
from experiments import sweep_run
from remedis_jax import train_finetune, writers

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEPS = (100, 200, 300, 400, 500, 600, 700, 800)


# ----------------------------------------------------------------------- fake sweep folders
def make_sweep(workdir, inits=("scratch", "simclr", "cluster"), fractions=(0.1, 1.0),
               seeds=(0, 1)):
  """A sweep folder with its plan (sweep_plan.json, as the sweep writes it) and no runs."""
  config = sweep_configs.default_sweep_config()
  config.inits = ml_collections.ConfigDict({name: "" for name in inits})
  config.label_fractions = tuple(fractions)
  config.seeds = tuple(seeds)
  runs = sweep_plan.plan_runs(config)
  os.makedirs(workdir, exist_ok=True)
  sweep_plan.write_plan(config, runs, str(workdir))  # pylint: disable=protected-access
  return config, runs


def run_path(workdir, init, fraction, seed):
  return os.path.join(workdir, sweep_plan.run_id(init, fraction, seed))


def write_curve(path, values, steps=STEPS, metric="macro_auc"):
  """Appends a validation curve to PATH/metrics.jsonl with the trainer's own writer, between
  hparams and training records as a real run has them."""
  writer = writers.JsonlWriter(os.path.join(path, writers.METRICS_FILE))
  writer.write_hparams({"label_fraction": 0.1})
  for step, value in zip(steps, values):
    writer.write_scalars(step - 50, {"train/loss": 0.5})
    writer.write_scalars(step, {f"val/{metric}": value, "val/accuracy": 0.5})
  writer.close()


def finish(path, best_value=0.9, robustness=None):
  """results.json of a finished run (the train_finetune schema, reduced)."""
  os.makedirs(path, exist_ok=True)
  results = {"format": train_finetune.RESULTS_FORMAT, "finished": True, "steps": 800,
             "total_steps": 800, "best": {"metric": "macro_auc", "split": "val", "step": 100,
                                          "value": best_value},
             "test_sets": {}, "robustness": robustness or {}}
  with open(os.path.join(path, "results.json"), "w") as f:
    json.dump(results, f)


CURVES = {  # (init, fraction, seed) -> validation macro AUC at STEPS
    ("scratch", 1.0, 0): [0.60, 0.70, 0.80, 0.85, 0.88, 0.90, 0.89, 0.90],
    ("scratch", 1.0, 1): [0.55, 0.65, 0.75, 0.82, 0.86, 0.88, 0.90, 0.92],
    ("simclr", 1.0, 0): [0.80, 0.87, 0.88, 0.90, 0.90, 0.90, 0.90, 0.90],
    ("simclr", 1.0, 1): [0.86, 0.87, 0.88, 0.88, 0.90, 0.90, 0.90, 0.90],
    ("scratch", 0.1, 0): [0.55, 0.60, 0.65, 0.70, 0.70, 0.69, 0.68, 0.68],  # never reaches
    ("scratch", 0.1, 1): [0.60, 0.70, 0.72, 0.80, 0.78, 0.78, 0.78, 0.78],
    ("simclr", 0.1, 0): [0.75, 0.76, 0.77, 0.78, 0.78, 0.78, 0.78, 0.78],
}


@pytest.fixture
def fake_sweep(tmp_path):
  """3 inits x 2 fractions x 2 seeds; simclr@0.1/seed=1 missing, cluster failed / unfinished /
  missing, simclr@1.0/seed=1 resumed (step 200 validated twice)."""
  workdir = str(tmp_path / "sweep")
  make_sweep(workdir)
  for (init, fraction, seed), values in CURVES.items():
    path = run_path(workdir, init, fraction, seed)
    if (init, fraction, seed) == ("simclr", 1.0, 1):
      # Interrupted after validating step 200 at 0.50, resumed from step 100: the run that
      # went on validated step 200 again (0.87). The last record wins.
      write_curve(path, [0.86, 0.50], steps=STEPS[:2])
      write_curve(path, values[1:], steps=STEPS[1:])
    else:
      write_curve(path, values)
    finish(path, best_value=max(values))
  failed = run_path(workdir, "cluster", 0.1, 0)
  os.makedirs(failed)
  with open(os.path.join(failed, sweep_run.ERROR_FILE), "w") as f:
    f.write("Traceback ...\nFloatingPointError: non-finite loss")
  # Unfinished (no results.json) but its partial curve would reach any target: must not count.
  write_curve(run_path(workdir, "cluster", 0.1, 1), [0.99, 0.99], steps=STEPS[:2])
  return workdir


# ------------------------------------------------------------------------------- the numbers
def test_read_validation_curve_last_record_of_a_step_wins(fake_sweep):
  curve = convergence.read_validation_curve(run_path(fake_sweep, "simclr", 1.0, 1))
  assert curve == list(zip(STEPS, CURVES[("simclr", 1.0, 1)]))
  # The real reader sees the same records (both steps 200, in file order).
  records = [r for r in writers.read_metrics(run_path(fake_sweep, "simclr", 1.0, 1))
             if "val/macro_auc" in r]
  assert [(r["step"], r["val/macro_auc"]) for r in records][:3] == [(100, 0.86), (200, 0.5),
                                                                    (200, 0.87)]
  assert convergence.read_validation_curve(run_path(fake_sweep, "cluster", 1.0, 0)) == []


def test_steps_to_target_first_crossing_and_nan():
  curve = [(100, 0.5), (200, math.nan), (300, 0.8), (400, 0.7), (500, 0.9)]
  assert convergence.steps_to_target(curve, 0.8) == 300  # >=, first crossing
  assert convergence.steps_to_target(curve, 0.85) == 500
  assert convergence.steps_to_target(curve, 0.95) is None
  assert convergence.steps_to_target([(100, math.nan)], -1.0) is None


def cell(result, init, fraction):
  return next(c for c in result["cells"]
              if c["init"] == init and math.isclose(c["label_fraction"], fraction))


def test_default_target_is_095_of_the_baseline_best_and_steps_match_hand_values(fake_sweep,
                                                                                tmp_path):
  result = convergence.convergence_report(fake_sweep, verbose=False)
  # Targets: 0.95 x mean over scratch seeds of each seed's best validation value.
  assert result["targets"][1.0]["target"] == pytest.approx(0.95 * np.mean([0.90, 0.92]))
  assert result["targets"][0.1]["target"] == pytest.approx(0.95 * np.mean([0.70, 0.80]))
  assert result["targets"][1.0]["baseline_seeds"] == [0, 1]

  # 100%: target 0.8645. scratch seed 0: 0.88 at 500; seed 1: 0.86 at 500 < target, 0.88 at 600.
  scratch = cell(result, "scratch", 1.0)
  assert scratch["steps_to_target"] == {"0": 500, "1": 600}
  assert scratch["steps_to_target_mean"] == 550
  assert scratch["steps_to_target_std"] == pytest.approx(np.std([500, 600], ddof=1))
  # The 95% interval of the mean steps, checked against SciPy's Student-t interval.
  want = stats.t.interval(0.95, 1, loc=550, scale=stats.sem([500, 600]))
  assert (scratch["steps_to_target_low"], scratch["steps_to_target_high"]) == pytest.approx(want)
  assert (scratch["n_reached"], scratch["n_finished"], scratch["reduction"]) == (2, 2, 0.0)
  # simclr seed 0: 0.87 at 200; seed 1: 0.86 < target at 100, 0.87 at 200 (after the resume).
  simclr = cell(result, "simclr", 1.0)
  assert simclr["steps_to_target"] == {"0": 200, "1": 200}
  assert simclr["steps_to_target_std"] == 0.0
  assert simclr["reduction"] == pytest.approx(1 - 200 / 550)
  assert simclr["reduction_complete"] is True

  # 10%: target 0.7125. scratch seed 0 never gets there (best 0.70); seed 1: 0.72 at 300.
  scratch = cell(result, "scratch", 0.1)
  assert scratch["steps_to_target"] == {"0": None, "1": 300}
  assert (scratch["n_reached"], scratch["n_not_reached"]) == (1, 1)
  assert scratch["not_reached_runs"] == ["init=scratch/frac=0.1/seed=0"]
  assert (scratch["steps_to_target_mean"], scratch["steps_to_target_std"]) == (300, 0.0)
  simclr = cell(result, "simclr", 0.1)
  assert simclr["steps_to_target"] == {"0": 100}
  assert simclr["not_finished_runs"] == ["init=simclr/frac=0.1/seed=1 (missing)"]
  assert simclr["reduction"] == pytest.approx(1 - 100 / 300)
  assert simclr["reduction_complete"] is False  # a miss in scratch, a missing simclr seed

  # cluster: failed, unfinished (its curve reaches 0.99 but does not count) and missing.
  cluster = cell(result, "cluster", 0.1)
  assert (cluster["n_planned"], cluster["n_finished"], cluster["n_reached"]) == (2, 0, 0)
  assert cluster["not_finished_runs"] == ["init=cluster/frac=0.1/seed=0 (failed)",
                                          "init=cluster/frac=0.1/seed=1 (unfinished)"]
  assert math.isnan(cluster["reduction"]) and math.isnan(cluster["steps_to_target_mean"])
  assert cell(result, "cluster", 1.0)["n_not_finished"] == 2
  assert result["counts"] == {"finished": 7, "missing": 3, "failed": 1, "unfinished": 1}

  table = result["table"]
  assert "| 100% | simclr | 0.864 | 200 +- 0 [200, 200] | 2/2 | 64% |" in table
  assert "| 10% | simclr | 0.712 | 100 +- 0 | 1/1 | 67%* |" in table
  assert "| 10% | cluster | 0.712 | no finished run | 0/0 | n/a |" in table
  assert "1 finished run(s) never reached the target" in table
  assert "5 run(s) did not finish" in table and "init=cluster/frac=1/seed=0 (missing)" in table


def test_absolute_target_and_the_reduction_formula(fake_sweep):
  result = convergence.convergence_report(fake_sweep, target=0.8, verbose=False)
  assert {f: t["target"] for f, t in result["targets"].items()} == {0.1: 0.8, 1.0: 0.8}
  # scratch@100%: 0.80 at 300 (>=), 0.82 at 400; simclr: 0.80 at 100, 0.86 at 100.
  base, init = [300, 400], [100, 100]
  assert cell(result, "scratch", 1.0)["steps_to_target"] == {"0": 300, "1": 400}
  assert cell(result, "simclr", 1.0)["steps_to_target"] == {"0": 100, "1": 100}
  assert cell(result, "simclr", 1.0)["reduction"] == pytest.approx(1 - np.mean(init) /
                                                                   np.mean(base))
  # 10%: only scratch seed 1 reaches 0.80 (at 400); simclr never (best 0.78): no reduction.
  assert cell(result, "scratch", 0.1)["steps_to_target"] == {"0": None, "1": 400}
  assert math.isnan(cell(result, "simclr", 0.1)["reduction"])
  # A slower init has a negative reduction; another fraction of the baseline moves the target.
  slower = convergence.convergence_report(fake_sweep, fraction_of_baseline=0.8, verbose=False,
                                          baseline="simclr")
  assert slower["targets"][1.0]["target"] == pytest.approx(0.8 * 0.90)
  # target 0.72: simclr 100/100; scratch 0.75 at 300, 0.75 at 300 -> 1 - 300/100 = -2.
  assert cell(slower, "scratch", 1.0)["reduction"] == pytest.approx(-2.0)
  # A baseline without a finished run gives no target: nothing is "reached", nothing is dropped.
  no_target = convergence.convergence_report(fake_sweep, baseline="cluster", verbose=False)
  assert {t["source"] for t in no_target["targets"].values()} == {"no finished baseline run"}
  assert all(c["n_reached"] == 0 and math.isnan(c["reduction"]) for c in no_target["cells"])
  assert "| 100% | scratch | n/a (no finished baseline run) | no target | 0/2 |" in (
      no_target["table"])


def test_csv_and_json_round_trip_and_the_plot(fake_sweep):
  result = convergence.convergence_report(fake_sweep, verbose=False)
  with open(result["csv"], newline="") as f:
    reader = csv.DictReader(f)
    rows = list(reader)
  assert tuple(reader.fieldnames) == convergence.CELL_COLUMNS
  assert len(rows) == len(result["cells"]) == 3 * 2
  for row, c in zip(rows, result["cells"]):
    assert (row["init"], float(row["label_fraction"])) == (c["init"], c["label_fraction"])
    for key in ("target", "steps_to_target_mean", "steps_to_target_std", "reduction",
                "best_val_mean"):
      assert (row[key] == "") if math.isnan(c[key]) else float(row[key]) == c[key]
    assert int(row["n_reached"]) == c["n_reached"]
    assert json.loads(row["steps_to_target"]) == c["steps_to_target"]
    assert json.loads(row["not_finished_runs"]) == c["not_finished_runs"]
  with open(result["runs_csv"], newline="") as f:
    runs = list(csv.DictReader(f))
  assert len(runs) == 12
  by_id = {r["run_id"]: r for r in runs}
  assert by_id["init=scratch/frac=0.1/seed=0"]["reached"] == "False"
  assert by_id["init=scratch/frac=0.1/seed=0"]["steps_to_target"] == ""
  assert by_id["init=scratch/frac=1/seed=1"]["steps_to_target"] == "600"
  assert by_id["init=cluster/frac=1/seed=0"]["status"] == "missing"

  with open(result["json"]) as f:
    stored = json.load(f)
  assert stored["format"] == convergence.FORMAT and stored["baseline"] == "scratch"
  assert stored["target_fraction_of_baseline"] == 0.95 and stored["target"] is None
  for saved, c in zip(stored["cells"], result["cells"]):
    assert saved == {k: (None if isinstance(v, float) and math.isnan(v) else v)
                     for k, v in c.items()}
  saved_runs = {r["run_id"]: r for r in stored["runs"]}
  assert saved_runs["init=scratch/frac=1/seed=0"]["curve"] == [
      [s, v] for s, v in zip(STEPS, CURVES[("scratch", 1.0, 0)])]
  with open(result["plot"], "rb") as f:
    assert f.read(8) == PNG_MAGIC
  with open(result["table_file"]) as f:
    assert f.read().strip() == result["table"]


# ------------------------------------------------------------------------------------ errors
def test_errors_name_the_problem(fake_sweep, tmp_path):
  with pytest.raises(ValueError, match="not both"):
    convergence.convergence_report(fake_sweep, target=0.8, fraction_of_baseline=0.9,
                                   verbose=False)
  with pytest.raises(ValueError, match="lower is better"):
    convergence.convergence_report(fake_sweep, metric="ece", verbose=False)
  with pytest.raises(ValueError, match=r"no finished run in .* has 'val/balanced_accuracy'.*"
                                       r"val/accuracy, val/macro_auc"):
    convergence.convergence_report(fake_sweep, metric="balanced_accuracy", verbose=False)
  with pytest.raises(ValueError, match="--baseline='supervised' has no run"):
    convergence.convergence_report(fake_sweep, baseline="supervised", verbose=False)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    convergence.convergence_report(str(tmp_path / "nope"), verbose=False)
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no sweep_plan.json and no run folder"):
    convergence.convergence_report(str(tmp_path / "empty"), verbose=False)
  make_sweep(str(tmp_path / "unstarted"))
  with pytest.raises(ValueError, match=r"no finished run .* \(12 planned\)"):
    convergence.convergence_report(str(tmp_path / "unstarted"), verbose=False)


def test_list_runs_with_and_without_a_plan(fake_sweep):
  sweep_config, runs = sweep_plan.list_runs(fake_sweep)
  assert sweep_config["baseline"] == "scratch" and len(runs) == 12
  assert [sweep_run.run_status(fake_sweep, r) for r in runs].count("missing") == 3
  os.remove(os.path.join(fake_sweep, sweep_plan.PLAN_FILE))
  os.makedirs(os.path.join(fake_sweep, "init=simclr", "frac=1", "seed=0", "checkpoints", "800"))
  sweep_config, runs = sweep_plan.list_runs(fake_sweep)
  # Without the plan only the 9 folders that exist are found; never-started runs cannot be.
  assert sweep_config == {}
  assert sorted(r.run_id for r in runs) == sorted(
      [sweep_plan.run_id(*key) for key in CURVES] + ["init=cluster/frac=0.1/seed=0",
                                                "init=cluster/frac=0.1/seed=1"])
  result = convergence.convergence_report(fake_sweep, verbose=False)
  assert cell(result, "simclr", 1.0)["reduction"] == pytest.approx(1 - 200 / 550)


def test_cli_prints_the_table_and_writes_the_files(fake_sweep, tmp_path):
  out = tmp_path / "report"
  done = subprocess.run([sys.executable, "-m", "experiments.convergence_report",
                         f"--workdir={fake_sweep}", "--target=0.8", f"--output_dir={out}"],
                        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  assert "| 100% | simclr | 0.800 | 100 +- 0 [100, 100] | 2/2 | 71% |" in done.stdout
  assert sorted(os.listdir(out)) == sorted([convergence.CSV_FILE, convergence.RUNS_CSV_FILE,
                                            convergence.JSON_FILE, convergence.TABLE_FILE,
                                            convergence.PLOT_FILE])
  failed = subprocess.run([sys.executable, "-m", "experiments.convergence_report",
                           f"--workdir={fake_sweep}", "--target=0.8",
                           "--target_fraction_of_baseline=0.9"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
  assert failed.returncode == 1 and "not both" in failed.stderr
