"""One entry point for every encoder of the model zoo: BiT ResNets and Vision Transformers.

  model = create_model("R50x1")                        # BiT ResNet-v2, as bit.create_model
  model = create_model("R_tiny", stem="small")          # 3x3/1 root for 28-32 px images
  model = create_model("ViT-B/16", dtype=jnp.bfloat16)  # VisionTransformer
  output, intermediates = model.apply({"params": params}, images)

Both families return `(output, intermediates)` with `intermediates["pre_logits"]` (B, D) float32
and `intermediates["feature_map"]` (B, h, w, D), so trainers, evaluators and exports treat them
alike.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from remedis_jax.models import bit
from remedis_jax.models import vit

# config.model.dtype -> the compute dtype.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# ResNetV2 fields that mean nothing to a ViT. Callers written for BiT (configs with
# `num_groups`, exports with BiT overrides) may pass them; a ViT ignores them with a log line
# instead of failing. Any other unknown field is still an error. `stem` is not among them: it is
# an argument of `create_model`, and a ViT refuses any stem but "bit" rather than ignore it.
BIT_ONLY_FIELDS = frozenset(
    f for f in bit.ResNetV2.__dataclass_fields__ if f not in ("parent", "name", "stem")
) - vit.vit_fields()


def model_names() -> list[str]:
  """Every name `create_model` accepts: BiT variants, then ViT variants."""
  return [*bit.VARIANTS, *vit.VIT_VARIANTS]


def is_vit(name: str) -> bool:
  """True for a `VIT_VARIANTS` name."""
  return name in vit.VIT_VARIANTS


def create_model(name: str, num_classes: Optional[int] = None, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, remat: bool = False, stem: str = "bit",
                 **overrides: Any) -> nn.Module:
  """Builds an encoder of the model zoo by name.

  Args:
    name: a BiT name (`bit.VARIANTS`: "R50x1", ..., "R_tiny", "R_micro") or a ViT name
      (`vit.VIT_VARIANTS`: "ViT-S/16", "ViT-B/16", "ViT-tiny/4", "ViT-micro/4").
    num_classes: size of a zero-initialised classification head; None for an encoder without
      head (output = pre_logits).
    dtype: compute dtype.
    param_dtype: dtype of the stored parameters.
    remat: rematerialise every residual unit / transformer block.
    stem: the BiT root (`bit.STEMS`): "bit", "small" or "small_s2". A ViT has a patch
      embedding instead, so it only takes "bit" (what every config means when it sets none).
    **overrides: further fields of the chosen module (ResNetV2 or VisionTransformer). For a
      ViT, BiT-only fields (`BIT_ONLY_FIELDS`, e.g. num_groups) are ignored.

  Returns:
    The (unbound) Linen module: `bit.ResNetV2` or `vit.VisionTransformer`.

  Raises:
    ValueError: for an unknown name (all known names are listed), an unknown field or stem,
      or a stem other than "bit" for a ViT.
  """
  if is_vit(name):
    if stem != "bit":
      raise ValueError(f"create_model({name!r}): stem={stem!r} is a BiT ResNet option and a ViT "
                       "has a patch embedding, not a root conv; use config.model.stem='bit' "
                       "with a ViT, or a BiT model name.")
    ignored = sorted(set(overrides) & BIT_ONLY_FIELDS)
    if ignored:
      logging.info("create_model(%r): ignoring BiT-only field(s) %s for a ViT.", name, ignored)
    overrides = {k: v for k, v in overrides.items() if k not in BIT_ONLY_FIELDS}
    return vit.create_vit(name, num_classes=num_classes, dtype=dtype, param_dtype=param_dtype,
                          remat=remat, **overrides)
  if name in bit.VARIANTS:
    return bit.create_model(name, num_classes=num_classes, dtype=dtype,
                            param_dtype=param_dtype, remat=remat, stem=stem, **overrides)
  raise ValueError(f"Unknown model name {name!r}; known names: {', '.join(model_names())}.")
