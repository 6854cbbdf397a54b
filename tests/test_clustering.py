"""SwAV-style online clustering: Sinkhorn codes, swapped prediction, queue, prototypes.

References are independent float64 NumPy implementations written the way SwAV's
main_swav.py computes them (multiplicative Sinkhorn with its global constants,
loops over views), not the log-domain / einsum forms of remedis_jax.clustering.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from remedis_jax.clustering import codes_with_queue
from remedis_jax.clustering import sinkhorn_knopp
from remedis_jax.clustering import swapped_prediction_loss
from remedis_jax.clustering import update_queue
from remedis_jax.models import Prototypes


def random_cosine_scores(rng, n, k, dim=16):
  """(n, k) float32 cosine similarities of random unit vectors to random unit prototypes."""
  z = rng.randn(n, dim)
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  c = rng.randn(dim, k)
  c /= np.linalg.norm(c, axis=0, keepdims=True)
  return (z @ c).astype(np.float32)


def np_sinkhorn(scores, num_iters=3, epsilon=0.05):
  """SwAV's distributed_sinkhorn on one device, in float64, as written there."""
  q = np.exp(np.asarray(scores, np.float64) / epsilon).T  # (K, B) as in SwAV
  k, b = q.shape
  q /= q.sum()
  for _ in range(num_iters):
    q /= q.sum(axis=1, keepdims=True)
    q /= k
    q /= q.sum(axis=0, keepdims=True)
    q /= b
  q *= b
  return q.T


def np_log_softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def np_swapped_prediction_loss(scores, codes, temperature):
  """SwAV's loss loops: per code view, mean over the other views of the batch-mean CE."""
  scores = np.asarray(scores, np.float64)
  codes = np.asarray(codes, np.float64)
  num_views, num_code_views = scores.shape[1], codes.shape[1]
  loss = 0.0
  for c in range(num_code_views):
    subloss = 0.0
    for v in range(num_views):
      if v == c:
        continue
      log_p = np_log_softmax(scores[:, v] / temperature)
      subloss -= np.mean(np.sum(codes[:, c] * log_p, axis=1))
    loss += subloss / (num_views - 1)
  return loss / num_code_views


def np_swapped_prediction_grad(scores, codes, temperature):
  """Analytic d loss / d scores: (softmax * sum(code) - code) / T per (c, v != c) pair."""
  scores = np.asarray(scores, np.float64)
  codes = np.asarray(codes, np.float64)
  b, num_views, _ = scores.shape
  num_code_views = codes.shape[1]
  grad = np.zeros_like(scores)
  for c in range(num_code_views):
    for v in range(num_views):
      if v == c:
        continue
      p = np.exp(np_log_softmax(scores[:, v] / temperature))
      target = codes[:, c]
      grad[:, v] += (p * target.sum(-1, keepdims=True) - target) / temperature
  return grad / (b * num_code_views * (num_views - 1))


def random_codes(rng, b, c, k):
  codes = rng.rand(b, c, k) ** 3
  return (codes / codes.sum(-1, keepdims=True)).astype(np.float32)


# ---------------------------------------------------------------------------- Sinkhorn


def test_sinkhorn_matches_swav_numpy_reference():
  rng = np.random.RandomState(0)
  for n, k, num_iters, epsilon in [(64, 8, 3, 0.05), (40, 30, 3, 0.05), (24, 5, 7, 0.1)]:
    scores = random_cosine_scores(rng, n, k)
    codes = jax.jit(lambda s: sinkhorn_knopp(s, num_iters=num_iters, epsilon=epsilon))(scores)
    assert codes.shape == (n, k) and codes.dtype == jnp.float32
    np.testing.assert_allclose(codes, np_sinkhorn(scores, num_iters, epsilon), atol=1e-5, rtol=0)


def prototype_imbalance(codes):
  """Largest and mean |mass of a prototype / (N/K) - 1| over the prototypes."""
  n, k = codes.shape
  deviation = np.abs(np.asarray(codes).sum(0) / (n / k) - 1)
  return deviation.max(), deviation.mean()


def test_sinkhorn_rows_are_distributions_and_columns_balance():
  n, k = 256, 16
  scores = random_cosine_scores(np.random.RandomState(0), n, k)
  max_imbalance = []
  for num_iters in (3, 10, 50):
    codes = np.asarray(sinkhorn_knopp(scores, num_iters=num_iters))
    assert (codes >= 0).all()
    np.testing.assert_allclose(codes.sum(1), 1.0, atol=1e-5)
    largest, mean = prototype_imbalance(codes)
    max_imbalance.append(largest)
    if num_iters == 3:
      # Measured 0.28 / 0.11 (0.20-0.37 / 0.07-0.12 over seeds 0-4): three
      # iterations balance only roughly, as in SwAV.
      assert largest < 0.35 and mean < 0.15
  # Measured 0.28, 0.045, 0.0: more iterations balance more tightly.
  assert max_imbalance[0] > max_imbalance[1] > max_imbalance[2]
  assert max_imbalance[2] < 1e-3


def test_sinkhorn_spreads_a_collapsed_batch():
  # Every sample is closest to prototype 0: a softmax puts ~14x the fair share
  # of mass there; three Sinkhorn iterations bring every prototype within 50%.
  rng = np.random.RandomState(1)
  dim, n, k = 16, 256, 16
  z = 0.5 * rng.randn(n, dim)
  z[:, 0] += 2.0
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  prototypes = rng.randn(dim, k)
  prototypes[:, 0] = np.eye(dim)[0]
  prototypes /= np.linalg.norm(prototypes, axis=0, keepdims=True)
  scores = (z @ prototypes).astype(np.float32)
  assert prototype_imbalance(jax.nn.softmax(scores / 0.05, axis=1))[0] > 10
  codes = sinkhorn_knopp(scores)
  assert prototype_imbalance(codes)[0] < 0.5
  assert len(np.unique(np.argmax(codes, axis=1))) == k


def test_sinkhorn_num_real_returns_first_rows():
  scores = random_cosine_scores(np.random.RandomState(2), 20, 6)
  full = sinkhorn_knopp(scores)
  np.testing.assert_array_equal(sinkhorn_knopp(scores, num_real=7), full[:7])


def test_sinkhorn_passes_no_gradient():
  rng = np.random.RandomState(3)
  scores = random_cosine_scores(rng, 12, 5)
  weights = rng.randn(12, 5).astype(np.float32)
  grad = jax.grad(lambda s: jnp.sum(sinkhorn_knopp(s) * weights))(scores)
  np.testing.assert_array_equal(grad, np.zeros_like(scores))
  grad_q = jax.grad(lambda s: jnp.sum(codes_with_queue(s[:8], s[8:], num_iters=3, epsilon=0.05)
                                      * weights[:8]))(scores)
  np.testing.assert_array_equal(grad_q, np.zeros_like(scores))


def test_sinkhorn_is_stable_for_large_scores_and_small_epsilon():
  rng = np.random.RandomState(4)
  # scores / epsilon up to ~ +-3e4: exp overflows float32 (and float64) without
  # the log domain, and most prototypes' columns would underflow to all-zero.
  scores = (100.0 * rng.randn(32, 10)).astype(np.float32)
  codes = np.asarray(sinkhorn_knopp(scores, epsilon=0.01))
  assert np.isfinite(codes).all() and (codes >= 0).all()
  np.testing.assert_allclose(codes.sum(1), 1.0, atol=1e-5)
  # Cosine scores at tiny epsilon and bf16 input are fine too.
  cosine = random_cosine_scores(rng, 32, 10)
  codes = sinkhorn_knopp(jnp.asarray(cosine, jnp.bfloat16), epsilon=1e-3)
  assert codes.dtype == jnp.float32 and np.isfinite(np.asarray(codes)).all()
  # A constant shift of all scores changes nothing (what max-subtraction relies
  # on). Tolerance: float32 rounding of cosine + 50 is ~4e-6, times 1 / epsilon.
  np.testing.assert_allclose(sinkhorn_knopp(cosine + 50.0), sinkhorn_knopp(cosine), atol=1e-4)


@pytest.mark.parametrize("kwargs, match", [
    ({"num_iters": 0}, "num_iters"),
    ({"epsilon": 0.0}, "epsilon"),
    ({"num_real": 11}, "num_real"),
])
def test_sinkhorn_rejects_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sinkhorn_knopp(jnp.zeros((10, 4)), **kwargs)


# ---------------------------------------------------------------------------- queue


def test_update_queue_is_fifo():
  queue = np.arange(10 * 3, dtype=np.float32).reshape(10, 3)
  features = -np.arange(4 * 3, dtype=np.float32).reshape(4, 3) - 1
  new = np.asarray(jax.jit(update_queue)(queue, features))
  np.testing.assert_array_equal(new[:4], features)
  np.testing.assert_array_equal(new[4:], queue[:6])
  # Full replacement when N == Q; dtype of the queue kept.
  same = update_queue(jnp.zeros((4, 3), jnp.bfloat16), features)
  assert same.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(same, np.float32), features)
  with pytest.raises(ValueError, match="N <= Q"):
    update_queue(jnp.zeros((3, 3)), features)


def test_update_queue_two_steps_keeps_newest_first():
  queue = jnp.zeros((6, 2))
  first = np.ones((2, 2), np.float32)
  second = 2 * np.ones((2, 2), np.float32)
  queue = update_queue(update_queue(queue, first), second)
  np.testing.assert_array_equal(queue[:, 0], [2, 2, 1, 1, 0, 0])


def test_codes_with_queue_equals_sinkhorn_on_concatenation():
  rng = np.random.RandomState(5)
  scores = random_cosine_scores(rng, 8, 6)
  queue_scores = random_cosine_scores(rng, 24, 6)
  codes = codes_with_queue(scores, queue_scores, num_iters=3, epsilon=0.05)
  expected = np_sinkhorn(np.concatenate([scores, queue_scores]))[:8]
  np.testing.assert_allclose(codes, expected, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(
      codes, sinkhorn_knopp(jnp.concatenate([scores, queue_scores]), num_real=8))
  # The queue changes the codes (otherwise the test above proves nothing).
  assert np.abs(np.asarray(codes) - np_sinkhorn(scores)).max() > 1e-2
  # No queue: plain Sinkhorn.
  for empty in (None, np.zeros((0, 6), np.float32)):
    np.testing.assert_array_equal(codes_with_queue(scores, empty, num_iters=3, epsilon=0.05),
                                  sinkhorn_knopp(scores))


def test_codes_with_queue_ignores_empty_zero_slots():
  rng = np.random.RandomState(6)
  scores = random_cosine_scores(rng, 8, 6)
  filled = random_cosine_scores(rng, 10, 6)
  partly_filled = np.concatenate([filled, np.zeros((14, 6), np.float32)])
  np.testing.assert_allclose(
      codes_with_queue(scores, partly_filled, num_iters=3, epsilon=0.05),
      codes_with_queue(scores, filled, num_iters=3, epsilon=0.05), atol=1e-6)
  all_empty = codes_with_queue(scores, np.zeros((24, 6), np.float32), num_iters=3, epsilon=0.05)
  np.testing.assert_allclose(all_empty, sinkhorn_knopp(scores), atol=1e-6)
  # Counted as samples, the zero rows would have pulled the codes towards uniform.
  as_samples = np_sinkhorn(np.concatenate([scores, partly_filled]))[:8]
  assert np.abs(as_samples - np_sinkhorn(np.concatenate([scores, filled]))[:8]).max() > 1e-3


# ---------------------------------------------------------------------------- swapped prediction


@pytest.mark.parametrize("num_views, num_code_views", [(2, 2), (6, 2), (4, 1), (3, 3)])
def test_swapped_prediction_loss_matches_numpy(num_views, num_code_views):
  rng = np.random.RandomState(7 + num_views)
  b, k, temperature = 5, 7, 0.1
  scores = rng.uniform(-1, 1, (b, num_views, k)).astype(np.float32)
  codes = random_codes(rng, b, num_code_views, k)
  loss_fn = jax.jit(lambda s, q: swapped_prediction_loss(s, q, temperature=temperature))
  loss, metrics = loss_fn(scores, codes)
  expected = np_swapped_prediction_loss(scores, codes, temperature)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["cluster_loss"], expected, rtol=1e-5)

  grad = jax.grad(lambda s: loss_fn(s, codes)[0])(scores)
  np.testing.assert_allclose(grad, np_swapped_prediction_grad(scores, codes, temperature),
                             atol=1e-6, rtol=1e-4)
  # Codes are targets: no gradient into them.
  np.testing.assert_array_equal(jax.grad(lambda q: loss_fn(scores, q)[0])(codes), 0.0)


def test_swapped_prediction_loss_bf16_scores_compute_in_float32():
  rng = np.random.RandomState(8)
  scores = rng.uniform(-1, 1, (4, 3, 5)).astype(np.float32)
  codes = random_codes(rng, 4, 2, 5)
  scores_bf16 = jnp.asarray(scores, jnp.bfloat16)
  loss, _ = swapped_prediction_loss(scores_bf16, codes, temperature=0.1)
  assert loss.dtype == jnp.float32
  expected = np_swapped_prediction_loss(np.asarray(scores_bf16, np.float32), codes, 0.1)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_swapped_prediction_metrics_on_hand_made_codes():
  b, k = 8, 4
  scores = np.zeros((b, 3, k), np.float32)
  # Collapse: every code is one-hot on prototype 2.
  collapsed = np.zeros((b, 2, k), np.float32)
  collapsed[..., 2] = 1.0
  _, metrics = swapped_prediction_loss(scores, collapsed, temperature=0.1)
  assert float(metrics["cluster_usage_entropy"]) == 0.0
  assert float(metrics["cluster_code_entropy"]) == 0.0
  assert float(metrics["cluster_num_used"]) == 1.0
  # Zero scores are a uniform prediction: the loss is log K for any codes.
  np.testing.assert_allclose(metrics["cluster_loss"], np.log(k), rtol=1e-6)

  # Hard codes spread evenly over the K prototypes.
  even = np.eye(k, dtype=np.float32)[np.arange(b * 2) % k].reshape(b, 2, k)
  _, metrics = swapped_prediction_loss(scores, even, temperature=0.1)
  np.testing.assert_allclose(metrics["cluster_usage_entropy"], np.log(k), rtol=1e-6)
  assert float(metrics["cluster_code_entropy"]) == 0.0
  assert float(metrics["cluster_num_used"]) == k

  # Uniform soft codes: code entropy log K; the argmax tie goes to prototype 0.
  uniform = np.full((b, 2, k), 1.0 / k, np.float32)
  _, metrics = swapped_prediction_loss(scores, uniform, temperature=0.1)
  np.testing.assert_allclose(metrics["cluster_code_entropy"], np.log(k), rtol=1e-6)
  assert float(metrics["cluster_num_used"]) == 1.0

  # Three of four prototypes used with counts 8, 4, 4 out of 16.
  assignment = np.array([0] * 8 + [1] * 4 + [3] * 4)
  uneven = np.eye(k, dtype=np.float32)[assignment].reshape(b, 2, k)
  _, metrics = swapped_prediction_loss(scores, uneven, temperature=0.1)
  p = np.array([0.5, 0.25, 0.25])
  np.testing.assert_allclose(metrics["cluster_usage_entropy"], -(p * np.log(p)).sum(), rtol=1e-6)
  assert float(metrics["cluster_num_used"]) == 3.0


def test_swapped_prediction_loss_rejects_bad_shapes():
  with pytest.raises(ValueError, match="C <= V"):
    swapped_prediction_loss(jnp.zeros((4, 2, 5)), jnp.zeros((4, 3, 5)), temperature=0.1)
  with pytest.raises(ValueError, match="at least 2 views"):
    swapped_prediction_loss(jnp.zeros((4, 1, 5)), jnp.zeros((4, 1, 5)), temperature=0.1)


# ---------------------------------------------------------------------------- sharding


def clustering_objective(scores, queue_scores, num_code_views):
  """What a trainer computes: per code view, codes over the global batch (+ queue), then loss."""
  codes = jnp.stack([
      codes_with_queue(scores[:, c], queue_scores, num_iters=3, epsilon=0.05)
      for c in range(num_code_views)
  ], axis=1)
  loss, metrics = swapped_prediction_loss(scores, codes, temperature=0.1)
  return loss, (codes, metrics)


def test_sharded_batch_equals_single_device():
  devices = np.array(jax.devices())
  assert devices.size == 8, "tests/conftest.py should give 8 simulated CPU devices"
  rng = np.random.RandomState(9)
  b, v, c, k = 16, 4, 2, 12
  scores = rng.uniform(-1, 1, (b, v, k)).astype(np.float32)
  queue_scores = random_cosine_scores(rng, 8, k)
  value_and_grad = jax.value_and_grad(clustering_objective, has_aux=True)

  single = jax.jit(value_and_grad, static_argnums=2)
  (loss_1, (codes_1, metrics_1)), grad_1 = single(scores, queue_scores, c)

  mesh = Mesh(devices, ("data",))
  batch_sharding = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())
  sharded = jax.jit(value_and_grad, static_argnums=2,
                    in_shardings=(batch_sharding, replicated))
  scores_sharded = jax.device_put(scores, batch_sharding)
  assert len(scores_sharded.addressable_shards) == 8
  assert scores_sharded.addressable_shards[0].data.shape == (2, v, k)
  (loss_8, (codes_8, metrics_8)), grad_8 = sharded(scores_sharded, queue_scores, c)

  np.testing.assert_allclose(loss_8, loss_1, atol=1e-6)
  np.testing.assert_allclose(grad_8, grad_1, atol=1e-6)
  np.testing.assert_allclose(codes_8, codes_1, atol=1e-6)
  for name in metrics_1:
    np.testing.assert_allclose(metrics_8[name], metrics_1[name], atol=1e-6)

  # Power check: codes balanced per device (2 samples at a time) differ from the
  # global ones, so the equality above does say the balancing is global.
  per_device = np.concatenate([
      np.asarray(codes_with_queue(scores[i:i + 2, 0], queue_scores, num_iters=3, epsilon=0.05))
      for i in range(0, b, 2)])
  assert np.abs(per_device - np.asarray(codes_1[:, 0])).max() > 1e-2


# ---------------------------------------------------------------------------- prototypes


def test_prototypes_cosine_scores():
  rng = np.random.RandomState(10)
  head = Prototypes(num_prototypes=6)
  z = rng.randn(5, 8).astype(np.float32)
  params = head.init(jax.random.key(0), z)["params"]
  assert params["kernel"].shape == (8, 6)
  np.testing.assert_allclose(np.linalg.norm(params["kernel"], axis=0), 1.0, rtol=1e-5)
  # Scale the kernel's columns arbitrarily: the scores must not change.
  kernel = np.asarray(params["kernel"]) * rng.uniform(0.1, 10.0, (1, 6)).astype(np.float32)
  apply = jax.jit(lambda zz: head.apply({"params": {"kernel": kernel}}, zz))
  scores = np.asarray(apply(z))
  assert scores.shape == (5, 6) and scores.dtype == np.float32
  assert (np.abs(scores) <= 1.0 + 1e-6).all()
  z64 = z.astype(np.float64)
  expected = (z64 / np.linalg.norm(z64, axis=1, keepdims=True)) @ (
      kernel / np.linalg.norm(kernel, axis=0, keepdims=True))
  np.testing.assert_allclose(scores, expected, atol=1e-6)
  # Scale invariance in z; a projection equal to a prototype scores 1 on it.
  np.testing.assert_allclose(apply(z * 37.0), scores, atol=1e-6)
  np.testing.assert_allclose(apply(3.0 * kernel[:, 2][None])[0, 2], 1.0, atol=1e-6)
  # An all-zero projection (an empty queue slot) scores exactly 0, not NaN.
  np.testing.assert_array_equal(apply(np.zeros((1, 8), np.float32)), 0.0)


def test_prototypes_bf16_params_give_float32_scores():
  head = Prototypes(num_prototypes=4, param_dtype=jnp.bfloat16)
  z = jnp.ones((2, 3), jnp.bfloat16)
  variables = jax.eval_shape(head.init, jax.random.key(0), z)
  assert variables["params"]["kernel"].dtype == jnp.bfloat16
  assert jax.eval_shape(head.apply, variables, z).dtype == jnp.float32
