"""Modality presets: every recipe runs, keeps uint8 and reaches the requested size."""
import numpy as np
import pytest

from data_pipelines import ops
from data_pipelines import ops_geometric
from data_pipelines import ops_intensity
from data_pipelines import presets


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
@pytest.mark.parametrize("mode", presets.MODES)
@pytest.mark.parametrize("channels", [1, 3])
def test_preset_runs_and_keeps_uint8_and_size(name, mode, channels):
  recipe = presets.get_preset(name, mode, 32)
  image = np.random.default_rng(0).integers(0, 256, (50, 70, channels), dtype=np.uint8)
  mask = np.zeros((50, 70), np.uint8)
  mask[10:40, 20:50] = 1
  for seed in range(3):
    out = ops.apply_ops(recipe, {"image": image, "lung_mask": mask}, np.random.default_rng(seed))
    assert out["image"].dtype == np.uint8
    assert out["image"].shape == (32, 32, channels)
    assert out["lung_mask"].shape == (32, 32)


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_eval_recipe_is_deterministic(name):
  recipe = presets.get_preset(name, "eval", 24)
  image = np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)
  first = ops.apply_ops(recipe, {"image": image}, np.random.default_rng(0))["image"]
  second = ops.apply_ops(recipe, {"image": image}, np.random.default_rng(1))["image"]
  np.testing.assert_array_equal(first, second)


def _types(name, mode):
  return [type(op) for op in presets.get_preset(name, mode, 64)]


def test_modality_choices():
  cxr = _types("cxr", "pretrain")
  assert ops_geometric.FlipUpDown not in cxr and ops_geometric.Rot90 not in cxr
  assert ops_intensity.ColorDistortion not in cxr  # No hue / saturation / grayscale on X-rays.
  hue = [op.hue for op in presets.get_preset("cxr", "pretrain", 64)
         if isinstance(op, ops_intensity.ColorJitter)]
  assert hue == [0.0]
  assert ops_geometric.Rot90 in _types("pathology", "pretrain")
  assert ops_intensity.StainJitter in _types("pathology", "pretrain")
  generic = presets.get_preset("generic", "pretrain", 96)
  assert ops_intensity.ColorDistortion(1.0) in generic
  assert ops_intensity.GaussianBlur(0.5) in generic
  assert ops_geometric.RandomResizedCrop(96, area=(0.08, 1.0)) in generic
  for name in presets.PRESETS:  # Fine-tuning never distorts hue.
    assert ops_intensity.ColorDistortion not in _types(name, "finetune")


@pytest.mark.parametrize("name", ["cxr", "derm", "pathology", "fundus", "mammo", "generic"])
def test_no_blur_on_small_images(name):
  # SimCLR drops blur at CIFAR's 32 px; a 2 px sigma erases a 28-32 px radiograph's findings.
  large = presets.get_preset(name, "pretrain", presets.BLUR_MIN_SIZE + 1)
  assert ops_intensity.GaussianBlur in [type(op) for op in large]
  for size in (28, 32, presets.BLUR_MIN_SIZE):
    small = presets.get_preset(name, "pretrain", size)
    assert ops_intensity.GaussianBlur not in [type(op) for op in small]
    # Everything else is kept, in order.
    assert [op for op in large if not isinstance(op, ops_intensity.GaussianBlur)][1:] == small[1:]


def test_unknown_preset_and_mode():
  with pytest.raises(KeyError, match="known presets: cxr"):
    presets.get_preset("xray", "pretrain", 32)
  with pytest.raises(ValueError, match="pretrain"):
    presets.get_preset("cxr", "train", 32)
