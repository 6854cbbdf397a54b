"""SimCLR v2 projection head (Chen et al. 2020, arxiv.org/abs/2006.10029)."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any

NORMS = ("none", "layer")


class ProjectionHead(nn.Module):
  """MLP projection head g(.) of SimCLR v2, with LayerNorm instead of BatchNorm.

  Layout, following SimCLR v2's head: each hidden layer is Dense -> norm ->
  ReLU; the output layer is Dense -> norm without ReLU. As in SimCLR, a Dense
  followed by a norm has no bias (the norm's offset takes its place) and the
  output layer has no bias or offset at all (norm="layer": LayerNorm with a
  scale only; norm="none": a bias-free Dense).

  Normalisation is "layer" (LayerNorm per example) or "none". BatchNorm is
  deliberately not offered: its running statistics would make the sharded
  train step stateful (a `batch_stats` collection to thread through jit,
  checkpoints and evaluators) and its cross-device statistics couple the
  examples of a contrastive batch. LayerNorm needs none of that.

  SimCLR v2 fine-tunes from the first head layer, so `__call__` returns every
  hidden activation:

    input     the head input (e.g. the encoder's pre_logits), as given
    hidden_0  activation after the first hidden layer (post-ReLU), float32
    hidden_1  ... one entry per hidden layer

  Attributes:
    hidden_dims: width of each hidden layer; () gives a single linear layer.
    output_dim: size of the projection z fed to the contrastive loss.
    norm: "layer" or "none".
    dtype: compute dtype of the Dense layers; norms and z are float32.
    param_dtype: parameter dtype.
  """
  hidden_dims: Sequence[int] = (2048, 2048)
  output_dim: int = 128
  norm: str = "layer"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array,
               train: bool = False) -> tuple[Array, dict[str, Array]]:
    """Projects features to z.

    Args:
      x: (B, D) features.
      train: unused (no dropout or batch statistics); kept for a uniform call
        signature.

    Returns:
      (z, intermediates): z is (B, output_dim) float32; intermediates as in
      the class docstring.

    Raises:
      ValueError: for an unknown `norm`.
    """
    del train
    if self.norm not in NORMS:
      raise ValueError(f"ProjectionHead.norm must be one of {NORMS}, got "
                       f"{self.norm!r}.")
    with_norm = self.norm == "layer"
    intermediates = {"input": x}
    h = x
    for i, width in enumerate(self.hidden_dims):
      h = nn.Dense(width, use_bias=not with_norm, dtype=self.dtype,
                   param_dtype=self.param_dtype, name=f"hidden_{i}")(h)
      if with_norm:
        # flax computes LayerNorm statistics in float32 even for bf16 inputs.
        h = nn.LayerNorm(dtype=jnp.float32, param_dtype=self.param_dtype,
                         name=f"hidden_{i}_norm")(h)
      h = nn.relu(h)
      intermediates[f"hidden_{i}"] = h.astype(jnp.float32)
    z = nn.Dense(self.output_dim, use_bias=False, dtype=self.dtype,
                 param_dtype=self.param_dtype, name="output")(h)
    if with_norm:
      z = nn.LayerNorm(use_bias=False, dtype=jnp.float32,
                       param_dtype=self.param_dtype, name="output_norm")(z)
    return z.astype(jnp.float32), intermediates


# Squared-norm floor for l2 normalisation: an all-zero projection (e.g. an empty
# queue slot) scores exactly 0 against every prototype instead of 0/0 = NaN.
_NORM_EPS_SQUARED = 1e-24


def _l2_normalize(x: Array, axis: int) -> Array:
  squared_norm = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(squared_norm, _NORM_EPS_SQUARED))


def _unit_column_init(key: jax.Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> Array:
  """Normal draws with every column (prototype) scaled to unit l2 norm."""
  return _l2_normalize(jax.random.normal(key, shape, jnp.float32), axis=0).astype(dtype)


class Prototypes(nn.Module):
  """K learnable prototypes scored by cosine similarity (SwAV's prototype layer).

  SwAV (Caron et al. 2020) keeps its prototype matrix unit-norm by
  re-normalising the weights in place before every step. Here the kernel is
  l2-normalised inside the forward pass instead, which is pure (no state
  edited outside the optimiser) and gives the same scores; the gradient then
  has no radial component, which SwAV's re-normalisation discards anyway. The
  kernel starts with unit-norm columns, so at initialisation a step moves the
  prototypes as SwAV's does (to first order in the learning rate); its norm
  drifts during
  training (up under SGD, down under weight decay), which only rescales that
  learning rate, and LARS's trust ratio is scale-free.

  SwAV freezes the prototypes for its first iterations
  (`freeze_prototypes_niters`, 313 steps): that is the trainer's job (zero
  the gradients of the "prototypes" parameters while step < n).

  Attributes:
    num_prototypes: number of prototypes K (SwAV: 3000 for ImageNet).
    param_dtype: kernel dtype; the scores are computed in float32.
  """
  num_prototypes: int
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: Array) -> Array:
    """Cosine similarity of each projection to each prototype.

    Args:
      z: (N, D) projections, not necessarily normalised; any float dtype.

    Returns:
      (N, K) float32 scores in [-1, 1]: l2-normalised z times the
      column-normalised kernel (param "kernel", shape (D, K)). An all-zero
      row of z scores 0 everywhere.
    """
    kernel = self.param("kernel", _unit_column_init, (z.shape[-1], self.num_prototypes),
                        self.param_dtype)
    z = _l2_normalize(z.astype(jnp.float32), axis=-1)
    kernel = _l2_normalize(kernel.astype(jnp.float32), axis=0)
    # HIGHEST keeps the matmul in float32 on TPU: Sinkhorn divides these scores
    # by epsilon = 0.05, which would amplify bf16 rounding 20x.
    return jnp.matmul(z, kernel, precision=jax.lax.Precision.HIGHEST)
