r"""The torchvision DataLoader doing the same SimCLR augmentations, for a side-by-side number.

Not part of the project or its tests: torch is not a dependency. Run it from a separate venv
(the one used for the measurements: `python3 -m venv /tmp/torchbench &&
/tmp/torchbench/bin/pip install torch torchvision pillow numpy`), on the PNG folder the JAX
benchmark writes:

  python -m experiments.benchmarks.input_pipeline --source=folder --write_folder=/tmp/remedis_bench_pngs
  /tmp/torchbench/bin/python experiments/benchmarks/torchvision_baseline.py \
      --root=/tmp/remedis_bench_pngs --image_size=224 --views=2 --num_workers=2

Same work as the `generic` preset: PNG decode (PIL, converted to RGB as ImageFolder does),
per view RandomResizedCrop(size, scale=(0.08, 1)) -> RandomHorizontalFlip ->
RandomApply(ColorJitter(0.8, 0.8, 0.8, 0.2), p=0.8) -> RandomGrayscale(0.2) ->
RandomApply(GaussianBlur(kernel 10% of size, sigma 0.1..2), p=0.5) (`--blur=pil`: the faster
PIL blur many SimCLR / MoCo repos use instead) -> PILToTensor (uint8, the
same output the Grain pipeline gives; ToTensor's float32 would be slower and 4x larger), then
default collation into (B, V, C, H, W). Prints one JSON object per timed repeat and a summary
line with the median, in the same fields as input_pipeline.py.
"""
import argparse
import csv
import json
import os
import statistics
import time

from PIL import Image, ImageFilter
import torch
from torch.utils import data
from torchvision import transforms


class PngFolder(data.Dataset):
  """Images listed in ROOT/manifest.csv (column `path`), each returned as `views` views."""

  def __init__(self, root, manifest, image_column, transform, views):
    with open(manifest) as f:
      self.paths = [os.path.join(root, row[image_column]) for row in csv.DictReader(f)]
    self.transform, self.views = transform, views

  def __len__(self):
    return len(self.paths)

  def __getitem__(self, index):
    with open(self.paths[index], "rb") as f:
      image = Image.open(f).convert("RGB")
    return torch.stack([self.transform(image) for _ in range(self.views)])


class PilGaussianBlur:
  """MoCo v2 / many SimCLR repos' blur: PIL's GaussianBlur with sigma uniform in [0.1, 2]."""

  def __call__(self, image):
    sigma = float(torch.empty(()).uniform_(0.1, 2.0))
    return image.filter(ImageFilter.GaussianBlur(radius=sigma))


def simclr_transform(size, blur="torchvision"):
  kernel = int(0.1 * size) // 2 * 2 + 1  # Odd, 10% of the side (23 at 224).
  blur_op = (transforms.GaussianBlur(kernel, sigma=(0.1, 2.0)) if blur == "torchvision"
             else PilGaussianBlur())
  return transforms.Compose([
      transforms.RandomResizedCrop(size, scale=(0.08, 1.0)),
      transforms.RandomHorizontalFlip(),
      transforms.RandomApply([transforms.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
      transforms.RandomGrayscale(p=0.2),
      transforms.RandomApply([blur_op], p=0.5),
      transforms.PILToTensor(),
  ])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--root", required=True)
  parser.add_argument("--manifest", default="")
  parser.add_argument("--image_column", default="path")
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--views", type=int, default=2)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--num_workers", type=int, default=2)
  parser.add_argument("--seconds", type=float, default=20.0)
  parser.add_argument("--warmup_batches", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--blur", choices=["torchvision", "pil"], default="torchvision",
                      help="torchvision: transforms.GaussianBlur (kernel 10%% of the side, the "
                      "SimCLR spec); pil: PIL ImageFilter.GaussianBlur (MoCo v2 style, faster)")
  args = parser.parse_args()
  manifest = args.manifest or os.path.join(args.root, "manifest.csv")
  dataset = PngFolder(args.root, manifest, args.image_column, simclr_transform(args.image_size, args.blur),
                      args.views)
  common = {"source": "torchvision_folder", "image_size": args.image_size, "views": args.views,
            "batch_size": args.batch_size, "num_workers": args.num_workers, "blur": args.blur,
            "cpus": os.cpu_count(), "torch": torch.__version__, "data": f"{len(dataset)} PNGs"}
  rates = []
  for repeat in range(args.repeats):
    loader = data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                             num_workers=args.num_workers, persistent_workers=False,
                             prefetch_factor=2 if args.num_workers else None)
    iterator = _forever(loader)
    for _ in range(args.warmup_batches):
      next(iterator)
    images, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds:
      images += next(iterator).shape[0]
    elapsed = time.perf_counter() - start
    rates.append(images / elapsed)
    print(json.dumps({**common, "repeat": repeat, "images_per_s": round(images / elapsed, 2),
                      "views_per_s": round(images * args.views / elapsed, 2), "images": images,
                      "elapsed_s": round(elapsed, 2),
                      "load_average_1m": round(os.getloadavg()[0], 2)}), flush=True)
    del iterator
  print(json.dumps({**common, "summary": True, "images_per_s": round(statistics.median(rates), 2),
                    "images_per_s_all": [round(r, 2) for r in rates]}), flush=True)


def _forever(loader):
  while True:
    yield from loader


if __name__ == "__main__":
  main()
