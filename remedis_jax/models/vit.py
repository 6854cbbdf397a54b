"""Vision Transformer encoders (Dosovitskiy et al. 2021, arxiv.org/abs/2010.11929).

The encoder of GMML pretraining (Atito et al., arxiv.org/abs/2111.06377) and a selectable
encoder for fine-tuning, next to the BiT ResNets. Differences from the original ViT, chosen for
masked-image pretraining and dense prediction:

* no class token: `pre_logits` is the global average of the final LayerNorm-ed patch tokens
  (as in big_vision's `pool_type="gap"`), so every output token is a patch and the token grid
  maps 1:1 onto the image (reconstruction and segmentation heads read it directly);
* learned position embeddings stored at a reference grid (`image_size // patch_size`) and
  bilinearly resized to the grid of the actual input, so one set of weights serves 32 px demos,
  224 px fine-tuning, or any H, W divisible by the patch size.

Block: pre-LN, x + MHSA(LN(x)); x + MLP(LN(x)) with a GELU MLP. LayerNorm statistics and the
attention softmax run in float32 whatever the compute dtype is: in bfloat16 the softmax over a
few hundred logits and the variance of a width-768 vector lose too many bits.

Parameter tree of `VisionTransformer` (what `params["encoder"]` of a checkpoint holds):

  embedding/{kernel (p, p, C, D), bias (D,)}       patch embedding, a p x p stride-p conv
  pos_embedding (1, N_ref, D)                      N_ref = (image_size // p) ** 2
  encoderblock_<i>/attention_norm/{scale, bias}
  encoderblock_<i>/attention/{query,key,value}/{kernel (D, h, D/h), bias (h, D/h)}
  encoderblock_<i>/attention/out/{kernel (h, D/h, D), bias (D,)}
  encoderblock_<i>/mlp_norm/{scale, bias}
  encoderblock_<i>/mlp/{fc1, fc2}/{kernel, bias}
  encoder_norm/{scale, bias}
  head/{kernel, bias}                              only with num_classes
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any

# Flax's and big_vision's LayerNorm epsilon for ViT.
LAYER_NORM_EPS = 1e-6

# name -> VisionTransformer fields. S/16 and B/16 are the published sizes (Dosovitskiy et al.
# Table 1; S from Touvron et al. 2021); the /4 variants are for tests and CPU demos at 32 px.
VIT_VARIANTS: dict[str, dict[str, Any]] = {
    "ViT-S/16": dict(patch_size=16, hidden_size=384, num_layers=12, num_heads=6, mlp_dim=1536,
                     image_size=224),
    "ViT-B/16": dict(patch_size=16, hidden_size=768, num_layers=12, num_heads=12,
                     mlp_dim=3072, image_size=224),
    "ViT-tiny/4": dict(patch_size=4, hidden_size=96, num_layers=4, num_heads=3, mlp_dim=384,
                       image_size=32),
    "ViT-micro/4": dict(patch_size=4, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64,
                        image_size=32),
}


def resize_pos_embedding(pos_embedding: Array, reference_grid: tuple[int, int],
                         grid: tuple[int, int]) -> Array:
  """Bilinearly resizes learned position embeddings from one patch grid to another.

  Args:
    pos_embedding: (1, gh_ref * gw_ref, D), row-major over the reference grid.
    reference_grid: (gh_ref, gw_ref) the embeddings were learned on.
    grid: (gh, gw) of the current input.

  Returns:
    (1, gh * gw, D) in the input's dtype; the same array when the grids are equal.
  """
  if tuple(reference_grid) == tuple(grid):
    return pos_embedding
  width = pos_embedding.shape[-1]
  as_grid = pos_embedding.reshape(1, *reference_grid, width).astype(jnp.float32)
  # Half-pixel centres (jax.image.resize's convention, as TF2 and big_vision's
  # resample_posemb); antialias only matters when shrinking the grid.
  resized = jax.image.resize(as_grid, (1, *grid, width), method="bilinear")
  return resized.reshape(1, grid[0] * grid[1], width).astype(pos_embedding.dtype)


class MlpBlock(nn.Module):
  """Dense -> GELU -> Dense, the transformer's feed-forward sublayer.

  Attributes:
    mlp_dim: hidden width.
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """
  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    dense = lambda features, name: nn.Dense(
        features, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.normal(stddev=1e-6), name=name)
    width = x.shape[-1]
    x = nn.gelu(dense(self.mlp_dim, "fc1")(x), approximate=False)
    return dense(width, "fc2")(x)


class EncoderBlock(nn.Module):
  """Pre-LN transformer block: x + MHSA(LN(x)), then x + MLP(LN(x)).

  Attributes:
    num_heads: attention heads.
    mlp_dim: MLP hidden width.
    dtype: compute dtype; LayerNorm statistics and softmax stay float32.
    param_dtype: parameter dtype.
  """
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    norm = lambda name: nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype,
                                     param_dtype=self.param_dtype, name=name)
    y = norm("attention_norm")(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=nn.initializers.xavier_uniform(), force_fp32_for_softmax=True,
        deterministic=True, name="attention")(y, y)
    x = x + y
    y = norm("mlp_norm")(x)
    y = MlpBlock(self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="mlp")(y)
    return x + y


class VisionTransformer(nn.Module):
  """ViT encoder without class token, with an optional zero-initialised Dense head.

  Input: NHWC float images in [-1, 1], H and W divisible by `patch_size`, any channel count.

  `__call__` returns `(output, intermediates)`. `output` is the float32 logits
  (B, num_classes) when `num_classes` is set, else the float32 `pre_logits` (B, D).
  `intermediates` holds:

    tokens       (B, N, D) final tokens after `encoder_norm`, N = (H/p) * (W/p) row-major;
                 compute dtype
    feature_map  (B, H/p, W/p, D) the same tokens as a grid; compute dtype
    pre_logits   (B, D) mean of the tokens, float32
    logits       (B, num_classes) float32; only with num_classes

  Attributes:
    patch_size: p, side of the square patches.
    hidden_size: D, token width.
    num_layers: transformer blocks.
    num_heads: attention heads (must divide hidden_size).
    mlp_dim: MLP hidden width.
    image_size: side of the square reference input the position embeddings are stored for;
      other input sizes get them bilinearly resized.
    num_classes: classification head size; None for an encoder without head.
    dtype: compute dtype (e.g. jnp.bfloat16). LayerNorm statistics, softmax, pre_logits and
      logits stay float32.
    param_dtype: dtype of the stored parameters.
    remat: rematerialise every block (`nn.remat`) to trade compute for activation memory;
      outputs and gradients are unchanged.
  """
  patch_size: int = 16
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  image_size: int = 224
  num_classes: Optional[int] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, images: Array,
               train: bool = False) -> tuple[Array, dict[str, Array]]:
    """Runs the encoder (and head).

    Args:
      images: (B, H, W, C) float images in [-1, 1].
      train: unused (no dropout); accepted so that every model in the project has the same
        call signature.

    Returns:
      (output, intermediates) as described in the class docstring.

    Raises:
      ValueError: if `images` is not 4-D, H or W is not divisible by the patch size, or the
        widths do not fit the heads / the reference size does not fit the patches.
    """
    del train
    p = self.patch_size
    if images.ndim != 4:
      raise ValueError(
          f"VisionTransformer expects NHWC images of rank 4, got shape {images.shape}.")
    batch, height, width, _ = images.shape
    if height % p or width % p:
      raise ValueError(
          f"VisionTransformer with patch_size={p} needs H and W divisible by {p}; got images "
          f"of shape {images.shape}. Resize or crop the input (data.image_size) to a multiple "
          f"of {p}.")
    if self.image_size % p:
      raise ValueError(f"VisionTransformer: image_size={self.image_size} is not a multiple of "
                       f"patch_size={p}.")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"VisionTransformer: hidden_size={self.hidden_size} is not divisible by "
                       f"num_heads={self.num_heads}.")
    grid = (height // p, width // p)
    reference_grid = (self.image_size // p,) * 2
    out = {}

    x = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                param_dtype=self.param_dtype, name="embedding")(images)
    x = x.reshape(batch, grid[0] * grid[1], self.hidden_size)
    pos_embedding = self.param(
        "pos_embedding", nn.initializers.normal(stddev=0.02),
        (1, reference_grid[0] * reference_grid[1], self.hidden_size), self.param_dtype)
    x = x + resize_pos_embedding(pos_embedding, reference_grid, grid).astype(x.dtype)

    block_cls = nn.remat(EncoderBlock) if self.remat else EncoderBlock
    for i in range(self.num_layers):
      x = block_cls(self.num_heads, self.mlp_dim, dtype=self.dtype,
                    param_dtype=self.param_dtype, name=f"encoderblock_{i}")(x)

    x = out["tokens"] = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype,
                                     param_dtype=self.param_dtype, name="encoder_norm")(x)
    out["feature_map"] = x.reshape(batch, *grid, self.hidden_size)
    x = out["pre_logits"] = jnp.mean(x.astype(jnp.float32), axis=1)

    if self.num_classes:
      # Zero init as in BiT and ViT fine-tuning: training starts from a uniform prediction.
      x = out["logits"] = nn.Dense(
          self.num_classes, kernel_init=nn.initializers.zeros, dtype=jnp.float32,
          param_dtype=self.param_dtype, name="head")(x)
    return x, out


def create_vit(name: str, num_classes: Optional[int] = None,
               **overrides: Any) -> VisionTransformer:
  """Builds a VisionTransformer variant by name.

  Args:
    name: one of `VIT_VARIANTS` ("ViT-S/16", "ViT-B/16", "ViT-tiny/4", "ViT-micro/4").
    num_classes: classification head size; None for an encoder without head
      (output = pre_logits).
    **overrides: any other VisionTransformer field, e.g. dtype=jnp.bfloat16, remat=True,
      image_size=64.

  Returns:
    The (unbound) Linen module.

  Raises:
    ValueError: for an unknown name or override field.
  """
  if name not in VIT_VARIANTS:
    raise ValueError(f"Unknown ViT name {name!r}; known names: {', '.join(VIT_VARIANTS)}.")
  fields = vit_fields()
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"create_vit({name!r}): unknown VisionTransformer field(s) {unknown}; "
                     f"valid fields: {sorted(fields)}.")
  kwargs = dict(VIT_VARIANTS[name])
  kwargs.update(overrides)
  return VisionTransformer(num_classes=num_classes, **kwargs)


def vit_fields() -> set[str]:
  """The VisionTransformer dataclass fields a caller may set."""
  return {f for f in VisionTransformer.__dataclass_fields__ if f not in ("parent", "name")}
