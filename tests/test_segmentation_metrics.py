"""Dice / IoU vs scikit-learn, the decoder's output shape, and mask alignment in the pipeline."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as sk_metrics

from data_pipelines import pipeline, stream
from remedis_jax.evaluators import segmentation as seg
from remedis_jax.models import segmentation as seg_models


def _sk_dice(predicted, target):
  return sk_metrics.f1_score(np.ravel(target), np.ravel(predicted), zero_division=1.0)


def _sk_iou(predicted, target):
  return sk_metrics.jaccard_score(np.ravel(target), np.ravel(predicted), zero_division=1.0)


def _rectangle(shape, top, left, bottom, right):
  mask = np.zeros(shape, np.uint8)
  mask[top:bottom, left:right] = 1
  return mask


# --------------------------------------------------------------------------------- metrics
def test_dice_iou_of_hand_made_masks():
  target = _rectangle((8, 8), 2, 2, 6, 6)       # 16 pixels
  predicted = _rectangle((8, 8), 3, 3, 7, 7)    # 16 pixels, overlap 3x3 = 9
  assert seg.dice_score(predicted, target) == pytest.approx(2 * 9 / 32)
  assert seg.iou_score(predicted, target) == pytest.approx(9 / 23)
  assert seg.dice_score(predicted, target) == pytest.approx(_sk_dice(predicted, target))
  assert seg.iou_score(predicted, target) == pytest.approx(_sk_iou(predicted, target))
  assert seg.dice_score(target, target) == 1.0 and seg.iou_score(target, target) == 1.0


def test_empty_mask_conventions_match_sklearn_zero_division_one():
  empty, full = np.zeros((5, 5), np.uint8), _rectangle((5, 5), 1, 1, 3, 3)
  assert seg.dice_score(empty, empty) == seg.EMPTY_SCORE == 1.0
  assert seg.iou_score(empty, empty) == 1.0
  assert seg.dice_score(empty, full) == 0.0 and seg.dice_score(full, empty) == 0.0
  assert seg.iou_score(empty, full) == 0.0 and seg.iou_score(full, empty) == 0.0
  for predicted, target in ((empty, empty), (empty, full), (full, empty)):
    assert seg.dice_score(predicted, target) == _sk_dice(predicted, target)
    assert seg.iou_score(predicted, target) == _sk_iou(predicted, target)


def test_aggregated_metrics_vs_sklearn_on_random_masks():
  rng = np.random.default_rng(0)
  target = rng.random((7, 12, 10)) < rng.random((7, 1, 1))
  predicted = rng.random((7, 12, 10)) < 0.4
  target[0] = False      # an empty target with a non-empty prediction: 0
  predicted[1] = False   # an empty prediction with a non-empty target: 0
  target[2] = predicted[2] = False  # both empty: 1
  metrics = seg.segmentation_metrics(seg.mask_counts(predicted, target))
  per_image_dice = [_sk_dice(p, t) for p, t in zip(predicted, target)]
  per_image_iou = [_sk_iou(p, t) for p, t in zip(predicted, target)]
  assert per_image_dice[0] == per_image_dice[1] == 0.0 and per_image_dice[2] == 1.0
  np.testing.assert_allclose(metrics["dice"], np.mean(per_image_dice), rtol=1e-12)
  np.testing.assert_allclose(metrics["dice_std"], np.std(per_image_dice), rtol=1e-12)
  np.testing.assert_allclose(metrics["iou"], np.mean(per_image_iou), rtol=1e-12)
  np.testing.assert_allclose(metrics["iou_std"], np.std(per_image_iou), rtol=1e-12)
  np.testing.assert_allclose(metrics["dice_global"], _sk_dice(predicted, target), rtol=1e-12)
  np.testing.assert_allclose(metrics["iou_global"], _sk_iou(predicted, target), rtol=1e-12)
  assert metrics["num_examples"] == 7 and metrics["num_empty_targets"] == int(
      (target.reshape(7, -1).sum(1) == 0).sum())


def test_counts_concatenate_like_one_pass_and_shapes_are_checked():
  rng = np.random.default_rng(1)
  predicted, target = rng.random((6, 4, 4)) < 0.5, rng.random((6, 4, 4)) < 0.5
  whole = seg.mask_counts(predicted, target)
  parts = seg.MaskCounts.concatenate([seg.mask_counts(predicted[:2], target[:2]),
                                      seg.mask_counts(predicted[2:], target[2:])])
  for a, b in zip(whole, parts):
    np.testing.assert_array_equal(a, b)
  assert np.isnan(seg.segmentation_metrics(seg.MaskCounts.concatenate([]))["dice"])
  with pytest.raises(ValueError, match="differ in shape"):
    seg.mask_counts(predicted, target[:, :3])


# --------------------------------------------------------------------------------- decoder
def test_upsampling_sizes():
  assert seg_models.upsampling_sizes((8, 8), (32, 32)) == [(16, 16), (32, 32)]
  assert seg_models.upsampling_sizes((1, 1), (28, 28)) == [(2, 2), (4, 4), (8, 8), (16, 16),
                                                           (28, 28)]
  assert seg_models.upsampling_sizes((4, 4), (4, 4)) == []
  with pytest.raises(ValueError, match="does not fit"):
    seg_models.upsampling_sizes((8, 8), (4, 4))


@pytest.mark.parametrize("name,size,expect_skips", [("ViT-micro/4", 32, False),
                                                    ("ViT-micro/4", 28, False),
                                                    ("R_micro", 32, True)])
def test_segmentation_model_logits_at_input_size(name, size, expect_skips):
  model = seg_models.create_segmentation_model(name, decoder_width=16, decoder_groups=4)
  images = jnp.zeros((2, size, size, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  logits, intermediates = jax.eval_shape(lambda v, x: model.apply(v, x), variables, images)
  assert logits.shape == (2, size, size, 1) and logits.dtype == jnp.float32
  assert set(variables["params"]) == {"encoder", "decoder"}
  decoder = variables["params"]["decoder"]
  # A ViT has one scale (no skips); a ResNet's stage outputs feed the decoder stages.
  assert any(k.startswith("skip") for k in decoder) == expect_skips
  feature = intermediates["feature_map"].shape
  assert sum(k.startswith("stage") and not k.endswith("norm") for k in decoder) == len(
      seg_models.upsampling_sizes(feature[1:3], (size, size)))


def test_decoder_on_a_given_feature_map_and_zero_initial_logits():
  decoder = seg_models.SegmentationDecoder(num_classes=1, width=8, num_groups=2)
  features = jax.random.normal(jax.random.key(0), (2, 5, 7, 12))
  params = decoder.init(jax.random.key(1), features, (20, 28))
  logits = decoder.apply(params, features, (20, 28))
  assert logits.shape == (2, 20, 28, 1)
  np.testing.assert_array_equal(np.asarray(logits), 0.0)  # zero-initialised last layer


# -------------------------------------------------------------------- masks in the pipeline
class _RectangleSource:
  """One off-centre bright rectangle per record, whose lung_mask is that rectangle."""

  def __init__(self, n=4, size=24):
    self.n, self.size = n, size

  def __len__(self):
    return self.n

  def __getitem__(self, index):
    mask = _rectangle((self.size, self.size), 3 + index, 2, 12 + index, 9)
    return {"image": (mask * 255).astype(np.uint8)[..., None], "label": np.int32(0),
            "id": str(index), "site": np.int32(index), "lung_mask": mask}  # site: which record


def _batch(ops, source, seed=0):
  dataset = pipeline.make_train_dataset(
      source, batch_size=len(source), ops=ops,
      options=stream.StreamOptions(seed=seed, shard_index=0, shard_count=1, num_channels=1))
  return next(iter(dataset))


@pytest.mark.parametrize("ops,expected", [
    ("flip_lr(p=1.0)|resize(24)", lambda m: m[:, ::-1]),
    ("flip_ud(p=1.0)|resize(24)", lambda m: m[::-1]),
])
def test_exact_geometric_ops_move_the_mask_with_the_image(ops, expected):
  source = _RectangleSource()
  batch = _batch(ops, source)
  for image, mask in zip(batch["image"][..., 0], batch["lung_mask"]):
    np.testing.assert_array_equal(mask, (image > 127).astype(np.uint8))
  # The rectangles are off-centre: an unmoved mask would not match the moved image.
  originals = {tuple(np.argwhere(source[i]["lung_mask"])[0]) for i in range(len(source))}
  moved = {tuple(np.argwhere(expected(source[i]["lung_mask"]))[0]) for i in range(len(source))}
  assert {tuple(np.argwhere(m)[0]) for m in batch["lung_mask"]} == moved != originals


def test_interpolating_ops_keep_mask_and_image_aligned():
  source = _RectangleSource(n=8)
  ops = "random_resized_crop(24, area=(0.5, 0.9), aspect_ratio=(0.8, 1.25))|rotate(25)"
  batch = _batch(ops, source, seed=3)
  moved = 0
  for image, mask, index in zip(batch["image"][..., 0], batch["lung_mask"], batch["site"]):
    # Bilinear image vs nearest-neighbour mask: they may differ on the border pixels only.
    assert seg.iou_score(image > 127, mask) > 0.75
    moved += seg.iou_score(mask, source[int(index)]["lung_mask"]) < 0.9
  assert moved >= 6  # the ops really moved the rectangles
