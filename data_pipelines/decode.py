"""Image decoding for the sources: PNG (8/16-bit), JPEG and other PIL formats, and DICOM.

Everything returns (H, W, C) with C in {1, 3}. By default the result is uint8 and is the image
a radiologist would be shown:

* DICOM: the modality LUT (RescaleSlope / RescaleIntercept), then the VOI window (the first
  WindowCenter / WindowWidth pair, with the VOILUTFunction LINEAR, LINEAR_EXACT or SIGMOID of
  PS3.3 C.11.2.1.2; a min-max window over the image when the file has none), then MONOCHROME1
  inversion (high values are dark). Colour DICOMs (RGB, YBR_* converted to RGB by pydicom,
  PALETTE COLOR through its LUT) are scaled to 8 bits. Multi-frame files give their first frame.
* 16-bit grayscale PNG (PIL modes I;16 / I): stretched min-max to 8 bits. Such files carry no
  window, and exports from 10-14-bit detectors rarely use the full 16-bit range, so a fixed
  /257 would give nearly black images.
* Alpha channels (LA, RGBA) are dropped; palette (P), CMYK, YCbCr become RGB; 1-bit becomes L.

With `keep_bit_depth=True`, 16-bit PNGs are returned unchanged as uint16 and grayscale DICOMs
go through the same window into 0..65535 (uint16), for pipelines that do their own windowing.

Reduced-size decoding (`min_size` > 0; `data.decode_size` of the folder source): an image whose
shorter side is at least 2 x min_size is returned smaller, with its shorter side still
>= min_size and its aspect ratio kept (never upscaled; smaller images are returned unchanged):

* JPEG: decoded at 1/2, 1/4 or 1/8 scale by libjpeg's DCT scaling (PIL `Image.draft`), the
  largest reduction that keeps the shorter side >= min_size. It saves the inverse DCT and
  colour conversion of the dropped pixels, not the entropy decoding of the whole file, so the
  decode itself gets ~1.2-2x faster (less for noisy, high-quality files); the larger gain is in
  every later op, which works on 1/4-1/64 of the pixels.
* PNG and every other PIL format: decoded in full (the format allows nothing else), then
  reduced by the integer factor floor(short side / min_size) with a box filter (PIL
  `Image.reduce`: each output pixel is the mean of a factor x factor block; edge blocks are
  partial). 16-bit images are reduced before the 8-bit stretch, which uses the min / max of the
  full image, so the result equals stretching first and reducing after, up to rounding.
* DICOM: decoded and windowed in full, then reduced the same way (the VOI window is not
  linear, so the reduction comes after it).

A decoded image is (H, W, C); what the augmentations crop from it is what they would crop
from the full image, at a lower resolution (see `data.decode_size` in
`data_pipelines/sources/__init__.py` for the default and why it keeps augmentation quality).

Any failure raises `BadRecordError(record, reason)` naming the file and what is wrong with it.
"""
from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

from data_pipelines.errors import BadRecordError
from data_pipelines import storage

DICOM_EXTENSIONS = (".dcm", ".dicom", ".dic")
_HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def is_dicom(data: bytes) -> bool:
  """True for a DICOM Part 10 file (the "DICM" magic after the 128-byte preamble)."""
  return len(data) >= 132 and data[128:132] == b"DICM"


def read_image(path: str, record: str | None = None, keep_bit_depth: bool = False,
               min_size: int = 0) -> np.ndarray:
  """Reads and decodes an image file.

  Args:
    path: file path (PNG, JPEG, DICOM, or anything PIL opens).
    record: how to name the record in errors; defaults to `path`.
    keep_bit_depth: keep 16-bit data as uint16 (see module docstring).
    min_size: > 0: decode at reduced size, the shorter side >= min_size (see module
      docstring); 0: full resolution.

  Returns:
    (H, W, C) uint8 (or uint16), C in {1, 3}.

  Raises:
    BadRecordError: missing, unreadable, empty, corrupt or zero-size image.
  """
  return read_image_and_size(path, record, keep_bit_depth, min_size)[0]


def read_image_and_size(path: str, record: str | None = None, keep_bit_depth: bool = False,
                        min_size: int = 0) -> tuple[np.ndarray, tuple[int, int]]:
  """`read_image`, also returning the (height, width) of the full-resolution image."""
  record = record or str(path)
  try:
    data = storage.read_bytes(path)
  except FileNotFoundError:
    raise BadRecordError(record, "file does not exist") from None
  except IsADirectoryError:
    raise BadRecordError(record, "path is a directory, not an image file") from None
  except OSError as e:
    raise BadRecordError(record, f"cannot read file: {e}") from None
  return decode_image_and_size(data, record, keep_bit_depth=keep_bit_depth,
                               dicom_hint=str(path).lower().endswith(DICOM_EXTENSIONS),
                               min_size=min_size)


def decode_image(data: bytes, record: str, keep_bit_depth: bool = False,
                 dicom_hint: bool = False, min_size: int = 0) -> np.ndarray:
  """Decodes encoded image bytes (PNG, JPEG, DICOM, ...).

  Args:
    data: the file's bytes.
    record: how to name the record in errors.
    keep_bit_depth: keep 16-bit data as uint16 (see module docstring).
    dicom_hint: try DICOM even without the "DICM" magic (files without a preamble).
    min_size: > 0: decode at reduced size, the shorter side >= min_size; 0: full resolution.

  Returns:
    (H, W, C) uint8 (or uint16), C in {1, 3}.

  Raises:
    BadRecordError: empty, corrupt, truncated or zero-size image.
  """
  return decode_image_and_size(data, record, keep_bit_depth, dicom_hint, min_size)[0]


def decode_image_and_size(data: bytes, record: str, keep_bit_depth: bool = False,
                          dicom_hint: bool = False,
                          min_size: int = 0) -> tuple[np.ndarray, tuple[int, int]]:
  """`decode_image`, also returning the (height, width) of the full-resolution image."""
  if not data:
    raise BadRecordError(record, "empty file (0 bytes)")
  if is_dicom(data) or dicom_hint:
    image = decode_dicom(data, record, keep_bit_depth=keep_bit_depth)
    return reduce_image(image, min_size), image.shape[:2]
  return _decode_pil(data, record, keep_bit_depth, min_size)


def reduction_factor(height: int, width: int, min_size: int) -> int:
  """The integer box-reduction factor that keeps the shorter side >= min_size (1: none)."""
  short = min(int(height), int(width))
  if min_size <= 0 or short < 2 * min_size:
    return 1
  return short // int(min_size)


def reduce_image(image: np.ndarray, min_size: int) -> np.ndarray:
  """Box-reduces an (H, W, C) uint8 / uint16 image so that its shorter side stays >= min_size.

  Each output pixel is the rounded mean of a factor x factor block (`reduction_factor`; the last
  row / column of blocks may be partial). Images with a shorter side below 2 x min_size, and
  min_size <= 0, are returned unchanged.
  """
  factor = reduction_factor(image.shape[0], image.shape[1], min_size)
  if factor == 1:
    return image
  if image.dtype == np.uint8:
    if image.shape[-1] == 1:
      return np.asarray(Image.fromarray(image[:, :, 0], "L").reduce(factor))[:, :, None]
    return np.asarray(Image.fromarray(np.ascontiguousarray(image), "RGB").reduce(factor))
  info = np.iinfo(image.dtype)
  return np.clip(np.rint(_reduce_float(image, factor)), info.min, info.max).astype(image.dtype)


def _reduce_float(image: np.ndarray, factor: int) -> np.ndarray:
  """Box means (float32) of an (H, W) or (H, W, C) array of any numeric dtype."""
  if image.ndim == 2:
    return np.asarray(Image.fromarray(image.astype(np.float32), "F").reduce(factor))
  return np.stack([_reduce_float(image[:, :, c], factor) for c in range(image.shape[-1])], -1)


def _check_size(image: np.ndarray, record: str) -> np.ndarray:
  if image.size == 0 or image.shape[0] == 0 or image.shape[1] == 0:
    raise BadRecordError(record, f"zero-size image {image.shape}")
  return image


def min_max_to(values: np.ndarray, out_max: int, low: float | None = None,
               high: float | None = None) -> np.ndarray:
  """Linearly maps [min, max] of `values` (or [low, high]) to [0, out_max] (a constant image
  maps to 0)."""
  values = values.astype(np.float64)
  low = float(values.min()) if low is None else float(low)
  high = float(values.max()) if high is None else float(high)
  if high <= low:
    return np.zeros(values.shape, np.float64)
  return (values - low) * (out_max / (high - low))


def _to_dtype(values: np.ndarray, out_max: int) -> np.ndarray:
  dtype = np.uint16 if out_max > 255 else np.uint8
  return np.clip(np.rint(values), 0, out_max).astype(dtype)


def _decode_pil(data: bytes, record: str, keep_bit_depth: bool,
                min_size: int = 0) -> tuple[np.ndarray, tuple[int, int]]:
  try:
    with Image.open(io.BytesIO(data)) as pil:
      full_hw = (pil.size[1], pil.size[0])
      if min_size > 0 and pil.format == "JPEG" and reduction_factor(*full_hw, min_size) > 1:
        # DCT scaling: libjpeg picks the largest 1/2^k scale keeping both sides >= the request.
        pil.draft(pil.mode, (min_size, min_size))
      pil.load()  # Decodes now, so a truncated file fails here and not later.
      mode = pil.mode
      if mode == "1":
        pil = pil.convert("L")
      elif mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        pil = pil.convert("RGB")
      factor = reduction_factor(pil.size[1], pil.size[0], min_size)
      reduced_range = None
      if factor > 1 and mode in _HIGH_BIT_DEPTH_MODES:
        # Range of the FULL image for the stretch, box means in float32: all in PIL's C code,
        # without a full-size NumPy copy.
        if pil.mode in ("I;16", "I", "F"):
          reduced_range = pil.getextrema()
          pil = (pil if pil.mode == "F" else pil.convert("F")).reduce(factor)
        else:  # I;16B / I;16L / I;16N: PIL cannot convert them to F.
          values = np.array(pil)
          reduced_range = (values.min(), values.max())
          pil = Image.fromarray(values.astype(np.float32), "F").reduce(factor)
      elif factor > 1 and pil.mode in ("L", "LA", "RGB", "RGBA"):
        pil = pil.reduce(factor)
      image = np.array(pil)
  except Image.DecompressionBombError as e:
    raise BadRecordError(record, f"image too large to decode safely: {e}") from None
  except (OSError, SyntaxError, ValueError) as e:
    # PIL says "cannot identify image file" for garbage and "image file is truncated" /
    # "broken data stream" for cut-off files.
    raise BadRecordError(record, f"corrupt or unsupported image ({type(e).__name__}: {e})") from None
  _check_size(image, record)
  if mode in _HIGH_BIT_DEPTH_MODES:
    if keep_bit_depth and mode != "F":
      if reduced_range is not None:  # Rounded box means.
        return _to_dtype(image, 65535)[:, :, None], full_hw
      return np.clip(image, 0, 65535).astype(np.uint16)[:, :, None], full_hw
    out_max = 65535 if keep_bit_depth else 255
    # With reduction: the stretch of the full image's range applied to the box means (it is
    # linear, so this equals stretching first and reducing after, up to rounding).
    low, high = reduced_range if reduced_range is not None else (None, None)
    return _to_dtype(min_max_to(image, out_max, low, high), out_max)[:, :, None], full_hw
  if image.ndim == 2:
    return image[:, :, None], full_hw
  if image.shape[-1] in (2, 4):  # LA, RGBA: drop alpha.
    image = image[..., :-1]
  if image.shape[-1] not in (1, 3):
    raise BadRecordError(record, f"unsupported channel layout {image.shape} (mode {mode})")
  return np.ascontiguousarray(image), full_hw


def voi_window(values: np.ndarray, center: float, width: float, out_max: int,
               function: str = "LINEAR") -> np.ndarray:
  """DICOM VOI windowing (PS3.3 C.11.2.1.2) of modality values to [0, out_max] (float64).

  Args:
    values: modality values (after rescale slope / intercept).
    center: WindowCenter.
    width: WindowWidth (>= 1 for LINEAR, > 0 otherwise).
    out_max: top of the output range (255 or 65535).
    function: VOILUTFunction: "LINEAR", "LINEAR_EXACT" or "SIGMOID".

  Returns:
    float64 array of the same shape, in [0, out_max].

  Raises:
    ValueError: unknown function or unusable width.
  """
  values = values.astype(np.float64)
  function = (function or "LINEAR").upper()
  if function == "LINEAR":
    if width < 1:
      raise ValueError(f"WindowWidth {width} < 1 is invalid for LINEAR VOI")
    scaled = ((values - (center - 0.5)) / (width - 1) + 0.5) if width > 1 else \
        np.where(values > center - 0.5, 1.0, 0.0)
    return np.clip(scaled, 0.0, 1.0) * out_max
  if function == "LINEAR_EXACT":
    if width <= 0:
      raise ValueError(f"WindowWidth {width} <= 0 is invalid for LINEAR_EXACT VOI")
    return np.clip((values - center) / width + 0.5, 0.0, 1.0) * out_max
  if function == "SIGMOID":
    if width <= 0:
      raise ValueError(f"WindowWidth {width} <= 0 is invalid for SIGMOID VOI")
    return out_max / (1.0 + np.exp(-4.0 * (values - center) / width))
  raise ValueError(f"VOILUTFunction {function!r} unknown; expected LINEAR, LINEAR_EXACT or SIGMOID")


def _first(value) -> float | None:
  """First value of a possibly multi-valued DICOM element (WindowCenter can hold several)."""
  if value is None or isinstance(value, (str, bytes)) and not value.strip():
    return None
  if not isinstance(value, (str, bytes)) and hasattr(value, "__len__"):
    if len(value) == 0:
      return None
    value = value[0]
  try:
    return float(value)
  except (TypeError, ValueError):
    return None


def decode_dicom(data: bytes, record: str, keep_bit_depth: bool = False) -> np.ndarray:
  """Decodes a DICOM file's bytes into the displayed image (see module docstring).

  Args:
    data: the file's bytes.
    record: how to name the record in errors.
    keep_bit_depth: window grayscale into 0..65535 (uint16) instead of 0..255.

  Returns:
    (H, W, 1) or (H, W, 3) uint8 (uint16 with keep_bit_depth for grayscale).

  Raises:
    BadRecordError: not DICOM, no pixel data, undecodable or zero-size pixel data.
  """
  import pydicom  # Imported here: only folders with DICOMs pay for it.
  from pydicom import pixels as dicom_pixels

  try:
    dataset = pydicom.dcmread(io.BytesIO(data), force=True)
  except Exception as e:  # pydicom raises many types for broken headers.
    raise BadRecordError(record, f"unreadable DICOM header ({type(e).__name__}: {e})") from None
  if "PixelData" not in dataset and "FloatPixelData" not in dataset:
    raise BadRecordError(record, "DICOM has no pixel data (PixelData element missing)")
  try:
    rows, columns = int(dataset.get("Rows", 0) or 0), int(dataset.get("Columns", 0) or 0)
  except (TypeError, ValueError):
    rows = columns = 0
  if rows == 0 or columns == 0:
    raise BadRecordError(record, f"zero-size image (Rows={rows}, Columns={columns})")
  try:
    array = dataset.pixel_array  # YBR_* is converted to RGB by pydicom >= 3.
  except Exception as e:
    raise BadRecordError(record, f"cannot decode DICOM pixel data ({type(e).__name__}: {e})") from None
  photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()
  samples = int(dataset.get("SamplesPerPixel", 1) or 1)
  frames = int(dataset.get("NumberOfFrames", 1) or 1)
  if frames > 1:
    array = array[0]  # A 2D pipeline: multi-frame files give their first frame.
  _check_size(array, record)
  out_max = 65535 if keep_bit_depth else 255

  if photometric == "PALETTE COLOR":
    try:
      rgb = dicom_pixels.apply_color_lut(array, dataset)
    except Exception as e:
      raise BadRecordError(record, f"cannot apply the DICOM palette ({type(e).__name__}: {e})") from None
    lut_max = 255 if rgb.dtype == np.uint8 else 65535
    return _to_dtype(rgb.astype(np.float64) * (255 / lut_max), 255)
  if samples == 3 or array.ndim == 3:
    if array.dtype == np.uint8:
      return np.ascontiguousarray(array)
    bits = int(dataset.get("BitsStored", 16) or 16)
    return _to_dtype(array.astype(np.float64) * (255 / (2 ** bits - 1)), 255)

  slope = float(dataset.get("RescaleSlope", 1) or 1)
  intercept = float(dataset.get("RescaleIntercept", 0) or 0)
  values = array.astype(np.float64) * slope + intercept
  center = _first(dataset.get("WindowCenter"))
  width = _first(dataset.get("WindowWidth"))
  function = str(dataset.get("VOILUTFunction", "LINEAR") or "LINEAR")
  windowed = None
  if center is not None and width is not None:
    try:
      windowed = voi_window(values, center, width, out_max, function)
    except ValueError:
      windowed = None  # A broken window: fall back to min-max rather than drop the image.
  if windowed is None:
    windowed = min_max_to(values, out_max)
  if photometric == "MONOCHROME1":
    windowed = out_max - windowed
  return _to_dtype(windowed, out_max)[:, :, None]


def encode_png(image: np.ndarray) -> bytes:
  """Lossless PNG bytes of an (H, W, C) uint8 / uint16 image (uint16 must be 1 channel)."""
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[:, :, 0]
  if image.dtype == np.uint16:
    if image.ndim != 2:
      raise ValueError(f"16-bit PNG must be grayscale, got shape {image.shape}")
    pil = Image.fromarray(image)  # 2D uint16 -> mode I;16.
  elif image.dtype == np.uint8:
    pil = Image.fromarray(image)
  else:
    raise ValueError(f"encode_png expects uint8 or uint16, got {image.dtype}")
  buffer = io.BytesIO()
  pil.save(buffer, format="PNG", compress_level=1)  # Fast; the corpus is read far more often.
  return buffer.getvalue()


def file_extension(path: str) -> str:
  return os.path.splitext(str(path))[1].lower()
