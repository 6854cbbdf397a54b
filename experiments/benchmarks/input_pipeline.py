r"""Input-pipeline throughput: what the pretraining step receives per second (a script, not a test).

Measures `make_pretrain_dataset` end to end (read/decode + `views` augmented views per image
+ batching, uint8 out) and prints one JSON object per line: one per timed repeat, then a
summary line with the median (`"summary": true`). `images_per_s` counts SOURCE images per
second, each delivered as `views` augmented views.

  # Built-in synthetic CXR source (rendered on the fly, no files):
  python -m experiments.benchmarks.input_pipeline --source=synthetic --image_size=224 --views=2
  # A folder of PNGs + CSV manifest; without --root a temporary folder is generated from the
  # synthetic source (--write_folder keeps it, e.g. for the torchvision baseline):
  python -m experiments.benchmarks.input_pipeline --source=folder --image_size=224 --views=2 \
      --write_folder=/tmp/remedis_bench_pngs
  python -m experiments.benchmarks.input_pipeline --source=folder --root=DIR \
      --manifest=DIR/manifest.csv --image_column=path

Side by side with torchvision (a separate venv with torch; see torchvision_baseline.py):
  /tmp/torchbench/bin/python experiments/benchmarks/torchvision_baseline.py \
      --root=/tmp/remedis_bench_pngs --image_size=224 --views=2 --num_workers=2

Measured numbers: docs/benchmarks.md ("Input pipeline vs torchvision").
"""
from __future__ import annotations

import csv
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

_SOURCE = flags.DEFINE_enum("source", "synthetic", ["synthetic", "folder"], "Which source to read.")
_ROOT = flags.DEFINE_string("root", "", "folder: image root; empty = generate PNGs.")
_MANIFEST = flags.DEFINE_string("manifest", "", "folder: CSV manifest (default ROOT/manifest.csv).")
_IMAGE_COLUMN = flags.DEFINE_string("image_column", "path", "folder: manifest column of paths.")
_WRITE_FOLDER = flags.DEFINE_string(
    "write_folder", "", "folder without --root: write the PNGs here (kept) instead of a temp dir.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Output view side in pixels.")
_SOURCE_SIZE = flags.DEFINE_integer(
    "source_size", 0, "Side of the generated source images (0: image_size * 8 / 7, 256 for 224).")
_SOURCE_CHANNELS = flags.DEFINE_integer(
    "source_channels", 3, "Channels of the source images: 3 (RGB, so colour ops do full work, as "
    "torchvision's ImageFolder always does) or 1 (grayscale).")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 512, "Records in the generated source.")
_VIEWS = flags.DEFINE_integer("views", 2, "Augmented views per image.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Per-process batch size.")
_PRESET = flags.DEFINE_string("preset", "generic", "Augmentation preset (data_pipelines/presets.py).")
_WORKER_COUNT = flags.DEFINE_integer("worker_count", 0, "Grain worker processes.")
_READ_THREADS = flags.DEFINE_integer("read_threads", 2, "Reader/augmentation threads per process.")
_SECONDS = flags.DEFINE_float("seconds", 20.0, "Timed seconds per repeat.")
_WARMUP_BATCHES = flags.DEFINE_integer("warmup_batches", 3, "Untimed batches first.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats (the summary reports the median).")


class _WithChannels:
  """A source whose images are converted to `num_channels` (picklable for worker processes)."""

  def __init__(self, source: Any, num_channels: int):
    self._source, self._num_channels = source, num_channels

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    from data_pipelines.ops import set_channels  # pylint: disable=g-import-not-at-top
    record = dict(self._source[index])
    record["image"] = set_channels(record["image"], self._num_channels)
    return record


def _tint(image: np.ndarray, index: int) -> np.ndarray:
  """Grey (H, W, 1) -> a tinted RGB image, so hue and saturation are not trivially zero."""
  gains = np.array([1.0, 0.85 + 0.1 * (index % 3), 0.7 + 0.05 * (index % 5)], np.float32)
  return np.clip(image.astype(np.float32) * gains, 0, 255).astype(np.uint8)


def write_png_folder(folder: str, num_images: int, size: int, channels: int) -> str:
  """Renders `num_images` synthetic CXRs into folder/images/*.png + folder/manifest.csv.

  Returns:
    The manifest path.
  """
  from data_pipelines.sources import SyntheticCXR  # pylint: disable=g-import-not-at-top
  manifest = os.path.join(folder, "manifest.csv")
  if os.path.isfile(manifest):
    with open(manifest) as f:
      if sum(1 for _ in f) - 1 >= num_images:
        return manifest  # Reuse an existing folder.
  os.makedirs(os.path.join(folder, "images"), exist_ok=True)
  source = SyntheticCXR("train", num_examples=num_images, image_size=size, task="any_finding")
  rows = []
  for index in range(num_images):
    record = source[index]
    image = record["image"]
    image = _tint(image, index) if channels == 3 else image[..., 0]
    path = f"images/{index:05d}.png"
    Image.fromarray(image).save(os.path.join(folder, path))
    rows.append({"path": path, "label": int(record["label"])})
  with open(manifest, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=["path", "label"])
    writer.writeheader()
    writer.writerows(rows)
  return manifest


def build_benchmark_source(source_size: int) -> tuple[Any, str]:
  """The source named by the flags, and a short description of it."""
  from data_pipelines.sources import FolderSource, SyntheticCXR  # pylint: disable=g-import-not-at-top
  channels = _SOURCE_CHANNELS.value
  if _SOURCE.value == "synthetic":
    source = SyntheticCXR("unlabeled", num_examples=_NUM_IMAGES.value, image_size=source_size)
    return _WithChannels(source, channels), f"SyntheticCXR {source_size}px x{channels}ch"
  root = _ROOT.value
  if not root:
    root = _WRITE_FOLDER.value or tempfile.mkdtemp(prefix="remedis_bench_pngs_")
    manifest = write_png_folder(root, _NUM_IMAGES.value, source_size, channels)
  else:
    manifest = _MANIFEST.value or os.path.join(root, "manifest.csv")
  source = FolderSource(root, manifest, image_column=_IMAGE_COLUMN.value, label_columns="",
                        num_channels=channels)
  return source, f"{len(source)} PNGs in {root} x{channels}ch"


def time_pipeline(source: Any, ops: Any, seconds: float, seed: int) -> dict[str, float]:
  """Iterates a fresh pretraining pipeline for `seconds` after a warm-up; returns rates."""
  from data_pipelines import pipeline, stream  # pylint: disable=g-import-not-at-top
  options = stream.StreamOptions(seed=seed, shard_index=0, shard_count=1,
                                 worker_count=_WORKER_COUNT.value,
                                 read_threads=_READ_THREADS.value)
  dataset = pipeline.make_pretrain_dataset(source, batch_size=_BATCH_SIZE.value, ops=ops,
                                           options=options, num_views=_VIEWS.value)
  iterator = iter(dataset)
  for _ in range(_WARMUP_BATCHES.value):
    next(iterator)
  images, start = 0, time.perf_counter()
  cpu_start = time.process_time()
  while time.perf_counter() - start < seconds:
    batch = next(iterator)
    images += batch["views"].shape[0]
  elapsed = time.perf_counter() - start
  cpu = time.process_time() - cpu_start
  iterator.close()
  return {"images_per_s": images / elapsed, "views_per_s": images * _VIEWS.value / elapsed,
          "images": images, "elapsed_s": elapsed, "main_process_cpu_s": cpu}


def main(argv: list[str]) -> None:
  del argv
  from data_pipelines import presets  # pylint: disable=g-import-not-at-top
  source_size = _SOURCE_SIZE.value or round(_IMAGE_SIZE.value * 8 / 7)
  source, description = build_benchmark_source(source_size)
  ops = presets.get_preset(_PRESET.value, "pretrain", _IMAGE_SIZE.value)
  common = {"source": _SOURCE.value, "image_size": _IMAGE_SIZE.value, "views": _VIEWS.value,
            "source_size": source_size, "source_channels": _SOURCE_CHANNELS.value,
            "preset": _PRESET.value, "batch_size": _BATCH_SIZE.value,
            "worker_count": _WORKER_COUNT.value, "read_threads": _READ_THREADS.value,
            "cpus": os.cpu_count(), "data": description}
  rates = []
  for repeat in range(_REPEATS.value):
    result = time_pipeline(source, ops, _SECONDS.value, seed=repeat)
    rates.append(result["images_per_s"])
    print(json.dumps({**common, "repeat": repeat, **{k: round(v, 2) for k, v in result.items()},
                      "load_average_1m": round(os.getloadavg()[0], 2)}), flush=True)
  print(json.dumps({**common, "summary": True, "images_per_s": round(statistics.median(rates), 2),
                    "images_per_s_all": [round(r, 2) for r in rates]}), flush=True)


if __name__ == "__main__":
  app.run(main)
