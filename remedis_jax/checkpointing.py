"""Orbax checkpoints: train state and Grain iterator state saved together, atomically.

Layout of a workdir:
  checkpoints/<step>/state/...   the TrainState (params, optimiser state, step), sharded arrays
  checkpoints/<step>/data/...    one JSON per process with its Grain iterator position

Orbax writes every checkpoint into a temporary folder and renames it when all processes have
finished, so a crash or preemption during a save never corrupts the last good checkpoint: the
half-written folder is not a valid step and is ignored (and cleaned) on the next start.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

CHECKPOINT_SUBDIR = "checkpoints"


def make_manager(
    workdir: str,
    *,
    max_to_keep: int = 3,
    asynchronous: bool = True,
    with_data: bool = True,
) -> ocp.CheckpointManager:
  """Returns a CheckpointManager for `workdir/checkpoints`.

  Args:
    workdir: the run's folder (local path or any path Orbax understands, e.g. gs://).
    max_to_keep: how many recent checkpoints are kept.
    asynchronous: save in a background thread (the train loop only blocks while device arrays
      are copied to host memory).
    with_data: also manage the `data` item (the Grain iterator state).
  """
  directory = os.path.join(os.path.abspath(workdir) if "://" not in workdir else workdir,
                           CHECKPOINT_SUBDIR)
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      enable_async_checkpointing=asynchronous,
      create=True,
      cleanup_tmp_directories=True,
  )
  item_handlers = {"state": ocp.StandardCheckpointHandler()}
  if with_data:
    item_handlers["data"] = grain.checkpoint.CheckpointHandler()
  return ocp.CheckpointManager(directory, options=options, item_handlers=item_handlers)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator=None,
         *, force: bool = False) -> bool:
  """Saves `state` (and the iterator position) at `step`; returns whether a save started."""
  items = {"state": ocp.args.StandardSave(state)}
  if data_iterator is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
  return manager.save(step, args=ocp.args.Composite(**items), force=force)


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings: what Orbax restores onto."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _flatten_with_paths(tree: Any) -> dict[str, Any]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(path, simple=True, separator="/"): leaf for path, leaf in flat}


def check_compatible(saved: Any, expected: Any, *, what: str) -> None:
  """Raises a ValueError naming every parameter that differs between two trees.

  Args:
    saved: tree from a checkpoint's metadata (leaves with `.shape`).
    expected: abstract tree of the model being trained (leaves with `.shape`).
    what: a label for the error message (e.g. the checkpoint's path).
  """
  saved_flat = _flatten_with_paths(saved)
  expected_flat = _flatten_with_paths(expected)
  missing = sorted(set(expected_flat) - set(saved_flat))
  unexpected = sorted(set(saved_flat) - set(expected_flat))
  mismatched = [
      f"  {key}: checkpoint {tuple(saved_flat[key].shape)} vs model "
      f"{tuple(expected_flat[key].shape)}"
      for key in sorted(set(saved_flat) & set(expected_flat))
      if tuple(getattr(saved_flat[key], "shape", ())) != tuple(expected_flat[key].shape)
  ]
  if not (missing or unexpected or mismatched):
    return
  lines = [f"{what} does not match the model being trained:"]
  if missing:
    lines.append(f" missing in checkpoint ({len(missing)}): " + ", ".join(missing[:20])
                 + (" ..." if len(missing) > 20 else ""))
  if unexpected:
    lines.append(f" not in the model ({len(unexpected)}): " + ", ".join(unexpected[:20])
                 + (" ..." if len(unexpected) > 20 else ""))
  if mismatched:
    lines.append(f" shape mismatches ({len(mismatched)}):")
    lines.extend(mismatched[:20])
  lines.append("Use a fresh --workdir for a different model, or the matching config.")
  raise ValueError("\n".join(lines))


def restore_latest(
    manager: ocp.CheckpointManager,
    abstract_state: Any,
    data_iterator=None,
) -> tuple[Any, int] | None:
  """Restores the newest checkpoint onto `abstract_state` (with shardings), or returns None.

  The Grain iterator (if given) is restored in place to the saved position.

  Raises:
    ValueError: the checkpoint's parameter names or shapes differ from the model's.
  """
  step = manager.latest_step()
  if step is None:
    return None
  metadata = manager.item_metadata(step)
  saved_state = metadata["state"] if isinstance(metadata, Mapping) else metadata.state
  if saved_state is not None:
    check_compatible(saved_state, abstract_state,
                     what=f"checkpoint {manager.directory}/{step}")
  items = {"state": ocp.args.StandardRestore(abstract_state)}
  if data_iterator is not None:
    items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  logging.info("Restored checkpoint %s/%d", manager.directory, step)
  return restored["state"], step


def load_params(path: str) -> tuple[dict[str, Any], int]:
  """Reads the parameters of the newest checkpoint of a workdir (host numpy arrays).

  Used to initialise a new run from a finished pretraining run (`config.model.init=<workdir>`).

  Args:
    path: a workdir (containing `checkpoints/`) or its `checkpoints/` folder.

  Returns:
    (params, step): the params tree as nested dicts of numpy arrays, and the step it was saved at.

  Raises:
    FileNotFoundError: no finished checkpoint under `path`.
  """
  directory = os.path.abspath(path)  # Orbax's OCDBT reader rejects relative paths
  if os.path.isdir(os.path.join(directory, CHECKPOINT_SUBDIR)):
    directory = os.path.join(directory, CHECKPOINT_SUBDIR)
  if not os.path.isdir(directory):
    raise FileNotFoundError(
        f"{path} is neither a workdir with a '{CHECKPOINT_SUBDIR}/' folder nor an export folder")
  with ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(read_only=True),
      item_handlers={"state": ocp.PyTreeCheckpointHandler()}) as manager:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"no finished checkpoint in {directory}")
    metadata = manager.item_metadata(step)
    saved_state = metadata["state"] if isinstance(metadata, Mapping) else metadata.state
    # Restore as host numpy arrays: the caller places them on its own mesh.
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved_state)
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(restore_args=restore_args)))
  state = restored["state"]
  params = state["params"] if isinstance(state, Mapping) else state.params
  return params, step
