"""Model zoo: BiT ResNet-v2 and ViT encoders, SimCLR projection heads, weight loading.

Typical use:

  model = create_model("R50x1")                      # encoder, no head
  model = create_model("ViT-S/16")                   # a ViT encoder, same interface
  name, params = load_bit_npz("BiT-M-R50x1.npz")      # public BiT weights
  name, params, _ = load_timm_bit("model.safetensors")  # timm's BiT weights (PyTorch layout)
  pre_logits, out = model.apply({"params": params}, images)
"""

from remedis_jax.models.bit import VARIANTS
from remedis_jax.models.bit import ResNetV2
from remedis_jax.models.bit import infer_bit_variant
from remedis_jax.models.bit import load_bit_npz
from remedis_jax.models.bit_timm import load_timm_bit
from remedis_jax.models.common import count_params
from remedis_jax.models.common import merge_params
from remedis_jax.models.contrastive import ContrastiveModel
from remedis_jax.models.contrastive import create_contrastive_model
from remedis_jax.models.heads import ProjectionHead
from remedis_jax.models.heads import Prototypes
from remedis_jax.models.vit import VIT_VARIANTS
from remedis_jax.models.vit import VisionTransformer
from remedis_jax.models.zoo import DTYPES
from remedis_jax.models.zoo import create_model
from remedis_jax.models.zoo import is_vit
from remedis_jax.models.zoo import model_names

__all__ = [
    "DTYPES",
    "VARIANTS",
    "VIT_VARIANTS",
    "ContrastiveModel",
    "ProjectionHead",
    "Prototypes",
    "ResNetV2",
    "VisionTransformer",
    "count_params",
    "create_contrastive_model",
    "create_model",
    "infer_bit_variant",
    "is_vit",
    "load_bit_npz",
    "load_timm_bit",
    "merge_params",
    "model_names",
]
