"""BiT ResNet-v2 encoders (Kolesnikov et al. 2020, arxiv.org/abs/1912.11370).

The architecture follows BiT's own reference code (google-research/big_transfer,
bit_jax/models.py) so that the published `BiT-{S,M}-R*.npz` weights reproduce:

* every convolution is weight-standardised: the kernel is normalised over
  (H, W, C_in) per output filter, with variance E[(w - mean)^2] and eps 1e-10;
* root: 7x7/2 conv (zero padding 3), then the conv output is padded by 1 with
  ZEROS and max-pooled 3x3/2 VALID. A max-pool with its usual -inf padding is
  not the same (the root has no ReLU, so a window at the border can be all
  negative); BiT's PyTorch port keeps a comment warning about exactly this;
* pre-activation bottleneck units: GN -> ReLU -> (projection shortcut from this
  pre-activated input when the shape changes) -> 1x1 conv -> GN -> ReLU ->
  3x3 conv carrying the stride -> GN -> ReLU -> 1x1 conv (4x width), + shortcut;
* GroupNorm with 32 groups, eps 1e-5, variance E[(x - mean)^2];
* final GroupNorm + ReLU + global average pool, optional zero-initialised
  Dense head.

`stem` picks the root (`STEMS`). "bit" (the default) is the root above, the
only one that BiT's published weights fit. It divides the resolution by 4
before the first stage, so 28-32 px images (MedMNIST) reach the first stage at
8x8 and the last at 1x1; CIFAR-style ResNets (He et al. 2016, section 4.2)
use a 3x3/1 root conv without max-pool instead: "small" (maps 4x larger per
side than "bit", so 16x the compute in the stages) and "small_s2" (3x3/2, no
max-pool: 2x per side, 4x). Measured on a SimCLR step of R_tiny at 32 px,
batch 128 (experiments/benchmarks/train_step.py, XLA cost analysis): 3.4,
10.9 and 43.8 GFLOP for "bit", "small_s2", "small". The root keeps its
parameter name under every stem; only its kernel size differs.

Parameter names (what `create_model(name).init` produces and `load_bit_npz`
returns):

  root_block/conv_root/kernel                       (7, 7, C, W); (3, 3, C, W)
                                                    with stem "small"/"small_s2"
  block{i}/unit{NN}/gn{1,2,3}/{scale,bias}          (C,)
  block{i}/unit{NN}/conv{1,2,3}/kernel              HWIO
  block{i}/unit01/conv_proj/kernel                  (1, 1, C_in, C_out)
  norm_pre_head/{scale,bias}                        (C,)
  head/{kernel,bias}                                only with num_classes
"""

from __future__ import annotations

import functools
import io
import os
import re
import zipfile
import zlib
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import storage

Array = jax.Array
Dtype = Any

# BiT's numerical constants (bit_jax/models.py). Flax's own nn.GroupNorm
# defaults differ on both counts (epsilon 1e-6, and the "fast" variance
# E[x^2] - E[x]^2), which is why they are spelled out where GroupNorm is built.
WEIGHT_STANDARDIZATION_EPS = 1e-10
GROUP_NORM_EPS = 1e-5

# name -> ResNetV2 fields. Widths: the root conv and the first stage's
# bottleneck both have int(64 * width_factor) channels; stage i's units output
# 4 * 64 * width_factor * 2**(i-1).
VARIANTS: dict[str, dict[str, Any]] = {
    "R50x1": dict(block_counts=(3, 4, 6, 3), width_factor=1, num_groups=32),
    "R50x3": dict(block_counts=(3, 4, 6, 3), width_factor=3, num_groups=32),
    "R101x1": dict(block_counts=(3, 4, 23, 3), width_factor=1, num_groups=32),
    "R101x3": dict(block_counts=(3, 4, 23, 3), width_factor=3, num_groups=32),
    "R152x2": dict(block_counts=(3, 8, 36, 3), width_factor=2, num_groups=32),
    "R152x4": dict(block_counts=(3, 8, 36, 3), width_factor=4, num_groups=32),
    # Test / CPU-demo sizes: one unit per stage. R_small: root 32, unit outputs
    # 128/256/512/1024. R_tiny: root 16, unit outputs 64/128/256/512. R_micro:
    # root 8, unit outputs 32/64/128/256.
    "R_small": dict(block_counts=(1, 1, 1, 1), width_factor=0.5, num_groups=16),
    "R_tiny": dict(block_counts=(1, 1, 1, 1), width_factor=0.25, num_groups=8),
    "R_micro": dict(block_counts=(1, 1, 1, 1), width_factor=0.125,
                    num_groups=4),
}


# stem -> root conv (kernel size, stride) and whether BiT's 3x3/2 max-pool
# follows it. The conv pads kernel_size // 2 zeros on each side (3 for 7x7,
# BiT's fixed_padding; 1 for 3x3).
STEMS: dict[str, dict[str, Any]] = {
    "bit": dict(kernel_size=7, strides=2, max_pool=True),       # maps / 4
    "small": dict(kernel_size=3, strides=1, max_pool=False),    # maps / 1
    "small_s2": dict(kernel_size=3, strides=2, max_pool=False),  # maps / 2
}


def check_stem(stem: str) -> None:
  """Raises ValueError naming the known stems when `stem` is not one of them."""
  if stem not in STEMS:
    raise ValueError(f"Unknown stem {stem!r}; known stems: {', '.join(STEMS)} "
                     "(config.model.stem).")


def standardize_kernel(kernel: Array,
                       eps: float = WEIGHT_STANDARDIZATION_EPS) -> Array:
  """Weight standardisation over (H, W, C_in) of an HWIO kernel, in float32.

  Args:
    kernel: convolution kernel of shape (H, W, C_in, C_out).
    eps: added to the variance, BiT uses 1e-10.

  Returns:
    The standardised kernel in float32 (mean 0, variance 1 per output filter).
  """
  kernel = kernel.astype(jnp.float32)
  kernel = kernel - jnp.mean(kernel, axis=(0, 1, 2), keepdims=True)
  variance = jnp.mean(jnp.square(kernel), axis=(0, 1, 2), keepdims=True)
  return kernel * jax.lax.rsqrt(variance + eps)


class StandardizedConv(nn.Module):
  """Bias-free 2D convolution with a weight-standardised kernel (BiT).

  Attributes:
    features: number of output channels.
    kernel_size: (height, width) of the kernel.
    strides: (height, width) strides.
    padding: symmetric zero padding on both spatial sides, as in BiT's
      `fixed_padding(kernel_size)` followed by a VALID convolution.
    dtype: compute dtype; the kernel is standardised in float32 first.
    param_dtype: dtype of the stored kernel.
  """
  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: int = 0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (*self.kernel_size, x.shape[-1], self.features),
                        self.param_dtype)
    kernel = standardize_kernel(kernel).astype(self.dtype)
    pad = self.padding
    return jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel, window_strides=self.strides,
        padding=((pad, pad), (pad, pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _group_norm(num_groups: int, dtype: Dtype, param_dtype: Dtype,
                name: str) -> nn.GroupNorm:
  # flax computes the statistics in float32 whatever `dtype` is
  # (force_float32_reductions=True), normalises in float32 and only casts the
  # result to `dtype`: bf16 compute keeps float32 GroupNorm statistics.
  return nn.GroupNorm(num_groups=num_groups, epsilon=GROUP_NORM_EPS,
                      use_fast_variance=False, dtype=dtype,
                      param_dtype=param_dtype, name=name)


class PreActBottleneck(nn.Module):
  """Pre-activation bottleneck unit of ResNet-v2 with GroupNorm + StdConv.

  Attributes:
    mid_features: width of the 1x1 -> 3x3 bottleneck; the unit outputs
      4 * mid_features channels.
    strides: stride of the 3x3 conv (and of the projection shortcut).
    num_groups: GroupNorm groups.
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """
  mid_features: int
  strides: tuple[int, int] = (1, 1)
  num_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    out_features = 4 * self.mid_features
    conv = functools.partial(StandardizedConv, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    norm = functools.partial(_group_norm, self.num_groups, self.dtype,
                             self.param_dtype)

    shortcut = x
    x = nn.relu(norm("gn1")(x))
    if x.shape[-1] != out_features or self.strides != (1, 1):
      # BiT projects the pre-activated input, not the raw unit input.
      shortcut = conv(out_features, (1, 1), self.strides,
                      name="conv_proj")(x)
    x = conv(self.mid_features, (1, 1), name="conv1")(x)
    x = nn.relu(norm("gn2")(x))
    x = conv(self.mid_features, (3, 3), self.strides, padding=1,
             name="conv2")(x)
    x = nn.relu(norm("gn3")(x))
    x = conv(out_features, (1, 1), name="conv3")(x)
    return x + shortcut.astype(x.dtype)


class RootBlock(nn.Module):
  """The root. "bit": 7x7/2 StdConv, zero padding by 1, 3x3/2 VALID max-pool.

  "small" and "small_s2" are a single 3x3 StdConv (stride 1 or 2, padding 1)
  without max-pool; see `STEMS`.

  Attributes:
    width: output channels of the root conv.
    stem: a `STEMS` name.
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """
  width: int
  stem: str = "bit"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    check_stem(self.stem)
    spec = STEMS[self.stem]
    size, stride = spec["kernel_size"], spec["strides"]
    x = StandardizedConv(self.width, (size, size), (stride, stride),
                         padding=size // 2, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="conv_root")(x)
    if not spec["max_pool"]:
      return x
    # Zero padding, not max-pool's -inf: see the module docstring.
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class ResNetStage(nn.Module):
  """A stage of `num_units` bottleneck units; the first one carries the stride.

  Attributes:
    num_units: number of bottleneck units.
    mid_features: bottleneck width of every unit.
    first_strides: strides of the first unit.
    num_groups: GroupNorm groups.
    dtype: compute dtype.
    param_dtype: parameter dtype.
    remat: rematerialise each unit in the backward pass (saves activation
      memory, costs about one extra forward pass).
  """
  num_units: int
  mid_features: int
  first_strides: tuple[int, int] = (1, 1)
  num_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    unit_cls = nn.remat(PreActBottleneck) if self.remat else PreActBottleneck
    for i in range(self.num_units):
      x = unit_cls(self.mid_features,
                   strides=self.first_strides if i == 0 else (1, 1),
                   num_groups=self.num_groups, dtype=self.dtype,
                   param_dtype=self.param_dtype, name=f"unit{i + 1:02d}")(x)
    return x


class ResNetV2(nn.Module):
  """BiT ResNet-v2 encoder with an optional zero-initialised Dense head.

  Input: NHWC float images in [-1, 1] (BiT's convention), any channel count
  (BiT weights need 3; a from-scratch grayscale model can take 1).

  `__call__` returns `(output, intermediates)`. `output` is the float32 logits
  (B, num_classes) when `num_classes` is set, else the float32 `pre_logits`
  (B, C). `intermediates` holds:

    root         after the root, (B, H/s, W/s, W0): s = 4 for stem "bit"
                 (conv + max-pool), 1 for "small", 2 for "small_s2"
    block1..4    each stage's output (compute dtype)
    feature_map  final GroupNorm + ReLU map (B, h, w, C), compute dtype
    pre_logits   global average of feature_map, (B, C), float32
    logits       (B, num_classes), float32; only with num_classes

  Attributes:
    block_counts: units per stage, e.g. (3, 4, 6, 3) for a ResNet-50.
    width_factor: width multiplier; root and stage-1 bottleneck width is
      int(64 * width_factor).
    num_groups: GroupNorm groups (32 in BiT).
    num_classes: size of the classification head; None for no head.
    dtype: compute dtype (e.g. jnp.bfloat16). GroupNorm statistics, weight
      standardisation, pre_logits and logits stay float32.
    param_dtype: dtype of the stored parameters.
    remat: rematerialise every bottleneck unit (`nn.remat`) to trade compute
      for activation memory; outputs and gradients are unchanged.
    stem: the root, a `STEMS` name: "bit" (BiT's, the only one BiT weights
      fit), "small" or "small_s2" (for 28-64 px images).
  """
  block_counts: Sequence[int] = (3, 4, 6, 3)
  width_factor: float = 1
  num_groups: int = 32
  num_classes: Optional[int] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  stem: str = "bit"

  @nn.compact
  def __call__(self, images: Array,
               train: bool = False) -> tuple[Array, dict[str, Array]]:
    """Runs the encoder (and head).

    Args:
      images: (B, H, W, C) float images in [-1, 1].
      train: unused (no dropout or batch statistics); accepted so that every
        model in the project has the same call signature.

    Returns:
      (output, intermediates) as described in the class docstring.

    Raises:
      ValueError: if `images` is not 4-D.
    """
    del train  # GroupNorm has no train/eval difference.
    if images.ndim != 4:
      raise ValueError(
          f"ResNetV2 expects NHWC images of rank 4, got shape {images.shape}.")
    width = int(64 * self.width_factor)
    out = {}

    x = out["root"] = RootBlock(width, stem=self.stem, dtype=self.dtype,
                                param_dtype=self.param_dtype,
                                name="root_block")(images)

    for i, num_units in enumerate(self.block_counts):
      x = out[f"block{i + 1}"] = ResNetStage(
          num_units, mid_features=width * 2**i,
          first_strides=(1, 1) if i == 0 else (2, 2),
          num_groups=self.num_groups, dtype=self.dtype,
          param_dtype=self.param_dtype, remat=self.remat,
          name=f"block{i + 1}")(x)

    x = _group_norm(self.num_groups, self.dtype, self.param_dtype,
                    "norm_pre_head")(x)
    x = out["feature_map"] = nn.relu(x)
    x = out["pre_logits"] = jnp.mean(x.astype(jnp.float32), axis=(1, 2))

    if self.num_classes:
      # Zero init as in BiT: fine-tuning starts from a uniform prediction.
      # The head is tiny, so it runs in float32 whatever `dtype` is.
      x = out["logits"] = nn.Dense(
          self.num_classes, kernel_init=nn.initializers.zeros,
          dtype=jnp.float32, param_dtype=self.param_dtype, name="head")(x)
    return x, out


def create_model(name: str, num_classes: Optional[int] = None,
                 **overrides: Any) -> ResNetV2:
  """Builds a ResNetV2 variant by name.

  Args:
    name: one of `VARIANTS` ("R50x1", ..., "R_small", "R_tiny", "R_micro").
    num_classes: classification head size; None for an encoder without head
      (output = pre_logits).
    **overrides: any other ResNetV2 field, e.g. dtype=jnp.bfloat16,
      remat=True, num_groups=16, stem="small".

  Returns:
    The (unbound) Linen module.

  Raises:
    ValueError: for an unknown name, override field or stem.
  """
  if name not in VARIANTS:
    raise ValueError(f"Unknown model name {name!r}; known names: "
                     f"{', '.join(VARIANTS)}.")
  fields = {f for f in ResNetV2.__dataclass_fields__ if f not in
            ("parent", "name")}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"create_model({name!r}): unknown ResNetV2 field(s) "
                     f"{unknown}; valid fields: {sorted(fields)}.")
  check_stem(overrides.get("stem", "bit"))
  kwargs = dict(VARIANTS[name])
  kwargs.update(overrides)
  return ResNetV2(num_classes=num_classes, **kwargs)


# ----------------------------------------------------------------------------
# Public BiT weights (BiT-{S,M}-R*.npz) -> params for create_model(name).
# ----------------------------------------------------------------------------

_ROOT_KEY = "resnet/root_block/standardized_conv2d/kernel"
_HEAD_KERNEL_KEY = "resnet/head/conv2d/kernel"
_HEAD_BIAS_KEY = "resnet/head/conv2d/bias"
_UNIT_RE = re.compile(r"^resnet/block([1-9])/unit(\d+)/")
# In a published unit, "a", "b", "c" hold the GroupNorm that pre-activates a
# conv together with that conv: a/group_norm is the unit's first GN (on the
# unit input), a/standardized_conv2d the 1x1 reduce conv; the projection
# shortcut (from the pre-activated input) is stored under a/proj.
_UNIT_PARTS = {"a": ("gn1", "conv1"), "b": ("gn2", "conv2"),
               "c": ("gn3", "conv3")}


def _published_key(path: str) -> str:
  """Maps our parameter path to the key in a published BiT npz."""
  parts = path.split("/")
  if parts[:2] == ["root_block", "conv_root"]:
    return _ROOT_KEY
  if parts[0] == "norm_pre_head":
    return "resnet/group_norm/" + {"scale": "gamma", "bias": "beta"}[parts[1]]
  if parts[0] == "head":
    return {"kernel": _HEAD_KERNEL_KEY, "bias": _HEAD_BIAS_KEY}[parts[1]]
  block, unit, layer, leaf = parts
  if layer == "conv_proj":
    return f"resnet/{block}/{unit}/a/proj/standardized_conv2d/kernel"
  for letter, (gn, conv) in _UNIT_PARTS.items():
    if layer == conv:
      return f"resnet/{block}/{unit}/{letter}/standardized_conv2d/kernel"
    if layer == gn:
      leaf = {"scale": "gamma", "bias": "beta"}[leaf]
      return f"resnet/{block}/{unit}/{letter}/group_norm/{leaf}"
  raise AssertionError(f"no BiT npz key for parameter {path}")


def _published_shape(path: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  # BiT stores the head as a 1x1 conv.
  return (1, 1, *shape) if path == "head/kernel" else shape


def _variant_signature(name: str) -> tuple[tuple[int, ...], int]:
  spec = VARIANTS[name]
  return tuple(spec["block_counts"]), int(64 * spec["width_factor"])


def infer_bit_variant(shapes: Mapping[str, Sequence[int]]) -> str:
  """Names the VARIANTS entry that a published-layout BiT checkpoint matches.

  Only shapes are needed (no weights): the root conv's output width gives the
  width factor, the highest `unitNN` in each `resnet/block{i}` the depth.

  Args:
    shapes: published key (e.g. "resnet/root_block/standardized_conv2d/kernel")
      -> array shape.

  Returns:
    The variant name, e.g. "R50x1".

  Raises:
    ValueError: when the root kernel is absent or malformed, or no variant has
      these block counts and width.
  """
  if _ROOT_KEY not in shapes:
    sample = ", ".join(sorted(shapes)[:5]) or "(no keys)"
    raise ValueError(
        f"Not a BiT checkpoint in the published layout: no key {_ROOT_KEY!r}. "
        f"First keys found: {sample}.")
  root_shape = tuple(shapes[_ROOT_KEY])
  if len(root_shape) != 4 or root_shape[:2] != (7, 7):
    raise ValueError(f"{_ROOT_KEY} has shape {root_shape}; expected "
                     "(7, 7, C_in, width).")
  counts = {}
  for key in shapes:
    match = _UNIT_RE.match(key)
    if match:
      block, unit = int(match.group(1)), int(match.group(2))
      counts[block] = max(counts.get(block, 0), unit)
  block_counts = tuple(counts.get(i, 0) for i in range(1, max(counts, default=0)
                                                        + 1))
  signature = (block_counts, root_shape[3])
  for name in VARIANTS:
    if _variant_signature(name) == signature:
      return name
  known = "; ".join(f"{n}: blocks {list(b)}, root width {w}"
                    for n, (b, w) in
                    ((n, _variant_signature(n)) for n in VARIANTS))
  raise ValueError(
      f"No known variant has blocks {list(block_counts)} and root width "
      f"{root_shape[3]} (from the checkpoint's unit keys and {_ROOT_KEY}). "
      f"Known: {known}.")


def _read_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
  """Reads every array of an .npz eagerly, with errors that say what is wrong."""
  path = os.fspath(path)
  data = storage.read_bytes(path)  # local or gs:// (BiT weights often live in a bucket)
  magic = data[:4]
  if magic[:2] != b"PK":
    kind = ("a single .npy array" if magic[:4] == b"\x93NUM"
            else f"first bytes {magic!r}")
    raise ValueError(
        f"{path} is not an .npz archive ({kind}); BiT weights come as "
        "BiT-{S,M}-R<depth>x<width>.npz files.")
  try:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
      arrays = {key: np.asarray(npz[key]) for key in npz.files}
  except (zipfile.BadZipFile, EOFError, zlib.error, OSError, ValueError,
          KeyError) as e:
    raise ValueError(
        f"{path} is a truncated or corrupt .npz archive ({type(e).__name__}: "
        f"{e}); download it again.") from e
  if not arrays:
    raise ValueError(f"{path} is an empty .npz archive.")
  return arrays


def load_bit_npz(path: str | os.PathLike[str], model_name: Optional[str] = None,
                 keep_head: bool = False,
                 stem: str = "bit") -> tuple[str, dict[str, Any]]:
  """Loads public BiT weights (`BiT-{S,M}-R50x1.npz` etc.) for `create_model`.

  The file's keys follow big_transfer's TF layout (`resnet/block1/unit01/a/
  standardized_conv2d/kernel`, ...). Every key is checked against the model
  before anything is returned: a missing, unexpected or mis-shaped key raises
  with all such keys named, so nothing is ever half loaded.

  Args:
    path: the .npz file.
    model_name: a `VARIANTS` name; None infers it from the shapes.
    keep_head: also return the classification head ("head/kernel",
      "head/bias"); then build the model with `num_classes` equal to the
      file's head size (`params["head"]["bias"].shape[0]`). Otherwise the
      file's head is ignored and the params fit `create_model(model_name)`.
    stem: the stem of the model the weights are for. BiT's root is always
      7x7/2 + max-pool, so anything but "bit" is an error that says so (rather
      than a shape mismatch in the root kernel later).

  Returns:
    (model_name, params): params is a nested dict of float32 NumPy arrays that
    fits `create_model(model_name, num_classes=...).init(...)["params"]` for
    images with as many channels as the file's root kernel (3 for BiT).

  Raises:
    FileNotFoundError: the file does not exist.
    ValueError: not an .npz, truncated/corrupt, unknown layout or variant,
      `model_name` unknown, a `stem` other than "bit", or keys/shapes that do
      not match the model.
  """
  check_stem(stem)
  arrays = _read_npz(path)
  # Some published files name a few kernels "standardized_conv2d_1" etc.;
  # big_vision's converter maps them back in the same way.
  arrays = {re.sub(r"/standardized_conv2d_\d+/", "/standardized_conv2d/", k): v
            for k, v in arrays.items()}
  shapes = {k: tuple(v.shape) for k, v in arrays.items()}
  if stem != "bit":
    size = STEMS[stem]["kernel_size"]
    root = (f" ({_ROOT_KEY} has shape {shapes[_ROOT_KEY]})"
            if _ROOT_KEY in shapes else "")
    raise ValueError(
        f"{os.fspath(path)} is a BiT checkpoint: its root is BiT's 7x7 "
        f"stride-2 conv + max-pool{root}, but the config asks for "
        f"stem={stem!r} (a {size}x{size} root conv). BiT weights only fit "
        "--config.model.stem=bit; to use stem "
        f"{stem!r}, train from scratch or from a pretraining run with that "
        "stem.")
  if model_name is None:
    model_name = infer_bit_variant(shapes)
  elif model_name not in VARIANTS:
    raise ValueError(f"Unknown model name {model_name!r}; known names: "
                     f"{', '.join(VARIANTS)}.")

  num_classes = None
  if keep_head:
    missing_head = [k for k in (_HEAD_KERNEL_KEY, _HEAD_BIAS_KEY)
                    if k not in shapes]
    if missing_head or len(shapes[_HEAD_BIAS_KEY]) != 1:
      raise ValueError(
          f"{os.fspath(path)}: keep_head=True but the head is missing or "
          f"malformed (missing: {missing_head}; bias shape: "
          f"{shapes.get(_HEAD_BIAS_KEY)}). Use keep_head=False.")
    num_classes = shapes[_HEAD_BIAS_KEY][0]

  in_channels = shapes[_ROOT_KEY][2] if _ROOT_KEY in shapes else 3
  expected = bit_npz_shapes(model_name, num_classes=num_classes,
                            in_channels=in_channels)
  ignored = set() if keep_head else {_HEAD_KERNEL_KEY, _HEAD_BIAS_KEY}
  problems = key_mismatches(expected, shapes, model_name, ignored=ignored)
  if problems:
    lines = [f"{os.fspath(path)} does not fit BiT {model_name} "
             f"(num_classes={num_classes}):"] + problems
    try:
      inferred = infer_bit_variant(shapes)
    except ValueError:
      inferred = None
    if inferred and inferred != model_name:
      lines.append(f"The file's shapes look like {inferred}; pass "
                   f"model_name={inferred!r} or None.")
    raise ValueError("\n".join(lines))

  params: dict[str, Any] = {}
  for path_, _ in _our_shapes(model_name, num_classes, in_channels).items():
    value = arrays[_published_key(path_)]
    if path_ == "head/kernel":
      value = value[0, 0]
    node = params
    *parents, leaf = path_.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = np.asarray(value, dtype=np.float32)
  return model_name, params


def _our_shapes(model_name: str, num_classes: Optional[int],
                in_channels: int) -> dict[str, tuple[int, ...]]:
  """Parameter path -> shape of create_model(model_name), via eval_shape."""
  model = create_model(model_name, num_classes=num_classes)
  # 32 px is enough for any depth (the final map is 1x1); shapes of the
  # parameters do not depend on the resolution.
  images = jax.ShapeDtypeStruct((1, 32, 32, in_channels), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  flat = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
  return {"/".join(k.key for k in keys): tuple(leaf.shape)
          for keys, leaf in flat}


def key_mismatches(expected: Mapping[str, tuple[int, ...]],
                   shapes: Mapping[str, tuple[int, ...]], model_name: str, *,
                   ignored: Sequence[str] = ()) -> list[str]:
  """One line per missing, unexpected (not in `ignored`) and mis-shaped key of a weights
  file's `shapes` against the `expected` shapes of `model_name`; [] when they fit."""
  missing = sorted(k for k in expected if k not in shapes)
  unexpected = sorted(k for k in shapes if k not in expected and k not in ignored)
  mismatched = sorted(k for k in expected if k in shapes and shapes[k] != expected[k])
  return ([f"  missing key {k}: expected shape {expected[k]}" for k in missing]
          + [f"  unexpected key {k}: shape {shapes[k]}" for k in unexpected]
          + [f"  shape mismatch {k}: file has {shapes[k]}, {model_name} expects {expected[k]}"
             for k in mismatched])


def bit_npz_shapes(model_name: str, num_classes: Optional[int] = None,
                   in_channels: int = 3) -> dict[str, tuple[int, ...]]:
  """Published BiT npz key -> shape that `model_name` needs (no memory used).

  Args:
    model_name: a `VARIANTS` name.
    num_classes: head size, or None to leave the head keys out.
    in_channels: channels of the root kernel (3 for the public weights).

  Returns:
    A dict such as {"resnet/root_block/standardized_conv2d/kernel":
    (7, 7, 3, 64), ...}.
  """
  return {_published_key(p): _published_shape(p, s)
          for p, s in _our_shapes(model_name, num_classes, in_channels).items()}

