"""The accelerator benchmark's input-pipeline item: the host's Grain pretraining pipeline on PNGs
(experiments/benchmarks/accelerator.py runs it and sets it against the step's demand)."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from typing import Any, Callable

from experiments.benchmarks.accelerator_common import load_config


def _write_png_folder(folder: str, num_images: int, size: int) -> str:
  """Grayscale PNGs rendered from the built-in synthetic CXR source + manifest.csv."""
  import csv  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from data_pipelines.sources import SyntheticCXR  # pylint: disable=g-import-not-at-top
  source = SyntheticCXR("unlabeled", num_examples=num_images, image_size=size)
  os.makedirs(os.path.join(folder, "images"), exist_ok=True)
  paths = []
  for index in range(num_images):
    path = f"images/{index:05d}.png"
    Image.fromarray(source[index]["image"][..., 0]).save(os.path.join(folder, path))
    paths.append(path)
  manifest = os.path.join(folder, "manifest.csv")
  with open(manifest, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["path"])
    writer.writerows([p] for p in paths)
  return manifest


def run_grain_item(spec: dict[str, Any], emit: Callable[[dict[str, Any]], None]) -> None:
  """Images/s of the pretraining input pipeline on this host's CPU cores."""
  from data_pipelines import pipeline, presets, stream  # pylint: disable=g-import-not-at-top
  from data_pipelines.sources import FolderSource  # pylint: disable=g-import-not-at-top
  config = load_config(spec["config"])
  size = int(spec.get("image_size") or config.data.image_size)
  source_size = int(spec.get("source_size") or round(size * 8 / 7))
  workers = int(spec["workers"])
  threads = int(spec.get("read_threads") or (1 if workers else max(os.cpu_count() or 1, 1)))
  batch = int(spec["batch"])
  record = {"image_size": size, "source_size": source_size, "num_images": spec["num_images"],
            "preset": config.data.preset, "views": 2, "global_batch": batch,
            "worker_count": workers, "read_threads": threads, "cpus": os.cpu_count(),
            "source": "grayscale PNG folder (synthetic CXR renders), decoded by FolderSource",
            "num_channels": config.data.num_channels}
  with tempfile.TemporaryDirectory(prefix="accelerator_pngs_") as folder:
    start = time.perf_counter()
    manifest = _write_png_folder(folder, int(spec["num_images"]), source_size)
    record["write_pngs_s"] = round(time.perf_counter() - start, 3)
    source = FolderSource(folder, manifest, image_column="path", label_columns="",
                          num_channels=1)
    ops = presets.get_preset(config.data.preset, "pretrain", size)
    options = stream.StreamOptions(seed=0, shard_index=0, shard_count=1,
                                   num_channels=config.data.num_channels, worker_count=workers,
                                   read_threads=threads)
    dataset = pipeline.make_pretrain_dataset(source, batch_size=batch, ops=ops, options=options,
                                             num_views=2)
    iterator = iter(dataset)
    start = time.perf_counter()
    for _ in range(int(spec["warmup_batches"])):
      views = next(iterator)["views"]
    record["startup_s"] = round(time.perf_counter() - start, 3)
    pairs, batches = 0, 0
    cpu_start, start = time.process_time(), time.perf_counter()
    while (time.perf_counter() - start < float(spec["seconds"])
           or batches < int(spec["min_batches"])):
      views = next(iterator)["views"]
      pairs += views.shape[0]
      batches += 1
    elapsed = time.perf_counter() - start
    record["main_process_cpu_s"] = round(time.process_time() - cpu_start, 3)
    with contextlib.suppress(Exception):
      iterator.close()
  record.update({"status": "ok", "batches": batches, "elapsed_s": round(elapsed, 3),
                 "views_shape": list(views.shape), "views_dtype": str(views.dtype),
                 "pairs_per_s": pairs / elapsed, "images_per_s": 2 * pairs / elapsed})
  with contextlib.suppress(Exception):
    record["load_average_1m"] = round(os.getloadavg()[0], 2)
  emit(record)
