"""experiments/study.py: the selection rule, what each stage may read, the report's test-read
count, and the whole study command on generated data (configs/studies/pneumoniamnist.py:smoke)."""

import json
import math
import os

import ml_collections
import numpy as np
import pytest

from configs.studies import pneumoniamnist as study_config
from experiments import sweep_plan
from experiments import sweep_run
from experiments import study


def smoke(tmp_path, **overrides):
  config = study_config.get_config("smoke")
  config.data_path = str(write_npz(tmp_path / "data.npz"))
  for key, value in overrides.items():
    config[key] = value
  return config


def write_npz(path, sizes=(("train", 64), ("val", 32), ("test", 32)), seed=0):
  """A MedMNIST-layout file whose label shows as a brighter square (learnable in a few steps)."""
  rng = np.random.default_rng(seed)
  arrays = {}
  for split, n in sizes:
    labels = np.arange(n) % 2
    images = rng.normal(100, 30, (n, 28, 28))
    images[:, 8:20, 8:20] += labels[:, None, None] * 60
    arrays[f"{split}_images"] = np.clip(images, 0, 255).astype(np.uint8)
    arrays[f"{split}_labels"] = labels[:, None].astype(np.uint8)
  np.savez(path, **arrays)
  return path


def row(init, fraction, seed, value, test_set="validation", status="finished", best_val=0.5):
  return {"run_id": sweep_plan.run_id(init, fraction, seed), "init": init,
          "label_fraction": fraction, "seed": seed, "test_set": test_set, "status": status,
          "auc": value, "best_val": best_val}


def full_config(tmp_path):
  config = study_config.get_config()
  config.data_path = str(write_npz(tmp_path / "data.npz"))
  return config


# ------------------------------------------------------------------------ fast checks
def test_selection_rule_takes_the_best_mean_over_fractions_and_seeds(tmp_path):
  config = full_config(tmp_path)
  grid = list(config.tune.grid.keys())
  rng = np.random.default_rng(0)
  rows, means = [], {}
  for arm in ("scratch", "simclr"):
    for setup in grid:
      values = rng.uniform(0.6, 0.9, size=(2, 2))
      means[(arm, setup)] = values.mean()
      for i, fraction in enumerate(config.tune.label_fractions):
        for j, seed in enumerate(config.tune.seeds):
          rows.append(row(f"{arm}{study.SEPARATOR}{setup}", fraction, seed, values[i, j]))
  selection = study.select(config, rows)
  assert set(selection) == {"scratch", "simclr"}  # the tuned arms only
  # One arm's choice needs its own runs only, and is the same.
  alone = study.select(config, [r for r in rows if r["init"].startswith("scratch")],
                       arms=("scratch",))
  assert alone == {"scratch": selection["scratch"]}
  for arm in ("scratch", "simclr"):
    expected = max(grid, key=lambda s: means[(arm, s)])
    assert selection[arm]["setup"] == expected
    assert selection[arm]["score"] == pytest.approx(means[(arm, expected)])
    assert len(selection[arm]["scores"]) == len(grid)


def test_selection_ties_go_to_the_first_setup_and_unfinished_tuning_is_refused(tmp_path):
  config = full_config(tmp_path)
  config.arms = ml_collections.ConfigDict({"scratch": config.arms.scratch.to_dict()})
  grid = list(config.tune.grid.keys())
  rows = [row(f"scratch{study.SEPARATOR}{setup}", f, s, 0.8) for setup in grid
          for f in config.tune.label_fractions for s in config.tune.seeds]
  assert study.select(config, rows)["scratch"]["setup"] == grid[0]
  rows[-1] = dict(rows[-1], status="failed", test_set="")
  with pytest.raises(RuntimeError, match="needs every tuning run"):
    study.select(config, rows)
  with pytest.raises(RuntimeError, match="validation rows, expected 4"):
    study.select(config, rows[:-1])


def test_tuning_reads_validation_only_and_final_runs_take_the_chosen_setups(tmp_path):
  config = full_config(tmp_path)
  config.zero_shot.path = str(write_npz(tmp_path / "other_site.npz", seed=1))
  workdir = str(tmp_path / "study")
  tune_runs = sweep_plan.plan_runs(study.tune_sweep(config, workdir))
  assert len(tune_runs) == 2 * 8 * 2 * 2  # the same grid and budget for scratch and simclr
  for run in tune_runs:
    overrides = dict(run.overrides)
    assert overrides["test_sets"] == ("validation=val",)
    assert overrides["model.init"] == ("" if run.init.startswith("scratch") else
                                       os.path.join(workdir, "pretrain"))
  selection = {"scratch": {"setup": "ep300_lr3e-3_aug"}, "simclr": {"setup": "ep100_lr1e-3"}}
  final = {r.init: dict(r.overrides) for r in
           sweep_plan.plan_runs(study.final_sweep(config, workdir, selection))}
  assert set(final) == {"scratch", "simclr", "simclr_linear"}
  # A subset of the arms (another process runs scratch) plans and validates without scratch.
  subset = study.final_sweep(config, workdir, selection, arms=("simclr", "simclr_linear"))
  os.makedirs(os.path.join(workdir, "pretrain", "checkpoints", "1"))
  assert {r.init for r in sweep_plan.validate(subset, check_runs=False)} == {"simclr",
                                                                         "simclr_linear"}
  assert final["scratch"]["total_epochs"] == 300.0
  assert final["scratch"]["optimizer.learning_rate"] == 0.003
  assert final["scratch"]["data.train_ops"] == study_config.AUG
  assert final["simclr"]["total_epochs"] == 100.0 and "data.train_ops" not in final["simclr"]
  assert final["simclr"]["encoder_frozen_fraction"] == 0.5
  # The control takes simclr's setup and freezes the encoder.
  assert final["simclr_linear"]["total_epochs"] == 100.0
  assert final["simclr_linear"]["finetune_mode"] == "linear"
  for overrides in final.values():
    test, zero_shot = overrides["test_sets"]
    assert test == "test" and zero_shot.startswith("adult_cxr=test@medmnist:")
  one = study.distill_sweep(config, workdir, selection, students=("scratch_distilled",))
  assert {r.init for r in sweep_plan.plan_runs(one)} == {"scratch_distilled"}
  students = {r.init: dict(r.overrides) for r in
              sweep_plan.plan_runs(study.distill_sweep(config, workdir, selection))}
  assert students["scratch_distilled"]["model.init"] == ""
  assert students["simclr_distilled"]["model.init"] == os.path.join(workdir, "pretrain")
  for name, teacher in (("scratch_distilled", "scratch"), ("simclr_distilled", "simclr")):
    assert students[name]["distill.teacher"] == os.path.join(
        workdir, "final", f"init={teacher}/frac={{label_fraction:g}}/seed={{label_fraction_seed}}")
    assert students[name]["total_epochs"] == 20.0 and students[name]["loss.class_weights"] == ""
  assert students["scratch_distilled"]["optimizer.learning_rate"] == 0.003


@pytest.mark.parametrize("key, value, match", [
    ("data_path", "", "data_path is empty"),
    ("baseline", "nope", "baseline='nope' is not an arm"),
])
def test_bad_study_config_is_refused_by_key(tmp_path, key, value, match):
  config = full_config(tmp_path)
  config[key] = value
  with pytest.raises(ValueError, match=match):
    study.run_study(config, str(tmp_path / "s"), stages=("select",), verbose=False)
  config = full_config(tmp_path)
  config.arms.simclr_linear.setup_from = "simclr_linear"
  with pytest.raises(ValueError, match="setup_from='simclr_linear'"):
    study.check_config(config)


def _write_results(path, test_sets):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "results.json"), "w") as f:
    json.dump({"finished": True, "steps": 1, "num_train_labels": 3, "wall_time_s": 1.0,
               "best": {"step": 1, "value": 0.7},
               "test_sets": {name: {"metrics": {"macro_auc": value}}
                             for name, value in test_sets.items()}}, f)


def _tuned(config, workdir):
  """Every tuning run written as finished (validation only) and the selection made."""
  tune = study.tune_sweep(config, workdir)
  for run in sweep_plan.plan_runs(tune):
    _write_results(sweep_run.run_dir(os.path.join(workdir, "tune"), run), {"validation": 0.8})
  selection = study.select(config, study._rows(tune, os.path.join(workdir, "tune")))  # pylint: disable=protected-access
  with open(os.path.join(workdir, study.SELECTION_FILE), "w") as f:
    json.dump(selection, f)
  return tune, selection


def test_report_counts_the_test_reads_and_refuses_a_tuning_run_that_read_test(tmp_path):
  config = smoke(tmp_path)
  workdir = str(tmp_path / "study")
  tune, selection = _tuned(config, workdir)
  for stage, sweep_config in (("final", study.final_sweep(config, workdir, selection)),
                              ("distill", study.distill_sweep(config, workdir, selection))):
    for run in sweep_plan.plan_runs(sweep_config):
      _write_results(sweep_run.run_dir(os.path.join(workdir, stage), run),
                     {"test": 0.7 + 0.1 * (run.init != "scratch")})
  out = study.run_study(config, workdir, stages=("report",), verbose=False)["report"]
  assert out["test_reads"] == 3  # scratch, simclr, scratch_distilled at one fraction and seed
  with open(os.path.join(workdir, "report", "summary.md")) as f:
    summary = f.read()
  assert "Test split scored 3 times" in summary and "(chosen)" in summary
  # The headline: simclr 0.8 against scratch 0.7 on the same subset, one seed (no interval).
  assert "| simclr | 0.800 (1); +0.100 (1) |" in summary
  assert "| scratch | 0.700 (1) |" in summary
  # A tuning run that scored test breaks the protocol: the report says so and stops.
  run = sweep_plan.plan_runs(tune)[0]
  _write_results(sweep_run.run_dir(os.path.join(workdir, "tune"), run),
                 {"validation": 0.8, "test": 0.9})
  with pytest.raises(RuntimeError, match="tuning runs scored the test split"):
    study.run_study(config, workdir, stages=("report",), verbose=False)


# ------------------------------------------------------------------------ end to end
def test_study_command_end_to_end_on_generated_data(tmp_path):
  """Pretraining, tuning, selection, final runs and the report (no students: distillation has
  its own tests), then a rerun that finds everything finished."""
  config = smoke(tmp_path)
  config.distill.students = ml_collections.ConfigDict()
  # CPU for the suite: the pretraining's monitors (kNN, linear probe) and Grain worker processes
  # have tests of their own; a constant learning rate makes the 1- and 2-epoch setups one
  # compiled program (a cosine bakes each run's length into its update step).
  config.pretrain.overrides.knn = {"every_steps": 0}
  config.pretrain.overrides.linear_probe = {"enabled": False}
  config.pretrain.overrides.data.worker_count = 0
  config.overrides.optimizer = {"schedule": "constant"}
  workdir = str(tmp_path / "study")
  out = study.run_study(config, workdir, verbose=False)
  assert os.path.isdir(os.path.join(workdir, "pretrain", "checkpoints"))
  assert out["tune"]["counts"] == {"finished": 2}
  assert out["selection"]["scratch"]["setup"] in ("ep1", "ep2")
  assert out["final"]["counts"] == {"finished": 2}
  report = out["report"]
  assert report["test_reads"] == 2
  for entry in report["cells"]:
    assert entry["test_set"] == "test" and 0.0 <= entry["auc_mean"] <= 1.0
  with open(os.path.join(workdir, "final", "init=simclr", "frac=0.5", "seed=0",
                         "config.json")) as f:
    run_config = json.load(f)
  assert run_config["model"]["init"] == os.path.join(workdir, "pretrain")
  assert run_config["total_epochs"] == {"ep1": 1.0, "ep2": 2.0}[
      out["selection"]["scratch"]["setup"]]
  again = study.run_study(config, workdir, stages=("pretrain", "tune", "final"), verbose=False)
  assert again["tune"]["counts"] == {"skipped": 2} and again["final"]["counts"] == {"skipped": 2}
  assert not math.isnan(report["cells"][0]["auc_mean"])


# ------------------------------------------------------------------------ the new-site study
def adult_smoke(tmp_path, **keys):
  from configs.studies import adult_cxr  # pylint: disable=g-import-not-at-top
  config = adult_cxr.get_config("smoke")
  config.data_path = str(write_npz(tmp_path / "site_b.npz", seed=1))
  config.source_data_path = str(write_npz(tmp_path / "site_a.npz", seed=0))
  for key, value in keys.items():
    config[key] = value
  return config


def test_new_site_study_pretrains_on_both_sites_and_starts_from_the_source_encoder(tmp_path):
  from configs.studies import adult_cxr  # pylint: disable=g-import-not-at-top
  from data_pipelines import sources  # pylint: disable=g-import-not-at-top
  config = adult_smoke(tmp_path)
  overrides = study.pretrain_overrides(config)
  assert overrides["data.path"] == config.data_path
  assert overrides["data.pretrain_split"] == f"train+train@medmnist:{config.source_data_path}"
  both = sources.build_source({"source": "medmnist", "path": overrides["data.path"]},
                              overrides["data.pretrain_split"], labels_optional=True)
  assert len(both) == 64 + 64  # every training image of both sites, no validation or test
  with pytest.raises(ValueError, match="source 'csv' cannot be read as another dataset"):
    sources.build_source({"source": "medmnist", "path": overrides["data.path"]},
                         "train+train@csv:/x.csv")
  config.source_data_path = ""
  with pytest.raises(ValueError, match="needs config.source_data_path"):
    study.pretrain_overrides(config)

  full = adult_cxr.get_config()
  full.data_path = config.data_path
  with pytest.raises(ValueError, match="needs config.source_pretrain"):
    study.check_config(full)
  full.source_pretrain = str(tmp_path / "source_study" / "pretrain")
  # Every arm takes the setup fixed before the study: nothing to tune, the choice recorded.
  workdir = str(tmp_path / "s")
  assert study.tune_sweep(full, workdir) is None
  selection = study.select(full, [])
  assert selection == {arm: {"setup": adult_cxr.SETUP, "fixed": True, "scores": {}}
                       for arm in ("scratch", "simclr_source", "simclr_both")}
  assert "`ep300_lr3e-3_aug`, fixed before the study" in study.selection_table(
      selection, full.metric)
  runs = sweep_plan.plan_runs(study.final_sweep(full, workdir, selection))
  # Every arm at 1-10% of the labels; scratch also at 100% (final.baseline_fraction).
  cells = {(r.init, r.label_fraction) for r in runs}
  assert cells == {(arm, f) for arm in ("scratch", "simclr_source", "simclr_both")
                   for f in (0.01, 0.02, 0.05, 0.1)} | {("scratch", 1.0)}
  assert len(runs) == len(cells) * 5
  inits = {r.init: r.init_path for r in runs}
  assert inits == {"scratch": "", "simclr_source": full.source_pretrain,
                   "simclr_both": os.path.join(workdir, "pretrain")}
  setup = study_config.tuning_grid()[adult_cxr.SETUP]
  for run in runs:
    overrides = dict(run.overrides)
    assert overrides["total_epochs"] == setup["total_epochs"]
    assert overrides["optimizer.learning_rate"] == setup["optimizer"]["learning_rate"]
    assert overrides["data.train_ops"] == setup["data"]["train_ops"]
    assert overrides.get("encoder_frozen_fraction") == (None if run.init == "scratch" else 0.5)
  full.arms.scratch.setup_from = "ep5"
  with pytest.raises(ValueError, match="setup_from='ep5'.*a setup of tune.grid"):
    study.check_config(full)
  full.arms.scratch.setup_from = adult_cxr.SETUP
  full.final.baseline_fraction = 1.5
  with pytest.raises(ValueError, match=r"final.baseline_fraction=1.5; expected a fraction"):
    study.check_config(full)


def test_new_site_report_has_the_raw_pixel_row_and_the_matching_fraction(tmp_path):
  config = adult_smoke(tmp_path)
  workdir = str(tmp_path / "study")
  tune, selection = _tuned(config, workdir)
  # scratch 0.7 at 50% and 0.8 at 100% (its reference cell, run for scratch alone); the SimCLR
  # arm 0.85 at 50%: it matches there.
  runs = sweep_plan.plan_runs(study.final_sweep(config, workdir, selection))
  assert {(r.init, r.label_fraction) for r in runs} == {
      ("scratch", 0.5), ("scratch", 1.0), ("simclr_both", 0.5)}
  for run in runs:
    value = 0.85 if run.init == "simclr_both" else 0.7 + 0.1 * (run.label_fraction == 1.0)
    _write_results(sweep_run.run_dir(os.path.join(workdir, "final"), run), {"test": value})
  out = study.run_study(config, workdir, stages=("report",), verbose=False)["report"]
  assert out["test_reads"] == 3
  raw = [c for c in out["cells"] if c["init"] == "raw_pixels"]
  assert [c["label_fraction"] for c in raw] == [0.5, 1.0]
  assert all(0.0 <= c["auc_mean"] <= 1.0 for c in raw)
  match = {m["init"]: m for m in out["matches"]}
  assert match["simclr_both"]["status"] == "matches"
  assert match["simclr_both"]["match_fraction"] == 0.5
  with open(os.path.join(workdir, "report", "summary.md")) as f:
    assert "raw-pixel baseline (C chosen on validation) scored it 2 more times" in f.read()


def test_the_tuned_config_is_the_setup_the_study_chose():
  """configs/finetune.py:pneumoniamnist_tuned holds the grid setup both arms chose."""
  from configs import finetune  # pylint: disable=g-import-not-at-top
  tuned = finetune.get_config("pneumoniamnist_tuned")
  chosen = study_config.tuning_grid()["ep300_lr3e-3_aug"]
  assert tuned.total_epochs == chosen["total_epochs"]
  assert tuned.optimizer.learning_rate == chosen["optimizer"]["learning_rate"]
  assert tuned.data.train_ops == chosen["data"]["train_ops"]
  rest = finetune.get_config("pneumoniamnist")
  for key in ("total_epochs", "optimizer", "data"):
    rest[key] = tuned[key]
  assert rest.to_dict() == dict(tuned.to_dict(), variant="pneumoniamnist")
