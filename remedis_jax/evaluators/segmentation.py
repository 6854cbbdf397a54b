"""Segmentation metrics (Dice, IoU) and the evaluator that runs a segmentation model over a split.

Definitions, on binary masks P (prediction) and G (ground truth) of one image:

  Dice = 2 |P n G| / (|P| + |G|)        (= the F1 score of the pixels)
  IoU  = |P n G| / |P u G|              (= the Jaccard index of the pixels)

Empty-mask convention. When P and G are both empty the denominators are 0; the image counts as
a perfect agreement: Dice = IoU = 1 (`EMPTY_SCORE`; e.g. a slice without lung and a model that
predicts none). A non-empty G with an empty P (or the reverse) scores 0. scikit-learn gives the
same numbers with `f1_score(..., zero_division=1.0)` / `jaccard_score(..., zero_division=1.0)`
on the flattened masks (tests/test_segmentation_metrics.py checks this).

Aggregation over a test set, both reported:
  dice, iou                 mean over images of the per-image score (every image weighs the
                            same; the headline number, as in most lung-segmentation papers);
  dice_std, iou_std         their standard deviation over images (ddof=0);
  dice_global, iou_global   pooled ("micro") over all pixels of the set: sum of intersections
                            over sum of sizes (large masks weigh more).

Everything is computed from three integer counts per image (|P n G|, |P|, |G|), so a test set
never has to be held in memory, and the counts of several processes just concatenate.
A prediction is `probability >= threshold` (0.5 by default: logit >= 0).
"""

from __future__ import annotations

import io
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np

from data_pipelines import storage

EMPTY_SCORE = 1.0
DEFAULT_THRESHOLD = 0.5


class MaskCounts(NamedTuple):
  """Per-image pixel counts, each (N,) int64: |P n G|, |P|, |G|."""
  intersection: np.ndarray
  predicted: np.ndarray
  target: np.ndarray

  @staticmethod
  def concatenate(parts: list["MaskCounts"]) -> "MaskCounts":
    if not parts:
      empty = np.zeros((0,), np.int64)
      return MaskCounts(empty, empty, empty)
    return MaskCounts(*(np.concatenate([getattr(p, f) for p in parts])
                        for f in MaskCounts._fields))


def mask_counts(predicted: np.ndarray, target: np.ndarray) -> MaskCounts:
  """Per-image counts of binary masks.

  Args:
    predicted: (N, H, W) or (H, W) binary masks (bool or 0/1).
    target: the ground truth, same shape.

  Returns:
    MaskCounts of N images (1 for a single (H, W) mask).

  Raises:
    ValueError: the shapes differ.
  """
  predicted, target = np.asarray(predicted), np.asarray(target)
  if predicted.shape != target.shape:
    raise ValueError(f"predicted mask {predicted.shape} and target mask {target.shape} differ "
                     "in shape")
  if predicted.ndim == 2:
    predicted, target = predicted[None], target[None]
  predicted = predicted.reshape(predicted.shape[0], -1).astype(bool)
  target = target.reshape(target.shape[0], -1).astype(bool)
  return MaskCounts((predicted & target).sum(axis=1).astype(np.int64),
                    predicted.sum(axis=1).astype(np.int64), target.sum(axis=1).astype(np.int64))


def dice_from_counts(counts: MaskCounts) -> np.ndarray:
  """(N,) per-image Dice; EMPTY_SCORE where both masks are empty."""
  denominator = counts.predicted + counts.target
  with np.errstate(invalid="ignore", divide="ignore"):
    dice = 2.0 * counts.intersection / denominator
  return np.where(denominator == 0, EMPTY_SCORE, dice).astype(np.float64)


def iou_from_counts(counts: MaskCounts) -> np.ndarray:
  """(N,) per-image IoU; EMPTY_SCORE where both masks are empty."""
  union = counts.predicted + counts.target - counts.intersection
  with np.errstate(invalid="ignore", divide="ignore"):
    iou = counts.intersection / union
  return np.where(union == 0, EMPTY_SCORE, iou).astype(np.float64)


def dice_score(predicted: np.ndarray, target: np.ndarray) -> float:
  """Dice of one pair of binary masks (any shape; see the module docstring for empty masks)."""
  predicted, target = np.asarray(predicted), np.asarray(target)
  return float(dice_from_counts(mask_counts(predicted.reshape(1, -1), target.reshape(1, -1)))[0])


def iou_score(predicted: np.ndarray, target: np.ndarray) -> float:
  """IoU of one pair of binary masks (any shape; see the module docstring for empty masks)."""
  predicted, target = np.asarray(predicted), np.asarray(target)
  return float(iou_from_counts(mask_counts(predicted.reshape(1, -1), target.reshape(1, -1)))[0])


def segmentation_metrics(counts: MaskCounts) -> dict[str, float]:
  """Aggregated metrics of a test set (keys in the module docstring).

  Args:
    counts: per-image counts of every image of the set.

  Returns:
    {dice, dice_std, dice_global, iou, iou_std, iou_global, num_examples, num_empty_targets};
    NaN scores for an empty set.
  """
  n = int(counts.intersection.shape[0])
  if n == 0:
    nan = float("nan")
    return {"dice": nan, "dice_std": nan, "dice_global": nan, "iou": nan, "iou_std": nan,
            "iou_global": nan, "num_examples": 0, "num_empty_targets": 0}
  dice, iou = dice_from_counts(counts), iou_from_counts(counts)
  pooled = MaskCounts(*(np.array([getattr(counts, f).sum()]) for f in MaskCounts._fields))
  return {"dice": float(dice.mean()), "dice_std": float(dice.std()),
          "dice_global": float(dice_from_counts(pooled)[0]),
          "iou": float(iou.mean()), "iou_std": float(iou.std()),
          "iou_global": float(iou_from_counts(pooled)[0]),
          "num_examples": n, "num_empty_targets": int((counts.target == 0).sum())}


class SegmentationEvaluator:
  """Runs a jitted `predict_fn(params, images) -> probabilities (B, H, W)` over one source.

  The source's records must carry `lung_mask`; the eval ops (deterministic resize / crop) move
  the mask with the image, so metrics are computed at the model's input resolution.
  `predict(params)` returns the per-image counts of every record (gathered over processes) and
  `num_samples` (image, mask, probability) triples for figures: a seeded, stratified random
  sample of the whole set (`data_pipelines.subset.sample`), chosen up front and collected as the
  batches stream by, never the first records (test files are often sorted by site or class).
  `run(params)` yields `(name, value)` pairs of `segmentation_metrics`.
  """

  def __init__(self, predict_fn: Callable, source: Any, *, ops: Any, batch_size: int, mesh: Any,
               num_channels: int, threshold: float = DEFAULT_THRESHOLD):
    from remedis_jax import sharding  # pylint: disable=g-import-not-at-top
    self._sharding = sharding
    self._predict_fn, self._source, self._ops = predict_fn, source, ops
    self._batch_size, self._num_channels = batch_size, num_channels
    self._batch_sharding = sharding.batch_sharding(mesh)
    self.threshold = float(threshold)

  def predict(self, params: Any, num_samples: int = 0,
              sample_seed: int = 0) -> tuple[MaskCounts, dict[str, np.ndarray]]:
    """Counts of every record, and figure samples of a random choice of records.

    Args:
      params: the model parameters.
      num_samples: how many (image, mask, probability) triples to return; they are the records
        of `data_pipelines.subset.sample(source, num_samples, sample_seed)`, in source order.
      sample_seed: seed of that sample.

    Returns:
      (MaskCounts of every record, {image, mask, probability} of the sampled records).

    Raises:
      ValueError: a batch has no `lung_mask` (the source has no masks).
    """
    import jax  # pylint: disable=g-import-not-at-top
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    from data_pipelines import pipeline, subset  # pylint: disable=g-import-not-at-top
    per_process = self._batch_size // jax.process_count()
    dataset = pipeline.make_eval_dataset(self._source, batch_size=per_process, ops=self._ops,
                                         num_channels=self._num_channels)
    # Record index of each sampled id; rows are matched by id, which holds for any sharding.
    chosen = {}
    if num_samples > 0:
      view = subset.sample(self._source, num_samples, sample_seed)
      chosen = dict(zip(view.ids, (int(i) for i in view.indices)))
    parts, samples, positions = [], {"image": [], "mask": [], "probability": []}, []
    for batch in dataset:
      if "lung_mask" not in batch:
        raise ValueError(f"{getattr(self._source, 'name', 'the source')} gives no lung_mask; "
                         "segmentation needs masks (folder source: set data.mask_column)")
      images = self._sharding.shard_host_batch({"image": np.asarray(batch["image"])},
                                               self._batch_sharding)["image"]
      probs = np.asarray(multihost_utils.process_allgather(self._predict_fn(params, images),
                                                           tiled=True), np.float32)
      valid = np.asarray(multihost_utils.process_allgather(np.asarray(batch["valid"]),
                                                           tiled=True))
      masks = np.asarray(multihost_utils.process_allgather(np.asarray(batch["lung_mask"]),
                                                           tiled=True))
      probs, masks = probs[valid], masks[valid]
      parts.append(mask_counts(probs >= self.threshold, masks > 0))
      if not chosen:
        continue
      local = np.array([chosen.get(str(i), -1) for i in np.asarray(batch["id"]).ravel()],
                       np.int64)
      position = np.asarray(multihost_utils.process_allgather(local, tiled=True))[valid]
      rows = position >= 0
      if rows.any():  # the same on every process (gathered), so the gather below is collective
        # Images are gathered only for batches holding figure rows (uint8, small).
        host_images = np.asarray(multihost_utils.process_allgather(np.asarray(batch["image"]),
                                                                   tiled=True))[valid]
        samples["image"].append(host_images[rows])
        samples["mask"].append(masks[rows])
        samples["probability"].append(probs[rows])
        positions.append(position[rows])
    if positions:
      order = np.argsort(np.concatenate(positions), kind="stable")
      samples = {k: np.concatenate(v)[order] for k, v in samples.items()}
    else:
      samples = {k: np.zeros((0,)) for k in samples}
    return MaskCounts.concatenate(parts), samples

  def run(self, params: Any) -> Iterator[tuple[str, float]]:
    counts, _ = self.predict(params)
    yield from segmentation_metrics(counts).items()


def save_prediction_grid(samples: dict[str, np.ndarray], path: str, *, title: str = "",
                         threshold: float = DEFAULT_THRESHOLD) -> None:
  """A PNG with one row per example: image, ground truth, prediction, overlay, per-image Dice.

  The overlay colours true positives green, false positives red and false negatives blue.

  Args:
    samples: {image (N, H, W, C) uint8, mask (N, H, W), probability (N, H, W)}.
    path: the PNG file (its folder is created).
    title: figure title.
    threshold: probability threshold of the predicted mask.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  n = int(samples["mask"].shape[0]) if samples["mask"].ndim == 3 else 0
  fig, axes = plt.subplots(max(n, 1), 4, figsize=(8, 2.1 * max(n, 1)), squeeze=False)
  for ax in axes.ravel():
    ax.axis("off")
  for column, name in enumerate(("image", "ground truth", "prediction", "overlay")):
    axes[0][column].set_title(name, fontsize=9)
  for row in range(n):
    image = samples["image"][row][..., 0]
    target = samples["mask"][row] > 0
    predicted = samples["probability"][row] >= threshold
    overlay = np.stack([image / 255.0] * 3, axis=-1) * 0.5
    overlay[predicted & target] = (0.1, 0.8, 0.1)
    overlay[predicted & ~target] = (0.9, 0.1, 0.1)
    overlay[~predicted & target] = (0.1, 0.3, 0.9)
    axes[row][0].imshow(image, cmap="gray", vmin=0, vmax=255)
    axes[row][1].imshow(target, cmap="gray", vmin=0, vmax=1)
    axes[row][2].imshow(samples["probability"][row], cmap="gray", vmin=0, vmax=1)
    axes[row][3].imshow(overlay)
    axes[row][3].text(0.02, 0.98, f"Dice {dice_score(predicted, target):.3f}", color="yellow",
                      fontsize=7, ha="left", va="top", transform=axes[row][3].transAxes)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=100)
  plt.close(fig)
  storage.write_bytes(path, buffer.getvalue())  # atomic, local or gs://
