"""Label-fraction sweep `init_overrides` (per-init config keys, e.g. a ViT init beside a ResNet
scratch baseline): planning, validation before anything is written, backwards compatibility, the
in-process and job-list paths, and the configs/sweeps/gmml_tiny.py grid."""

import json
import os
import shlex

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from configs.sweeps import pneumoniamnist, pneumoniamnist_recipes
from configs.sweeps import common as sweep_configs
from experiments import label_fraction_sweep as sweep
from experiments import sweep_plan
from experiments import sweep_run
from remedis_jax import train_finetune

VIT = "ViT-micro/4"


def _sweep(init_overrides=None, inits=(("scratch", ""), ("vit", ""))):
  config = sweep_configs.default_sweep_config()
  config.base = "configs/finetune.py:smoke"
  config.inits = ml_collections.ConfigDict(dict(inits))
  config.label_fractions = (0.5,)
  config.seeds = (0, 1)
  config.baseline_fraction = 0.5
  config.overrides = ml_collections.ConfigDict({
      "robustness": {"perturbations": ()}, "test_sets": ("test@A",),
      "optimizer": {"learning_rate": 0.05}})
  if init_overrides is not None:
    config.init_overrides = init_overrides
  return config


def _vit_overrides(**extra):
  block = {"model": {"name": VIT}}
  block.update(extra)
  return ml_collections.ConfigDict({"vit": block})


def _by_init(runs):
  return {run.init: dict(run.overrides) for run in runs}


def test_init_overrides_apply_to_that_init_only_and_win_over_shared_keys():
  config = _sweep(_vit_overrides(optimizer={"learning_rate": 0.01}))
  runs = sweep_plan.validate(config)
  assert len(runs) == 4
  per_init = _by_init(runs)
  assert per_init["vit"]["model.name"] == VIT
  assert per_init["vit"]["optimizer.learning_rate"] == 0.01
  assert "model.name" not in per_init["scratch"]
  assert per_init["scratch"]["optimizer.learning_rate"] == 0.05
  base = sweep_plan.load_config_file(config.base)
  for run in runs:
    built = sweep_plan.build_run_config(config, run, base)
    assert built.model.name == (VIT if run.init == "vit" else "R_micro")
    assert built.seed == built.label_fraction_seed == run.seed  # grid keys untouched
  # Plain dicts with dotted keys (the brief's spelling) mean the same.
  dotted = _sweep()
  dotted.init_overrides = ml_collections.ConfigDict()
  dotted_runs = sweep_plan.plan_runs(_PlainInitOverrides(
      dotted, {"vit": {"model.name": VIT, "optimizer.learning_rate": 0.01}}))
  assert [r.overrides for r in dotted_runs] == [r.overrides for r in runs]


class _PlainInitOverrides:
  """A sweep config whose init_overrides is a plain dict (dotted keys are legal there)."""

  def __init__(self, config, init_overrides):
    self._config, self._init_overrides = config, init_overrides

  def get(self, key, default=None):
    return self._init_overrides if key == "init_overrides" else self._config.get(key, default)

  def __getattr__(self, key):
    return getattr(self._config, key)


def test_absent_or_empty_init_overrides_change_nothing():
  with_empty = sweep_plan.plan_runs(_sweep())
  legacy = _sweep()
  del legacy["init_overrides"]  # a sweep config written before the key existed
  assert "init_overrides" not in legacy
  assert sweep_plan.plan_runs(legacy) == with_empty
  assert all("model.name" not in dict(r.overrides) for r in with_empty)
  sweep_plan.validate(legacy, check_runs=False)


@pytest.mark.parametrize("init_overrides, error, match", [
    ({"gmml_vit": {"model": {"name": VIT}}}, ValueError,
     r"init_overrides.gmml_vit: 'gmml_vit' is not one of the inits \(scratch, vit\); unknown init"),
    ({"vit": {"model": {"init": "/elsewhere"}}}, ValueError,
     r"init_overrides.vit sets \['model.init'\], which the grid sets"),
    ({"vit": {"seed": 3}}, ValueError, r"init_overrides.vit sets \['seed'\]"),
    ({"vit": {"model": {"nmae": VIT}}}, KeyError,
     r"sweep config init_overrides.vit: 'model.nmae' is not a key of the base config"),
    ({"vit": {"model": {"name": VIT}, "optimizer": {"learning_rate": "fast"}}}, TypeError,
     r"init_overrides.vit: optimizer.learning_rate='fast' does not fit"),
])
def test_mistakes_are_rejected_before_anything_runs_or_is_written(tmp_path, monkeypatch,
                                                                  init_overrides, error, match):
  def no_training(*args):
    raise AssertionError("a bad sweep config reached training")
  monkeypatch.setattr(train_finetune, "train_and_evaluate", no_training)
  config = _sweep(ml_collections.ConfigDict(init_overrides))
  workdir = tmp_path / "sweep"
  with pytest.raises(error, match=match):
    sweep.run_sweep(config, str(workdir), verbose=False)
  assert not workdir.exists()


def test_in_process_runs_and_job_list_get_the_init_model(tmp_path, monkeypatch):
  seen = {}

  def fake_training(config, workdir):
    seen[os.path.relpath(workdir, tmp_path / "sweep")] = config.model.name
    results = {"format": train_finetune.RESULTS_FORMAT, "finished": True, "steps": 4,
               "total_steps": 4, "wall_time_s": 1.0, "num_train_labels": 48,
               "best": {"metric": "macro_auc", "split": "val", "step": 4, "value": 0.5},
               "test_sets": {"test_A": {"split": "test", "sites": "A", "num_examples": 32,
                                        "roc_file": "", "metrics": {"macro_auc": 0.6}}}}
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "results.json"), "w", encoding="utf-8") as f:
      json.dump(results, f)
    return results

  monkeypatch.setattr(train_finetune, "train_and_evaluate", fake_training)
  config = _sweep(_vit_overrides())
  summary = sweep.run_sweep(config, str(tmp_path / "sweep"), verbose=False)
  assert summary["counts"] == {"finished": 4}
  assert seen == {f"init={i}/frac=0.5/seed={s}": (VIT if i == "vit" else "R_micro")
                  for i in ("scratch", "vit") for s in (0, 1)}
  plan = json.loads((tmp_path / "sweep" / sweep_plan.PLAN_FILE).read_text())
  assert {r["run_id"]: r["overrides"].get("model.name") for r in plan["runs"]} == {
      f"init={i}/frac=0.5/seed={s}": (VIT if i == "vit" else None)
      for i in ("scratch", "vit") for s in (0, 1)}

  # The subprocess command line of a ViT run parses back to the ViT config.
  run = next(r for r in sweep_plan.plan_runs(config) if r.init == "vit")
  argv = sweep_run.run_command(config, run, str(tmp_path / "sweep"))
  assert f"--config.model.name={VIT}" in argv
  main_args = shlex.split(shlex.join(argv[3:]))  # through a shell's quoting, as jobs.txt is
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True,
                                  sys_argv=["prog", *main_args])
  flags.DEFINE_string("workdir", None, "", flag_values=flag_values)
  flag_values(["prog", *main_args])
  assert flag_values.config.to_dict() == sweep_plan.build_run_config(config, run).to_dict()


def test_gmml_tiny_sweep_config(tmp_path, monkeypatch):
  scratch_only = sweep_plan.load_config_file("configs/sweeps/gmml_tiny.py:scratch")
  assert set(scratch_only.inits) == {"scratch", "vit_scratch"}
  runs = sweep_plan.validate(scratch_only, check_runs=False)
  assert len(runs) == 2 * 3 * 2
  names = {r.init: dict(r.overrides).get("model.name") for r in runs}
  assert names == {"scratch": None, "vit_scratch": "ViT-tiny/4"}

  full = sweep_plan.load_config_file("configs/sweeps/gmml_tiny.py")
  assert full.inits.gmml_vit == "workdirs/gmml/pretrain"
  assert full.init_overrides.gmml_vit.model.name == "ViT-tiny/4"
  # The pretraining workdir is checked like any init: missing -> named, with the fix.
  monkeypatch.chdir(tmp_path)
  with pytest.raises(FileNotFoundError, match=r"inits.gmml_vit='.*workdirs/gmml/pretrain'"):
    sweep_plan.validate(full, check_runs=False)
  (tmp_path / "workdirs" / "gmml" / "pretrain" / "checkpoints" / "10").mkdir(parents=True)
  runs = sweep_plan.validate(full, check_runs=False)
  gmml = [r for r in runs if r.init == "gmml_vit"]
  assert len(gmml) == 6 and all(
      dict(r.overrides)["model.init"] == str(tmp_path / "workdirs/gmml/pretrain") and
      dict(r.overrides)["model.name"] == "ViT-tiny/4" for r in gmml)
  with pytest.raises(ValueError, match="unknown argument 'vit'"):
    sweep_plan.load_config_file("configs/sweeps/gmml_tiny.py:vit")


def test_overrides_never_leak_into_the_base_or_later_runs():
  # Regression: ConfigDict(base) shares nested blocks, so a ViT run built first (gmml_vit sorts
  # before scratch) turned the later scratch runs of the same in-process sweep into ViTs.
  base = ml_collections.ConfigDict({"model": {"name": "R_micro", "init": ""}, "seed": 0})
  vit = sweep_plan.apply_overrides(base, [("model.name", VIT), ("model.init", "x")])
  later = sweep_plan.apply_overrides(base, [("seed", 1)])
  assert vit.model.name == VIT and base.model.name == "R_micro" and base.model.init == ""
  assert later.model.name == "R_micro" and later.model.init == ""


def test_gmml_tiny_vit_inits_use_the_tiny_vit_recipe():
  from configs import finetune  # pylint: disable=g-import-not-at-top
  config = sweep_plan.load_config_file("configs/sweeps/gmml_tiny.py")
  variant = finetune.get_config("tiny_vit")
  for run in sweep_plan.plan_runs(config):
    built = sweep_plan.build_run_config(config, run)
    if run.init == "scratch":
      assert built.model.name == "R_tiny" and built.optimizer.name == "sgd"
    else:
      assert built.model.name == variant.model.name == "ViT-tiny/4"
      assert built.optimizer.to_dict() == variant.optimizer.to_dict()


def test_pneumoniamnist_encoder_sweep_fine_tunes_every_encoder_alike(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  workdirs = {"steps_1500": "simclr_pneumoniamnist", "steps_3000": "simclr_pneumoniamnist_3000",
              "small_s2": "simclr_pneumoniamnist_small_s2", "r_small": "simclr_pneumoniamnist_r_small"}
  for name in workdirs.values():
    (tmp_path / "workdirs" / name / "checkpoints" / "1500").mkdir(parents=True)
  config = sweep_plan.load_config_file("configs/sweeps/pneumoniamnist_encoders.py")
  runs = sweep_plan.validate(config, check_runs=False)
  assert sorted({run.init for run in runs}) == sorted(workdirs)
  assert len(runs) == 4 * 2 * 3  # four encoders, 1% and 10%, seeds 0-2
  chosen = pneumoniamnist_recipes.RECIPES[pneumoniamnist.SIMCLR_RECIPE]
  for run in runs:
    built = sweep_plan.build_run_config(config, run)
    assert tuple(built.test_sets) == ("validation=val",)  # never the test split
    assert built.model.init.endswith("workdirs/" + workdirs[run.init])
    # The encoder's own keys on top of the recipe, which stays whole.
    assert built.model.stem == ("small_s2" if run.init == "small_s2" else "bit")
    assert built.model.name == ("R_small" if run.init == "r_small" else "R_tiny")
    assert built.encoder_frozen_fraction == chosen.get("encoder_frozen_fraction", 0.0)
    assert built.total_epochs == chosen.get("total_epochs", 100.0)
    assert built.loss.class_weights == chosen.get("loss", {}).get("class_weights", "")
  nested = pneumoniamnist_recipes.merged({"model": {"from_head_layer": True}, "seed": 1},
                                         {"model": {"stem": "small_s2"}})
  assert nested == {"model": {"from_head_layer": True, "stem": "small_s2"}, "seed": 1}
  # Round 2 (the input of fine-tuning) is scored on validation too.
  config = sweep_plan.load_config_file("configs/sweeps/pneumoniamnist_input_recipes.py")
  runs = sweep_plan.validate(config, check_runs=False)
  assert len(runs) == 4 * 3
  assert all(tuple(sweep_plan.build_run_config(config, run).test_sets) == ("validation=val",)
             for run in runs)


def test_pneumoniamnist_sweeps_choose_on_validation_and_apply_the_choice(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  for name in ("simclr_pneumoniamnist", "simclr_pneumoniamnist_small_s2"):
    (tmp_path / "workdirs" / name / "checkpoints" / "1500").mkdir(parents=True)
  # The recipe search: one init per recipe, each with its own keys, scored on validation only.
  search = sweep_plan.load_config_file("configs/sweeps/pneumoniamnist_recipes.py")
  runs = sweep_plan.validate(search, check_runs=False)
  assert len(runs) == len(pneumoniamnist_recipes.RECIPES) * 2 * 3  # 1% and 10%, seeds 0-2
  for run in runs:
    built = sweep_plan.build_run_config(search, run)
    assert tuple(built.test_sets) == ("validation=val",)
    recipe = pneumoniamnist_recipes.RECIPES[run.init]
    assert built.encoder_lr_multiplier == recipe.get("encoder_lr_multiplier", 1.0)
    assert built.encoder_frozen_fraction == recipe.get("encoder_frozen_fraction", 0.0)
    assert built.finetune_mode == recipe.get("finetune_mode", "full")
    assert built.total_epochs == recipe.get("total_epochs", 100.0)  # the MedMNIST v2 protocol
    assert built.loss.class_weights == recipe.get("loss", {}).get("class_weights", "")
  # The headline sweep: the chosen encoder and recipe for the SimCLR init only; scratch keeps
  # the protocol (and BiT's stem).
  headline = sweep_plan.load_config_file("configs/sweeps/pneumoniamnist.py")
  chosen = pneumoniamnist_recipes.RECIPES[pneumoniamnist.SIMCLR_RECIPE]
  encoder_workdir, needs = pneumoniamnist_recipes.ENCODERS[pneumoniamnist.SIMCLR_ENCODER]
  runs = sweep_plan.validate(headline, check_runs=False)
  assert len(runs) == 7 * 3 * 2
  for run in runs:
    built = sweep_plan.build_run_config(headline, run)
    assert tuple(built.test_sets) == ("test",)
    expected = chosen if run.init == "simclr" else {}
    if run.init == "simclr":
      assert built.model.init.endswith(encoder_workdir)
      assert built.model.stem == needs.get("model", {}).get("stem", "bit")
    else:
      assert built.model.init == "" and built.model.stem == "bit"
    assert built.encoder_lr_multiplier == expected.get("encoder_lr_multiplier", 1.0)
    assert built.finetune_mode == expected.get("finetune_mode", "full")
    assert built.encoder_frozen_fraction == expected.get("encoder_frozen_fraction", 0.0)
    assert built.total_epochs == expected.get("total_epochs", 100.0)
    assert built.loss.class_weights == expected.get("loss", {}).get("class_weights", "")
  assert set(sweep_plan.load_config_file("configs/sweeps/pneumoniamnist.py:scratch").inits) == {
      "scratch"}
  # ':RECIPE@ENCODER' fine-tunes that encoder with that recipe (the earlier study's table,
  # head_first@steps_1500); ':RECIPE' keeps SIMCLR_ENCODER.
  table = sweep_plan.load_config_file("configs/sweeps/pneumoniamnist.py:head_first@steps_1500")
  for run in sweep_plan.validate(table, check_runs=False):
    built = sweep_plan.build_run_config(table, run)
    assert built.encoder_frozen_fraction == (0.5 if run.init == "simclr" else 0.0)
    assert built.total_epochs == 100.0
    assert built.model.stem == "bit"
    if run.init == "simclr":
      assert built.model.init.endswith("workdirs/simclr_pneumoniamnist")
  recipe_only = sweep_plan.load_config_file("configs/sweeps/pneumoniamnist.py:head_first")
  assert recipe_only.inits.simclr == encoder_workdir
  assert pneumoniamnist.parse_arg("head_first@small_s2") == ("head_first", "small_s2")
  with pytest.raises(ValueError, match="unknown argument 'head_first@steps_999'"):
    sweep_plan.load_config_file("configs/sweeps/pneumoniamnist.py:head_first@steps_999")
  with pytest.raises(ValueError, match="unknown argument 'simclr'"):
    sweep_plan.load_config_file("configs/sweeps/pneumoniamnist.py:simclr")


def test_pneumoniamnist_distillation_sweep_points_each_student_at_its_teacher(tmp_path,
                                                                              monkeypatch):
  from configs.sweeps import pneumoniamnist_distill  # pylint: disable=g-import-not-at-top
  from remedis_jax import distillation  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(tmp_path)
  (tmp_path / "workdirs" / "simclr_pneumoniamnist" / "checkpoints" / "1500").mkdir(parents=True)
  config = sweep_plan.load_config_file("configs/sweeps/pneumoniamnist_distill.py")
  runs = sweep_plan.validate(config, check_runs=False)
  assert len(runs) == 4 * 2 * 3  # the teacher and 3 students, 1% and 10%, seeds 0-2
  for run in runs:
    built = sweep_plan.build_run_config(config, run)
    assert tuple(built.test_sets) == ("validation=val",)  # never the test split
    assert built.encoder_frozen_fraction == 0.5 and built.model.init.endswith(
        "workdirs/simclr_pneumoniamnist")
    if run.init.startswith("distilled"):
      # The head_first run of the recipe round with the same labeled subset.
      assert distillation.teacher_path(built) == str(
          tmp_path / "workdirs" / "pneumoniamnist_recipes" / f"init=head_first/frac="
          f"{run.label_fraction:g}/seed={run.seed}")
      assert built.total_epochs == 20.0
      assert built.distill.temperature == (2.0 if run.init == "distilled_t2" else 1.0)
      assert ("flip_lr" in built.data.train_ops) == (run.init == "distilled_aug")
      assert built.data.path == ""  # the sweep's own key, kept beside the student's data keys
    else:
      assert built.distill.teacher == "" and built.total_epochs == 100.0
  other = sweep_plan.load_config_file("configs/sweeps/pneumoniamnist_distill.py:/elsewhere/recipes")
  built = sweep_plan.build_run_config(other, next(r for r in sweep_plan.plan_runs(other)
                                             if r.init == "distilled"))
  assert distillation.teacher_path(built).startswith("/elsewhere/recipes/init=head_first/")
  # The test round: at 10%, the table's head_first runs (init=simclr) and their students.
  # The test round: at 10%, the table's head_first runs (init=simclr) and the chosen student
  # (or the one named).
  chosen = pneumoniamnist_distill.CHOSEN
  for arg, student in (("test@/table", chosen), ("test,distilled@/table", "distilled")):
    test = sweep_plan.load_config_file(f"configs/sweeps/pneumoniamnist_distill.py:{arg}")
    runs = sweep_plan.validate(test, check_runs=False)
    assert sorted(r.run_id for r in runs) == sorted(
        f"init={i}/frac=0.1/seed={s}" for i in (student, "simclr") for s in range(3))
    for run in runs:
      built = sweep_plan.build_run_config(test, run)
      assert tuple(built.test_sets) == ("test",) and built.encoder_frozen_fraction == 0.5
      if run.init == student:
        assert distillation.teacher_path(built) == f"/table/init=simclr/frac=0.1/seed={run.seed}"
        assert ("flip_lr" in built.data.train_ops) == (student == "distilled_aug")
      else:
        assert built.distill.teacher == "" and built.total_epochs == 100.0
  with pytest.raises(ValueError, match="unknown student 'nope'"):
    sweep_plan.load_config_file("configs/sweeps/pneumoniamnist_distill.py:test,nope")
  # ':table': every fraction of the earlier study's table below 100%, each student with its
  # teacher (experiments/results/pneumoniamnist/).
  table = sweep_plan.load_config_file("configs/sweeps/pneumoniamnist_distill.py:table@/table")
  runs = sweep_plan.validate(table, check_runs=False)
  assert len(runs) == 2 * 6 * 3
  assert sorted({r.label_fraction for r in runs}) == [0.01, 0.02, 0.05, 0.1, 0.25, 0.5]
  for run in runs:
    if run.init == chosen:
      built = sweep_plan.build_run_config(table, run)
      assert distillation.teacher_path(built) == (
          f"/table/init=simclr/frac={run.label_fraction:g}/seed={run.seed}")
