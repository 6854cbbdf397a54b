"""A workdir's record of its run (WORKDIR/config.json): checked before a resume, kept on change.

Why. Every trainer resumes whatever run its workdir holds, and `export`, `distillation` and the
result tables read WORKDIR/config.json to know what that run is (model, stem, resolution,
labels). When a rerun with another config overwrote that file before its restore failed (or,
worse, succeeded on same-shaped weights), the workdir said R_micro while it held R_tiny weights,
and an export rebuilt the wrong architecture. So, before anything is written:

* the new config is compared with the workdir's config.json, key by key (dotted names);
* a change in a key that decides what the checkpoint holds -- the architecture (`model.*` but
  its compute dtype and rematerialisation), the input resolution and channels, the objective,
  and for the supervised trainers the data, labels and labeled subset -- is refused with an
  `IncompatibleRunConfigError` naming the workdir, each key with its old and new value, and the
  fix (a new --workdir);
* any other change (steps, batch size, learning rate, intervals, ...) is allowed: the earlier
  file is kept as config.<UTC time>.json beside the new one and a warning names each changed key
  as old -> new;
* config.json is written only after that check (fresh start or allowed resume), by process 0.

A config.json that is not a JSON object (truncated, corrupt) is an error naming the file: the
run's record is damaged, and guessing would lose it.
"""

from __future__ import annotations

import datetime
import fnmatch
import json
import logging
from typing import Any, Iterable, Mapping, NamedTuple

import jax

from data_pipelines import storage

from remedis_jax import export

RUN_CONFIG_FILE = export.RUN_CONFIG_FILE  # "config.json"

# Keys whose change makes a workdir's checkpoint another run's; fnmatch patterns over dotted
# names. `model.*`: the architecture and the weights it started from (name, stem, heads, decoder,
# init); the trainer (objective), the resolution and the channels the encoder was trained on;
# the clustering prototypes and queue live in the checkpointed state.
PRETRAINING_INCOMPATIBLE = ("trainer", "model.*", "data.image_size", "data.num_channels",
                            "cluster.num_prototypes", "cluster.queue_size")
# Fine-tuning and segmentation: also which records, labels and labeled subset the weights were
# fitted to (a changed split or subset would put validation or test images into training), the
# teacher a student is distilled from, and linear evaluation vs full fine-tuning. The data's
# location (data.path, root, manifest, data_dir) may change: data moved to a local disk or
# another bucket is the same data; it is reported as an allowed change.
SUPERVISED_INCOMPATIBLE = PRETRAINING_INCOMPATIBLE + (
    "finetune_mode", "freeze_encoder", "distill.teacher",
    "data.source", "data.tfds_name", "data.task", "data.seed", "data.num_examples.train",
    "data.sites.train", "data.label_columns", "data.label_key", "data.classes",
    "data.mask_column", "data.image_column", "data.patient_column", "data.split_column",
    "data.split_fractions", "data.split_seed", "data.train_split",
    "label_fraction", "label_fraction_seed", "label_fraction_stratify")
# How the model is computed, not what it is: never a reason to refuse.
ALWAYS_ALLOWED = ("model.dtype", "model.remat")


class IncompatibleRunConfigError(ValueError):
  """The workdir holds a run whose config differs in keys that decide what its checkpoint is."""


class Change(NamedTuple):
  key: str  # dotted name, e.g. "model.name"
  old: Any  # the value in the workdir's config.json (MISSING: the key was not there)
  new: Any  # the value in the new config (MISSING: the key is not there)


MISSING = "<absent>"


def to_json_text(config) -> str:
  """The exact text config.json gets: sorted keys, tuples as lists, other objects as str."""
  tree = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  return json.dumps(tree, indent=2, sort_keys=True, default=str)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{"model": {"name": "R50x1"}} -> {"model.name": "R50x1"}; lists are values."""
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping) and value:
      flat.update(flatten(value, name + "."))
    else:
      flat[name] = value
  return flat


def is_incompatible(key: str, incompatible: Iterable[str]) -> bool:
  if any(fnmatch.fnmatchcase(key, pattern) for pattern in ALWAYS_ALLOWED):
    return False
  return any(fnmatch.fnmatchcase(key, pattern) for pattern in incompatible)


def compare(old: Mapping[str, Any], new: Mapping[str, Any],
            incompatible: Iterable[str]) -> tuple[list[Change], list[Change]]:
  """(refused, allowed): the keys that differ between two config trees, sorted by name.

  A refused change is a key in `incompatible` present in both configs with different values.
  A key present in only one of them is an allowed change: an old workdir predates a key added
  since (and a different trainer, whose keys differ, is refused by `trainer`).
  """
  incompatible = tuple(incompatible)
  old_flat, new_flat = flatten(old), flatten(new)
  refused, allowed = [], []
  for key in sorted(set(old_flat) | set(new_flat)):
    before, after = old_flat.get(key, MISSING), new_flat.get(key, MISSING)
    if before == after:
      continue
    both = key in old_flat and key in new_flat
    (refused if both and is_incompatible(key, incompatible) else allowed).append(
        Change(key, before, after))
  return refused, allowed


def read(workdir: str) -> dict[str, Any] | None:
  """The workdir's config.json as a dict; None: there is none.

  Raises:
    ValueError: the file is not a JSON object (truncated or corrupt), naming it.
  """
  path = storage.join(workdir, RUN_CONFIG_FILE)
  if not storage.exists(path):
    return None
  try:
    tree = json.loads(storage.read_bytes(path).decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(
        f"{path} is not valid JSON ({e}): the record of the run in {workdir} is damaged, so "
        "this run cannot tell whether it may resume there. Restore the file (an earlier copy "
        f"may lie beside it as config.<time>.json) or use a new --workdir.") from None
  if not isinstance(tree, dict):
    raise ValueError(f"{path} holds a JSON {type(tree).__name__}, not a config object: the "
                     f"record of the run in {workdir} is damaged. Restore the file or use a new "
                     "--workdir.")
  return tree


def _describe(changes: list[Change]) -> str:
  return "\n".join(f"  {c.key}: {c.old!r} -> {c.new!r}" for c in changes)


def check(config, workdir: str, incompatible: Iterable[str]) -> list[Change]:
  """The allowed changes from the workdir's config.json to `config` ([] for a fresh workdir).

  Writes nothing.

  Raises:
    IncompatibleRunConfigError: a key in `incompatible` (fnmatch patterns) differs.
    ValueError: the existing config.json is unreadable (see `read`).
  """
  old = read(workdir)
  if old is None:
    return []
  refused, allowed = compare(old, json.loads(to_json_text(config)), incompatible)
  if refused:
    raise IncompatibleRunConfigError(
        f"{workdir} holds a run whose config ({storage.join(workdir, RUN_CONFIG_FILE)}) differs "
        "from this one in keys that decide what its checkpoint holds (workdir's value -> this "
        f"config's):\n{_describe(refused)}\nResuming would continue (and export) one run under "
        "the other's record. Use a new --workdir for this config, or rerun with the workdir's "
        "own values. Nothing in the workdir was changed.")
  return allowed


def _backup_path(workdir: str) -> str:
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
  path, n = storage.join(workdir, f"config.{stamp}.json"), 1
  while storage.exists(path):  # Two resumes within a second.
    path, n = storage.join(workdir, f"config.{stamp}-{n}.json"), n + 1
  return path


def write(config, workdir: str, incompatible: Iterable[str]) -> list[Change]:
  """Checks `config` against the workdir's config.json (`check`), then writes it there.

  On an allowed change the earlier file is first kept as config.<UTC time>.json and a warning
  names each changed key. Every process checks (so all of them refuse alike); process 0 writes.

  Returns:
    The allowed changes ([] for a fresh workdir or an unchanged config).

  Raises:
    What `check` raises; nothing is written then.
  """
  changes = check(config, workdir, incompatible)
  if jax.process_index() != 0:
    return changes
  path = storage.join(workdir, RUN_CONFIG_FILE)
  text = to_json_text(config)
  if changes:
    backup = _backup_path(workdir)
    storage.write_bytes(backup, storage.read_bytes(path))
    logging.warning("%s: resuming with a changed config; the earlier one is kept as %s. "
                    "Changed keys (old -> new):\n%s", workdir, backup, _describe(changes))
  elif storage.exists(path) and storage.read_text(path) == text:
    return changes  # Unchanged: the file (and its time stamp) stay as they are.
  storage.makedirs(workdir)
  storage.write_text(path, text)
  return changes
