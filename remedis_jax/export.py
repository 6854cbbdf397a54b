"""Export a trained encoder for where it will be used: JAX, PyTorch/timm or TensorFlow.

  python -m remedis_jax.export --workdir=DIR --out=DIR2 [--format=orbax|timm|savedmodel]
                               [--include_head]

`--workdir` is a pretraining run (its newest checkpoint) or a fine-tuning run (its best
checkpoint, WORKDIR/best/, with the classifier and the test results). Formats:

  orbax       (default) for JAX code with this package:
                DIR2/params/     an Orbax checkpoint of {"encoder": ..., ["head": ...],
                                 ["classifier": ...]} (host arrays)
                DIR2/model.json  the metadata below
              `load_export(DIR2)` returns `(metadata, params)`; `create_encoder_from_export(DIR2)`
              the Linen module and its params; config.model.init=DIR2 starts a run from it.
  timm        for PyTorch (timm, and MONAI or anything that takes an nn.Module):
                DIR2/model.safetensors  timm's ResNetV2 state_dict (a fine-tuned run's
                                        classifier as timm's head.fc)
                DIR2/config.json        timm's model config (architecture, num_classes,
                                        label_names, input size, mean/std) with the metadata
                                        below under "remedis_jax"
              `timm.create_model("local-dir:DIR2", pretrained=True)` builds and loads it
              (models/bit_timm.py has the layout; docs/export.md the recipes).
  savedmodel  for TensorFlow serving: a SavedModel whose "serving_default" signature takes
              uint8 images (batch, H, W, C) of the export's size, normalises them inside and
              returns pre_logits (and logits/probabilities, or the projection);
              DIR2/assets.extra/model.json holds the metadata. Needs the `[export]` extra
              (TensorFlow, orbax-export), imported only here.

Metadata (every format): model name and stem, the input (image size, channels, dtype, the
normalisation uint8 x -> x / 127.5 - 1), the step, how it was trained (method, workdir, data
source and path), and for a fine-tuned run the task (classes and their names, multi-label) and
its test metrics. The BiT root (`"stem"`: "bit", "small", "small_s2") is recorded because
"small" and "small_s2" have the same parameter shapes: the params alone cannot tell them
apart. A model.json without "stem" predates the option and means "bit".

An existing output folder is never written into (an error names it); the timm and savedmodel
exports are written to a sibling folder first and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import orbax.checkpoint as ocp

from data_pipelines import storage
from remedis_jax import run_files

EXPORT_FORMAT = "remedis-jax-export/1"
METADATA_FILE = "model.json"
PARAMS_DIR = "params"
RUN_CONFIG_FILE = "config.json"  # Written by the trainers at the start of every run.
BEST_DIR = "best"  # A supervised run's best checkpoint (remedis_jax/supervised.py).
FORMATS = ("orbax", "timm", "savedmodel")
TIMM_WEIGHTS_FILE = "model.safetensors"
TIMM_CONFIG_FILE = "config.json"
SAVEDMODEL_METADATA_FILE = os.path.join("assets.extra", METADATA_FILE)

NORMALISATION = "x / 127.5 - 1 (uint8 pixels to [-1, 1], BiT convention)"
# The same normalisation in timm's convention, (x / 255 - mean) / std.
TIMM_MEAN_STD = (0.5, 0.5)


def is_export(path: str) -> bool:
  return storage.isfile(storage.join(path, METADATA_FILE))


def check_format(export_format: str) -> None:
  """Raises ValueError naming the known formats when `export_format` is not one of them."""
  if export_format not in FORMATS:
    raise ValueError(f"unknown export format {export_format!r}; --format takes one of "
                     f"{', '.join(FORMATS)} (orbax: JAX, timm: PyTorch, savedmodel: TensorFlow)")


def check_new_folder(out: str) -> None:
  """Raises FileExistsError when `out` exists and is not empty: an export never overwrites."""
  if storage.exists(out) and (not storage.isdir(out) or storage.listdir(out)):
    raise FileExistsError(f"{out} already exists and is not empty; nothing was written. Choose "
                          "a new --out folder (or remove that one yourself)")


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


# ------------------------------------------------------------------------- reading a run
def read_run(workdir: str, include_head: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
  """The parts and metadata of a training workdir, for any export format.

  A fine-tuning run (config.json's trainer is "finetune") gives its best checkpoint with the
  classifier (and the first projection-head layer it classifies from, if any) and its
  results.json; any other run gives its newest checkpoint's encoder (and, with `include_head`,
  the projection head).

  Returns:
    (parts, metadata): parts is {"encoder": ..., ["head": ...], ["classifier": ...]} (numpy).

  Raises:
    FileNotFoundError: no config.json (not a workdir), or a fine-tuning run without best/.
    ValueError: the checkpoint has no encoder parameters.
  """
  from remedis_jax import checkpointing  # pylint: disable=g-import-not-at-top
  config_path = storage.join(workdir, RUN_CONFIG_FILE)
  if not storage.isfile(config_path):
    raise FileNotFoundError(
        f"{workdir} has no {RUN_CONFIG_FILE}: it is not a remedis-jax training workdir")
  config = storage.read_json(config_path)
  finetuned = config.get("trainer") == "finetune"
  if finetuned:
    best = storage.join(workdir, BEST_DIR)
    if not storage.isdir(best):
      raise FileNotFoundError(f"{workdir} is a fine-tuning run without a {BEST_DIR}/ checkpoint "
                              "(still running, preempted or failed); rerun it to the end first")
    params, step = checkpointing.load_params(best)
  else:
    params, step = checkpointing.load_params(workdir)
  if "encoder" not in params:
    raise ValueError(f"the checkpoint in {workdir} has no 'encoder' parameters; "
                     f"top-level keys are: {sorted(params)}")
  model_cfg, data_cfg = config["model"], config["data"]
  metadata = {
      "model_name": model_cfg["name"],
      "stem": model_cfg.get("stem", "bit"),
      "encoder_overrides": {},
      "head": None,
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
      "training_data": {k: data_cfg[k] for k in ("source", "path", "train_split", "task")
                        if data_cfg.get(k) not in (None, "")},
  }
  parts = {"encoder": params["encoder"]}
  if finetuned:
    parts["classifier"] = params["classifier"]
    head_width = int(model_cfg["head_hidden_dims"][0]) if model_cfg.get("from_head_layer") else 0
    if head_width:
      parts["head"] = params["head"]
    metadata["head"] = ({"hidden_dims": [head_width], "norm": model_cfg["head_norm"],
                         "first_layer_only": True} if head_width else None)
    metadata.update(_finetune_metadata(workdir))
  elif include_head:
    parts["head"] = params.get("head")
    metadata["head"] = {"hidden_dims": list(model_cfg["head_hidden_dims"]),
                        "projection_dim": model_cfg["projection_dim"],
                        "norm": model_cfg["head_norm"]}
  return parts, metadata


def _finetune_metadata(workdir: str) -> dict[str, Any]:
  """Task, classes, test metrics and labeled-subset size from a fine-tuning run's results.json."""
  path = storage.join(workdir, run_files.RESULTS_FILE)
  if not storage.isfile(path):
    raise FileNotFoundError(f"{workdir} has no {run_files.RESULTS_FILE}: the fine-tuning run has "
                            "not finished its final evaluation; rerun it to the end first")
  results = storage.read_json(path)
  task = results.get("task", {})
  run = results.get("config", {})
  return {
      "task": {"num_classes": task.get("num_classes"), "multi_label": task.get("multi_label"),
               "class_names": task.get("class_names"),
               "output": ("sigmoid per class" if task.get("multi_label") else "softmax")},
      "finetuning": {"init": run.get("init"), "mode": run.get("finetune_mode"),
                     "label_fraction": run.get("label_fraction"),
                     "num_train_labels": results.get("num_train_labels"),
                     "best": results.get("best"), "thresholds": results.get("thresholds")},
      "test_metrics": {name: entry.get("metrics", {})
                       for name, entry in results.get("test_sets", {}).items()},
  }


# ------------------------------------------------------------------------- the formats
def export_workdir(workdir: str, out: str, include_head: bool = False,
                   export_format: str = "orbax") -> dict[str, Any]:
  """Exports a training workdir in `export_format`; returns the metadata written.

  Raises:
    ValueError: unknown format; a model the format cannot hold (models.bit_timm.NoTimmTwinError
      for timm: ViTs and the small stems), named with the formats that can.
    FileExistsError: `out` already holds something (nothing is written).
  """
  check_format(export_format)
  if export_format == "orbax":
    if storage.exists(storage.join(out, METADATA_FILE)) or storage.exists(
        storage.join(out, PARAMS_DIR)):
      raise FileExistsError(f"{out} already holds an export; choose a new --out folder")
  else:
    check_new_folder(out)
  parts, metadata = read_run(workdir, include_head=include_head)
  metadata["export_format"] = export_format
  if export_format == "orbax":
    write_export(out, parts, metadata)
  elif export_format == "timm":
    write_timm_export(out, parts, metadata)
  else:
    from remedis_jax import export_savedmodel  # pylint: disable=g-import-not-at-top
    export_savedmodel.write_savedmodel_export(out, parts, metadata)
  return metadata


def timm_config(parts: dict[str, Any], metadata: dict[str, Any]) -> dict[str, Any]:
  """timm's config.json for an export: what `timm.create_model("local-dir:...")` reads.

  Raises:
    models.bit_timm.NoTimmTwinError: no timm twin (ViT, small stems, a projection-head layer
      before the classifier), with the formats that can hold the model.
  """
  from remedis_jax.models import bit_timm  # pylint: disable=g-import-not-at-top
  twin = bit_timm.timm_twin(metadata["model_name"], export_stem(metadata), parts["encoder"])
  if metadata.get("head") and "classifier" in parts:
    raise bit_timm.NoTimmTwinError(
        f"{metadata['pretraining']['workdir']} classifies from the first projection-head layer "
        "(config.model.from_head_layer=True); timm's head is a single linear layer, so it has "
        "no timm twin. Export it with --format=savedmodel or --format=orbax instead")
  if metadata.get("head"):
    raise bit_timm.NoTimmTwinError(
        "--include_head: the SimCLR projection head has no timm twin (timm's head is a "
        "classifier); export the encoder alone for timm, or the head with --format=savedmodel "
        "or --format=orbax")
  size, channels = metadata["input"]["image_size"], metadata["input"]["num_channels"]
  mean, std = TIMM_MEAN_STD
  num_classes = int(parts["classifier"]["bias"].shape[0]) if "classifier" in parts else 0
  config = {
      # None: no registered timm name has this structure (R_small, R_tiny, R_micro); build
      # timm.models.resnetv2.ResNetV2(**constructor) instead.
      "architecture": twin["architecture"],
      "num_classes": num_classes,
      "num_features": int(parts["encoder"]["norm_pre_head"]["scale"].shape[0]),
      "global_pool": "avg",
      "model_args": twin["model_args"],
      "pretrained_cfg": {
          "input_size": [channels, size, size], "fixed_input_size": False,
          "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
          "mean": [mean] * channels, "std": [std] * channels,
          "num_classes": num_classes, "first_conv": "stem.conv", "classifier": "head.fc",
      },
      "constructor": twin["constructor"],
      "remedis_jax": metadata,
  }
  class_names = (metadata.get("task") or {}).get("class_names")
  if num_classes and class_names:
    config["label_names"] = list(class_names)
  return config


def write_timm_export(out: str, parts: dict[str, Any], metadata: dict[str, Any]) -> None:
  """Writes model.safetensors + config.json for timm into the new folder `out`."""
  from remedis_jax.models import bit_timm  # pylint: disable=g-import-not-at-top
  check_new_folder(out)
  config = timm_config(parts, metadata)  # refuses a model without timm twin before writing
  state = bit_timm.to_timm_state_dict(parts["encoder"], parts.get("classifier"))
  with _new_folder(out) as partial:
    bit_timm.save_timm_safetensors(state, storage.join(partial, TIMM_WEIGHTS_FILE),
                                   {"remedis_jax": json.dumps(storage.json_safe(metadata),
                                                              sort_keys=True)})
    storage.write_text(storage.join(partial, TIMM_CONFIG_FILE),
                       json.dumps(storage.json_safe(config), indent=2, sort_keys=True))


class _new_folder:  # pylint: disable=invalid-name
  """Context manager: a sibling folder to write into, renamed to `out` when the block succeeds
  and removed when it fails, so that `out` holds a complete export or nothing."""

  def __init__(self, out: str):
    self.out = out.rstrip("/")
    self.partial = f"{self.out}.partial-{os.getpid()}"

  def __enter__(self) -> str:
    if storage.exists(self.partial):
      storage.rmtree(self.partial)
    storage.makedirs(self.partial)
    return self.partial

  def __exit__(self, error_type, error, traceback):
    if error_type is not None:
      storage.rmtree(self.partial)
      return False
    check_new_folder(self.out)  # nothing appeared there while we wrote
    if storage.exists(self.out):
      storage.rmtree(self.out)  # an empty folder (check_new_folder allows those)
    storage.rename(self.partial, self.out)
    return False


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags_ = flags.FLAGS
  metadata = export_workdir(flags_.workdir, flags_.out, include_head=flags_.include_head,
                            export_format=flags_.format)
  print(f"Exported {metadata['model_name']} (step {metadata['step']}) from {flags_.workdir} "
        f"to {flags_.out} as {flags_.format}")


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top,g-multiple-import
  flags.DEFINE_string("workdir", None, "Training workdir to export (pretraining or fine-tuning).",
                      required=True)
  flags.DEFINE_string("out", None, "Folder to write the export to (must not exist or be empty).",
                      required=True)
  # A plain string, checked by check_format: its error names every format and what it is for.
  flags.DEFINE_string("format", "orbax", f"One of {', '.join(FORMATS)}.")
  flags.DEFINE_bool("include_head", False,
                    "Also export a pretraining run's projection head (orbax, savedmodel).")
  app.run(main)
