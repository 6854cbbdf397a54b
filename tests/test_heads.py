"""ProjectionHead and ContrastiveModel, checked against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from remedis_jax.models import ContrastiveModel
from remedis_jax.models import ProjectionHead
from remedis_jax.models import create_contrastive_model
from remedis_jax.models import create_model
from remedis_jax.models import merge_params


def randomize(tree, seed=0):
  """Random values everywhere (LayerNorm scale/bias too), as after training."""
  rng = np.random.RandomState(seed)
  return jax.tree_util.tree_map(
      lambda leaf: (0.5 * rng.randn(*leaf.shape)).astype(np.float32), tree)


def np_layer_norm(h, scale, bias=0.0, eps=1e-6):
  mean = h.mean(-1, keepdims=True)
  var = ((h - mean)**2).mean(-1, keepdims=True)
  return (h - mean) / np.sqrt(var + eps) * scale + bias


def np_projection_head(params, x, num_hidden, norm):
  h = x.astype(np.float64)
  hidden = []
  for i in range(num_hidden):
    layer = params[f"hidden_{i}"]
    h = h @ layer["kernel"] + layer.get("bias", 0.0)
    if norm == "layer":
      h = np_layer_norm(h, params[f"hidden_{i}_norm"]["scale"],
                        params[f"hidden_{i}_norm"]["bias"])
    h = np.maximum(h, 0)
    hidden.append(h)
  z = h @ params["output"]["kernel"]
  if norm == "layer":
    z = np_layer_norm(z, params["output_norm"]["scale"])
  return z, hidden


@pytest.mark.parametrize("norm,hidden_dims", [
    ("layer", (32, 24)), ("none", (32, 24)), ("layer", (16,)), ("none", ())])
def test_projection_head_matches_numpy(norm, hidden_dims):
  head = ProjectionHead(hidden_dims=hidden_dims, output_dim=8, norm=norm)
  x = np.random.RandomState(1).randn(5, 20).astype(np.float32)
  params = randomize(jax.eval_shape(head.init, jax.random.key(0), x)["params"])
  z, out = jax.jit(head.apply)({"params": params}, x)
  ref_z, ref_hidden = np_projection_head(params, x, len(hidden_dims), norm)
  assert z.shape == (5, 8) and z.dtype == jnp.float32
  np.testing.assert_allclose(z, ref_z, rtol=1e-4, atol=1e-4)
  assert sorted(out) == sorted(["input"] + [f"hidden_{i}" for i in
                                            range(len(hidden_dims))])
  np.testing.assert_array_equal(out["input"], x)
  for i, ref in enumerate(ref_hidden):
    np.testing.assert_allclose(out[f"hidden_{i}"], ref, rtol=1e-4, atol=1e-4)
  # SimCLR layout: Dense before a norm has no bias; the output has no bias.
  assert "bias" not in params["output"]
  for i in range(len(hidden_dims)):
    assert ("bias" in params[f"hidden_{i}"]) == (norm == "none")
  if norm == "layer":
    assert "bias" not in params["output_norm"]


def test_projection_head_defaults_and_bad_norm():
  head = ProjectionHead()
  params = jax.eval_shape(head.init, jax.random.key(0),
                          jnp.zeros((2, 64)))["params"]
  assert params["hidden_0"]["kernel"].shape == (64, 2048)
  assert params["hidden_1"]["kernel"].shape == (2048, 2048)
  assert params["output"]["kernel"].shape == (2048, 128)
  with pytest.raises(ValueError, match=r"norm must be one of \('none', 'layer'\)"):
    ProjectionHead(norm="batch").init(jax.random.key(0), jnp.zeros((2, 4)))


def test_contrastive_model_is_encoder_then_head():
  model = create_contrastive_model("R_micro", head_hidden_dims=(32, 16),
                                   projection_dim=8)
  assert isinstance(model, ContrastiveModel)
  images = np.random.RandomState(0).uniform(-1, 1, (2, 32, 32, 3)).astype(
      np.float32)
  abstract = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
  assert sorted(abstract) == ["encoder", "head"]
  # params["encoder"] fits create_model(name) exactly.
  encoder = create_model("R_micro")
  encoder_abstract = jax.eval_shape(encoder.init, jax.random.key(0),
                                    images)["params"]
  assert jax.tree_util.tree_structure(abstract["encoder"]) == \
      jax.tree_util.tree_structure(encoder_abstract)
  params = randomize(abstract)
  merge_params(params["encoder"], encoder_abstract)  # raises on mismatch

  def run(params):
    z, out = model.apply({"params": params}, images)
    pre_logits, enc_out = encoder.apply({"params": params["encoder"]}, images)
    head_z, head_out = ProjectionHead((32, 16), 8).apply(
        {"params": params["head"]}, pre_logits)
    return z, out, head_z, head_out, enc_out

  z, out, head_z, head_out, enc_out = jax.jit(run)(params)
  np.testing.assert_allclose(z, head_z, rtol=1e-5, atol=1e-5)
  assert sorted(out) == sorted(list(enc_out) +
                               [f"head/{k}" for k in head_out])
  np.testing.assert_array_equal(out["head/input"], out["pre_logits"])
  np.testing.assert_allclose(out["head/hidden_1"], head_out["hidden_1"],
                             rtol=1e-5, atol=1e-5)


def test_create_contrastive_model_options():
  model = create_contrastive_model("R_tiny", head_norm="none",
                                   dtype=jnp.bfloat16, remat=True)
  assert model.encoder.dtype == jnp.bfloat16 and model.encoder.remat
  assert model.head.dtype == jnp.bfloat16 and model.head.norm == "none"
  assert model.head.hidden_dims == (2048, 2048) and model.head.output_dim == 128
  with pytest.raises(ValueError, match="drop num_classes"):
    create_contrastive_model("R_tiny", num_classes=10)
  with pytest.raises(ValueError, match="head_norm"):
    create_contrastive_model("R_tiny", head_norm="batch")
  with pytest.raises(ValueError, match="known names"):
    create_contrastive_model("R49")
  bad = ContrastiveModel(encoder=create_model("R_micro", num_classes=3),
                         head=ProjectionHead((8,), 4))
  with pytest.raises(ValueError, match="num_classes=None"):
    jax.eval_shape(bad.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
