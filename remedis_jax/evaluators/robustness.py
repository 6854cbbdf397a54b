"""Test-time perturbations for robustness evaluation: the same metrics on shifted inputs.

A perturbation is a deterministic map of a host batch of uint8 images (B, H, W, C) -> uint8 of
the same shape, applied AFTER the eval preprocessing (resize + centre crop) and before the
model. Each models one way acquisition differs between scanners and sites:

  intensity_scale(f)   x * f                    exposure / detector gain (f < 1: darker)
  intensity_shift(d)   x + 255 * d              offset (d in [-1, 1] of the full range)
  gamma(g)             255 * (x / 255) ** g     detector response curve (g > 1: darker mids)
  rotate(deg)          rotation about the centre by `deg` degrees (counter-clockwise),
                       bilinear, uncovered corners filled with 0 (patient positioning)
  scale(z)             zoom about the centre by z (z > 1 enlarges and cuts the borders;
                       z < 1 shrinks and pads with 0), bilinear (field of view / magnification)

Results are clipped to [0, 255] and rounded to the nearest integer. Specs are strings in the
config, e.g. `("gamma(0.7)", "rotate(15)", "scale(0.8)")`; `parse_perturbation` builds them.
`evaluate_robustness` runs a `ClassificationEvaluator` once per perturbation.
"""

from __future__ import annotations

import ast
import dataclasses
import math
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from PIL import Image

PERTURBATIONS = ("intensity_scale", "intensity_shift", "gamma", "rotate", "scale")


def _to_uint8(x: np.ndarray) -> np.ndarray:
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _check_batch(images: np.ndarray, name: str) -> np.ndarray:
  images = np.asarray(images)
  if images.ndim != 4 or images.dtype != np.uint8:
    raise ValueError(f"perturbation {name}: expected uint8 images (B, H, W, C); got "
                     f"{images.dtype} {images.shape}")
  return images


def _per_channel_pil(images: np.ndarray, transform: Callable[[Image.Image], Image.Image]):
  """Applies a PIL transform to every (image, channel) plane: works for any channel count."""
  out = np.empty_like(images)
  for b in range(images.shape[0]):
    for c in range(images.shape[-1]):
      out[b, :, :, c] = np.asarray(transform(Image.fromarray(images[b, :, :, c])))
  return out


@dataclasses.dataclass(frozen=True)
class Perturbation:
  """One named perturbation; call it on a uint8 batch."""
  kind: str
  value: float

  @property
  def name(self) -> str:
    return f"{self.kind}({self.value:g})"

  def __call__(self, images: np.ndarray) -> np.ndarray:
    images = _check_batch(images, self.name)
    x = images.astype(np.float64)
    if self.kind == "intensity_scale":
      return _to_uint8(x * self.value)
    if self.kind == "intensity_shift":
      return _to_uint8(x + 255.0 * self.value)
    if self.kind == "gamma":
      return _to_uint8(255.0 * np.power(x / 255.0, self.value))
    if self.kind == "rotate":
      angle = float(self.value)
      return _per_channel_pil(
          images, lambda im: im.rotate(angle, Image.Resampling.BILINEAR, fillcolor=0))
    if self.kind == "scale":
      zoom = float(self.value)
      height, width = images.shape[1:3]
      cx, cy = width / 2.0, height / 2.0
      # PIL's affine maps OUTPUT pixel (x, y) to INPUT (a x + b y + c, d x + e y + f):
      # input = centre + (output - centre) / zoom.
      coeffs = (1 / zoom, 0.0, cx - cx / zoom, 0.0, 1 / zoom, cy - cy / zoom)
      return _per_channel_pil(images, lambda im: im.transform(
          (width, height), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR,
          fillcolor=0))
    raise ValueError(f"unknown perturbation {self.kind!r}; known: {', '.join(PERTURBATIONS)}")


def parse_perturbation(spec: str) -> Perturbation:
  """"gamma(0.7)" -> Perturbation("gamma", 0.7).

  Raises:
    ValueError: unparsable text, an unknown name (lists the known ones), or an invalid value
      (scale and intensity_scale must be > 0, gamma > 0).
  """
  try:
    node = ast.parse(spec.strip(), mode="eval").body
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and len(node.args) == 1 and not node.keywords):
      raise ValueError
    kind, value = node.func.id, float(ast.literal_eval(node.args[0]))
  except (SyntaxError, ValueError):
    raise ValueError(f"perturbation {spec!r}: expected name(number), e.g. 'gamma(0.7)'; known "
                     f"names: {', '.join(PERTURBATIONS)}") from None
  if kind not in PERTURBATIONS:
    raise ValueError(f"perturbation {spec!r}: unknown name {kind!r}; known: "
                     f"{', '.join(PERTURBATIONS)}")
  if kind in ("scale", "intensity_scale", "gamma") and not value > 0:
    raise ValueError(f"perturbation {spec!r}: {kind} must be > 0")
  if not math.isfinite(value):
    raise ValueError(f"perturbation {spec!r}: value must be finite")
  return Perturbation(kind, value)


def parse_perturbations(specs: Iterable[str]) -> list[Perturbation]:
  return [parse_perturbation(s) for s in specs if str(s).strip()]


def evaluate_robustness(evaluator: Any, params: Any, perturbations: Sequence[Perturbation],
                        thresholds: np.ndarray | None = None) -> dict[str, dict[str, float]]:
  """Metrics of `evaluator` (a ClassificationEvaluator) under each perturbation.

  Args:
    evaluator: a `classification.ClassificationEvaluator` of one test set.
    params: the model parameters.
    perturbations: from `parse_perturbations`.
    thresholds: validation operating points (as for the unperturbed test set), or None.

  Returns:
    {perturbation name: {metric: value}}, e.g. {"gamma(0.7)": {"macro_auc": ...}}.
  """
  return {p.name: dict(evaluator.with_perturbation(p).run(params, thresholds))
          for p in perturbations}
