"""ResNetV2: architecture sizes, numerics of its pieces, dtypes, remat."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from remedis_jax.models import VARIANTS
from remedis_jax.models import bit
from remedis_jax.models import count_params
from remedis_jax.models import create_model


def abstract_params(model, channels=3):
  images = jax.ShapeDtypeStruct((1, 32, 32, channels), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), images)["params"]


def bit_param_count(blocks, base_width, in_channels=3, num_classes=None):
  """Parameters of a BiT ResNet-v2, counted from the architecture."""
  total = 7 * 7 * in_channels * base_width  # root conv, no bias
  cin = base_width
  for stage, units in enumerate(blocks):
    mid = base_width * 2**stage
    out = 4 * mid
    for unit in range(units):
      total += 2 * cin + cin * mid            # gn1, conv1 (1x1)
      total += 2 * mid + 9 * mid * mid        # gn2, conv2 (3x3)
      total += 2 * mid + mid * out            # gn3, conv3 (1x1)
      if unit == 0:                           # projection: channels change
        total += cin * out
      cin = out
  total += 2 * cin                            # final GroupNorm
  if num_classes:
    total += cin * num_classes + num_classes  # Dense head with bias
  return total


@pytest.mark.parametrize("num_classes", [None, 1000, 21843])
def test_r50x1_param_count_is_the_published_one(num_classes):
  count = count_params(abstract_params(create_model("R50x1", num_classes)))
  assert count == bit_param_count((3, 4, 6, 3), 64, num_classes=num_classes)
  # BiT-R50x1 feature extractor 23.5 M; with the ImageNet-21k head ~68 M.
  published = {None: 23_500_352, 1000: 25_549_352, 21843: 68_256_659}
  assert count == published[num_classes]


@pytest.mark.parametrize("name,blocks,width", [
    ("R101x3", (3, 4, 23, 3), 192), ("R152x2", (3, 8, 36, 3), 128)])
def test_deeper_wider_param_counts(name, blocks, width):
  count = count_params(abstract_params(create_model(name, num_classes=1000)))
  assert count == bit_param_count(blocks, width, num_classes=1000)


def test_tiny_variants_have_the_specified_widths():
  for name, root, outs in (("R_small", 32, (128, 256, 512, 1024)),
                           ("R_tiny", 16, (64, 128, 256, 512)),
                           ("R_micro", 8, (32, 64, 128, 256))):
    params = abstract_params(create_model(name), channels=1)
    assert params["root_block"]["conv_root"]["kernel"].shape == (7, 7, 1, root)
    for i, out in enumerate(outs, 1):
      assert list(params[f"block{i}"]) == ["unit01"]
      assert params[f"block{i}"]["unit01"]["conv3"]["kernel"].shape[-1] == out
    assert count_params(params) == bit_param_count((1, 1, 1, 1), root, 1)
  assert VARIANTS["R_small"]["num_groups"] == 16
  assert VARIANTS["R_tiny"]["num_groups"] == 8
  assert VARIANTS["R_micro"]["num_groups"] == 4


def test_unknown_name_and_field_are_refused():
  with pytest.raises(ValueError, match="known names: R50x1, R50x3"):
    create_model("R50x2")
  with pytest.raises(ValueError, match=r"unknown ResNetV2 field\(s\) \['widht'\]"):
    create_model("R_tiny", widht=2)


def test_weight_standardization_matches_numpy():
  w = np.random.RandomState(0).normal(0.5, 2.0, (3, 3, 4, 5))
  ref = (w - w.mean((0, 1, 2))) / np.sqrt(w.var((0, 1, 2)) + 1e-10)
  np.testing.assert_allclose(bit.standardize_kernel(jnp.asarray(w)), ref,
                             rtol=1e-5, atol=1e-5)


def np_group_norm(x, groups, eps=1e-5):
  g = x.reshape(*x.shape[:-1], groups, -1)
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = ((g - mean)**2).mean(axis=(1, 2, 4), keepdims=True)
  return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape)


def test_group_norm_is_bits_eps_and_two_pass_variance():
  # Small spread on a large offset: flax's default "fast" variance
  # E[x^2]-E[x]^2 cancels catastrophically here, and eps 1e-6 vs 1e-5 shows.
  rng = np.random.RandomState(0)
  x = 30 + 3e-3 * rng.randn(2, 4, 4, 8)
  norm = bit._group_norm(4, jnp.float32, jnp.float32, "gn")
  y, _ = norm.init_with_output(jax.random.key(0), jnp.asarray(x, jnp.float32))
  x32 = x.astype(np.float32).astype(np.float64)
  np.testing.assert_allclose(y, np_group_norm(x32, 4), atol=2e-3)


def test_group_norm_keeps_float32_statistics_under_bf16():
  rng = np.random.RandomState(0)
  x = jnp.asarray(60 + rng.randn(2, 8, 8, 8), jnp.bfloat16)
  norm = bit._group_norm(4, jnp.bfloat16, jnp.float32, "gn")
  y, _ = norm.init_with_output(jax.random.key(0), x)
  assert y.dtype == jnp.bfloat16
  ref = np_group_norm(np.asarray(x, np.float64), 4)
  # bf16 output rounding is ~0.4 %; bf16 statistics (mean of ~60 in steps of
  # 0.25) would be off by tens of percent.
  np.testing.assert_allclose(np.asarray(y, np.float64), ref, atol=0.03)


def random_params(abstract, seed=0):
  """Random values for an abstract param tree: cheaper than a jit'd init."""
  rng = np.random.RandomState(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == "scale":
      return (1 + 0.2 * rng.randn(*leaf.shape)).astype(np.float32)
    if name == "bias":
      return (0.2 * rng.randn(*leaf.shape)).astype(np.float32)
    return rng.randn(*leaf.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, abstract)


@functools.lru_cache(maxsize=None)
def micro_setup(num_classes=None, channels=3):
  model = create_model("R_micro", num_classes=num_classes)
  images = np.random.RandomState(0).uniform(
      -1, 1, (2, 32, 32, channels)).astype(np.float32)
  variables = {"params": random_params(abstract_params(model, channels))}
  return model, variables, images


def test_forward_outputs_and_intermediates():
  model = create_model("R_micro", num_classes=7)
  images = np.random.RandomState(0).uniform(-1, 1, (2, 32, 32, 1)).astype(
      np.float32)
  logits, variables = jax.jit(model.init_with_output)(jax.random.key(0),
                                                      images)
  logits, out = logits
  assert logits.shape == (2, 7) and logits.dtype == jnp.float32
  np.testing.assert_array_equal(logits, 0)  # zero-initialised head, as BiT
  np.testing.assert_array_equal(variables["params"]["head"]["kernel"], 0)
  shapes = {k: v.shape for k, v in out.items()}
  assert shapes == {"root": (2, 8, 8, 8), "block1": (2, 8, 8, 32),
                    "block2": (2, 4, 4, 64), "block3": (2, 2, 2, 128),
                    "block4": (2, 1, 1, 256), "feature_map": (2, 1, 1, 256),
                    "pre_logits": (2, 256), "logits": (2, 7)}
  assert np.all(np.asarray(out["feature_map"]) >= 0)  # after the final ReLU
  np.testing.assert_allclose(out["pre_logits"],
                             np.asarray(out["feature_map"]).mean((1, 2)),
                             rtol=1e-6)
  # logits = Dense(pre_logits) with loaded weights: tests/test_load_bit.py.


def test_without_head_output_is_pre_logits():
  model, variables, images = micro_setup()
  assert "head" not in variables["params"]
  output, out = jax.jit(model.apply)(variables, images)
  np.testing.assert_array_equal(output, out["pre_logits"])
  assert "logits" not in out


def test_bf16_compute_is_close_to_float32():
  model, variables, images = micro_setup()
  ref, _ = jax.jit(model.apply)(variables, images)
  bf16 = create_model("R_micro", dtype=jnp.bfloat16)
  # Same float32 parameters: param_dtype stays float32.
  assert jax.tree_util.tree_structure(abstract_params(bf16)) == \
      jax.tree_util.tree_structure(variables["params"])
  output, out = jax.jit(bf16.apply)(variables, images)
  assert output.dtype == jnp.float32 and out["pre_logits"].dtype == jnp.float32
  assert out["block2"].dtype == jnp.bfloat16
  ref, output = np.asarray(ref), np.asarray(output)
  assert np.abs(output - ref).max() <= 0.05 * np.abs(ref).max()
  cosine = (output * ref).sum(1) / np.linalg.norm(output, axis=1) / \
      np.linalg.norm(ref, axis=1)
  assert np.all(cosine > 0.999)


def test_remat_gives_identical_outputs_and_gradients():
  model, variables, images = micro_setup()
  remat_model = create_model("R_micro", remat=True)
  assert jax.tree_util.tree_structure(abstract_params(remat_model)) == \
      jax.tree_util.tree_structure(variables["params"])

  def loss(m, params):
    output, out = m.apply({"params": params}, images)
    return jnp.sum(output**2) + jnp.mean(out["block2"])

  results = [jax.jit(jax.value_and_grad(functools.partial(loss, m)))(
      variables["params"]) for m in (model, remat_model)]
  (value, grads), (remat_value, remat_grads) = results
  # Same math; XLA may fuse the recomputed graph differently, so allow float32
  # rounding (measured: at most ~1.5e-5 relative on single elements).
  np.testing.assert_allclose(remat_value, value, rtol=1e-6)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(
          a, b, rtol=1e-4, atol=1e-6 * np.abs(b).max()), remat_grads, grads)
  assert any(np.abs(g).max() > 0 for g in jax.tree_util.tree_leaves(grads))
  # The remat model really rematerialises: its jaxpr has remat (checkpoint).
  jaxpr = str(jax.make_jaxpr(jax.grad(functools.partial(loss, remat_model)))(
      variables["params"]))
  assert "checkpoint" in jaxpr or "remat" in jaxpr


def test_rank_check():
  model = create_model("R_micro")
  with pytest.raises(ValueError, match="rank 4"):
    model.init(jax.random.key(0), jnp.zeros((32, 32, 3)))


def test_summary_counts():
  from remedis_jax.models import summary  # pylint: disable=g-import-not-at-top
  assert summary.variant_param_count("R_micro", 1000, in_channels=1) == \
      bit_param_count((1, 1, 1, 1), 8, in_channels=1, num_classes=1000)
