"""GMML group masking: patch alignment, coverage distribution, fill shares, determinism, pipeline."""

import numpy as np
import pytest

from data_pipelines import ops, ops_masking, pipeline
from tests.fakes import with_options
from data_pipelines.ops_masking import FILL_NOISE, FILL_OTHER_IMAGE, FILL_ZEROS


def _image(height=32, width=32, channels=3, value=None, seed=0):
  if value is not None:
    return np.full((height, width, channels), value, np.uint8)
  return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


@pytest.mark.parametrize("height,width,patch", [(32, 32, 4), (224, 224, 16), (48, 32, 8)])
def test_masked_pixels_are_exactly_the_masked_patches(height, width, patch):
  """Zero fill on a white image: the black pixels are exactly the union of masked patches."""
  op = ops.get_op("group_mask", patch_size=patch, fill_shares=(0, 1, 0))
  image = _image(height, width, value=255)
  for seed in range(20):
    out = op({"image": image}, np.random.default_rng(seed))
    mask = out["gmml_mask"]
    assert mask.shape == (height // patch, width // patch) and mask.dtype == np.uint8
    # Independent patch-to-pixel map: pixel (y, x) belongs to patch (y // p, x // p).
    ys, xs = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    expected_black = mask[ys // patch, xs // patch] == 1
    np.testing.assert_array_equal(np.all(out["image"] == 0, axis=-1), expected_black)
    np.testing.assert_array_equal(np.all(out["image"] == 255, axis=-1), ~expected_black)
    assert out["gmml_fill"] == FILL_ZEROS
  np.testing.assert_array_equal(image, 255)  # not in place


def test_one_group_is_a_filled_rectangle_with_uniform_sides_up_to_the_share():
  """Coverage ~0 stops after one group: a full rectangle, sides uniform in 1..floor(0.3 * 14)."""
  sides = []
  for seed in range(3000):
    mask = ops_masking.sample_group_mask((14, 14), np.random.default_rng(seed),
                                         coverage=(0.0, 1e-6), max_group_share=0.3)
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    assert mask.sum() == h * w  # one solid rectangle
    sides += [h, w]
  counts = np.bincount(sides, minlength=6)
  assert counts[0] == 0 and counts[5:].sum() == 0  # sides in 1..4 = floor(0.3 * 14)
  np.testing.assert_allclose(counts[1:5] / len(sides), 0.25, atol=0.02)


def test_coverage_follows_the_target_distribution_and_never_passes_cap_plus_one_group():
  low, high, share, grid = 0.5, 0.75, 0.3, (14, 14)
  one_group = (4 * 4) / (14 * 14)  # largest group's area share
  draws = 2000
  coverage = np.empty(draws)
  targets = np.empty(draws)
  for seed in range(draws):
    targets[seed] = np.random.default_rng(seed).uniform(low, high)  # the op's first draw
    coverage[seed] = ops_masking.sample_group_mask(
        grid, np.random.default_rng(seed), coverage=(low, high), max_group_share=share).mean()
  assert np.all(coverage >= targets) and np.all(coverage < targets + one_group)
  assert coverage.min() >= low and coverage.max() < high + one_group
  # The distribution: P(coverage < x) lies between P(U < x - one_group) and P(U < x) for the
  # uniform target U, up to sampling error (binomial sd <= 0.011 at 2000 draws).
  for x in (0.55, 0.6, 0.65, 0.7, 0.75):
    below = np.mean(coverage < x)
    upper = np.clip((x - low) / (high - low), 0, 1)
    lower = np.clip((x - one_group - low) / (high - low), 0, 1)
    assert lower - 0.035 <= below <= upper + 0.035, (x, below, lower, upper)
  # Mean: the target's mean (0.625) plus a positive overshoot below one group.
  assert 0.625 < coverage.mean() < 0.625 + one_group


def test_fixed_coverage_and_full_coverage():
  for seed in range(50):
    mask = ops_masking.sample_group_mask((8, 8), np.random.default_rng(seed),
                                         coverage=(0.75, 0.75), max_group_share=0.3)
    assert 48 <= mask.sum() < 48 + 4  # one largest group is 2 x 2 patches on an 8 x 8 grid
  full = ops_masking.sample_group_mask((8, 8), np.random.default_rng(0), coverage=(1.0, 1.0))
  assert full.all()


def test_fill_shares_match_the_config_and_fills_behave():
  shares = (0.2, 0.3, 0.5)
  op = ops_masking.GroupMask(patch_size=4, fill_shares=shares, noise="uniform")
  image = _image(32, 32, channels=1, value=100)
  kinds, noise_values = [], []
  for seed in range(2000):
    out = op({"image": image}, np.random.default_rng(seed))
    kind = int(out["gmml_fill"])
    kinds.append(kind)
    pixels = ops_masking.expand_mask(out["gmml_mask"], 4).astype(bool)
    np.testing.assert_array_equal(out["image"][~pixels], 100)  # visible pixels untouched
    if kind == FILL_ZEROS:
      np.testing.assert_array_equal(out["image"][pixels], 0)
    elif kind == FILL_OTHER_IMAGE:
      np.testing.assert_array_equal(out["image"], image)  # filled later, per batch
    else:
      noise_values.append(out["image"][pixels].ravel())
  fractions = np.bincount(kinds, minlength=3) / len(kinds)
  np.testing.assert_allclose(fractions, shares, atol=0.03)
  noise_values = np.concatenate(noise_values).astype(np.float64)
  assert abs(noise_values.mean() - 127.5) < 1.0 and abs(noise_values.std() - 73.9) < 1.0


def test_gaussian_noise_statistics():
  op = ops_masking.GroupMask(patch_size=4, fill_shares=(1, 0, 0), noise="gaussian")
  out = op({"image": _image(64, 64, value=0)}, np.random.default_rng(0))
  values = out["image"][ops_masking.expand_mask(out["gmml_mask"], 4).astype(bool)].astype(float)
  reference = np.clip(np.rint(np.random.default_rng(1).normal(127.5, 64.0, 200_000)), 0, 255)
  assert abs(values.mean() - reference.mean()) < 3 and abs(values.std() - reference.std()) < 3


def test_deterministic_per_seed_and_varies_across_seeds():
  op = ops_masking.GroupMask(patch_size=4, fill_shares=(1, 1, 1))
  image = _image()
  a = op({"image": image}, np.random.default_rng(5))
  b = op({"image": image}, np.random.default_rng(5))
  for key in ("image", "gmml_mask", "gmml_fill", "gmml_donor_offset"):
    np.testing.assert_array_equal(a[key], b[key])
  masks = {op({"image": image}, np.random.default_rng(s))["gmml_mask"].tobytes()
           for s in range(10)}
  assert len(masks) == 10


def test_bad_settings_are_rejected():
  with pytest.raises(ValueError, match="coverage"):
    ops_masking.GroupMask(coverage=(0.8, 0.5))
  with pytest.raises(ValueError, match="fill_shares"):
    ops_masking.GroupMask(fill_shares=(0, 0, 0))
  with pytest.raises(ValueError, match="noise"):
    ops_masking.GroupMask(noise="salt")


def test_fill_from_other_images_against_a_loop_reference():
  rng = np.random.default_rng(0)
  batch, size, patch = 6, 16, 4
  clean = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
  corrupted = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
  mask = (rng.random((batch, 4, 4)) < 0.5).astype(np.uint8)
  fill = np.array([2, 0, 2, 1, 2, 2], np.int8)
  offsets = rng.integers(1, 2**31 - 1, batch)
  out = ops_masking.fill_from_other_images(corrupted, clean, mask, fill, offsets, patch)
  donors = ops_masking.donor_indices(batch, offsets)
  assert np.all(donors != np.arange(batch)) and np.all((donors >= 0) & (donors < batch))
  for i in range(batch):
    expected = corrupted[i].copy()
    if fill[i] == FILL_OTHER_IMAGE:
      for y in range(size):
        for x in range(size):
          if mask[i, y // patch, x // patch]:
            expected[y, x] = clean[donors[i], y, x]
    np.testing.assert_array_equal(out[i], expected)
  # A batch of one has no other image: masked patches get noise, the rest is kept.
  single = ops_masking.fill_from_other_images(corrupted[:1], clean[:1], np.ones((1, 4, 4),
                                              np.uint8), fill[:1], offsets[:1], patch)
  assert not np.array_equal(single, corrupted[:1]) and not np.array_equal(single, clean[:1])


def test_donor_choice_covers_every_other_position():
  donors = [ops_masking.donor_indices(4, np.full(4, offset))[0] for offset in range(30)]
  assert set(donors) == {1, 2, 3}


# ------------------------------------------------------------------------------- pipeline
class _Source:
  """Tiny in-memory source: record i is a 32 x 32 grey gradient plus i."""
  name = "tiny"
  num_classes = 0
  multi_label = False

  def __len__(self):
    return 24

  def __getitem__(self, index):
    ramp = (np.arange(32)[None, :] * 4 + np.arange(32)[:, None] * 2 + index * 7) % 256
    return {"image": ramp.astype(np.uint8)[..., None], "label": np.int32(-1)}


def _dataset(**overrides):
  kwargs = dict(batch_size=8, clean_ops="random_resized_crop(32, area=(0.8, 1.0))|flip_lr(0.5)",
                corrupt_ops="", patch_size=4, fill_shares=(1, 1, 1), seed=3,
                shard_index=0, shard_count=1, num_channels=1)
  kwargs.update(overrides)
  return pipeline.make_gmml_dataset(_Source(), **with_options(kwargs))


def test_gmml_dataset_batches_views_masks_and_fills():
  batch = next(iter(_dataset()))
  assert batch["clean"].shape == batch["corrupted"].shape == (8, 32, 32, 1)
  assert batch["clean"].dtype == batch["corrupted"].dtype == np.uint8
  assert batch["mask"].shape == (8, 8, 8) and "gmml_donor_offset" not in batch
  for i in range(8):
    pixels = ops_masking.expand_mask(batch["mask"][i], 4).astype(bool)
    # No corrupt ops: the visible part of the corrupted view IS the clean view (same geometry).
    np.testing.assert_array_equal(batch["corrupted"][i][~pixels], batch["clean"][i][~pixels])
    if batch["fill"][i] == FILL_ZEROS:
      np.testing.assert_array_equal(batch["corrupted"][i][pixels], 0)
    elif batch["fill"][i] == FILL_OTHER_IMAGE:
      # Filled from another record's clean view, at the same positions.
      matches = [j for j in range(8) if j != i and np.array_equal(
          batch["corrupted"][i][pixels], batch["clean"][j][pixels])]
      assert matches
  assert set(batch["fill"].tolist()) <= {FILL_NOISE, FILL_ZEROS, FILL_OTHER_IMAGE}


def test_gmml_dataset_is_deterministic_and_resumes_exactly():
  first = [next(it) for it in [iter(_dataset())] for _ in range(1)]
  iterator = iter(_dataset())
  batches = [next(iterator) for _ in range(3)]
  np.testing.assert_array_equal(batches[0]["corrupted"], first[0]["corrupted"])
  resumed = iter(_dataset())
  next(resumed)
  state = resumed.get_state()
  restored = iter(_dataset())
  restored.set_state(state)
  for expected in batches[1:]:
    got = next(restored)
    for key in ("clean", "corrupted", "mask", "fill"):
      np.testing.assert_array_equal(got[key], expected[key])


def test_corrupt_ops_must_keep_the_geometry():
  with pytest.raises(ValueError, match="geometry"):
    _dataset(corrupt_ops="flip_lr(0.5)")
  with pytest.raises(ValueError, match="mask arguments"):
    _dataset(corrupt_ops="group_mask(4)")
