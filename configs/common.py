"""Pieces every config file shares: the data block, mesh, logging and checkpoint defaults."""

from __future__ import annotations

import ml_collections


def data_config(**overrides) -> ml_collections.ConfigDict:
  """The `config.data` block: the source keys plus the pipeline settings.

  Source keys (`source`, `path`, `root`, `manifest`, `image_column`, `label_columns`, ...) come
  from `data_pipelines.sources.default_data_config()`; see the README's "Bring your own data".
  """
  from data_pipelines import sources  # pylint: disable=g-import-not-at-top
  data = sources.default_data_config()
  with data.unlocked():
    data.preset = "cxr"           # augmentation preset (data_pipelines/presets.py)
    data.num_channels = 3         # grayscale is repeated to 3 channels for BiT
    data.skip_bad_records = False  # True: drop, count and log unreadable records
    data.worker_count = 0         # Grain worker processes (0: threads in this process)
    for key, value in overrides.items():
      data[key] = value
  return data


def mesh_config(data: int = -1, fsdp: int = 1) -> ml_collections.ConfigDict:
  """Device mesh: `data` x `fsdp` devices (-1: all remaining devices)."""
  return ml_collections.ConfigDict({"data": data, "fsdp": fsdp})


def parse_variant(arg: str | None, known: tuple[str, ...], default: str) -> str:
  variant = arg or default
  if variant not in known:
    raise ValueError(f"unknown config variant {variant!r}; known: {', '.join(known)}")
  return variant
