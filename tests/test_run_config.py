"""WORKDIR/config.json: a resume with another model, data or objective is refused before anything
is written; an allowed change keeps the earlier file; a damaged file is named.

The comparison is tested on plain dicts; one pretraining `:smoke` run (2 steps) checks that a
refused resume leaves its config.json byte-identical and its export the trained architecture,
and that an allowed resume keeps the earlier config beside the new one.
"""
import glob
import json
import logging
import os

import pytest

from configs import common, finetune, pretrain_simclr
from remedis_jax import export, run_config, supervised, train_simclr

OLD = {"trainer": "simclr", "total_steps": 4, "batch_size": 16,
       "model": {"name": "R_micro", "stem": "bit", "dtype": "float32", "remat": False,
                 "head_hidden_dims": [32], "decoder": {"width": 8}},
       "data": {"image_size": 32, "num_channels": 1, "source": "synthetic", "path": ""},
       "optimizer": {"learning_rate": 0.1}, "label_fraction": 1.0}


def _with(tree, **dotted):
  """A deep copy of `tree` with dotted keys set (None: the key removed)."""
  tree = json.loads(json.dumps(tree))
  for key, value in dotted.items():
    *parents, leaf = key.split(".")
    node = tree
    for parent in parents:
      node = node[parent]
    if value is None:
      del node[leaf]
    else:
      node[leaf] = value
  return tree


# ---- the comparison, on plain dicts

def test_identical_configs_have_no_changes():
  assert run_config.compare(OLD, _with(OLD), run_config.PRETRAINING_INCOMPATIBLE) == ([], [])


@pytest.mark.parametrize("key,value", [
    ("model.name", "R_tiny"), ("model.stem", "small"), ("model.head_hidden_dims", [64]),
    ("model.decoder.width", 16), ("data.image_size", 64), ("data.num_channels", 3),
    ("trainer", "cluster")])
def test_architecture_resolution_and_objective_changes_are_refused(key, value):
  refused, allowed = run_config.compare(OLD, _with(OLD, **{key: value}),
                                        run_config.PRETRAINING_INCOMPATIBLE)
  old_value = run_config.flatten(OLD)[key]
  assert refused == [run_config.Change(key, old_value, value)] and allowed == []


@pytest.mark.parametrize("key,value", [
    ("total_steps", 8), ("batch_size", 32), ("optimizer.learning_rate", 0.3),
    ("model.dtype", "bfloat16"), ("model.remat", True), ("data.path", "/elsewhere")])
def test_schedule_batch_and_compute_changes_are_allowed(key, value):
  refused, allowed = run_config.compare(OLD, _with(OLD, **{key: value}),
                                        run_config.PRETRAINING_INCOMPATIBLE)
  assert refused == [] and allowed == [
      run_config.Change(key, run_config.flatten(OLD)[key], value)]


def test_data_and_labeled_subset_are_refused_only_for_supervised_runs():
  new = _with(OLD, label_fraction=0.1, **{"data.source": "folder"})
  refused, _ = run_config.compare(OLD, new, run_config.SUPERVISED_INCOMPATIBLE)
  assert [c.key for c in refused] == ["data.source", "label_fraction"]
  refused, allowed = run_config.compare(OLD, new, run_config.PRETRAINING_INCOMPATIBLE)
  assert refused == [] and [c.key for c in allowed] == ["data.source", "label_fraction"]


def test_a_key_on_one_side_only_is_an_allowed_change():
  # An old workdir predates a key added since (its config.json has no model.stem).
  refused, allowed = run_config.compare(_with(OLD, **{"model.stem": None}), OLD,
                                        run_config.PRETRAINING_INCOMPATIBLE)
  assert refused == [] and allowed == [run_config.Change("model.stem", run_config.MISSING, "bit")]


# ---- reading and writing a workdir's config.json (plain dicts, no training)

def _read_bytes(path):
  with open(path, "rb") as f:
    return f.read()


def _backups(workdir):
  return sorted(glob.glob(os.path.join(workdir, "config.*.json")))


def test_fresh_workdir_gets_the_config_and_an_unchanged_rerun_writes_nothing(tmp_path):
  workdir = str(tmp_path / "run")
  assert run_config.write(OLD, workdir, run_config.PRETRAINING_INCOMPATIBLE) == []
  path = os.path.join(workdir, "config.json")
  assert json.loads(_read_bytes(path)) == OLD
  before = os.stat(path).st_mtime_ns
  assert run_config.write(_with(OLD), workdir, run_config.PRETRAINING_INCOMPATIBLE) == []
  assert os.stat(path).st_mtime_ns == before and not _backups(workdir)


def test_refused_resume_names_every_key_and_changes_nothing(tmp_path):
  workdir = str(tmp_path / "run")
  run_config.write(OLD, workdir, run_config.PRETRAINING_INCOMPATIBLE)
  original = _read_bytes(os.path.join(workdir, "config.json"))
  new = _with(OLD, total_steps=8, **{"model.name": "R_tiny", "data.image_size": 64})
  with pytest.raises(run_config.IncompatibleRunConfigError) as e:
    run_config.write(new, workdir, run_config.PRETRAINING_INCOMPATIBLE)
  message = str(e.value)
  assert workdir in message and "new --workdir" in message
  assert "model.name: 'R_micro' -> 'R_tiny'" in message
  assert "data.image_size: 32 -> 64" in message
  assert "total_steps" not in message  # An allowed key is not a reason.
  assert _read_bytes(os.path.join(workdir, "config.json")) == original
  assert sorted(os.listdir(workdir)) == ["config.json"]


def test_allowed_resume_keeps_the_earlier_config_and_warns(tmp_path, caplog):
  workdir = str(tmp_path / "run")
  run_config.write(OLD, workdir, run_config.PRETRAINING_INCOMPATIBLE)
  original = _read_bytes(os.path.join(workdir, "config.json"))
  new = _with(OLD, total_steps=8, **{"optimizer.learning_rate": 0.3})
  with caplog.at_level(logging.WARNING):
    changes = run_config.write(new, workdir, run_config.PRETRAINING_INCOMPATIBLE)
  assert [c.key for c in changes] == ["optimizer.learning_rate", "total_steps"]
  assert json.loads(_read_bytes(os.path.join(workdir, "config.json"))) == new
  backups = _backups(workdir)
  assert len(backups) == 1 and _read_bytes(backups[0]) == original
  assert os.path.basename(backups[0]).endswith("Z.json")  # config.<UTC time>.json
  message = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
  assert "total_steps: 4 -> 8" in message and "optimizer.learning_rate: 0.1 -> 0.3" in message
  assert backups[0] in message
  # A second change within the same second keeps both earlier files.
  run_config.write(_with(new, total_steps=12), workdir, run_config.PRETRAINING_INCOMPATIBLE)
  assert len(_backups(workdir)) == 2


@pytest.mark.parametrize("text", ['{"trainer": "simclr", "model": {"na', "", "[1, 2]", "\xff"])
def test_damaged_config_json_is_an_error_naming_the_file(tmp_path, text):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_bytes(text.encode("latin-1"))
  with pytest.raises(ValueError, match="config.json") as e:
    run_config.write(OLD, str(workdir), run_config.PRETRAINING_INCOMPATIBLE)
  assert str(workdir / "config.json") in str(e.value)
  assert (workdir / "config.json").read_bytes() == text.encode("latin-1")


# ---- the supervised trainers: checked before anything is written, finished runs too

def _finetune_config(**overrides):
  config = finetune.get_config("smoke")
  config.mesh.devices = 1
  return common.override(config, overrides)


def test_supervised_start_refuses_another_model_before_writing(tmp_path):
  workdir = str(tmp_path / "run")
  run_config.write(_finetune_config(), workdir, run_config.SUPERVISED_INCOMPATIBLE)
  original = _read_bytes(os.path.join(workdir, "config.json"))
  for key, value in (("model.name", "R_tiny"), ("label_fraction", 0.25),
                     ("label_fraction_seed", 3)):
    with pytest.raises(run_config.IncompatibleRunConfigError, match=key):
      supervised.start(_finetune_config(**{key: value}), workdir)
    assert _read_bytes(os.path.join(workdir, "config.json")) == original
    assert sorted(os.listdir(workdir)) == ["config.json"]  # no event file, no backup


def test_finished_supervised_run_is_not_returned_for_another_model(tmp_path):
  workdir = tmp_path / "run"
  run_config.write(_finetune_config(), str(workdir), run_config.SUPERVISED_INCOMPATIBLE)
  (workdir / supervised.RESULTS_FILE).write_text(json.dumps({"finished": True, "auc": 0.9}))

  def must_not_train(*args):
    raise AssertionError("a finished run was trained again")

  results = supervised.run(_finetune_config(total_steps=9), str(workdir), lambda c: None,
                           must_not_train)
  assert results["auc"] == 0.9
  with pytest.raises(run_config.IncompatibleRunConfigError, match="model.name: 'R_micro'"):
    supervised.run(_finetune_config(**{"model.name": "R_tiny"}), str(workdir), lambda c: None,
                   must_not_train)


# ---- a real pretraining workdir

def test_refused_pretraining_resume_keeps_the_record_and_the_export(tmp_path):
  workdir = str(tmp_path / "run")
  config = pretrain_simclr.get_config("smoke")
  config.mesh.devices = 1
  # A constant learning rate: the 2- and 3-step runs compile one update step (a cosine bakes
  # total_steps into it), the one tests/test_interrupts.py's runs share.
  common.override(config, {"total_steps": 2, "knn.every_steps": 0,
                           "linear_probe.enabled": False, "optimizer.schedule": "constant"})
  summary = train_simclr.train_and_evaluate(config, workdir)
  assert summary["steps"] == 2
  config_path = os.path.join(workdir, "config.json")
  original = _read_bytes(config_path)

  other = common.override(config.copy_and_resolve_references(), {"model.name": "R_tiny"})
  with pytest.raises(run_config.IncompatibleRunConfigError) as e:
    train_simclr.train_and_evaluate(other, workdir)
  assert workdir in str(e.value) and "model.name: 'R_micro' -> 'R_tiny'" in str(e.value)
  assert _read_bytes(config_path) == original and not _backups(workdir)
  metadata = export.export_workdir(workdir, str(tmp_path / "export"))
  assert metadata["model_name"] == "R_micro"

  # More steps is an allowed change: the run resumes, the earlier config kept beside it.
  longer = common.override(config.copy_and_resolve_references(), {"total_steps": 3})
  summary = train_simclr.train_and_evaluate(longer, workdir)
  assert summary["steps"] == 3 and summary["initialisation"].startswith("resumed")
  backups = _backups(workdir)
  assert len(backups) == 1 and _read_bytes(backups[0]) == original
  with open(config_path, encoding="utf-8") as f:
    assert json.load(f)["total_steps"] == 3
