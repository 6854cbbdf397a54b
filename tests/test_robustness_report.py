"""Robustness report: drops vs hand-computed NumPy means on fake sweep folders, unfinished runs
and runs without robustness results listed, CSV and JSON round trips, the clear error when no
run has robustness results (library and CLI), and the methods sweep config: it loads, plans
4 x 3 x 2 runs, enables every perturbation kind and validates once its pretraining workdirs
exist. One real `:smoke` sweep with a perturbation, run as two parallel processes, feeds both
reports end to end (slow)."""

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
from experiments import label_fraction_sweep as sweep
from experiments import sweep_plan
from experiments import sweep_run
from experiments import robustness_report as robustness
from remedis_jax import train_finetune
from remedis_jax.evaluators import robustness as robustness_evaluator

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PERTURBATIONS = ("gamma(0.7)", "rotate(15)")


def make_sweep(workdir, inits=("scratch", "simclr"), fractions=(0.1, 1.0), seeds=(0, 1)):
  config = sweep_configs.default_sweep_config()
  config.inits = ml_collections.ConfigDict({name: "" for name in inits})
  config.label_fractions = tuple(fractions)
  config.seeds = tuple(seeds)
  runs = sweep_plan.plan_runs(config)
  os.makedirs(workdir, exist_ok=True)
  sweep_plan.write_plan(config, runs, str(workdir))  # pylint: disable=protected-access
  return runs


def write_results(workdir, init, fraction, seed, clean, perturbed, site_b=0.6):
  """results.json (train_finetune schema) with clean test metrics for two test sets and the
  robustness of the first: clean = {metric: value}; perturbed = {perturbation: {metric: value}}
  (None: no robustness section)."""
  path = os.path.join(workdir, sweep_plan.run_id(init, fraction, seed))
  os.makedirs(path, exist_ok=True)
  results = {
      "format": train_finetune.RESULTS_FORMAT, "finished": True, "steps": 800,
      "config": {"label_fraction": fraction, "seed": seed, "init": ""},
      "test_sets": {
          "in_distribution": {"split": "test", "sites": "A", "num_examples": 512,
                              "metrics": dict(clean, num_examples=512)},
          "site_B": {"split": "test", "sites": "B", "num_examples": 512,
                     "metrics": {"macro_auc": site_b, "accuracy": 0.5}}},
      "robustness": {} if perturbed is None else {"in_distribution": perturbed}}
  with open(os.path.join(path, "results.json"), "w") as f:
    json.dump(results, f)


# (init, fraction, seed) -> (clean macro AUC, {perturbation: perturbed macro AUC})
VALUES = {
    ("scratch", 1.0, 0): (0.88, {"gamma(0.7)": 0.80, "rotate(15)": 0.70}),
    ("scratch", 1.0, 1): (0.86, {"gamma(0.7)": 0.81, "rotate(15)": 0.74}),
    ("simclr", 1.0, 0): (0.90, {"gamma(0.7)": 0.88, "rotate(15)": 0.85}),
    ("simclr", 1.0, 1): (0.89, {"gamma(0.7)": 0.87, "rotate(15)": 0.80}),
    ("scratch", 0.1, 0): (0.78, {"gamma(0.7)": 0.70, "rotate(15)": None}),  # NaN (null)
    ("scratch", 0.1, 1): (0.80, {"gamma(0.7)": 0.75, "rotate(15)": 0.71}),
    ("simclr", 0.1, 0): (0.82, {"gamma(0.7)": 0.79, "rotate(15)": 0.76}),
}


@pytest.fixture
def fake_sweep(tmp_path):
  """2 inits x 2 fractions x 2 seeds; simclr@0.1/seed=1 is missing."""
  workdir = str(tmp_path / "sweep")
  make_sweep(workdir)
  for (init, fraction, seed), (clean, perturbed) in VALUES.items():
    write_results(workdir, init, fraction, seed, {"macro_auc": clean, "accuracy": clean - 0.1},
                  {p: {"macro_auc": v, "accuracy": 0.5} for p, v in perturbed.items()})
  return workdir


def find(cells, init, fraction, perturbation, test_set="in_distribution"):
  return next(c for c in cells if c["init"] == init and math.isclose(c["label_fraction"],
                                                                     fraction)
              and c["perturbation"] == perturbation and c["test_set"] == test_set)


def test_drops_match_numpy_means_over_seeds(fake_sweep):
  result = robustness.robustness_report(fake_sweep, verbose=False)
  assert len(result["rows"]) == 7 * 2 and len(result["cells"]) == 4 * 2
  for init, fraction in (("scratch", 1.0), ("simclr", 1.0), ("scratch", 0.1), ("simclr", 0.1)):
    seeds = [s for s in (0, 1) if (init, fraction, s) in VALUES]
    for perturbation in PERTURBATIONS:
      clean = np.array([VALUES[(init, fraction, s)][0] for s in seeds], np.float64)
      perturbed = np.array([np.nan if VALUES[(init, fraction, s)][1][perturbation] is None
                            else VALUES[(init, fraction, s)][1][perturbation] for s in seeds])
      c = find(result["cells"], init, fraction, perturbation)
      assert c["n"] == len(seeds) and c["seeds"] == seeds
      ddof_std = (lambda x: np.std(x, ddof=1) if len(x) > 1 else 0.0)
      np.testing.assert_allclose(
          [c["clean_mean"], c["clean_std"], c["perturbed_mean"], c["perturbed_std"],
           c["drop_mean"], c["drop_std"]],
          [clean.mean(), ddof_std(clean), perturbed.mean(), ddof_std(perturbed),
           (clean - perturbed).mean(), ddof_std(clean - perturbed)], rtol=0, atol=1e-12)
  # By hand: scratch@100% rotate drops 0.18 and 0.12 -> 0.15 +- 0.0424.
  c = find(result["cells"], "scratch", 1.0, "rotate(15)")
  assert c["drop_mean"] == pytest.approx(0.15) and c["drop_std"] == pytest.approx(0.06 / 2**0.5)
  # A null perturbed value makes its cell NaN, not a silently smaller sample.
  assert math.isnan(find(result["cells"], "scratch", 0.1, "rotate(15)")["drop_mean"])
  assert result["status"]["not_finished"] == ["init=simclr/frac=0.1/seed=1 (missing)"]
  assert result["status"]["counts"] == {"finished": 7, "missing": 1}

  table = result["table"]
  assert "**in_distribution, 100% of the labels**" in table
  # The drop's 95% interval over the two seeds, from SciPy: scratch drops 0.18 and 0.12,
  # simclr 0.05 and 0.09.
  intervals = [stats.ttest_1samp(d, 0.0).confidence_interval(0.95)
               for d in ([0.18, 0.12], [0.05, 0.09])]
  (s_lo, s_hi), (c_lo, c_hi) = [(float(i.low), float(i.high)) for i in intervals]
  assert (f"| rotate(15) | 0.720 +- 0.028 (+0.150 [{s_lo:+.3f}, {s_hi:+.3f}]) | "
          f"0.825 +- 0.035 (+0.070 [{c_lo:+.3f}, {c_hi:+.3f}]) |") in table
  assert c["drop_ci_low"] == pytest.approx(s_lo) and c["drop_ci_high"] == pytest.approx(s_hi)
  # mean drop over perturbations: scratch (0.065 + 0.15) / 2, simclr (0.02 + 0.07) / 2.
  assert "| mean drop | +0.107 | +0.045 |" in table
  assert "1 run(s) did not finish" in table and "site_B" not in table  # no robustness there


def test_other_metric_and_runs_without_robustness_are_listed(fake_sweep):
  write_results(fake_sweep, "simclr", 0.1, 1, {"macro_auc": 0.8, "accuracy": 0.7}, None)
  result = robustness.robustness_report(fake_sweep, metric="accuracy", verbose=False)
  c = find(result["cells"], "simclr", 1.0, "gamma(0.7)")
  assert c["clean_mean"] == pytest.approx(np.mean([0.80, 0.79]))
  assert c["drop_mean"] == pytest.approx(np.mean([0.80, 0.79]) - 0.5)
  assert result["status"]["without_robustness"] == ["init=simclr/frac=0.1/seed=1"]
  assert "1 finished run(s) have no robustness results" in result["table"]
  with pytest.raises(KeyError, match="'f1' is not a test metric; keys: accuracy, macro_auc"):
    robustness.robustness_report(fake_sweep, metric="f1", verbose=False)


def test_csv_and_json_round_trip(fake_sweep):
  result = robustness.robustness_report(fake_sweep, verbose=False)
  with open(result["csv"], newline="") as f:
    reader = csv.DictReader(f)
    rows = list(reader)
  assert tuple(reader.fieldnames) == robustness.CELL_COLUMNS
  assert len(rows) == len(result["cells"])
  for row, c in zip(rows, result["cells"]):
    assert (row["init"], float(row["label_fraction"]), row["test_set"], row["perturbation"]) == (
        c["init"], c["label_fraction"], c["test_set"], c["perturbation"])
    assert int(row["n"]) == c["n"] and json.loads(row["seeds"]) == c["seeds"]
    for key in ("clean_mean", "clean_std", "perturbed_mean", "perturbed_std", "drop_mean",
                "drop_std"):
      assert (row[key] == "") if math.isnan(c[key]) else float(row[key]) == c[key]
  with open(result["runs_csv"], newline="") as f:
    assert len(list(csv.DictReader(f))) == len(result["rows"]) == 14
  with open(result["json"]) as f:
    stored = json.load(f)
  assert stored["format"] == robustness.FORMAT and stored["metric"] == "macro_auc"
  for saved, c in zip(stored["cells"], result["cells"]):
    assert saved == {k: (None if isinstance(v, float) and math.isnan(v) else v)
                     for k, v in c.items()}
  assert stored["status"] == result["status"]


def test_no_robustness_results_is_a_clear_error(tmp_path):
  workdir = str(tmp_path / "sweep")
  make_sweep(workdir, inits=("scratch",), fractions=(1.0,))
  with pytest.raises(ValueError, match=r"no finished run .* \(2 planned"):
    robustness.robustness_report(workdir, verbose=False)
  for seed in (0, 1):
    write_results(workdir, "scratch", 1.0, seed, {"macro_auc": 0.8}, None)
  with pytest.raises(robustness.NoRobustnessResultsError,
                     match=r"none of the 2 finished runs .* Set "
                           r"config.overrides.robustness.perturbations in the sweep config"):
    robustness.robustness_report(workdir, verbose=False)
  assert not os.path.exists(os.path.join(workdir, robustness.CSV_FILE))
  done = subprocess.run([sys.executable, "-m", "experiments.robustness_report",
                         f"--workdir={workdir}"], cwd=REPO_ROOT, capture_output=True, text=True,
                        timeout=120)
  assert done.returncode == 1
  assert "config.overrides.robustness.perturbations" in done.stderr
  assert "Traceback" not in done.stderr


# ------------------------------------------------------------------------ the methods sweep
def test_methods_sweep_config_plans_4x3x2_runs_and_validates(tmp_path):
  config = sweep_plan.load_config_file("configs/sweeps/methods_tiny.py")
  assert dict(config.inits) == {"scratch": "", "simclr": "workdirs/methods/simclr",
                                "cluster": "workdirs/methods/cluster",
                                "hybrid": "workdirs/methods/hybrid"}
  runs = sweep_plan.plan_runs(config)
  assert len(runs) == 4 * 3 * 2
  assert {(r.init, r.label_fraction, r.seed) for r in runs} == {
      (i, f, s) for i in config.inits for f in (0.02, 0.1, 1.0) for s in (0, 1)}
  run_config = sweep_plan.build_run_config(config, runs[0])
  kinds = {p.kind for p in robustness_evaluator.parse_perturbations(
      run_config.robustness.perturbations)}
  assert kinds == set(robustness_evaluator.PERTURBATIONS)  # intensity, rotation and scale
  assert tuple(run_config.robustness.test_sets) == ("in_distribution",)
  assert tuple(run_config.test_sets) == ("in_distribution=test@A", "site_B=test@B")
  # The plan validates once the pretraining workdirs hold a checkpoint (here: empty stand-ins).
  for name in ("simclr", "cluster", "hybrid"):
    os.makedirs(tmp_path / name / "checkpoints" / "300")
    config.inits[name] = str(tmp_path / name)
  assert len(sweep_plan.validate(config)) == 24
  config.inits.hybrid = str(tmp_path / "not_pretrained_yet")
  with pytest.raises(FileNotFoundError, match="inits.hybrid="):
    sweep_plan.validate(config, check_runs=False)
  subset = sweep_plan.load_config_file("configs/sweeps/methods_tiny.py:simclr")
  assert list(subset.inits) == ["scratch", "simclr"]
  with pytest.raises(ValueError, match="unknown init"):
    sweep_plan.load_config_file("configs/sweeps/methods_tiny.py:moco")


@pytest.mark.slow
def test_real_parallel_smoke_sweep_feeds_both_reports(tmp_path):
  """A real `configs/finetune.py:smoke` run (4 steps, validation every 2) with a perturbation,
  started by the sweep's parallel mode as a `python -m remedis_jax.main` process, then read by
  both reports. One run: running several at once, their logs and failures are
  test_gcs_sweep's (fake runs); the in-process mode is test_gcs_sweep's real sweep;
  that a run's command line parses back to its config is test_sweep_init_overrides'."""
  config = sweep_configs.default_sweep_config()
  config.base = "configs/finetune.py:smoke"
  config.inits = ml_collections.ConfigDict({"scratch": ""})
  config.label_fractions = (0.5,)
  config.seeds = (0,)
  config.baseline_fraction = 0.5
  config.overrides = ml_collections.ConfigDict({
      "robustness": {"perturbations": ("gamma(1.5)",)},
      "test_sets": ("in_distribution=test@A",), "mesh": {"devices": 1}})
  workdir = str(tmp_path / "sweep")
  summary = sweep.run_sweep(config, workdir, parallel=2, verbose=False)
  assert summary["counts"] == {"finished": 1}, summary["failed"]
  run = os.path.join(workdir, "init=scratch", "frac=0.5", "seed=0")
  assert os.path.exists(os.path.join(run, sweep_run.LOG_FILE))
  assert os.path.exists(os.path.join(run, "results.json"))
  assert summary["cells"][0]["n"] == 1

  report = convergence.convergence_report(workdir, verbose=False)
  assert len(report["runs"]) == 1
  for run in report["runs"]:
    assert run["num_validations"] == 2 and run["last_step"] == 4  # steps 2 and 4
    with open(os.path.join(run["run_dir"], "results.json")) as f:
      results = json.load(f)
    assert run["best_val"] == pytest.approx(results["best"]["value"], abs=1e-6)
  cell = report["cells"][0]
  assert cell["n_finished"] == 1 and cell["reduction"] == 0.0  # the baseline itself

  report = robustness.robustness_report(workdir, verbose=False)
  assert [c["perturbation"] for c in report["cells"]] == ["gamma(1.5)"]
  assert len(report["rows"]) == 1
  for row in report["rows"]:
    with open(os.path.join(row["run_dir"], "results.json")) as f:
      results = json.load(f)
    assert row["clean"] == results["test_sets"]["in_distribution"]["metrics"]["macro_auc"]
    assert row["perturbed"] == results["robustness"]["in_distribution"]["gamma(1.5)"][
        "macro_auc"]
