"""Intensity and colour augmentation ops: SimCLR colour distortion and blur, medical intensity ops.

Same contract as the geometric ops (`op(features, rng) -> features`, uint8 in, uint8 out), but
these touch only `features["image"]`: a lung mask does not change when the image gets brighter.

Implementation notes (per-op costs measured on 224x224x3 uint8 on a CPU):
- Point-wise ops (brightness, contrast, gamma, window) are 256-entry lookup tables applied with
  PIL `Image.point` (~0.15 ms) instead of float arithmetic over every pixel.
- Saturation and grayscale use PIL's C blend / convert (~0.2 ms); hue goes through PIL's HSV
  conversion (~2.4 ms), the same exact HSV shift torchvision and SimCLR use.
- Gaussian blur is a separable, truncated Gaussian (scipy.ndimage.correlate1d, ~2.7 ms at
  sigma=1.5); the kernel is cut at min(10% of the image size, 4 sigma) because weights beyond
  4 sigma sum to < 1e-4 and cannot change a uint8 value, and a shorter kernel is faster.
- All colour ops run on the small output view (after the crop), never on the source image.
- Colour ops on single-channel images apply brightness / contrast only: saturation and hue are
  undefined for grey levels (and a grey image stays grey under both anyway).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from PIL import Image, ImageOps
import scipy.ndimage

from data_pipelines.ops_geometric import check_image, from_pil, to_pil

Features = dict[str, Any]

_IDENTITY = np.arange(256, dtype=np.float64)


def _lut_uint8(values: np.ndarray) -> list[int]:
  """Rounds and clips a float (256,) table to the uint8 lookup table PIL wants."""
  return np.clip(np.rint(values), 0, 255).astype(np.uint8).tolist()


def _apply_lut(image: Image.Image, lut: list[int]) -> Image.Image:
  # PIL wants one table per band.
  return image.point(lut * len(image.getbands()))


def _grey_mean(image: Image.Image) -> float:
  """Mean luma (ITU-R 601-2, PIL's L conversion), the contrast pivot torchvision uses."""
  grey = image if image.mode == "L" else image.convert("L")
  histogram = np.asarray(grey.histogram(), dtype=np.float64)
  return float(histogram @ _IDENTITY / max(histogram.sum(), 1))


def adjust_brightness(image: Image.Image, factor: float) -> Image.Image:
  """Multiplies intensities by `factor` (blend with black), clipped to [0, 255]."""
  return _apply_lut(image, _lut_uint8(_IDENTITY * factor))


def adjust_contrast(image: Image.Image, factor: float) -> Image.Image:
  """Blends with the mean grey level: factor 0 gives a flat image, 1 the input."""
  mean = _grey_mean(image)
  return _apply_lut(image, _lut_uint8(factor * _IDENTITY + (1 - factor) * mean))


def adjust_saturation(image: Image.Image, factor: float) -> Image.Image:
  """Blends with the image's own grayscale: factor 0 gives grey, 1 the input (RGB only)."""
  if image.mode != "RGB":
    return image
  grey = image.convert("L").convert("RGB")
  return Image.blend(grey, image, factor)


def adjust_hue(image: Image.Image, shift: float) -> Image.Image:
  """Rotates the hue by `shift` turns (in [-0.5, 0.5]) in HSV space (RGB only)."""
  if image.mode != "RGB" or shift == 0:
    return image
  hue, saturation, value = image.convert("HSV").split()
  # uint8 addition wraps around, which is exactly the hue circle in PIL's 0..255 hue scale.
  hue = Image.fromarray(np.asarray(hue) + np.uint8(int(round(shift * 255)) % 256), mode="L")
  return Image.merge("HSV", (hue, saturation, value)).convert("RGB")


@dataclasses.dataclass(frozen=True)
class ColorJitter:
  """Random brightness, contrast, saturation and hue, in a random order, with probability p.

  Factors are uniform in [max(0, 1 - x), 1 + x] for brightness / contrast / saturation and the
  hue shift uniform in [-hue, hue] turns (torchvision ColorJitter / SimCLR v2 semantics).

  Attributes:
    brightness: max relative brightness change.
    contrast: max relative contrast change.
    saturation: max relative saturation change (ignored for 1-channel images).
    hue: max hue rotation in turns, <= 0.5 (ignored for 1-channel images).
    p: probability of applying the jitter at all.
  """
  brightness: float = 0.0
  contrast: float = 0.0
  saturation: float = 0.0
  hue: float = 0.0
  p: float = 1.0

  def __post_init__(self):
    if not 0 <= self.hue <= 0.5:
      raise ValueError(f"color_jitter: hue must be in [0, 0.5] turns; got {self.hue}")
    for name in ("brightness", "contrast", "saturation"):
      if getattr(self, name) < 0:
        raise ValueError(f"color_jitter: {name} must be >= 0; got {getattr(self, name)}")

  def __call__(self, features: Features, rng: np.random.Generator) -> Features:
    image = check_image(features, "color_jitter")
    # Draw every random number whether or not it is used, so the stream does not depend on p.
    apply = rng.random() < self.p
    order = rng.permutation(4)
    factors = [rng.uniform(max(0.0, 1 - x), 1 + x)
               for x in (self.brightness, self.contrast, self.saturation)]
    hue_shift = rng.uniform(-self.hue, self.hue)
    if not apply:
      return features
    pil_image = to_pil(image)
    for which in order:
      if which == 0 and self.brightness > 0:
        pil_image = adjust_brightness(pil_image, factors[0])
      elif which == 1 and self.contrast > 0:
        pil_image = adjust_contrast(pil_image, factors[1])
      elif which == 2 and self.saturation > 0:
        pil_image = adjust_saturation(pil_image, factors[2])
      elif which == 3 and self.hue > 0:
        pil_image = adjust_hue(pil_image, hue_shift)
    return {**features, "image": from_pil(pil_image)}


@dataclasses.dataclass(frozen=True)
class RandomGrayscale:
  """With probability p, replaces RGB by its luma in all three channels (1-channel: no-op)."""
  p: float = 0.2

  def __call__(self, features: Features, rng: np.random.Generator) -> Features:
    image = check_image(features, "random_grayscale")
    if rng.random() >= self.p or image.shape[-1] == 1:
      return features
    grey = to_pil(image).convert("L")
    return {**features, "image": np.repeat(from_pil(grey), 3, axis=-1)}


@dataclasses.dataclass(frozen=True)
class ColorDistortion:
  """The SimCLR colour distortion of strength s (Chen et al. 2020, appendix A).

  Colour jitter (brightness, contrast, saturation 0.8 s; hue 0.2 s; random order) with
  probability `jitter_p` = 0.8, then random grayscale with probability `grayscale_p` = 0.2.
  SimCLR uses s = 1.0 on ImageNet; s = 0.5 is the CIFAR setting.

  Attributes:
    strength: s.
    jitter_p: probability of the colour jitter.
    grayscale_p: probability of the grayscale conversion.
  """
  strength: float = 1.0
  jitter_p: float = 0.8
  grayscale_p: float = 0.2

  def __call__(self, features: Features, rng: np.random.Generator) -> Features:
    s = self.strength
    jitter = ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, min(0.5, 0.2 * s), p=self.jitter_p)
    return RandomGrayscale(self.grayscale_p)(jitter(features, rng), rng)


def gaussian_kernel_1d(sigma: float, radius: int) -> np.ndarray:
  """Normalised Gaussian taps at -radius..radius (float32)."""
  x = np.arange(-radius, radius + 1, dtype=np.float64)
  kernel = np.exp(-0.5 * (x / sigma) ** 2)
  return (kernel / kernel.sum()).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class GaussianBlur:
  """SimCLR Gaussian blur: probability p, sigma uniform in `sigma`, kernel 10% of the image side.

  Separable, reflect padding (torchvision's choice; SimCLR's TF code pads with zeros, which
  darkens borders). The kernel radius is min(kernel_fraction * side / 2, ceil(4 sigma)); see the
  module notes for why the cut is exact in uint8.

  Attributes:
    p: probability of blurring (SimCLR: 0.5 for ImageNet).
    sigma: (min, max) of the uniform sigma in pixels.
    kernel_fraction: kernel size as a fraction of the image side.
  """
  p: float = 0.5
  sigma: tuple[float, float] = (0.1, 2.0)
  kernel_fraction: float = 0.1

  def __call__(self, features: Features, rng: np.random.Generator) -> Features:
    image = check_image(features, "gaussian_blur")
    apply = rng.random() < self.p
    sigma = rng.uniform(self.sigma[0], self.sigma[1])
    if not apply:
      return features
    radius = int(self.kernel_fraction * min(image.shape[:2])) // 2
    radius = min(radius, int(math.ceil(4 * sigma)))
    if radius < 1:
      return features
    kernel = gaussian_kernel_1d(sigma, radius)
    blurred = scipy.ndimage.correlate1d(image, kernel, axis=0, mode="reflect", output=np.float32)
    blurred = scipy.ndimage.correlate1d(blurred, kernel, axis=1, mode="reflect", output=np.float32)
    return {**features, "image": np.clip(blurred + 0.5, 0, 255).astype(np.uint8)}


@dataclasses.dataclass(frozen=True)
class RandomGamma:
  """Gamma correction 255 * (x / 255) ** gamma, gamma log-uniform in `gamma`, probability p.

  The standard radiograph intensity augmentation: it changes the exposure curve (soft tissue vs
  bone contrast) without saturating either end, unlike a linear brightness change.
  """
  gamma: tuple[float, float] = (0.7, 1.5)
  p: float = 0.5

  def __post_init__(self):
    if not 0 < self.gamma[0] <= self.gamma[1]:
      raise ValueError(f"random_gamma: gamma must satisfy 0 < min <= max; got {self.gamma}")

  def __call__(self, features: Features, rng: np.random.Generator) -> Features:
    image = check_image(features, "random_gamma")
    apply = rng.random() < self.p
    gamma = math.exp(rng.uniform(math.log(self.gamma[0]), math.log(self.gamma[1])))
    if not apply:
      return features
    lut = _lut_uint8(255.0 * (_IDENTITY / 255.0) ** gamma)
    return {**features, "image": from_pil(_apply_lut(to_pil(image), lut))}


@dataclasses.dataclass(frozen=True)
class IntensityWindow:
  """Linear intensity window [low, high] -> [0, 255] uint8 (values outside are clipped).

  Accepts any integer or float dtype, so it is the op that brings high-bit-depth (uint16)
  images into uint8; `low=None` / `high=None` use the image's own min / max (a per-image
  full-range window). With `jitter` > 0 both ends move by up to jitter * (high - low), a
  window-level augmentation in the spirit of radiologists' window/level settings.

  Attributes:
    low: value mapped to 0 (None: image min).
    high: value mapped to 255 (None: image max).
    jitter: relative random shift of each end (0: deterministic).
  """
  low: float | None = None
  high: float | None = None
  jitter: float = 0.0

  def __call__(self, features: Features, rng: np.random.Generator) -> Features:
    image = features["image"]
    shifts = rng.uniform(-self.jitter, self.jitter, size=2) if self.jitter > 0 else (0.0, 0.0)
    low = float(image.min()) if self.low is None else float(self.low)
    high = float(image.max()) if self.high is None else float(self.high)
    width = max(high - low, 1e-6)
    low, high = low + shifts[0] * width, high + shifts[1] * width
    width = max(high - low, 1e-6)
    if image.dtype == np.uint8:
      lut = _lut_uint8((_IDENTITY - low) * 255.0 / width)
      return {**features, "image": np.asarray(lut, dtype=np.uint8)[image]}
    windowed = (image.astype(np.float64) - low) * 255.0 / width
    return {**features, "image": np.clip(np.rint(windowed), 0, 255).astype(np.uint8)}


@dataclasses.dataclass(frozen=True)
class Equalize:
  """Histogram equalisation (per channel for RGB) with probability p (PIL ImageOps.equalize)."""
  p: float = 1.0

  def __call__(self, features: Features, rng: np.random.Generator) -> Features:
    image = check_image(features, "equalize")
    if rng.random() >= self.p:
      return features
    return {**features, "image": from_pil(ImageOps.equalize(to_pil(image)))}


@dataclasses.dataclass(frozen=True)
class GaussianNoise:
  """Additive Gaussian noise, std uniform in `sigma` (grey levels), probability p, clipped."""
  sigma: tuple[float, float] = (0.0, 8.0)
  p: float = 0.5

  def __call__(self, features: Features, rng: np.random.Generator) -> Features:
    image = check_image(features, "gaussian_noise")
    apply = rng.random() < self.p
    sigma = rng.uniform(self.sigma[0], self.sigma[1])
    if not apply or sigma == 0:
      return features
    noise = rng.standard_normal(image.shape, dtype=np.float32) * np.float32(sigma)
    return {**features, "image": np.clip(image + noise + 0.5, 0, 255).astype(np.uint8)}


# Optical densities of haematoxylin, eosin and DAB (Ruifrok & Johnston 2001), one stain per
# row; the inverse maps RGB optical density to stain concentrations.
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_RGB_FROM_HED = _RGB_FROM_HED / np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)


@dataclasses.dataclass(frozen=True)
class StainJitter:
  """H&E stain augmentation (Tellez et al. 2018 "HED-light"): perturbs stain concentrations.

  RGB -> optical density -> HED concentrations c; c' = a * c + b with a ~ U(1 - sigma, 1 + sigma)
  and b ~ U(-sigma, sigma) per stain; back to RGB. Models the lab-to-lab stain variation that
  colour jitter in RGB only approximates. RGB images only (1-channel: no-op).

  Attributes:
    sigma: perturbation strength (0.05 is "light", 0.2 "strong").
    p: probability of applying it.
  """
  sigma: float = 0.05
  p: float = 1.0

  def __call__(self, features: Features, rng: np.random.Generator) -> Features:
    image = check_image(features, "stain_jitter")
    apply = rng.random() < self.p
    scale = rng.uniform(1 - self.sigma, 1 + self.sigma, size=3)
    shift = rng.uniform(-self.sigma, self.sigma, size=3)
    if not apply or image.shape[-1] != 3:
      return features
    optical_density = -np.log((image.astype(np.float32) + 1.0) / 256.0)
    stains = optical_density @ _HED_FROM_RGB.astype(np.float32)
    stains = stains * scale.astype(np.float32) + shift.astype(np.float32)
    rgb = 256.0 * np.exp(-(stains @ _RGB_FROM_HED.astype(np.float32))) - 1.0
    return {**features, "image": np.clip(rgb + 0.5, 0, 255).astype(np.uint8)}


# ----------------------------------------------------------------------------------------
# Radiograph intensity ops of Ghesu et al. 2022 ("Contrastive self-supervised learning from 100
# million medical images with optional supervision", J. Med. Imaging 9(6); arXiv 2201.01283).


@dataclasses.dataclass(frozen=True)
class EnergyIntensity:
  """Energy-based intensity adjustment of a radiograph: a simulated change of beam energy.

  From the paper: radiographs get an energy-based intensity augmentation, so that two views of
  one image differ as acquisitions of the same patient at different X-ray beam energies would.
  The paper's own formula was not available to us (only its description); the physical model
  below is our approximation, kept simple and monotonic:

  * A displayed radiograph pixel (log-transformed, MONOCHROME2: dense = bright) is a line
    integral of attenuation, so the normalised intensity a = I / 255 in [0, 1] is read as the
    attenuation along the ray at the acquisition energy E.
  * Attenuation has a Compton part, nearly energy-independent over diagnostic energies
    (20-150 keV), and a photoelectric part falling as E**-n with n ~ 3. Photoelectric
    absorption grows steeply with atomic number, so its share is larger in bone than in soft
    tissue; we let the share grow with the attenuation itself: phi(a) = f * a, where f is the
    photoelectric share of the densest pixel (a = 1).
  * At a new energy E' = s * E each pixel's attenuation becomes
      a'(a) = a * ((1 - phi(a)) + phi(a) * s**-n) = a + d * a**2,  d = f * (s**-n - 1),
    and the display re-normalises to the densest pixel: a'' = a'(a) / a'(1). A higher energy
    (s > 1) lowers bone-to-soft-tissue contrast (mid grey levels rise towards bone), a lower
    one raises it: the familiar kVp trade-off.
  * The curve is one 256-entry lookup table, the same for every channel. It is strictly
    increasing for any s when f <= 0.5 (slope 1 + 2 d a with d >= -f), so the order of grey
    levels is always kept (uint8 rounding may merge neighbours), 0 stays 0 and 255 stays 255,
    and s = 1 is the identity.

  A Compton energy dependence E**-c would only change the effective exponent to n - c after the
  re-normalisation, so it is not a separate parameter. Images stored inverted (MONOCHROME1)
  should be inverted before this op; on them the curve still preserves the order of grey
  levels but bends the wrong tissue.

  Attributes:
    energy_ratio: (min, max) of s = E' / E, sampled log-uniformly; (1, 1) is the identity.
      The default (0.8, 1.25) is about +-20 kVp around a 90 kVp chest technique (our choice).
    photoelectric_fraction: f, the photoelectric share of the densest pixel's attenuation, in
      [0, 0.5] (bone at chest-radiography energies: roughly 0.3-0.5; soft tissue less).
    photoelectric_exponent: n in E**-n.
    p: probability of applying the adjustment.
  """
  energy_ratio: tuple[float, float] = (0.8, 1.25)
  photoelectric_fraction: float = 0.4
  photoelectric_exponent: float = 3.0
  p: float = 0.5

  def __post_init__(self):
    low, high = self.energy_ratio
    if not 0 < low <= high:
      raise ValueError(
          f"energy_intensity: energy_ratio must satisfy 0 < min <= max; got {self.energy_ratio}")
    if not 0 <= self.photoelectric_fraction <= 0.5:
      raise ValueError("energy_intensity: photoelectric_fraction must be in [0, 0.5] (above 0.5 "
                       "the curve can fold over and reorder grey levels); got "
                       f"{self.photoelectric_fraction}")
    if self.photoelectric_exponent < 0:
      raise ValueError("energy_intensity: photoelectric_exponent must be >= 0; got "
                       f"{self.photoelectric_exponent}")

  def curve(self, energy_ratio: float) -> np.ndarray:
    """The float (256,) table 255 * a''(a) of the module model for one energy ratio s."""
    d = self.photoelectric_fraction * (energy_ratio ** -self.photoelectric_exponent - 1.0)
    a = _IDENTITY / 255.0
    return 255.0 * (a + d * a * a) / (1.0 + d)

  def __call__(self, features: Features, rng: np.random.Generator) -> Features:
    image = check_image(features, "energy_intensity")
    apply = rng.random() < self.p
    low, high = self.energy_ratio
    energy_ratio = math.exp(rng.uniform(math.log(low), math.log(high)))
    if not apply:
      return features
    lut = np.asarray(_lut_uint8(self.curve(energy_ratio)), dtype=np.uint8)
    return {**features, "image": lut[image]}


@dataclasses.dataclass(frozen=True)
class LinearIntensity:
  """Random linear intensity transform I' = a * I + b on the [0, 1] scale, clipped.

  From the paper: linear intensity transforms are among its intensity augmentations (window
  width / level and detector gain and offset differ between scanners). The parameterisation
  and ranges are our choice: a uniform in `scale`, b uniform in `shift`. Unlike `color_jitter`'s contrast, the
  pivot is black (0), not the image mean, so the op is the same point-wise map for every image.

  Attributes:
    scale: (min, max) of the gain a, > 0 (a negative gain would invert the image).
    shift: (min, max) of the offset b, in units of the full range (0.1 = 25.5 grey levels).
    p: probability of applying the transform.
  """
  scale: tuple[float, float] = (0.8, 1.2)
  shift: tuple[float, float] = (-0.1, 0.1)
  p: float = 0.5

  def __post_init__(self):
    if not 0 < self.scale[0] <= self.scale[1]:
      raise ValueError(f"linear_intensity: scale must satisfy 0 < min <= max; got {self.scale}")
    if not self.shift[0] <= self.shift[1]:
      raise ValueError(f"linear_intensity: shift must satisfy min <= max; got {self.shift}")

  def __call__(self, features: Features, rng: np.random.Generator) -> Features:
    image = check_image(features, "linear_intensity")
    apply = rng.random() < self.p
    scale = rng.uniform(self.scale[0], self.scale[1])
    shift = rng.uniform(self.shift[0], self.shift[1])
    if not apply:
      return features
    lut = np.asarray(_lut_uint8(255.0 * (scale * (_IDENTITY / 255.0) + shift)), dtype=np.uint8)
    return {**features, "image": lut[image]}
