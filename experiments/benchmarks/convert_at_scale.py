r"""Converting large chest X-rays on Beam, and what training reads from the shards; a script.

Generates `--num_images` synthetic `--size` x `--size` radiograph-like 16-bit PNGs (12-bit data,
smooth shading plus detector noise), then in one run:

1. converts them with the single-process converter and with the Beam converter on
   `--workers` worker processes (FnApiRunner, multi_processing), the same shards
   (`--num_shards`, `--decode_size`, 16-bit kept), in `--rounds` ABBA-ordered rounds, and prints
   the wall-clock seconds and the ratio Beam / single process;
2. times the SimCLR pretraining input (cxr preset, two views at `--image_size`, Grain with
   `--read_threads`) on the converted shards (the 16-bit ones, and an 8-bit copy converted on
   Beam as well) and on the raw folder of the same images (read at the folder source's automatic
   decode_size, 2 x image_size), images/s each.

Prints one JSON object per line with os.getloadavg() beside every number: the machine may be
shared, and a busy neighbour slows either side.

  python -m experiments.benchmarks.convert_at_scale --num_images=200 --unique_images=20 \
      --size=2048 --folder=/tmp/remedis_convert_bench

Measured numbers: docs/benchmarks.md ("Converting large images on Beam").
"""
from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import os
import shutil
import statistics
import time

import numpy as np
from PIL import Image

# argparse, not absl: data_pipelines.convert defines absl flags of the same names at import.
_PARSER = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
_PARSER.add_argument("--num_images", type=int, default=200, help="Generated images.")
_PARSER.add_argument("--size", type=int, default=2048, help="Side of the generated images.")
_PARSER.add_argument("--unique_images", type=int, default=0,
                     help="Render only this many (0: all) and copy them to --num_images files: "
                          "rendering a 2048 px image costs more than converting it.")
_PARSER.add_argument("--folder", default="/tmp/remedis_convert_bench",
                     help="Images (reused when present) and outputs go here.")
_PARSER.add_argument("--num_shards", type=int, default=16, help="Shards of the split.")
_PARSER.add_argument("--decode_size", type=int, default=448,
                     help="Stored shorter side >= this (2 x 224).")
_PARSER.add_argument("--workers", type=int, default=2, help="Beam worker processes.")
_PARSER.add_argument("--rounds", type=int, default=1,
                     help="Conversion rounds (single, Beam, then Beam, single, ...).")
_PARSER.add_argument("--image_size", type=int, default=224, help="View size of the recipe.")
_PARSER.add_argument("--read_threads", type=int, default=2, help="Grain read threads.")
_PARSER.add_argument("--seconds", type=float, default=30.0,
                     help="Timed seconds per input pipeline.")
_PARSER.add_argument("--skip_convert", action="store_true",
                     help="Only time the input (the Beam shards exist).")
ARGS = None


def _load() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]


def radiograph_12bit(size: int, seed: int) -> np.ndarray:
  """A (size, size) uint16 image, 0..4095: smooth shading, two darker lung fields, noise.

  Detector noise matters: a noise-free image would compress (and decode) unrealistically fast.
  (decode_large.py has its own generator, but defines flags of the same names at import.)
  """
  rng = np.random.default_rng(seed)
  shading = np.asarray(Image.fromarray(rng.uniform(0.3, 0.7, (10, 10)).astype(np.float32), "F")
                       .resize((size, size), Image.Resampling.BICUBIC))
  y, x = np.ogrid[0:size, 0:size]
  y, x = y / size, x / size
  lungs = sum(np.exp(-(((x - cx) / 0.15) ** 2 + ((y - 0.5) / 0.3) ** 2)) for cx in (0.3, 0.7))
  image = np.clip(shading - 0.3 * lungs + 0.2, 0, 1) * 4095
  image = image + rng.normal(0, 50, (size, size))
  return np.clip(np.rint(image), 0, 4095).astype(np.uint16)


def _write_image(args: tuple[str, int, int]) -> None:
  path, size, seed = args
  # Level 1: as large as level 6 for noisy 16-bit data (5.9 vs 5.7 MB) at a quarter of the time.
  Image.fromarray(radiograph_12bit(size, seed)).save(path, compress_level=1)


def write_folder(folder: str, num_images: int, size: int) -> str:
  """folder/images/*.png (16-bit) + folder/manifest.csv; reused when complete. -> manifest."""
  manifest = os.path.join(folder, "manifest.csv")
  if os.path.isfile(manifest):
    with open(manifest) as f:
      if sum(1 for _ in f) - 1 == num_images:
        return manifest
  os.makedirs(os.path.join(folder, "images"), exist_ok=True)
  names = [f"images/{i:05d}.png" for i in range(num_images)]
  unique = min(num_images, ARGS.unique_images or num_images)
  with multiprocessing.Pool(os.cpu_count()) as pool:
    pool.map(_write_image, [(os.path.join(folder, n), size, i)
                            for i, n in enumerate(names[:unique])])
  for i, name in enumerate(names[unique:], start=unique):  # Copies: files of their own.
    shutil.copyfile(os.path.join(folder, names[i % unique]), os.path.join(folder, name))
  with open(manifest, "w", newline="") as f:
    csv.writer(f).writerows([["path"]] + [[n] for n in names])
  return manifest


def _data_config(folder: str, manifest: str, decode_size: int, keep_bit_depth: bool):
  from data_pipelines.sources import default_data_config  # pylint: disable=g-import-not-at-top
  config = default_data_config()
  config.update(dict(source="folder", root=folder, manifest=manifest, label_columns="",
                     keep_bit_depth=keep_bit_depth, decode_size=decode_size,
                     image_size=ARGS.image_size))
  return config


def time_conversions(folder: str, manifest: str) -> str:
  """ABBA rounds of single-process and Beam conversion; prints each and the ratio."""
  from data_pipelines import convert, convert_beam  # pylint: disable=g-import-not-at-top
  config = _data_config(folder, manifest, ARGS.decode_size, keep_bit_depth=True)
  options = f"direct_num_workers={ARGS.workers},direct_running_mode=multi_processing"
  quiet = lambda line: None
  seconds = {"single_process": [], "beam": []}
  order = []
  for r in range(ARGS.rounds):
    order += ["single_process", "beam"] if r % 2 == 0 else ["beam", "single_process"]
  out = {}
  for kind in order:
    out[kind] = os.path.join(folder, f"shards_{kind}")
    shutil.rmtree(out[kind], ignore_errors=True)
    load_before, start = _load(), time.perf_counter()
    if kind == "beam":
      info = convert_beam.convert_with_beam(config, "train", out[kind], ARGS.num_shards,
                                            pipeline_options=options, log=quiet)
    else:
      info = convert.convert(config, "train", out[kind], ARGS.num_shards, log=quiet)
    elapsed = time.perf_counter() - start
    seconds[kind].append(elapsed)
    print(json.dumps({"convert": kind, "seconds": round(elapsed, 2), "records": info["count"],
                      "bytes": sum(r["bytes"] for r in info["shard_reports"]),
                      "writers": len({r["writer"] for r in info["shard_reports"]}),
                      "load_before": load_before, "load_after": _load()}), flush=True)
  single, beam = statistics.median(seconds["single_process"]), statistics.median(seconds["beam"])
  print(json.dumps({"summary": "convert", "images": ARGS.num_images, "size": ARGS.size,
                    "num_shards": ARGS.num_shards, "workers": ARGS.workers,
                    "single_process_s": round(single, 2), "beam_s": round(beam, 2),
                    "beam_over_single": round(beam / single, 3), "cpus": os.cpu_count(),
                    "load": _load()}), flush=True)
  return out["beam"]


def time_input(source, seed: int = 0) -> dict[str, float]:
  """Images/s of the SimCLR pretraining input (cxr preset, 2 views) over `source`."""
  from data_pipelines import pipeline, presets, stream  # pylint: disable=g-import-not-at-top
  options = stream.StreamOptions(seed=seed, shard_index=0, shard_count=1, worker_count=0,
                                 read_threads=ARGS.read_threads)
  dataset = pipeline.make_pretrain_dataset(
      source, batch_size=16, ops=presets.get_preset("cxr", "pretrain", ARGS.image_size),
      options=options, num_views=2)
  iterator = iter(dataset)
  next(iterator)  # Warm-up: threads started, first files opened.
  images, load_before, start = 0, _load(), time.perf_counter()
  while time.perf_counter() - start < ARGS.seconds:
    images += next(iterator)["views"].shape[0]
  elapsed = time.perf_counter() - start
  iterator.close()
  return {"images_per_s": round(images / elapsed, 2), "images": images,
          "seconds": round(elapsed, 1), "load_before": load_before, "load_after": _load()}


def main() -> None:
  global ARGS
  ARGS = _PARSER.parse_args()
  # pylint: disable=g-import-not-at-top
  from data_pipelines.sources import FolderSource, resolve_decode_size
  from data_pipelines.sources.array_record import ArrayRecordSource
  # pylint: enable=g-import-not-at-top
  folder = ARGS.folder
  start = time.perf_counter()
  manifest = write_folder(folder, ARGS.num_images, ARGS.size)
  print(json.dumps({"images_ready_s": round(time.perf_counter() - start, 1),
                    "folder": folder}), flush=True)
  shards = (os.path.join(folder, "shards_beam") if ARGS.skip_convert
            else time_conversions(folder, manifest))
  # Shards for training alone need no 16-bit data (the readers stretch it to 8 bits): an 8-bit
  # copy, converted on Beam too, decodes faster.
  shards_8bit = os.path.join(folder, "shards_beam_8bit")
  if not ARGS.skip_convert:
    from data_pipelines import convert_beam  # pylint: disable=g-import-not-at-top
    convert_beam.convert_with_beam(
        _data_config(folder, manifest, ARGS.decode_size, keep_bit_depth=False), "train",
        shards_8bit, ARGS.num_shards, log=lambda line: None,
        pipeline_options=f"direct_num_workers={ARGS.workers},"
                         "direct_running_mode=multi_processing")
  # What training reads: the shards (16-bit stretched to 8-bit at read, as the folder source
  # does; and the 8-bit copy), and the raw folder at the automatic decode_size (2 x image_size).
  from_shards = ArrayRecordSource(shards, "train")
  raw_size = resolve_decode_size(_data_config(folder, manifest, -1, False))
  raw = FolderSource(folder, manifest, label_columns="", decode_size=raw_size)
  rates = {}
  for name, source in (("shards", from_shards), ("shards_8bit", ArrayRecordSource(
      shards_8bit, "train")), ("folder", raw)):
    rates[name] = time_input(source)
    print(json.dumps({"input": name, "records": len(source), "image_size": ARGS.image_size,
                      "views": 2, **rates[name]}), flush=True)
  folder_rate = rates["folder"]["images_per_s"]
  print(json.dumps({"summary": "input",
                    "shards_over_folder": round(rates["shards"]["images_per_s"] / folder_rate, 2),
                    "shards_8bit_over_folder": round(
                        rates["shards_8bit"]["images_per_s"] / folder_rate, 2),
                    "stored_shape": list(from_shards[0]["image"].shape),
                    "folder_decode_size": raw_size, "load": _load()}), flush=True)


if __name__ == "__main__":
  main()
