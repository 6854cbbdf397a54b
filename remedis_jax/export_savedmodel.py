"""`--format=savedmodel`: the encoder (and classifier or projection head) as a TF SavedModel.

The serving signature takes what a user has, raw pixels: uint8 images (batch, H, W, C) at the
export's image size and channel count, and applies our normalisation (x / 127.5 - 1) inside,
so nobody has to re-implement it. It returns

  pre_logits     (batch, D) float32, the encoder's features
  logits         (batch, K) float32, a fine-tuned run only
  probabilities  (batch, K) float32, softmax (or sigmoid for a multi-label task), likewise
  projection     (batch, P) float32, a pretraining run exported with --include_head

The JAX function goes through jax2tf (via orbax-export) as a StableHLO program with a
symbolic batch size. TensorFlow and orbax-export come from the `[export]` extra and are
imported only in this module, which only the savedmodel path of remedis_jax/export.py loads:
the rest of remedis-jax runs without TensorFlow.
"""

from __future__ import annotations

import json
from typing import Any

from data_pipelines import storage

SIGNATURE = "serving_default"
INPUT_NAME = "images"


def _import_tensorflow():
  try:
    # pylint: disable=g-import-not-at-top
    import tensorflow as tf
    from orbax import export as orbax_export
  except ImportError as e:
    raise ImportError(
        f"--format=savedmodel needs TensorFlow and orbax-export ({e}); install them with "
        "`pip install -e \".[export]\"` (or use --format=timm / --format=orbax)") from e
  return tf, orbax_export


def serving_function(parts: dict[str, Any], metadata: dict[str, Any]):
  """`f(params, uint8 images) -> {name: float32 array}`: what the SavedModel computes.

  Also what the tests compare the SavedModel with, so it is built from the project's own
  modules (the zoo encoder, the fine-tuning classifier, the projection head).
  """
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  from remedis_jax import models
  from remedis_jax.train_state import normalize_images
  # pylint: enable=g-import-not-at-top
  encoder = models.create_model(metadata["model_name"], stem=metadata.get("stem", "bit"),
                                **metadata.get("encoder_overrides", {}))
  head_cfg = metadata.get("head")
  finetuned = "classifier" in parts
  multi_label = bool((metadata.get("task") or {}).get("multi_label"))
  head = None
  if head_cfg and finetuned:
    from remedis_jax.train_finetune import FirstHeadLayer  # pylint: disable=g-import-not-at-top
    head = FirstHeadLayer(head_cfg["hidden_dims"][0], head_cfg["norm"])
  elif head_cfg:
    head = models.ProjectionHead(hidden_dims=tuple(head_cfg["hidden_dims"]),
                                 output_dim=head_cfg["projection_dim"], norm=head_cfg["norm"])

  def apply(params, images):
    _, intermediates = encoder.apply({"params": params["encoder"]}, normalize_images(images))
    outputs = {"pre_logits": intermediates["pre_logits"]}
    features = outputs["pre_logits"]
    if head is not None:
      head_out = head.apply({"params": params["head"]}, features)
      if finetuned:
        features = head_out
      else:
        outputs["projection"] = head_out[0].astype(jnp.float32)
    if finetuned:
      logits = (features @ params["classifier"]["kernel"] + params["classifier"]["bias"])
      outputs["logits"] = logits.astype(jnp.float32)
      outputs["probabilities"] = (jax.nn.sigmoid(logits) if multi_label
                                  else jax.nn.softmax(logits, axis=-1))
    return outputs

  return apply


def write_savedmodel_export(out: str, parts: dict[str, Any], metadata: dict[str, Any]) -> None:
  """Writes the SavedModel (and assets.extra/model.json) into the new folder `out`."""
  # pylint: disable=g-import-not-at-top
  from remedis_jax import export
  # pylint: enable=g-import-not-at-top
  tf, orbax_export = _import_tensorflow()
  export.check_new_folder(out)
  parts = {k: v for k, v in parts.items() if v is not None}
  size, channels = metadata["input"]["image_size"], metadata["input"]["num_channels"]
  module = orbax_export.JaxModule(
      parts, serving_function(parts, metadata), trainable=False,
      input_polymorphic_shape=f"(b, {size}, {size}, {channels})")
  serving = orbax_export.ServingConfig(
      SIGNATURE, input_signature=[tf.TensorSpec((None, size, size, channels), tf.uint8,
                                                name=INPUT_NAME)])
  with export._new_folder(out) as partial:  # pylint: disable=protected-access
    orbax_export.ExportManager(module, [serving]).save(storage.absolute(partial))
    storage.makedirs(storage.join(partial, "assets.extra"))
    storage.write_text(storage.join(partial, export.SAVEDMODEL_METADATA_FILE),
                       json.dumps(storage.json_safe(metadata), indent=2, sort_keys=True))
