"""Tests for remedis_jax.optimizers: schedules, masks, LARS, freezing, clipping."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from remedis_jax import optimizers


def _params(seed=0):
  """A small BiT-like tree with flax names: convs, GroupNorms, a head."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  return {
      "encoder": {
          "root_block": {"conv": {"kernel": normal(3, 3, 1, 4)}},
          "block1": {
              "unit01": {
                  "conv1": {"kernel": normal(1, 1, 4, 4)},
                  "gn1": {"scale": normal(4), "bias": normal(4)},
                  "GroupNorm_0": {"scale": normal(4), "bias": normal(4)},
              },
          },
          "norm_pre_head": {"scale": normal(4), "bias": normal(4)},
      },
      "head": {"Dense_0": {"kernel": normal(4, 3), "bias": normal(3)}},
  }


def _grads(params, seed=1):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)


def _config(**overrides):
  config = optimizers.default_optimizer_config()
  config.update(overrides)
  return config


def _flat(tree):
  return {optimizers.param_path(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_default_regexes_exclude_norms_and_biases_only():
  paths = {
      "GroupNorm_0/scale": True,
      "encoder/block1/unit01/GroupNorm_0/bias": True,
      "encoder/block1/unit01/gn1/scale": True,
      "LayerNorm_0/scale": True,
      "encoder/norm_pre_head/bias": True,
      "head/Dense_0/bias": True,
      "bias": True,
      "encoder/root_block/conv/kernel": False,
      "head/Dense_0/kernel": False,
      "encoder/block1/unit01/conv1/kernel": False,
      "projection/Dense_1/kernel": False,
      # A module called "gn" but a leaf deeper down is still a norm param only if it
      # sits directly under it.
      "encoder/gn_wrapper/conv/kernel": False,
  }
  tree = {p: 0.0 for p in paths}  # flat dict: the key is the whole path
  mask = optimizers.param_path_mask(tree, optimizers.NORM_AND_BIAS_REGEXES)
  assert mask == paths
  config = optimizers.default_optimizer_config()
  assert tuple(config.weight_decay_exclude) == optimizers.NORM_AND_BIAS_REGEXES
  assert tuple(config.lars_exclude) == optimizers.NORM_AND_BIAS_REGEXES


def test_param_path_mask_uses_fullmatch_on_nested_paths():
  params = _params()
  mask = _flat(optimizers.param_path_mask(params, [r"encoder/block1/.*"]))
  assert mask["encoder/block1/unit01/conv1/kernel"]
  assert not mask["encoder/root_block/conv/kernel"]
  # "block1" alone does not match the whole path.
  assert not any(_flat(optimizers.param_path_mask(params, "block1")).values())
  with pytest.raises(ValueError, match=r"invalid regex '\(unclosed'"):
    optimizers.param_path_mask(params, ["(unclosed"])


def test_default_config_is_simclr():
  config = optimizers.default_optimizer_config()
  assert (config.name, config.learning_rate, config.lr_scaling, config.schedule) == (
      "lars", 0.3, "linear", "cosine")
  assert (config.weight_decay, config.momentum, config.trust_coefficient) == (1e-6, 0.9, 0.001)
  for field in ("warmup_steps", "end_lr_factor", "nesterov", "frozen", "grad_clip_norm",
                "b1", "b2", "eps"):
    assert field in config


def test_cosine_schedule_values_match_formula():
  _, schedule = optimizers.make_optimizer(
      _config(warmup_steps=10), total_steps=110, batch_size=512)
  peak = 0.3 * 512 / 256
  expected = {
      0: 0.0,
      5: peak * 5 / 10,
      10: peak,
      35: peak * 0.5 * (1 + math.cos(math.pi * 25 / 100)),
      60: peak / 2,
      110: 0.0,
      500: 0.0,  # past the end stays at the end value
  }
  for step, want in expected.items():
    np.testing.assert_allclose(schedule(step), want, rtol=1e-6, atol=1e-7, err_msg=f"step {step}")
  # Works on traced steps too (optax passes an int32 array).
  np.testing.assert_allclose(jax.jit(schedule)(jnp.int32(60)), peak / 2, rtol=1e-6)


def test_linear_constant_schedules_and_lr_scalings():
  _, schedule = optimizers.make_optimizer(
      _config(schedule="linear", warmup_steps=4, end_lr_factor=0.1, lr_scaling="none",
              learning_rate=2.0),
      total_steps=24, batch_size=64)
  for step, want in {0: 0.0, 2: 1.0, 4: 2.0, 14: 2.0 + (0.2 - 2.0) * 0.5, 24: 0.2}.items():
    np.testing.assert_allclose(schedule(step), want, rtol=1e-6, err_msg=f"step {step}")

  _, schedule = optimizers.make_optimizer(
      _config(schedule="constant", lr_scaling="sqrt", learning_rate=0.075),
      total_steps=10, batch_size=64)
  for step in (0, 5, 10):
    np.testing.assert_allclose(schedule(step), 0.075 * 8, rtol=1e-6)

  _, schedule = optimizers.make_optimizer(
      _config(warmup_steps=0, end_lr_factor=0.5), total_steps=8, batch_size=256)
  np.testing.assert_allclose(schedule(0), 0.3, rtol=1e-6)
  np.testing.assert_allclose(schedule(8), 0.15, rtol=1e-6)
  np.testing.assert_allclose(schedule(4), 0.15 + 0.15 * 0.5, rtol=1e-6)


def _one_update(config, params, grads, **kwargs):
  tx, _ = optimizers.make_optimizer(config, total_steps=kwargs.get("total_steps", 100),
                                    batch_size=kwargs.get("batch_size", 256))
  state = tx.init(params)
  updates, state = jax.jit(tx.update)(grads, state, params)
  return _flat(updates), tx, state


def test_sgd_weight_decay_applies_exactly_to_unmasked_params():
  params, grads = _params(), _grads(_params())
  lr, wd = 0.5, 0.1
  config = _config(name="sgd", learning_rate=lr, lr_scaling="none", schedule="constant",
                   momentum=0.0, weight_decay=wd)
  updates, _, _ = _one_update(config, params, grads)
  p, g = _flat(params), _flat(grads)
  decayed = {"encoder/root_block/conv/kernel", "encoder/block1/unit01/conv1/kernel",
             "head/Dense_0/kernel"}
  for path in p:
    want = -lr * (g[path] + wd * p[path]) if path in decayed else -lr * g[path]
    np.testing.assert_allclose(updates[path], want, rtol=1e-6, err_msg=path)


def test_adamw_weight_decay_is_decoupled_and_masked():
  params, grads = _params(), _grads(_params())
  lr, wd, eps = 0.01, 0.05, 1e-8
  config = _config(name="adamw", learning_rate=lr, lr_scaling="none", schedule="constant",
                   weight_decay=wd, eps=eps)
  updates, _, _ = _one_update(config, params, grads)
  p, g = _flat(params), _flat(grads)
  for path in p:
    # After one step the bias-corrected moments are g and g**2.
    adam = g[path] / (np.abs(g[path]) + eps)
    decay = wd * p[path] if path.endswith("kernel") else 0.0
    np.testing.assert_allclose(updates[path], -lr * (adam + decay), rtol=1e-5, err_msg=path)


def _lars_reference(params, grads_per_step, lr, wd, eta, momentum, excluded):
  """SimCLR's LARS (lars_optimizer.py) in NumPy: returns the params after the steps."""
  params = {k: v.astype(np.float64) for k, v in params.items()}
  velocity = {k: np.zeros_like(v) for k, v in params.items()}
  for grads in grads_per_step:
    for k in params:
      g = grads[k].astype(np.float64)
      if k in excluded:
        scaled_lr = lr
      else:
        g = g + wd * params[k]
        w_norm, g_norm = np.linalg.norm(params[k]), np.linalg.norm(g)
        trust_ratio = eta * w_norm / g_norm if w_norm > 0 and g_norm > 0 else 1.0
        scaled_lr = lr * trust_ratio
      velocity[k] = momentum * velocity[k] + scaled_lr * g
      params[k] = params[k] - velocity[k]
  return params


def test_lars_matches_numpy_reimplementation_over_steps():
  params = _params()
  lr, wd, eta, momentum = 0.6, 1e-2, 0.001, 0.9
  config = _config(learning_rate=lr, lr_scaling="none", schedule="constant",
                   weight_decay=wd, trust_coefficient=eta, momentum=momentum)
  tx, _ = optimizers.make_optimizer(config, total_steps=10, batch_size=256)
  state = tx.init(params)
  step = jax.jit(tx.update)
  grads_per_step = [_grads(params, seed=s) for s in (1, 2, 3)]
  current = params
  for grads in grads_per_step:
    updates, state = step(grads, state, current)
    current = optax.apply_updates(current, updates)

  flat_params = _flat(params)
  excluded = {k for k in flat_params if not k.endswith("kernel")}
  want = _lars_reference(flat_params, [_flat(g) for g in grads_per_step], lr, wd, eta, momentum,
                         excluded)
  got = _flat(current)
  for k in flat_params:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-7, err_msg=k)
  # The trust ratio must matter: a kernel moved much less than an excluded bias would.
  kernel = "head/Dense_0/kernel"
  assert np.abs(got[kernel] - flat_params[kernel]).max() < 0.01


def test_frozen_params_are_unchanged_and_have_no_state():
  params = _params()
  config = _config(name="adamw", learning_rate=0.1, lr_scaling="none", schedule="constant",
                   weight_decay=0.1, frozen=(r"encoder/.*",))
  tx, _ = optimizers.make_optimizer(config, total_steps=10, batch_size=256)
  state = tx.init(params)

  @jax.jit
  def train_step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  current = params
  for seed in range(3):
    current, state = train_step(current, state, _grads(params, seed))
  before, after = _flat(params), _flat(current)
  for path in before:
    if path.startswith("encoder/"):
      np.testing.assert_array_equal(after[path], before[path], err_msg=path)
    else:
      assert np.abs(after[path] - before[path]).min() > 1e-4, path

  head_size = sum(v.size for k, v in before.items() if k.startswith("head/"))
  moment_elements = sum(x.size for x in jax.tree.leaves(state) if x.ndim > 0)
  assert moment_elements == 2 * head_size  # Adam's mu and nu for the head only


def test_frozen_regex_that_matches_nothing_fails_loudly():
  config = _config(frozen=(r"backbone/.*",))
  tx, _ = optimizers.make_optimizer(config, total_steps=10, batch_size=256)
  with pytest.raises(ValueError, match=r"frozen: regex 'backbone/\.\*' matches no parameter"):
    tx.init(_params())


def test_grad_clipping_uses_global_norm_of_trainable_grads():
  params = {"a": jnp.zeros(3), "b": jnp.zeros(4), "frozen": {"kernel": jnp.zeros(2)}}
  config = _config(name="sgd", learning_rate=1.0, lr_scaling="none", schedule="constant",
                   momentum=0.0, weight_decay=0.0, grad_clip_norm=1.0, frozen=(r"frozen/.*",))
  tx, _ = optimizers.make_optimizer(config, total_steps=10, batch_size=256)
  state = tx.init(params)
  grads = {"a": jnp.array([3.0, 0.0, 0.0]), "b": jnp.array([0.0, 4.0, 0.0, 0.0]),
           "frozen": {"kernel": jnp.array([1e6, 1e6])}}
  updates, _ = tx.update(grads, state, params)
  np.testing.assert_allclose(updates["a"], [-0.6, 0.0, 0.0], rtol=1e-6)  # norm 5 -> 1
  np.testing.assert_allclose(updates["b"], [0.0, -0.8, 0.0, 0.0], rtol=1e-6)
  np.testing.assert_array_equal(updates["frozen"]["kernel"], [0.0, 0.0])
  # Below the threshold nothing changes, however large the frozen gradients are.
  small = {"a": jnp.array([0.3, 0.0, 0.0]), "b": jnp.array([0.0, 0.4, 0.0, 0.0]),
           "frozen": {"kernel": jnp.array([1e6, 1e6])}}
  updates, _ = tx.update(small, state, params)
  np.testing.assert_allclose(updates["a"], [-0.3, 0.0, 0.0], rtol=1e-6)
  np.testing.assert_allclose(updates["b"], [0.0, -0.4, 0.0, 0.0], rtol=1e-6)


def test_config_errors_name_the_field_and_valid_values():
  with pytest.raises(ValueError, match=r"name='adam' is unknown; valid values are: 'lars', 'sgd', 'adamw'"):
    optimizers.make_optimizer(_config(name="adam"), total_steps=10, batch_size=8)
  with pytest.raises(ValueError, match=r"schedule='step' is unknown; valid values are: 'cosine'"):
    optimizers.make_optimizer(_config(schedule="step"), total_steps=10, batch_size=8)
  with pytest.raises(ValueError, match=r"lr_scaling='log' is unknown"):
    optimizers.make_optimizer(_config(lr_scaling="log"), total_steps=10, batch_size=8)
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['warmup_epochs'\].*trainer converts"):
    optimizers.make_optimizer({"warmup_epochs": 10}, total_steps=10, batch_size=8)
  with pytest.raises(ValueError, match=r"warmup_steps=20 exceeds total_steps=10"):
    optimizers.make_optimizer(_config(warmup_steps=20), total_steps=10, batch_size=8)
  with pytest.raises(ValueError, match=r"weight_decay_exclude: invalid regex"):
    optimizers.make_optimizer(_config(weight_decay_exclude=("[",)), total_steps=10, batch_size=8)


def test_partial_dict_config_takes_defaults():
  tx, schedule = optimizers.make_optimizer({"name": "sgd"}, total_steps=10, batch_size=512)
  np.testing.assert_allclose(schedule(0), 0.6, rtol=1e-6)  # 0.3 * 512 / 256, no warm-up
  assert isinstance(tx, optax.GradientTransformation)


def test_describe_masks_table():
  config = _config(frozen=(r"encoder/root_block/.*",))
  text = optimizers.describe_masks(_params(), config)
  rows = {line.split()[0]: line.split()[1:] for line in text.splitlines()[3:-1]}
  assert rows["encoder/root_block/conv/kernel"][-3:] == ["-", "-", "yes"]
  assert rows["encoder/block1/unit01/conv1/kernel"][-3:] == ["yes", "yes", "no"]
  assert rows["encoder/block1/unit01/gn1/scale"][-3:] == ["no", "no", "no"]
  assert rows["head/Dense_0/bias"][-3:] == ["no", "no", "no"]
  assert len(rows) == 10
  # Kernels 36 (root, frozen) + 16 (conv1) + 12 (head); 3 x 8 norm params; 3 head biases.
  assert text.splitlines()[-1] == (
      "91 parameters: weight decay on 28, LARS on 28, frozen 36, trainable 55")
  adamw_text = optimizers.describe_masks(_params(), _config(name="adamw"))
  assert "conv1/kernel" in adamw_text and " - " in adamw_text  # no LARS column values
