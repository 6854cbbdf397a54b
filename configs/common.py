"""Pieces every config file shares: the data block, mesh, logging and checkpoint defaults."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import ml_collections


def data_config(**overrides) -> ml_collections.ConfigDict:
  """The `config.data` block: the source keys plus the pipeline settings.

  Source keys (`source`, `path`, `root`, `manifest`, `image_column`, `label_columns`, ...) come
  from `data_pipelines.sources.default_data_config()`; see docs/data.md.
  """
  from data_pipelines import sources  # pylint: disable=g-import-not-at-top
  data = sources.default_data_config()
  with data.unlocked():
    data.preset = "cxr"           # augmentation preset (data_pipelines/presets.py)
    data.num_channels = 3         # grayscale is repeated to 3 channels for BiT
    data.skip_bad_records = False  # True: drop, count and log unreadable records
    data.max_bad_record_share = 0.1  # ... but stop when more than this share of them is bad
    data.worker_count = 0         # Grain worker processes (0: threads in this process)
    for key, value in overrides.items():
      data[key] = value
  return data


def linear_probe_config(train_split: str = "train", eval_split: str = "val",
                        train_size: int = 2000) -> ml_collections.ConfigDict:
  """The end-of-pretraining linear probe (remedis_jax/evaluators/linear_probe.py).

  A logistic regression on frozen `pre_logits` of a stratified sample of `train_size` records of
  `train_split`, scored (macro AUC) on all of `eval_split`, beside a random encoder's. Switches
  itself off, with a log line, when the data has no such labeled splits.
  """
  return ml_collections.ConfigDict({
      "enabled": True, "train_split": train_split, "eval_split": eval_split,
      "train_size": train_size, "l2": 1.0, "seed": 0, "batch_size": 256})


def mesh_config(data: int = -1, fsdp: int = 1, devices: int = -1,
                dcn_data: int = 1) -> ml_collections.ConfigDict:
  """Device mesh: `data` x `fsdp` devices (-1: all remaining devices) out of `devices` (-1: all;
  N: the first N / processes devices of each process, e.g. 1 for a one-device run on a bigger
  host). A multi-slice job sets `dcn_data` to its number of slices: `data` x `fsdp` is then the
  mesh inside one slice, and data parallelism spans the slices (remedis_jax/sharding.py)."""
  return ml_collections.ConfigDict({"data": data, "fsdp": fsdp, "devices": devices,
                                    "dcn_data": dcn_data})


# Grain worker processes for the 224 px (paper-scale) configs. Decoding and augmenting is Python,
# per record: in reader threads it holds the GIL and stalls the step (docs/benchmarks.md: at
# 32 px two workers cut the input wait from 93 to 1 ms/step). At 224 px a host feeding 4-8
# accelerators needs many: 16 is a starting point; use the CPU cores a host can spare.
PAPER_SCALE_WORKERS = 16


def profile_config(first_step: int = 10, num_steps: int = 0) -> ml_collections.ConfigDict:
  """`config.profile`: a jax.profiler trace of `num_steps` steps from `first_step` (0 = off;
  remedis_jax/profiling.py)."""
  return ml_collections.ConfigDict({"first_step": first_step, "num_steps": num_steps})


def parse_variant(arg: str | None, known: tuple[str, ...], default: str) -> str:
  variant = arg or default
  if variant not in known:
    raise ValueError(f"unknown config variant {variant!r}; known: {', '.join(known)}")
  return variant


def override(config: ml_collections.ConfigDict,
             overrides: Mapping[str, Any] | Iterable[tuple[str, Any]], *,
             where: str = "overrides") -> ml_collections.ConfigDict:
  """Sets dotted keys (`"model.init"`, ...) on `config` in place and returns it.

  Raises:
    KeyError: a key the config lacks (`where` says whose overrides they were).
    TypeError: a value whose type does not fit the field.
  """
  items = overrides.items() if isinstance(overrides, Mapping) else overrides
  for key, value in items:
    node = config
    *parents, leaf = key.split(".")
    for i, parent in enumerate(parents):
      if parent not in node or not isinstance(node[parent], ml_collections.ConfigDict):
        raise KeyError(f"{where}: {key!r} is not a key of the base config "
                       f"({'.'.join(parents[:i + 1])!r} is not a config block)")
      node = node[parent]
    if leaf not in node:
      raise KeyError(f"{where}: {key!r} is not a key of the base config; known keys "
                     f"there: {', '.join(sorted(node.keys()))}")
    try:
      node[leaf] = value
    except TypeError as e:
      raise TypeError(f"{where}: {key}={value!r} does not fit the base config "
                      f"field ({e})") from None
  return config
