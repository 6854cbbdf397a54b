"""SyntheticCXR: a built-in, file-free, chest-radiograph-like dataset with findings and sites.

The project's default dataset for the quickstart and the tests. Every record is a pure function
of (seed, split, index): nothing is stored, any split name gives an independent stream, and a
record reads the same in any process.

Generative model
----------------
1. Findings (labels) are drawn first and independently of everything else:
   nodule (p=0.25), opacity/consolidation (0.25), effusion (0.2), cardiomegaly (0.2).
   The acquisition site is drawn uniformly from `sites`, independently of the findings, so
   prevalence is the same at every site and a label never depends on the site.
2. Anatomy (a frontal view, MONOCHROME2: dense = bright), in normalised coordinates:
   a soft-edged thorax ellipse of soft tissue whose width and thickness vary with body habitus;
   two lung fields (air, dark) whose union is the `lung_mask`, each hemithorax with its own
   width, height and dome level (left/right asymmetry varies by patient); posterior ribs
   (curved periodic bands whose spacing, curvature and contrast vary); clavicles whose slope
   follows shoulder position; breast / pectoral soft tissue over the lower lateral lung fields
   (absent to marked); the mediastinum and spine (a bright central band whose width and
   off-midline shift, as in a slightly rotated patient, vary) with an aortic knob of varying
   size; the heart (a bright ellipse over the lower-left mediastinum, height and position
   varying) whose cardiothoracic ratio (CTR) is U(0.36, 0.50) normally and U(0.48, 0.62) with
   cardiomegaly -- the ranges overlap, so CTR alone is not a perfect classifier.
   Patient size, centring and rib phase also vary per image; normal images carry faint vessel
   end-on blobs that look like small nodules. This per-patient anatomical variety is what
   self-supervised pretraining has to tell patients apart by, as in real radiographs.
3. Findings are drawn into the anatomy, at sizes and densities a radiologist would call them
   on a full-resolution film, and never smaller than about a pixel so they survive at 32 px:
   a nodule is a Gaussian density (radius 2-4.5% of the width, i.e. 1.5-3 cm on a 35 cm
   film) inside a lung; opacity (consolidation) is a large patchy density, approaching soft
   tissue, masked to one lung; effusion fills the base of one lung (a quarter to a half of
   its height) up to a meniscus (blunted costophrenic angle); cardiomegaly enlarges the heart.
4. Site acquisition, applied to the same anatomy (A, B, C, D differ as hospitals do):
     A: reference scanner: mild noise, sharp, linear response.
     B: softer detector (blur), brighter gamma, more noise, zoomed field of view, burned-in
        "L" marker top-left.
     C: stored inverted (MONOCHROME1-like), harder contrast, collimation borders, patient
        shifted laterally, burned-in "R" marker top-right.
     D: low resolution (2x block upsampling), dark gamma, heavy noise, wide field of view and
        off-centre positioning, burned-in "L" marker bottom-left.
   Each site has per-image jitter of exposure around its own curve. Site shift genuinely hurts
   a model trained on one site (see tests/test_synthetic.py and the report numbers), while
   unlabeled images from all sites are available for pretraining (split "unlabeled").

Speed: everything is vectorised numpy on separable (row, column) coordinate vectors, so an
ellipse is one broadcast add; the noise comes from a per-process bank cropped at a random
offset. Measured 2.6-3.8k images/s at 64 px and 0.7-1.1k images/s at 224 px in one process
on a quiet 2-core CPU box before the anatomy above gained its per-patient variety; after it,
1.0k images/s at 64 px and 0.22k at 224 px with the box shared by several jobs (load ~5 on
2 cores); not yet re-measured on a quiet box
(`python -m data_pipelines.sources.synthetic`).

Site ids are indices into SITE_NAMES (A = 0 ... D = 3); for this source 0 is site A, not
"unknown".
"""
from __future__ import annotations

import functools
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
              border=0.0, zoom=1.12, shift_x=0.0, shift_y=0.03, marker="L", corner="tl"),
    "C": dict(noise=0.035, gain=1.3, offset=-0.08, gamma=1.0, blur=0, block=1, invert=True,
              border=0.07, zoom=0.95, shift_x=0.08, shift_y=0.0, marker="R", corner="tr"),
    "D": dict(noise=0.07, gain=1.0, offset=0.0, gamma=1.5, blur=1, block=2, invert=False,
              border=0.0, zoom=0.86, shift_x=-0.06, shift_y=0.08, marker="L", corner="bl"),
}

_GLYPHS = {
    "L": ["100", "100", "100", "100", "111"],
    "R": ["110", "101", "110", "101", "101"],
}

# Hash streams: per-record uniforms are keyed by (seed, split, index, stream) so the label and
# site columns can be computed for all records at once without rendering anything.
_STREAM_FINDINGS = 0   # 0..3
_STREAM_SITE = 4
_STREAM_IMAGE = 16     # 16.. per-image anatomy parameters
_NUM_IMAGE_STREAMS = 64


def _mix64(x: np.ndarray) -> np.ndarray:
  """SplitMix64 finaliser: a fast, well-mixed, counter-based hash (uint64 -> uint64)."""
  x = x ^ (x >> np.uint64(30))
  x = x * np.uint64(0xBF58476D1CE4E5B9)
  x = x ^ (x >> np.uint64(27))
  x = x * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def hash_uniform(seed: int, split: str, index: np.ndarray, stream: np.ndarray) -> np.ndarray:
  """Uniform [0, 1) floats that depend only on (seed, split, index, stream); broadcasts."""
  split_id = zlib.crc32(split.encode("utf-8"))
  with np.errstate(over="ignore"):
    key = _mix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], np.uint64) ^
                 np.uint64(split_id) * np.uint64(0x9E3779B97F4A7C15))
    index = np.asarray(index, np.uint64)
    stream = np.asarray(stream, np.uint64)
    x = _mix64(key + index * np.uint64(0xD1B54A32D192ED03) + stream * np.uint64(0x8CB92BA72F3D8DD7))
    x = _mix64(x + key)
  return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


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
  # Two ufuncs in place: np.clip's Python wrapper costs more than the math at 64 px.
  np.maximum(x, 0.0, out=x)
  return np.minimum(x, 1.0, out=x)


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
                  sharpness: float) -> np.ndarray:
  """1 inside, 0 outside, a linear ramp of width ~1/sharpness at the border; x is (1, W), y (H, 1)."""
  r2 = np.square((x - cx) * (sharpness ** 0.5 / a)) + np.square((y - cy) * (sharpness ** 0.5 / b))
  return _clip01(np.subtract(sharpness, r2, out=r2))


def _window(cx: float, cy: float, radius: float, size: int):
  """Pixel slices covering a box of `radius` (normalised units) around (cx, cy)."""
  to_px = lambda t: (t + 1.0) * 0.5 * size
  x0, x1 = int(max(0, np.floor(to_px(cx - radius)))), int(min(size, np.ceil(to_px(cx + radius))))
  y0, y1 = int(max(0, np.floor(to_px(cy - radius)))), int(min(size, np.ceil(to_px(cy + radius))))
  return slice(y0, max(y0, y1)), slice(x0, max(x0, x1))


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

    Exposed so tests and probes can render the same patient at another site (the anatomy
    depends only on (seed, split, index), the acquisition only on the site).

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

    # Patient frame: normalised coordinates of the patient seen through the site's field of
    # view. Separable vectors: x is (1, W), y is (H, 1), so ellipses are broadcast adds.
    grid = _grid(size)
    zoom = p["zoom"] * (0.95 + 0.1 * u[0])
    x = ((grid - p["shift_x"] - 0.06 * (u[1] - 0.5)) / zoom)[None, :]
    y = ((grid - p["shift_y"] - 0.06 * (u[2] - 0.5)) / zoom)[:, None]

    # Body habitus and lungs. Each hemithorax has its own width, height and dome: the right
    # hemidiaphragm usually sits higher (liver), and the asymmetry varies by patient.
    thorax_a = 0.74 + 0.16 * u[3]            # thorax half-width (thin ... broad patients)
    thorax_b = 0.84 + 0.10 * u[4]
    soft_tissue = 0.42 + 0.16 * u[40]        # chest-wall thickness: denser in larger patients
    lung_b = 0.56 + 0.12 * u[6]
    lung_cy = -0.10 + 0.06 * u[7]
    lung_dx = thorax_a * (0.45 + 0.05 * u[8])
    lung_a = thorax_a * (0.33 + 0.08 * u[5])
    lungs = ((-lung_dx * (0.96 + 0.08 * u[41]), lung_cy - 0.04 * u[42],   # patient's right
              lung_a * (0.97 + 0.12 * u[43]), lung_b * (0.94 + 0.08 * u[44])),
             (lung_dx * (0.96 + 0.08 * u[45]), lung_cy + 0.03 * u[46],    # patient's left
              lung_a * (0.90 + 0.12 * u[47]), lung_b * (0.92 + 0.10 * u[48])))

    body = _soft_ellipse(x, y, 0.0, 0.05, thorax_a, thorax_b, 6.0)
    lung_fields = [_soft_ellipse(x, y, cx, cy, a, b, 5.0) for cx, cy, a, b in lungs]
    lung = np.maximum(lung_fields[0], lung_fields[1])
    lung_mask = (lung > 0.5).astype(np.uint8)

    # Density map: soft tissue, minus air in the lungs, plus bone and the heart.
    density = soft_tissue * body - 0.34 * lung
    # Breast / pectoral soft tissue over the lower lateral lung fields: a large per-patient
    # density that real radiographs carry and a model must learn to see through.
    breast = 0.12 * u[49]
    if breast > 0.02:
      for side in (-1.0, 1.0):
        density += breast * _soft_ellipse(x, y, side * thorax_a * 0.62, 0.52 + 0.1 * u[50],
                                          thorax_a * 0.42, 0.30, 2.0)
    rib_period = 0.16 + 0.08 * u[9]          # intercostal spacing varies with habitus and age
    rib_curve = 0.25 + 0.2 * u[51]
    rib_phase = (y + rib_curve * np.square(x)) * (2 * np.pi / rib_period) + 2 * np.pi * u[10]
    ribs = np.square(np.maximum(np.cos(rib_phase), 0.0))
    density += ((0.06 + 0.08 * u[52]) * body) * ribs
    # Clavicles: bright bars across the apices, their slope set by shoulder position.
    clavicle_y = -0.72 + 0.1 * u[53]
    clavicle_slope = 0.15 + 0.25 * u[54]
    clavicles = np.clip(1.0 - np.abs(y - (clavicle_y - clavicle_slope * np.abs(x))) * 18.0, 0, 1)
    density += 0.16 * clavicles * (np.abs(x) < thorax_a * 0.75) * body
    # Mediastinum and spine; a patient rotated on the detector shifts it off the midline.
    mediastinum_x = 0.02 + 0.08 * (u[55] - 0.5)
    mediastinum_w = 0.12 + 0.06 * u[56]
    mediastinum = (np.clip((mediastinum_w - np.abs(x - mediastinum_x)) * 12.0, 0.0, 1.0)
                   * np.clip((0.75 - y) * 4, 0, 1))
    density += 0.32 * mediastinum * body
    # Aortic knob: a bump on the left upper mediastinal border, larger in older patients.
    knob = 0.05 + 0.05 * u[57]
    density += 0.2 * _soft_ellipse(x, y, mediastinum_x + mediastinum_w + 0.02, -0.38, knob,
                                   knob, 3.0)
    # Heart: cardiothoracic ratio (heart width / thorax width). Normal hearts are < 0.5 (the
    # radiologist's rule of thumb); the ranges overlap so CTR alone is not a perfect classifier.
    ctr = (0.48 + 0.14 * u[11]) if has_cardiomegaly else (0.36 + 0.14 * u[11])
    heart_a = ctr * thorax_a
    heart_cy = 0.28 + 0.08 * u[12]
    heart = _soft_ellipse(x, y, mediastinum_x + 0.3 * heart_a - 0.08, heart_cy, heart_a,
                          0.26 + 0.08 * u[13], 4.0)
    density += 0.30 * heart

    # Lesions. Boxes keep the Gaussians to the pixels they touch.
    def add_blob(cx, cy, radius, amplitude, mask_by_lung, patchy=False):
      rows, cols = _window(cx, cy, 3 * radius, size)
      if rows.stop <= rows.start or cols.stop <= cols.start:
        return
      blob = np.exp(-(np.square(x[:, cols] - cx) + np.square(y[rows] - cy)) / (2 * radius ** 2))
      if patchy:
        bank = _noise_bank(size)
        blob = blob * np.clip(0.75 + 0.35 * bank[rows, cols], 0.0, 1.5)
      if mask_by_lung:
        blob = blob * lung[rows, cols]
      density[rows, cols] += amplitude * blob

    def point_in_lung(ua, ub, uc):
      cx, cy, a, b = lungs[int(ua * 2) % 2]
      r, phi = 0.65 * np.sqrt(ub), 2 * np.pi * uc
      return cx + a * r * np.cos(phi), cy + b * r * np.sin(phi)

    # One pixel in normalised units: findings are drawn at least this large, so that what a
    # radiologist sees on a full-resolution film is still there (blurred) at 32 px.
    pixel = 2.0 / size
    # Vessels seen end-on: faint nodule look-alikes in every image (the distractor).
    for k in range(3):
      vx, vy = point_in_lung(u[14 + 3 * k], u[15 + 3 * k], u[16 + 3 * k])
      add_blob(vx, vy, 0.02 + 0.01 * u[23 + k], 0.06 + 0.06 * u[26 + k], False)
    if has_nodule:
      # 1.5-3 cm on a ~35 cm film: radius 2-4.5% of the width (0.04-0.09 here).
      nx, ny = point_in_lung(u[29], u[30], u[31])
      add_blob(nx, ny, max(0.04 + 0.05 * u[32], 0.6 * pixel), 0.22 + 0.14 * u[33], False)
    if has_opacity:
      # Consolidation: alveoli filled with fluid approach soft-tissue density over a lobe.
      ox, oy = point_in_lung(u[34], u[35], u[36])
      add_blob(ox, oy, 0.14 + 0.12 * u[37], 0.16 + 0.12 * u[38], True, patchy=True)
    if has_effusion:
      side_index = int(u[39] * 2) % 2
      cx, cy, a, b = lungs[side_index]
      height = (0.25 + 0.25 * u[58]) * b
      level = cy + b - height
      # Meniscus: fluid climbs the lateral wall, so the level rises away from the midline.
      lateral = np.abs(x) - abs(cx)
      fluid = np.clip((y - (level - 0.5 * np.maximum(lateral, 0.0))) * 10.0, 0.0, 1.0)
      side = (x < 0) if cx < 0 else (x > 0)
      density += (0.28 + 0.10 * u[59]) * fluid * lung_fields[side_index] * side

    # Acquisition at the site.
    bank = _noise_bank(size)
    oy, ox = int(u[0] * size), int(u[1] * size)
    noise = bank[oy:oy + size, ox:ox + size]
    if u[2] < 0.5:
      noise = noise[:, ::-1]
    image = density + p["noise"] * noise
    if p["blur"]:
      image = _blur121(image, p["blur"])
    if p["block"] > 1:
      k = p["block"]
      small = image[::k, ::k]
      image = np.repeat(np.repeat(small, k, axis=0), k, axis=1)[:size, :size]
    gain = p["gain"] * (0.9 + 0.2 * u[3])
    offset = p["offset"] + 0.06 * (u[4] - 0.5)
    image = _clip01(image * gain + (offset + 0.1))
    if p["gamma"] != 1.0:
      image = np.power(image, p["gamma"])
    if p["border"]:
      width = int(round(p["border"] * size * (0.8 + 0.4 * u[5])))
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
