"""SyntheticCXR: a built-in, file-free, chest-radiograph-like dataset with findings and sites.

The project's default dataset for the quickstart and the tests. Every record is a pure function
of (seed, split, index): nothing is stored, any split name gives an independent stream, and a
record reads the same in any process.

Generative model
----------------
1. Findings (labels) are drawn first and independently of everything else:
   nodule (p=0.25), opacity/consolidation (0.25), effusion (0.2), cardiomegaly (0.2).
   The acquisition site is drawn uniformly from `sites`, independently of the findings, so
   prevalence is the same at every site and a label never depends on the site. Everything
   about the patient below comes from other hash streams, so it says nothing about the labels
   either.
2. The patient (a frontal view, MONOCHROME2: dense = bright), in the patient's own normalised
   coordinates, different for every patient:
   - positioning: shift (+-0.04 of the half-width), size in the field (+-5%), rotation on
     the detector (+-4 deg), depth of inspiration (lung height +-5%, the diaphragm and the
     heart on it move with it);
   - body habitus: rib cage width and height; subcutaneous fat, thin to obese (0-0.36 of the
     half-width around the rib cage), which widens the body outline and densifies the soft
     tissue; neck; shoulders whose height also sets the clavicles' slope; arms beside the
     trunk in 75% of patients (as on supine AP films), at a varying distance;
   - two lung fields (air, dark; their union is the `lung_mask`) hanging from the apices,
     each with its own width, height and tilt (wider at the base; the right dome higher);
     posterior ribs (curved periodic bands whose spacing, curvature, phase and contrast vary;
     bone contrast also varies with the tube voltage); breast / pectoral soft tissue over the
     lower lateral lung fields (absent to marked); the mediastinum and spine (width and
     off-midline shift vary) with an aortic knob of varying size; the heart, sitting on the
     left hemidiaphragm, tilted, whose cardiothoracic ratio (CTR) is U(0.35, 0.49) normally
     and U(0.50, 0.65) with cardiomegaly (the radiologist's 0.5 rule; on the image the
     heart's height, tilt and position and the patient's size blur that line); three faint
     end-on vessels per image that look like small nodules;
   - support devices, each in a share of patients (about 60% carry at least one): ECG
     electrodes with lead wires (30%), a central venous catheter (20%), an endotracheal tube
     (12%), a nasogastric tube (10%), sternotomy wire loops (8%), a pacemaker with its lead
     (6%); metal is the densest thing on a film, and where it lies is specific to the patient.
   Why so much variety: SimCLR learns whatever tells an image's two views apart from the
   other images in the batch. With the earlier, near-identical anatomy two patients at the
   same site correlated at 0.81-0.93 in raw pixels (32 px), more than one patient imaged at
   two sites (A vs B 0.82, A vs D 0.75), so the cheapest solution was the site (contrastive
   top-1 ~ 1/31 at batch 64 over four sites). Now two patients at one site correlate at
   0.70-0.77 and one patient at sites A and B at 0.89, at A and D at 0.70
   (`python -m experiments.benchmarks.synthetic_separability` measures this).
3. Findings are drawn into the same patient last (rendering a record with other findings
   changes only their pixels -- with cardiomegaly the heart, and the tip of a pacemaker lead
   on it -- and never the lung mask), at sizes and densities a radiologist would
   call them on a full-resolution film, and never smaller than about a pixel so they survive
   at 32 px: a nodule is a Gaussian density (radius 2.25-4.75% of the width, i.e. 1.6-3.3 cm
   on a 35 cm film) inside a lung; opacity (consolidation) is a large patchy density,
   approaching soft tissue, masked to one lung; effusion fills the base of one lung (35-65%
   of its height) up to a meniscus (blunted costophrenic angle); cardiomegaly enlarges the
   heart. They are a little more conspicuous than before the patients varied this much, so
   that a logistic regression on 32 px pixels still finds them as well as it did (site A,
   2048 training images: macro AUC 0.89-0.90 before and after).
4. Site acquisition, applied to the same patient (A, B, C, D differ as hospitals do):
     A: reference scanner: mild noise, sharp, linear response.
     B: softer detector (blur), brighter gamma, more noise, zoomed field of view, burned-in
        "L" marker top-left.
     C: stored inverted (MONOCHROME1-like), harder contrast, collimation borders, patient
        shifted laterally, burned-in "R" marker top-right.
     D: low resolution (2x block upsampling), dark gamma, heavy noise, wide field of view and
        off-centre positioning, burned-in "L" marker bottom-left. (No blur before the
        downsampling any more: it smoothed the patients away, so that two patients at D
        correlated more than one patient at A and at D.)
   Each image has its own exposure (gain +-18%, offset +-0.05) around the site's curve and
   quantum noise that grows with the patient's size. The sites' geometric offsets (zoom,
   shift) are smaller than before, so that sites differ less, relative to patients, while
   a raw-pixel nearest neighbour still finds an image's own site ~99% of the time. Site shift
   still hurts a model trained on one site (see tests/test_synthetic.py), while unlabeled
   images from all sites are available for pretraining (split "unlabeled").

Speed: vectorised NumPy. All the large shapes (body, rib cage, shoulders, neck, arms, lungs,
heart, breasts, aortic knob) are evaluated together as quadratic polynomials in the image
coordinates (`_Canvas.ellipses`); small ones only in their bounding boxes; lines, tubes and
electrodes are stamped at sampled points; the noise comes from a per-process bank cropped at
a random offset. `python -m data_pipelines.sources.synthetic` measures images/s on one core
(numbers in docs/benchmarks.md).

Site ids are indices into SITE_NAMES (A = 0 ... D = 3); for this source 0 is site A, not
"unknown".
"""
from __future__ import annotations

import functools
import math
import time
import zlib
from typing import Any, Sequence

import numpy as np

from data_pipelines.sources.base import Source, check_index, unlabeled_label

FINDINGS = ("nodule", "opacity", "effusion", "cardiomegaly")
PREVALENCE = np.array([0.25, 0.25, 0.2, 0.2])
SITE_NAMES = ("A", "B", "C", "D")
TASKS = ("multilabel", "any_finding") + FINDINGS

# Acquisition parameters per site: noise sigma, gain, offset, gamma, blur, block (downsample
# factor), invert, collimation border (fraction of width), zoom (>1 = patient fills more of the
# image), lateral shift, vertical shift, marker ("" = none) and its corner.
_SITE_PARAMS = {
    "A": dict(noise=0.025, gain=1.0, offset=0.0, gamma=1.0, blur=0, block=1, invert=False,
              border=0.0, zoom=1.0, shift_x=0.0, shift_y=0.0, marker="", corner="tl"),
    "B": dict(noise=0.05, gain=0.9, offset=0.12, gamma=0.7, blur=2, block=1, invert=False,
              border=0.0, zoom=1.06, shift_x=0.0, shift_y=0.02, marker="L", corner="tl"),
    "C": dict(noise=0.035, gain=1.3, offset=-0.08, gamma=1.0, blur=0, block=1, invert=True,
              border=0.07, zoom=0.97, shift_x=0.05, shift_y=0.0, marker="R", corner="tr"),
    "D": dict(noise=0.07, gain=1.0, offset=0.0, gamma=1.5, blur=0, block=2, invert=False,
              border=0.0, zoom=0.92, shift_x=-0.04, shift_y=0.05, marker="L", corner="bl"),
}

_GLYPHS = {
    "L": ["100", "100", "100", "100", "111"],
    "R": ["110", "101", "110", "101", "101"],
}

# Hash streams: per-record uniforms are keyed by (seed, split, index, stream) so the label and
# site columns can be computed for all records at once without rendering anything.
_STREAM_FINDINGS = 0   # 0..3
_STREAM_SITE = 4
_STREAM_IMAGE = 16     # 16.. per-image parameters, in blocks (offsets into the image streams)
_U_FRAME = 0           # positioning: shift, size, rotation, inspiration
_U_THORAX = 8          # habitus, thorax shape, soft tissue
_U_LUNGS = 16          # apex, height, width, per-side size and tilt
_U_HEART = 32
_U_MEDIASTINUM = 40    # mediastinum, spine, aortic knob
_U_BONES = 48          # bone contrast, ribs, clavicles
_U_SOFT_TISSUE = 56    # breast / pectoral tissue
_U_VESSELS = 60        # three end-on vessels (nodule look-alikes)
_U_DEVICES = 76        # support devices (see _draw_devices)
_U_FINDINGS = 140      # where and how large the findings are (not whether: streams 0..3)
_U_ACQUISITION = 160   # noise crop, exposure, collimation
_NUM_IMAGE_STREAMS = 168


# NumPy scalars built once: constructing them costs more than hashing 200 streams.
_U30, _U27, _U31, _U11 = (np.uint64(k) for k in (30, 27, 31, 11))
_MIX_1, _MIX_2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_INDEX_MULTIPLIER, _STREAM_MULTIPLIER = np.uint64(0xD1B54A32D192ED03), np.uint64(0x8CB92BA72F3D8DD7)


def _mix64(x: np.ndarray) -> np.ndarray:
  """SplitMix64 finaliser: a fast, well-mixed, counter-based hash (uint64 -> uint64)."""
  x = x ^ (x >> _U30)
  x = x * _MIX_1
  x = x ^ (x >> _U27)
  x = x * _MIX_2
  return x ^ (x >> _U31)


@functools.lru_cache(maxsize=64)
def _split_key(seed: int, split: str) -> np.ndarray:
  split_id = zlib.crc32(split.encode("utf-8"))
  with np.errstate(over="ignore"):
    key = _mix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], np.uint64) ^ np.uint64(split_id) * _GOLDEN)
  key.setflags(write=False)  # shared by every caller (and reader thread)
  return key


def hash_uniform(seed: int, split: str, index: np.ndarray, stream: np.ndarray) -> np.ndarray:
  """Uniform [0, 1) floats that depend only on (seed, split, index, stream); broadcasts."""
  key = _split_key(seed, split)
  index = np.asarray(index, np.uint64)
  stream = np.asarray(stream, np.uint64)
  # uint64 array arithmetic wraps silently (the hash relies on it); only NumPy scalars warn.
  x = _mix64(key + index * _INDEX_MULTIPLIER + stream * _STREAM_MULTIPLIER)
  x = _mix64(x + key)
  return (x >> _U11).astype(np.float64) * (1.0 / (1 << 53))


def parse_sites(sites: str | Sequence[str] | None) -> tuple[str, ...]:
  """"A,C" / ["A", "C"] / None (all) -> ("A", "C"); raises ValueError naming bad sites."""
  if sites is None or sites == "" or sites == "all":
    return SITE_NAMES
  if isinstance(sites, str):
    sites = [s.strip() for s in sites.split(",") if s.strip()]
  sites = tuple(str(s).upper() for s in sites)
  bad = [s for s in sites if s not in SITE_NAMES]
  if bad or not sites:
    raise ValueError(f"synthetic sites {bad or sites!r} unknown; valid sites are "
                     f"{', '.join(SITE_NAMES)} (e.g. sites='A' or sites='B,C')")
  return sites


@functools.lru_cache(maxsize=8)
def _noise_bank(size: int) -> np.ndarray:
  """A (2*size, 2*size) float32 field of unit-variance, slightly correlated noise.

  Quantum mottle on a detector is spatially correlated over a pixel or two; a fixed bank
  cropped at a per-image random offset (and flipped) is ~100x cheaper than drawing fresh
  Gaussians for every 224 px image and, for a classifier, just as unpredictable.
  """
  rng = np.random.default_rng(20240601 + size)
  bank = rng.standard_normal((2 * size + 2, 2 * size + 2)).astype(np.float32)
  bank = (bank[:-2, :-2] + bank[1:-1, 1:-1] + bank[2:, 2:] + bank[1:-1, :-2] + bank[:-2, 1:-1]) / 5
  return (bank / bank.std()).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> np.ndarray:
  """Pixel-centre coordinates in [-1, 1], float32."""
  return (np.arange(size, dtype=np.float32) + 0.5) * np.float32(2.0 / size) - np.float32(1.0)


@functools.lru_cache(maxsize=8)
def _glyph(letter: str, size: int) -> np.ndarray:
  cell = max(1, size // 48)
  bitmap = np.array([[c == "1" for c in row] for row in _GLYPHS[letter]], np.float32)
  return np.kron(bitmap, np.ones((cell, cell), np.float32))


def _clip01(x: np.ndarray) -> np.ndarray:
  # np.clip in place: with NumPy 2.4 it is 2x (64 px) to 3.5x (224 px) faster than
  # np.maximum + np.minimum, whose float32 loops are slow.
  return np.clip(x, 0.0, 1.0, out=x)


def _blur121(x: np.ndarray, times: int) -> np.ndarray:
  """Separable [1, 2, 1] / 4 blur with edge replication, `times` passes."""
  for _ in range(times):
    y = 2 * x
    y[1:] += x[:-1]
    y[0] += x[0]
    y[:-1] += x[1:]
    y[-1] += x[-1]
    x = 2 * y
    x[:, 1:] += y[:, :-1]
    x[:, 0] += y[:, 0]
    x[:, :-1] += y[:, 1:]
    x[:, -1] += y[:, -1]
    x *= 1.0 / 16
  return x


def _soft_ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float,
                  sharpness: float, shear: float = 0.0) -> np.ndarray:
  """1 inside, 0 outside, a linear ramp of width ~1/sharpness at the border.

  `shear` tilts the ellipse's vertical axis: its centre moves by -shear * (y - cy) in x, so a
  lung can widen towards its base.
  """
  dx = x - cx
  dy = y - cy
  if shear:
    dx = dx + shear * dy
  r2 = np.square(dx * (sharpness ** 0.5 / a)) + np.square(dy * (sharpness ** 0.5 / b))
  return _clip01(np.subtract(sharpness, r2, out=r2))


def _window(cx: float, cy: float, radius: float, size: int):
  """Pixel slices covering a box of `radius` (normalised image units) around (cx, cy)."""
  # math, not np.floor: NumPy's scalar calls cost more than the drawing for small shapes.
  half = 0.5 * size
  x0 = max(0, math.floor((cx - radius + 1.0) * half))
  x1 = min(size, math.ceil((cx + radius + 1.0) * half))
  y0 = max(0, math.floor((cy - radius + 1.0) * half))
  y1 = min(size, math.ceil((cy + radius + 1.0) * half))
  return slice(y0, max(y0, y1)), slice(x0, max(x0, x1))


@functools.lru_cache(maxsize=16)
def _disc_offsets(diameter: int) -> np.ndarray:
  """(2, n) row / column offsets of the pixels of a disc `diameter` pixels wide (>= 1 pixel)."""
  r = max(diameter, 1) / 2.0
  span = np.arange(-int(r), int(r) + 1)
  dr, dc = np.meshgrid(span, span, indexing="ij")
  inside = np.square(dr) + np.square(dc) <= max(r * r, 0.25)
  offsets = np.stack([dr[inside], dc[inside]])
  offsets.setflags(write=False)
  return offsets


@functools.lru_cache(maxsize=8)
def _bezier_basis(num_points: int) -> np.ndarray:
  """(num_points, 3) Bernstein weights of a quadratic Bezier curve at evenly spaced t."""
  t = np.linspace(0.0, 1.0, num_points)
  weights = np.stack([np.square(1 - t), 2 * (1 - t) * t, np.square(t)], axis=1)
  weights.setflags(write=False)
  return weights


class _Canvas:
  """A density map in the patient's frame, seen through the detector.

  `x`, `y` are (S, S) patient coordinates of every pixel centre: the image grid shifted,
  rotated by the patient's positioning and scaled by the zoom (patient size times the site's
  field of view). Everything anatomical is drawn in patient coordinates, so a rotated or
  shifted patient moves as a whole.
  """

  def __init__(self, size: int, shift_x: float, shift_y: float, zoom: float, angle: float):
    grid = _grid(size)
    self.size, self.shift_x, self.shift_y, self.zoom = size, shift_x, shift_y, zoom
    self.cos, self.sin = float(np.cos(angle)), float(np.sin(angle))
    gx = (grid - np.float32(shift_x))[None, :]
    gy = (grid - np.float32(shift_y))[:, None]
    c, s = self.cos / zoom, self.sin / zoom
    self.x = c * gx + s * gy
    self.y = c * gy - s * gx
    # The same maps as affine forms (d/dgx, d/dgy, value at the image centre).
    self._x_form = (c, s, -(c * shift_x + s * shift_y))
    self._y_form = (-s, c, s * shift_x - c * shift_y)
    self.density = np.zeros((size, size), np.float32)

  def to_image(self, px, py):
    """Patient coordinates -> normalised image coordinates (the inverse of x, y)."""
    return (self.shift_x + self.zoom * (self.cos * px - self.sin * py),
            self.shift_y + self.zoom * (self.sin * px + self.cos * py))

  def box(self, x0: float, x1: float, y0: float, y1: float) -> tuple[slice, slice]:
    """Image slices covering the patient-coordinate box [x0, x1] x [y0, y1], rotation included."""
    ix, iy = self.to_image(np.array([x0, x1, x0, x1]), np.array([y0, y0, y1, y1]))
    half, size = 0.5 * self.size, self.size
    c0, c1 = math.floor((ix.min() + 1.0) * half), math.ceil((ix.max() + 1.0) * half)
    r0, r1 = math.floor((iy.min() + 1.0) * half), math.ceil((iy.max() + 1.0) * half)
    c0, c1, r0, r1 = max(0, c0), min(size, c1), max(0, r0), min(size, r1)
    return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))

  def ellipses(self, *specs: tuple[float, ...] | None) -> np.ndarray:
    """Soft ellipses over the whole image, (K, S, S), from K specs (cx, cy, a, b, sharpness[,
    shear]) as in `_soft_ellipse`; a None spec gives zeros.

    A rotated, sheared, shifted ellipse is a quadratic polynomial in the image coordinates
    (gx, gy): a column part, a row part and a cross term gx * gy. All K are evaluated
    together in four array ops: 3-4x faster than one ellipse at a time at 32-64 px, where
    the cost is the number of NumPy calls, and no slower at 224 px.
    """
    xa, xb, xc = self._x_form
    ya, yb, yc = self._y_form
    coefficients = np.zeros((len(specs), 6), np.float32)  # gx^2, gx gy, gy^2, gx, gy, 1
    for row, spec in zip(coefficients, specs):
      if spec is None:  # an absent shape: all zeros, clipped to 0 below
        row[5] = -1.0
        continue
      cx, cy, a, b, sharpness, *shear = spec
      shear = shear[0] if shear else 0.0
      # sharpness * (1 - (dx / a)^2 - (dy / b)^2) with dy = y - cy and
      # dx = x - cx + shear * dy, both affine forms p * gx + q * gy + r.
      dyp, dyq, dyr = ya, yb, yc - cy
      dxp, dxq, dxr = xa + shear * ya, xb + shear * yb, xc - cx + shear * dyr
      wx, wy = sharpness / (a * a), sharpness / (b * b)
      row[:] = (-(wx * dxp * dxp + wy * dyp * dyp),
                -2.0 * (wx * dxp * dxq + wy * dyp * dyq),
                -(wx * dxq * dxq + wy * dyq * dyq),
                -2.0 * (wx * dxp * dxr + wy * dyp * dyr),
                -2.0 * (wx * dxq * dxr + wy * dyq * dyr),
                sharpness - (wx * dxr * dxr + wy * dyr * dyr))
    grid = _grid(self.size)
    gx, gy = grid[None, None, :], grid[None, :, None]
    xx, xy, yy, x1, y1, c = (coefficients[:, k, None, None] for k in range(6))
    values = (xy * gy) * gx
    values += (yy * gy + y1) * gy + c
    values += (xx * gx + x1) * gx
    return _clip01(values)

  def blob(self, cx: float, cy: float, radius: float, amplitude: float,
           mask: np.ndarray | None = None, patchy: bool = False) -> None:
    """Adds a Gaussian density; a box of 3 radii keeps it to the pixels it touches."""
    ix, iy = self.to_image(cx, cy)
    rows, cols = _window(ix, iy, 3 * radius * self.zoom, self.size)
    if rows.stop <= rows.start or cols.stop <= cols.start:
      return
    blob = np.exp((np.square(self.x[rows, cols] - cx) + np.square(self.y[rows, cols] - cy))
                  * (-0.5 / radius ** 2))
    if patchy:
      bank = _noise_bank(self.size)
      blob *= np.clip(0.75 + 0.35 * bank[rows, cols], 0.0, 1.5)
    if mask is not None:
      blob *= mask[rows, cols]
    self.density[rows, cols] += amplitude * blob

  def add_ellipse(self, cx: float, cy: float, a: float, b: float, amplitude: float,
                  sharpness: float = 4.0) -> None:
    """Adds a small uniform ellipse (`_soft_ellipse`), computed only in its bounding box."""
    ix, iy = self.to_image(cx, cy)
    rows, cols = _window(ix, iy, 1.2 * max(a, b) * self.zoom, self.size)
    if rows.stop <= rows.start or cols.stop <= cols.start:
      return
    self.density[rows, cols] += amplitude * _soft_ellipse(self.x[rows, cols], self.y[rows, cols],
                                                          cx, cy, a, b, sharpness)

  def dots(self, points: Sequence[tuple[float, float]], radius: float, amplitude: float) -> None:
    """Adds small hard-edged discs (metal: electrodes, wire loops) at `points`, all at once.

    A disc smaller than a pixel becomes one pixel holding its integral (partial volume), so it
    stays visible, fainter, at 32 px.
    """
    half = 0.5 * self.size
    ix, iy = self.to_image(np.array([p[0] for p in points]), np.array([p[1] for p in points]))
    radius_px = radius * self.zoom * half
    offsets = _disc_offsets(int(round(2 * radius_px)))
    rows = (np.rint((iy + 1.0) * half - 0.5).astype(np.int64)[:, None] + offsets[0]).ravel()
    cols = (np.rint((ix + 1.0) * half - 0.5).astype(np.int64)[:, None] + offsets[1]).ravel()
    keep = (rows >= 0) & (rows < self.size) & (cols >= 0) & (cols < self.size)
    self.density[rows[keep], cols[keep]] += amplitude * min(1.0, np.pi * radius_px ** 2)

  def curve(self, p0: tuple[float, float], p1: tuple[float, float], p2: tuple[float, float],
            amplitude: float, width: float) -> None:
    """Adds a line of `width` (normalised units) along a quadratic Bezier curve p0 -> p2.

    Drawn by stamping points along the curve (about two per pixel of length): a few small
    vector ops whatever the image size, instead of a distance field over every pixel. Lines
    thinner than a pixel keep their integral (partial volume), down to 0.4 of a pixel, so a
    wire or tube stays visible, as a faint line, at 32 px.
    """
    # A Bezier curve maps to a Bezier curve under an affine map: move the three control
    # points to pixel coordinates, then sample.
    half = 0.5 * self.size
    control = np.array([self.to_image(*point) for point in (p0, p1, p2)]) * half + (half - 0.5)
    pixels = np.rint(_bezier_basis(3 * self.size) @ control).astype(np.int64)
    rows, cols = pixels[:, 1], pixels[:, 0]
    width_px = width * self.zoom * half
    thick = int(round(width_px))
    if thick > 1:
      offsets = np.arange(thick) - thick // 2
      row_offsets, col_offsets = np.meshgrid(offsets, offsets, indexing="ij")
      rows = (rows[:, None] + row_offsets.ravel()).ravel()
      cols = (cols[:, None] + col_offsets.ravel()).ravel()
    keep = (rows >= 0) & (rows < self.size) & (cols >= 0) & (cols < self.size)
    # Fancy-index += adds once per pixel however many stamps land on it.
    self.density[rows[keep], cols[keep]] += amplitude * min(1.0, max(width_px, 0.4))


class SyntheticCXR(Source):
  """Deterministic synthetic chest radiographs with findings, sites and lung masks.

  Attributes:
    site_names: names of the sites records can come from (all four; `sites` restricts).
    findings: per-record (N, 4) bool matrix of findings (always available, whatever the task).
    record_sites: per-record site index into `site_names`.
  """

  def __init__(self, split: str = "train", num_examples: int = 1024, image_size: int = 64,
               sites: str | Sequence[str] | None = None, seed: int = 0,
               task: str = "multilabel", labeled: bool | None = None):
    """Builds the source; nothing is rendered until `__getitem__`.

    Args:
      split: any name; each name is an independent stream ("train", "val", "test",
        "unlabeled", ...). "unlabeled" gives label -1 unless `labeled=True`.
      num_examples: number of records.
      image_size: side in pixels (square images), >= 16.
      sites: which sites the split draws from ("A", "B,C", ["A", "D"], None = all).
      seed: dataset seed; (seed, split, index) fixes a record.
      task: "multilabel" (4 findings, float32 multi-hot), "any_finding" (binary int32), or one
        finding name ("nodule", ...) as a binary task.
      labeled: False gives label -1 (pretraining); None = labeled unless split == "unlabeled".

    Raises:
      ValueError: on an unknown task or site, or a bad size / count.
    """
    if task not in TASKS:
      raise ValueError(f"synthetic task {task!r} unknown; valid tasks are {', '.join(TASKS)}")
    if int(image_size) < 16:
      raise ValueError(f"synthetic image_size must be >= 16, got {image_size}")
    if int(num_examples) < 0:
      raise ValueError(f"synthetic num_examples must be >= 0, got {num_examples}")
    self.split = split
    self.num_examples = int(num_examples)
    self.image_size = int(image_size)
    self.sites = parse_sites(sites)
    self.seed = int(seed)
    self.task = task
    self.labeled = (split != "unlabeled") if labeled is None else bool(labeled)
    self.site_names = list(SITE_NAMES)
    self.name = f"synthetic_cxr/{split}"
    self.num_channels = 1
    self.skipped = []
    if task == "multilabel":
      self.multi_label, self.num_classes, self.class_names = True, len(FINDINGS), list(FINDINGS)
    elif task == "any_finding":
      self.multi_label, self.num_classes, self.class_names = False, 2, ["no_finding", "finding"]
    else:
      self.multi_label, self.num_classes, self.class_names = False, 2, [f"no_{task}", task]
    self._cache = {}

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_cache"] = {}  # Derived columns are recomputed in the worker, cheaply.
    return state

  def __len__(self) -> int:
    return self.num_examples

  # ---- label / site columns, computed for all records without rendering ----

  def _findings_and_sites(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    index = np.asarray(index, np.int64)
    u = hash_uniform(self.seed, self.split, index[:, None], np.arange(5)[None, :])
    findings = u[:, :4] < PREVALENCE[None, :]
    site_choice = np.minimum((u[:, 4] * len(self.sites)).astype(np.int64), len(self.sites) - 1)
    site_index = np.array([SITE_NAMES.index(s) for s in self.sites], np.int32)[site_choice]
    return findings, site_index

  def _columns(self):
    if "columns" not in self._cache:
      self._cache["columns"] = self._findings_and_sites(np.arange(self.num_examples))
    return self._cache["columns"]

  @property
  def findings(self) -> np.ndarray:
    return self._columns()[0]

  @property
  def record_sites(self) -> np.ndarray:
    return self._columns()[1]

  def _label_from_findings(self, findings: np.ndarray) -> np.ndarray:
    """findings (N, 4) bool -> labels in the task's format (N,) int32 or (N, 4) float32."""
    n = findings.shape[0]
    if not self.labeled:
      if self.multi_label:
        return np.full((n, self.num_classes), -1.0, np.float32)
      return np.full((n,), -1, np.int32)
    if self.task == "multilabel":
      return findings.astype(np.float32)
    if self.task == "any_finding":
      return findings.any(axis=1).astype(np.int32)
    return findings[:, FINDINGS.index(self.task)].astype(np.int32)

  @property
  def labels(self) -> np.ndarray:
    return self._label_from_findings(self.findings)

  @property
  def ids(self) -> list[str]:
    width = max(5, len(str(max(self.num_examples - 1, 0))))
    return [f"{self.split}/{i:0{width}d}" for i in range(self.num_examples)]

  # ---- rendering ----

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = check_index(index, self.num_examples, self.name)
    findings, site = self._findings_and_sites(np.array([index]))
    findings, site = findings[0], int(site[0])
    image, lung_mask = self.render(index, findings, SITE_NAMES[site])
    label = self._label_from_findings(findings[None])[0]
    if not self.multi_label:
      label = np.int32(label)
    width = max(5, len(str(max(self.num_examples - 1, 0))))
    return {"image": image, "label": label, "id": f"{self.split}/{index:0{width}d}",
            "site": np.int32(site), "lung_mask": lung_mask}

  def render(self, index: int, findings: np.ndarray, site: str) -> tuple[np.ndarray, np.ndarray]:
    """Renders record `index` with the given findings at `site`.

    Exposed so tests and probes can render the same patient at another site (the patient --
    anatomy, positioning, devices -- depends only on (seed, split, index), the acquisition
    only on the site), or with other findings (the findings are drawn last, into the same
    patient).

    Returns:
      (image (S, S, 1) uint8, lung_mask (S, S) uint8 in {0, 1}).
    """
    size = self.image_size
    p = _SITE_PARAMS[site]
    # Python floats, not np.float64: NumPy 2 promotes float32 arrays with np.float64 scalars to
    # float64, which doubles the cost of every op at 224 px.
    u = hash_uniform(self.seed, self.split, index,
                     _STREAM_IMAGE + np.arange(_NUM_IMAGE_STREAMS)).tolist()
    has_nodule, has_opacity, has_effusion, has_cardiomegaly = (bool(f) for f in findings)

    # Positioning: the patient's shift, rotation and size on the detector, inside the site's
    # field of view. Radiographers centre patients only roughly, and a rotated patient is the
    # commonest technical fault on a chest film.
    f = _U_FRAME
    canvas = _Canvas(size, shift_x=p["shift_x"] + 0.04 * (2 * u[f] - 1),
                     shift_y=p["shift_y"] + 0.04 * (2 * u[f + 1] - 1),
                     zoom=p["zoom"] * (0.95 + 0.10 * u[f + 2]),
                     angle=np.radians(4.0) * (2 * u[f + 3] - 1))
    inspiration = u[f + 4]  # 0: shallow breath (short lungs, high diaphragm) ... 1: deep
    x, y = canvas.x, canvas.y

    # The patient's anatomy, first as numbers, then drawn: the large shapes in one pass.
    # Body habitus: the rib cage's width and height, and around it subcutaneous fat, thin
    # to obese, which widens the body outline and thickens (densifies) the soft tissue. The
    # outline also has a neck, shoulders (their height varies, and the clavicles' slope with
    # it) and often arms held beside the trunk (typical of supine AP films).
    t = _U_THORAX
    habitus = u[t]
    thorax_a = 0.72 + 0.12 * u[t + 1] + 0.06 * habitus
    thorax_b = 0.82 + 0.12 * u[t + 2]
    fat = 0.36 * habitus
    soft_tissue = 0.38 + 0.12 * habitus + 0.06 * u[t + 3]
    body_cy = 0.05 + 0.06 * (u[t + 4] - 0.5)
    shoulder_raise = u[t + 6]
    shoulder_y = -0.52 - 0.16 * shoulder_raise
    arm_x = thorax_a + fat + 0.04 + 0.12 * u[t + 7]
    arm_y = -0.15 - 0.3 * shoulder_raise
    arms = 0.85 if u[t + 5] < 0.75 else 0.0  # soft tissue of the arms, when in the field

    # Lungs hang from the apices (under the clavicles) down to the diaphragm, so inspiration
    # sets their height. Each hemithorax has its own width, height and tilt (wider at the
    # base); the right hemidiaphragm usually sits higher (liver).
    l = _U_LUNGS
    apex = -0.71 + 0.04 * u[l]
    lung_b = (0.54 + 0.10 * u[l + 1]) * (0.94 + 0.10 * inspiration)
    lung_dx = thorax_a * (0.42 + 0.08 * u[l + 2])
    lung_a = thorax_a * (0.30 + 0.10 * u[l + 3])
    lungs = []  # (cx, cy, a, b, shear) per side: patient's right (image left), then left
    for side, k, b_scale, a_scale in ((-1.0, l + 4, 0.90, 0.95), (1.0, l + 8, 0.96, 0.88)):
      b = lung_b * (b_scale + 0.08 * u[k + 1])
      lungs.append((side * lung_dx * (0.94 + 0.12 * u[k]), apex + b,
                    lung_a * (a_scale + 0.14 * u[k + 2]), b, -side * 0.30 * u[k + 3]))

    # Mediastinum and spine, off the midline in a patient rotated about the vertical axis.
    m = _U_MEDIASTINUM
    mediastinum_x = 0.02 + 0.10 * (u[m] - 0.5)
    mediastinum_w = 0.10 + 0.10 * u[m + 1]
    # Aortic knob: a bump on the left upper mediastinal border, larger in older patients.
    knob = 0.04 + 0.07 * u[m + 2]
    knob_spec = (mediastinum_x + mediastinum_w + 0.02, apex + 0.30 + 0.08 * u[m + 3], knob, knob,
                 3.0)

    # Heart: cardiothoracic ratio (heart width / thorax width). Normal hearts are < 0.5 (the
    # radiologist's rule of thumb); on the image the heart's height, tilt and position blur it.
    # The heart sits on the left hemidiaphragm, so it rides up with a shallow breath.
    h = _U_HEART
    ctr = (0.50 + 0.15 * u[h]) if has_cardiomegaly else (0.35 + 0.14 * u[h])
    heart_a = ctr * thorax_a
    heart_b = 0.24 + 0.10 * u[h + 1]
    left_base = lungs[1][1] + lungs[1][3]
    heart_cx = mediastinum_x + 0.3 * heart_a - 0.08 + 0.08 * (u[h + 3] - 0.5)
    heart_cy = left_base - heart_b * (0.80 + 0.25 * u[h + 2])

    # Breast / pectoral soft tissue over the lower lateral lung fields: a large per-patient
    # density that real radiographs carry and a model must learn to see through.
    s = _U_SOFT_TISSUE
    breast = 0.14 * u[s]
    breast_y = 0.52 + 0.1 * u[s + 1]

    (rib_cage, body, shoulder_right, shoulder_left, neck, lung_right, lung_left, heart, knob,
     breast_right, breast_left, arm_right, arm_left) = canvas.ellipses(
         (0.0, body_cy, thorax_a, thorax_b, 6.0),
         (0.0, body_cy + 0.3 * fat, thorax_a + fat, thorax_b + 0.6 * fat, 4.0),
         (-thorax_a * 0.6, shoulder_y, 0.42 + fat, 0.36 + 0.3 * fat, 1.5),
         (thorax_a * 0.6, shoulder_y, 0.42 + fat, 0.36 + 0.3 * fat, 1.5),
         (0.0, -1.25, 0.22 + 0.4 * fat, 0.70, 4.0),
         *((cx, cy, a, b, 5.0, shear) for cx, cy, a, b, shear in lungs),
         (heart_cx, heart_cy, heart_a, heart_b, 4.0, 0.2 * (u[h + 4] - 0.5)), knob_spec,
         (-thorax_a * 0.62, breast_y, thorax_a * 0.42, 0.30, 2.0) if breast > 0.02 else None,
         (thorax_a * 0.62, breast_y, thorax_a * 0.42, 0.30, 2.0) if breast > 0.02 else None,
         (-arm_x, arm_y, 0.16 + 0.08 * habitus, 0.85, 1.0) if arms else None,
         (arm_x, arm_y, 0.16 + 0.08 * habitus, 0.85, 1.0) if arms else None)
    lung_fields = (lung_right, lung_left)
    lung = np.maximum(lung_right, lung_left)
    lung_mask = (lung > 0.5).astype(np.uint8)
    if arms:
      arm_right *= arms
      arm_left *= arms
    body = np.maximum.reduce([body, neck, shoulder_right, shoulder_left, arm_right, arm_left])

    # Density map: soft tissue, minus air in the lungs, plus bone, the heart and devices.
    canvas.density += soft_tissue * body - 0.34 * lung
    density = canvas.density  # updated in place from here on (the canvas draws into it)
    if breast > 0.02:
      density += breast * (breast_right + breast_left)
    density += 0.30 * heart + 0.2 * knob
    # Bones. Their contrast against soft tissue falls with the tube voltage (kVp), which
    # varies by patient size and department habit.
    o = _U_BONES
    bone_contrast = 0.75 + 0.5 * u[o]
    rib_period = 0.15 + 0.10 * u[o + 1]      # intercostal spacing varies with habitus and age
    rib_curve = 0.15 + 0.35 * u[o + 2]
    rib_phase = (y + rib_curve * np.square(x)) * (2 * np.pi / rib_period) + 2 * np.pi * u[o + 3]
    ribs = np.square(_clip01(np.cos(rib_phase)))
    density += ((0.05 + 0.10 * u[o + 4]) * bone_contrast * rib_cage) * ribs
    # Clavicles: bright bars across the apices, their slope set by shoulder position. Like
    # the mediastinum below, computed only in the box of the image it can touch.
    clavicle_y = apex + 0.02 + 0.08 * u[o + 5]
    clavicle_slope = 0.10 + 0.25 * shoulder_raise + 0.10 * u[o + 6]
    half_width = thorax_a * 0.75
    box = canvas.box(-half_width, half_width,
                     clavicle_y - clavicle_slope * half_width - 0.06, clavicle_y + 0.06)
    bx, by = x[box], y[box]
    clavicles = 1.0 - np.abs(by - (clavicle_y - clavicle_slope * np.abs(bx))) * 18.0
    density[box] += ((0.16 * bone_contrast) * _clip01(clavicles)
                     * (np.abs(bx) < half_width) * rib_cage[box])
    # Mediastinum and spine: a bright band down the middle, ending at the diaphragm.
    box = canvas.box(mediastinum_x - mediastinum_w - 0.02, mediastinum_x + mediastinum_w + 0.02,
                     -1.5, 0.75)
    mediastinum = _clip01((mediastinum_w - np.abs(x[box] - mediastinum_x)) * 12.0)
    mediastinum *= _clip01((0.75 - y[box]) * 4.0)
    density[box] += 0.32 * mediastinum * rib_cage[box]

    def point_in_lung(ua, ub, uc):
      cx, cy, a, b, shear = lungs[int(ua * 2) % 2]
      r, phi = 0.65 * np.sqrt(ub), 2 * np.pi * uc
      dy = b * r * np.sin(phi)
      return cx + a * r * np.cos(phi) - shear * dy, cy + dy

    # Vessels seen end-on: faint nodule look-alikes in every image (the distractor).
    v = _U_VESSELS
    for k in range(v, v + 15, 5):
      vx, vy = point_in_lung(u[k], u[k + 1], u[k + 2])
      canvas.blob(vx, vy, 0.02 + 0.01 * u[k + 3], 0.06 + 0.06 * u[k + 4])

    _draw_devices(canvas, u[_U_DEVICES:_U_FINDINGS], apex, mediastinum_x,
                  (heart_cx, heart_cy, heart_a, heart_b))

    # Findings, at sizes and densities a radiologist would call them on a full-resolution
    # film, and never smaller than about a pixel, so that they are still there (blurred) at
    # 32 px.
    g = _U_FINDINGS
    pixel = 2.0 / size
    if has_nodule:
      # 1.6-3.3 cm on a ~35 cm film: radius 2.25-4.75% of the width (0.045-0.095 here).
      nx, ny = point_in_lung(u[g], u[g + 1], u[g + 2])
      canvas.blob(nx, ny, max(0.045 + 0.05 * u[g + 3], 0.6 * pixel), 0.32 + 0.14 * u[g + 4])
    if has_opacity:
      # Consolidation: alveoli filled with fluid approach soft-tissue density over a lobe.
      ox, oy = point_in_lung(u[g + 5], u[g + 6], u[g + 7])
      canvas.blob(ox, oy, 0.14 + 0.12 * u[g + 8], 0.16 + 0.12 * u[g + 9], mask=lung, patchy=True)
    if has_effusion:
      side_index = int(u[g + 10] * 2) % 2
      cx, cy, a, b, _ = lungs[side_index]
      level = cy + b - (0.35 + 0.3 * u[g + 11]) * b  # 35-65% of the lung's height
      # Meniscus: fluid climbs the lateral wall, so the level rises away from the midline.
      lateral = np.abs(x) - abs(cx)
      fluid = np.clip((y - (level - 0.5 * np.maximum(lateral, 0.0))) * 10.0, 0.0, 1.0)
      side = (x < 0) if cx < 0 else (x > 0)
      density += (0.36 + 0.12 * u[g + 12]) * fluid * lung_fields[side_index] * side

    # Acquisition at the site: quantum noise (more in larger patients), the detector's blur
    # and resolution, exposure (the patient's around the site's curve), markers, inversion.
    q = _U_ACQUISITION
    bank = _noise_bank(size)
    oy, ox = int(u[q] * size), int(u[q + 1] * size)
    noise = bank[oy:oy + size, ox:ox + size]
    if u[q + 2] < 0.5:
      noise = noise[:, ::-1]
    image = density + (p["noise"] * (0.8 + 0.4 * habitus)) * noise
    if p["blur"]:
      image = _blur121(image, p["blur"])
    if p["block"] > 1:
      k = p["block"]
      small = image[::k, ::k]
      image = np.repeat(np.repeat(small, k, axis=0), k, axis=1)[:size, :size]
    gain = p["gain"] * (0.82 + 0.36 * u[q + 3])
    offset = p["offset"] + 0.10 * (u[q + 4] - 0.5)
    image = _clip01(image * gain + (offset + 0.1))
    if p["gamma"] != 1.0:
      image = np.power(image, p["gamma"])
    if p["border"]:
      width = int(round(p["border"] * size * (0.8 + 0.4 * u[q + 5])))
      if width:
        image[:, :width] = 0.9
        image[:, size - width:] = 0.9
        image[:width, :] = 0.9
    if p["marker"]:
      glyph = _glyph(p["marker"], size)
      gh, gw = glyph.shape
      m = max(1, size // 24)
      r0 = m if p["corner"][0] == "t" else size - m - gh
      c0 = m if p["corner"][1] == "l" else size - m - gw
      patch = image[r0:r0 + gh, c0:c0 + gw]
      image[r0:r0 + gh, c0:c0 + gw] = np.maximum(patch, glyph)
    if p["invert"]:
      image = 1.0 - image
    image = (image * 255.0 + 0.5).astype(np.uint8)
    return image[:, :, None], lung_mask


# Where monitoring electrodes go (patient coordinates; x < 0 is the patient's right): below
# each clavicle, the lower chest on both sides, and one precordial lead.
_ECG_SITES = ((-0.60, -0.60), (0.60, -0.60), (0.55, 0.50), (-0.55, 0.50), (0.25, 0.25))


def _draw_devices(canvas: _Canvas, d: list[float], apex: float, mediastinum_x: float,
                  heart: tuple[float, float, float, float]) -> None:
  """Draws support devices; each is present in a share of patients, independently of findings.

  Devices are the most patient-specific thing on a film (as they are on ICU radiographs), and
  metal is the densest thing on it. Shares: ECG electrodes with lead wires 30%, central venous
  catheter 20%, endotracheal tube 12%, nasogastric tube 10%, sternotomy wires 8%, pacemaker
  6% (about 60% of patients carry at least one device). The draws come from the image
  streams, never the finding streams, so a device says nothing about the labels.
  """
  heart_cx, heart_cy, heart_a, heart_b = heart
  if d[0] < 0.30:
    electrodes = []
    for k in range(3 + int(d[1] * 3)):
      ux, uy, uend, ubend = d[2 + 4 * k:6 + 4 * k]
      ex = _ECG_SITES[k][0] + 0.24 * (ux - 0.5)
      ey = _ECG_SITES[k][1] + 0.24 * (uy - 0.5)
      electrodes.append((ex, ey))
      # The lead wire sags out of the field on the electrode's side.
      end = (1.5 if ex > 0 else -1.5, ey + 1.2 * (uend - 0.5))
      bend = (0.5 * (ex + end[0]), 0.5 * (ey + end[1]) + 0.6 * (ubend - 0.3))
      canvas.curve((ex, ey), bend, end, 0.22, 0.012)
    canvas.dots(electrodes, 0.035, 0.40)
  if d[22] < 0.20:
    # Central venous catheter, usually from the right internal jugular, tip at the
    # cavo-atrial junction.
    side = -1.0 if d[23] < 0.7 else 1.0
    tip = (mediastinum_x - 0.05 + 0.08 * (d[25] - 0.5), apex + 0.45 + 0.25 * d[26])
    canvas.curve((side * (0.25 + 0.2 * d[24]), -1.3), (side * (0.10 + 0.25 * d[27]),
                                                        apex + 0.1 * d[28]), tip, 0.30, 0.02)
  if d[29] < 0.12:
    # Endotracheal tube down the trachea, tip a few centimetres above the carina.
    tube_x = mediastinum_x - 0.02 + 0.05 * (d[30] - 0.5)
    tip_y = apex + 0.20 + 0.15 * d[31]
    canvas.curve((tube_x, -1.3), (tube_x + 0.06 * (d[32] - 0.5), 0.5 * (tip_y - 1.3)),
                 (tube_x, tip_y), 0.18, 0.045)
  if d[33] < 0.10:
    # Nasogastric tube down the oesophagus, past the left hemidiaphragm into the stomach.
    tube_x = mediastinum_x + 0.03 * (d[34] - 0.5)
    canvas.curve((tube_x, -1.3), (tube_x - 0.1 * d[35], 0.6),
                 (0.25 + 0.2 * d[36], 0.85 + 0.1 * d[37]), 0.25, 0.02)
  if d[38] < 0.06:
    # Pacemaker: a generator below a clavicle (usually the left) and a lead to the right
    # ventricular apex.
    side = 1.0 if d[39] < 0.8 else -1.0
    gx, gy = side * (0.45 + 0.15 * d[40]), apex + 0.12 + 0.12 * d[41]
    canvas.add_ellipse(gx, gy, 0.09, 0.065, 0.70, sharpness=8.0)
    canvas.curve((gx, gy), (mediastinum_x + 0.1 * (d[42] - 0.5), apex + 0.3),
                 (heart_cx + 0.5 * heart_a, heart_cy + 0.5 * heart_b), 0.40, 0.02)
  if d[43] < 0.08:
    # Median sternotomy: 4-6 wire loops down the sternum, over the mediastinum.
    count = 4 + int(d[44] * 3)
    top = apex + 0.25
    loops = [(mediastinum_x + 0.04 * (d[45 + k] - 0.5), top + (heart_cy - top) * k / (count - 1))
             for k in range(count)]
    canvas.dots(loops, 0.022, 0.50)


def benchmark(image_size: int, num_images: int = 500, site_list: str | None = None) -> float:
  """Images per second of `SyntheticCXR.__getitem__` in this process (one core)."""
  source = SyntheticCXR("train", num_examples=num_images, image_size=image_size, sites=site_list)
  source[0]  # Warm the caches (noise bank, glyphs).
  start = time.perf_counter()
  for i in range(num_images):
    source[i]
  return num_images / (time.perf_counter() - start)


if __name__ == "__main__":
  for px, n in ((64, 2000), (224, 300)):
    print(f"SyntheticCXR {px} px: {benchmark(px, n):.0f} images/s on one core")
