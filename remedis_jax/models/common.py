"""Parameter-tree utilities shared by the models: counting and checkpoint merging.

`merge_params` is how every pretrained tree (public BiT weights, an earlier
REMEDIS checkpoint's encoder) gets into a freshly built model: the new model's
tree is the template, the loaded tree fills it, and anything that does not line
up fails loudly with every offending key named, unless a `dont_load` regex says
that the difference is intended (a new classification head, a new projection
head).
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import flax
import jax
import numpy as np

PyTree = Any


def _flatten(tree: Mapping[str, Any], what: str) -> dict[str, Any]:
  """Flattens a nested mapping of parameters to {"a/b/c": leaf}."""
  if not isinstance(tree, Mapping):
    raise TypeError(
        f"merge_params: `{what}` must be a nested mapping of parameters (a dict "
        f"or FrozenDict, e.g. variables['params']); got {type(tree).__name__}.")
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")
  return dict(flat)


def _shape(leaf: Any) -> tuple[int, ...]:
  return tuple(np.shape(leaf)) if not hasattr(leaf, "shape") else tuple(leaf.shape)


def count_params(params: PyTree) -> int:
  """Returns the number of scalar parameters in a tree.

  Works on real arrays and on the `jax.ShapeDtypeStruct` leaves that
  `jax.eval_shape(model.init, ...)` returns, so a full-size model can be
  counted without allocating it.

  Args:
    params: any pytree of arrays or shape structs (e.g. `variables["params"]`).

  Returns:
    The total number of elements over all leaves.
  """
  return int(sum(int(np.prod(_shape(leaf), dtype=np.int64))
                 for leaf in jax.tree_util.tree_leaves(params)))


def merge_params(loaded: PyTree, init: PyTree,
                 dont_load: Sequence[str] = ()) -> dict[str, Any]:
  """Returns `init`'s tree with its values taken from `loaded` (big_vision style).

  Keys are "/"-joined paths such as "block1/unit01/conv1/kernel". A key that
  fully matches one of the `dont_load` regexes keeps its value from `init`, and
  may be absent from `loaded` or present only in `loaded` (then it is dropped).
  Every other key must be present on both sides with equal shapes.

  Loaded values are cast to the dtype of the matching `init` leaf, so a float32
  checkpoint can fill a model built with `param_dtype=bfloat16`. Leaves keep
  their container type (NumPy stays NumPy); placing them on devices with the
  right sharding is the caller's job.

  `init` may come from `jax.eval_shape(model.init, ...)` (shape structs, no
  memory) as long as every key that falls back to `init` holds a real array.

  Args:
    loaded: nested mapping of parameters, e.g. from a checkpoint or
      `load_bit_npz`.
    init: nested mapping of parameters of the model that will use them,
      typically `model.init(...)["params"]`.
    dont_load: regexes (Python `re`, matched with `fullmatch`) of keys that
      keep their `init` value, e.g. `("head/.*",)`.

  Returns:
    A new nested dict with exactly the structure of `init`.

  Raises:
    ValueError: when keys are missing from `loaded`, unexpected in `loaded`,
      or differ in shape, none of them covered by `dont_load`. The message
      names every such key with both shapes. Also for an invalid regex, or
      when a `dont_load` key's init value is only a shape struct.
  """
  patterns = []
  for pattern in dont_load:
    try:
      patterns.append(re.compile(pattern))
    except re.error as e:
      raise ValueError(
          f"merge_params: dont_load pattern {pattern!r} is not a valid regex: {e}"
      ) from e

  def keep_init(name: str) -> bool:
    return any(p.fullmatch(name) for p in patterns)

  loaded_flat = _flatten(loaded, "loaded")
  init_flat = _flatten(init, "init")

  missing, unexpected, mismatched, abstract = [], [], [], []
  merged = {}
  for name, init_leaf in init_flat.items():
    if keep_init(name):
      if isinstance(init_leaf, jax.ShapeDtypeStruct):
        abstract.append(name)
      merged[name] = init_leaf
      continue
    if name not in loaded_flat:
      missing.append(f"  - {name}: model shape {_shape(init_leaf)}")
      continue
    value = loaded_flat[name]
    if _shape(value) != _shape(init_leaf):
      mismatched.append(f"  * {name}: checkpoint shape {_shape(value)}, "
                        f"model shape {_shape(init_leaf)}")
      continue
    init_dtype = getattr(init_leaf, "dtype", None)
    if init_dtype is not None and getattr(value, "dtype", None) != init_dtype:
      value = (value.astype(init_dtype) if hasattr(value, "astype")
               else np.asarray(value, dtype=init_dtype))
    merged[name] = value
  for name, value in loaded_flat.items():
    if name not in init_flat and not keep_init(name):
      unexpected.append(f"  + {name}: checkpoint shape {_shape(value)}")

  if missing or unexpected or mismatched:
    parts = ["merge_params: the loaded parameters do not fit the model."]
    if missing:
      parts.append(f"In the model but not in the checkpoint ({len(missing)}):")
      parts += sorted(missing)
    if unexpected:
      parts.append(
          f"In the checkpoint but not in the model ({len(unexpected)}):")
      parts += sorted(unexpected)
    if mismatched:
      parts.append(f"Shape mismatches ({len(mismatched)}):")
      parts += sorted(mismatched)
    parts.append(
        "Fix: build the model that matches the checkpoint, or add regexes for "
        "parameters that are meant to differ to dont_load (e.g. 'head/.*'); "
        f"dont_load now is {list(dont_load)}.")
    raise ValueError("\n".join(parts))
  if abstract:
    raise ValueError(
        "merge_params: these keys keep their init value (dont_load) but init "
        "holds only shape structs for them (from jax.eval_shape); pass a real "
        "model.init(...) tree: " + ", ".join(sorted(abstract)))
  return flax.traverse_util.unflatten_dict(merged, sep="/")
