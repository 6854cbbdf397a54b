"""The small-image stems of ResNetV2 ("small", "small_s2"): shapes, parameters, numerics, and
that weights of one stem never load silently into a model of another (BiT .npz, export,
workdir). BiT .npz files into a small stem: tests/test_load_bit.py.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from remedis_jax import checkpointing, export, initialization
from remedis_jax.models import VARIANTS
from remedis_jax.models import bit
from remedis_jax.models import count_params
from remedis_jax.models import create_model


def abstract_init(model, size=32, channels=3):
  images = jax.ShapeDtypeStruct((2, size, size, channels), jnp.float32)
  return jax.eval_shape(model.init_with_output, jax.random.key(0), images)


# Spatial side of (root, block1, ..., block4) at 32 px: "bit" divides by 4 before the first
# stage, "small" by 1, "small_s2" by 2; stages 2-4 halve it each.
SIDES = {"bit": (8, 8, 4, 2, 1), "small": (32, 32, 16, 8, 4), "small_s2": (16, 16, 8, 4, 2)}


@pytest.mark.parametrize("name,widths", [("R_micro", (8, 32, 64, 128, 256)),
                                         ("R_tiny", (16, 64, 128, 256, 512))])
@pytest.mark.parametrize("stem", ["bit", "small", "small_s2"])
def test_root_and_stage_shapes(name, widths, stem):
  (output, out), _ = abstract_init(create_model(name, stem=stem))
  keys = ("root", "block1", "block2", "block3", "block4")
  shapes = {k: out[k].shape for k in keys}
  assert shapes == {k: (2, side, side, width)
                    for k, side, width in zip(keys, SIDES[stem], widths)}
  assert out["feature_map"].shape == out["block4"].shape
  assert output.shape == (2, widths[-1])


def test_param_counts_differ_only_by_the_root_kernel():
  # R_micro, 3 channels, counted by hand. Units (gn1 + conv1 + gn2 + conv2 + gn3 + conv3 + proj):
  #   block1: cin 8, mid 8, out 32:      16 +   64 +  16 +   576 +  16 +   256 +   256 =   1200
  #   block2: cin 32, mid 16, out 64:    64 +  512 +  32 +  2304 +  32 +  1024 +  2048 =   6016
  #   block3: cin 64, mid 32, out 128:  128 + 2048 +  64 +  9216 +  64 +  4096 +  8192 =  23808
  #   block4: cin 128, mid 64, out 256: 256 + 8192 + 128 + 36864 + 128 + 16384 + 32768 =  94720
  #   norm_pre_head: 2 * 256 = 512.                                              sum = 126256
  # Root: 7 * 7 * 3 * 8 = 1176 ("bit"); 3 * 3 * 3 * 8 = 216 ("small", "small_s2").
  counts = {stem: count_params(abstract_init(create_model("R_micro", stem=stem))[1])
            for stem in bit.STEMS}
  assert counts == {"bit": 127432, "small": 126472, "small_s2": 126472}
  params = {stem: abstract_init(create_model("R_micro", stem=stem))[1]["params"]
            for stem in bit.STEMS}
  for stem in ("small", "small_s2"):
    assert jax.tree.structure(params[stem]) == jax.tree.structure(params["bit"])
    assert params[stem]["root_block"]["conv_root"]["kernel"].shape == (3, 3, 3, 8)
    others = lambda p: {k: v for k, v in p.items() if k != "root_block"}
    assert jax.tree.map(lambda a: a.shape, others(params[stem])) == \
        jax.tree.map(lambda a: a.shape, others(params["bit"]))


def test_bit_stem_is_the_default_and_unchanged():
  default = create_model("R_micro")
  explicit = create_model("R_micro", stem="bit")
  direct = bit.ResNetV2(**VARIANTS["R_micro"])  # built as before the option existed
  assert default.stem == explicit.stem == direct.stem == "bit"
  assert default == explicit == direct  # every field, so the same computation
  abstract = abstract_init(default, channels=1)[1]["params"]
  assert abstract["root_block"]["conv_root"]["kernel"].shape == (7, 7, 1, 8)
  rng = np.random.RandomState(0)
  params = jax.tree.map(lambda a: rng.randn(*a.shape).astype(np.float32), abstract)
  images = rng.uniform(-1, 1, (2, 32, 32, 1)).astype(np.float32)
  apply = jax.jit(lambda model, p, x: model.apply({"params": p}, x), static_argnums=0)
  reference = apply(default, params, images)
  for model in (explicit, direct):
    assert jax.tree.structure(abstract_init(model, channels=1)[1]["params"]) == \
        jax.tree.structure(abstract)
    jax.tree.map(np.testing.assert_array_equal, apply(model, params, images), reference)
  # The numerics of the "bit" root against NumPy: tests/test_load_bit.py.


def np_standardized_conv(x, kernel, stride, pad):
  """float64 weight standardisation + zero-padded convolution, written as plain loops."""
  kernel = kernel.astype(np.float64)
  kernel = kernel - kernel.mean(axis=(0, 1, 2))
  kernel = kernel / np.sqrt((kernel**2).mean(axis=(0, 1, 2)) + 1e-10)
  x = np.pad(x.astype(np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  kh, kw = kernel.shape[:2]
  oh, ow = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], oh, ow, kernel.shape[3]))
  for i in range(oh):
    for j in range(ow):
      window = x[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :]
      out[:, i, j] = np.tensordot(window, kernel, axes=([1, 2, 3], [0, 1, 2]))
  return out


@pytest.mark.parametrize("stem,stride,side", [("small", 1, (5, 6)), ("small_s2", 2, (3, 3))])
def test_small_root_is_a_standardized_3x3_conv(stem, stride, side):
  rng = np.random.RandomState(0)
  images = rng.uniform(-1, 1, (2, 5, 6, 3)).astype(np.float32)
  # A mean and scale the standardisation must remove.
  kernel = (0.3 + 0.05 * rng.randn(3, 3, 3, 4)).astype(np.float32)
  root = bit.RootBlock(4, stem=stem)
  out = root.apply({"params": {"conv_root": {"kernel": kernel}}}, images)
  ref = np_standardized_conv(images, kernel, stride, pad=1)
  assert out.shape == ref.shape == (2, *side, 4)
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
  assert ref.min() < 0  # no ReLU in the root, as in BiT's


def test_unknown_stem_and_stem_on_a_vit_are_refused():
  with pytest.raises(ValueError, match="Unknown stem 'tiny'; known stems: bit, small, small_s2"):
    create_model("R_micro", stem="tiny")
  with pytest.raises(ValueError, match=r"create_model\('ViT-micro/4'\): stem='small' is a BiT"):
    create_model("ViT-micro/4", stem="small")
  assert create_model("ViT-micro/4", stem="bit").patch_size == 4


def _random_params(model, channels=3):
  rng = np.random.RandomState(0)
  abstract = abstract_init(model, channels=channels)[1]["params"]
  return jax.tree.map(lambda a: rng.randn(*a.shape).astype(np.float32), abstract)


def test_export_keeps_the_stem_and_refuses_another(tmp_path):
  params = _random_params(create_model("R_micro", stem="small_s2"))
  out = str(tmp_path / "export")
  export.write_export(out, {"encoder": params}, {"model_name": "R_micro", "stem": "small_s2"})
  module, loaded = export.create_encoder_from_export(out)
  assert module.stem == "small_s2"
  images = np.random.RandomState(1).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  _, out_loaded = jax.eval_shape(module.apply, {"params": loaded}, images)
  assert out_loaded["root"].shape == (2, 16, 16, 8)
  assert initialization.load_init(out, "R_micro", stem="small_s2") is not None
  # "small" has the same parameter shapes as "small_s2": only the recorded stem tells them apart.
  for stem in ("small", "bit"):
    with pytest.raises(ValueError) as error:
      initialization.load_init(out, "R_micro", stem=stem)
    message = str(error.value)
    assert "is an export of a model with stem 'small_s2'" in message
    assert f"config.model.stem={stem!r}" in message
    assert "set --config.model.stem=small_s2" in message

  # A model.json written before the option has no "stem": it means "bit".
  old = str(tmp_path / "old_export")
  export.write_export(old, {"encoder": _random_params(create_model("R_micro"))},
                      {"model_name": "R_micro"})
  assert export.create_encoder_from_export(old)[0].stem == "bit"
  with pytest.raises(ValueError, match="stem 'bit', but this run's config.model.stem='small'"):
    initialization.load_init(old, "R_micro", stem="small")


def _fake_workdir(path, params, model_config):
  """A training workdir as the trainers leave it: config.json plus a checkpoint."""
  manager = checkpointing.make_manager(str(path), asynchronous=False, with_data=False)
  checkpointing.save(manager, 3, {"step": np.int32(3), "params": {"encoder": params}},
                     force=True)
  manager.close()
  if model_config is not None:
    config = {"model": model_config, "data": {"image_size": 32, "num_channels": 3}}
    (path / export.RUN_CONFIG_FILE).write_text(json.dumps(config))
  return str(path)


def test_workdir_stem_is_checked_and_exported(tmp_path):
  params = _random_params(create_model("R_micro", stem="small"))
  workdir = _fake_workdir(tmp_path / "run", params, {"name": "R_micro", "stem": "small"})
  assert initialization.load_init(workdir, "R_micro", stem="small") is not None
  for stem in ("small_s2", "bit"):
    with pytest.raises(ValueError) as error:
      initialization.load_init(workdir, "R_micro", stem=stem)
    assert "is a workdir of a model with stem 'small'" in str(error.value)
    assert "set --config.model.stem=small" in str(error.value)
  # The checkpoints/ folder itself finds the workdir's config.json one level up.
  with pytest.raises(ValueError, match="stem 'small'"):
    initialization.load_init(f"{workdir}/{checkpointing.CHECKPOINT_SUBDIR}", "R_micro")

  metadata = export.export_workdir(workdir, str(tmp_path / "export"))
  assert metadata["stem"] == "small"
  module, _ = export.create_encoder_from_export(str(tmp_path / "export"))
  assert module.stem == "small"

  # No config.json (nothing records the stem): the root kernel's size still tells 3x3 from 7x7.
  bare = _fake_workdir(tmp_path / "bare", params, None)
  with pytest.raises(ValueError, match=r"root kernel is 3x3 \(stem 'small' or 'small_s2'\), "
                                       r"but this run's config.model.stem='bit' needs 7x7"):
    initialization.load_init(bare, "R_micro")


def test_trainers_build_the_configured_stem():
  # pylint: disable=g-import-not-at-top
  from configs import finetune, pretrain_simclr, segment
  from remedis_jax import train_finetune, train_segment, train_simclr
  # pylint: enable=g-import-not-at-top
  built = {}
  for module, config_file, build in (
      ("simclr", pretrain_simclr, lambda c: train_simclr.build_model(c).encoder),
      ("finetune", finetune, lambda c: train_finetune.build_model(c, 2).encoder),
      ("segment", segment, lambda c: train_segment.build_model(c).encoder)):
    config = config_file.get_config("smoke")
    config.model.name = "R_micro"  # segment's smoke config has a ViT
    assert build(config).stem == "bit"
    with config.unlocked():
      config.model.stem = "small"
    built[module] = build(config).stem
  assert built == {"simclr": "small", "finetune": "small", "segment": "small"}
