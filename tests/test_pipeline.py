"""Grain pipelines: process slices, seeding, exact resume (incl. Orbax), eval padding, bad records.

The topology rule itself (P processes give the one-process global batches) is in
tests/test_data_topology.py.
"""
import logging

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from data_pipelines import pipeline, stream
from data_pipelines.errors import BadRecordError
from tests import fakes
from tests.fakes import with_options

_OPS = "random_resized_crop(16, area=(0.3, 1.0))|flip_lr|color_jitter(brightness=0.4, contrast=0.4, p=0.8)"
_EVAL_OPS = "resize_small(16)|central_crop(16)"


def _pretrain(source, **kwargs):
  defaults = dict(batch_size=4, ops=_OPS, seed=0, shard_index=0, shard_count=1)
  return pipeline.make_pretrain_dataset(source, **with_options({**defaults, **kwargs}))


def test_pretrain_batch_format():
  batch = next(iter(_pretrain(fakes.IndexSource(10), num_views=3)))
  assert set(batch) == {"views", "label", "site", "skipped_records"}
  assert batch["views"].shape == (4, 3, 16, 16, 3) and batch["views"].dtype == np.uint8
  assert batch["label"].dtype == np.int32 and batch["site"].dtype == np.int32
  assert batch["skipped_records"] == 0
  # Grey repeated to RGB; the views of one record differ from each other.
  np.testing.assert_array_equal(batch["views"][..., 0], batch["views"][..., 2])
  assert not np.array_equal(batch["views"][:, 0], batch["views"][:, 1])


def test_num_channels_one_keeps_grayscale_and_rgb_is_converted():
  batch = next(iter(_pretrain(fakes.IndexSource(8), num_channels=1)))
  assert batch["views"].shape == (4, 2, 16, 16, 1)
  batch = next(iter(_pretrain(fakes.IndexSource(8, channels=3), num_channels=1)))
  assert batch["views"].shape[-1] == 1


def test_train_dataset_one_view_with_lung_mask():
  dataset = pipeline.make_train_dataset(
      fakes.IndexSource(9, mask="top_half"), batch_size=3, ops=_OPS,
      options=stream.StreamOptions(seed=1, shard_index=0, shard_count=1, num_epochs=1))
  batches = list(dataset)
  assert len(batches) == 3
  assert batches[0]["image"].shape == (3, 16, 16, 3)
  assert batches[0]["lung_mask"].shape == (3, 16, 16) and batches[0]["lung_mask"].dtype == np.uint8
  assert sorted(np.concatenate([b["label"] for b in batches])) == list(range(9))


def test_uint16_source_is_windowed_to_uint8():
  batch = next(iter(_pretrain(fakes.IndexSource(8, dtype=np.uint16))))
  assert batch["views"].dtype == np.uint8 and batch["views"].max() > 200


def test_epoch_covers_every_record_once_and_drops_the_remainder():
  batches = list(_pretrain(fakes.IndexSource(10), num_epochs=2))
  assert len(batches) == 5  # 20 records / 4, nothing left over.
  labels = np.concatenate([b["label"] for b in batches])
  assert sorted(labels[:8]) != list(range(8))  # Shuffled...
  assert sorted(np.concatenate([labels[:10]])) == list(range(10))  # ...one epoch = every record.
  # 10 // 4, remainder dropped.
  assert len(list(_pretrain(fakes.IndexSource(10), num_epochs=1))) == 2


def test_processes_read_disjoint_slices_of_the_same_epoch():
  # 18 records, global batch 4 over 2 processes: 4 steps (the epoch's last 2 positions are never
  # read); each process reads 2 positions of every step, the two together the one-process run.
  one_process = np.concatenate([b["label"] for b in _pretrain(fakes.IndexSource(18), num_epochs=1)])
  assert len(one_process) == 16 and len(set(one_process.tolist())) == 16
  per_process = []
  for shard_index in range(2):
    batches = list(_pretrain(fakes.IndexSource(18), batch_size=2, shard_index=shard_index,
                             shard_count=2, num_epochs=1))
    assert len(batches) == 4
    per_process.append(np.stack([b["label"] for b in batches]))  # (steps, 2)
  assert not set(per_process[0].ravel().tolist()) & set(per_process[1].ravel().tolist())
  np.testing.assert_array_equal(np.concatenate(per_process, axis=1).ravel(), one_process)


def test_steps_per_epoch_do_not_depend_on_the_process_count():
  # 2 epochs of 11 records, global batch 4: floor(22 / 4) = 5 steps on every process of any
  # topology (no record is left out of an epoch because of the process count).
  for shard_count in (1, 2, 4):
    for shard_index in range(shard_count):
      batches = list(_pretrain(fakes.IndexSource(11), batch_size=4 // shard_count, num_epochs=2,
                               shard_index=shard_index, shard_count=shard_count))
      assert len(batches) == 5, (shard_index, shard_count)
  with pytest.raises(ValueError, match=r"1 epoch\(s\) of 11 records hold no whole global batch "
                     r"of 12 \(6 per process x 2 processes\)"):
    _pretrain(fakes.IndexSource(11), batch_size=6, shard_index=0, shard_count=2, num_epochs=1)
  # Evaluation keeps a strided split that keeps every record.
  assert [len(stream.shard_indices(11, i, 2)) for i in range(2)] == [6, 5]
  np.testing.assert_array_equal(stream.shard_indices(11, 1, 4), [1, 5, 9])
  with pytest.raises(ValueError, match="fewer than the 4"):
    stream.shard_indices(3, 0, 4)
  with pytest.raises(ValueError, match="both shard_index and shard_count"):
    stream.shard_indices(3, 0, None)


def test_default_shard_is_this_jax_process():
  assert stream.resolve_shard(None, None) == (0, 1)  # One process in tests.
  batches = list(pipeline.make_eval_dataset(fakes.IndexSource(5), batch_size=2, ops=_EVAL_OPS))
  assert len(batches) == 3 and int(np.sum([b["valid"] for b in batches])) == 5


def test_views_depend_on_the_global_position_not_on_the_process():
  # Process 1 of 2 reads positions 2-3 of step 0: the one-process run's records there, with
  # bit-identical views (the generator is keyed by the global position, not by the process).
  one_process = next(iter(_pretrain(fakes.IndexSource(8))))
  second_half = next(iter(_pretrain(fakes.IndexSource(8), batch_size=2, shard_index=1,
                                    shard_count=2)))
  for key in ("views", "label", "site"):
    np.testing.assert_array_equal(second_half[key], one_process[key][2:], err_msg=key)


def test_same_seed_same_batches_different_seed_different():
  first = fakes.take(iter(_pretrain(fakes.IndexSource(12), seed=3)), 4)
  again = fakes.take(iter(_pretrain(fakes.IndexSource(12), seed=3)), 4)
  other = fakes.take(iter(_pretrain(fakes.IndexSource(12), seed=4)), 4)
  fakes.assert_batches_equal(first, again)
  assert not np.array_equal(np.stack([b["views"] for b in first]),
                            np.stack([b["views"] for b in other]))


def test_views_change_between_epochs():
  # One batch per epoch holding every record: epoch 2 re-augments the same records.
  batches = list(_pretrain(fakes.IndexSource(4), num_epochs=2))
  order = [np.argsort(b["label"]) for b in batches]
  assert not np.array_equal(batches[0]["views"][order[0]], batches[1]["views"][order[1]])


def test_resume_from_state_mid_epoch_is_exact():
  iterator = iter(_pretrain(fakes.IndexSource(14), batch_size=3))
  fakes.take(iterator, 3)  # Mid-epoch: 9 of 14 records consumed.
  state = iterator.get_state()
  expected = fakes.take(iterator, 5)  # Crosses into the next epochs.
  restored = iter(_pretrain(fakes.IndexSource(14), batch_size=3))
  restored.set_state(state)
  fakes.assert_batches_equal(fakes.take(restored, 5), expected)


def test_resume_through_orbax_composite(tmp_path):
  iterator = iter(_pretrain(fakes.IndexSource(14), batch_size=3))
  fakes.take(iterator, 2)
  with ocp.CheckpointManager(tmp_path, item_names=("data", "step")) as manager:
    manager.save(2, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointSave(iterator),
        step=ocp.args.JsonSave({"step": 2})))
    manager.wait_until_finished()
  expected = fakes.take(iterator, 4)
  restored = iter(_pretrain(fakes.IndexSource(14), batch_size=3))
  with ocp.CheckpointManager(tmp_path, item_names=("data", "step")) as manager:
    manager.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored),
                                               step=ocp.args.JsonRestore()))
  fakes.assert_batches_equal(fakes.take(restored, 4), expected)


def test_eval_pads_the_last_batch_and_masks_it():
  source = fakes.IndexSource(11, mask="top_half")
  per_shard = []
  for shard_index in range(2):
    batches = list(pipeline.make_eval_dataset(source, batch_size=4, ops=_EVAL_OPS,
                                              shard_index=shard_index, shard_count=2))
    # ceil(ceil(11 / 2) / 4) = 2 batches on BOTH shards (shard 1 has only 5 records).
    assert len(batches) == pipeline.num_eval_batches(11, 4, 2) == 2
    for batch in batches:
      assert batch["image"].shape == (4, 16, 16, 3) and batch["valid"].dtype == np.bool_
      assert batch["lung_mask"].shape == (4, 16, 16)
    valid = np.concatenate([b["valid"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    expected_count = len(range(shard_index, 11, 2))
    np.testing.assert_array_equal(valid, np.arange(8) < expected_count)
    per_shard.append(labels[valid])
  assert sorted(np.concatenate(per_shard).tolist()) == list(range(11))


def test_eval_is_deterministic_and_in_order():
  kwargs = dict(batch_size=5, ops=_EVAL_OPS, shard_index=0, shard_count=1)
  first = list(pipeline.make_eval_dataset(fakes.IndexSource(7), **kwargs))
  second = list(pipeline.make_eval_dataset(fakes.IndexSource(7), **kwargs))
  fakes.assert_batches_equal(first, second)
  np.testing.assert_array_equal(first[0]["label"], np.arange(5))
  np.testing.assert_array_equal(first[0]["id"], [f"r{i}" for i in range(5)])
  # The eval image is the resized source image (an independent PIL check).
  from PIL import Image
  record = fakes.IndexSource(7)[1]
  height, width = record["image"].shape[:2]
  scale = 16 / min(height, width)
  size = (max(16, round(width * scale)), max(16, round(height * scale)))
  resized = np.asarray(Image.fromarray(record["image"][..., 0]).resize(size, Image.BILINEAR))
  top, left = (size[1] - 16) // 2, (size[0] - 16) // 2
  np.testing.assert_array_equal(first[0]["image"][1, ..., 0], resized[top:top + 16, left:left + 16])


def test_bad_record_propagates_by_default():
  with pytest.raises(BadRecordError, match=r"images/5.png: truncated PNG"):
    list(_pretrain(fakes.IndexSource(12, bad={5}), num_epochs=1))


def test_bad_records_are_skipped_counted_and_logged(caplog):
  bad = {2, 7, 8}
  source = fakes.IndexSource(20, bad=bad)
  with caplog.at_level(logging.WARNING):
    batches = fakes.take(iter(_pretrain(source, skip_bad_records=True, read_threads=0,
                                   max_bad_record_share=1.0)), 10)
  labels = np.concatenate([b["label"] for b in batches])
  assert not set(labels.tolist()) & bad
  assert all(isinstance(b["skipped_records"], int) for b in batches)
  # 40 good records span more than two epochs of 17, so at least 6 bad ones were read.
  assert source.raised >= 6
  assert sum(b["skipped_records"] for b in batches) == source.raised
  logged = [r.getMessage() for r in caplog.records if "Skipping bad record" in r.getMessage()]
  assert len(logged) == source.raised
  assert all("truncated PNG" in m and "images/" in m for m in logged)


def test_skip_counts_are_exact_per_batch():
  # Only record 5 of 6 is good, batch_size 1: batch k counts the bad records read between the
  # (k-1)-th and k-th read of record 5. The record order comes from the same pipeline over an
  # all-good source (the shuffle does not depend on content).
  order = [int(b["label"][0])
           for b in fakes.take(iter(_pretrain(fakes.IndexSource(6), batch_size=1)), 24)]
  positions = [order[6 * epoch:6 * epoch + 6].index(5) + 6 * epoch for epoch in range(4)]
  expected = np.diff([-1] + positions) - 1
  source = fakes.IndexSource(6, bad={0, 1, 2, 3, 4})
  batches = fakes.take(iter(_pretrain(source, batch_size=1, skip_bad_records=True, read_threads=0,
                                 max_bad_record_share=1.0)), 4)
  assert [int(b["label"][0]) for b in batches] == [5, 5, 5, 5]
  assert [b["skipped_records"] for b in batches] == expected.tolist()
  assert sum(expected) == source.raised


def test_ops_must_fix_the_size():
  with pytest.raises(ValueError, match="random_resized_crop, resize or central_crop"):
    _pretrain(fakes.IndexSource(4), ops="flip_lr")


@pytest.mark.slow
def test_worker_processes_skip_count_and_resume():
  # batch_size 1 so that no worker drops a remainder: every good record arrives exactly once.
  kwargs = dict(batch_size=1, num_epochs=2, skip_bad_records=True, worker_count=2,
                max_bad_record_share=1.0)
  iterator = iter(_pretrain(fakes.IndexSource(12, bad={3}), **kwargs))
  batches = list(iterator)
  iterator.close()
  assert sorted(np.concatenate([b["label"] for b in batches]).tolist()) == sorted(
      2 * [i for i in range(12) if i != 3])
  # Counted in the worker processes. The epoch-1 read is always followed by good records in
  # its worker, so it is counted; the epoch-2 read is lost only if it ends its worker's stream.
  assert sum(b["skipped_records"] for b in batches) in (1, 2)
  # Resume with workers is exact too (the state holds every worker's position).
  kwargs = dict(batch_size=2, worker_count=2)
  iterator = iter(_pretrain(fakes.IndexSource(12), **kwargs))
  fakes.take(iterator, 3)
  state = iterator.get_state()
  expected = fakes.take(iterator, 4)
  iterator.close()
  restored = iter(_pretrain(fakes.IndexSource(12), **kwargs))
  restored.set_state(state)
  fakes.assert_batches_equal(fakes.take(restored, 4), expected)
  restored.close()


class NpzSource:
  """Real PneumoniaMNIST images (28x28 grey) in the record format, read from the shared npz."""

  def __init__(self, path, count):
    with np.load(path) as data:
      self.images = data["train_images"][:count]
      self.labels = data["train_labels"][:count, 0].astype(np.int32)

  def __len__(self):
    return len(self.images)

  def __getitem__(self, index):
    return {"image": self.images[index][..., None], "label": self.labels[index],
            "id": f"train/{index}", "site": np.int32(0)}


def test_real_pneumoniamnist_through_the_cxr_presets(shared_data_dir):
  from data_pipelines import presets
  source = NpzSource(shared_data_dir / "pneumoniamnist.npz", 64)
  pretrain = next(iter(pipeline.make_pretrain_dataset(
      source, batch_size=16, ops=presets.get_preset("cxr", "pretrain", 32),
      options=stream.StreamOptions(seed=0, shard_index=0, shard_count=1))))
  assert pretrain["views"].shape == (16, 2, 32, 32, 3) and pretrain["views"].dtype == np.uint8
  # Real radiographs keep a real dynamic range after augmentation (not blanked, not saturated).
  assert 40 < pretrain["views"].mean() < 220 and pretrain["views"].std() > 15
  assert set(pretrain["label"].tolist()) <= {0, 1}
  evaluated = list(pipeline.make_eval_dataset(source, batch_size=16,
                                              ops=presets.get_preset("cxr", "eval", 28),
                                              shard_index=0, shard_count=1))
  # The cxr eval recipe at the native size is the identity on a square image.
  images = np.concatenate([b["image"] for b in evaluated])[..., 0]
  np.testing.assert_array_equal(images, source.images)
