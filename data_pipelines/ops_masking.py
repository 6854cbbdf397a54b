"""Group masking for GMML pretraining (Atito et al., "SiT" arxiv.org/abs/2104.03602 and "GMML is
all you need" arxiv.org/abs/2205.14986): hide random rectangles of whole patches, then
reconstruct them.

What a group mask is here:

- The image is cut into the ViT's p x p patch grid (H/p rows, W/p columns). A *group* is a
  rectangle of whole patches: height and width (in patches) each drawn uniformly from
  1 .. max(1, floor(max_group_share * grid side)), its top-left corner drawn uniformly among the
  positions where it fits inside the grid. Groups are added until the masked fraction of
  patches reaches a target coverage drawn ONCE per image, uniformly from `coverage` = (low,
  high). Groups may overlap; the last group can overshoot the target by at most one group's
  area (max_group_share**2 of the image), and never by more.
- From the papers: masking whole, connected groups of patches rather than scattered ones (the
  point of GMML), groups of up to 30% of the side (`max_block_sz=0.3` in the authors' code),
  a target coverage up to 75% (`drop_perc=0.75`), drawn uniformly from [min(0.5, max), max]
  (hence the default coverage (0.5, 0.75)), L1 on the masked pixels only, noise filling and
  replacement by another image's content. Our choices: groups lie fully inside the grid (the
  authors clip them at the border, which makes border groups smaller); one fill kind per image
  with configurable shares; uint8 noise on the host.
- The mask is returned at PATCH level, `features["gmml_mask"]` uint8 (H/p, W/p), 1 = masked:
  it is exact (masks are patch-aligned by construction), p**2 times smaller to ship than a
  pixel mask, and the train step expands it with `jnp.repeat` on the device.

Fill kinds (one per image, drawn with `fill_shares` = (noise, zeros, other_image)):

- "noise": i.i.d. uint8 noise per pixel and channel, "uniform" on 0..255 or "gaussian"
  (mean 127.5, std 64, clipped; about the N(0, 1) noise of the authors' code in their
  normalised space, where one unit is ~0.23 of the range).
- "zeros": black (uint8 0, i.e. -1 after normalisation).
- "other_image": the pixels of another image of the same batch, same positions. It needs the
  batch, so the per-record op only marks the image (`gmml_fill` = FILL_OTHER_IMAGE) and draws
  a donor offset; `fill_from_other_images` does the copy after batching, on the host (see
  data_pipelines/pipeline.py: make_gmml_dataset for why host and not device).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

Features = dict[str, Any]

FILL_NOISE, FILL_ZEROS, FILL_OTHER_IMAGE = 0, 1, 2
FILL_NAMES = ("noise", "zeros", "other_image")
NOISE_KINDS = ("uniform", "gaussian")
# Std of the "gaussian" noise in uint8 units (see the module docstring).
GAUSSIAN_NOISE_STD = 64.0
# A hard stop for the group loop; with any coverage <= 1 it ends long before (a full grid is
# reached after a few hundred groups even with 1-patch groups on a 14 x 14 grid).
_MAX_GROUPS = 100_000


def max_group_patches(grid_side: int, max_group_share: float) -> int:
  """Largest group side in patches: floor(share * side), at least one patch."""
  return max(1, min(grid_side, int(np.floor(max_group_share * grid_side + 1e-9))))


def sample_group_mask(grid_shape: tuple[int, int], rng: np.random.Generator, *,
                      coverage: tuple[float, float] = (0.5, 0.75),
                      max_group_share: float = 0.3) -> np.ndarray:
  """Draws one patch-level group mask.

  Args:
    grid_shape: (rows, columns) of the patch grid, i.e. (H / p, W / p).
    rng: the record's generator.
    coverage: (low, high): the target masked fraction is drawn uniformly from it, once.
    max_group_share: a group's height (width) is at most this share of the grid's rows
      (columns), and at least one patch.

  Returns:
    uint8 (rows, columns), 1 = masked. Its mean is >= the drawn target and < target + the
    area share of one largest group.

  Raises:
    ValueError: coverage outside [0, 1] or low > high; max_group_share outside (0, 1].
  """
  low, high = (float(c) for c in coverage)
  if not 0.0 <= low <= high <= 1.0:
    raise ValueError(f"group mask coverage must satisfy 0 <= low <= high <= 1; got {coverage}")
  if not 0.0 < max_group_share <= 1.0:
    raise ValueError(f"group mask max_group_share must be in (0, 1]; got {max_group_share}")
  rows, cols = (int(s) for s in grid_shape)
  max_h, max_w = max_group_patches(rows, max_group_share), max_group_patches(cols, max_group_share)
  target = rng.uniform(low, high)
  mask = np.zeros((rows, cols), np.uint8)
  needed = int(np.ceil(target * rows * cols - 1e-9))  # patches to cover
  covered = 0
  for _ in range(_MAX_GROUPS):
    if covered >= needed:
      break
    h = int(rng.integers(1, max_h + 1))
    w = int(rng.integers(1, max_w + 1))
    top = int(rng.integers(0, rows - h + 1))
    left = int(rng.integers(0, cols - w + 1))
    mask[top:top + h, left:left + w] = 1
    covered = int(mask.sum())
  return mask


def expand_mask(mask: np.ndarray, patch_size: int) -> np.ndarray:
  """Patch-level (..., rows, cols) -> pixel-level (..., rows * p, cols * p), same dtype."""
  return np.repeat(np.repeat(mask, patch_size, axis=-2), patch_size, axis=-1)


def pixel_mask(mask: np.ndarray, patch_size: int, height: int, width: int) -> np.ndarray:
  """Patch mask (rows, cols) -> bool (height, width); pixels beyond the whole patches are 0."""
  pixels = np.zeros((height, width), bool)
  pixels[:mask.shape[0] * patch_size, :mask.shape[1] * patch_size] = expand_mask(
      mask, patch_size).astype(bool)
  return pixels


def _check_shares(fill_shares) -> np.ndarray:
  shares = np.asarray(fill_shares, np.float64)
  if shares.shape != (3,) or np.any(shares < 0) or shares.sum() <= 0:
    raise ValueError("group_mask fill_shares must be three non-negative numbers (noise, zeros, "
                     f"other_image) with a positive sum; got {fill_shares}")
  return shares / shares.sum()


@dataclasses.dataclass(frozen=True)
class GroupMask:
  """Masks random groups of whole p x p patches of `features["image"]` (GMML corruption).

  Adds `gmml_mask` uint8 (H/p, W/p) (1 = masked), `gmml_fill` int8 (the fill kind: FILL_NOISE,
  FILL_ZEROS or FILL_OTHER_IMAGE) and `gmml_donor_offset` int32 in [1, 2**31 - 1), which picks
  the donor image once the batch exists (`donor_indices`, `fill_from_other_images`). With
  FILL_OTHER_IMAGE the image is left unchanged here.

  Random numbers are drawn in a fixed order whatever the fill kind (target, groups, fill kind,
  donor offset, then the noise), so the mask of a record depends only on its generator.

  Attributes:
    patch_size: p; H and W should be multiples of it (otherwise only whole patches are masked).
    coverage: (low, high) range of the per-image target masked fraction.
    max_group_share: largest group side as a share of the grid side.
    fill_shares: relative shares of (noise, zeros, other_image) fills.
    noise: "uniform" (0..255) or "gaussian" (127.5 +- 64, clipped).
  """
  patch_size: int = 16
  coverage: tuple[float, float] = (0.5, 0.75)
  max_group_share: float = 0.3
  fill_shares: tuple[float, float, float] = (1.0, 0.0, 0.0)
  noise: str = "uniform"

  def __post_init__(self):
    if self.patch_size < 1:
      raise ValueError(f"group_mask patch_size must be >= 1; got {self.patch_size}")
    if self.noise not in NOISE_KINDS:
      raise ValueError(f"group_mask noise={self.noise!r}; known: {', '.join(NOISE_KINDS)}")
    _check_shares(self.fill_shares)
    low, high = self.coverage
    if not 0.0 <= low <= high <= 1.0:
      raise ValueError(f"group_mask coverage must satisfy 0 <= low <= high <= 1; got "
                       f"{self.coverage}")

  def __call__(self, features: Features, rng: np.random.Generator) -> Features:
    image = features["image"]
    height, width = image.shape[:2]
    p = self.patch_size
    if height < p or width < p:
      raise ValueError(f"group_mask: image size {height}x{width} is smaller than one patch "
                       f"({p}x{p}); end the ops at a size divisible by {p}")
    # Sizes that are not multiples of p: the grid covers the whole patches only and the
    # remainder rows / columns are never masked (a ViT rejects such sizes anyway).
    mask = sample_group_mask((height // p, width // p), rng, coverage=tuple(self.coverage),
                             max_group_share=self.max_group_share)
    fill = int(rng.choice(3, p=_check_shares(self.fill_shares)))
    donor_offset = int(rng.integers(1, 2**31 - 1))
    out = dict(features)
    if fill != FILL_OTHER_IMAGE:
      pixels = pixel_mask(mask, p, height, width)
      corrupted = np.array(image, copy=True)
      count = int(pixels.sum()) * image.shape[2]
      if fill == FILL_ZEROS:
        values = np.zeros(count, np.uint8)
      elif self.noise == "uniform":
        values = rng.integers(0, 256, size=count, dtype=np.uint8)
      else:
        values = np.clip(np.rint(rng.normal(127.5, GAUSSIAN_NOISE_STD, size=count)), 0,
                         255).astype(np.uint8)
      corrupted[pixels] = values.reshape(-1, image.shape[2])
      out["image"] = corrupted
    out["gmml_mask"] = mask
    out["gmml_fill"] = np.int8(fill)
    out["gmml_donor_offset"] = np.int32(donor_offset)
    return out


def donor_indices(batch_size: int, offsets: np.ndarray) -> np.ndarray:
  """Donor of image i: (i + 1 + offset_i mod (batch_size - 1)) mod batch_size, never i itself.

  Args:
    batch_size: B >= 2.
    offsets: (B,) non-negative ints drawn per record.

  Returns:
    (B,) int64 donor positions, each different from its own position.
  """
  positions = np.arange(batch_size)
  return (positions + 1 + np.asarray(offsets, np.int64) % (batch_size - 1)) % batch_size


def fill_from_other_images(corrupted: np.ndarray, donors_source: np.ndarray, mask: np.ndarray,
                           fill: np.ndarray, offsets: np.ndarray, patch_size: int) -> np.ndarray:
  """Fills the masked patches of FILL_OTHER_IMAGE images with another image of the batch.

  Args:
    corrupted: uint8 (B, H, W, C) corrupted views (not modified).
    donors_source: uint8 (B, H, W, C) the images donors are taken from (the clean views).
    mask: uint8 (B, H/p, W/p) patch masks.
    fill: (B,) fill kinds; only FILL_OTHER_IMAGE rows change.
    offsets: (B,) donor offsets (see `donor_indices`).
    patch_size: p.

  Returns:
    A new uint8 (B, H, W, C) array. With B == 1 there is no other image: such rows get uniform
    noise (seeded by the offset) instead.
  """
  out = np.array(corrupted, copy=True)
  rows = np.flatnonzero(np.asarray(fill) == FILL_OTHER_IMAGE)
  if rows.size == 0:
    return out
  batch, height, width, channels = corrupted.shape
  if batch < 2:
    for i in rows:
      pixels = pixel_mask(mask[i], patch_size, height, width)
      noise_rng = np.random.default_rng(int(offsets[i]))
      out[i][pixels] = noise_rng.integers(0, 256, size=(int(pixels.sum()), channels),
                                          dtype=np.uint8)
    return out
  donors = donor_indices(batch, offsets)[rows]
  # One vectorised select over the affected rows (boolean fancy indexing per image was ~5x
  # slower: 145 vs ~30 ms for 64 images of 224 px, all filled from other images).
  pixels = np.zeros((rows.size, height, width, 1), bool)
  grid_h, grid_w = mask.shape[1] * patch_size, mask.shape[2] * patch_size
  pixels[:, :grid_h, :grid_w, 0] = expand_mask(mask[rows], patch_size).astype(bool)
  out[rows] = np.where(pixels, donors_source[donors], corrupted[rows])
  return out
