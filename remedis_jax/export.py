"""Export a pretrained encoder so that fine-tuning (or any JAX code) loads it with one call.

  python -m remedis_jax.export --workdir=DIR --out=DIR2 [--include_head]

writes
  DIR2/params/      an Orbax checkpoint of {"encoder": ..., ["head": ...]} (host arrays)
  DIR2/model.json   model name, stem and overrides, head settings, and what the encoder expects
                    as input: image size, channel handling, normalisation (uint8 x -> x/127.5 - 1)

and `load_export(DIR2)` returns `(metadata, params)`; `create_encoder_from_export(DIR2)`
returns the Linen module and its params. The BiT root (`"stem"`: "bit", "small", "small_s2")
is recorded because "small" and "small_s2" have the same parameter shapes: the params alone
cannot tell them apart. A model.json without "stem" predates the option and means "bit".
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import orbax.checkpoint as ocp

from data_pipelines import storage

EXPORT_FORMAT = "remedis-jax-export/1"
METADATA_FILE = "model.json"
PARAMS_DIR = "params"
RUN_CONFIG_FILE = "config.json"  # Written by the trainers at the start of every run.

NORMALISATION = "x / 127.5 - 1 (uint8 pixels to [-1, 1], BiT convention)"


def is_export(path: str) -> bool:
  return storage.isfile(storage.join(path, METADATA_FILE))


def write_export(out: str, params: dict[str, Any], metadata: dict[str, Any]) -> None:
  """Writes params (host arrays) and metadata; refuses to overwrite an existing export."""
  if storage.exists(storage.join(out, METADATA_FILE)) or storage.exists(
      storage.join(out, PARAMS_DIR)):
    raise FileExistsError(f"{out} already holds an export; choose a new --out folder")
  storage.makedirs(out)
  params = {k: v for k, v in params.items() if v is not None}
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(storage.join(storage.absolute(out), PARAMS_DIR), params)
    checkpointer.wait_until_finished()
  # The JSON goes last: a folder without model.json is not an export (is_export is False).
  metadata = dict(metadata, format=EXPORT_FORMAT, parts=sorted(params))
  storage.write_text(storage.join(out, METADATA_FILE),
                     json.dumps(metadata, indent=2, sort_keys=True))


def load_export(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """Reads an export folder.

  Returns:
    (metadata, params): the model.json contents and {"encoder": ..., ["head": ...]} as numpy.

  Raises:
    FileNotFoundError: `path` has no model.json (not an export).
    ValueError: the export was written by an unknown format version.
  """
  meta_path = storage.join(path, METADATA_FILE)
  if not storage.isfile(meta_path):
    raise FileNotFoundError(f"{path} is not an export: it has no {METADATA_FILE}")
  metadata = storage.read_json(meta_path)
  if metadata.get("format") != EXPORT_FORMAT:
    raise ValueError(f"{meta_path}: format {metadata.get('format')!r}, expected {EXPORT_FORMAT!r}")
  with ocp.StandardCheckpointer() as checkpointer:
    params_dir = storage.join(storage.absolute(path), PARAMS_DIR)
    abstract = checkpointer.metadata(params_dir)
    tree = getattr(abstract, "item_metadata", abstract)
    target = _numpy_targets(tree)
    params = checkpointer.restore(params_dir, target)
  return metadata, params


def _numpy_targets(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree)


def export_stem(metadata: dict[str, Any]) -> str:
  """The stem an export's encoder was built with ("bit" for exports written before the key)."""
  return metadata.get("stem", "bit")


def create_encoder_from_export(path: str, **overrides):
  """Returns `(module, params)`: the Linen encoder (`create_model`) and its parameters."""
  from remedis_jax import models  # pylint: disable=g-import-not-at-top
  metadata, params = load_export(path)
  kwargs = dict(metadata.get("encoder_overrides", {}), stem=export_stem(metadata))
  kwargs.update(overrides)
  module = models.create_model(metadata["model_name"], **kwargs)
  return module, params["encoder"]


def export_workdir(workdir: str, out: str, include_head: bool = False) -> dict[str, Any]:
  """Exports the newest checkpoint of a pretraining workdir; returns the metadata written."""
  from remedis_jax import checkpointing  # pylint: disable=g-import-not-at-top
  config_path = storage.join(workdir, RUN_CONFIG_FILE)
  if not storage.isfile(config_path):
    raise FileNotFoundError(
        f"{workdir} has no {RUN_CONFIG_FILE}: it is not a remedis-jax training workdir")
  config = storage.read_json(config_path)
  params, step = checkpointing.load_params(workdir)
  if "encoder" not in params:
    raise ValueError(f"the checkpoint in {workdir} has no 'encoder' parameters; "
                     f"top-level keys are: {sorted(params)}")
  model_cfg = config["model"]
  data_cfg = config["data"]
  metadata = {
      "model_name": model_cfg["name"],
      "stem": model_cfg.get("stem", "bit"),
      "encoder_overrides": {},
      "head": ({
          "hidden_dims": list(model_cfg["head_hidden_dims"]),
          "projection_dim": model_cfg["projection_dim"],
          "norm": model_cfg["head_norm"],
      } if include_head else None),
      "input": {
          "image_size": data_cfg["image_size"],
          "num_channels": data_cfg["num_channels"],
          "grayscale": "repeated to the number of channels on the host",
          "dtype": "uint8",
          "normalisation": NORMALISATION,
      },
      "step": int(step),
      "pretraining": {
          "method": config.get("trainer", "simclr"),
          "workdir": storage.absolute(workdir),
          "data_source": data_cfg.get("source"),
      },
  }
  parts = {"encoder": params["encoder"]}
  if include_head:
    parts["head"] = params.get("head")
  write_export(out, parts, metadata)
  return metadata


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags_ = flags.FLAGS
  metadata = export_workdir(flags_.workdir, flags_.out, include_head=flags_.include_head)
  print(f"Exported {metadata['model_name']} (step {metadata['step']}) from {flags_.workdir} "
        f"to {flags_.out}")


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top,g-multiple-import
  flags.DEFINE_string("workdir", None, "Pretraining workdir to export.", required=True)
  flags.DEFINE_string("out", None, "Folder to write the export to (must not hold one).",
                      required=True)
  flags.DEFINE_bool("include_head", False, "Also export the projection head.")
  app.run(main)
