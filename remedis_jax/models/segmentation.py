"""Segmentation model: an encoder (ViT or BiT ResNet) + a light progressive-upsampling decoder.

Decoder choice. The decoder is SETR's "PUP" (progressive upsampling; Zheng et al. 2021,
"Rethinking semantic segmentation from a sequence-to-sequence perspective") made light: the
encoder's `feature_map` is projected to `width` channels (1x1 conv), then each stage doubles
the resolution (bilinear) and refines with a 3x3 conv + GroupNorm + ReLU, until the input size is
reached; a 1x1 conv gives per-pixel logits. SETR-naive (a per-token linear head + one bilinear
upsampling by the patch size) was the alternative; at 32 px with 4 px patches it can only
paint 4x4 blocks with smooth edges, while two learned 2x stages cost ~80k parameters and can
place a lung border inside a patch.

A ViT has one scale (H/p), so its decoder sees the final tokens only: how good the masks are
then depends on the pretraining, which is the point of the GMML comparison. A BiT ResNet ends at
H/32 (1x1 at 32 px), where no decoder can recover a border, so for ResNets the decoder also takes
U-Net-style skips: an intermediate map (`block3`, `block2`, `block1` of the ResNet's
intermediates) whose spatial size equals a stage's output size is projected (1x1 conv) and
concatenated before that stage's 3x3 conv. `skip_keys` names the candidates; keys that are
missing, not 4-D, or at a size no stage reaches are ignored, so the same setting works for both
encoder families ("auto" in the config = `DEFAULT_SKIP_KEYS`).

Parameters: {"encoder": the create_model tree, "decoder": this module's tree}, so
`params["encoder"]` of a pretraining checkpoint or export loads exactly as for classification.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

DEFAULT_SKIP_KEYS = ("block3", "block2", "block1")


def upsampling_sizes(feature_size: tuple[int, int],
                     output_size: tuple[int, int]) -> list[tuple[int, int]]:
  """The (h, w) after each decoder stage: doubling, capped at the output size.

  Args:
    feature_size: the feature map's (h, w).
    output_size: the input image's (H, W).

  Returns:
    One size per stage (empty when the feature map is already at the output size).

  Raises:
    ValueError: the feature map is larger than the output.
  """
  (h, w), (height, width) = feature_size, output_size
  if h > height or w > width or h < 1 or w < 1:
    raise ValueError(f"feature map {feature_size} does not fit the output size {output_size}")
  sizes = []
  while (h, w) != (height, width):
    h, w = min(2 * h, height), min(2 * w, width)
    sizes.append((h, w))
  return sizes


class SegmentationDecoder(nn.Module):
  """Progressive upsampling decoder: feature map (B, h, w, D) -> logits (B, H, W, K) float32.

  Attributes:
    num_classes: K output channels (1 for a binary lung mask: sigmoid per pixel).
    width: channels of every decoder stage.
    num_groups: GroupNorm groups (must divide `width`).
    dtype: compute dtype of the convolutions; norms and logits stay float32.
  """
  num_classes: int = 1
  width: int = 64
  num_groups: int = 8
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, feature_map: jax.Array, output_size: tuple[int, int],
               skips: Sequence[jax.Array] = ()) -> jax.Array:
    """Decodes a feature map to per-pixel logits at `output_size`.

    Args:
      feature_map: (B, h, w, D).
      output_size: (H, W) of the logits (the input image size).
      skips: optional (B, h_i, w_i, C_i) maps; each is used at the stage whose output has its
        size (others are ignored).

    Returns:
      float32 logits (B, H, W, num_classes).

    Raises:
      ValueError: width not divisible by num_groups, or a feature map larger than the output.
    """
    if self.width % self.num_groups:
      raise ValueError(f"decoder width {self.width} is not divisible by num_groups "
                       f"{self.num_groups} (config.model.decoder)")

    def norm_relu(x, name):
      x = nn.GroupNorm(self.num_groups, dtype=jnp.float32, name=name)(x.astype(jnp.float32))
      return nn.relu(x).astype(self.dtype)

    x = nn.Conv(self.width, (1, 1), dtype=self.dtype, name="project")(feature_map.astype(self.dtype))
    x = norm_relu(x, "project_norm")
    sizes = upsampling_sizes(tuple(feature_map.shape[1:3]), tuple(output_size))
    for stage, (h, w) in enumerate(sizes):
      x = jax.image.resize(x, (x.shape[0], h, w, x.shape[-1]), method="bilinear")
      for i, skip in enumerate(s for s in skips if tuple(s.shape[1:3]) == (h, w)):
        skip = nn.Conv(self.width, (1, 1), dtype=self.dtype, name=f"skip{stage}_{i}")(
            skip.astype(self.dtype))
        x = jnp.concatenate([x, skip], axis=-1)
      x = nn.Conv(self.width, (3, 3), padding="SAME", dtype=self.dtype, name=f"stage{stage}")(x)
      x = norm_relu(x, f"stage{stage}_norm")
    # Zero init: training starts from p = 0.5 everywhere, as a BiT classifier starts uniform.
    logits = nn.Conv(self.num_classes, (1, 1), kernel_init=nn.initializers.zeros,
                     dtype=jnp.float32, name="logits")(x.astype(jnp.float32))
    return logits


class SegmentationModel(nn.Module):
  """Encoder -> SegmentationDecoder. Parameters: {"encoder", "decoder"}.

  Returns `(logits float32 (B, H, W, K), intermediates)`; intermediates are the encoder's.

  Attributes:
    encoder: a `models.create_model(name, num_classes=None)` module whose intermediates hold
      `feature_map` (B, h, w, D).
    decoder: the decoder.
    skip_keys: intermediates offered to the decoder as skips (see the module docstring).
  """
  encoder: nn.Module
  decoder: SegmentationDecoder
  skip_keys: tuple[str, ...] = ()

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False):
    _, intermediates = self.encoder(images, train=train)
    if "feature_map" not in intermediates:
      raise ValueError(f"the encoder {type(self.encoder).__name__} returns no 'feature_map' in "
                       f"its intermediates (keys: {sorted(intermediates)})")
    feature_map = intermediates["feature_map"]
    skips = [intermediates[k] for k in self.skip_keys
             if k in intermediates and getattr(intermediates[k], "ndim", 0) == 4]
    logits = self.decoder(feature_map, tuple(images.shape[1:3]), skips)
    return logits, intermediates


def create_segmentation_model(encoder_name: str, *, num_classes: int = 1,
                              decoder_width: int = 64, decoder_groups: int = 8,
                              skip_keys: str | Sequence[str] = "auto", dtype: Any = jnp.float32,
                              remat: bool = False) -> SegmentationModel:
  """An encoder from the zoo (`models.create_model`) + a SegmentationDecoder.

  Args:
    encoder_name: a BiT ("R50x1", "R_tiny", ...) or ViT ("ViT-S/16", "ViT-tiny/4", ...) name.
    num_classes: output channels (1: binary lung mask).
    decoder_width: channels of the decoder stages.
    decoder_groups: GroupNorm groups of the decoder.
    skip_keys: "auto" (`DEFAULT_SKIP_KEYS`: ResNet stage outputs; a ViT has none), "" / "none"
      (no skips), or intermediate names ("block2,block1" or a sequence).
    dtype: compute dtype.
    remat: rematerialise encoder blocks.

  Returns:
    The SegmentationModel.
  """
  from remedis_jax import models  # pylint: disable=g-import-not-at-top
  if isinstance(skip_keys, str):
    text = skip_keys.strip()
    if text == "auto":
      skip_keys = DEFAULT_SKIP_KEYS
    elif text.lower() in ("", "none"):
      skip_keys = ()
    else:
      skip_keys = tuple(k.strip() for k in text.split(",") if k.strip())
  encoder = models.create_model(encoder_name, num_classes=None, dtype=dtype, remat=remat)
  decoder = SegmentationDecoder(num_classes=num_classes, width=decoder_width,
                                num_groups=decoder_groups, dtype=dtype)
  return SegmentationModel(encoder=encoder, decoder=decoder, skip_keys=tuple(skip_keys))
