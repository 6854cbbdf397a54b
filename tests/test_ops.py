"""Augmentation ops: shape, dtype, range, determinism, mask alignment, and exact values vs NumPy/SciPy."""
import colorsys
import dataclasses

import numpy as np
import pytest
import scipy.ndimage

from data_pipelines import ops
from data_pipelines import ops_geometric
from data_pipelines import ops_intensity

# Arguments that make every registered op constructible.
_ARGS = {"random_resized_crop": (24,), "resize": (24,), "resize_small": (24,),
         "central_crop": (24,)}


def _image(height=37, width=45, channels=3, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


def _blocks_mask(height=64, width=64):
  """A mask of large blocks: resampling disagrees only near block edges."""
  mask = np.zeros((height, width), np.uint8)
  mask[8:40, 10:30] = 1
  mask[20:60, 40:56] = 1
  return mask


def _forced(op_name, **kwargs):
  return ops.get_op(op_name, **kwargs)


@pytest.mark.parametrize("name", sorted(ops.REGISTRY))
@pytest.mark.parametrize("channels", [1, 3])
def test_every_op_keeps_uint8_channels_and_is_deterministic(name, channels):
  op = ops.get_op(name, *_ARGS.get(name, ()))
  features = {"image": _image(channels=channels), "lung_mask": _blocks_mask(37, 45),
              "label": np.int32(1)}
  original = features["image"].copy()
  first = op(features, np.random.default_rng(7))
  second = op(features, np.random.default_rng(7))
  assert first["image"].dtype == np.uint8
  assert first["image"].ndim == 3 and first["image"].shape[-1] == channels
  assert first["lung_mask"].shape == first["image"].shape[:2]
  assert set(np.unique(first["lung_mask"])) <= {0, 1}
  assert first["label"] == 1  # Other keys pass through.
  np.testing.assert_array_equal(first["image"], second["image"])
  np.testing.assert_array_equal(first["lung_mask"], second["lung_mask"])
  np.testing.assert_array_equal(features["image"], original)  # Never in place.


@pytest.mark.parametrize("name", ["random_resized_crop", "flip_lr", "rot90", "rotate",
                                  "color_distortion", "gaussian_blur", "random_gamma",
                                  "gaussian_noise", "stain_jitter", "elastic"])
def test_random_ops_vary_with_the_seed(name):
  op = ops.get_op(name, *_ARGS.get(name, ()))
  features = {"image": _image(64, 64)}
  outputs = {op(features, np.random.default_rng(seed))["image"].tobytes() for seed in range(12)}
  assert len(outputs) > 1


def test_registry_error_lists_known_ops():
  with pytest.raises(KeyError, match="known ops: .*random_resized_crop"):
    ops.parse_ops("random_resized_crop(32)|no_such_op")


def test_string_and_pair_specs_build_equal_ops():
  from_string = ops.parse_ops("random_resized_crop(32, area=(0.2, 1.0))|flip_lr|gaussian_blur(0.5)")
  from_pairs = ops.parse_ops([("random_resized_crop", {"size": 32, "area": (0.2, 1.0)}),
                              ("flip_lr", {}), ("gaussian_blur", {"p": 0.5})])
  assert from_string == from_pairs
  assert from_string[0] == ops_geometric.RandomResizedCrop(32, area=(0.2, 1.0))


def test_bad_arguments_name_the_op():
  with pytest.raises(TypeError, match="flip_lr"):
    ops.parse_ops("flip_lr(size=3)")
  with pytest.raises(ValueError, match="literals"):
    ops.parse_ops("flip_lr(p=x)")
  with pytest.raises(ValueError, match="area"):
    ops.parse_ops("random_resized_crop(32, area=(0.5, 2.0))")


def test_non_uint8_input_is_rejected_with_the_fix():
  with pytest.raises(ValueError, match="intensity_window"):
    ops.get_op("flip_lr")({"image": np.zeros((4, 4, 1), np.uint16)}, np.random.default_rng(0))


# ---- geometric


def test_crop_box_statistics_and_bounds():
  rng = np.random.default_rng(0)
  fractions, ratios = [], []
  for _ in range(2000):
    top, left, height, width = ops_geometric.sample_crop_box(100, 160, (0.08, 1.0), (0.75, 4 / 3), rng)
    assert 0 <= top and top + height <= 100 and 0 <= left and left + width <= 160
    fractions.append(height * width / 16000)
    ratios.append(width / height)
  fractions = np.array(fractions)
  assert fractions.min() >= 0.06 and fractions.max() <= 1.0  # Rounding leaves a little slack.
  # Uniform area fractions, minus the large boxes that do not fit (rejected and redrawn).
  assert 0.25 < np.median(fractions) < 0.5
  assert np.mean(fractions < 0.15) > 0.05 and np.mean(fractions > 0.7) > 0.02
  assert min(ratios) > 0.7 and max(ratios) < 1.4


def test_crop_box_fallback_is_the_centred_clamped_crop():
  # A 10x100 strip cannot hold a box of ratio <= 4/3 with >= 90% of its area: fallback.
  box = ops_geometric.sample_crop_box(10, 100, (0.9, 1.0), (0.75, 4 / 3), np.random.default_rng(0))
  assert box == (0, (100 - 13) // 2, 10, 13)


def test_random_resized_crop_full_area_equals_plain_resize():
  image = _image(50, 50)
  op = ops_geometric.RandomResizedCrop(20, area=(1.0, 1.0), aspect_ratio=(1.0, 1.0))
  out = op({"image": image}, np.random.default_rng(0))["image"]
  expected = ops_geometric.Resize(20)({"image": image}, None)["image"]
  np.testing.assert_array_equal(out, expected)
  assert out.shape == (20, 20, 3)


@pytest.mark.parametrize("spec", ["random_resized_crop(48, area=(0.3, 1.0))", "rotate(25)",
                                  "elastic(alpha=20.0, sigma=5.0, p=1.0)", "resize((40, 30))"])
def test_geometric_ops_keep_image_and_mask_aligned(spec):
  op, = ops.parse_ops(spec)
  mask = _blocks_mask()
  image = np.repeat(mask[..., None] * 255, 3, axis=-1).astype(np.uint8)
  for seed in range(5):
    out = op({"image": image, "lung_mask": mask}, np.random.default_rng(seed))
    agreement = np.mean((out["image"][..., 0] > 127) == (out["lung_mask"] == 1))
    assert agreement > 0.97, (spec, seed, agreement)


@pytest.mark.parametrize("name,expected", [("flip_lr", lambda a: a[:, ::-1]),
                                           ("flip_ud", lambda a: a[::-1])])
def test_flips_are_exact(name, expected):
  image, mask = _image(), _blocks_mask(37, 45)
  out = ops.get_op(name, p=1.0)({"image": image, "lung_mask": mask}, np.random.default_rng(0))
  np.testing.assert_array_equal(out["image"], expected(image))
  np.testing.assert_array_equal(out["lung_mask"], expected(mask))
  same = ops.get_op(name, p=0.0)({"image": image}, np.random.default_rng(0))
  np.testing.assert_array_equal(same["image"], image)


def test_rot90_gives_each_quarter_turn_and_moves_the_mask():
  image, mask = _image(), _blocks_mask(37, 45)
  seen = set()
  for seed in range(40):
    out = ops.get_op("rot90")({"image": image, "lung_mask": mask}, np.random.default_rng(seed))
    k = next(k for k in range(4) if out["image"].shape == np.rot90(image, k).shape
             and np.array_equal(out["image"], np.rot90(image, k)))
    np.testing.assert_array_equal(out["lung_mask"], np.rot90(mask, k))
    seen.add(k)
  assert seen == {0, 1, 2, 3}


def test_rotate_zero_degrees_is_identity():
  image = _image()
  out = ops.get_op("rotate", max_degrees=0.0)({"image": image}, np.random.default_rng(0))
  np.testing.assert_array_equal(out["image"], image)


def test_elastic_with_zero_alpha_is_identity():
  image, mask = _image(), _blocks_mask(37, 45)
  out = ops.get_op("elastic", alpha=0.0, p=1.0)({"image": image, "lung_mask": mask},
                                                 np.random.default_rng(0))
  np.testing.assert_array_equal(out["image"], image)
  np.testing.assert_array_equal(out["lung_mask"], mask)


def test_resize_small_and_central_crop():
  image = _image(60, 90)
  out = ops.parse_ops("resize_small(30)")[0]({"image": image}, None)["image"]
  assert out.shape == (30, 45, 3)
  crop = ops.get_op("central_crop", 20)({"image": image}, None)["image"]
  np.testing.assert_array_equal(crop, image[20:40, 35:55])
  with pytest.raises(ValueError, match="resize_small"):
    ops.get_op("central_crop", 100)({"image": image}, None)


# ---- colour and intensity, against NumPy / colorsys / SciPy


def _luma(image):
  return image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def test_brightness_and_contrast_match_numpy():
  image = _image(30, 30)
  pil = ops_geometric.to_pil(image)
  bright = ops_geometric.from_pil(ops_intensity.adjust_brightness(pil, 1.3)).astype(int)
  np.testing.assert_array_equal(bright, np.clip(np.rint(image * 1.3), 0, 255).astype(int))
  contrast = ops_geometric.from_pil(ops_intensity.adjust_contrast(pil, 0.6)).astype(float)
  # The contrast pivot is PIL's integer luma, so allow one grey level.
  expected = np.clip(0.6 * image + 0.4 * _luma(image).mean(), 0, 255)
  assert np.abs(contrast - expected).max() <= 1.0


def test_saturation_and_grayscale_match_numpy():
  image = _image(30, 30)
  pil = ops_geometric.to_pil(image)
  saturated = ops_geometric.from_pil(ops_intensity.adjust_saturation(pil, 1.5)).astype(float)
  grey = np.rint(_luma(image))[..., None]
  expected = np.clip(1.5 * image + (1 - 1.5) * grey, 0, 255)
  assert np.abs(saturated - expected).max() <= 2.0
  out = ops.get_op("random_grayscale", p=1.0)({"image": image}, np.random.default_rng(0))["image"]
  assert out.shape == image.shape
  np.testing.assert_array_equal(out[..., 0], out[..., 2])
  assert np.abs(out[..., 0] - _luma(image)).max() <= 1.0


def test_hue_shift_matches_colorsys():
  image = _image(8, 8)
  shift = 0.25
  out = ops_geometric.from_pil(ops_intensity.adjust_hue(ops_geometric.to_pil(image), shift))
  for (r, g, b), got in zip(image.reshape(-1, 3) / 255.0, out.reshape(-1, 3)):
    h, s, v = colorsys.rgb_to_hsv(r, g, b)
    expected = np.array(colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)) * 255
    # PIL quantises H, S and V to 8 bits each, so a few grey levels of difference are expected.
    assert np.abs(got - expected).max() <= 8, (got, expected)


def test_color_ops_on_grayscale_change_only_brightness_and_contrast():
  image = _image(20, 20, channels=1)
  op = ops_intensity.ColorJitter(saturation=0.8, hue=0.2, p=1.0)
  out = op({"image": image}, np.random.default_rng(0))["image"]
  np.testing.assert_array_equal(out, image)


def test_color_distortion_probabilities():
  op = ops_intensity.ColorDistortion(1.0)
  image = _image(16, 16)
  changed = grey = 0
  trials = 400
  for seed in range(trials):
    out = op({"image": image}, np.random.default_rng(seed))["image"]
    changed += not np.array_equal(out, image)
    grey += np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])
  # P(changed) = 1 - 0.2 * 0.8 = 0.84; P(grey) = 0.2. Five-sigma bands for 400 trials.
  assert abs(changed / trials - 0.84) < 0.1
  assert abs(grey / trials - 0.2) < 0.1


def test_gaussian_blur_matches_scipy_gaussian_filter():
  image = _image(100, 100)
  op = ops_intensity.GaussianBlur(p=1.0, sigma=(1.0, 1.0))
  out = op({"image": image}, np.random.default_rng(0))["image"].astype(float)
  # Radius = min(10% of 100 // 2, ceil(4 * 1.0)) = 4 = scipy's int(truncate * sigma + 0.5).
  expected = scipy.ndimage.gaussian_filter(image.astype(float), sigma=(1.0, 1.0, 0), truncate=4.0,
                                           mode="reflect")
  assert np.abs(out - expected).max() <= 0.5 + 1e-3


def test_gaussian_blur_kernel_is_ten_percent_of_the_side():
  # sigma 2.0 at 40 px: kernel radius min(4 // 2, 8) = 2 (a 5-tap kernel), not 8.
  image = _image(40, 40)
  out = ops_intensity.GaussianBlur(p=1.0, sigma=(2.0, 2.0))({"image": image},
                                                            np.random.default_rng(0))["image"]
  kernel = ops_intensity.gaussian_kernel_1d(2.0, 2)
  expected = scipy.ndimage.correlate1d(image.astype(float), kernel, axis=0, mode="reflect")
  expected = scipy.ndimage.correlate1d(expected, kernel, axis=1, mode="reflect")
  assert np.abs(out - expected).max() <= 0.5 + 1e-3


def test_gamma_matches_numpy():
  image = _image()
  op = ops_intensity.RandomGamma(gamma=(2.0, 2.0), p=1.0)
  out = op({"image": image}, np.random.default_rng(0))["image"]
  np.testing.assert_array_equal(out, np.rint(255 * (image / 255.0) ** 2.0).astype(np.uint8))


def test_intensity_window_uint8_and_uint16():
  image = _image()
  out = ops.get_op("intensity_window", low=50, high=150)({"image": image}, None)["image"]
  expected = np.clip(np.rint((image.astype(float) - 50) * 255 / 100), 0, 255)
  np.testing.assert_array_equal(out, expected.astype(np.uint8))
  deep = np.random.default_rng(1).integers(1000, 4000, (10, 12, 1), dtype=np.uint16)
  out = ops.get_op("intensity_window")({"image": deep}, None)["image"]
  assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255
  expected = np.rint((deep.astype(float) - deep.min()) * 255 / (deep.max() - deep.min()))
  assert np.abs(out - expected).max() <= 1


def test_equalize_flattens_the_histogram_monotonically():
  # A low-contrast image: values 100..131.
  image = (100 + np.random.default_rng(0).integers(0, 32, (64, 64, 1))).astype(np.uint8)
  out = ops.get_op("equalize")({"image": image}, np.random.default_rng(0))["image"]
  assert out.max() - out.min() > 200  # Stretched to (almost) the full range.
  order = np.argsort(image.ravel(), kind="stable")
  assert np.all(np.diff(out.ravel()[order].astype(int)) >= 0)  # Monotone grey-level mapping.


def test_gaussian_noise_statistics():
  image = np.full((200, 200, 1), 128, np.uint8)
  out = ops_intensity.GaussianNoise(sigma=(5.0, 5.0), p=1.0)({"image": image},
                                                             np.random.default_rng(0))["image"]
  residual = out.astype(float) - 128
  assert abs(residual.mean()) < 0.2 and abs(residual.std() - 5.0) < 0.2


def test_stain_jitter_with_zero_sigma_round_trips():
  image = _image()
  out = ops_intensity.StainJitter(sigma=0.0)({"image": image}, np.random.default_rng(0))["image"]
  assert np.abs(out.astype(int) - image).max() <= 1


def test_ops_are_frozen_dataclasses():
  for cls in ops.REGISTRY.values():
    assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
