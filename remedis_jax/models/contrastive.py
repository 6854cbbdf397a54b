"""Encoder + projection head, the model that SimCLR pretraining optimises."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax

from remedis_jax.models.heads import ProjectionHead
from remedis_jax.models.zoo import create_model

Array = jax.Array


class ContrastiveModel(nn.Module):
  """An encoder of the model zoo (BiT ResNet-v2 or ViT) followed by a ProjectionHead on its
  pre_logits.

  Parameters live under `params["encoder"]` (exactly the tree of
  `create_model(name)`, so it can be saved and loaded into a fine-tuning model
  on its own) and `params["head"]`.

  `__call__(images, train=False)` returns `(z, intermediates)`: z is the
  float32 projection (B, output_dim); intermediates is one flat dict with the
  encoder's entries unchanged (ResNet: "root", "block1".."block4",
  "feature_map", "pre_logits"; ViT: its token and "pre_logits" entries) and
  the head's entries prefixed with "head/" ("head/input", "head/hidden_0", ...).

  Attributes:
    encoder: a `models.create_model` encoder without classification head
      (num_classes=None).
    head: the projection head.
  """
  encoder: nn.Module
  head: ProjectionHead

  def __call__(self, images: Array,
               train: bool = False) -> tuple[Array, dict[str, Array]]:
    """Encodes and projects a batch.

    Args:
      images: (B, H, W, C) float images in [-1, 1].
      train: passed on to both submodules.

    Returns:
      (z, intermediates) as described in the class docstring.

    Raises:
      ValueError: if the encoder has a classification head.
    """
    if self.encoder.num_classes:
      raise ValueError(
          "ContrastiveModel.encoder must have num_classes=None (the projection "
          f"head reads pre_logits); got num_classes={self.encoder.num_classes}.")
    _, intermediates = self.encoder(images, train=train)
    z, head_intermediates = self.head(intermediates["pre_logits"], train=train)
    intermediates = dict(intermediates)
    intermediates.update(
        {f"head/{k}": v for k, v in head_intermediates.items()})
    return z, intermediates


def create_contrastive_model(encoder_name: str, *,
                             head_hidden_dims: Sequence[int] = (2048, 2048),
                             projection_dim: int = 128,
                             head_norm: str = "layer",
                             **encoder_overrides: Any) -> ContrastiveModel:
  """Builds a ContrastiveModel around any encoder of the model zoo, by name.

  The head takes the encoder's `dtype` and `param_dtype` so that one override
  switches the whole model to bf16.

  Args:
    encoder_name: a `models.create_model` name: BiT ("R50x1", "R_tiny", ...) or ViT
      ("ViT-S/16", "ViT-micro/4", ...).
    head_hidden_dims: widths of the head's hidden layers.
    projection_dim: size of z.
    head_norm: "layer" or "none".
    **encoder_overrides: `create_model` arguments, e.g. dtype, remat, stem (BiT only).

  Returns:
    The (unbound) Linen module.

  Raises:
    ValueError: unknown encoder name or field, num_classes given, or an
      unknown head_norm.
  """
  if encoder_overrides.get("num_classes"):
    raise ValueError("create_contrastive_model: the encoder cannot have a "
                     "classification head; drop num_classes.")
  encoder_overrides.pop("num_classes", None)
  encoder = create_model(encoder_name, num_classes=None, **encoder_overrides)
  if head_norm not in ("none", "layer"):
    raise ValueError(f"head_norm must be 'none' or 'layer', got {head_norm!r}.")
  head = ProjectionHead(hidden_dims=tuple(head_hidden_dims),
                        output_dim=projection_dim, norm=head_norm,
                        dtype=encoder.dtype, param_dtype=encoder.param_dtype)
  return ContrastiveModel(encoder=encoder, head=head)
