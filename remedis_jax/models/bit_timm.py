"""BiT ResNet-v2 weights in timm's layout (PyTorch `state_dict` keys), both directions.

timm's `ResNetV2` with `stem_type="fixed"`, `StdConv2d` and `GroupNormAct` (its
`resnetv2_{50x1,...,152x4}_bit` models) is the same network as `bit.ResNetV2` with stem
"bit": a 7x7/2 weight-standardised root conv, zero padding by 1 and a 3x3/2 VALID max-pool,
pre-activation bottlenecks with the stride on the 3x3 conv and the projection shortcut taken
from the pre-activated input, a final GroupNorm + ReLU and global average pooling. Only the
parameter names and the kernel layout differ:

  ours (Flax, HWIO kernels)                      timm (PyTorch, OIHW weights)
  root_block/conv_root/kernel                    stem.conv.weight
  block{i}/unit{NN}/gn{k}/{scale,bias}           stages.{i-1}.blocks.{NN-1}.norm{k}.{weight,bias}
  block{i}/unit{NN}/conv{k}/kernel               stages.{i-1}.blocks.{NN-1}.conv{k}.weight
  block{i}/unit01/conv_proj/kernel               stages.{i-1}.blocks.0.downsample.conv.weight
  norm_pre_head/{scale,bias}                     norm.{weight,bias}
  head (or a fine-tuned classifier): kernel (C, K), bias (K,)
                                                 head.fc.weight (K, C, 1, 1), head.fc.bias

Numerics: timm's BiT convolutions standardise with eps 1e-8 on the kernel variance, ours with
BiT's 1e-10; features agree to float32 round-off (the export test measures it against timm).

Everything here is NumPy: writing and reading the `.safetensors` files needs neither PyTorch
nor timm (`safetensors.numpy`), so the runtime stays free of both.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from data_pipelines import storage
from remedis_jax.models import bit

# Our zoo variants that timm registers under a name (same depths and widths, 32 GroupNorm
# groups, stem "bit"). Other BiT-stem variants (R_small, R_tiny, R_micro) are built in timm from
# constructor arguments instead (`timm_twin`).
TIMM_NAMES: dict[str, str] = {
    "R50x1": "resnetv2_50x1_bit",
    "R50x3": "resnetv2_50x3_bit",
    "R101x1": "resnetv2_101x1_bit",
    "R101x3": "resnetv2_101x3_bit",
    "R152x2": "resnetv2_152x2_bit",
    "R152x4": "resnetv2_152x4_bit",
}
# timm's BiT convolution (timm.models.resnetv2._create_resnetv2_bit: StdConv2d with eps 1e-8).
TIMM_STD_CONV_EPS = 1e-8
# timm rounds every width to a multiple of 8 (timm.layers.make_divisible); a width that is not
# one would come out different in timm.
_TIMM_WIDTH_DIVISOR = 8
_HEAD_KEYS = ("head.fc.weight", "head.fc.bias")
_STAGE_RE = re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.")


class NoTimmTwinError(ValueError):
  """The model has no equivalent in timm, so it cannot be exported to or loaded from timm."""


# ------------------------------------------------------------------------- the structure
def structure_of(params: Mapping[str, Any]) -> dict[str, Any]:
  """Depth per stage, widths and input channels of a BiT encoder, read from its parameters.

  Args:
    params: a `bit.ResNetV2` parameter tree (nested dicts, arrays or shape structs).

  Returns:
    {"block_counts": [...], "root_width": W, "in_channels": C, "root_kernel": k}.

  Raises:
    NoTimmTwinError: the tree is not a BiT ResNet-v2 (e.g. a ViT).
  """
  kernel = params.get("root_block", {}).get("conv_root", {}).get("kernel")
  if kernel is None:
    raise NoTimmTwinError(
        f"not a BiT ResNet-v2 encoder (no root_block/conv_root/kernel; top-level parameters: "
        f"{sorted(params)[:6]}); timm's ResNetV2 twin exists only for BiT ResNets")
  counts = []
  while f"block{len(counts) + 1}" in params:
    counts.append(len(params[f"block{len(counts) + 1}"]))
  size, _, channels, width = kernel.shape
  return {"block_counts": counts, "root_width": int(width), "in_channels": int(channels),
          "root_kernel": int(size)}


def timm_twin(model_name: str, stem: str, params: Mapping[str, Any],
              num_groups: Optional[int] = None) -> dict[str, Any]:
  """How to build the timm model that holds exactly these weights.

  Args:
    model_name: our variant name (`bit.VARIANTS`, or a ViT name, which is refused).
    stem: the BiT root the model was trained with; only "bit" has a timm twin.
    params: the encoder's parameters (their shapes give depth, width and input channels).
    num_groups: GroupNorm groups; None takes the variant's.

  Returns:
    {"architecture": a registered timm name or None, "model_args": create_model keyword
    arguments (JSON), "constructor": keyword arguments of timm.models.resnetv2.ResNetV2, with
    "conv_layer" / "norm_layer" spelled out as {"class": ..., "eps" / "num_groups": ...}}.

  Raises:
    NoTimmTwinError: a ViT, a stem other than "bit", or widths timm would round differently;
      the message names the model and the formats that do work.
  """
  alternative = ("export it with --format=orbax (JAX) or --format=savedmodel (TensorFlow, "
                 "also servable from other runtimes) instead")
  if model_name not in bit.VARIANTS:
    raise NoTimmTwinError(
        f"{model_name} has no timm twin: the timm export covers BiT ResNet-v2 encoders with "
        f"stem 'bit' ({', '.join(bit.VARIANTS)}); {alternative}")
  if stem != "bit":
    raise NoTimmTwinError(
        f"{model_name} with stem {stem!r} has no timm twin: timm's BiT ResNetV2 has BiT's "
        f"7x7/2 root + max-pool only (stem 'bit'), and this model's root is a "
        f"{bit.STEMS[stem]['kernel_size']}x{bit.STEMS[stem]['kernel_size']} conv; {alternative}")
  structure = structure_of(params)
  groups = num_groups if num_groups is not None else bit.VARIANTS[model_name]["num_groups"]
  width = structure["root_width"]
  mids = [width * 2**i for i in range(len(structure["block_counts"]))]
  odd = [w for w in [width, *mids] if w % _TIMM_WIDTH_DIVISOR]
  if odd:
    raise NoTimmTwinError(
        f"{model_name}: widths {odd} are not multiples of {_TIMM_WIDTH_DIVISOR}, which timm "
        f"rounds to (timm.layers.make_divisible), so timm cannot build it; {alternative}")
  counts, channels = structure["block_counts"], [4 * m for m in mids]
  constructor = {
      "layers": counts, "channels": channels, "stem_chs": width, "width_factor": 1,
      "stem_type": "fixed", "in_chans": structure["in_channels"],
      "conv_layer": {"class": "timm.layers.StdConv2d", "eps": TIMM_STD_CONV_EPS},
      "norm_layer": {"class": "timm.layers.GroupNormAct", "num_groups": groups},
  }
  registered = TIMM_NAMES.get(model_name)
  spec = bit.VARIANTS.get(model_name, {})
  if registered and (list(spec["block_counts"]) != counts or groups != 32 or
                     int(64 * spec["width_factor"]) != width):
    registered = None  # overridden structure: the registered name would build another net
  return {"architecture": registered, "model_args": {"in_chans": structure["in_channels"]},
          "constructor": constructor}


# ------------------------------------------------------------------------- key mapping
def _timm_key(path: str) -> str:
  """Our parameter path -> timm state_dict key (encoder parameters only)."""
  parts = path.split("/")
  if parts == ["root_block", "conv_root", "kernel"]:
    return "stem.conv.weight"
  if parts[0] == "norm_pre_head":
    return "norm." + {"scale": "weight", "bias": "bias"}[parts[1]]
  block, unit, layer, leaf = parts
  prefix = f"stages.{int(block[len('block'):]) - 1}.blocks.{int(unit[len('unit'):]) - 1}."
  if layer == "conv_proj":
    return prefix + "downsample.conv.weight"
  if layer.startswith("conv"):
    return prefix + f"{layer}.weight"
  if layer.startswith("gn"):
    return prefix + f"norm{layer[2:]}." + {"scale": "weight", "bias": "bias"}[leaf]
  raise AssertionError(f"no timm key for parameter {path}")


def _to_torch_layout(value: np.ndarray) -> np.ndarray:
  return value.transpose(3, 2, 0, 1) if value.ndim == 4 else value  # HWIO -> OIHW


def _to_flax_layout(value: np.ndarray) -> np.ndarray:
  return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value  # OIHW -> HWIO


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, f"{prefix}{key}/"))
    else:
      flat[prefix + key] = value
  return flat


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def to_timm_state_dict(encoder: Mapping[str, Any],
                       classifier: Optional[Mapping[str, Any]] = None) -> dict[str, np.ndarray]:
  """Our BiT encoder (and a Dense classifier) as a timm ResNetV2 state_dict of float32 arrays.

  Args:
    encoder: a `bit.ResNetV2` parameter tree without head.
    classifier: {"kernel": (C, K), "bias": (K,)}: a fine-tuned classifier or the ResNetV2
      head; it becomes timm's `head.fc` (a 1x1 conv). None: no head keys (timm num_classes=0).

  Returns:
    {timm key: C-contiguous float32 array in PyTorch's layout}.
  """
  state = {}
  for path, value in _flatten(encoder).items():
    if path.startswith("head/"):
      continue  # a ResNetV2 head is exported through `classifier`
    state[_timm_key(path)] = np.ascontiguousarray(
        _to_torch_layout(np.asarray(value, np.float32)))
  if classifier is not None:
    kernel = np.asarray(classifier["kernel"], np.float32)
    state["head.fc.weight"] = np.ascontiguousarray(kernel.T[:, :, None, None])
    state["head.fc.bias"] = np.ascontiguousarray(np.asarray(classifier["bias"], np.float32))
  return state


def expected_timm_shapes(model_name: str, in_channels: int = 3,
                         num_classes: Optional[int] = None) -> dict[str, tuple[int, ...]]:
  """timm key -> shape for `bit.create_model(model_name)` (head keys only with num_classes)."""
  # pylint: disable-next=protected-access
  ours = bit._our_shapes(model_name, None, in_channels)
  shapes = {}
  for path, shape in ours.items():
    shapes[_timm_key(path)] = (tuple(shape[i] for i in (3, 2, 0, 1)) if len(shape) == 4
                               else tuple(shape))
  if num_classes:
    features = ours["norm_pre_head/scale"][0]
    shapes.update({"head.fc.weight": (num_classes, features, 1, 1),
                   "head.fc.bias": (num_classes,)})
  return shapes


def infer_timm_variant(shapes: Mapping[str, Sequence[int]]) -> str:
  """Names the `bit.VARIANTS` entry whose depth and width a timm BiT state_dict has."""
  root = tuple(shapes.get("stem.conv.weight", ()))
  if len(root) != 4 or root[2:] != (7, 7):
    raise NoTimmTwinError(
        f"not a timm BiT ResNetV2 state_dict: stem.conv.weight has shape {root or 'none'}, "
        f"expected (width, in_chans, 7, 7); first keys: {sorted(shapes)[:5]}")
  counts: dict[int, int] = {}
  for key in shapes:
    match = _STAGE_RE.match(key)
    if match:
      stage, block = int(match.group(1)), int(match.group(2))
      counts[stage] = max(counts.get(stage, 0), block + 1)
  block_counts = tuple(counts.get(i, 0) for i in range(max(counts, default=-1) + 1))
  for name in bit.VARIANTS:
    # pylint: disable-next=protected-access
    if bit._variant_signature(name) == (block_counts, root[0]):
      return name
  raise NoTimmTwinError(
      f"no variant of ours has blocks {list(block_counts)} and root width {root[0]} (from the "
      f"stages.* keys and stem.conv.weight); known: {', '.join(bit.VARIANTS)}")


def from_timm_state_dict(state: Mapping[str, np.ndarray], model_name: Optional[str] = None, *,
                         keep_head: bool = False, what: str = "the state_dict"
                         ) -> tuple[str, dict[str, Any], Optional[dict[str, np.ndarray]]]:
  """A timm BiT ResNetV2 state_dict as our parameters, every key and shape checked first.

  Args:
    state: timm key -> array (NumPy; e.g. `safetensors.numpy.load_file`).
    model_name: the `bit.VARIANTS` entry to load into; None infers it from the shapes.
    keep_head: also return timm's `head.fc` as {"kernel": (C, K), "bias": (K,)}; otherwise the
      head keys are ignored (a new task gets a new head).
    what: names the source in error messages (a file path).

  Returns:
    (model_name, encoder params (float32 NumPy, fits `create_model(model_name)`), classifier or
    None).

  Raises:
    NoTimmTwinError: not a timm BiT layout, or depth/width of no variant of ours.
    ValueError: missing, unexpected or mis-shaped keys, all named with the expected shapes.
  """
  shapes = {k: tuple(np.shape(v)) for k, v in state.items()}
  if model_name is None:
    model_name = infer_timm_variant(shapes)
  elif model_name not in bit.VARIANTS:
    raise ValueError(f"unknown BiT model name {model_name!r}; known: {', '.join(bit.VARIANTS)}")
  in_channels = shapes.get("stem.conv.weight", (0, 3))[1]
  has_head = all(k in shapes for k in _HEAD_KEYS)
  if keep_head and not has_head:
    raise ValueError(f"{what}: keep_head=True but it has no {' / '.join(_HEAD_KEYS)}")
  num_classes = shapes["head.fc.bias"][0] if keep_head else None
  expected = expected_timm_shapes(model_name, in_channels, num_classes)
  ignored = set() if keep_head else set(_HEAD_KEYS)
  problems = bit.key_mismatches(expected, shapes, model_name, ignored=ignored)
  if problems:
    lines = [f"{what} does not fit BiT {model_name} in timm's layout:"] + problems
    try:
      inferred = infer_timm_variant(shapes)
    except NoTimmTwinError:
      inferred = None
    if inferred and inferred != model_name:
      lines.append(f"Its shapes look like {inferred}: set config.model.name={inferred!r}.")
    raise ValueError("\n".join(lines))
  # pylint: disable-next=protected-access
  paths = bit._our_shapes(model_name, None, in_channels)
  encoder = _unflatten({p: np.asarray(_to_flax_layout(np.asarray(state[_timm_key(p)])),
                                      np.float32) for p in paths})
  classifier = None
  if keep_head:
    classifier = {"kernel": np.asarray(state["head.fc.weight"], np.float32)[:, :, 0, 0].T.copy(),
                  "bias": np.asarray(state["head.fc.bias"], np.float32)}
  return model_name, encoder, classifier


# ------------------------------------------------------------------------- files
def save_timm_safetensors(state: Mapping[str, np.ndarray], path: str,
                          metadata: Optional[Mapping[str, str]] = None) -> None:
  """Writes a state_dict as `.safetensors` (what `safetensors.torch.load_file` reads)."""
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  header = {"format": "pt", **(metadata or {})}  # "pt": the tensors are a PyTorch state_dict
  storage.write_bytes(path, st_numpy.save(dict(state), metadata=header))


def read_timm_safetensors(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
  """Reads a `.safetensors` file (local or gs://) into NumPy arrays, with errors naming it."""
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  path = os.fspath(path)
  if not storage.isfile(path):
    raise FileNotFoundError(f"{path} does not exist (expected a timm .safetensors file)")
  data = storage.read_bytes(path)
  try:
    state = st_numpy.load(data)
  except Exception as e:  # pylint: disable=broad-except  (safetensors raises its own types)
    raise ValueError(f"{path} is not a readable .safetensors file ({type(e).__name__}: {e}); "
                     "timm BiT weights come as model.safetensors (float32 or float16)") from e
  if not state:
    raise ValueError(f"{path} holds no tensors")
  return state


def load_timm_bit(path: str | os.PathLike[str], model_name: Optional[str] = None,
                  keep_head: bool = False, stem: str = "bit"
                  ) -> tuple[str, dict[str, Any], Optional[dict[str, np.ndarray]]]:
  """Loads a timm BiT ResNetV2 `.safetensors` file (e.g. timm's `resnetv2_50x1_bit`) for us.

  The counterpart of `bit.load_bit_npz` for the PyTorch/timm layout, and of the timm export.

  Args:
    path: the `.safetensors` file.
    model_name: a `bit.VARIANTS` name; None infers it from the shapes.
    keep_head: also return timm's head as our classifier {"kernel", "bias"}.
    stem: the stem of the model the weights are for; timm's BiT root is stem "bit".

  Returns:
    (model_name, encoder params, classifier or None), float32 NumPy.

  Raises:
    FileNotFoundError: no such file.
    ValueError / NoTimmTwinError: not a safetensors file, not timm's BiT layout, a stem other
      than "bit", or keys and shapes that do not fit `model_name` (all of them named).
  """
  bit.check_stem(stem)
  state = read_timm_safetensors(path)
  if stem != "bit":
    raise NoTimmTwinError(
        f"{os.fspath(path)} holds timm BiT weights, whose root is BiT's 7x7/2 conv + max-pool, "
        f"but the config asks for stem={stem!r}; set --config.model.stem=bit to load them")
  return from_timm_state_dict(state, model_name, keep_head=keep_head, what=os.fspath(path))
