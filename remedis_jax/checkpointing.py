"""Orbax checkpoints: train state and Grain iterator state saved together, atomically.

Layout of a workdir:
  checkpoints/<step>/state/...   the TrainState (params, optimiser state, step), sharded arrays
  checkpoints/<step>/data/...    one JSON per process with its Grain iterator position

Orbax writes every checkpoint into a temporary folder and renames it when all processes have
finished, so a crash or preemption during a save never corrupts the last good checkpoint: the
half-written folder is not a valid step and is ignored (and cleaned) on the next start.

A finished checkpoint can still be damaged later (a file lost or cut short on disk). Resuming
then falls back, with a warning, to the newest step that can be read, and the damaged step
folder is moved aside to `<step>.damaged-<time>` (kept for inspection, never deleted; Orbax
ignores it), so that the run can save that step number again when it gets there. When no step
can be read the run stops with an error naming the folder and every step tried: it never
starts from scratch over existing checkpoints.

A save that fails (a full disk) stops the run with one `CheckpointSaveError` line naming the
step, the folder, the cause and the last good step. Orbax saves in background threads, each of
which logs the error with its traceback, and raises it only at the next save or wait: training
would go on until then, and the loop's clean-up would raise it again. Here the loop learns of
the failure at the step after it happened (`check_saves`, polled through
`preemption.PreemptionWatcher.reached`), the error is raised once, and the failed step's
partial folder is removed (the space it took lets the run's last log lines be written).
Older checkpoints are never removed by a failed save: Orbax deletes old steps only after the
new one is complete.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import time
from typing import Any, Mapping

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from data_pipelines import storage

CHECKPOINT_SUBDIR = "checkpoints"
DAMAGED_MARKER = ".damaged-"


class UnreadableCheckpointError(RuntimeError):
  """Every checkpoint step of a run exists but none can be read."""


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written (a full disk, ...); older checkpoints are kept."""


# What a full disk looks like by the time it reaches Python: OSError from Python writes,
# TensorStore's RESOURCE_EXHAUSTED text with the OS error code from the array writes.
_DISK_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
_DISK_FULL_TEXT = re.compile(r"No space left on device|Disk quota exceeded|"
                             r"os_error_code='(%d|%d)'" % (errno.ENOSPC, errno.EDQUOT))


def _disk_full(error: BaseException) -> str | None:
  """"no space left on device" (or the quota's words) when `error` or its cause is a full disk."""
  for _ in range(10):
    if isinstance(error, OSError) and error.errno in _DISK_FULL:
      return _DISK_FULL[error.errno]
    match = _DISK_FULL_TEXT.search(str(error))
    if match:
      quota = "quota" in match.group(0) or match.group(1) == str(errno.EDQUOT)
      return _DISK_FULL[errno.EDQUOT if quota else errno.ENOSPC]
    error = error.__cause__ or error.__context__
    if error is None:
      return None
  return None


class _FailedSaveNoise(logging.Filter):
  """Drops Orbax's error records with a traceback for a save that failed on a full disk.

  Three background threads log each such failure with its traceback; the failure reaches the
  train loop as one `CheckpointSaveError` that says it all. Other errors pass.
  """

  def filter(self, record):
    if record.levelno < logging.ERROR or f"{os.sep}orbax{os.sep}" not in record.pathname:
      return True
    error = record.exc_info[1] if record.exc_info else None
    return _disk_full(error if error is not None else Exception(record.getMessage())) is None


_FAILED_SAVE_NOISE = _FailedSaveNoise()


class Manager(ocp.CheckpointManager):
  """Orbax's CheckpointManager; a failed save raises one `CheckpointSaveError`.

  `save` and `wait_until_finished` raise it for the step that failed (the previous save's
  failure surfaces at the next save or wait, as in Orbax); `check_saves` finds it as soon as a
  background save has ended. Once it was raised, `wait_until_finished` (the loop's clean-up,
  `close`) returns without raising it again.
  """

  def __init__(self, *args, **kwargs):
    self._saving_step = None  # the step of the newest save started
    self._unchecked = False  # a save started and `check_saves` has not seen it end yet
    self.save_failure: CheckpointSaveError | None = None
    super().__init__(*args, **kwargs)

  def save(self, step: int, *args, **kwargs) -> bool:  # pylint: disable=arguments-differ
    if self.save_failure is not None:
      raise self.save_failure
    self.wait_until_finished()  # the previous save's failure names the previous step
    self._saving_step, self._unchecked = step, True
    try:
      return super().save(step, *args, **kwargs)
    except CheckpointSaveError:
      raise
    except Exception as error:  # pylint: disable=broad-except
      raise self._failed(step, error) from (None if _disk_full(error) else error)

  def wait_until_finished(self):
    if self.save_failure is not None:
      return
    try:
      super().wait_until_finished()
    except CheckpointSaveError:
      raise
    except Exception as error:  # pylint: disable=broad-except
      raise self._failed(self._saving_step, error) from (None if _disk_full(error) else error)

  def check_saves(self) -> None:
    """Raises CheckpointSaveError once the newest background save has ended in failure.

    While a save runs this reads one flag; when it has ended, it waits on it once.
    """
    if self._unchecked and not self.is_saving_in_progress():
      self._unchecked = False
      self.wait_until_finished()

  def _failed(self, step: int | None, error: BaseException) -> CheckpointSaveError:
    """The one error for a failed save; removes the step's partial (temporary) folder."""
    cause = _disk_full(error)
    if jax.process_index() == 0 and step is not None:
      for partial in epath.Path(self.directory).glob(f"{step}.orbax-checkpoint-tmp*"):
        try:
          partial.rmtree()
        except OSError as e:
          logging.warning("Could not remove the partial checkpoint %s (%s)", partial, e)
    try:
      # From disk: Orbax's own list already lacks the steps it meant to delete after this save.
      self.reload()
    except Exception:  # pylint: disable=broad-except
      pass  # the list in memory then; the message is what matters here
    good = [s for s in self.all_steps() if s != step]
    last_good = (f"the last good checkpoint is step {max(good)}" if good else
                 "there is no earlier checkpoint")
    what = f"saving step {step} to {self.directory} failed"
    if cause:
      message = f"{what}: {cause}; {last_good}; free space and rerun"
    else:
      message = f"{what}: {_describe(error)}; {last_good}; fix the cause and rerun"
    self.save_failure = CheckpointSaveError(message)
    return self.save_failure


def check_saves(manager: ocp.CheckpointManager) -> None:
  """Raises CheckpointSaveError when a background save of `manager` has failed.

  Cheap enough for every step; a manager not made by `make_manager` is not checked.
  """
  if isinstance(manager, Manager):
    manager.check_saves()


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
  directory = storage.join(storage.absolute(workdir), CHECKPOINT_SUBDIR)
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      enable_async_checkpointing=asynchronous,
      create=True,
      cleanup_tmp_directories=True,
  )
  item_handlers = {"state": ocp.StandardCheckpointHandler()}
  if with_data:
    item_handlers["data"] = grain.checkpoint.CheckpointHandler()
    item_handlers["counters"] = ocp.JsonCheckpointHandler()
  absl_logger = logging.getLogger("absl")  # Orbax logs through absl
  if _FAILED_SAVE_NOISE not in absl_logger.filters:
    absl_logger.addFilter(_FAILED_SAVE_NOISE)
  return Manager(directory, options=options, item_handlers=item_handlers)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator=None,
         *, counters: Mapping[str, Any] | None = None, force: bool = False) -> bool:
  """Saves `state` (and the iterator position) at `step`; returns whether a save started.

  `counters`: small JSON run totals that must survive a resume (e.g. skipped bad records).
  """
  items = {"state": ocp.args.StandardSave(state)}
  if data_iterator is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
  if counters is not None:
    items["counters"] = ocp.args.JsonSave(dict(counters))
  return manager.save(step, args=ocp.args.Composite(**items), force=force)


def read_counters(manager: ocp.CheckpointManager, step: int | None) -> dict[str, Any]:
  """The run totals saved with `step` ({} for none, or a checkpoint from before they existed)."""
  if step is None or "counters" not in manager.item_metadata(step):
    return {}
  restored = manager.restore(step, args=ocp.args.Composite(counters=ocp.args.JsonRestore()))
  return dict(restored["counters"] or {})


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


def _describe(error: BaseException) -> str:
  """One line for a log: the root cause's type and message, without TensorStore's spec dump.

  Orbax wraps TensorStore's error ("Truncated Zstd-compressed stream", "NOT_FOUND ... local
  file ...") in an Exception whose own message is a spec dump, so the innermost cause is shown.
  """
  for _ in range(10):
    cause = error.__cause__ or error.__context__
    if cause is None:
      break
    error = cause
  text = re.sub(r"\s*\[(tensorstore_spec|source locations)='.*?'\]", "", str(error))
  text = " ".join(text.split())
  return f"{type(error).__name__}: {text[:500]}{' ...' if len(text) > 500 else ''}"


def _all_processes_ok(ok: bool) -> bool:
  """True when `ok` on every process: all processes fall back to the same step together."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


class _Damaged(Exception):
  """Wraps whatever Orbax / TensorStore raised for a step that cannot be read."""

  def __init__(self, error: BaseException):
    super().__init__(_describe(error))
    self.error = error


def _restore_step(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
                  data_iterator) -> Any:
  """Restores one step (state and iterator together); a mismatched model raises ValueError."""
  try:
    metadata = manager.item_metadata(step)
    saved_state = metadata["state"] if isinstance(metadata, Mapping) else metadata.state
  except Exception as e:  # pylint: disable=broad-except
    raise _Damaged(e) from e
  if saved_state is not None:  # Outside the try: a different model is not a damaged checkpoint.
    check_compatible(saved_state, abstract_state, what=f"checkpoint {manager.directory}/{step}")
  items = {"state": ocp.args.StandardRestore(abstract_state)}
  other_topology = None
  if data_iterator is not None:
    other_topology = _iterator_file_of_other_topology(manager, step)
    if other_topology is None:
      # The iterator position of the same step: restored in one call with the state, and a step
      # whose iterator file is unreadable is damaged as a whole. A failed attempt may have moved
      # the iterator; the successful one sets its whole state again.
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
  try:
    state = manager.restore(step, args=ocp.args.Composite(**items))["state"]
    if other_topology is not None:
      # Saved by another number of processes: every process saved the same global stream
      # position, so any one file serves; the pipeline continues from that position
      # (data_pipelines/stream.py) and logs how it adapted.
      logging.info("Checkpoint %s/%d was saved by another number of processes; continuing the "
                   "data stream from %s", manager.directory, step, other_topology)
      data_iterator.set_state(json.loads(other_topology.read_text()))
    return state
  except Exception as e:  # pylint: disable=broad-except
    raise _Damaged(e) from e


def _iterator_file_of_other_topology(manager: ocp.CheckpointManager, step: int):
  """The iterator file a run with another process count saved at `step`; None when this
  process's own file (`data/process_<i>-of-<n>.json`) exists or the step has no data item."""
  folder = epath.Path(manager.directory) / str(step) / "data"
  own = folder / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
  if own.exists() or not folder.exists():
    return None
  saved = sorted(folder.glob("process_*-of-*.json"))
  return saved[0] if saved else None


def move_aside(manager: ocp.CheckpointManager, step: int) -> str | None:
  """Renames the step's folder to `<step>.damaged-<time>`; returns the new path (or None).

  The folder is kept (for inspection or a manual restore), Orbax no longer lists it as a step,
  and the run can save this step number again. Process 0 renames; every process then re-reads
  the step list.
  """
  source = epath.Path(manager.directory) / str(step)
  name = f"{step}{DAMAGED_MARKER}{time.strftime('%Y%m%d-%H%M%S')}"
  target = epath.Path(manager.directory) / name
  for suffix in range(1, 100):
    if not target.exists():
      break
    target = epath.Path(manager.directory) / f"{name}-{suffix}"
  moved = None
  if jax.process_index() == 0:
    try:
      source.rename(target)
      moved = str(target)
      logging.warning("Moved the damaged checkpoint %s aside to %s (kept, not deleted)",
                      source, target)
    except Exception as e:  # pylint: disable=broad-except
      logging.error("Could not move the damaged checkpoint %s aside (%s): move or delete it "
                    "before the run saves step %d again", source, _describe(e), step)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f"remedis_move_aside_{step}")
  manager.reload()
  return moved


def restore_latest(
    manager: ocp.CheckpointManager,
    abstract_state: Any,
    data_iterator=None,
) -> tuple[Any, int] | None:
  """Restores the newest readable checkpoint onto `abstract_state` (with shardings).

  Steps are tried newest first. A step that cannot be read (a missing, truncated or corrupt
  file: TensorStore, Orbax or Grain errors) is logged as a warning naming its folder and the
  error, and the next newest is tried; once one is restored the damaged newer steps are moved
  aside (`move_aside`) so that training can save their step numbers again. The Grain iterator
  (if given) is restored in place to the position saved with the same step.

  Returns:
    (state, step), or None when the manager has no checkpoint at all.

  Raises:
    ValueError: the checkpoint's parameter names or shapes differ from the model's.
    UnreadableCheckpointError: checkpoints exist but none can be read (nothing is moved or
      deleted then: the cause may be the environment rather than the files).
  """
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    return None
  failures = []
  for step in steps:
    try:
      state = _restore_step(manager, step, abstract_state, data_iterator)
      error = None
    except _Damaged as damaged:
      state, error = None, damaged
    if not _all_processes_ok(error is None):
      why = str(error) if error is not None else "unreadable on another process"
      failures.append((step, why))
      logging.warning("Checkpoint %s/%d cannot be read (%s); trying the next newest step",
                      manager.directory, step, why)
      continue
    for damaged_step, _ in failures:
      move_aside(manager, damaged_step)
    if failures:
      logging.warning("Resumed from checkpoint %s/%d, the newest readable one; damaged newer "
                      "steps: %s", manager.directory, step,
                      ", ".join(str(s) for s, _ in failures))
    else:
      logging.info("Restored checkpoint %s/%d", manager.directory, step)
    return state, step
  raise UnreadableCheckpointError(
      f"no checkpoint in {manager.directory} can be read; tried steps "
      f"{', '.join(str(s) for s in steps)} (newest first):\n"
      + "\n".join(f"  step {s}: {why}" for s, why in failures)
      + "\nNothing was moved or deleted. Check that the files are intact and readable (disk, "
      "permissions, the same library versions); to start over instead, use a fresh --workdir "
      "or move the checkpoints folder away.")


class _ReadOnlyNoise(logging.Filter):
  """Drops Orbax's warnings that a read-only load of the state alone always causes.

  Every `load_params` (each fine-tuning run that starts from a workdir) logged seven of them:
  the read-only manager's adjusted options, and the "data" and "counters" items it does not
  read, twice each. Anything else Orbax warns about passes.
  """

  NOISE = re.compile(r"CheckpointManagerOptions\.read_only=True|Given directory is read only"
                     r"|Item \"(data|counters)\" was found in the checkpoint, but could not be "
                     r"restored")

  def filter(self, record):
    return not self.NOISE.search(record.getMessage())


def load_params(path: str) -> tuple[dict[str, Any], int]:
  """Reads the parameters of the newest checkpoint of a workdir (host numpy arrays).

  Used to initialise a new run from a finished pretraining run (`config.model.init=<workdir>`).

  Args:
    path: a workdir (containing `checkpoints/`) or its `checkpoints/` folder.

  Returns:
    (params, step): the params tree as nested dicts of numpy arrays, and the step it was saved at.

  A damaged newest step (a file lost or cut short) is skipped with a warning naming it, and the
  next newest is read; nothing in `path` is moved or changed (it may be another run's workdir).

  Raises:
    FileNotFoundError: no finished checkpoint under `path`.
    UnreadableCheckpointError: checkpoints exist but none can be read.
  """
  directory = storage.absolute(path)  # Orbax's OCDBT reader rejects relative paths
  if storage.isdir(storage.join(directory, CHECKPOINT_SUBDIR)):
    directory = storage.join(directory, CHECKPOINT_SUBDIR)
  if not storage.isdir(directory):
    raise FileNotFoundError(
        f"{path} is neither a workdir with a '{CHECKPOINT_SUBDIR}/' folder nor an export folder")
  absl_logger, noise = logging.getLogger("absl"), _ReadOnlyNoise()  # Orbax logs through absl
  absl_logger.addFilter(noise)
  try:
    return _load_params(directory)
  finally:
    absl_logger.removeFilter(noise)


def _load_params(directory: str) -> tuple[dict[str, Any], int]:
  with ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(read_only=True),
      item_handlers={"state": ocp.PyTreeCheckpointHandler()}) as manager:
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"no finished checkpoint in {directory}")
    failures = []
    for step in steps:
      try:
        metadata = manager.item_metadata(step)
        saved_state = metadata["state"] if isinstance(metadata, Mapping) else metadata.state
        # Restore as host numpy arrays: the caller places them on its own mesh.
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                    saved_state)
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(restore_args=restore_args)))
      except Exception as e:  # pylint: disable=broad-except
        failures.append((step, _describe(e)))
        logging.warning("Checkpoint %s/%d cannot be read (%s); trying the next older step",
                        directory, step, failures[-1][1])
        continue
      state = restored["state"]
      params = state["params"] if isinstance(state, Mapping) else state.params
      if failures:
        logging.warning("Read %s/%d, the newest readable step; skipped damaged steps %s",
                        directory, step, ", ".join(str(s) for s, _ in failures))
      return params, step
  raise UnreadableCheckpointError(
      f"no checkpoint in {directory} can be read; tried steps "
      f"{', '.join(str(s) for s in steps)} (newest first):\n"
      + "\n".join(f"  step {s}: {why}" for s, why in failures))
