"""Checkpoints: train state + Grain iterator together, atomicity, clear mismatch errors, export."""

import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from remedis_jax import checkpointing, export


def _state(seed=0):
  rng = np.random.default_rng(seed)
  return {"step": jnp.asarray(7, jnp.int32),
          "params": {"encoder": {"conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)),
                                                                jnp.float32)}},
                     "head": {"bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}}}


def _iterator():
  return iter(grain.MapDataset.range(100).seed(3).shuffle().batch(4).to_iter_dataset())


def test_state_and_iterator_round_trip(tmp_path):
  state = _state()
  it = _iterator()
  for _ in range(3):
    next(it)
  manager = checkpointing.make_manager(str(tmp_path), asynchronous=True)
  checkpointing.save(manager, 3, state, it, force=True)
  manager.wait_until_finished()
  expected_next = [next(it) for _ in range(2)]

  fresh = _iterator()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                         sharding=x.sharding), state)
  manager = checkpointing.make_manager(str(tmp_path))
  restored, step = checkpointing.restore_latest(manager, abstract, fresh)
  assert step == 3
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  for batch in expected_next:
    np.testing.assert_array_equal(next(fresh), batch)


def test_iterator_saved_by_another_process_count_is_restored(tmp_path, caplog):
  """A checkpoint written by 2 processes resumes on 1: the iterator file of another topology is
  read (the pipeline's state is the global stream position, data_pipelines/stream.py)."""
  state = _state()
  it = _iterator()
  for _ in range(3):
    next(it)
  manager = checkpointing.make_manager(str(tmp_path))
  checkpointing.save(manager, 3, state, it, force=True)
  manager.wait_until_finished()
  expected_next = [next(it) for _ in range(2)]
  data = tmp_path / "checkpoints" / "3" / "data"
  (data / "process_0-of-1.json").rename(data / "process_1-of-2.json")

  fresh = _iterator()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                         sharding=x.sharding), state)
  with caplog.at_level("INFO"):
    restored, step = checkpointing.restore_latest(checkpointing.make_manager(str(tmp_path)),
                                                  abstract, fresh)
  assert step == 3 and "another number of processes" in caplog.text
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  for batch in expected_next:
    np.testing.assert_array_equal(next(fresh), batch)


def test_interrupted_save_leaves_last_good_checkpoint(tmp_path):
  manager = checkpointing.make_manager(str(tmp_path), asynchronous=False, with_data=False)
  checkpointing.save(manager, 1, _state(1), force=True)
  manager.close()
  # What a process killed in the middle of writing step 2 leaves behind.
  partial = tmp_path / checkpointing.CHECKPOINT_SUBDIR / "2.orbax-checkpoint-tmp-1234"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "half_written").write_bytes(b"\x00" * 10)
  manager = checkpointing.make_manager(str(tmp_path), with_data=False)
  assert manager.latest_step() == 1
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          _state(1))
  restored, step = checkpointing.restore_latest(manager, abstract)
  assert step == 1
  jax.tree.map(np.testing.assert_array_equal, restored, _state(1))


def test_mismatched_checkpoint_names_keys_and_shapes(tmp_path):
  manager = checkpointing.make_manager(str(tmp_path), asynchronous=False, with_data=False)
  checkpointing.save(manager, 1, _state(), force=True)
  manager.close()
  other = _state()
  other["params"]["encoder"]["conv"]["kernel"] = jnp.zeros((3, 3, 2, 8))
  other["params"]["probe"] = {"kernel": jnp.zeros((4, 2))}
  del other["params"]["head"]
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          other)
  manager = checkpointing.make_manager(str(tmp_path), with_data=False)
  with pytest.raises(ValueError) as error:
    checkpointing.restore_latest(manager, abstract)
  message = str(error.value)
  assert "params/encoder/conv/kernel: checkpoint (3, 3, 2, 4) vs model (3, 3, 2, 8)" in message
  assert "params/probe/kernel" in message and "params/head/bias" in message


def test_load_params_reads_newest_checkpoint(tmp_path, monkeypatch):
  manager = checkpointing.make_manager(str(tmp_path), asynchronous=False, with_data=False)
  checkpointing.save(manager, 1, _state(1), force=True)
  checkpointing.save(manager, 5, _state(5), force=True)
  manager.close()
  params, step = checkpointing.load_params(str(tmp_path))
  assert step == 5
  np.testing.assert_array_equal(params["head"]["bias"], np.asarray(_state(5)["params"]["head"]["bias"]))
  with pytest.raises(FileNotFoundError, match="neither a workdir"):
    checkpointing.load_params(str(tmp_path / "nothing"))
  # A relative workdir (what `make quickstart` passes) reads the same checkpoint.
  monkeypatch.chdir(tmp_path.parent)
  params_rel, step_rel = checkpointing.load_params(tmp_path.name)
  assert step_rel == 5
  np.testing.assert_array_equal(params_rel["head"]["bias"], params["head"]["bias"])


def test_export_round_trip_and_no_overwrite(tmp_path):
  params = jax.tree.map(np.asarray, _state()["params"])
  out = str(tmp_path / "export")
  export.write_export(out, params, {"model_name": "R_micro", "input": {"image_size": 32}})
  assert export.is_export(out)
  metadata, loaded = export.load_export(out)
  assert metadata["model_name"] == "R_micro" and metadata["parts"] == ["encoder", "head"]
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  with pytest.raises(FileExistsError):
    export.write_export(out, params, {"model_name": "R_micro"})
  with pytest.raises(FileNotFoundError, match="has no model.json"):
    export.load_export(str(tmp_path))


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _data_files(step_dir):
  """The array data files of a step (what TensorStore reads), found by walking the folder."""
  return sorted(os.path.join(root, name) for root, _, names in os.walk(step_dir)
                for name in names if os.path.basename(root) == "d")


def test_damaged_latest_checkpoint_falls_back_to_the_newest_readable(tmp_path, caplog):
  # Once: one data file deleted in the newest step, and every rerun died in TensorStore.
  batches = list(_iterator())
  it = _iterator()
  manager = checkpointing.make_manager(str(tmp_path), asynchronous=False)
  for step in (1, 2, 3):
    next(it)
    checkpointing.save(manager, step, _state(step), it, force=True)
  manager.close()
  directory = tmp_path / checkpointing.CHECKPOINT_SUBDIR
  files = _data_files(directory / "3")
  assert files
  os.remove(files[0])

  fresh = _iterator()
  manager = checkpointing.make_manager(str(tmp_path), asynchronous=False)
  with caplog.at_level("WARNING"):
    restored, step = checkpointing.restore_latest(manager, _abstract(_state()), fresh)
  assert step == 2
  jax.tree.map(np.testing.assert_array_equal, restored, _state(2))
  np.testing.assert_array_equal(next(fresh), batches[2])  # The iterator of the same step.
  log = caplog.text
  assert f"Checkpoint {directory}/3 cannot be read" in log and "ValueError" in log
  assert f"Resumed from checkpoint {directory}/2, the newest readable one" in log
  # Kept for inspection, but no longer a step: the run can save step 3 again.
  damaged = [name for name in os.listdir(directory) if name.startswith("3.damaged-")]
  assert len(damaged) == 1 and not (directory / "3").exists()
  assert len(_data_files(directory / damaged[0])) == len(files) - 1
  assert manager.all_steps() == [1, 2]
  assert checkpointing.save(manager, 3, _state(30), fresh)
  manager.wait_until_finished()
  for step in (4, 5, 6):  # Past max_to_keep: Orbax's clean-up leaves the damaged folder alone.
    checkpointing.save(manager, step, _state(step), fresh, force=True)
  manager.close()
  assert (directory / damaged[0]).is_dir()

  manager = checkpointing.make_manager(str(tmp_path), asynchronous=False)
  assert manager.all_steps() == [4, 5, 6]
  caplog.clear()
  with caplog.at_level("WARNING"):
    restored, step = checkpointing.restore_latest(manager, _abstract(_state()), _iterator())
  assert step == 6 and "cannot be read" not in caplog.text
  jax.tree.map(np.testing.assert_array_equal, restored, _state(6))
  manager.close()


def test_load_params_skips_a_damaged_newest_step_and_changes_nothing(tmp_path, caplog):
  """Initialising from a workdir (config.model.init, export) whose newest step lost a file."""
  manager = checkpointing.make_manager(str(tmp_path), asynchronous=False)
  for step in (1, 2):
    checkpointing.save(manager, step, _state(step), force=True)
  manager.close()
  directory = tmp_path / checkpointing.CHECKPOINT_SUBDIR
  os.remove(_data_files(directory / "2")[0])
  before = sorted(os.listdir(directory))
  with caplog.at_level("WARNING"):
    params, step = checkpointing.load_params(str(tmp_path))
  assert step == 1 and "skipped damaged steps 2" in caplog.text
  # Orbax's warnings about a read-only load of the state alone are dropped, ours are not.
  assert "read_only" not in caplog.text and "read only" not in caplog.text
  assert "could not be restored" not in caplog.text
  jax.tree.map(np.testing.assert_array_equal, params,
               jax.tree.map(np.asarray, _state(1)["params"]))
  assert sorted(os.listdir(directory)) == before  # another run's workdir: nothing moved
  os.remove(_data_files(directory / "1")[0])
  with pytest.raises(checkpointing.UnreadableCheckpointError, match="tried steps 2, 1"):
    checkpointing.load_params(str(tmp_path))


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
  manager = checkpointing.make_manager(str(tmp_path), asynchronous=False, with_data=False)
  for step in (1, 2, 3):
    checkpointing.save(manager, step, _state(step), force=True)
  manager.close()
  directory = tmp_path / checkpointing.CHECKPOINT_SUBDIR
  for step in (1, 2, 3):
    for path in _data_files(directory / str(step)):
      os.remove(path)
  manager = checkpointing.make_manager(str(tmp_path), with_data=False)
  with pytest.raises(checkpointing.UnreadableCheckpointError) as error:
    checkpointing.restore_latest(manager, _abstract(_state()))
  message = str(error.value)
  assert f"no checkpoint in {directory} can be read; tried steps 3, 2, 1" in message
  assert "step 1: ValueError" in message and "Nothing was moved or deleted" in message
  assert sorted(os.listdir(directory)) == ["1", "2", "3"]
