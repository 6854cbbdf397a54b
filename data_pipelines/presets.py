"""Augmentation presets per imaging modality, for pretraining, fine-tuning and evaluation.

`get_preset(name, mode, image_size)` returns the op list (see `data_pipelines/ops.py`).
Three recipes per modality:

- "pretrain": the strong, two-view SimCLR-style recipe for contrastive pretraining. REMEDIS
  (Azizi et al. 2023) keeps SimCLR's crop + flip + colour + blur and adapts what is not
  plausible for the modality; what each preset keeps or drops, and why, is in its docstring.
- "finetune": light augmentation for supervised fine-tuning: a mild crop and the flips /
  rotations that preserve the label; no colour distortion, because the label can depend on
  colour and intensity (a lesion's hue, an opacity's density).
- "eval": deterministic resize of the shorter side + centre crop (no randomness).

Small images get no Gaussian blur in any recipe (side <= BLUR_MIN_SIZE = 64 px): SimCLR drops
blur on CIFAR's 32 px images (Chen et al. 2020, appendix B.9), and a sigma of up to 2 px on a
28-32 px radiograph erases the findings the views should share.

All recipes end in uint8 (image_size, image_size, C); the device turns that into [-1, 1]
floats. Channel repetition to RGB happens after the ops, in the pipeline (`num_channels`).

Presets: "cxr", "derm", "pathology", "fundus", "mammo", "generic" (SimCLR on natural images)
and "ghesu", the radiograph recipe of Ghesu et al. 2022 (energy-based, linear and gamma
intensity augmentations with SwAV-style multi-crop). `get_multicrop_ops(name, global_size,
local_size)` gives the (global, local) op lists of a multi-crop pipeline
(`pipeline.make_multicrop_dataset`) for any preset.
"""
from __future__ import annotations

from collections.abc import Callable
import dataclasses
import re

from data_pipelines import ops as ops_lib
from data_pipelines import ops_geometric

# Gaussian blur only above this image side (see the module docstring).
BLUR_MIN_SIZE = 64
_BLUR_OP = re.compile(r"\|gaussian_blur\([^|]*\)")

MODES = ("pretrain", "finetune", "eval")
# Crop area range of multi-crop's local views (SwAV's small crops, widened; see
# `get_multicrop_ops`).
LOCAL_CROP_AREA = (0.05, 0.3)


def _eval(image_size: int, crop_fraction: float) -> str:
  """Resize the shorter side to image_size / crop_fraction, then centre-crop image_size."""
  resize_to = int(round(image_size / crop_fraction))
  return f"resize_small({resize_to})|central_crop({image_size})"


def generic(mode: str, image_size: int) -> str:
  """The SimCLR ImageNet recipe (Chen et al. 2020), unchanged: the baseline for natural images.

  pretrain: random resized crop (area 0.08-1), horizontal flip, colour distortion s=1.0
  (jitter p=0.8, grayscale p=0.2), Gaussian blur p=0.5 with sigma 0.1-2.0.
  finetune: Inception crop (area 0.08-1) + horizontal flip, the standard supervised recipe.
  eval: resize to image_size / 0.875, centre crop (the 224/256 ImageNet convention).
  """
  if mode == "pretrain":
    return (f"random_resized_crop({image_size}, area=(0.08, 1.0))|flip_lr(0.5)"
            "|color_distortion(1.0)|gaussian_blur(0.5)")
  if mode == "finetune":
    return f"random_resized_crop({image_size}, area=(0.08, 1.0))|flip_lr(0.5)"
  return _eval(image_size, 0.875)


def cxr(mode: str, image_size: int) -> str:
  """Chest radiographs (grayscale, one canonical orientation).

  pretrain keeps the random resized crop, but with a larger minimum area (0.2): at 0.08 a crop
  of a CXR is often featureless lung field or mediastinum, and REMEDIS-style pretraining needs
  views that still share anatomy. Keeps horizontal flip (left/right anatomy is asymmetric,
  but dextrocardia-like flips still teach texture/shape invariance and SimCLR/REMEDIS keep it)
  and a small rotation (+-10 deg: patient positioning varies). Drops vertical flips and 90 deg
  rotations (the anatomy has an up; a radiograph is never acquired upside down). Replaces the
  colour distortion by what is physical for X-rays: brightness/contrast jitter (exposure,
  scanner), gamma (detector response curve), no saturation/hue (meaningless on grey levels;
  sources are 1-channel anyway) and no random grayscale (already grey). Keeps SimCLR's blur
  (p=0.5) and adds mild Gaussian noise (quantum noise of low-dose films).
  finetune: mild crop (area 0.6-1), +-10 deg rotation, brightness/contrast 0.2; no flip, because
  laterality can be part of the label (left vs right findings, device position).
  eval: resize + centre crop of the whole image (crop fraction 1.0: findings reach the borders,
  e.g. costophrenic angles).
  """
  if mode == "pretrain":
    return (f"random_resized_crop({image_size}, area=(0.2, 1.0))|flip_lr(0.5)"
            "|rotate(10, p=0.5)"
            "|color_jitter(brightness=0.4, contrast=0.4, p=0.8)|random_gamma((0.7, 1.5), p=0.5)"
            "|gaussian_blur(0.5)|gaussian_noise((0.0, 6.0), p=0.3)")
  if mode == "finetune":
    return (f"random_resized_crop({image_size}, area=(0.6, 1.0))|rotate(10, p=0.5)"
            "|color_jitter(brightness=0.2, contrast=0.2, p=0.5)")
  return _eval(image_size, 1.0)


def derm(mode: str, image_size: int) -> str:
  """Dermatology photographs (RGB, no canonical orientation, colour carries diagnosis).

  pretrain: random resized crop (area 0.08-1), both flips and 90 deg rotations (a lesion seen
  from any side is the same lesion), SimCLR colour distortion at reduced strength s=0.5
  (lighting and camera white balance vary, but the hue of a lesion is diagnostic, so full
  s=1.0 hue shifts would erase signal), blur p=0.5 (focus varies in clinical photos).
  finetune: crop (area 0.35-1), flips, 90 deg rotations, mild brightness/contrast; no hue.
  eval: resize + centre crop (0.875).
  """
  if mode == "pretrain":
    return (f"random_resized_crop({image_size}, area=(0.08, 1.0))|flip_lr(0.5)|flip_ud(0.5)|rot90"
            "|color_distortion(0.5)|gaussian_blur(0.5)")
  if mode == "finetune":
    return (f"random_resized_crop({image_size}, area=(0.35, 1.0))|flip_lr(0.5)|flip_ud(0.5)|rot90"
            "|color_jitter(brightness=0.1, contrast=0.1, p=0.5)")
  return _eval(image_size, 0.875)


def pathology(mode: str, image_size: int) -> str:
  """H&E histopathology tiles (RGB, rotation-invariant, stain varies by lab).

  pretrain: random resized crop with area 0.2-1 (tiles are already small fields of view at a
  fixed magnification; a tiny crop changes the apparent scale too much), all eight dihedral
  symmetries (flip_lr + flip_ud + rot90: a tissue section has no up), HED stain jitter
  (Tellez et al. 2018) plus SimCLR colour distortion s=0.5 for scanner colour variation, blur
  p=0.5 (focus varies across a slide).
  finetune: dihedral symmetries + light stain jitter; crop area 0.5-1.
  eval: resize + centre crop (crop fraction 1.0: tiles are cut to the field of interest).
  """
  if mode == "pretrain":
    return (f"random_resized_crop({image_size}, area=(0.2, 1.0))|flip_lr(0.5)|flip_ud(0.5)|rot90"
            "|stain_jitter(0.05)|color_distortion(0.5)|gaussian_blur(0.5)")
  if mode == "finetune":
    return (f"random_resized_crop({image_size}, area=(0.5, 1.0))|flip_lr(0.5)|flip_ud(0.5)|rot90"
            "|stain_jitter(0.03)")
  return _eval(image_size, 1.0)


def fundus(mode: str, image_size: int) -> str:
  """Retinal fundus photographs (RGB, circular field of view, colour matters).

  pretrain: crop area 0.3-1 (the optic disc and macula should usually stay in view; at 0.08
  many crops are only vessels), horizontal flip (left vs right eye are mirror images), rotation
  +-30 deg (camera roll varies and the circular field makes it natural), colour distortion
  s=0.5 without grayscale-heavy settings (lesion colour - haemorrhage red, exudate yellow - is
  the signal), blur p=0.5 (defocus is a common acquisition artefact). No vertical flip (the
  superior/inferior arcades differ).
  finetune: crop area 0.7-1, flip_lr, +-15 deg rotation, mild brightness/contrast.
  eval: resize + centre crop (crop fraction 1.0 keeps the whole disc of the fundus).
  """
  if mode == "pretrain":
    return (f"random_resized_crop({image_size}, area=(0.3, 1.0))|flip_lr(0.5)|rotate(30, p=0.5)"
            "|color_distortion(0.5, grayscale_p=0.05)|gaussian_blur(0.5)")
  if mode == "finetune":
    return (f"random_resized_crop({image_size}, area=(0.7, 1.0))|flip_lr(0.5)|rotate(15, p=0.5)"
            "|color_jitter(brightness=0.1, contrast=0.1, p=0.5)")
  return _eval(image_size, 1.0)


def mammo(mode: str, image_size: int) -> str:
  """Mammograms (grayscale, high bit depth, lesions are small).

  pretrain: crop area 0.3-1 (microcalcifications vanish when a small crop is upsampled, and
  most small crops are fat), horizontal and vertical flips (left/right breasts mirror each
  other; CC and MLO views have no fixed vertical orientation for the texture we learn),
  brightness/contrast and gamma (exposure and detector curves differ between vendors), a
  little blur (p=0.2, lower than SimCLR's 0.5 because blur erases calcifications), noise. No
  hue/saturation/grayscale: grey images. High-bit-depth sources: put intensity_window first
  (the pipeline maps uint16 with a per-image min-max window when the ops do not).
  finetune: crop area 0.6-1, both flips, mild contrast.
  eval: resize + centre crop (crop fraction 1.0).
  """
  if mode == "pretrain":
    return (f"random_resized_crop({image_size}, area=(0.3, 1.0))|flip_lr(0.5)|flip_ud(0.5)"
            "|color_jitter(brightness=0.3, contrast=0.3, p=0.8)|random_gamma((0.7, 1.5), p=0.5)"
            "|gaussian_blur(0.2, sigma=(0.1, 1.0))|gaussian_noise((0.0, 4.0), p=0.3)")
  if mode == "finetune":
    return (f"random_resized_crop({image_size}, area=(0.6, 1.0))|flip_lr(0.5)|flip_ud(0.5)"
            "|color_jitter(brightness=0.1, contrast=0.2, p=0.5)")
  return _eval(image_size, 1.0)


def ghesu(mode: str, image_size: int) -> str:
  """Radiographs as in Ghesu et al. 2022 (contrastive + online clustering, optional labels).

  From the paper: intensity augmentations built for medical images - an energy-based intensity
  adjustment for radiographs, linear intensity transforms and gamma correction - together
  with multi-scale crops (SwAV-style multi-crop: a few large global views plus several small,
  low-resolution local views of the same image; the local recipe is `get_multicrop_ops`).
  Our choices (the paper's exact ranges and probabilities were not available to us):
  pretrain (the global-view recipe): random resized crop with area 0.3-1 (the global scale
  range; local views take 0.05-0.3, so the two scales do not overlap, as in SwAV where the
  split is at 0.14, moved up here because a small crop of a radiograph is often featureless),
  horizontal flip and +-10 deg rotation (as the cxr preset: positioning varies, the anatomy has
  an up), then the intensity chain in acquisition order: energy_intensity (beam energy: bone
  vs soft-tissue contrast), linear_intensity (detector gain / window), random_gamma (display
  curve), each with p=0.5; SimCLR/SwAV's Gaussian blur (p=0.5). No colour distortion: grey
  images.
  finetune: mild crop (area 0.6-1), +-10 deg rotation, mild linear intensity; no flip
  (laterality can be part of the label).
  eval: resize + centre crop of the whole image (crop fraction 1.0).
  """
  if mode == "pretrain":
    return (f"random_resized_crop({image_size}, area=(0.3, 1.0))|flip_lr(0.5)|rotate(10, p=0.5)"
            "|energy_intensity(p=0.5)|linear_intensity(p=0.5)|random_gamma((0.7, 1.5), p=0.5)"
            "|gaussian_blur(0.5)")
  if mode == "finetune":
    return (f"random_resized_crop({image_size}, area=(0.6, 1.0))|rotate(10, p=0.5)"
            "|linear_intensity(scale=(0.9, 1.1), shift=(-0.05, 0.05), p=0.5)")
  return _eval(image_size, 1.0)


PRESETS: dict[str, Callable[[str, int], str]] = {
    "cxr": cxr,
    "derm": derm,
    "pathology": pathology,
    "fundus": fundus,
    "mammo": mammo,
    "generic": generic,
    "ghesu": ghesu,
}


def get_preset_spec(name: str, mode: str, image_size: int) -> str:
  """The preset's op list as a "op(..)|op" string (for logging and configs).

  Args:
    name: one of PRESETS.
    mode: "pretrain", "finetune" or "eval".
    image_size: output side in pixels.

  Returns:
    The op string.

  Raises:
    KeyError: unknown preset name. ValueError: unknown mode or a non-positive size.
  """
  if name not in PRESETS:
    raise KeyError(f"unknown augmentation preset {name!r}; known presets: {', '.join(PRESETS)}")
  if mode not in MODES:
    raise ValueError(f"preset mode must be one of {MODES}; got {mode!r}")
  if int(image_size) <= 0:
    raise ValueError(f"image_size must be positive; got {image_size}")
  spec = PRESETS[name](mode, int(image_size))
  if int(image_size) <= BLUR_MIN_SIZE:
    spec = _BLUR_OP.sub("", spec)
  return spec


def get_preset(name: str, mode: str, image_size: int) -> list[ops_lib.Op]:
  """Builds the op list of a modality preset.

  Args:
    name: "cxr", "derm", "pathology", "fundus", "mammo", "generic" or "ghesu".
    mode: "pretrain" (two-view SimCLR recipe), "finetune" (light) or "eval" (deterministic).
    image_size: output side in pixels.

  Returns:
    A list of ops for `ops.apply_ops` / the pipeline's `ops=` argument.

  Raises:
    KeyError: unknown preset name (the message lists the known ones).
    ValueError: unknown mode.
  """
  return ops_lib.parse_ops(get_preset_spec(name, mode, image_size))


def get_multicrop_ops(name: str, global_size: int,
                      local_size: int) -> tuple[list[ops_lib.Op], list[ops_lib.Op]]:
  """The (global, local) op lists of a multi-crop pipeline (SwAV, Ghesu et al. 2022).

  The global ops are the preset's "pretrain" recipe at `global_size`. The local ops are the
  same recipe with its random_resized_crop replaced by one of area LOCAL_CROP_AREA
  (0.05-0.3 of the image, same aspect-ratio range) at `local_size`: the small, low-resolution
  views whose predictions the loss ties to the global views. Every other op (flips, intensity)
  is shared, so local and global views differ in scale and resolution only. This holds for
  every preset; for "ghesu" the global crops cover 0.3-1, so the two scale ranges do not
  overlap, while e.g. "generic" (0.08-1) keeps SimCLR's global range.

  Args:
    name: one of PRESETS.
    global_size: side of the global views in pixels (e.g. 224).
    local_size: side of the local views in pixels (e.g. 96); usually < global_size.

  Returns:
    (global_ops, local_ops), lists for `pipeline.make_multicrop_dataset`.

  Raises:
    KeyError: unknown preset name. ValueError: a non-positive size, or a preset whose
      pretrain recipe has no random_resized_crop to rescale.
  """
  if int(local_size) <= 0:
    raise ValueError(f"local_size must be positive; got {local_size}")
  global_ops = get_preset(name, "pretrain", global_size)
  crops = [i for i, op in enumerate(global_ops)
           if isinstance(op, ops_geometric.RandomResizedCrop)]
  if not crops:
    raise ValueError(f"preset {name!r}: the pretrain recipe has no random_resized_crop, so "
                     f"there is no crop to turn into local views; recipe: {global_ops}")
  local_ops = list(global_ops)
  local_ops[crops[0]] = dataclasses.replace(global_ops[crops[0]], size=int(local_size),
                                            area=LOCAL_CROP_AREA)
  return global_ops, local_ops
