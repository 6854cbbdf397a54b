"""merge_params and count_params."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from remedis_jax.models import count_params
from remedis_jax.models import merge_params


def trees():
  rng = np.random.RandomState(0)
  init = {"encoder": {"conv": {"kernel": np.zeros((3, 3, 2, 4), np.float32)},
                      "gn": {"scale": np.ones(4, np.float32),
                             "bias": np.zeros(4, np.float32)}},
          "head": {"kernel": np.zeros((4, 10), np.float32),
                   "bias": np.zeros(10, np.float32)}}
  loaded = jax.tree_util.tree_map(
      lambda a: rng.randn(*a.shape).astype(np.float32), init)
  return loaded, init


def test_takes_loaded_values_in_inits_structure():
  loaded, init = trees()
  merged = merge_params(loaded, init)
  assert jax.tree_util.tree_structure(merged) == \
      jax.tree_util.tree_structure(init)
  jax.tree_util.tree_map(np.testing.assert_array_equal, merged, loaded)


def test_dont_load_keeps_init_and_tolerates_differences():
  loaded, init = trees()
  loaded["head"]["kernel"] = np.ones((4, 1000), np.float32)  # other classes
  del loaded["head"]["bias"]
  loaded["old_head"] = {"kernel": np.ones((4, 3), np.float32)}
  merged = merge_params(loaded, init, dont_load=("head/.*", "old_.*"))
  np.testing.assert_array_equal(merged["head"]["kernel"], init["head"]["kernel"])
  np.testing.assert_array_equal(merged["head"]["bias"], init["head"]["bias"])
  assert "old_head" not in merged
  np.testing.assert_array_equal(merged["encoder"]["gn"]["scale"],
                                loaded["encoder"]["gn"]["scale"])
  # fullmatch: "head" alone does not cover "head/kernel".
  with pytest.raises(ValueError):
    merge_params(loaded, init, dont_load=("head", "old_.*"))


def test_every_mismatch_is_named_with_both_shapes():
  loaded, init = trees()
  del loaded["encoder"]["gn"]["bias"]
  loaded["encoder"]["extra"] = np.zeros((5,), np.float32)
  loaded["encoder"]["conv"]["kernel"] = np.zeros((3, 3, 1, 4), np.float32)
  loaded["head"]["kernel"] = np.zeros((4, 1000), np.float32)
  with pytest.raises(ValueError) as e:
    merge_params(loaded, init)
  message = str(e.value)
  assert "- encoder/gn/bias: model shape (4,)" in message
  assert "+ encoder/extra: checkpoint shape (5,)" in message
  assert ("* encoder/conv/kernel: checkpoint shape (3, 3, 1, 4), model shape "
          "(3, 3, 2, 4)") in message
  assert ("* head/kernel: checkpoint shape (4, 1000), model shape (4, 10)"
          in message)
  assert "dont_load" in message


def test_casts_to_init_dtype_and_accepts_abstract_init():
  loaded, init = trees()
  abstract = jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16), init)
  merged = merge_params(loaded, abstract)
  assert all(leaf.dtype == jnp.bfloat16
             for leaf in jax.tree_util.tree_leaves(merged))
  np.testing.assert_allclose(
      np.asarray(merged["head"]["bias"], np.float32), loaded["head"]["bias"],
      rtol=1e-2)
  with pytest.raises(ValueError, match="shape structs.*head/bias"):
    merge_params(loaded, abstract, dont_load=("head/.*",))


def test_bad_regex_and_bad_tree():
  loaded, init = trees()
  with pytest.raises(ValueError, match=r"dont_load pattern '\(head' is not a "
                     "valid regex"):
    merge_params(loaded, init, dont_load=("(head",))
  with pytest.raises(TypeError, match="`loaded` must be a nested mapping"):
    merge_params([1, 2], init)


def test_count_params_on_arrays_and_shape_structs():
  loaded, init = trees()
  expected = sum(a.size for a in jax.tree_util.tree_leaves(init))
  assert count_params(init) == expected == 3 * 3 * 2 * 4 + 4 + 4 + 40 + 10
  abstract = jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), init)
  assert count_params(abstract) == expected
  assert count_params({}) == 0
