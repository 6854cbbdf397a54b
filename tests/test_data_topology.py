"""The same data on any topology: the global batch of step t depends on (seed, t) only.

P processes are simulated in one Python process by passing shard_index / shard_count
explicitly: the concatenation of the P local batches of step t must be the one-process global
batch of step t (same records, same order, bit-identical views), and an iterator state saved on
one topology must continue the same global stream on another. The real two-process run against
one process with two devices is in tests/test_preemption_processes.py.
"""
import functools
import json
import logging

import numpy as np
import pytest

from data_pipelines import pipeline
from tests import fakes
from tests.fakes import with_options

_OPS = "random_resized_crop(16, area=(0.3, 1.0))|flip_lr|color_jitter(brightness=0.4, contrast=0.4, p=0.8)"
_LOCAL_OPS = "random_resized_crop(8, area=(0.05, 0.3))|flip_lr"
_GLOBAL_BATCH = 8
_NUM_RECORDS = 22  # not a multiple of the global batch: batches straddle epoch boundaries


# label = record index, so every position of the stream can be traced; `bad` raise.
_source = functools.partial(fakes.IndexSource, num_records=_NUM_RECORDS, size=(18, 20),
                            size_cycle=(5, 3), name="tiny/train")


# One builder per training pipeline: (source, batch_size, shard_index, shard_count, **kwargs).
_BUILDERS = {
    "pretrain": lambda source, **kw: pipeline.make_pretrain_dataset(
        source, ops=_OPS, num_views=2, **with_options(dict(seed=7, **kw))),
    "train": lambda source, **kw: pipeline.make_train_dataset(
        _source(num_records=source.num_records, bad=source.bad, mask="random"), ops=_OPS,
        **with_options(dict(seed=7, **kw))),
    "multicrop": lambda source, **kw: pipeline.make_multicrop_dataset(
        source, global_ops=_OPS, local_ops=_LOCAL_OPS, num_global=2, num_local=2,
        labeled_indices=np.array([0, 3, 11, 21]), **with_options(dict(seed=7, **kw))),
    # Noise and zero fills only: "other_image" fills take donors from the process batch (the
    # documented exception).
    "gmml": lambda source, **kw: pipeline.make_gmml_dataset(
        source, clean_ops="random_resized_crop(16, area=(0.5, 1.0))|flip_lr", corrupt_ops="",
        patch_size=4, fill_shares=(1.0, 1.0, 0.0), **with_options(dict(seed=7, **kw))),
}


def _iterators(kind, shard_count, source=None, global_batch=_GLOBAL_BATCH, **kwargs):
  source = source or _source()
  return [iter(_BUILDERS[kind](source, batch_size=global_batch // shard_count,
                               shard_index=p, shard_count=shard_count, **kwargs))
          for p in range(shard_count)]


def _global_batches(iterators, steps):
  """The concatenation of the processes' batches of each step (`skipped_records` summed)."""
  batches = []
  for _ in range(steps):
    parts = [next(it) for it in iterators]
    batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k != "skipped_records"}
    batch["skipped_records"] = sum(p["skipped_records"] for p in parts)
    batches.append(batch)
  return batches


def _assert_same(first, second):
  assert len(first) == len(second)
  for step, (a, b) in enumerate(zip(first, second)):
    assert a.keys() == b.keys(), step
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=f"step {step}, {key}")


@pytest.mark.parametrize("kind", sorted(_BUILDERS))
def test_concatenated_process_batches_are_the_one_process_batches(kind):
  steps = 7  # 56 positions: more than two epochs of 22 records
  reference = _global_batches(_iterators(kind, 1), steps)
  for shard_count in (2, 4):
    _assert_same(_global_batches(_iterators(kind, shard_count), steps), reference)


def test_the_global_stream_is_a_fresh_permutation_of_every_record_per_epoch():
  labels = np.concatenate([b["label"] for b in _global_batches(_iterators("pretrain", 1), 11)])
  epochs = labels.reshape(4, _NUM_RECORDS)  # 88 positions = 4 epochs
  for epoch in epochs:
    assert sorted(epoch.tolist()) == list(range(_NUM_RECORDS))
  assert len({tuple(epoch) for epoch in epochs}) == 4
  # The same record at two positions gets two different draws (keyed by the position).
  views = np.concatenate([b["views"] for b in _global_batches(_iterators("pretrain", 1), 11)])
  first, second = np.flatnonzero(labels == 5)[:2]
  assert not np.array_equal(views[first], views[second])


def test_finite_epochs_end_at_the_same_step_on_every_topology():
  # 2 epochs x 22 records = 44 positions, global batch 8: 5 steps on every process; step 2
  # (positions 16-23) straddles the epoch boundary; the last 4 positions are never read.
  reference = [b for b in _iterators("pretrain", 1, num_epochs=2)[0]]
  assert len(reference) == 5
  labels = np.concatenate([b["label"] for b in reference])
  assert sorted(labels[:_NUM_RECORDS].tolist()) == list(range(_NUM_RECORDS))
  assert len(set(labels[_NUM_RECORDS:].tolist())) == 40 - _NUM_RECORDS  # epoch 2, distinct
  for shard_count in (2, 4):
    iterators = _iterators("pretrain", shard_count, num_epochs=2)
    per_process = [list(it) for it in iterators]
    assert [len(batches) for batches in per_process] == [5] * shard_count
    _assert_same([{k: np.concatenate([batches[t][k] for batches in per_process])
                   for k in ("views", "label", "site")} for t in range(5)],
                 [{k: b[k] for k in ("views", "label", "site")} for b in reference])


def test_the_state_is_the_global_position_and_resumes_exactly_on_the_same_topology():
  iterators = _iterators("multicrop", 2)
  _global_batches(iterators, 3)
  # Through JSON, as Grain's Orbax handler writes it.
  states = [json.loads(json.dumps(it.get_state())) for it in iterators]
  assert [s["global_position"] for s in states] == [24, 24]
  assert states[1]["layout"] == {"process_index": 1, "process_count": 2, "global_batch_size": 8,
                                 "worker_count": 0, "num_records": _NUM_RECORDS}
  expected = _global_batches(iterators, 4)
  restored = _iterators("multicrop", 2)
  for it, state in zip(restored, states):
    it.set_state(state)
  _assert_same(_global_batches(restored, 4), expected)
  assert restored[0].get_state()["global_position"] == 56


@pytest.mark.parametrize("saved_by", [0, 1])
def test_a_state_saved_on_two_processes_resumes_on_one_or_four(saved_by):
  reference = _global_batches(_iterators("pretrain", 1), 8)
  saving = _iterators("pretrain", 2)
  _global_batches(saving, 3)
  state = json.loads(json.dumps(saving[saved_by].get_state()))
  for shard_count in (1, 4):
    restored = _iterators("pretrain", shard_count)
    for it in restored:  # one process's file restores every process of the new topology
      it.set_state(state)
    _assert_same(_global_batches(restored, 5), reference[3:])
    assert restored[-1].get_state()["global_position"] == 8 * 8
  # Another global batch size continues the same global stream from position 24.
  restored = _iterators("pretrain", 2, global_batch=4)
  for it in restored:
    it.set_state(state)
  continued = _global_batches(restored, 6)
  for key in ("views", "label", "site"):
    np.testing.assert_array_equal(np.concatenate([b[key] for b in continued]),
                                  np.concatenate([b[key] for b in reference[3:6]]), err_msg=key)


def test_a_single_process_state_from_before_global_batches_resumes_exactly():
  # Grain's own state, as checkpoints held it before: one process's pipeline is unchanged.
  expected = _global_batches(_iterators("pretrain", 1), 6)[3:]
  restored = _iterators("pretrain", 1)
  restored[0].set_state({"next_index": 24})
  assert restored[0].get_state()["global_position"] == 24
  _assert_same(_global_batches(restored, 3), expected)


def test_a_skipped_bad_record_is_replaced_from_the_same_process_stream(caplog):
  # Record 5 is bad. Batches before the step that reads it are the topology-independent ones;
  # the process that reads it fills its batch from its own next positions (full batches,
  # counted), the other process is unaffected.
  clean = _global_batches(_iterators("pretrain", 1), 9)
  positions = np.concatenate([b["label"] for b in clean])  # the record at each global position
  bad_position = int(np.flatnonzero(positions == 5)[0])
  reader = (bad_position % _GLOBAL_BATCH) // 4  # which of the 2 processes (b = 4) reads it
  kwargs = dict(skip_bad_records=True, max_bad_record_share=1.0, read_threads=0)
  iterators = _iterators("pretrain", 2, source=_source(bad={5}), **kwargs)
  per_process = [[next(it) for _ in range(6)] for it in iterators]
  for p in range(2):
    slice_positions = np.concatenate(
        [np.arange(t * 8 + p * 4, t * 8 + p * 4 + 4) for t in range(9)])
    expected = [q for q in slice_positions if positions[q] != 5][:24]
    got = np.concatenate([b["label"] for b in per_process[p]])
    np.testing.assert_array_equal(got, positions[expected])
    skipped = [b["skipped_records"] for b in per_process[p]]
    read_bad = [q for q in slice_positions[:slice_positions.tolist().index(expected[-1]) + 1]
                if positions[q] == 5]
    assert sum(skipped) == len(read_bad) and (p == reader) == (sum(skipped) > 0)
  # The views of the records the shift did not move are still the global ones.
  first_step = bad_position // _GLOBAL_BATCH
  for t in range(first_step):
    np.testing.assert_array_equal(
        np.concatenate([per_process[p][t]["views"] for p in range(2)]), clean[t]["views"])
  # Same topology: exact, the shift included. Another topology: restarts at the global
  # position, with a warning that the skipped positions are read again.
  iterators = _iterators("pretrain", 2, source=_source(bad={5}), **kwargs)
  _global_batches(iterators, first_step + 1)
  states = [it.get_state() for it in iterators]
  expected = _global_batches(iterators, 3)
  restored = _iterators("pretrain", 2, source=_source(bad={5}), **kwargs)
  for it, state in zip(restored, states):
    it.set_state(state)
  _assert_same(_global_batches(restored, 3), expected)
  one = _iterators("pretrain", 1, source=_source(bad={5}), **kwargs)
  with caplog.at_level(logging.WARNING):
    one[0].set_state(states[reader])
  assert any("had skipped 1 bad records" in r.getMessage() for r in caplog.records)
  assert one[0].get_state()["global_position"] == (first_step + 1) * _GLOBAL_BATCH


@pytest.mark.slow
def test_worker_processes_do_not_change_the_batches_and_their_state_moves_to_no_workers():
  # Process 1 of 2 with two Grain worker processes (each makes whole batches), process 0
  # without: together still the one-process batches.
  reference = _global_batches(_iterators("pretrain", 1), 6)
  iterators = [_iterators("pretrain", 2)[0],
               iter(_BUILDERS["pretrain"](_source(), batch_size=4, shard_index=1,
                                          shard_count=2, worker_count=2))]
  try:
    _assert_same(_global_batches(iterators, 3), reference[:3])
    state = iterators[1].get_state()
  finally:
    iterators[1].close()
  assert state["layout"]["worker_count"] == 2 and state["global_position"] == 24
  restored = _iterators("pretrain", 1)
  restored[0].set_state(state)
  _assert_same(_global_batches(restored, 3), reference[3:])
