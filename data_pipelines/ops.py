"""Augmentation ops: the registry, the op-list parser, and applying a list to a record.

An op is a small frozen dataclass called as `op(features, rng) -> features`:

- `features` is the record's feature dict. Ops read and write `features["image"]`, a numpy
  uint8 array (H, W, C) with C in {1, 3}; geometric ops also move `features["lung_mask"]`
  (uint8 (H, W)) when present; every other key passes through untouched. Ops never modify
  their input in place (they may return views of it).
- `rng` is the per-record `np.random.Generator` Grain hands to `random_map`; it is seeded by
  (pipeline seed, record position, epoch), so the same record in the same epoch always gets the
  same views and a resumed run is exact. Ops draw their random numbers whether or not they end
  up applying (probability p), so a p change does not shift later ops' draws.

Ops run on the HOST in numpy / PIL / scipy and emit uint8. Normalisation to [-1, 1] floats
happens on the device inside the jitted train step (`x / 127.5 - 1`): shipping uint8 moves
4x fewer bytes host -> device (and between Grain worker processes), and the division is free
on an accelerator. All augmentation stays on the host; a jitted (on-device) variant of the
colour ops was considered but not built or measured: on a CPU host it would compete with the
train step for the same cores, and the host pipeline already outruns a CPU train step by far
(experiments/benchmarks/input_pipeline.py; docs/benchmarks.md). Revisit if an accelerator host
turns out input-bound.

An op list is written either as a big_vision-style string or as (name, kwargs) pairs:

  "random_resized_crop(224, area=(0.08, 1))|flip_lr|color_distortion(1.0)|gaussian_blur"
  [("random_resized_crop", {"size": 224, "area": (0.08, 1.0)}), ("flip_lr", {})]

`parse_ops` turns either (or a list of already-built ops) into a list of op objects;
`apply_ops` runs them. Unknown names raise an error listing the known ones.
"""
from __future__ import annotations

import ast
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import numpy as np

from data_pipelines import ops_geometric
from data_pipelines import ops_intensity
from data_pipelines import ops_masking

Features = dict[str, Any]
Op = Callable[[Features, np.random.Generator], Features]
OpSpec = Union[str, Sequence[Union[tuple[str, Mapping[str, Any]], Op]]]

# Name -> op class. The names are the words used in configs and presets.
REGISTRY: dict[str, type] = {
    # Geometric (image and lung_mask together).
    "random_resized_crop": ops_geometric.RandomResizedCrop,
    "flip_lr": ops_geometric.FlipLeftRight,
    "flip_ud": ops_geometric.FlipUpDown,
    "rot90": ops_geometric.Rot90,
    "rotate": ops_geometric.Rotate,
    "resize": ops_geometric.Resize,
    "resize_small": ops_geometric.ResizeSmall,
    "central_crop": ops_geometric.CentralCrop,
    "elastic": ops_geometric.ElasticDeformation,
    # Colour and intensity (image only).
    "color_distortion": ops_intensity.ColorDistortion,
    "color_jitter": ops_intensity.ColorJitter,
    "random_grayscale": ops_intensity.RandomGrayscale,
    "gaussian_blur": ops_intensity.GaussianBlur,
    "random_gamma": ops_intensity.RandomGamma,
    "intensity_window": ops_intensity.IntensityWindow,
    "equalize": ops_intensity.Equalize,
    "gaussian_noise": ops_intensity.GaussianNoise,
    "stain_jitter": ops_intensity.StainJitter,
    "energy_intensity": ops_intensity.EnergyIntensity,
    "linear_intensity": ops_intensity.LinearIntensity,
    # Masking (GMML corruption: adds gmml_mask / gmml_fill, see ops_masking.py).
    "group_mask": ops_masking.GroupMask,
}


def get_op(name: str, *args: Any, **kwargs: Any) -> Op:
  """Builds one registered op.

  Args:
    name: registry name, e.g. "random_resized_crop".
    *args: positional arguments of the op's dataclass, e.g. the size.
    **kwargs: keyword arguments of the op's dataclass.

  Returns:
    The op object.

  Raises:
    KeyError: the name is unknown (the message lists the known names).
    TypeError: the arguments do not fit the op (the message names the op).
  """
  if name not in REGISTRY:
    raise KeyError(f"unknown augmentation op {name!r}; known ops: {', '.join(sorted(REGISTRY))}")
  try:
    return REGISTRY[name](*args, **kwargs)
  except TypeError as error:
    raise TypeError(f"augmentation op {name}{tuple(args)} {kwargs}: {error}") from error


def _parse_one(text: str) -> Op:
  """'name' or 'name(literal, key=literal)' -> op, with literals parsed safely."""
  try:
    node = ast.parse(text.strip(), mode="eval").body
  except SyntaxError as error:
    raise ValueError(f"cannot parse augmentation op {text!r}: {error.msg}") from error
  if isinstance(node, ast.Name):
    return get_op(node.id)
  if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
    try:
      args = [ast.literal_eval(arg) for arg in node.args]
      kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
    except ValueError as error:
      raise ValueError(f"augmentation op {text!r}: arguments must be Python literals") from error
    return get_op(node.func.id, *args, **kwargs)
  raise ValueError(f"cannot parse augmentation op {text!r}; expected name or name(args)")


def parse_ops(spec: OpSpec) -> list[Op]:
  """Builds the op list from a "a(..)|b|c(..)" string, (name, kwargs) pairs, or op objects.

  Args:
    spec: the op list in one of the three forms (forms can be mixed in a sequence).

  Returns:
    A list of op objects, in order.

  Raises:
    KeyError, TypeError, ValueError: an unknown op, bad arguments, or unparsable text.
  """
  if isinstance(spec, str):
    return [_parse_one(piece) for piece in spec.split("|") if piece.strip()]
  ops = []
  for item in spec:
    if isinstance(item, str):
      ops.extend(parse_ops(item))
    elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
      ops.append(get_op(item[0], **dict(item[1])))
    elif callable(item):
      ops.append(item)
    else:
      raise TypeError(f"op list entry {item!r} is neither a string, a (name, kwargs) pair nor an op")
  return ops


def apply_ops(ops: Sequence[Op], features: Features, rng: np.random.Generator) -> Features:
  """Runs the ops in order on one record's features with its generator.

  Args:
    ops: op objects (see `parse_ops`).
    features: the feature dict; `image` uint8 (H, W, 1|3), optional `lung_mask`.
    rng: the per-record generator.

  Returns:
    The augmented feature dict (the input is not modified).
  """
  for op in ops:
    features = op(features, rng)
  return features


def set_channels(image: np.ndarray, num_channels: int) -> np.ndarray:
  """Makes a (H, W, C) uint8 image have `num_channels` channels.

  Grey -> RGB repeats the channel (BiT weights expect RGB input); RGB -> grey takes the
  ITU-R 601-2 luma, as PIL's "L" conversion does.

  Args:
    image: (H, W, 1) or (H, W, 3) array.
    num_channels: 1 or 3.

  Returns:
    A (H, W, num_channels) array of the same dtype.

  Raises:
    ValueError: num_channels is not 1 or 3, or the image has another channel count.
  """
  if num_channels not in (1, 3):
    raise ValueError(f"num_channels must be 1 or 3; got {num_channels}")
  channels = image.shape[-1]
  if image.ndim != 3 or channels not in (1, 3):
    raise ValueError(f"expected an (H, W, 1|3) image; got shape {image.shape}")
  if channels == num_channels:
    return image
  if num_channels == 3:
    return np.repeat(image, 3, axis=-1)
  luma = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
  return np.clip(np.rint(luma), 0, 255).astype(image.dtype)[..., None]
