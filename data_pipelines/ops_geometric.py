"""Geometric augmentation ops: crops, flips, rotations, resizes, elastic deformation.

Every op is a small frozen dataclass called as `op(features, rng) -> features` on the feature
dict (see `data_pipelines/ops.py` for the contract). Geometric ops move `lung_mask` together
with `image` when the mask is present: the same crop box, flip, angle or displacement field,
resampled with nearest neighbour so the mask stays binary (segmentation fine-tuning relies on
image and mask staying aligned).

Implementation notes (measured with `experiments/benchmarks/input_pipeline.py`; numbers in
docs/benchmarks.md):
- Crops are folded into the resize: PIL's `resize(..., box=...)` reads only the crop box and
  resamples straight to the output size, so we never materialise the crop or resize the whole
  source image (crop BEFORE resize).
- PIL's BILINEAR resize antialiases when downsampling (its filter support scales with the
  factor), which is what torchvision's PIL path does too, so views match the SimCLR recipe.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from PIL import Image
import scipy.ndimage

Features = dict[str, Any]

_BILINEAR = Image.Resampling.BILINEAR
_NEAREST = Image.Resampling.NEAREST


def to_pil(image: np.ndarray) -> Image.Image:
  """(H, W, 1) or (H, W, 3) uint8 -> PIL image in mode L or RGB (one copy at most)."""
  if image.ndim == 3 and image.shape[-1] == 1:
    return Image.fromarray(np.ascontiguousarray(image[..., 0]), mode="L")
  if image.ndim == 3 and image.shape[-1] == 3:
    return Image.fromarray(np.ascontiguousarray(image), mode="RGB")
  if image.ndim == 2:  # Masks.
    return Image.fromarray(np.ascontiguousarray(image), mode="L")
  raise ValueError(f"expected an image (H, W, 1|3) or a mask (H, W); got shape {image.shape}")


def from_pil(image: Image.Image, keep_channel_axis: bool = True) -> np.ndarray:
  """PIL image -> numpy uint8 (H, W, C); mode L gives (H, W, 1) unless keep_channel_axis=False."""
  array = np.asarray(image)
  if array.ndim == 2 and keep_channel_axis:
    array = array[..., None]
  return array


def check_image(features: Features, op: str) -> np.ndarray:
  """Returns features["image"] after checking it is uint8 (H, W, 1|3); errors name the op."""
  image = features.get("image")
  if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[-1] not in (1, 3):
    got = getattr(image, "shape", type(image).__name__)
    raise ValueError(f"op {op}: features['image'] must be a numpy (H, W, 1|3) array; got {got}")
  if image.dtype != np.uint8:
    raise ValueError(
        f"op {op}: expects uint8 images, got {image.dtype}; put intensity_window first in the "
        "op list to map high-bit-depth images to uint8")
  return image


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
  """An int size means square; returns (height, width)."""
  if isinstance(size, (int, np.integer)):
    return int(size), int(size)
  height, width = size
  return int(height), int(width)


def _resize_box(features: Features, box: tuple[int, int, int, int],
                out_hw: tuple[int, int]) -> Features:
  """Crops `box` = (left, top, right, bottom) and resizes to `out_hw` in one PIL call."""
  out = dict(features)
  height, width = out_hw
  out["image"] = from_pil(to_pil(features["image"]).resize((width, height), _BILINEAR, box=box))
  if "lung_mask" in features:
    out["lung_mask"] = from_pil(
        to_pil(features["lung_mask"]).resize((width, height), _NEAREST, box=box),
        keep_channel_axis=False)
  return out


def sample_crop_box(height: int, width: int, area: tuple[float, float],
                    aspect_ratio: tuple[float, float], rng: np.random.Generator,
                    attempts: int = 10) -> tuple[int, int, int, int]:
  """Samples an Inception-style crop box (top, left, crop_height, crop_width).

  The area fraction is uniform in `area` and the aspect ratio log-uniform in `aspect_ratio`;
  after `attempts` misses it falls back to the largest centred crop with a clamped ratio
  (the rule of torchvision's RandomResizedCrop, which SimCLR implementations share).

  Args:
    height: source height.
    width: source width.
    area: (min, max) fraction of the source area.
    aspect_ratio: (min, max) width / height of the crop.
    rng: the per-record generator.
    attempts: rejection-sampling attempts before the fallback.

  Returns:
    (top, left, crop_height, crop_width) in pixels.
  """
  source_area = height * width
  log_ratio = (math.log(aspect_ratio[0]), math.log(aspect_ratio[1]))
  for _ in range(attempts):
    target_area = source_area * rng.uniform(area[0], area[1])
    ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    crop_width = int(round(math.sqrt(target_area * ratio)))
    crop_height = int(round(math.sqrt(target_area / ratio)))
    if 0 < crop_width <= width and 0 < crop_height <= height:
      top = int(rng.integers(0, height - crop_height + 1))
      left = int(rng.integers(0, width - crop_width + 1))
      return top, left, crop_height, crop_width
  source_ratio = width / height
  if source_ratio < min(aspect_ratio):
    crop_width, crop_height = width, int(round(width / min(aspect_ratio)))
  elif source_ratio > max(aspect_ratio):
    crop_height, crop_width = height, int(round(height * max(aspect_ratio)))
  else:
    crop_height, crop_width = height, width
  return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


@dataclasses.dataclass(frozen=True)
class RandomResizedCrop:
  """Inception / SimCLR random resized crop to `size` (bilinear; the mask nearest).

  Attributes:
    size: output size, int (square) or (height, width).
    area: (min, max) fraction of the source area kept; SimCLR uses (0.08, 1.0).
    aspect_ratio: (min, max) crop width / height, sampled log-uniformly.
  """
  size: int | tuple[int, int]
  area: tuple[float, float] = (0.08, 1.0)
  aspect_ratio: tuple[float, float] = (3 / 4, 4 / 3)

  def __post_init__(self):
    if not 0 < self.area[0] <= self.area[1] <= 1:
      raise ValueError(f"random_resized_crop: area must satisfy 0 < min <= max <= 1; got {self.area}")
    if not 0 < self.aspect_ratio[0] <= self.aspect_ratio[1]:
      raise ValueError(f"random_resized_crop: aspect_ratio must be 0 < min <= max; got {self.aspect_ratio}")

  def __call__(self, features: Features, rng: np.random.Generator) -> Features:
    image = check_image(features, "random_resized_crop")
    top, left, crop_height, crop_width = sample_crop_box(
        image.shape[0], image.shape[1], self.area, self.aspect_ratio, rng)
    return _resize_box(features, (left, top, left + crop_width, top + crop_height), _pair(self.size))


@dataclasses.dataclass(frozen=True)
class FlipLeftRight:
  """Horizontal flip with probability `p` (image and mask together)."""
  p: float = 0.5

  def __call__(self, features: Features, rng: np.random.Generator) -> Features:
    check_image(features, "flip_lr")
    if rng.random() >= self.p:
      return features
    return {k: (v[:, ::-1] if k in ("image", "lung_mask") else v) for k, v in features.items()}


@dataclasses.dataclass(frozen=True)
class FlipUpDown:
  """Vertical flip with probability `p`. Not for chest X-rays: the anatomy has an up."""
  p: float = 0.5

  def __call__(self, features: Features, rng: np.random.Generator) -> Features:
    check_image(features, "flip_ud")
    if rng.random() >= self.p:
      return features
    return {k: (v[::-1] if k in ("image", "lung_mask") else v) for k, v in features.items()}


@dataclasses.dataclass(frozen=True)
class Rot90:
  """Rotation by k * 90 degrees, k uniform in {0, 1, 2, 3}: exact, no resampling.

  Pathology tiles and dermoscopy have no canonical orientation, so all four are equally valid.
  """

  def __call__(self, features: Features, rng: np.random.Generator) -> Features:
    check_image(features, "rot90")
    k = int(rng.integers(4))
    if k == 0:
      return features
    return {k_: (np.rot90(v, k, axes=(0, 1)) if k_ in ("image", "lung_mask") else v)
            for k_, v in features.items()}


@dataclasses.dataclass(frozen=True)
class Rotate:
  """Rotation by an angle uniform in [-max_degrees, max_degrees] about the centre.

  The output keeps the input size (corners that leave the frame are cut, new corners are
  filled with `fill`); bilinear for the image, nearest for the mask (filled with 0).

  Attributes:
    max_degrees: the largest absolute angle.
    p: probability of rotating at all.
    fill: grey level (0..255) for the uncovered corners.
  """
  max_degrees: float = 10.0
  p: float = 1.0
  fill: int = 0

  def __call__(self, features: Features, rng: np.random.Generator) -> Features:
    image = check_image(features, "rotate")
    angle = rng.uniform(-self.max_degrees, self.max_degrees)
    if rng.random() >= self.p or angle == 0:
      return features
    out = dict(features)
    fill = self.fill if image.shape[-1] == 1 else (self.fill,) * 3
    out["image"] = from_pil(to_pil(image).rotate(angle, _BILINEAR, fillcolor=fill))
    if "lung_mask" in features:
      out["lung_mask"] = from_pil(
          to_pil(features["lung_mask"]).rotate(angle, _NEAREST, fillcolor=0),
          keep_channel_axis=False)
    return out


@dataclasses.dataclass(frozen=True)
class Resize:
  """Deterministic resize to `size` (int = square, or (height, width)); bilinear, antialiased."""
  size: int | tuple[int, int]

  def __call__(self, features: Features, rng: np.random.Generator) -> Features:
    del rng
    image = check_image(features, "resize")
    height, width = image.shape[:2]
    if (height, width) == _pair(self.size):
      return features
    return _resize_box(features, (0, 0, width, height), _pair(self.size))


@dataclasses.dataclass(frozen=True)
class ResizeSmall:
  """Deterministic resize so that the shorter side is `size`, keeping the aspect ratio."""
  size: int

  def __call__(self, features: Features, rng: np.random.Generator) -> Features:
    del rng
    image = check_image(features, "resize_small")
    height, width = image.shape[:2]
    scale = self.size / min(height, width)
    out_hw = (max(self.size, int(round(height * scale))), max(self.size, int(round(width * scale))))
    if out_hw == (height, width):
      return features
    return _resize_box(features, (0, 0, width, height), out_hw)


@dataclasses.dataclass(frozen=True)
class CentralCrop:
  """Deterministic centre crop to `size` (int = square, or (height, width)).

  Raises:
    ValueError: when the image is smaller than the crop (resize_small first).
  """
  size: int | tuple[int, int]

  def __call__(self, features: Features, rng: np.random.Generator) -> Features:
    del rng
    image = check_image(features, "central_crop")
    height, width = image.shape[:2]
    crop_height, crop_width = _pair(self.size)
    if crop_height > height or crop_width > width:
      raise ValueError(f"central_crop({self.size}): image is only {height}x{width}; put "
                       f"resize_small({max(crop_height, crop_width)}) before it")
    top, left = (height - crop_height) // 2, (width - crop_width) // 2
    return {k: (v[top:top + crop_height, left:left + crop_width]
                if k in ("image", "lung_mask") else v) for k, v in features.items()}


@dataclasses.dataclass(frozen=True)
class ElasticDeformation:
  """Simard-style elastic deformation: a smooth random displacement field, bilinear resampling.

  The displacement field is white noise in [-1, 1] smoothed with a Gaussian of `sigma` pixels
  and scaled by `alpha` pixels. It is drawn on a grid 4x coarser than the image and upsampled,
  which is much cheaper than smoothing at full resolution and statistically similar for
  sigma >= 4 px (the field has no detail finer than sigma anyway).

  Attributes:
    alpha: displacement magnitude in pixels (before smoothing shrinks it).
    sigma: smoothness of the field in pixels.
    p: probability of deforming.
  """
  alpha: float = 34.0
  sigma: float = 4.0
  p: float = 0.5

  def __call__(self, features: Features, rng: np.random.Generator) -> Features:
    image = check_image(features, "elastic")
    apply = rng.random() < self.p
    height, width = image.shape[:2]
    factor = 4
    coarse_hw = (max(2, -(-height // factor)), max(2, -(-width // factor)))
    noise = rng.uniform(-1, 1, size=(2,) + coarse_hw).astype(np.float32)
    if not apply:
      return features
    fields = []
    for component in noise:
      smooth = scipy.ndimage.gaussian_filter(component, self.sigma / factor, mode="reflect")
      # Upsample the coarse field with PIL (float mode F) to the image grid.
      fine = np.asarray(Image.fromarray(smooth, mode="F").resize((width, height), _BILINEAR))
      # Smoothed white noise on a grid `factor` times coarser has `factor` times the standard
      # deviation of the full-resolution field; dividing keeps alpha's usual meaning.
      fields.append(fine * (self.alpha / factor))
    rows, cols = np.meshgrid(np.arange(height, dtype=np.float32),
                             np.arange(width, dtype=np.float32), indexing="ij")
    coords = np.stack([rows + fields[0], cols + fields[1]])
    out = dict(features)
    channels = [scipy.ndimage.map_coordinates(image[..., c], coords, order=1, mode="reflect")
                for c in range(image.shape[-1])]
    out["image"] = np.stack(channels, axis=-1).astype(np.uint8)
    if "lung_mask" in features:
      out["lung_mask"] = scipy.ndimage.map_coordinates(
          features["lung_mask"], coords, order=0, mode="reflect").astype(np.uint8)
    return out
