"""SimCLR trainer: sharded update step, non-finite guard, end-to-end run, resume, init, export.

The step tests share one traced and compiled update step per mesh (a module fixture), built
exactly as the end-to-end run builds its own, so that run reuses the compiled program.
"""

import glob
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import common, pretrain_simclr
from data_pipelines import sources as data_sources
from remedis_jax import (checkpointing, export, initialization, pretraining, sharding, train_state,
                         train_simclr, writers)


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  """The `:smoke` config with dotted-key overrides, e.g. tiny_config(**{"knn.k": 5})."""
  config = pretrain_simclr.get_config("smoke")
  config.mesh.devices = 1  # runs on one device; sharding: the 8-device step test below
  return common.override(config, overrides)


def _run_setup(config, mesh):
  """The setup `train_and_evaluate(config)` builds: the synthetic training source's online
  probe (4 findings, multi-hot) and site metrics, the config's step counts. On one device
  its update step is the end-to-end run's below (`tiny_config` runs on one device), so that run
  finds it compiled (cache hit)."""
  source = data_sources.build_source(config.data, config.data.pretrain_split,
                                     labels_optional=True)
  total, warmup, _ = pretraining.steps_from_config(config, len(source))
  setup = train_simclr.create_setup_for_source(config, mesh, source, total_steps=total,
                                               warmup_steps=warmup)
  return setup, source


@pytest.fixture(scope="module")
def step_setups():
  """{1: (setup, mesh), 8: (setup, mesh)}: the `:smoke` update step on one device and on the
  default 8-device mesh, traced and compiled once for this module's step tests, and one real
  host batch of the synthetic pipeline (two views, findings, site). The step donates its state:
  each test initialises its own."""
  config = tiny_config()
  meshes = {1: sharding.make_mesh({"devices": 1}), 8: sharding.make_mesh(None)}
  setups = {}
  for devices, mesh in meshes.items():
    setup, source = _run_setup(config, mesh)
    assert setup.batch_keys == ("views", "label", "site") and mesh.size == devices
    setups[devices] = (setup, mesh)
  host_batch = next(iter(train_simclr.make_dataset(config, source, config.batch_size)))
  return setups, {k: host_batch[k] for k in setups[8][0].batch_keys}


def _step(setup, mesh, state, host_batch):
  return setup.update_fn(state, sharding.shard_host_batch(host_batch,
                                                          sharding.batch_sharding(mesh)))


def _initial_state(setup):
  return sharding.create_sharded(setup.init_state, jax.random.key(0),
                                 shardings=setup.state_shardings)


def test_update_step_on_8_devices_equals_single_device(step_setups):
  setups, host_batch = step_setups
  assert len(jax.devices()) >= 8
  assert host_batch["label"].shape == (16, 4) and len(set(host_batch["site"])) > 1
  results = {}
  for devices, (setup, mesh) in setups.items():
    state = _initial_state(setup)
    initial = jax.device_get(state.params)
    metrics = []
    for _ in range(2):  # step 0 has learning rate 0 (warm-up); step 1 moves the parameters
      state, step_metrics = _step(setup, mesh, state, host_batch)
      metrics.append(step_metrics.compute())
    results[devices] = (initial, jax.device_get(state.params), metrics)
  (initial_1, params_1, metrics_1), (initial_8, params_8, metrics_8) = results[1], results[8]
  jax.tree.map(np.testing.assert_array_equal, initial_8, initial_1)
  for m_8, m_1 in zip(metrics_8, metrics_1):
    np.testing.assert_allclose(m_8["loss"], m_1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m_8["grad_norm"], m_1["grad_norm"], rtol=1e-4)
    for name in ("probe_loss", "top1_negative_same_site", "same_site_negative_share"):
      np.testing.assert_allclose(m_8[name], m_1[name], rtol=1e-5, atol=1e-6, err_msg=name)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               params_8, params_1)
  assert not np.allclose(params_1["encoder"]["root_block"]["conv_root"]["kernel"],
                         initial_1["encoder"]["root_block"]["conv_root"]["kernel"])
  # The loss is NT-Xent over the whole batch of 16 pairs: at init it is near ln(2N - 1).
  assert abs(float(metrics_1[0]["loss"]) - np.log(31)) < 1.0


def test_nonfinite_gradients_leave_state_unchanged(step_setups):
  setups, host_batch = step_setups
  setup, mesh = setups[8]
  state = _initial_state(setup)
  params = jax.device_get(state.params)
  first = jax.tree_util.tree_leaves_with_path(params["head"])[0]
  poisoned = jax.tree.map(lambda x: x, params)
  leaf = first[1].copy()
  leaf.flat[0] = np.nan
  node = poisoned["head"]
  keys = [k.key for k in first[0]]
  for key in keys[:-1]:
    node = node[key]
  node[keys[-1]] = leaf
  state = state.replace(params=train_state.put_host_tree(poisoned, setup.state_shardings.params))
  before = jax.device_get(state)
  state, metrics = _step(setup, mesh, state, host_batch)
  assert float(metrics.compute()["nonfinite_steps"]) == 1.0
  after = jax.device_get(state)
  assert int(after.step) == int(before.step)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), after.params, before.params)


def test_end_to_end_run_resume_export_and_init(tmp_path):
  workdir = str(tmp_path / "run")
  # Also profiled (config.profile): steps 2-3 traced for TensorBoard's Profile tab.
  config = tiny_config(**{"knn.every_steps": 2, "knn.bank_size": 32, "knn.query_size": 16,
                          "knn.batch_size": 16, "linear_probe.enabled": True,
                          "profile.first_step": 2, "profile.num_steps": 2})
  summary = train_simclr.train_and_evaluate(config, workdir)
  assert summary["steps"] == 4 and not summary["preempted"]
  traces = glob.glob(os.path.join(workdir, "plugins", "profile", "*", "*.xplane.pb"))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0

  records = writers.read_metrics(workdir)
  losses = [r["train/loss"] for r in records if "train/loss" in r]
  assert len(losses) == 4 and all(np.isfinite(losses))
  assert any("knn/auc" in r for r in records)
  assert all(r["train/skipped_records"] == 0 for r in records if "train/loss" in r)
  # The synthetic data has four sites: the step logs whether hardest negatives share the site.
  assert all(0.0 <= r["train/top1_negative_same_site"] <= 1.0 for r in records
             if "train/loss" in r)
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir))
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["model"]["name"] == "R_micro"
  params, step = checkpointing.load_params(workdir)
  assert step == 4 and set(params) == {"encoder", "head", "probe"}
  # The run ends with a linear probe on its frozen encoder beside a random encoder's.
  probe_records = [r for r in records if "linear_probe/auc" in r]
  assert len(probe_records) == 1 and probe_records[0]["step"] == 4
  assert 0.0 <= summary["linear_probe_auc"] <= 1.0
  assert 0.0 <= summary["linear_probe_random_encoder_auc"] <= 1.0

  # Rerunning the finished run resumes at its last step and trains nothing more.
  again = train_simclr.train_and_evaluate(config, workdir)
  assert again["steps"] == 4 and again["initialisation"].startswith("resumed")

  # Export, then start a new run from it with learning rate 0: its encoder must be the export's.
  out = str(tmp_path / "export")
  metadata = export.export_workdir(workdir, out)
  assert metadata["model_name"] == "R_micro" and metadata["input"]["image_size"] == 32
  loaded = initialization.load_init(out, "R_micro")
  jax.tree.map(np.testing.assert_array_equal, loaded.encoder, params["encoder"])
  frozen_lr = tiny_config(**{"model.init": out, "optimizer.learning_rate": 0.0,
                             "total_steps": 2, "linear_probe.enabled": True})
  summary = train_simclr.train_and_evaluate(frozen_lr, str(tmp_path / "from_export"))
  assert summary["initialisation"].startswith("export")
  # Same encoder (lr 0), same probe sample: the probe must read the trained parameters.
  assert summary["linear_probe_auc"] == probe_records[0]["linear_probe/auc"]
  assert summary["linear_probe_random_encoder_auc"] == (
      probe_records[0]["linear_probe/random_encoder_auc"])
  new_params, _ = checkpointing.load_params(str(tmp_path / "from_export"))
  jax.tree.map(np.testing.assert_array_equal, new_params["encoder"], params["encoder"])

  with pytest.raises(ValueError, match="export of R_micro"):
    initialization.load_init(out, "R_tiny")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    initialization.load_init(str(tmp_path / "missing"), "R_micro")


def test_window_merge_equals_numpy_means():
  metrics_cls = train_state.make_metrics_cls(("loss", "accuracy"))
  rng = np.random.default_rng(0)
  losses, accuracies = rng.normal(size=7), rng.uniform(size=7)
  nonfinite = np.array([0, 0, 1, 0, 0, 0, 0], np.float32)
  window = tuple(metrics_cls.single_from_model_output(
      loss=jnp.float32(l), accuracy=jnp.float32(a), nonfinite_steps=jnp.float32(n))
                 for l, a, n in zip(losses, accuracies, nonfinite))
  values = train_state.merge_metrics(window).compute()
  np.testing.assert_allclose(values["loss"], losses.mean(), rtol=1e-6)
  np.testing.assert_allclose(values["accuracy"], accuracies.mean(), rtol=1e-6)
  np.testing.assert_allclose(values["nonfinite_steps"], 1 / 7, rtol=1e-6)


def test_steps_from_config_converts_epochs_once():
  config = tiny_config(total_steps=-1, total_epochs=2.5)
  config.optimizer.warmup_epochs = 0.5
  total, warmup, per_epoch = pretraining.steps_from_config(config, num_examples=160)
  assert (total, warmup, per_epoch) == (25, 5, 10)
  config.total_epochs = -1.0
  with pytest.raises(ValueError, match="total_steps or config.total_epochs"):
    pretraining.steps_from_config(config, num_examples=160)
