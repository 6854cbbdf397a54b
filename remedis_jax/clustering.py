"""Online clustering with swapped prediction (SwAV), as used by Ghesu et al. 2022.

Ghesu et al. 2022 ("Contrastive self-supervised learning from 100 million
medical images with optional supervision", arXiv 2201.01283) add to the NT-Xent
loss an online feature-clustering term taken from SwAV (Caron et al. 2020,
arXiv 2006.09882):

1. Each view's projection z is scored against K learnable prototypes (cosine
   similarity, `remedis_jax.models.Prototypes`), giving scores (N, K).
2. Sinkhorn-Knopp turns the scores of a batch into soft cluster *codes*: each
   sample's code is a distribution over prototypes, and across the batch every
   prototype receives about N/K of the mass (equipartition). The balancing is
   what stops every sample collapsing onto one prototype. Codes are targets:
   no gradient flows through them.
3. Swapped prediction: the code of one view is predicted from the scores of
   every other view of the same image (cross-entropy against a softmax at
   `temperature`). Only the full-resolution "code views" produce codes; local
   (small-crop) views only predict.
4. With small batches, the balancing of step 2 is done over the batch plus a
   FIFO queue of projections from recent steps; queue rows take part in the
   balancing but get no codes and no loss.

Everything here is plain `jnp` over the GLOBAL batch, in float32 whatever the
input dtype (see `remedis_jax/losses.py`): under `jax.jit` with the batch
sharded by `NamedSharding`, the per-prototype sums of Sinkhorn become XLA
all-reduces, so the codes are those of the whole global batch, exactly what
SwAV's `distributed_sinkhorn` gets with `dist.all_reduce`. No pmap, no
per-device code.
"""

from typing import Optional

import jax
import jax.numpy as jnp

# SwAV's defaults (facebookresearch/swav main_swav.py): 3 Sinkhorn iterations,
# entropic regularisation epsilon 0.05, softmax temperature 0.1.
DEFAULT_SINKHORN_ITERATIONS = 3
DEFAULT_EPSILON = 0.05
DEFAULT_TEMPERATURE = 0.1


def _check_sinkhorn_args(fn: str, num_iters: int, epsilon: float) -> None:
  if not isinstance(num_iters, int) or num_iters < 1:
    raise ValueError(
        f"{fn}: num_iters must be a Python int >= 1 (SwAV uses 3); got {num_iters!r}.")
  # epsilon may be a traced value when a caller schedules it; only concrete
  # values can be checked.
  if isinstance(epsilon, (int, float)) and epsilon <= 0:
    raise ValueError(f"{fn}: epsilon must be > 0 (SwAV uses 0.05); got {epsilon!r}.")


def _log_sinkhorn(
    scores: jax.Array, valid_rows: Optional[jax.Array], num_iters: int, epsilon: float
) -> jax.Array:
  """Sinkhorn-Knopp in the log domain; returns (N, K) float32 codes for every row.

  SwAV's `distributed_sinkhorn` works on Q = exp(scores / epsilon): it scales Q
  to total mass 1, then alternately divides each prototype's column by its sum
  times K and each sample's row by its sum times N, and finally multiplies by
  N. All the global constants (the total mass, K, N) cancel in the normalisation
  that follows them, so the result is exactly: alternately normalise over
  samples (per prototype) and over prototypes (per sample), `num_iters` times,
  the last normalisation being per sample. Here that is done on log Q with
  log-sum-exp, which subtracts the max of every sum it takes: no entry can
  overflow (exp(s / epsilon) is inf in float32 once s / epsilon > 88, e.g.
  cosine 1 at epsilon 0.01) or underflow into an all-zero prototype or sample
  (0 / 0 = NaN), whatever the score range. It costs 2 * num_iters exps over
  (N, K) instead of one, negligible next to the encoder.

  Args:
    scores: (N, K) scores; cast to float32, gradient stopped.
    valid_rows: optional (N,) bool; rows that are False are left out of the
      per-prototype sums (they are still normalised, and their codes are
      meaningless). None: every row counts.
    num_iters: number of (per-prototype, per-sample) normalisation pairs.
    epsilon: entropic regularisation; smaller is closer to hard assignment.

  Returns:
    (N, K) float32 codes; every row sums to 1.
  """
  log_q = jax.lax.stop_gradient(scores).astype(jnp.float32) / epsilon
  for _ in range(num_iters):
    per_prototype = log_q if valid_rows is None else jnp.where(valid_rows[:, None], log_q, -jnp.inf)
    # Sums over the (sharded) sample axis: all-reduces under jit.
    log_q = log_q - jax.nn.logsumexp(per_prototype, axis=0, keepdims=True)
    log_q = log_q - jax.nn.logsumexp(log_q, axis=1, keepdims=True)
  return jnp.exp(log_q)


def sinkhorn_knopp(
    scores: jax.Array,
    *,
    num_iters: int = DEFAULT_SINKHORN_ITERATIONS,
    epsilon: float = DEFAULT_EPSILON,
    num_real: int | None = None,
) -> jax.Array:
  """Balanced soft cluster codes from prototype scores (SwAV's Sinkhorn-Knopp).

  Q = exp(scores / epsilon) is normalised alternately over samples (each
  prototype gets total mass N/K) and over prototypes (each sample's code sums
  to 1), `num_iters` times, as SwAV's `distributed_sinkhorn`; computed in the
  log domain so that large scores or a small epsilon cannot overflow or give
  NaN (see `_log_sinkhorn`). After a finite number of iterations the rows sum
  to 1 exactly and the per-prototype masses are only approximately N/K; more
  iterations balance more tightly.

  Args:
    scores: (N, K) scores of N samples against K prototypes (cosine
      similarities from `Prototypes`), any float dtype. Gradient is stopped:
      codes are targets.
    num_iters: Sinkhorn iterations (SwAV: 3).
    epsilon: entropic regularisation (SwAV: 0.05).
    num_real: if given, only the first `num_real` rows are returned; the rest
      (e.g. queue rows) take part in the balancing only.

  Returns:
    (N, K) float32 codes, or (num_real, K): non-negative, each row sums to 1.

  Raises:
    ValueError: if scores is not 2-D, num_iters < 1, epsilon <= 0 or num_real
      is outside [1, N].
  """
  if scores.ndim != 2:
    raise ValueError(
        f"sinkhorn_knopp expects scores of shape (N, K); got {tuple(scores.shape)}.")
  _check_sinkhorn_args("sinkhorn_knopp", num_iters, epsilon)
  if num_real is not None and not 1 <= num_real <= scores.shape[0]:
    raise ValueError(
        f"sinkhorn_knopp: num_real must be in [1, {scores.shape[0]}] (the number of "
        f"score rows); got {num_real}.")
  codes = _log_sinkhorn(scores, None, num_iters, epsilon)
  return codes if num_real is None else codes[:num_real]


def codes_with_queue(
    scores: jax.Array,
    queue_scores: Optional[jax.Array],
    *,
    num_iters: int,
    epsilon: float,
) -> jax.Array:
  """Sinkhorn codes of `scores`, balanced together with the queue's scores.

  The codes are those of `sinkhorn_knopp(concat(scores, queue_scores))` for the
  rows of `scores`: the queue makes the equipartition constraint hold over
  N + M samples instead of N, which matters when the batch is small next to
  the number of prototypes (SwAV uses a queue below a global batch of ~4096).

  Empty queue slots: a queue row whose scores are ALL exactly 0 is treated as
  an empty slot and left out of the balancing, so a zero-initialised queue
  that is only partly filled gives the same codes as the filled part alone.
  Such a row is what `Prototypes` gives for an all-zero projection (the
  l2-normalised zero vector is zero); a real projection scoring exactly 0
  against every prototype does not occur in practice. SwAV itself only starts
  using the queue once it is full, and a trainer may do the same (pass None
  until then); the masking only makes the partial case harmless rather than a
  silent bias towards uniform codes.

  Args:
    scores: (N, K) scores of the current batch, any float dtype.
    queue_scores: (M, K) scores of the queued projections against the CURRENT
      prototypes, or None / M == 0 for no queue.
    num_iters: Sinkhorn iterations.
    epsilon: entropic regularisation.

  Returns:
    (N, K) float32 codes of the batch rows; each row sums to 1.

  Raises:
    ValueError: on non-2-D inputs or a different number of prototypes K.
  """
  if queue_scores is None or queue_scores.shape[0] == 0:
    return sinkhorn_knopp(scores, num_iters=num_iters, epsilon=epsilon)
  if scores.ndim != 2 or queue_scores.ndim != 2 or scores.shape[1] != queue_scores.shape[1]:
    raise ValueError(
        "codes_with_queue expects scores (N, K) and queue_scores (M, K) with the same "
        f"number of prototypes K; got {tuple(scores.shape)} and {tuple(queue_scores.shape)}.")
  _check_sinkhorn_args("codes_with_queue", num_iters, epsilon)
  queue_scores = jax.lax.stop_gradient(queue_scores).astype(jnp.float32)
  all_scores = jnp.concatenate([scores.astype(jnp.float32), queue_scores], axis=0)
  valid_rows = jnp.concatenate([
      jnp.ones((scores.shape[0],), bool),
      jnp.any(queue_scores != 0, axis=1),
  ])
  codes = _log_sinkhorn(all_scores, valid_rows, num_iters, epsilon)
  return codes[: scores.shape[0]]


def update_queue(queue: jax.Array, features: jax.Array) -> jax.Array:
  """Pushes the newest projections onto a FIFO queue; the oldest fall off.

  Row order: `features[0]` becomes `queue[0]`, the previous `queue[0]` moves to
  row N, and the last N rows are dropped (SwAV's queue layout). The features
  are stored without gradient.

  Args:
    queue: (Q, D) past l2-normalised projections, newest first.
    features: (N, D) projections of the current batch, N <= Q.

  Returns:
    The new (Q, D) queue, in the queue's dtype.

  Raises:
    ValueError: if the shapes do not fit (D differs, or N > Q).
  """
  if (queue.ndim != 2 or features.ndim != 2 or queue.shape[1] != features.shape[1]
      or features.shape[0] > queue.shape[0]):
    raise ValueError(
        "update_queue expects queue (Q, D) and features (N, D) with N <= Q; got queue "
        f"{tuple(queue.shape)} and features {tuple(features.shape)}. Make the queue "
        "length at least the global batch size.")
  features = jax.lax.stop_gradient(features).astype(queue.dtype)
  num_new = features.shape[0]
  return jnp.concatenate([features, queue[: queue.shape[0] - num_new]], axis=0)


def _entropy(p: jax.Array, axis: int = -1) -> jax.Array:
  """Entropy in nats with 0 log 0 = 0."""
  return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=axis)


def swapped_prediction_loss(
    scores: jax.Array, codes: jax.Array, *, temperature: float
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """SwAV's swapped-prediction loss over the global batch, plus diagnostics.

  For every code view c < C and every other view v != c (code views and local
  views alike), the code of view c is predicted from the scores of view v:

    loss = mean_{b, c, v != c}  -sum_k codes[b, c, k] * log_softmax(scores[b, v] / T)[k]

  which is SwAV's sum over code views of the mean over the V - 1 predicting
  views, divided by C (main_swav.py: `subloss / (V - 1)`, `loss / C`).

  Args:
    scores: (B, V, K) prototype scores of every view of each image: the C code
      (global) views first, then the local views. Any float dtype.
    codes: (B, C, K) Sinkhorn codes of the first C views (C <= V). Treated as
      constant targets (gradient stopped).
    temperature: softmax temperature of the prediction (SwAV: 0.1).

  Returns:
    (loss, metrics): loss is a float32 scalar; metrics (float32 scalars, no
    gradient):
      cluster_loss: = loss.
      cluster_usage_entropy: entropy (nats) of the fraction of the B * C codes
        whose argmax is each prototype: log K when all prototypes are used
        equally, 0 when every sample goes to one prototype (collapse).
      cluster_code_entropy: mean entropy of the individual codes (0 = hard
        assignments, log K = uniform codes).
      cluster_num_used: number of prototypes that are the argmax of at least
        one code (a float32 count).

  Raises:
    ValueError: on mismatched shapes, C > V, or V < 2.
  """
  if (scores.ndim != 3 or codes.ndim != 3 or codes.shape[0] != scores.shape[0]
      or codes.shape[2] != scores.shape[2] or codes.shape[1] > scores.shape[1]):
    raise ValueError(
        "swapped_prediction_loss expects scores (B, V, K) and codes (B, C, K) with "
        f"C <= V; got scores {tuple(scores.shape)} and codes {tuple(codes.shape)}.")
  batch_size, num_views, num_prototypes = scores.shape
  num_code_views = codes.shape[1]
  if num_views < 2:
    raise ValueError(
        f"swapped_prediction_loss needs at least 2 views per image; got V={num_views}.")

  log_probs = jax.nn.log_softmax(scores.astype(jnp.float32) / temperature, axis=-1)
  codes = jax.lax.stop_gradient(codes).astype(jnp.float32)
  # cross_entropy[b, c, v] = -sum_k codes[b, c, k] log p[b, v, k]. HIGHEST keeps
  # the contraction in float32 on TPU (default precision is bf16 passes).
  cross_entropy = -jnp.einsum(
      "bck,bvk->bcv", codes, log_probs, precision=jax.lax.Precision.HIGHEST)
  predicts_other_view = (
      jnp.arange(num_code_views)[:, None] != jnp.arange(num_views)[None, :])
  loss = jnp.sum(jnp.where(predicts_other_view[None], cross_entropy, 0.0)) / (
      batch_size * num_code_views * (num_views - 1))

  flat_codes = codes.reshape(-1, num_prototypes)
  hard_usage = jnp.mean(
      jax.nn.one_hot(jnp.argmax(flat_codes, axis=-1), num_prototypes, dtype=jnp.float32),
      axis=0)
  metrics = {
      "cluster_loss": jax.lax.stop_gradient(loss),
      "cluster_usage_entropy": _entropy(hard_usage),
      "cluster_code_entropy": jnp.mean(_entropy(flat_codes)),
      "cluster_num_used": jnp.sum(hard_usage > 0).astype(jnp.float32),
  }
  return loss, metrics
