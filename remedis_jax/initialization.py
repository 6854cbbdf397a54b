"""Where a new run's encoder weights come from (`config.model.init`).

The resume order is spelled out in each trainer:
  1. a checkpoint in the run's own workdir (the run was interrupted: continue it exactly);
  2. `config.model.init`: a BiT `.npz` (REMEDIS stage 1), an export folder, or another run's
     workdir (e.g. fine-tuning from a SimCLR pretraining run: REMEDIS stage 3);
  3. otherwise random initialisation ("scratch").
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

from remedis_jax import checkpointing, export

SCRATCH = ("", "none", "scratch")


class LoadedInit(NamedTuple):
  """Parameters read from `config.model.init`, as host numpy arrays."""
  description: str
  encoder: dict[str, Any]
  head: dict[str, Any] | None


def load_init(init: str | None, model_name: str) -> LoadedInit | None:
  """Reads the encoder (and projection head, where present) named by `config.model.init`.

  Args:
    init: "" / "none" / "scratch", a BiT `.npz` path, an export folder, or a training workdir.
    model_name: the variant the run builds; a BiT file or export of another variant is an error.

  Returns:
    None for scratch, else the loaded parameters.

  Raises:
    FileNotFoundError: the path does not exist or holds nothing loadable.
    ValueError: the weights are for a different model variant.
  """
  if init is None or str(init).strip().lower() in SCRATCH:
    return None
  init = str(init)
  if init.endswith(".npz"):
    from remedis_jax.models import bit  # pylint: disable=g-import-not-at-top
    if not os.path.isfile(init):
      raise FileNotFoundError(f"config.model.init: BiT checkpoint {init} does not exist")
    name, params = bit.load_bit_npz(init, model_name=None, keep_head=False)
    if name != model_name:
      raise ValueError(f"config.model.init={init} holds BiT {name} weights, but "
                       f"config.model.name={model_name!r}; set config.model.name={name!r}")
    return LoadedInit(f"BiT weights {init}", params, None)
  if not os.path.exists(init):
    raise FileNotFoundError(f"config.model.init={init} does not exist (expected a BiT .npz, an "
                            "export folder with model.json, or a training workdir)")
  if export.is_export(init):
    metadata, params = export.load_export(init)
    if metadata["model_name"] != model_name:
      raise ValueError(f"config.model.init={init} is an export of {metadata['model_name']}, but "
                       f"config.model.name={model_name!r}")
    return LoadedInit(f"export {init} (step {metadata.get('step')})", params["encoder"],
                      params.get("head"))
  params, step = checkpointing.load_params(init)
  if "encoder" not in params:
    raise ValueError(f"config.model.init={init}: the checkpoint has no 'encoder' parameters; "
                     f"top-level keys are {sorted(params)}")
  return LoadedInit(f"workdir {init} (step {step})", params["encoder"], params.get("head"))
