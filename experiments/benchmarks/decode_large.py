r"""Decoding large images: full resolution vs reduced size (`data.decode_size`); a script.

Generates `--num_images` synthetic 2000 x 2000 grayscale radiograph-like images (smooth
anatomy-like shading plus detector noise, so they compress like real exports) in a temporary
folder as 8-bit PNG, 16-bit PNG (12-bit data) and JPEG (quality 95), then times
`data_pipelines.decode.read_image` on every file, at full resolution and with
`min_size=--decode_size` (the folder source's default is 2 x data.image_size = 448 px at
224 px). Also times decode + the two augmented views of the pretraining recipe
(`--preset`, `--image_size`), which is what one record costs the input pipeline. Prints one JSON
object per line: per format and timing, for full and reduced decoding the median over
`--repeats` interleaved passes of ms/image (CPU time of the process, steadier on a shared
machine, and wall-clock), the decoded shape and the file size.

  python -m experiments.benchmarks.decode_large
  python -m experiments.benchmarks.decode_large --num_images=16 --size=2000 --decode_size=448

One core, page cache warm (files are read once before timing); single passes vary with the
machine's load, hence the median.

Measured numbers: docs/benchmarks.md ("Decoding large images at reduced size").
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from typing import Any

from absl import app
from absl import flags
import numpy as np
from PIL import Image

_NUM_IMAGES = flags.DEFINE_integer("num_images", 16, "Images per format.")
_SIZE = flags.DEFINE_integer("size", 2000, "Side of the generated square images in pixels.")
_DECODE_SIZE = flags.DEFINE_integer("decode_size", 448, "min_size of the reduced decode.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "View size of the augmentation recipe.")
_PRESET = flags.DEFINE_string("preset", "cxr", "Augmentation preset for the decode+views timing.")
_VIEWS = flags.DEFINE_integer("views", 2, "Augmented views per image.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed passes over the images (median reported).")
_FOLDER = flags.DEFINE_string("folder", "", "Write the images here (kept); default a temp dir.")


def synthetic_radiograph(size: int, seed: int, bits: int = 8) -> np.ndarray:
  """A smooth (size, size) image with detector-like noise, 0..2**bits - 1 (uint8 / uint16)."""
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(0.2, 0.8, (12, 12)).astype(np.float32)
  shading = np.asarray(Image.fromarray(coarse, "F").resize((size, size), Image.Resampling.BICUBIC))
  y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
  lungs = np.exp(-(((x - 0.32) / 0.14) ** 2 + ((y - 0.5) / 0.3) ** 2)) + np.exp(
      -(((x - 0.68) / 0.14) ** 2 + ((y - 0.5) / 0.3) ** 2))
  image = np.clip(0.6 * shading - 0.35 * lungs + 0.3, 0, 1)
  top = 2 ** bits - 1
  noisy = image * top + rng.normal(0, 0.012 * top, image.shape)
  return np.clip(np.rint(noisy), 0, top).astype(np.uint8 if bits == 8 else np.uint16)


def write_images(folder: str, num_images: int, size: int) -> dict[str, list[str]]:
  """{format: paths}: PNG 8-bit, PNG 16-bit (12-bit data) and JPEG q95 of the same images."""
  paths = {"png8": [], "png16": [], "jpeg": []}
  for index in range(num_images):
    image8 = synthetic_radiograph(size, index)
    image16 = synthetic_radiograph(size, index, bits=12).astype(np.uint16)
    for kind, array, extension, options in (("png8", image8, "png", {}),
                                            ("png16", image16, "png", {}),
                                            ("jpeg", image8, "jpg", {"quality": 95})):
      path = os.path.join(folder, f"{kind}_{index:03d}.{extension}")
      if not os.path.isfile(path):
        Image.fromarray(array).save(path, **options)
      paths[kind].append(path)
  return paths


def time_pass(paths: list[str], min_size: int, ops=None, views: int = 0) -> dict[str, Any]:
  """ms/image of one pass (decode, plus `views` augmented views when `ops` is given).

  Returns wall-clock and CPU (this process) ms/image; on a shared machine the CPU time is the
  steadier of the two.
  """
  from data_pipelines import decode, ops as ops_lib  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  shape = None
  start, cpu_start = time.perf_counter(), time.process_time()
  for path in paths:
    image = decode.read_image(path, min_size=min_size)
    shape = image.shape
    for _ in range(views):
      ops_lib.apply_ops(ops, {"image": image}, rng)
  return {"wall_ms": (time.perf_counter() - start) * 1000 / len(paths),
          "cpu_ms": (time.process_time() - cpu_start) * 1000 / len(paths), "shape": list(shape)}


def main(argv: list[str]) -> None:
  del argv
  from data_pipelines import presets  # pylint: disable=g-import-not-at-top
  folder = _FOLDER.value or tempfile.mkdtemp(prefix="remedis_decode_large_")
  os.makedirs(folder, exist_ok=True)
  paths = write_images(folder, _NUM_IMAGES.value, _SIZE.value)
  ops = presets.get_preset(_PRESET.value, "pretrain", _IMAGE_SIZE.value)
  for kind, files in paths.items():
    for path in files:  # Warm the page cache: the timing is decoding, not the disk.
      with open(path, "rb") as f:
        f.read()
    megabytes = sum(os.path.getsize(p) for p in files) / len(files) / 2 ** 20
    for what, views in (("decode", 0), ("decode+views", _VIEWS.value)):
      passes = {"full": [], "reduced": []}
      for _ in range(_REPEATS.value):  # Interleaved, so a change of load hits both modes.
        passes["full"].append(time_pass(files, 0, ops, views))
        passes["reduced"].append(time_pass(files, _DECODE_SIZE.value, ops, views))
      line = {"format": kind, "timing": what, "images": len(files), "size": _SIZE.value,
              "file_mb": round(megabytes, 2), "decode_size": _DECODE_SIZE.value, "views": views,
              "preset": _PRESET.value if views else None}
      for mode, results in passes.items():
        line[f"{mode}_shape"] = results[0]["shape"]
        for key in ("cpu_ms", "wall_ms"):
          line[f"{mode}_{key}_per_image"] = round(statistics.median(r[key] for r in results), 1)
      line["speedup_cpu"] = round(line["full_cpu_ms_per_image"]
                                  / max(line["reduced_cpu_ms_per_image"], 1e-9), 2)
      line.update(cpus=os.cpu_count(), load_average_1m=round(os.getloadavg()[0], 2))
      print(json.dumps(line), flush=True)

if __name__ == "__main__":
  app.run(main)
