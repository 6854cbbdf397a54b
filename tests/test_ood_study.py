"""OOD study: the two steps' configs (sites, test sets), validation of both steps before any
run, the headline on hand-made numbers (matches / never), and the outputs, with a stand-in
trainer that checks every run trains and validates at the right site."""

import csv
import json
import os

import ml_collections
import pytest

from configs.sweeps import ood_tiny
from experiments import sweep_plan
from experiments import ood_study
from remedis_jax import train_finetune

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_fake_export(path):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "model.json"), "w") as f:
    json.dump({"model_name": "R_micro"}, f)
  return str(path)


def smoke_ood(remedis_path, fractions=(0.25, 1.0), seeds=(0, 1)):
  config = ood_study.default_ood_config()
  config.base = "configs/finetune.py:smoke"
  config.inits = ml_collections.ConfigDict({"scratch": "", "remedis": remedis_path})
  config.label_fractions = tuple(fractions)
  config.seeds = tuple(seeds)
  config.overrides = ml_collections.ConfigDict({"robustness": {"perturbations": ()}})
  return config


def test_step_configs_train_at_site_a_then_site_b(tmp_path):
  config = smoke_ood(write_fake_export(tmp_path / "export"))
  step1, step2 = ood_study.step_configs(config)
  runs1, runs2 = sweep_plan.validate(step1), sweep_plan.validate(step2)
  assert [r.run_id for r in runs1] == [f"init={i}/frac=1/seed={s}"
                                       for i in ("remedis", "scratch") for s in (0, 1)]
  assert len(runs2) == 2 * 2 * 2
  base = sweep_plan.load_config_file(config.base)
  first = sweep_plan.build_run_config(step1, runs1[0], base)
  assert (first.data.sites.train, first.data.sites.val) == ("A", "A")
  assert tuple(first.test_sets) == ("site_A=test@A", "site_B=test@B", "site_C=test@C")
  assert first.label_fraction == 1.0 and tuple(first.robustness.perturbations) == ()
  second = sweep_plan.build_run_config(step2, runs2[0], base)
  assert (second.data.sites.train, second.data.sites.val) == ("B", "B")
  assert tuple(second.test_sets) == ("site_B=test@B",)
  # The shipped quickstart-scale config plans 4 + 12 runs.
  tiny1, tiny2 = ood_study.step_configs(ood_tiny.get_config())
  assert (len(sweep_plan.plan_runs(tiny1)), len(sweep_plan.plan_runs(tiny2))) == (4, 12)


@pytest.mark.parametrize("change, error, match", [
    (dict(site_b="E"), ValueError, r"unknown site\(s\) \['E'\]"),
    (dict(site_b="A"), ValueError, "step 2 needs a new site"),
    (dict(zero_shot_sites=("A", "C")), ValueError, "contains site_a='A'"),
    (dict(headline_init="bit"), ValueError, "unknown init"),
    (dict(label_fractions=(0.0, 1.0)), ValueError, r"must be in \(0, 1\]"),
    (dict(inits={"scratch": "", "remedis": "/nonexistent/simclr"}), FileNotFoundError,
     "inits.remedis='/nonexistent/simclr' does not exist"),
])
def test_mistakes_in_either_step_are_rejected_before_any_run(tmp_path, monkeypatch, change,
                                                             error, match):
  def no_training(*args):
    raise AssertionError("a bad OOD config reached training")
  monkeypatch.setattr(train_finetune, "train_and_evaluate", no_training)
  config = smoke_ood(write_fake_export(tmp_path / "export"))
  for key, value in change.items():
    config[key] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
  with pytest.raises(error, match=match):
    ood_study.run_ood_study(config, str(tmp_path / "ood"), verbose=False)
  assert not (tmp_path / "ood").exists()


class SiteCheckingTrainer:
  """Writes results.json with hand-made AUCs and checks where each run trains.

  Step 1 (site A): in distribution 0.9, zero-shot lower. Step 2 (site B): scratch
  0.8 - 0.2 (1 - f), remedis remedis_at_100 - 0.1 (1 - f). Each seed adds 0.002.
  """

  def __init__(self, remedis_at_100=0.80):
    self.calls = []
    self.remedis_at_100 = remedis_at_100

  def __call__(self, config, workdir):
    self.calls.append(workdir)
    sites = (config.data.sites.train, config.data.sites.val)
    is_remedis = bool(config.model.init)
    if "step1_site_A" in workdir:
      assert sites == ("A", "A") and config.label_fraction == 1.0
      aucs = {"site_A": 0.9, "site_B": 0.8 if is_remedis else 0.6, "site_C": 0.55}
    else:
      assert "step2_site_B" in workdir and sites == ("B", "B")
      f = config.label_fraction
      aucs = {"site_B": (self.remedis_at_100 - 0.1 * (1 - f)) if is_remedis else 0.8 - 0.2 * (1 - f)}
    assert set(aucs) == {t.partition("=")[0] for t in config.test_sets}
    results = {"format": train_finetune.RESULTS_FORMAT, "finished": True, "steps": 4,
               "num_train_labels": 1, "best": {"step": 4, "value": 0.5},
               "test_sets": {k: {"metrics": {"macro_auc": v + 0.002 * config.seed,
                                             "accuracy": 0.5}} for k, v in aucs.items()}}
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(results, f)
    return results


def test_ood_outputs_and_headline(tmp_path, monkeypatch):
  trainer = SiteCheckingTrainer()
  monkeypatch.setattr(train_finetune, "train_and_evaluate", trainer)
  config = smoke_ood(write_fake_export(tmp_path / "export"))
  workdir = tmp_path / "ood"
  summary = ood_study.run_ood_study(config, str(workdir), verbose=False)
  assert len(trainer.calls) == 4 + 8 and not summary["failed"] and not summary["preempted"]
  # scratch @ 100% of site B: 0.801 mean; remedis: 0.726 at 25%, 0.801 at 100% -> matches at
  # 100% only (>= holds with equality).
  assert summary["headline"].startswith(
      "**remedis matches the supervised baseline (scratch) retrained on 100% of site-B labels "
      "with 100% of the site-B labels**")
  with open(workdir / "ood_results.csv") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 4 * 3 + 8 * 1
  assert {r["step"] for r in rows} == {"1_site_A", "2_site_B"}
  zero_shot = {(r["init"], r["test_set"]) for r in rows if r["step"] == "1_site_A"}
  assert zero_shot == {(i, f"site_{s}") for i in ("scratch", "remedis") for s in "ABC"}
  stored = json.loads((workdir / "ood_results.json").read_text())
  assert stored["format"] == "remedis-jax-ood-results/1" and stored["headline"] == summary["headline"]
  step1 = {(c["init"], c["test_set"]): c["auc_mean"] for c in stored["step1_cells"]}
  assert step1[("remedis", "site_B")] == pytest.approx(0.801)
  assert step1[("scratch", "site_B")] == pytest.approx(0.601)
  with open(workdir / "ood.png", "rb") as f:
    assert f.read(8) == PNG_MAGIC
  table = (workdir / "ood_summary.md").read_text()
  # mean +- std [95% t-interval: 12.706 * 0.001414 / sqrt(2) = 0.0127 either side] (n)
  assert "site B (zero-shot)" in table and ("| remedis | 0.901 +- 0.001 [0.888, 0.914] (2) | "
                                            "0.801 +- 0.001 [0.788, 0.814] (2) | "
                                            "0.551 +- 0.001 [0.538, 0.564] (2) |") in table
  # Paired per seed against scratch at the same fraction: zero-shot at site B (step 1) and
  # site-B fine-tuning at 25% (step 2); the fake trainer shifts both inits by seed alike.
  assert "Paired difference vs `scratch` at the same fraction" in table
  paired1 = {p["test_set"]: p for p in stored["step1_paired"]}
  assert (paired1["site_B"]["n"], paired1["site_B"]["mean"]) == (2, pytest.approx(0.2))
  paired2 = {p["label_fraction"]: p for p in stored["step2_paired"]}
  assert paired2[0.25]["seeds"] == [0, 1] and paired2[0.25]["mean"] == pytest.approx(0.075)

  # A better representation matches earlier; a worse one never does (reported, not "100%").
  for remedis_at_100, expected in ((0.9, "with 25% of the site-B labels"),
                                   (0.75, "**remedis never matches")):
    monkeypatch.setattr(train_finetune, "train_and_evaluate", SiteCheckingTrainer(remedis_at_100))
    other = tmp_path / f"ood_{remedis_at_100}"
    assert expected in ood_study.run_ood_study(config, str(other), verbose=False)["headline"]

  # Rerun: everything is finished, nothing trains.
  trainer.calls.clear()
  monkeypatch.setattr(train_finetune, "train_and_evaluate", trainer)
  again = ood_study.run_ood_study(config, str(workdir), verbose=False)
  assert not trainer.calls and again["headline"] == summary["headline"]


def test_ood_job_lists(tmp_path):
  config = smoke_ood(write_fake_export(tmp_path / "export"))
  summary = ood_study.run_ood_study(config, str(tmp_path / "ood"), mode="joblist", verbose=False)
  step1, step2 = (open(p).read().splitlines() for p in summary["jobs_files"])
  assert len(step1) == 4 and len(step2) == 8
  assert all("--config.data.sites.train=A" in line for line in step1)
  assert all("--config.data.sites.train=B" in line for line in step2)


def test_a_preemption_in_step_1_stops_the_study_before_step_2(tmp_path, monkeypatch):
  trainer = SiteCheckingTrainer()
  calls = []

  def preempted_first(config, workdir):  # the first run saves on SIGTERM and returns unfinished
    calls.append(workdir)
    return {"finished": False, "preempted": True} if len(calls) == 1 else trainer(config, workdir)

  monkeypatch.setattr(train_finetune, "train_and_evaluate", preempted_first)
  config = smoke_ood(write_fake_export(tmp_path / "export"))
  summary = ood_study.run_ood_study(config, str(tmp_path / "ood"), verbose=False)
  assert summary["preempted"] and summary["step2"] is None and len(calls) == 1
  assert summary["step1"]["counts"] == {"interrupted": 1, "pending": 3}
  assert not (tmp_path / "ood" / "ood_results.csv").exists()


def test_a_preemption_in_step_2_is_reported_as_preempted(tmp_path, monkeypatch):
  # What makes `python -m experiments.ood_study` exit with EXIT_PREEMPTED, not 0.
  trainer = SiteCheckingTrainer()
  calls = []

  def preempted_in_step_2(config, workdir):  # step 1 has 4 runs; the 5th is step 2's first
    calls.append(workdir)
    if len(calls) == 5:
      return {"finished": False, "preempted": True}
    return trainer(config, workdir)

  monkeypatch.setattr(train_finetune, "train_and_evaluate", preempted_in_step_2)
  config = smoke_ood(write_fake_export(tmp_path / "export"))
  summary = ood_study.run_ood_study(config, str(tmp_path / "ood"), verbose=False)
  assert summary["preempted"] and len(calls) == 5 and not summary["failed"]
  assert summary["step2"]["counts"]["interrupted"] == 1
