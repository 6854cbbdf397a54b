r"""How close timm's outputs are to the JAX model's after `--format=timm` (docs/export.md).

  python -m experiments.benchmarks.timm_parity            # R_micro at 64 px, R50x1 at 224 px

For each model: random BiT weights (GroupNorm scales and offsets away from 1 and 0 too) and a
random classifier, exported with `export.write_timm_export`, loaded into timm from the export
folder, and both run on the same random uint8 images (normalised by each side's own recipe:
timm's mean/std from the export's config.json, ours x / 127.5 - 1). Prints one JSON line per
model with max |timm - jax| / max |jax| of the pre-logits features and of the logits. Needs
torch and timm (the dev extra). CPU is enough.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from remedis_jax import export, models

_PARSER = argparse.ArgumentParser(description=__doc__.split("\n")[0])
_PARSER.add_argument("--models", default="R_micro:64,R50x1:224",
                     help="NAME:IMAGE_SIZE pairs, comma-separated.")
_PARSER.add_argument("--num_images", type=int, default=4)
_PARSER.add_argument("--num_classes", type=int, default=3)


def random_params(name: str, size: int, rng: np.random.Generator):
  abstract = jax.eval_shape(models.create_model(name).init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))["params"]
  return jax.tree.map(lambda a: rng.normal(1.0 if a.ndim == 1 else 0.0, 0.2, a.shape)
                      .astype(np.float32), abstract)


def relative_difference(actual, expected) -> float:
  """max |actual - expected| / max |expected| (features near zero make per-element ratios
  meaningless)."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def from_constructor(config: dict):
  """timm's ResNetV2 from an export's config.json `constructor` entry (docs/export.md)."""
  import functools  # pylint: disable=g-import-not-at-top
  from timm.layers import GroupNormAct, StdConv2d  # pylint: disable=g-import-not-at-top
  from timm.models.resnetv2 import ResNetV2  # pylint: disable=g-import-not-at-top
  kwargs = dict(config["constructor"])
  kwargs["conv_layer"] = functools.partial(StdConv2d, eps=kwargs["conv_layer"]["eps"])
  kwargs["norm_layer"] = functools.partial(GroupNormAct,
                                           num_groups=kwargs["norm_layer"]["num_groups"])
  return ResNetV2(num_classes=config["num_classes"], **kwargs)


def parity(name: str, size: int, num_images: int, num_classes: int) -> dict:
  import safetensors.torch  # pylint: disable=g-import-not-at-top
  import timm  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  encoder = random_params(name, size, rng)
  width = encoder["norm_pre_head"]["scale"].shape[0]
  classifier = {"kernel": rng.normal(0, 0.1, (width, num_classes)).astype(np.float32),
                "bias": rng.normal(0, 0.1, (num_classes,)).astype(np.float32)}
  metadata = {"model_name": name, "stem": "bit",
              "input": {"image_size": size, "num_channels": 3},
              "task": {"num_classes": num_classes, "multi_label": False,
                       "class_names": [f"c{i}" for i in range(num_classes)]}}
  images = rng.integers(0, 256, (num_images, size, size, 3), dtype=np.uint8)
  with tempfile.TemporaryDirectory() as folder:
    out = os.path.join(folder, "timm")
    export.write_timm_export(out, {"encoder": encoder, "classifier": classifier}, metadata)
    with open(os.path.join(out, export.TIMM_CONFIG_FILE), encoding="utf-8") as f:
      config = json.load(f)
    if config["architecture"]:  # a registered timm name: timm builds and loads the folder
      model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    else:  # R_small / R_tiny / R_micro: ResNetV2 from the recorded constructor arguments
      model = from_constructor(config)
      model.load_state_dict(safetensors.torch.load_file(
          os.path.join(out, export.TIMM_WEIGHTS_FILE)), strict=True)
      model.eval()
  cfg = config["pretrained_cfg"]
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
  x = (x - torch.tensor(cfg["mean"]).view(1, -1, 1, 1)) / torch.tensor(cfg["std"]).view(
      1, -1, 1, 1)
  with torch.no_grad():
    timm_features = model.forward_head(model.forward_features(x), pre_logits=True).numpy()
    timm_logits = model(x).numpy()
  _, intermediates = models.create_model(name).apply(
      {"params": encoder}, images.astype(np.float32) / 127.5 - 1.0)
  features = np.asarray(intermediates["pre_logits"])
  logits = features @ classifier["kernel"] + classifier["bias"]
  return {"model": name, "image_size": size, "timm_architecture": config["architecture"],
          "pre_logits_max_rel_diff": relative_difference(timm_features, features),
          "logits_max_rel_diff": relative_difference(timm_logits, logits)}


def main() -> None:
  args = _PARSER.parse_args()
  for item in args.models.split(","):
    name, size = item.strip().split(":")
    print(json.dumps(parity(name, int(size), args.num_images, args.num_classes)), flush=True)


if __name__ == "__main__":
  main()
