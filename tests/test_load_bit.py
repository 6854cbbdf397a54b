"""load_bit_npz: published BiT layout -> params, checked against NumPy."""

import pathlib
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from remedis_jax.models import bit
from remedis_jax.models import create_model
from remedis_jax.models import infer_bit_variant
from remedis_jax.models import load_bit_npz
from remedis_jax.models import merge_params

# R_tiny as the task defines it, written out here independently of VARIANTS.
TINY_ROOT, TINY_MIDS, TINY_GROUPS = 16, (16, 32, 64, 128), 8


def published_shapes(root, mids, units, in_channels=3, num_classes=None):
  """Key -> shape of a BiT npz, following big_transfer's TF layout."""
  shapes = {"resnet/root_block/standardized_conv2d/kernel":
                (7, 7, in_channels, root)}
  cin = root
  for b, (mid, n) in enumerate(zip(mids, units), 1):
    for u in range(1, n + 1):
      p = f"resnet/block{b}/unit{u:02d}/"
      shapes[p + "a/group_norm/gamma"] = (cin,)
      shapes[p + "a/group_norm/beta"] = (cin,)
      shapes[p + "a/standardized_conv2d/kernel"] = (1, 1, cin, mid)
      shapes[p + "b/group_norm/gamma"] = (mid,)
      shapes[p + "b/group_norm/beta"] = (mid,)
      shapes[p + "b/standardized_conv2d/kernel"] = (3, 3, mid, mid)
      shapes[p + "c/group_norm/gamma"] = (mid,)
      shapes[p + "c/group_norm/beta"] = (mid,)
      shapes[p + "c/standardized_conv2d/kernel"] = (1, 1, mid, 4 * mid)
      if u == 1:
        shapes[p + "a/proj/standardized_conv2d/kernel"] = (1, 1, cin, 4 * mid)
      cin = 4 * mid
  shapes["resnet/group_norm/gamma"] = (cin,)
  shapes["resnet/group_norm/beta"] = (cin,)
  if num_classes:
    shapes["resnet/head/conv2d/kernel"] = (1, 1, cin, num_classes)
    shapes["resnet/head/conv2d/bias"] = (num_classes,)
  return shapes


def random_weights(shapes, seed=0):
  rng = np.random.RandomState(seed)
  out = {}
  for k, s in shapes.items():
    if k.endswith("gamma"):
      out[k] = (1 + 0.2 * rng.randn(*s)).astype(np.float32)
    elif k.endswith("beta") or k.endswith("bias"):
      out[k] = (0.2 * rng.randn(*s)).astype(np.float32)
    else:  # Non-standardised kernels: a mean and scale the model must remove.
      out[k] = (0.3 + 0.05 * rng.randn(*s)).astype(np.float32)
  return out


def tiny_weights(num_classes=5):
  return random_weights(published_shapes(TINY_ROOT, TINY_MIDS, (1, 1, 1, 1),
                                         num_classes=num_classes))


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory):
  weights = tiny_weights()
  path = tmp_path_factory.mktemp("bit") / "BiT-M-R_tiny.npz"
  np.savez(path, **weights)
  return path, weights


# ---- An independent NumPy ResNet-v2 (float64). ----

def np_conv(x, w, stride=1, pad=0):
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  kh, kw, cin, cout = w.shape
  oh = (x.shape[1] - kh) // stride + 1
  ow = (x.shape[2] - kw) // stride + 1
  patches = np.stack([x[:, i:i + stride * oh:stride, j:j + stride * ow:stride]
                      for i in range(kh) for j in range(kw)], axis=3)
  return np.einsum("bhwkc,kco->bhwo", patches, w.reshape(kh * kw, cin, cout))


def np_standardize(w):
  w = w.astype(np.float64)
  w = w - w.mean(axis=(0, 1, 2), keepdims=True)
  return w / np.sqrt((w**2).mean(axis=(0, 1, 2), keepdims=True) + 1e-10)


def np_group_norm(x, gamma, beta, groups):
  b, h, w, c = x.shape
  g = x.reshape(b, h, w, groups, c // groups)
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = ((g - mean)**2).mean(axis=(1, 2, 4), keepdims=True)
  g = (g - mean) / np.sqrt(var + 1e-5)
  return g.reshape(x.shape) * gamma + beta


def np_max_pool(x, pad_value=0.0):
  # BiT pads the conv output with zeros before a VALID 3x3/2 max-pool.
  x = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=pad_value)
  oh, ow = (x.shape[1] - 3) // 2 + 1, (x.shape[2] - 3) // 2 + 1
  windows = [x[:, i:i + 2 * oh:2, j:j + 2 * ow:2]
             for i in range(3) for j in range(3)]
  return np.max(np.stack(windows), axis=0)


def np_resnet(weights, images, groups):
  relu = lambda v: np.maximum(v, 0)
  out = {}
  x = np_conv(images.astype(np.float64),
              np_standardize(weights["resnet/root_block/standardized_conv2d/kernel"]),
              stride=2, pad=3)
  out["root_conv"] = x
  x = out["root"] = np_max_pool(x)
  for b in range(1, 5):
    unit = 1
    while f"resnet/block{b}/unit{unit:02d}/a/group_norm/gamma" in weights:
      p = f"resnet/block{b}/unit{unit:02d}/"
      stride = 2 if (b > 1 and unit == 1) else 1
      gn = lambda v, part: np_group_norm(
          v, weights[p + part + "/group_norm/gamma"],
          weights[p + part + "/group_norm/beta"], groups)
      kernel = lambda name: np_standardize(weights[p + name])
      pre = relu(gn(x, "a"))
      shortcut = x
      if p + "a/proj/standardized_conv2d/kernel" in weights:
        shortcut = np_conv(pre, kernel("a/proj/standardized_conv2d/kernel"),
                           stride=stride)
      h = np_conv(pre, kernel("a/standardized_conv2d/kernel"))
      h = np_conv(relu(gn(h, "b")), kernel("b/standardized_conv2d/kernel"),
                  stride=stride, pad=1)
      h = np_conv(relu(gn(h, "c")), kernel("c/standardized_conv2d/kernel"))
      x = h + shortcut
      unit += 1
    out[f"block{b}"] = x
  x = relu(np_group_norm(x, weights["resnet/group_norm/gamma"],
                         weights["resnet/group_norm/beta"], groups))
  out["pre_logits"] = x.mean(axis=(1, 2))
  out["logits"] = (out["pre_logits"] @ weights["resnet/head/conv2d/kernel"][0, 0]
                   + weights["resnet/head/conv2d/bias"])
  return out


def test_loaded_tiny_model_matches_numpy_resnet(tiny_npz):
  path, weights = tiny_npz
  name, params = load_bit_npz(path, keep_head=True)
  assert name == "R_tiny"
  images = np.random.RandomState(1).uniform(-1, 1, (2, 32, 32, 3)).astype(
      np.float32)
  model = create_model(name, num_classes=5)
  logits, out = jax.jit(model.apply)({"params": params}, images)
  ref = np_resnet(weights, images, TINY_GROUPS)

  # The data must tell zero padding from max-pool's usual -inf padding,
  # otherwise this test could not catch that mistake.
  assert not np.allclose(np_max_pool(ref["root_conv"], -np.inf), ref["root"])

  for key in ("root", "block1", "block2", "block4", "pre_logits", "logits"):
    scale = np.abs(ref[key]).max()
    np.testing.assert_allclose(np.asarray(out[key]), ref[key],
                               rtol=1e-4, atol=1e-4 * scale, err_msg=key)
  np.testing.assert_allclose(np.asarray(logits), ref["logits"], rtol=1e-4,
                             atol=1e-4 * np.abs(ref["logits"]).max())


def test_head_dropped_unless_kept_and_params_fit_model(tiny_npz):
  path, weights = tiny_npz
  name, params = load_bit_npz(path)
  assert "head" not in params
  assert params["norm_pre_head"]["scale"].shape == (512,)
  np.testing.assert_array_equal(
      params["block1"]["unit01"]["gn1"]["scale"],
      weights["resnet/block1/unit01/a/group_norm/gamma"])
  np.testing.assert_array_equal(
      params["block2"]["unit01"]["conv_proj"]["kernel"],
      weights["resnet/block2/unit01/a/proj/standardized_conv2d/kernel"])
  for num_classes, kept in ((None, params),
                            (5, load_bit_npz(path, keep_head=True)[1])):
    abstract = jax.eval_shape(
        create_model(name, num_classes=num_classes).init, jax.random.key(0),
        jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))["params"]
    merged = merge_params(kept, abstract)  # Raises on any key/shape mismatch.
    assert jax.tree_util.tree_structure(merged) == \
        jax.tree_util.tree_structure(abstract)
  np.testing.assert_array_equal(
      kept["head"]["kernel"], weights["resnet/head/conv2d/kernel"][0, 0])


def test_published_layout_of_r50x1_and_r152x2_by_shapes_only():
  r50 = published_shapes(64, (64, 128, 256, 512), (3, 4, 6, 3),
                         num_classes=21843)
  assert infer_bit_variant(r50) == "R50x1"
  assert bit.bit_npz_shapes("R50x1", num_classes=21843) == r50
  r152x2 = published_shapes(128, (128, 256, 512, 1024), (3, 8, 36, 3))
  assert infer_bit_variant(r152x2) == "R152x2"
  assert bit.bit_npz_shapes("R152x2") == r152x2
  r101x3 = published_shapes(192, (192, 384, 768, 1536), (3, 4, 23, 3))
  assert infer_bit_variant(r101x3) == "R101x3"
  with pytest.raises(ValueError, match=r"blocks \[3, 4, 6, 3\] and root width 96"):
    infer_bit_variant(published_shapes(96, (96, 192, 384, 768), (3, 4, 6, 3)))


def test_numbered_conv_names_are_accepted(tmp_path):
  weights = tiny_weights()
  key = "resnet/block3/unit01/b/standardized_conv2d/kernel"
  weights[key.replace("conv2d/", "conv2d_7/")] = weights.pop(key)
  np.savez(tmp_path / "w.npz", **weights)
  _, params = load_bit_npz(tmp_path / "w.npz")
  np.testing.assert_array_equal(params["block3"]["unit01"]["conv2"]["kernel"],
                                weights[key.replace("conv2d/", "conv2d_7/")])


def _save(tmp_path, weights):
  path = tmp_path / "bad.npz"
  np.savez(path, **weights)
  return path


def test_missing_unexpected_and_mismatched_keys_are_all_named(tmp_path):
  weights = tiny_weights()
  del weights["resnet/block2/unit01/c/group_norm/beta"]
  del weights["resnet/group_norm/gamma"]
  weights["resnet/block9/extra/kernel"] = np.zeros((2, 3), np.float32)
  weights["resnet/block1/unit01/b/group_norm/gamma"] = np.ones((1, 1, 1, 16),
                                                               np.float32)
  with pytest.raises(ValueError) as e:
    load_bit_npz(_save(tmp_path, weights), model_name="R_tiny")
  message = str(e.value)
  assert "missing key resnet/block2/unit01/c/group_norm/beta: expected shape (32,)" in message
  assert "missing key resnet/group_norm/gamma: expected shape (512,)" in message
  assert "unexpected key resnet/block9/extra/kernel: shape (2, 3)" in message
  assert ("shape mismatch resnet/block1/unit01/b/group_norm/gamma: file has "
          "(1, 1, 1, 16), R_tiny expects (16,)") in message


def test_wrong_model_name_suggests_the_right_one(tiny_npz):
  path, _ = tiny_npz
  with pytest.raises(ValueError, match="look like R_tiny") as e:
    load_bit_npz(path, model_name="R_micro")
  assert ("shape mismatch resnet/root_block/standardized_conv2d/kernel: file "
          "has (7, 7, 3, 16), R_micro expects (7, 7, 3, 8)") in str(e.value)
  with pytest.raises(ValueError, match="known names: R50x1"):
    load_bit_npz(path, model_name="R18")


def test_keep_head_without_head_fails(tmp_path):
  weights = tiny_weights(num_classes=None)
  with pytest.raises(ValueError, match="keep_head=True but the head is missing"):
    load_bit_npz(_save(tmp_path, weights), keep_head=True)


def test_not_an_npz_truncated_and_npy_files(tmp_path, tiny_npz):
  text = tmp_path / "weights.npz"
  text.write_text("<html>404 not found</html>")
  with pytest.raises(ValueError, match="is not an .npz archive"):
    load_bit_npz(text)
  npy = tmp_path / "array.npz"
  with open(npy, "wb") as f:
    np.save(f, np.zeros(3))
  with pytest.raises(ValueError, match="single .npy array"):
    load_bit_npz(npy)
  data = pathlib.Path(tiny_npz[0]).read_bytes()
  truncated = tmp_path / "truncated.npz"
  truncated.write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match="truncated or corrupt"):
    load_bit_npz(truncated)
  # A corrupt member (intact zip directory, broken array payload).
  corrupt = tmp_path / "corrupt.npz"
  with zipfile.ZipFile(corrupt, "w") as z:
    z.writestr("resnet/group_norm/gamma.npy", b"\x93NUMPY garbage")
  with pytest.raises(ValueError, match="truncated or corrupt"):
    load_bit_npz(corrupt)
  with pytest.raises(ValueError, match="no key 'resnet/root_block"):
    load_bit_npz(_save(tmp_path, {"foo": np.zeros(2)}))
  with pytest.raises(FileNotFoundError):
    load_bit_npz(tmp_path / "absent.npz")


def test_bit_weights_into_a_small_stem_fail_clearly(tiny_npz):
  from remedis_jax import initialization  # pylint: disable=g-import-not-at-top
  path, _ = tiny_npz
  for stem in ("small", "small_s2"):
    with pytest.raises(ValueError) as e:
      load_bit_npz(path, stem=stem)
    message = str(e.value)
    assert "its root is BiT's 7x7 stride-2 conv + max-pool" in message
    assert ("resnet/root_block/standardized_conv2d/kernel has shape "
            "(7, 7, 3, 16)") in message
    assert f"the config asks for stem={stem!r} (a 3x3 root conv)" in message
    assert "--config.model.stem=bit" in message
  # The path every trainer takes (config.model.init=<npz>).
  with pytest.raises(ValueError, match="stem='small'"):
    initialization.load_init(str(path), "R_tiny", stem="small")
  loaded = initialization.load_init(str(path), "R_tiny")
  assert loaded.description.startswith("BiT weights")
