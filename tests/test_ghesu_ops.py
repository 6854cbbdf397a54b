"""Ghesu et al. 2022 intensity ops (energy_intensity, linear_intensity) and the ghesu preset."""
import math

import numpy as np
import pytest

from data_pipelines import ops
from data_pipelines import ops_geometric
from data_pipelines import ops_intensity
from data_pipelines import presets

# Every grey level once, as an (16, 16, 1) image, so a point-wise op's curve is visible.
_RAMP = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)


def _energy_reference(levels, energy_ratio, fraction, exponent):
  """The two-component attenuation model written out, independently of the op's algebra."""
  attenuation = levels.astype(np.float64) / 255.0
  photoelectric_share = fraction * attenuation
  # Compton part unchanged, photoelectric part scaled by (E'/E)**-n.
  new = attenuation * ((1 - photoelectric_share) + photoelectric_share * energy_ratio ** -exponent)
  densest = (1 - fraction) + fraction * energy_ratio ** -exponent
  return np.clip(np.rint(255.0 * new / densest), 0, 255).astype(np.uint8)


# ---- energy_intensity ----


@pytest.mark.parametrize("energy_ratio", [0.7, 0.8, 1.0, 1.25, 1.5])
@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5])
def test_energy_intensity_matches_the_attenuation_model(energy_ratio, fraction):
  op = ops_intensity.EnergyIntensity((energy_ratio, energy_ratio), fraction, p=1.0)
  out = op({"image": _RAMP}, np.random.default_rng(0))["image"]
  expected = _energy_reference(np.arange(256), energy_ratio, fraction, 3.0)
  np.testing.assert_array_equal(out.reshape(-1), expected)


def test_energy_intensity_is_the_identity_at_the_acquisition_energy():
  op = ops_intensity.EnergyIntensity(energy_ratio=(1.0, 1.0), p=1.0)
  image = np.random.default_rng(1).integers(0, 256, (20, 24, 3), dtype=np.uint8)
  np.testing.assert_array_equal(op({"image": image}, np.random.default_rng(2))["image"], image)


def test_energy_intensity_keeps_the_order_of_grey_levels():
  # The strongest setting allowed (fraction 0.5) over a wide energy range, many draws.
  op = ops_intensity.EnergyIntensity(energy_ratio=(0.5, 2.0), photoelectric_fraction=0.5, p=1.0)
  image = np.random.default_rng(3).integers(0, 256, (30, 30, 1), dtype=np.uint8)
  order = np.argsort(image.reshape(-1), kind="stable")
  changed = 0
  for seed in range(50):
    curve = op({"image": _RAMP}, np.random.default_rng(seed))["image"].reshape(-1)
    assert np.all(np.diff(curve.astype(int)) >= 0), f"seed {seed}: not monotonic"
    assert curve[0] == 0 and curve[255] == 255
    out = op({"image": image}, np.random.default_rng(seed))["image"].reshape(-1)
    assert np.all(np.diff(out[order].astype(int)) >= 0)  # Sorted input stays sorted.
    changed += int(not np.array_equal(curve, _RAMP.reshape(-1)))
  assert changed >= 45  # The op does change images (log-uniform energy, p=1).
  # The float curve itself is strictly increasing at both ends of the energy range.
  for energy_ratio in (0.5, 2.0):
    assert np.all(np.diff(op.curve(energy_ratio)) > 0)


def test_energy_intensity_direction_follows_kvp_physics():
  # Higher energy: less photoelectric absorption, so bone stands out less and mid greys rise
  # towards bone; lower energy: the reverse.
  rng = np.random.default_rng(0)
  higher = ops_intensity.EnergyIntensity((1.25, 1.25), p=1.0)({"image": _RAMP}, rng)["image"]
  lower = ops_intensity.EnergyIntensity((0.8, 0.8), p=1.0)({"image": _RAMP}, rng)["image"]
  mid = _RAMP.reshape(-1)[1:255].astype(int)
  assert np.all(higher.reshape(-1)[1:255] >= mid) and higher.reshape(-1)[128] > 128
  assert np.all(lower.reshape(-1)[1:255] <= mid) and lower.reshape(-1)[128] < 128


@pytest.mark.parametrize("channels", [1, 3])
def test_energy_intensity_deterministic_dtype_shape_and_image_only(channels):
  op = ops_intensity.EnergyIntensity(p=1.0)
  image = np.random.default_rng(4).integers(0, 256, (20, 24, channels), dtype=np.uint8)
  mask = (np.arange(20 * 24).reshape(20, 24) % 2).astype(np.uint8)
  first = op({"image": image, "lung_mask": mask, "label": 3}, np.random.default_rng(5))
  second = op({"image": image, "lung_mask": mask, "label": 3}, np.random.default_rng(5))
  np.testing.assert_array_equal(first["image"], second["image"])
  assert first["image"].dtype == np.uint8 and first["image"].shape == image.shape
  assert first["lung_mask"] is mask and first["label"] == 3
  if channels == 3:  # One curve for every channel: a grey RGB image stays grey.
    grey = np.repeat(image[..., :1], 3, axis=-1)
    out = op({"image": grey}, np.random.default_rng(5))["image"]
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_energy_intensity_draws_the_same_numbers_whatever_p():
  image = _RAMP
  after = []
  for p in (0.0, 1.0):
    rng = np.random.default_rng(6)
    out = ops_intensity.EnergyIntensity(p=p)({"image": image}, rng)["image"]
    after.append(rng.random())
    if p == 0.0:
      np.testing.assert_array_equal(out, image)
  assert after[0] == after[1]


def test_energy_intensity_samples_the_energy_log_uniformly():
  op = ops_intensity.EnergyIntensity(energy_ratio=(0.8, 1.25), p=1.0)
  rng = np.random.default_rng(7)
  rng.random()  # The p draw comes first.
  expected_ratio = math.exp(rng.uniform(math.log(0.8), math.log(1.25)))
  out = op({"image": _RAMP}, np.random.default_rng(7))["image"].reshape(-1)
  np.testing.assert_array_equal(out, _energy_reference(np.arange(256), expected_ratio, 0.4, 3.0))


def test_energy_intensity_rejects_bad_parameters():
  with pytest.raises(ValueError, match="energy_ratio"):
    ops_intensity.EnergyIntensity(energy_ratio=(0.0, 1.2))
  with pytest.raises(ValueError, match=r"photoelectric_fraction must be in \[0, 0.5\]"):
    ops_intensity.EnergyIntensity(photoelectric_fraction=0.7)


# ---- linear_intensity ----


@pytest.mark.parametrize("seed", range(6))
def test_linear_intensity_matches_numpy(seed):
  op = ops_intensity.LinearIntensity(scale=(0.5, 1.6), shift=(-0.3, 0.3), p=1.0)
  image = np.random.default_rng(seed).integers(0, 256, (17, 13, 1), dtype=np.uint8)
  out = op({"image": image}, np.random.default_rng(seed))["image"]
  replay = np.random.default_rng(seed)
  replay.random()  # p
  a, b = replay.uniform(0.5, 1.6), replay.uniform(-0.3, 0.3)
  expected = np.clip(np.rint(255.0 * (a * (image / 255.0) + b)), 0, 255).astype(np.uint8)
  np.testing.assert_array_equal(out, expected)
  assert out.dtype == np.uint8 and out.shape == image.shape


def test_linear_intensity_clips_and_draws_the_same_numbers_whatever_p():
  op = ops_intensity.LinearIntensity(scale=(2.0, 2.0), shift=(0.2, 0.2), p=1.0)
  out = op({"image": _RAMP}, np.random.default_rng(0))["image"].reshape(-1).astype(int)
  # 2 * x + 51 grey levels, clipped at 255 from x = 102 on.
  assert out[0] == 51 and out[100] == 251 and out[101] == 253 and np.all(out[102:] == 255)
  after = []
  for p in (0.0, 1.0):
    rng = np.random.default_rng(8)
    result = ops_intensity.LinearIntensity(p=p)({"image": _RAMP}, rng)["image"]
    after.append(rng.random())
    if p == 0.0:
      assert result is _RAMP
  assert after[0] == after[1]
  with pytest.raises(ValueError, match="scale must satisfy 0 < min"):
    ops_intensity.LinearIntensity(scale=(-1.0, 1.0))


def test_new_ops_are_registered_and_parse():
  parsed = ops.parse_ops("energy_intensity((0.9, 1.1), p=0.3)|linear_intensity(shift=(0.0, 0.2))")
  assert parsed == [ops_intensity.EnergyIntensity((0.9, 1.1), p=0.3),
                    ops_intensity.LinearIntensity(shift=(0.0, 0.2))]


# ---- the ghesu preset and multi-crop op lists ----


def test_ghesu_preset_modes():
  assert "ghesu" in presets.PRESETS
  pretrain = presets.get_preset("ghesu", "pretrain", 64)
  types = [type(op) for op in pretrain]
  for op_type in (ops_intensity.EnergyIntensity, ops_intensity.LinearIntensity,
                  ops_intensity.RandomGamma):
    assert op_type in types
  assert ops_intensity.ColorDistortion not in types and ops_geometric.FlipUpDown not in types
  assert pretrain[0] == ops_geometric.RandomResizedCrop(64, area=(0.3, 1.0))
  finetune = [type(op) for op in presets.get_preset("ghesu", "finetune", 64)]
  assert ops_geometric.FlipLeftRight not in finetune
  assert ops_intensity.EnergyIntensity not in finetune
  assert presets.get_preset("ghesu", "eval", 64) == presets.get_preset("cxr", "eval", 64)


@pytest.mark.parametrize("name", ["ghesu", "cxr", "generic"])
def test_multicrop_ops_rescale_only_the_crop(name):
  global_ops, local_ops = presets.get_multicrop_ops(name, 48, 20)
  assert global_ops == presets.get_preset(name, "pretrain", 48)
  assert len(local_ops) == len(global_ops)
  differing = [i for i, (g, l) in enumerate(zip(global_ops, local_ops)) if g != l]
  assert len(differing) == 1
  crop = local_ops[differing[0]]
  assert isinstance(crop, ops_geometric.RandomResizedCrop)
  assert crop.size == 20 and crop.area == presets.LOCAL_CROP_AREA == (0.05, 0.3)
  assert crop.aspect_ratio == global_ops[differing[0]].aspect_ratio
  # The local recipe really ends at the local size.
  image = np.random.default_rng(0).integers(0, 256, (60, 50, 1), dtype=np.uint8)
  out = ops.apply_ops(local_ops, {"image": image}, np.random.default_rng(1))["image"]
  assert out.shape == (20, 20, 1) and out.dtype == np.uint8


def test_multicrop_ops_errors():
  with pytest.raises(KeyError, match="known presets"):
    presets.get_multicrop_ops("swav", 32, 16)
  with pytest.raises(ValueError, match="local_size must be positive"):
    presets.get_multicrop_ops("ghesu", 32, 0)
