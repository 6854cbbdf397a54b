"""Fine-tuning trainer: config checks, test sets per site, schedules, class weights, end to end
from scratch and from an export (linear mode leaves the encoder bit-identical), finished-run
return, results.json schema."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.utils import class_weight

from configs import finetune as finetune_config
from data_pipelines import subset as subset_lib
from remedis_jax import checkpointing, export, loop, models, supervised, test_sets, train_finetune
from tests import fakes


def smoke_config(**overrides):
  """The `:smoke` config on one device (fine-tuning on 8 devices runs in tests/test_gcs.py)."""
  return fakes.smoke_config("finetune", **overrides)


# ------------------------------------------------------------------------ fast checks
@pytest.mark.parametrize("overrides, error, match", [
    ({"label_fraction": 0.0}, ValueError, r"label_fraction=0.0 must be in \(0, 1\]"),
    ({"label_fraction": 1.5}, ValueError, r"label_fraction=1.5 must be in \(0, 1\]"),
    ({"model.init": "/nonexistent/BiT-M-R50x1.npz"}, FileNotFoundError,
     r"config.model.init='/nonexistent/BiT-M-R50x1.npz' does not exist"),
    ({"finetune_mode": "probe"}, ValueError, r"finetune_mode='probe'"),
    ({"model.from_head_layer": True}, ValueError, "needs a pretrained projection head"),
    ({"test_sets": ()}, ValueError, "config.test_sets is empty"),
    ({"test_sets": ("a=test@A", "a=test@B")}, ValueError, "duplicate names"),
    ({"robustness.test_sets": ("nope",)}, ValueError, "not in config.test_sets"),
    ({"robustness.perturbations": ("blur(2)",)}, ValueError, "unknown name 'blur'"),
])
def test_bad_config_fails_before_anything_is_built(tmp_path, overrides, error, match):
  workdir = tmp_path / "run"
  with pytest.raises(error, match=match):
    train_finetune.train_and_evaluate(smoke_config(**overrides), str(workdir))
  assert not workdir.exists()  # nothing written


def test_site_test_sets_are_the_same_patients_at_other_sites():
  config = smoke_config()
  parsed = test_sets.parse_test_sets(config.test_sets, "synthetic")
  assert parsed == [test_sets.TestSet("in_distribution", "test", "A"),
                    test_sets.TestSet("site_C", "test", "C")]
  site_a, site_c = (test_sets.build_test_source(config, t) for t in parsed)
  np.testing.assert_array_equal(site_a.labels, site_c.labels)
  assert set(site_a.record_sites) == {0} and set(site_c.record_sites) == {2}
  assert not np.array_equal(site_a[0]["image"], site_c[0]["image"])
  assert test_sets.parse_test_sets("test,val@B", "synthetic")[1] == (
      test_sets.TestSet("val_B", "val", "B"))
  with pytest.raises(ValueError, match="synthetic source only"):
    test_sets.parse_test_sets(("x=test@B",), "medmnist")


def test_schedule_follows_bit_hyperrule_by_dataset_size():
  config = smoke_config(total_steps=-1, total_epochs=-1.0, **{"optimizer.warmup_steps": -1})
  assert supervised.schedule_from_config(config, 1_000)[:2] == (500, 100)
  assert supervised.schedule_from_config(config, 100_000)[:2] == (10_000, 500)
  assert supervised.schedule_from_config(config, 1_000_000)[:2] == (20_000, 500)
  config = smoke_config(total_steps=-1, total_epochs=3.0)  # batch 16, warm-up 1 as given
  assert supervised.schedule_from_config(config, 160) == (30, 1, 10)


@pytest.mark.parametrize("fraction, labels, steps", [
    (0.01, 39, 31), (0.1, 388, 304), (1.0, 3882, 3033)])
def test_pneumoniamnist_epochs_and_evaluations_at_every_fraction(fraction, labels, steps):
  """100 epochs are 100 passes over the labeled subset at 1%, 10% and 100% of PneumoniaMNIST's
  3882 training labels (388 normal, 3494 pneumonia, stratified), and validation picks the best
  checkpoint among the same number of evaluations at each."""
  config = finetune_config.get_config("pneumoniamnist")
  n = sum(subset_lib.keep_count(fraction, count) for count in (388, 3494))
  assert n == labels
  total_steps, warmup, steps_per_epoch = supervised.schedule_from_config(config, n)
  assert (total_steps, warmup) == (steps, 0)
  # Examples seen: at least 100 epochs, and less than one batch more.
  assert 100 * n <= total_steps * config.batch_size < 100 * n + config.batch_size
  assert steps_per_epoch == pytest.approx(n / 128)
  evaluations = loop.evaluation_steps(total_steps, config.num_evaluations,
                                      config.eval_every_steps)
  assert len(evaluations) == config.num_evaluations == 20
  assert max(evaluations) == total_steps and min(evaluations) >= 1
  gaps = np.diff(sorted(evaluations))
  assert gaps.max() - gaps.min() <= 1  # evenly spaced


def test_evaluation_steps():
  assert loop.evaluation_steps(10, 0, 4) == {4, 8, 10}
  assert loop.evaluation_steps(10, 3, 4) == {4, 7, 10}  # num_evaluations wins
  assert loop.evaluation_steps(3, 20, 4) == {1, 2, 3}  # shorter than N: every step
  assert loop.evaluation_steps(4, 3) == {2, 3, 4}
  with pytest.raises(ValueError, match="num_evaluations or eval_every_steps"):
    loop.evaluation_steps(10, 0, 0)
  assert loop.epochs_to_steps(100, 39, 128) == 31
  assert loop.epochs_to_steps(3, 160, 16) == 30
  assert loop.epochs_to_steps(0.01, 10, 128) == 1


def test_balanced_class_weights_match_sklearn():
  labels = np.array([0, 0, 0, 1, 2, 2, -1], np.int32)  # -1 (unlabeled) is ignored
  weights = train_finetune.class_weights_from_config("balanced", labels, 3, multi_label=False)
  expected = class_weight.compute_class_weight("balanced", classes=np.arange(3),
                                               y=labels[labels >= 0])
  np.testing.assert_allclose(weights, expected, rtol=1e-6)
  assert train_finetune.class_weights_from_config("", labels, 3, False) is None
  np.testing.assert_array_equal(
      train_finetune.class_weights_from_config("1,2,3", labels, 3, False), [1, 2, 3])
  with pytest.raises(ValueError, match="3 classes"):
    train_finetune.class_weights_from_config("1,2", labels, 3, False)
  with pytest.raises(ValueError, match="multi-class"):
    train_finetune.class_weights_from_config("balanced", labels, 3, True)


# ------------------------------------------------------------------------ end to end
SCHEMA_KEYS = {"format", "finished", "steps", "total_steps", "wall_time_s", "config",
               "initialisation", "num_train_labels", "subset_manifest", "task", "best",
               "thresholds", "val", "test_sets", "robustness", "baselines",
               "divergence_warnings", "distillation"}
METRIC_KEYS = {"macro_auc", "accuracy", "balanced_accuracy", "ece", "sensitivity", "specificity",
               "num_examples"}


def test_finetune_from_scratch_end_to_end_and_finished_rerun(tmp_path):
  workdir = str(tmp_path / "scratch")
  # 1.2 epochs of the 51 labels at batch 16: ceil(61.2 / 16) = 4 steps; 3 validations.
  config = smoke_config(total_steps=-1, total_epochs=1.2, num_evaluations=3)
  results = train_finetune.train_and_evaluate(config, workdir)

  assert set(results) == SCHEMA_KEYS
  assert results["format"] == train_finetune.RESULTS_FORMAT and results["finished"]
  assert results["steps"] == results["total_steps"] == 4
  assert results["initialisation"] == "scratch" and results["divergence_warnings"] == []
  assert results["task"] == {"multi_label": True, "num_classes": 4,
                             "class_names": ["nodule", "opacity", "effusion", "cardiomegaly"]}
  assert results["best"]["step"] in (2, 3, 4) and results["best"]["split"] == "val"
  assert len(results["thresholds"]["values"]) == 4
  assert set(results["test_sets"]) == {"in_distribution", "site_C"}
  for name, entry in results["test_sets"].items():
    assert METRIC_KEYS <= set(entry["metrics"])
    assert entry["num_examples"] == 32
    with open(os.path.join(workdir, entry["roc_file"])) as f:
      roc = json.load(f)
    assert set(roc) == set(results["task"]["class_names"])
    assert roc["nodule"]["fpr"][0] == 0.0 and roc["nodule"]["tpr"][-1] == 1.0
  assert set(results["robustness"]) == {"in_distribution"}
  assert set(results["robustness"]["in_distribution"]) == {"gamma(1.5)", "rotate(15)"}

  # The manifest holds exactly the subset the run trained on.
  with open(os.path.join(workdir, results["subset_manifest"])) as f:
    manifest = json.load(f)
  expected = subset_lib.subset(train_finetune.data_sources.build_source(config.data, "train"),
                               0.5, 0)
  assert manifest["ids"] == expected.ids and results["num_train_labels"] == len(expected) == 51

  # The best checkpoint's validation value is what the log wrote at that step.
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f if '"val/macro_auc"' in line]
  logged = {r["step"]: r["val/macro_auc"] for r in records}
  assert set(logged) == {2, 3, 4}  # ceil(k x 4 / 3) for k = 1, 2, 3
  assert results["best"]["value"] == pytest.approx(max(logged.values()), abs=1e-6)
  assert logged[results["best"]["step"]] == pytest.approx(max(logged.values()), abs=1e-6)

  # With thresholds chosen on validation, the validation sensitivity/specificity are those of
  # Youden's J there, so their sum is at least 1 for every class with both labels.
  for c in results["task"]["class_names"]:
    sens, spec = results["val"][f"sensitivity/{c}"], results["val"][f"specificity/{c}"]
    if sens is not None and spec is not None:
      assert sens + spec >= 1.0 - 1e-9

  # A finished run returns its results without training again.
  again = train_finetune.train_and_evaluate(config, workdir)
  assert again == json.loads(json.dumps(results))


def _write_export(path):
  """An R_micro encoder + projection head, random, in the export format (a SimCLR stand-in)."""
  model = models.create_contrastive_model("R_micro", head_hidden_dims=(32,), projection_dim=16)
  params = jax.jit(model.init)(jax.random.key(7), jnp.zeros((1, 32, 32, 3)))["params"]
  params = jax.device_get(params)
  export.write_export(str(path), {"encoder": params["encoder"], "head": params["head"]},
                      {"model_name": "R_micro", "encoder_overrides": {}, "step": 0})
  return params


def test_linear_evaluation_from_export_keeps_encoder_and_head_layer_bit_identical(tmp_path):
  exported = _write_export(tmp_path / "export")
  workdir = str(tmp_path / "linear")
  config = smoke_config(**{"model.init": str(tmp_path / "export"), "finetune_mode": "linear",
                           "model.from_head_layer": True, "test_sets": ("test@A",),
                           "robustness.perturbations": ()})
  results = train_finetune.train_and_evaluate(config, workdir)
  assert results["initialisation"].startswith("export ")
  assert "first projection-head layer" in results["initialisation"]
  assert set(results["test_sets"]) == {"test_A"} and results["robustness"] == {}

  params, step = checkpointing.load_params(workdir)
  assert step == 4
  same = jax.tree.map(np.array_equal, params["encoder"], exported["encoder"])
  assert all(jax.tree.leaves(same))
  for layer in ("hidden_0", "hidden_0_norm"):
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, params["head"][layer],
                                            exported["head"][layer])))
  # ... while the classifier did learn.
  assert np.abs(params["classifier"]["kernel"]).sum() > 0


def test_real_pneumoniamnist_protocol_short_run(shared_data_dir, tmp_path):
  """The MedMNIST v2 config on real PneumoniaMNIST (a few steps): binary softmax schema,
  official splits, baselines carried to results.json."""
  config = finetune_config.get_config("pneumoniamnist")
  config.data.path = str(shared_data_dir / "pneumoniamnist.npz")
  config.model.name = "R_micro"
  config.mesh.devices = 1
  config.total_epochs = -1.0
  config.total_steps = 2
  config.eval_every_steps = 2
  config.batch_size = 64
  config.robustness.perturbations = ()
  config.async_checkpointing = False
  results = train_finetune.train_and_evaluate(config, str(tmp_path / "pmnist"))
  assert results["task"] == {"multi_label": False, "num_classes": 2,
                             "class_names": ["normal", "pneumonia"]}
  assert results["num_train_labels"] == 3882
  test = results["test_sets"]["test"]
  assert test["num_examples"] == 624 and len(results["thresholds"]["values"]) == 1
  assert {"threshold", "sensitivity", "specificity", "auc/pneumonia"} <= set(test["metrics"])
  assert results["baselines"]["MedMNIST v2 ResNet-18 (28)"] == {"macro_auc": 0.944,
                                                                 "accuracy": 0.854}
