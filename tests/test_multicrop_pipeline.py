"""make_multicrop_dataset: global/local views, `labeled`, sharding, seeding and exact resume."""
import functools

import numpy as np
import pytest

from data_pipelines import pipeline, stream
from tests.fakes import with_options
from data_pipelines import presets
from data_pipelines import subset
from data_pipelines.sources.synthetic import SyntheticCXR
from tests import fakes

_GLOBAL = "random_resized_crop(16, area=(0.3, 1.0))|flip_lr|linear_intensity(p=0.8)"
_LOCAL = "random_resized_crop(8, area=(0.05, 0.3))|flip_lr|linear_intensity(p=0.8)"


# Label = record index (or -1 for `unlabeled`) so records can be traced.
_source = functools.partial(fakes.IndexSource, size=(20, 22), size_cycle=(5, 3), num_sites=2)


class GradientSource:
  """256x256 RGB images whose red channel is the column and green the row: a view's value
  ranges give the area of the source it was cropped from."""

  def __len__(self):
    return 8

  def __getitem__(self, index):
    column, row = np.meshgrid(np.arange(256), np.arange(256))
    image = np.stack([column, row, np.zeros_like(row)], axis=-1).astype(np.uint8)
    return {"image": image, "label": np.int32(index), "site": np.int32(0)}


def _multicrop(source, **kwargs):
  defaults = dict(batch_size=4, global_ops=_GLOBAL, local_ops=_LOCAL, seed=0, shard_index=0,
                  shard_count=1)
  return pipeline.make_multicrop_dataset(source, **with_options({**defaults, **kwargs}))


def test_batch_format_and_grey_to_rgb():
  batch = next(iter(_multicrop(_source(10), num_global=2, num_local=3)))
  assert set(batch) == {"global_views", "local_views", "label", "labeled", "site",
                        "skipped_records"}
  assert batch["global_views"].shape == (4, 2, 16, 16, 3)
  assert batch["local_views"].shape == (4, 3, 8, 8, 3)
  assert batch["global_views"].dtype == np.uint8 and batch["local_views"].dtype == np.uint8
  assert batch["label"].dtype == np.int32 and batch["site"].dtype == np.int32
  assert batch["labeled"].dtype == np.float32 and batch["labeled"].shape == (4,)
  assert batch["skipped_records"] == 0
  np.testing.assert_array_equal(batch["site"], batch["label"] % 2)
  np.testing.assert_array_equal(batch["global_views"][..., 0], batch["global_views"][..., 2])
  # Views of one record are independent draws.
  assert not np.array_equal(batch["global_views"][:, 0], batch["global_views"][:, 1])
  assert not np.array_equal(batch["local_views"][:, 0], batch["local_views"][:, 1])


def test_no_local_views_means_no_local_key():
  batch = next(iter(_multicrop(_source(8), local_ops=None, num_local=0, num_channels=1)))
  assert set(batch) == {"global_views", "label", "labeled", "site", "skipped_records"}
  assert batch["global_views"].shape == (4, 2, 16, 16, 1)


def test_labeled_matches_labeled_indices_exactly():
  labeled_indices = np.array([11, 0, 3, 3, 7])  # Unsorted, with a duplicate: both are fine.
  batches = list(_multicrop(_source(12), labeled_indices=labeled_indices, num_epochs=2))
  labels = np.concatenate([b["label"] for b in batches])
  labeled = np.concatenate([b["labeled"] for b in batches])
  assert sorted(labels[:12].tolist()) == list(range(12))  # Every record seen (label = index).
  np.testing.assert_array_equal(labeled, np.isin(labels, [0, 3, 7, 11]).astype(np.float32))


def test_labeled_follows_a_label_fraction_subset_of_a_synthetic_source():
  source = SyntheticCXR("train", num_examples=24, image_size=16, task="any_finding")
  chosen = subset.subset_indices(source, 0.25, seed=0)
  assert 0 < len(chosen) < 24
  batches = list(_multicrop(source, batch_size=6, labeled_indices=chosen, num_epochs=1,
                            num_local=1, seed=1))
  labeled = np.concatenate([b["labeled"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  assert labeled.sum() == len(chosen)
  # Labels travel unchanged; `labeled` selects the ones the loss may use (the exact per-record
  # match is checked with traceable labels above; here the label multiset must agree).
  np.testing.assert_array_equal(np.sort(labels[labeled == 1]), np.sort(source.labels[chosen]))


def test_labeled_defaults_to_having_a_label():
  batches = list(_multicrop(_source(8, unlabeled={1, 4, 5}), num_epochs=1))
  labels = np.concatenate([b["label"] for b in batches])
  labeled = np.concatenate([b["labeled"] for b in batches])
  np.testing.assert_array_equal(labeled, (labels >= 0).astype(np.float32))
  assert labeled.sum() == 5
  # Multi-label: labeled only when every entry is >= 0 (all -1 marks an unlabeled record).
  unlabeled = SyntheticCXR("unlabeled", num_examples=4, image_size=16)
  batch = next(iter(_multicrop(unlabeled, num_local=0, local_ops=None)))
  assert batch["label"].shape == (4, 4) and not batch["labeled"].any()
  labeled_source = SyntheticCXR("train", num_examples=4, image_size=16)
  assert next(iter(_multicrop(labeled_source, num_local=0, local_ops=None)))["labeled"].all()


def test_same_seed_same_batches_different_seed_different():
  first = fakes.take(iter(_multicrop(_source(12), seed=3)), 4)
  again = fakes.take(iter(_multicrop(_source(12), seed=3)), 4)
  other = fakes.take(iter(_multicrop(_source(12), seed=4)), 4)
  fakes.assert_batches_equal(first, again)
  for key in ("global_views", "local_views"):
    assert not np.array_equal(np.stack([b[key] for b in first]), np.stack([b[key] for b in other]))


def test_resume_from_state_mid_epoch_is_exact():
  kwargs = dict(batch_size=3, labeled_indices=np.arange(0, 14, 3))
  iterator = iter(_multicrop(_source(14), **kwargs))
  fakes.take(iterator, 3)  # 9 of 14 records consumed.
  state = iterator.get_state()
  expected = fakes.take(iterator, 5)  # Crosses into the next epochs.
  restored = iter(_multicrop(_source(14), **kwargs))
  restored.set_state(state)
  fakes.assert_batches_equal(fakes.take(restored, 5), expected)


def test_shards_are_disjoint_and_complete_and_labeled_uses_source_indices():
  seen = []
  for shard_index in range(2):
    batches = list(_multicrop(_source(16), batch_size=2, shard_index=shard_index,
                              shard_count=2, num_epochs=1, labeled_indices=np.array([1, 2, 9])))
    labels = np.concatenate([b["label"] for b in batches])
    labeled = np.concatenate([b["labeled"] for b in batches])
    # Shard 1 reads source records 1, 3, 5...: its first local record is source index 1.
    np.testing.assert_array_equal(labeled, np.isin(labels, [1, 2, 9]).astype(np.float32))
    seen.append(set(labels.tolist()))
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(16))


def test_local_views_are_small_area_crops_and_global_views_large():
  # Red = column, green = row, so max - min + 1 of each channel is the crop's width / height in
  # source pixels (bilinear resizing shrinks the measured span by at most a few pixels).
  batches = list(_multicrop(GradientSource(), batch_size=4, num_epochs=2, num_local=4,
                            global_ops="random_resized_crop(32, area=(0.3, 1.0))",
                            local_ops="random_resized_crop(16, area=(0.05, 0.3))"))

  def areas(views):
    views = views.reshape((-1,) + views.shape[-3:]).astype(int)
    width = views[..., 0].max(axis=(1, 2)) - views[..., 0].min(axis=(1, 2)) + 1
    height = views[..., 1].max(axis=(1, 2)) - views[..., 1].min(axis=(1, 2)) + 1
    return width * height / 256.0 ** 2

  global_areas = areas(np.concatenate([b["global_views"] for b in batches]))
  local_areas = areas(np.concatenate([b["local_views"] for b in batches]))
  assert len(global_areas) == 32 and len(local_areas) == 64
  assert global_areas.min() > 0.3 * 0.85 and global_areas.max() <= 1.0
  assert local_areas.min() > 0.05 * 0.8 and local_areas.max() <= 0.3 * 1.02
  assert global_areas.mean() > 2 * local_areas.mean()


def test_ghesu_multicrop_recipe_end_to_end_on_synthetic_radiographs():
  source = SyntheticCXR("unlabeled", num_examples=8, image_size=32)
  global_ops, local_ops = presets.get_multicrop_ops("ghesu", 24, 12)
  batch = next(iter(pipeline.make_multicrop_dataset(
      source, batch_size=4, global_ops=global_ops, local_ops=local_ops, num_global=2,
      num_local=2, options=stream.StreamOptions(seed=0, shard_index=0, shard_count=1))))
  assert batch["global_views"].shape == (4, 2, 24, 24, 3)
  assert batch["local_views"].shape == (4, 2, 12, 12, 3)
  assert batch["global_views"].std() > 10  # Not blanked by the intensity chain.


def test_bad_records_are_skipped_and_counted():
  batches = list(_multicrop(_source(12, bad={2, 5}), skip_bad_records=True, read_threads=0,
                            num_epochs=1, labeled_indices=np.array([2, 3])))
  labels = np.concatenate([b["label"] for b in batches])
  assert not {2, 5} & set(labels.tolist()) and len(batches) == 2  # 10 good records // 4.
  assert sum(b["skipped_records"] for b in batches) >= 1
  np.testing.assert_array_equal(np.concatenate([b["labeled"] for b in batches]),
                                (labels == 3).astype(np.float32))


def test_argument_errors():
  with pytest.raises(ValueError, match="needs local_ops"):
    _multicrop(_source(4), local_ops=None)
  with pytest.raises(ValueError, match="num_global must be >= 1"):
    _multicrop(_source(4), num_global=0)
  with pytest.raises(ValueError, match=r"must lie in \[0, 4\)"):
    _multicrop(_source(4), labeled_indices=np.array([1, 4]))
  with pytest.raises(ValueError, match="flatnonzero"):
    _multicrop(_source(4), labeled_indices=np.array([True, False, True, False]))
  with pytest.raises(ValueError, match="local_ops"):
    _multicrop(_source(4), local_ops="flip_lr")
