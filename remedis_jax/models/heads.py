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
