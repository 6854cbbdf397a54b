"""Tests of the Vision Transformer (remedis_jax/models/vit.py) and the model-zoo dispatcher."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from remedis_jax import models
from remedis_jax.models import bit, vit
from tests import fakes


def _abstract_params(model, image_size=224, channels=3):
  images = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), images)["params"]


def _count(tree):
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def _expected_vit_params(width, depth, mlp, patch, image_size, channels, num_classes):
  """Parameter count of a class-token-free ViT, derived from the architecture by hand."""
  patch_embedding = patch * patch * channels * width + width
  pos_embedding = (image_size // patch) ** 2 * width
  layer_norm = 2 * width
  attention = 4 * (width * width + width)  # query, key, value, out: kernel + bias each
  mlp_block = width * mlp + mlp + mlp * width + width
  block = 2 * layer_norm + attention + mlp_block
  head = width * num_classes + num_classes
  return patch_embedding + pos_embedding + depth * block + layer_norm + head


@pytest.mark.parametrize("name, width, mlp, published_with_cls_token", [
    # Published 1000-class counts WITH class token (ViT paper / timm vit_*_patch16_224).
    ("ViT-S/16", 384, 1536, 22_050_664),
    ("ViT-B/16", 768, 3072, 86_567_656),
])
def test_parameter_count_matches_published(name, width, mlp, published_with_cls_token):
  params = _abstract_params(models.create_model(name, num_classes=1000))
  expected = _expected_vit_params(width, 12, mlp, 16, 224, 3, 1000)
  # No class token here: the token itself (D) and its position-embedding row (D) are absent.
  assert expected == published_with_cls_token - 2 * width
  assert _count(params) == expected
  assert params["pos_embedding"].shape == (1, 196, width)
  assert params["embedding"]["kernel"].shape == (16, 16, 3, width)
  assert sorted(k for k in params if k.startswith("encoderblock_")) == sorted(
      f"encoderblock_{i}" for i in range(12))
  assert {"encoder_norm", "head"} <= set(params)


# ------------------------------------------------------------------ NumPy reference forward
def _layer_norm(x, p, eps=vit.LAYER_NORM_EPS):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _gelu(x):
  from scipy.special import erf  # pylint: disable=g-import-not-at-top
  return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def _attention(x, p):
  q = np.einsum("bnd,dhk->bnhk", x, p["query"]["kernel"]) + p["query"]["bias"]
  k = np.einsum("bnd,dhk->bnhk", x, p["key"]["kernel"]) + p["key"]["bias"]
  v = np.einsum("bnd,dhk->bnhk", x, p["value"]["kernel"]) + p["value"]["bias"]
  logits = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1])
  logits -= logits.max(-1, keepdims=True)
  weights = np.exp(logits)
  weights /= weights.sum(-1, keepdims=True)
  y = np.einsum("bhqs,bshk->bqhk", weights, v)
  return np.einsum("bqhk,hkd->bqd", y, p["out"]["kernel"]) + p["out"]["bias"]


def _numpy_vit(params, images, patch):
  """Independent float64 forward pass: patchify by reshape, no convolution."""
  params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  images = np.asarray(images, np.float64)
  b, h, w, c = images.shape
  gh, gw = h // patch, w // patch
  patches = images.reshape(b, gh, patch, gw, patch, c).transpose(0, 1, 3, 2, 4, 5)
  patches = patches.reshape(b, gh * gw, patch * patch * c)
  kernel = params["embedding"]["kernel"].reshape(patch * patch * c, -1)
  x = patches @ kernel + params["embedding"]["bias"] + params["pos_embedding"]
  i = 0
  while f"encoderblock_{i}" in params:
    blk = params[f"encoderblock_{i}"]
    x = x + _attention(_layer_norm(x, blk["attention_norm"]), blk["attention"])
    y = _layer_norm(x, blk["mlp_norm"])
    y = _gelu(y @ blk["mlp"]["fc1"]["kernel"] + blk["mlp"]["fc1"]["bias"])
    x = x + y @ blk["mlp"]["fc2"]["kernel"] + blk["mlp"]["fc2"]["bias"]
    i += 1
  tokens = _layer_norm(x, params["encoder_norm"])
  return tokens, tokens.mean(1)


def _random_params(model, images, seed=0):
  """Real init, then every leaf replaced by noise so that zero/one inits cannot hide bugs."""
  params = jax.jit(model.init)(jax.random.key(seed), images)["params"]
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [0.3 * jax.random.normal(k, l.shape, l.dtype) for k, l in zip(keys, leaves)]
  return jax.tree.unflatten(treedef, leaves)


def test_forward_matches_numpy_reference():
  model = models.create_model("ViT-micro/4", num_classes=3)
  images = jax.random.uniform(jax.random.key(2), (2, 32, 32, 3), minval=-1, maxval=1)
  params = _random_params(model, images)
  logits, out = jax.jit(model.apply)({"params": params}, images)
  tokens, pre_logits = _numpy_vit({k: v for k, v in params.items() if k != "head"}, images, 4)
  np.testing.assert_allclose(out["tokens"], tokens, atol=2e-4, rtol=2e-4)
  np.testing.assert_allclose(out["pre_logits"], pre_logits, atol=2e-4, rtol=2e-4)
  expected_logits = pre_logits @ np.asarray(params["head"]["kernel"], np.float64) + np.asarray(
      params["head"]["bias"], np.float64)
  np.testing.assert_allclose(logits, expected_logits, atol=5e-4, rtol=5e-4)


# --------------------------------------------------------------------- shapes and resizing
@pytest.mark.parametrize("size", [32, 48])
def test_output_and_intermediate_shapes(size):
  model = models.create_model("ViT-micro/4")
  assert (model.patch_size, model.hidden_size, model.image_size) == (4, 32, 32)
  images = jax.random.uniform(jax.random.key(0), (3, size, size, 1), minval=-1, maxval=1)
  params = jax.jit(model.init)(jax.random.key(0), images)["params"]
  # Position embeddings are stored for the 32 px reference grid at every input size.
  assert params["pos_embedding"].shape == (1, 64, 32)
  output, out = jax.jit(model.apply)({"params": params}, images)
  grid = size // 4
  assert out["tokens"].shape == (3, grid * grid, 32)
  assert out["feature_map"].shape == (3, grid, grid, 32)
  assert out["pre_logits"].shape == output.shape == (3, 32)
  assert "logits" not in out
  np.testing.assert_array_equal(output, out["pre_logits"])
  # Row-major token order: feature_map[b, i, j] is token i * grid + j.
  np.testing.assert_array_equal(out["feature_map"][:, 1, 2], out["tokens"][:, grid + 2])
  np.testing.assert_allclose(out["pre_logits"], np.asarray(out["tokens"]).mean(1), atol=1e-6)


def _numpy_bilinear(grid, out_h, out_w):
  """Half-pixel-centre bilinear upsampling of a (h, w, D) array (edge-clamped)."""
  h, w, _ = grid.shape

  def axis_weights(n_in, n_out):
    centres = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
    centres = np.clip(centres, 0, n_in - 1)
    low = np.floor(centres).astype(int)
    high = np.minimum(low + 1, n_in - 1)
    frac = centres - low
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), low] += 1 - frac
    m[np.arange(n_out), high] += frac
    return m

  return np.einsum("ih,jw,hwd->ijd", axis_weights(h, out_h), axis_weights(w, out_w), grid)


def test_pos_embedding_resize_is_bilinear():
  rng = np.random.default_rng(0)
  pos = rng.normal(size=(1, 8 * 8, 5)).astype(np.float32)
  resized = vit.resize_pos_embedding(jnp.asarray(pos), (8, 8), (12, 10))
  expected = _numpy_bilinear(pos.reshape(8, 8, 5), 12, 10).reshape(1, 120, 5)
  np.testing.assert_allclose(resized, expected, atol=1e-5)
  assert vit.resize_pos_embedding(pos, (8, 8), (8, 8)) is pos


def test_model_uses_resized_pos_embedding_at_48px():
  """At 48 px the model equals a 48 px-reference model holding the resized embeddings."""
  images = jax.random.uniform(jax.random.key(1), (2, 48, 48, 3), minval=-1, maxval=1)
  model = models.create_model("ViT-micro/4")
  params = _random_params(model, images)
  resized = dict(params, pos_embedding=vit.resize_pos_embedding(params["pos_embedding"],
                                                                (8, 8), (12, 12)))
  model_48 = models.create_model("ViT-micro/4", image_size=48)
  out = model.apply({"params": params}, images)[1]["tokens"]
  out_48 = model_48.apply({"params": resized}, images)[1]["tokens"]
  np.testing.assert_allclose(out, out_48, atol=1e-6)
  # And the resize matters: embeddings tiled without resizing give different tokens.
  wrong = dict(params, pos_embedding=jnp.tile(params["pos_embedding"], (1, 3, 1))[:, :144])
  out_wrong = model_48.apply({"params": wrong}, images)[1]["tokens"]
  assert np.abs(np.asarray(out) - np.asarray(out_wrong)).max() > 1e-2


# ------------------------------------------------------------------------------- dtypes etc.
def test_bfloat16_compute_keeps_float32_outputs():
  images = jax.random.uniform(jax.random.key(3), (2, 32, 32, 3), minval=-1, maxval=1)
  f32 = models.create_model("ViT-micro/4", num_classes=4)
  bf16 = models.create_model("ViT-micro/4", num_classes=4, dtype=jnp.bfloat16)
  params = _random_params(f32, images)
  params = dict(params, head=jax.tree.map(lambda a: a + 0.1, params["head"]))
  logits32, out32 = f32.apply({"params": params}, images)
  logits16, out16 = bf16.apply({"params": params}, images)
  assert logits16.dtype == out16["pre_logits"].dtype == out16["logits"].dtype == jnp.float32
  assert out16["tokens"].dtype == out16["feature_map"].dtype == jnp.bfloat16
  assert jax.tree.leaves(params)[0].dtype == jnp.float32
  np.testing.assert_allclose(out16["pre_logits"], out32["pre_logits"], atol=0.1)
  np.testing.assert_allclose(logits16, logits32, atol=0.1)
  # bf16 params when asked.
  abstract = _abstract_params(models.create_model("ViT-micro/4", param_dtype=jnp.bfloat16), 32)
  assert {leaf.dtype for leaf in jax.tree.leaves(abstract)} == {jnp.dtype(jnp.bfloat16)}


def _primitive_outputs(jaxpr, name):
  """Output avals of every `name` equation, including inside nested jaxprs (jit, remat)."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == name:
      found += [v.aval for v in eqn.outvars]
    for param in eqn.params.values():
      inner = getattr(param, "jaxpr", param)  # ClosedJaxpr (jit) or Jaxpr (remat)
      if hasattr(inner, "eqns"):
        found += _primitive_outputs(inner, name)
  return found


@pytest.mark.parametrize("remat", [False, True])
def test_bfloat16_attention_softmax_runs_in_float32(remat):
  model = models.create_model("ViT-micro/4", dtype=jnp.bfloat16, remat=remat)
  images = jnp.zeros((2, 32, 32, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  jaxpr = jax.make_jaxpr(model.apply)(variables, images).jaxpr
  # The softmax's exp over the (B, heads, N, N) attention logits, one per block.
  softmax_exps = [a for a in _primitive_outputs(jaxpr, "exp") if a.shape == (2, 2, 64, 64)]
  assert len(softmax_exps) == 2
  assert {a.dtype for a in softmax_exps} == {jnp.dtype(jnp.float32)}


def test_zero_initialised_head_gives_zero_logits():
  model = models.create_model("ViT-micro/4", num_classes=5)
  images = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)
  variables = jax.jit(model.init)(jax.random.key(0), images)
  logits, out = model.apply(variables, images)
  np.testing.assert_array_equal(logits, np.zeros((2, 5), np.float32))
  assert np.abs(np.asarray(out["pre_logits"])).max() > 0


def test_deterministic_init_and_apply():
  model = models.create_model("ViT-micro/4")
  images = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)
  a = jax.jit(model.init)(jax.random.key(7), images)
  b = jax.jit(model.init)(jax.random.key(7), images)
  c = jax.jit(model.init)(jax.random.key(8), images)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert not np.array_equal(a["params"]["pos_embedding"], c["params"]["pos_embedding"])
  out1 = model.apply(a, images, train=True)[0]
  out2 = model.apply(a, images, train=False)[0]
  np.testing.assert_array_equal(out1, out2)  # no dropout: train changes nothing


def test_remat_gives_same_outputs_and_gradients():
  # 16 px (a 4 x 4 grid, resized position embeddings): the backward pass is the slow part.
  images = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-1, maxval=1)
  plain = models.create_model("ViT-micro/4", num_classes=2)
  remat = models.create_model("ViT-micro/4", num_classes=2, remat=True)
  params = _random_params(plain, images)

  def loss(model):
    return lambda p: jnp.sum(model.apply({"params": p}, images)[0] ** 2)

  value, grads = jax.jit(jax.value_and_grad(loss(plain)))(params)
  value_r, grads_r = jax.jit(jax.value_and_grad(loss(remat)))(params)
  np.testing.assert_allclose(value, value_r, rtol=1e-6)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6, rtol=1e-5), grads,
               grads_r)


# -------------------------------------------------------------------------- errors, dispatch
def test_input_not_divisible_by_patch_size_is_an_error():
  model = models.create_model("ViT-micro/4")
  with pytest.raises(ValueError, match="divisible by 4"):
    jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 30, 32, 3),
                                                                      jnp.float32))


def test_dispatcher():
  assert isinstance(models.create_model("ViT-tiny/4"), models.VisionTransformer)
  assert set(models.VIT_VARIANTS) == {"ViT-S/16", "ViT-B/16", "ViT-tiny/4", "ViT-micro/4"}
  resnet = models.create_model("R_micro", num_classes=3, dtype=jnp.bfloat16, remat=True)
  assert resnet == bit.create_model("R_micro", num_classes=3, dtype=jnp.bfloat16, remat=True)
  tiny = models.create_model("ViT-tiny/4", num_groups=4, remat=True)  # BiT-only: ignored
  assert (tiny.hidden_size, tiny.num_layers, tiny.num_heads, tiny.mlp_dim) == (96, 4, 3, 384)
  assert tiny.remat
  with pytest.raises(ValueError, match="ViT-B/16"):
    models.create_model("ViT-L/16")
  with pytest.raises(ValueError, match="unknown VisionTransformer field"):
    models.create_model("ViT-micro/4", widht=3)
  with pytest.raises(ValueError, match="unknown ResNetV2 field"):
    models.create_model("R_micro", patch_size=4)


# ------------------------------------------------------------------ fine-tuning and export
def _smoke_config(**overrides):
  """Fine-tuning's smoke config with a ViT (its sharded steps: tests/test_train_gmml.py),
  validated and checkpointed once, at the last step: the same code paths, less time."""
  return fakes.smoke_config("finetune", **{
      "model.name": "ViT-micro/4", "test_sets": ("test@A",), "robustness.perturbations": (),
      "eval_every_steps": 4, "checkpoint_every_steps": 4, "log_every_steps": 4, **overrides})


def test_export_round_trip_then_linear_and_full_finetuning_from_it(tmp_path):
  from remedis_jax import checkpointing, export, train_finetune  # pylint: disable=g-import-not-at-top
  model = models.create_model("ViT-micro/4")
  images = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)
  encoder = jax.device_get(_random_params(model, images, seed=3))
  encoder = jax.tree.map(lambda a: a * 0.3, encoder)  # a trainable scale, not a saturated net
  export_dir = str(tmp_path / "export")
  export.write_export(export_dir, {"encoder": encoder},
                      {"model_name": "ViT-micro/4", "encoder_overrides": {}, "step": 0})

  module, params = export.create_encoder_from_export(export_dir)
  assert module == model
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, params, encoder)))
  np.testing.assert_array_equal(module.apply({"params": params}, images)[0],
                                model.apply({"params": encoder}, images)[0])

  def same_as_export(tree):
    return all(jax.tree.leaves(jax.tree.map(np.array_equal, tree, encoder)))

  # Linear evaluation: the loaded ViT is bit-identical after training, the classifier learned.
  linear_dir = str(tmp_path / "linear")
  results = train_finetune.train_and_evaluate(
      _smoke_config(**{"model.init": export_dir, "finetune_mode": "linear"}), linear_dir)
  assert results["finished"] and results["config"]["model"] == "ViT-micro/4"
  assert results["initialisation"].startswith("export ")
  trained, step = checkpointing.load_params(linear_dir)
  assert step == 4
  assert same_as_export(trained["encoder"])
  assert np.abs(trained["classifier"]["kernel"]).sum() > 0

  # Full fine-tuning with rematerialised blocks: the same start, and the encoder moves.
  full_dir = str(tmp_path / "full")
  results = train_finetune.train_and_evaluate(
      _smoke_config(**{"model.init": export_dir, "model.remat": True}), full_dir)
  assert results["finished"] and results["steps"] == 4
  assert 0.0 <= results["test_sets"]["test_A"]["metrics"]["macro_auc"] <= 1.0
  trained, _ = checkpointing.load_params(full_dir)
  assert trained["encoder"]["pos_embedding"].shape == (1, 64, 32)
  assert trained["classifier"]["kernel"].shape == (32, 4)
  assert not same_as_export(trained["encoder"])
