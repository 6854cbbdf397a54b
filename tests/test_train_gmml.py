"""GMML trainer: masked L1 loss, reconstruction head fold, weight-decay schedule, sharded step, runs."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import pretrain_gmml
from remedis_jax import optimizers, sharding, train_gmml, writers
from tests import fakes


def smoke_config(**overrides) -> ml_collections.ConfigDict:
  """One device; sharding: the 8-device step test."""
  return fakes.smoke_config("pretrain_gmml", **overrides)


# -------------------------------------------------------------------------------------- loss
def test_masked_l1_hand_computed():
  reconstruction = jnp.array([[[[0.5], [1.0]], [[-1.0], [0.0]]]])  # (1, 2, 2, 1)
  target = jnp.array([[[[0.0], [0.0]], [[0.0], [0.0]]]])
  mask = jnp.array([[[1, 0], [1, 0]]])
  loss, metrics = train_gmml.masked_l1_loss(reconstruction, target, mask)
  np.testing.assert_allclose(loss, (0.5 + 1.0) / 2)  # masked pixels: 0.5 and -1.0
  np.testing.assert_allclose(metrics["visible_l1"], (1.0 + 0.0) / 2)
  np.testing.assert_allclose(metrics["masked_fraction"], 0.5)


def test_loss_ignores_unmasked_pixels_value_and_gradient():
  rng = np.random.default_rng(0)
  target = jnp.asarray(rng.uniform(-1, 1, (2, 8, 8, 3)), jnp.float32)
  reconstruction = jnp.asarray(rng.uniform(-1, 1, (2, 8, 8, 3)), jnp.float32)
  mask = jnp.asarray(rng.random((2, 8, 8)) < 0.4)
  changed = jnp.where(mask[..., None], reconstruction, reconstruction + 5.0 * rng.normal(
      size=reconstruction.shape).astype(np.float32))
  loss_fn = lambda r: train_gmml.masked_l1_loss(r, target, mask)[0]  # noqa: E731
  value, grad = jax.value_and_grad(loss_fn)(reconstruction)
  value_changed, grad_changed = jax.value_and_grad(loss_fn)(changed)
  np.testing.assert_allclose(value_changed, value, rtol=1e-6)
  np.testing.assert_array_equal(grad_changed, grad)
  np.testing.assert_array_equal(np.asarray(grad)[~np.asarray(mask)], 0.0)
  # NumPy reference: mean |r - t| over masked pixel-channels.
  m = np.asarray(mask)
  expected = np.abs(np.asarray(reconstruction) - np.asarray(target))[m].mean()
  np.testing.assert_allclose(value, expected, rtol=1e-6)
  # No masked pixel: loss 0, gradient 0.
  none_value, none_grad = jax.value_and_grad(
      lambda r: train_gmml.masked_l1_loss(r, target, jnp.zeros((2, 8, 8)))[0])(reconstruction)
  assert float(none_value) == 0.0 and not np.any(np.asarray(none_grad))


def test_expand_patch_mask():
  mask = jnp.array([[[1, 0], [0, 1]]], jnp.uint8)
  np.testing.assert_array_equal(train_gmml.expand_patch_mask(mask, 2)[0],
                                [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]])


def test_reconstruction_head_folds_each_token_onto_its_patch():
  """Token (i, j)'s p*p*C outputs land on pixel block (i, j), row-major within the patch."""
  h, w, p, c = 2, 3, 2, 3
  head = train_gmml.ReconstructionHead(patch_size=p, num_channels=c, hidden_dims=())
  features = jnp.eye(h * w).reshape(1, h, w, h * w)  # one-hot token index
  kernel = np.arange(h * w)[:, None] * 100.0 + np.arange(p * p * c)[None, :]
  params = {"pixels": {"kernel": jnp.asarray(kernel, jnp.float32),
                       "bias": jnp.zeros((p * p * c,))}}
  out = np.asarray(head.apply({"params": params}, features))
  assert out.shape == (1, h * p, w * p, c)
  for y in range(h * p):
    for x in range(w * p):
      for ch in range(c):
        token = (y // p) * w + (x // p)
        within = ((y % p) * p + (x % p)) * c + ch
        assert out[0, y, x, ch] == token * 100 + within


# ---------------------------------------------------------------------------------- optimiser
def test_weight_decay_cosine_schedule_in_adamw():
  """Zero gradients: AdamW's update is the decoupled decay alone, p <- p (1 - lr * wd(k))."""
  config = optimizers.default_optimizer_config()
  config.name, config.learning_rate, config.lr_scaling = "adamw", 0.1, "none"
  config.schedule, config.weight_decay, config.weight_decay_end = "constant", 0.04, 0.4
  config.weight_decay_exclude = ()
  total = 5
  wd = optimizers.make_weight_decay_schedule(config, total)
  expected_wd = 0.4 + (0.04 - 0.4) * 0.5 * (1 + np.cos(np.pi * np.arange(total) / (total - 1)))
  np.testing.assert_allclose([float(wd(k)) for k in range(total)], expected_wd, rtol=1e-6)
  tx, _ = optimizers.make_optimizer(config, total_steps=total, batch_size=256)
  params = {"w": jnp.ones((3,))}
  state = tx.init(params)
  expected = np.ones(3)
  for k in range(total):
    updates, state = tx.update({"w": jnp.zeros((3,))}, state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    expected = expected * (1 - 0.1 * expected_wd[k])
    np.testing.assert_allclose(params["w"], expected, rtol=1e-6)
  config.name = "lars"
  with pytest.raises(ValueError, match="weight_decay_end"):
    optimizers.make_optimizer(config, total_steps=total, batch_size=256)
  config.name, config.weight_decay_end = "adamw", None
  assert optimizers.make_weight_decay_schedule(config, total) == 0.04


# ------------------------------------------------------------------------------ update step
def _batch(batch_size=16, seed=0):
  rng = np.random.default_rng(seed)
  return {"clean": rng.integers(0, 256, (batch_size, 32, 32, 3), dtype=np.uint8),
          "corrupted": rng.integers(0, 256, (batch_size, 32, 32, 3), dtype=np.uint8),
          "mask": (rng.random((batch_size, 8, 8)) < 0.6).astype(np.uint8)}


def test_update_step_on_8_devices_equals_single_device():
  config = smoke_config()
  batch = _batch()
  results = []
  meshes = (sharding.make_mesh({"devices": 1}), sharding.make_mesh(None))
  for mesh in meshes:
    # The `:smoke` schedule (4 steps, the first a warm-up step at learning rate 0): on one
    # device this is the step the resumed smoke run below compiles (a cache hit there).
    setup = train_gmml.create_train_setup(config, mesh, total_steps=config.total_steps,
                                          warmup_steps=config.optimizer.warmup_steps)
    if not results:
      state = sharding.create_sharded(setup.init_state, jax.random.key(0),
                                      shardings=setup.state_shardings)
      initial = jax.device_get(state)
    else:  # the same initial state on 8 devices (one initialisation to compile)
      state = jax.device_put(initial, setup.state_shardings)
    device_batch = sharding.shard_host_batch(batch, sharding.batch_sharding(mesh))
    for _ in range(2):
      state, metrics = setup.update_fn(state, device_batch)
    results.append((jax.device_get(state), metrics.compute()))
  (state_1, metrics_1), (state_8, metrics_8) = results
  for name in ("loss", "masked_fraction", "visible_l1", "grad_norm", "weight_decay"):
    np.testing.assert_allclose(metrics_8[name], metrics_1[name], rtol=1e-5, err_msg=name)
  np.testing.assert_allclose(metrics_1["masked_fraction"], batch["mask"].mean(), rtol=1e-6)
  # atol 1e-5: Adam divides by sqrt(v), so gradients that are ~0 up to float noise (summation
  # order differs across 8 shards) still move by up to lr-sized steps in either run.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               state_8.params, state_1.params)
  assert int(state_1.step) == 2


def test_gmml_model_contract_for_knn_and_export():
  """apply({"params": {"encoder", "head"}}, images) -> (reconstruction, {"pre_logits", ...})."""
  config = smoke_config()
  model = train_gmml.build_model(config)
  images = jnp.zeros((2, 32, 32, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), images))
  assert set(variables["params"]) == {"encoder", "head"}
  reconstruction, intermediates = jax.eval_shape(
      lambda v: model.apply(v, images, train=False), variables)
  assert reconstruction.shape == (2, 32, 32, 3)
  assert intermediates["pre_logits"].shape == (2, 32)
  with pytest.raises(ValueError, match="ViT"):
    train_gmml.build_model(smoke_config(**{"model.name": "R_micro"}))


# ------------------------------------------------------------------------------------- runs
def test_smoke_run_resumes_and_writes_grids_and_heldout_l1(tmp_path):
  workdir = str(tmp_path / "gmml")
  # kNN only in the resumed run, at its last step (one kNN pass is enough; saves test time).
  first = train_gmml.train_and_evaluate(
      smoke_config(total_steps=2, **{"knn.every_steps": 0}), workdir)
  assert first["steps"] == 2 and first["initialisation"] == "scratch"
  second = train_gmml.train_and_evaluate(smoke_config(**{"knn.at_start": False}), workdir)
  assert second["steps"] == 4 and second["initialisation"].startswith("resumed from")
  assert np.isfinite(second["final_loss"])
  grids = sorted(os.listdir(os.path.join(workdir, train_gmml.GRID_FOLDER)))
  assert grids == ["step_000000.png", "step_000002.png", "step_000004.png"]
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(os.path.join(workdir, train_gmml.GRID_FOLDER, grids[-1])) as grid:
    # 3 rows (input, corrupted, reconstruction) x 4 images of 32 px, 2 px gaps, scaled x4.
    assert grid.size == ((4 * 32 + 3 * 2) * 4, (3 * 32 + 2 * 2) * 4)
  records = writers.read_metrics(workdir)
  heldout = {r["step"]: r["reconstruction/heldout_masked_l1"] for r in records
             if "reconstruction/heldout_masked_l1" in r}
  assert sorted(heldout) == [0, 2, 4] and all(np.isfinite(v) for v in heldout.values())
  assert any("knn/auc" in r for r in records)  # the kNN monitor reads pre_logits
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    assert json.load(f)["trainer"] == "gmml"


@pytest.mark.parametrize("variant", pretrain_gmml.VARIANTS)
def test_every_variant_builds_and_names_the_gmml_trainer(variant):
  config = pretrain_gmml.get_config(variant)
  assert config.trainer == "gmml" and config.optimizer.name == "adamw"
  optimizers.make_optimizer(
      {k: v for k, v in config.optimizer.items() if k != "warmup_epochs"},
      total_steps=100, batch_size=config.batch_size)
  kwargs = train_gmml.gmml_dataset_kwargs(config)
  assert config.data.image_size % kwargs["patch_size"] == 0
  # Abstract (eval_shape) state only: ViT-S/16 is never initialised for real in a test.
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
  setup = train_gmml.create_train_setup(config, mesh, total_steps=100, warmup_steps=10)
  params = setup.abstract_state.params
  if variant == "vit_s16":
    # Head: 3 x Dense(384 -> 384) + Dense(384 -> 16 * 16 * 3), with biases.
    head = 3 * (384 * 384 + 384) + 384 * 768 + 768
    assert sum(x.size for x in jax.tree.leaves(params["head"])) == head
    assert 21e6 < sum(x.size for x in jax.tree.leaves(params["encoder"])) < 22.5e6
