"""Tests for remedis_jax.losses against independent NumPy / scikit-learn references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sklearn.metrics
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from remedis_jax import losses


def _nt_xent_reference(z1, z2, temperature):
  """Loss, accuracy and entropy of NT-Xent written as loops in float64."""
  z = np.concatenate([z1, z2], axis=0).astype(np.float64)
  n2 = z.shape[0]
  n = n2 // 2
  z = z / np.linalg.norm(z, axis=1, keepdims=True)
  total_loss, correct, total_entropy = 0.0, 0, 0.0
  for i in range(n2):
    positive = (i + n) % n2
    candidates = [j for j in range(n2) if j != i]
    logits = np.array([z[i] @ z[j] / temperature for j in candidates])
    log_norm = np.log(np.sum(np.exp(logits - logits.max()))) + logits.max()
    positive_logit = z[i] @ z[positive] / temperature
    total_loss += log_norm - positive_logit
    correct += int(candidates[int(np.argmax(logits))] == positive)
    probs = np.exp(logits - log_norm)
    total_entropy += -np.sum(probs * np.log(probs))
  return total_loss / n2, correct / n2, total_entropy / n2


@pytest.mark.parametrize("n, d, temperature", [(1, 3, 0.1), (4, 8, 0.1), (7, 5, 0.5), (16, 4, 1.0)])
def test_nt_xent_matches_numpy_reference(n, d, temperature):
  rng = np.random.default_rng(n * 100 + d)
  # Un-normalised inputs with a scale far from 1: normalisation is the loss's job.
  z1 = rng.normal(size=(n, d)).astype(np.float32) * 7.0
  z2 = (z1 + rng.normal(size=(n, d)).astype(np.float32) * 3.0)
  want_loss, want_accuracy, want_entropy = _nt_xent_reference(z1, z2, temperature)

  loss, metrics = jax.jit(losses.nt_xent_with_metrics, static_argnums=2)(z1, z2, temperature)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(losses.nt_xent(z1, z2, temperature), want_loss, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["contrastive_loss"], want_loss, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["contrastive_accuracy"], want_accuracy, atol=1e-7)
  np.testing.assert_allclose(metrics["contrastive_entropy"], want_entropy, rtol=1e-5, atol=1e-6)


def test_nt_xent_single_pair_is_zero_and_perfect():
  # With N=1 the positive is the only candidate: the loss is exactly 0.
  loss, metrics = losses.nt_xent_with_metrics(jnp.ones((1, 3)), -jnp.ones((1, 3)), 0.1)
  assert float(loss) == 0.0
  assert float(metrics["contrastive_accuracy"]) == 1.0
  assert float(metrics["contrastive_entropy"]) == 0.0


def test_nt_xent_accuracy_is_not_trivially_one():
  # Positives deliberately far apart, negatives identical to the anchor: accuracy 0.
  z1 = np.array([[1.0, 0.0], [1.0, 0.0]], np.float32)
  z2 = np.array([[-1.0, 0.0], [-1.0, 0.0]], np.float32)
  _, metrics = losses.nt_xent_with_metrics(z1, z2, 0.1)
  # Anchor z1[0]: candidates z1[1] (sim 1), z2[0] (positive, -1), z2[1] (-1) -> wrong.
  assert float(metrics["contrastive_accuracy"]) == 0.0


def test_nt_xent_is_invariant_to_scaling_and_gradients_are_finite():
  rng = np.random.default_rng(0)
  z1 = rng.normal(size=(6, 5)).astype(np.float32)
  z2 = rng.normal(size=(6, 5)).astype(np.float32)
  base = losses.nt_xent(z1, z2, 0.2)
  for scale in (1e-3, 0.5, 40.0):
    np.testing.assert_allclose(losses.nt_xent(z1 * scale, z2 * scale, 0.2), base, rtol=2e-6)
  # Per-row scaling too: cosine similarity only sees directions.
  row_scale = rng.uniform(0.1, 10.0, size=(6, 1)).astype(np.float32)
  np.testing.assert_allclose(losses.nt_xent(z1 * row_scale, z2, 0.2), base, rtol=2e-6)

  grads = jax.grad(losses.nt_xent, argnums=(0, 1))(z1, z2, 0.2)
  for g in grads:
    assert np.all(np.isfinite(g)) and np.any(g != 0)
  # Even a zero projection (dead head at init) must not produce NaN gradients.
  z1_zero = z1.copy()
  z1_zero[0] = 0.0
  grads = jax.grad(losses.nt_xent, argnums=(0, 1))(z1_zero, z2, 0.2)
  assert all(np.all(np.isfinite(g)) for g in grads)


def test_nt_xent_gradient_matches_finite_differences():
  rng = np.random.default_rng(1)
  z1 = rng.normal(size=(3, 4))
  z2 = rng.normal(size=(3, 4))
  grad = np.asarray(jax.grad(losses.nt_xent)(jnp.asarray(z1, jnp.float32), z2.astype(np.float32), 0.5))
  step = 1e-5
  numeric = np.zeros_like(z1)
  for index in np.ndindex(*z1.shape):
    plus, minus = z1.copy(), z1.copy()
    plus[index] += step
    minus[index] -= step
    numeric[index] = (_nt_xent_reference(plus, z2, 0.5)[0] - _nt_xent_reference(minus, z2, 0.5)[0]) / (2 * step)
  np.testing.assert_allclose(grad, numeric, atol=2e-5)


def test_nt_xent_keeps_float32_with_bfloat16_inputs():
  rng = np.random.default_rng(2)
  z1 = jnp.asarray(rng.normal(size=(8, 16)), jnp.bfloat16)
  z2 = jnp.asarray(rng.normal(size=(8, 16)), jnp.bfloat16)
  loss, metrics = losses.nt_xent_with_metrics(z1, z2, 0.1)
  assert loss.dtype == jnp.float32
  assert all(v.dtype == jnp.float32 for v in metrics.values())
  want, _, _ = _nt_xent_reference(np.asarray(z1, np.float64), np.asarray(z2, np.float64), 0.1)
  np.testing.assert_allclose(loss, want, rtol=1e-5)


def test_nt_xent_rejects_mismatched_views():
  with pytest.raises(ValueError, match=r"z1 \(4, 3\) and z2 \(5, 3\)"):
    losses.nt_xent(jnp.ones((4, 3)), jnp.ones((5, 3)), 0.1)


def test_nt_xent_sharded_batch_equals_single_device():
  """Projection + NT-Xent jit'd over 8 devices gives the single-device loss and grads."""
  assert jax.device_count() == 8, "tests/conftest.py should provide 8 CPU devices"
  rng = np.random.default_rng(3)
  n, d_in, d_out, temperature = 16, 6, 4, 0.2
  x1 = rng.normal(size=(n, d_in)).astype(np.float32)
  x2 = rng.normal(size=(n, d_in)).astype(np.float32)
  kernel = rng.normal(size=(d_in, d_out)).astype(np.float32)

  def loss_fn(kernel, x1, x2):
    return losses.nt_xent(x1 @ kernel, x2 @ kernel, temperature)

  value_and_grad = jax.value_and_grad(loss_fn)
  device = jax.devices()[0]
  want_loss, want_grad = jax.jit(value_and_grad)(
      *(jax.device_put(a, device) for a in (kernel, x1, x2)))

  mesh = Mesh(np.array(jax.devices()), ("data",))
  batch = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())
  sharded_step = jax.jit(
      value_and_grad,
      in_shardings=(replicated, batch, batch),
      out_shardings=(replicated, replicated),
  )
  x1_sharded = jax.device_put(x1, batch)
  x2_sharded = jax.device_put(x2, batch)
  assert len(x1_sharded.addressable_shards) == 8
  assert x1_sharded.addressable_shards[0].data.shape == (2, d_in)
  loss, grad = sharded_step(jax.device_put(kernel, replicated), x1_sharded, x2_sharded)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-7)
  assert grad.sharding.is_fully_replicated


# ---------------------------------------------------------------------------
# Supervised losses.


def _softmax(logits):
  e = np.exp(logits - logits.max(axis=1, keepdims=True))
  return e / e.sum(axis=1, keepdims=True)


def test_softmax_cross_entropy_matches_sklearn():
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(10, 3)) * 2
  labels = rng.integers(0, 3, size=10)
  labels[:3] = [0, 1, 2]  # every class present, as log_loss needs
  probs = _softmax(logits)
  got = losses.softmax_cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(labels))
  np.testing.assert_allclose(got, sklearn.metrics.log_loss(labels, probs, labels=[0, 1, 2]), rtol=1e-5)

  # Padded eval batch: the mean is over valid examples only.
  weights = np.array([1, 1, 1, 1, 0, 1, 0, 1, 1, 0], np.float32)
  got = losses.softmax_cross_entropy(logits.astype(np.float32), labels, weights=weights)
  valid = weights > 0
  want = sklearn.metrics.log_loss(labels[valid], probs[valid], labels=[0, 1, 2])
  np.testing.assert_allclose(got, want, rtol=1e-5)

  # Class weights combine with the mask as sample weights (sklearn / PyTorch convention).
  class_weights = np.array([0.5, 2.0, 3.0], np.float32)
  got = losses.softmax_cross_entropy(logits.astype(np.float32), labels, weights, class_weights)
  want = sklearn.metrics.log_loss(
      labels, probs, labels=[0, 1, 2], sample_weight=weights * class_weights[labels])
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_softmax_cross_entropy_bf16_all_padding_and_shapes():
  logits = jnp.asarray([[2.0, -1.0], [0.5, 0.25]], jnp.bfloat16)
  got = losses.softmax_cross_entropy(logits, jnp.asarray([0, 1]))
  assert got.dtype == jnp.float32
  want = -np.mean(np.log(_softmax(np.asarray(logits, np.float64)))[[0, 1], [0, 1]])
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert float(losses.softmax_cross_entropy(logits, jnp.asarray([0, 1]), jnp.zeros(2))) == 0.0
  with pytest.raises(ValueError, match="weights must be a per-example mask of shape"):
    losses.softmax_cross_entropy(logits, jnp.asarray([0, 1]), jnp.ones(3))
  with pytest.raises(ValueError, match="class_weights must have one entry per class"):
    losses.softmax_cross_entropy(logits, jnp.asarray([0, 1]), class_weights=jnp.ones(3))


def test_sigmoid_cross_entropy_matches_sklearn():
  rng = np.random.default_rng(5)
  logits = rng.normal(size=(8, 4)) * 3
  targets = rng.integers(0, 2, size=(8, 4)).astype(np.float64)
  probs = 1.0 / (1.0 + np.exp(-logits))
  got = losses.sigmoid_cross_entropy(logits.astype(np.float32), targets)
  want = sklearn.metrics.log_loss(targets.ravel(), probs.ravel(), labels=[0, 1])
  np.testing.assert_allclose(got, want, rtol=1e-5)

  weights = np.array([1, 0, 1, 1, 1, 0, 1, 1], np.float32)
  class_weights = np.array([1.0, 0.25, 4.0, 2.0], np.float32)
  got = losses.sigmoid_cross_entropy(logits.astype(np.float32), targets, weights, class_weights)
  sample_weight = (weights[:, None] * class_weights[None, :]).ravel()
  want = sklearn.metrics.log_loss(targets.ravel(), probs.ravel(), labels=[0, 1], sample_weight=sample_weight)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_sigmoid_cross_entropy_is_stable_for_large_logits():
  # Naive log(sigmoid(x)) gives log(0) = -inf for x = -200 in float32.
  logits = jnp.asarray([[200.0, -200.0]])
  targets = jnp.asarray([[0.0, 1.0]])
  np.testing.assert_allclose(losses.sigmoid_cross_entropy(logits, targets), 200.0, rtol=1e-6)
  with pytest.raises(ValueError, match="same \\(B, C\\) shape"):
    losses.sigmoid_cross_entropy(logits, jnp.ones((1, 3)))


def test_site_negative_metrics_match_a_numpy_loop():
  rng = np.random.default_rng(7)
  n = 12
  z1, z2 = rng.normal(size=(n, 5)), rng.normal(size=(n, 5))
  sites = rng.integers(0, 3, size=n)
  got = losses.site_negative_metrics(jnp.asarray(z1, jnp.float32), jnp.asarray(z2, jnp.float32),
                                     jnp.asarray(sites), temperature=0.1)
  z = np.concatenate([z1, z2])
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  all_sites = np.concatenate([sites, sites])
  hardest_same, shares = [], []
  for i in range(2 * n):
    positive = (i + n) % (2 * n)
    negatives = [j for j in range(2 * n) if j not in (i, positive)]
    hardest = max(negatives, key=lambda j: z[i] @ z[j])
    hardest_same.append(all_sites[hardest] == all_sites[i])
    shares.append(np.mean([all_sites[j] == all_sites[i] for j in negatives]))
  np.testing.assert_allclose(got["top1_negative_same_site"], np.mean(hardest_same), atol=1e-6)
  np.testing.assert_allclose(got["same_site_negative_share"], np.mean(shares), atol=1e-6)
  # An encoder that only knows the site: every hardest negative is from the anchor's site.
  site_only = np.eye(3)[sites] + 1e-3 * rng.normal(size=(n, 3))
  site_only_2 = np.eye(3)[sites] + 1e-3 * rng.normal(size=(n, 3))
  got = losses.site_negative_metrics(jnp.asarray(site_only, jnp.float32),
                                     jnp.asarray(site_only_2, jnp.float32), jnp.asarray(sites))
  assert float(got["top1_negative_same_site"]) == 1.0
