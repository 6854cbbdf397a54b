"""Losses: NT-Xent for SimCLR pretraining, cross-entropies for fine-tuning.

All losses compute in float32 whatever the input dtype: with bf16 activations
the logits of NT-Xent are cosine similarities divided by a small temperature
(about 10x amplification), and a bf16 log-sum-exp over the whole batch loses
the 3-4 significant digits that distinguish a learning run from a stuck one.

The contrastive loss is plain `jnp` over the GLOBAL batch. Under `jax.jit` with
a batch sharded by `NamedSharding`, XLA inserts the all-gathers needed for the
(2N, 2N) similarity matrix; there is no per-device code and no pmap here
(big_vision's siglip trainer does the same).
"""

from typing import Optional

import jax
import jax.numpy as jnp

# Logit given to each anchor's similarity with itself. Finite rather than -inf
# so that softmax probabilities are exactly 0 there and p * log(p) stays 0
# instead of 0 * inf = NaN in the entropy metric; exp(-1e9 - max) underflows to
# exactly 0 in float32 for any temperature used in practice.
_SELF_SIMILARITY_LOGIT = -1e9

# Squared-norm floor for l2 normalisation: a zero projection must give a finite
# loss and finite gradients rather than 0/0.
_NORM_EPS_SQUARED = 1e-24


def _l2_normalize(x: jax.Array) -> jax.Array:
  squared_norm = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(squared_norm, _NORM_EPS_SQUARED))


def _check_projection_pair(z1: jax.Array, z2: jax.Array) -> None:
  if z1.ndim != 2 or z1.shape != z2.shape:
    raise ValueError(
        "nt_xent expects the two views' projections as (N, D) arrays of the same "
        f"shape; got z1 {tuple(z1.shape)} and z2 {tuple(z2.shape)}."
    )


def _nt_xent_logits(
    z1: jax.Array, z2: jax.Array, temperature: float
) -> tuple[jax.Array, jax.Array]:
  """Logits over candidates for each of the 2N anchors and the positive index.

  Args:
    z1: (N, D) projections of the first view.
    z2: (N, D) projections of the second view.
    temperature: softmax temperature.

  Returns:
    (logits, positive_index): logits is (2N, 2N) float32 cosine similarity /
    temperature with the diagonal (self-similarity) pushed to a large negative
    value; positive_index is (2N,) int32, the column of each row's positive.
  """
  _check_projection_pair(z1, z2)
  n = z1.shape[0]
  z = jnp.concatenate([z1, z2], axis=0).astype(jnp.float32)
  z = _l2_normalize(z)
  logits = jnp.matmul(z, z.T, precision=jax.lax.Precision.HIGHEST) / temperature
  logits = jnp.where(jnp.eye(2 * n, dtype=bool), _SELF_SIMILARITY_LOGIT, logits)
  # Row i of view 1 pairs with row i of view 2, which sits N rows further down.
  positive_index = jnp.concatenate([jnp.arange(n) + n, jnp.arange(n)]).astype(jnp.int32)
  return logits, positive_index


def nt_xent_with_metrics(
    z1: jax.Array, z2: jax.Array, temperature: float
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """NT-Xent (SimCLR) loss over the global batch, plus diagnostics.

  Each of the 2N projections is an anchor. Its positive is the other view of
  the same image; the 2N-2 other projections are its negatives; similarity to
  itself is excluded. The loss is the mean over the 2N anchors of the softmax
  cross-entropy of the positive against the 2N-1 candidates, with cosine
  similarity / temperature as logits (Chen et al. 2020, eq. 1).

  Args:
    z1: (N, D) projections of the first augmented view, not yet normalised.
    z2: (N, D) projections of the second view, in the same image order.
    temperature: softmax temperature (SimCLR uses 0.1 for large batches, 0.2
      to 0.5 for small ones).

  Returns:
    (loss, metrics): loss is a float32 scalar; metrics holds float32 scalars
    `contrastive_loss` (= loss), `contrastive_accuracy` (fraction of anchors
    whose positive has the largest logit among the 2N-1 candidates) and
    `contrastive_entropy` (mean entropy, in nats, of the softmax over the
    candidates; log(2N-1) means uniform, 0 means one-hot). The metrics carry
    no gradient.

  Raises:
    ValueError: if z1 and z2 are not (N, D) arrays of the same shape.
  """
  logits, positive_index = _nt_xent_logits(z1, z2, temperature)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  positive_log_prob = jnp.take_along_axis(log_probs, positive_index[:, None], axis=-1)[:, 0]
  loss = -jnp.mean(positive_log_prob)

  logits_sg = jax.lax.stop_gradient(logits)
  log_probs_sg = jax.lax.stop_gradient(log_probs)
  accuracy = jnp.mean((jnp.argmax(logits_sg, axis=-1) == positive_index).astype(jnp.float32))
  # Self-similarity has probability exactly 0 (see _SELF_SIMILARITY_LOGIT), so it
  # contributes 0 to the entropy.
  entropy = jnp.mean(-jnp.sum(jnp.exp(log_probs_sg) * log_probs_sg, axis=-1))
  metrics = {
      "contrastive_loss": jax.lax.stop_gradient(loss),
      "contrastive_accuracy": accuracy,
      "contrastive_entropy": entropy,
  }
  return loss, metrics


def site_negative_metrics(z1: jax.Array, z2: jax.Array, sites: jax.Array,
                          temperature: float = 1.0) -> dict[str, jax.Array]:
  """Does the encoder tell patients apart, or only sites? Two no-gradient diagnostics.

  For each of the 2N anchors, its hardest negative is the candidate with the largest logit
  other than the anchor itself and its positive.

  Args:
    z1: (N, D) projections of the first view.
    z2: (N, D) projections of the second view.
    sites: (N,) integer site (hospital, scanner) of each image.
    temperature: as in the loss (the argmax does not depend on it).

  Returns:
    `top1_negative_same_site`: share of anchors whose hardest negative comes from the anchor's
    own site; `same_site_negative_share`: the share of all negatives that do (the value a
    site-blind encoder would give). Near 1 while the other is far below: the representation
    separates sites, and the contrastive task is being solved by the site, not the patient.
  """
  logits, positive_index = _nt_xent_logits(z1, z2, temperature)
  n2 = logits.shape[0]
  logits = jax.lax.stop_gradient(logits)
  is_positive = jnp.arange(n2)[None, :] == positive_index[:, None]
  is_negative = ~is_positive & ~jnp.eye(n2, dtype=bool)
  hardest = jnp.argmax(jnp.where(is_negative, logits, -jnp.inf), axis=-1)
  all_sites = jnp.concatenate([sites, sites]).astype(jnp.int32)
  same_site = all_sites[:, None] == all_sites[None, :]
  top1_same = jnp.mean((all_sites[hardest] == all_sites).astype(jnp.float32))
  share = jnp.mean(jnp.sum(same_site & is_negative, axis=-1) / jnp.maximum(n2 - 2, 1))
  return {"top1_negative_same_site": top1_same,
          "same_site_negative_share": share.astype(jnp.float32)}


def nt_xent(z1: jax.Array, z2: jax.Array, temperature: float) -> jax.Array:
  """NT-Xent (SimCLR) loss over the global batch; see `nt_xent_with_metrics`.

  Args:
    z1: (N, D) projections of the first augmented view, not yet normalised.
    z2: (N, D) projections of the second view, in the same image order.
    temperature: softmax temperature.

  Returns:
    The float32 scalar loss (mean over the 2N anchors).

  Raises:
    ValueError: if z1 and z2 are not (N, D) arrays of the same shape.
  """
  return nt_xent_with_metrics(z1, z2, temperature)[0]


def _weighted_mean(
    per_element_loss: jax.Array, element_weight: Optional[jax.Array]
) -> jax.Array:
  """sum(w * loss) / sum(w); 0 when every weight is 0 (an all-padding batch)."""
  if element_weight is None:
    return jnp.mean(per_element_loss)
  total_weight = jnp.sum(element_weight)
  weighted_sum = jnp.sum(element_weight * per_element_loss)
  return jnp.where(total_weight > 0, weighted_sum / jnp.maximum(total_weight, 1e-30), 0.0)


def _check_same_shape(logits, targets, fn_name: str, what: str) -> None:
  if logits.ndim != 2 or tuple(targets.shape) != tuple(logits.shape):
    raise ValueError(
        f"{fn_name} expects logits and {what} of the same (B, C) shape; got logits "
        f"{tuple(logits.shape)} and targets {tuple(targets.shape)}."
    )


def _as_f32_or_none(x: Optional[jax.Array]) -> Optional[jax.Array]:
  return None if x is None else jnp.asarray(x, jnp.float32)


def _check_example_weights(weights: Optional[jax.Array], batch_size: int, fn: str) -> None:
  if weights is not None and tuple(weights.shape) != (batch_size,):
    raise ValueError(
        f"{fn}: weights must be a per-example mask of shape ({batch_size},); "
        f"got {tuple(weights.shape)}."
    )


def _check_class_weights(class_weights: Optional[jax.Array], num_classes: int, fn: str) -> None:
  if class_weights is not None and tuple(class_weights.shape) != (num_classes,):
    raise ValueError(
        f"{fn}: class_weights must have one entry per class, shape ({num_classes},); "
        f"got {tuple(class_weights.shape)}."
    )


def softmax_cross_entropy(
    logits: jax.Array,
    labels_int: jax.Array,
    weights: Optional[jax.Array] = None,
    class_weights: Optional[jax.Array] = None,
) -> jax.Array:
  """Mean softmax cross-entropy for single-label classification.

  The mean is weighted by `weights[i] * class_weights[labels_int[i]]` and
  normalised by the sum of those weights, the convention of
  `sklearn.metrics.log_loss(sample_weight=...)` and of PyTorch's
  `CrossEntropyLoss(weight=...)`: class weights shift emphasis between classes
  without changing the loss scale, and padded examples (weight 0) drop out.

  Args:
    logits: (B, C) logits, any float dtype (computed in float32).
    labels_int: (B,) integer class indices in [0, C).
    weights: optional (B,) per-example weights; 0 marks padding in eval batches.
    class_weights: optional (C,) per-class weights (e.g. inverse frequency).

  Returns:
    float32 scalar; 0 when all weights are 0.

  Raises:
    ValueError: on mismatched shapes.
  """
  if logits.ndim != 2 or tuple(labels_int.shape) != (logits.shape[0],):
    raise ValueError(
        "softmax_cross_entropy expects logits (B, C) and integer labels (B,); "
        f"got logits {tuple(logits.shape)} and labels {tuple(labels_int.shape)}."
    )
  batch_size, num_classes = logits.shape
  _check_example_weights(weights, batch_size, "softmax_cross_entropy")
  _check_class_weights(class_weights, num_classes, "softmax_cross_entropy")
  weights, class_weights = _as_f32_or_none(weights), _as_f32_or_none(class_weights)

  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  labels_int = labels_int.astype(jnp.int32)
  per_example = -jnp.take_along_axis(log_probs, labels_int[:, None], axis=-1)[:, 0]

  example_weight = weights
  if class_weights is not None:
    label_weight = class_weights[labels_int]
    example_weight = label_weight if weights is None else weights * label_weight
  return _weighted_mean(per_example, example_weight)


def soft_cross_entropy(
    logits: jax.Array,
    targets: jax.Array,
    weights: Optional[jax.Array] = None,
) -> jax.Array:
  """Mean softmax cross-entropy against class distributions (distillation targets).

  Per example `-sum_c targets[i, c] * log_softmax(logits)[i, c]`, the loss of SimCLR v2's
  distillation (Chen et al. 2020, eq. 3) when `targets` are a teacher's probabilities; with
  one-hot targets it equals `softmax_cross_entropy`. The mean is weighted by `weights` and
  normalised by their sum (0 marks padding or an example without a target).

  Args:
    logits: (B, C) logits, any float dtype (computed in float32).
    targets: (B, C) probabilities (rows summing to 1 where the weight is non-zero).
    weights: optional (B,) per-example weights.

  Returns:
    float32 scalar; 0 when all weights are 0.

  Raises:
    ValueError: on mismatched shapes.
  """
  _check_same_shape(logits, targets, "soft_cross_entropy", "targets")
  _check_example_weights(weights, logits.shape[0], "soft_cross_entropy")
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  per_example = -jnp.sum(targets.astype(jnp.float32) * log_probs, axis=-1)
  return _weighted_mean(per_example, _as_f32_or_none(weights))


def sigmoid_cross_entropy(
    logits: jax.Array,
    multi_hot: jax.Array,
    weights: Optional[jax.Array] = None,
    class_weights: Optional[jax.Array] = None,
) -> jax.Array:
  """Mean sigmoid (binary) cross-entropy for multi-label classification.

  Averages over every (example, class) pair, weighted by
  `weights[i] * class_weights[c]` and normalised by the sum of those weights
  (so a padded example, weight 0, drops out of numerator and denominator).
  Targets may be soft (values in [0, 1]).

  Args:
    logits: (B, C) logits, any float dtype (computed in float32).
    multi_hot: (B, C) targets in [0, 1].
    weights: optional (B,) per-example weights; 0 marks padding in eval batches.
    class_weights: optional (C,) per-class weights.

  Returns:
    float32 scalar; 0 when all weights are 0.

  Raises:
    ValueError: on mismatched shapes.
  """
  _check_same_shape(logits, multi_hot, "sigmoid_cross_entropy", "multi_hot targets")
  batch_size, num_classes = logits.shape
  _check_example_weights(weights, batch_size, "sigmoid_cross_entropy")
  _check_class_weights(class_weights, num_classes, "sigmoid_cross_entropy")
  weights, class_weights = _as_f32_or_none(weights), _as_f32_or_none(class_weights)

  logits = logits.astype(jnp.float32)
  targets = multi_hot.astype(jnp.float32)
  # log_sigmoid(-x) = log(1 - sigmoid(x)) without cancellation for large |x|.
  per_element = -(targets * jax.nn.log_sigmoid(logits) + (1.0 - targets) * jax.nn.log_sigmoid(-logits))

  if weights is None and class_weights is None:
    return jnp.mean(per_element)
  element_weight = jnp.ones_like(per_element)
  if weights is not None:
    element_weight = element_weight * weights[:, None]
  if class_weights is not None:
    element_weight = element_weight * class_weights[None, :]
  return _weighted_mean(per_element, element_weight)
