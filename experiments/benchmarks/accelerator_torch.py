"""The accelerator benchmark's PyTorch peer: the same SimCLR step in timm + PyTorch, eager and
compiled (experiments/benchmarks/accelerator.py runs it; skipped without torch/timm)."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable


def run_torch_item(spec: dict[str, Any], emit: Callable[[dict[str, Any]], None]) -> None:
  """The PyTorch peer step: eager, then torch.compile'd (when enabled); one record each."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    from torch import nn  # pylint: disable=g-import-not-at-top
    from torch.nn import functional as F  # pylint: disable=g-import-not-at-top
    import timm  # pylint: disable=g-import-not-at-top
  except Exception as e:  # pylint: disable=broad-except
    emit({"status": "skipped", "reason": f"torch/timm not importable: {e!r}"})
    return
  cuda = torch.cuda.is_available()
  if not cuda and not spec.get("allow_cpu"):
    emit({"status": "skipped", "torch_version": torch.__version__,
          "reason": "no CUDA device (torch.cuda.is_available() is False)"})
    return
  device = torch.device("cuda" if cuda else "cpu")
  torch.manual_seed(0)
  if cuda:
    torch.backends.cudnn.benchmark = True
  batch, size = int(spec["batch"]), int(spec["image_size"])
  hidden, projection = tuple(spec["head_hidden_dims"]), int(spec["projection_dim"])
  temperature = float(spec["temperature"])

  def layer_norm(width, bias=True):
    try:
      return nn.LayerNorm(width, bias=bias)
    except TypeError:  # torch < 2.1: no `bias` argument
      return nn.LayerNorm(width)

  if hasattr(timm, "is_model") and not timm.is_model(spec["model"]):
    emit({"status": "skipped", "reason": f"timm {timm.__version__} has no model "
                                         f"{spec['model']!r}"})
    return
  layers = []
  encoder = timm.create_model(spec["model"], pretrained=False, num_classes=0)
  width = encoder.num_features
  for h in hidden:  # the project's ProjectionHead: Dense(no bias) -> LayerNorm -> ReLU
    layers += [nn.Linear(width, h, bias=False), layer_norm(h), nn.ReLU()]
    width = h
  layers += [nn.Linear(width, projection, bias=False), layer_norm(projection, bias=False)]
  net = nn.Sequential(encoder, nn.Sequential(*layers)).to(device,
                                                          memory_format=torch.channels_last)
  params = list(net.parameters())
  try:
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-6, fused=cuda)
    optimizer_name = "SGD(momentum=0.9, fused)" if cuda else "SGD(momentum=0.9)"
  except (TypeError, RuntimeError):
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-6)
    optimizer_name = "SGD(momentum=0.9)"
  # Two views per pair, interleaved (pair i: rows 2i, 2i+1), uint8 as the pipeline delivers.
  views = torch.randint(0, 256, (2 * batch, 3, size, size), dtype=torch.uint8, device=device)
  views = views.contiguous(memory_format=torch.channels_last)
  targets = torch.cat([torch.arange(batch, 2 * batch), torch.arange(0, batch)]).to(device)
  self_mask = torch.eye(2 * batch, dtype=torch.bool, device=device)

  def loss_fn(images_u8):
    images = images_u8.float() * (1.0 / 127.5) - 1.0  # the BiT [-1, 1] normalisation
    with torch.autocast(device.type, dtype=torch.bfloat16):
      z = net(images)
    z = z.float().view(batch, 2, -1)
    z = F.normalize(torch.cat([z[:, 0], z[:, 1]]), dim=1)
    logits = (z @ z.t()) / temperature
    logits = logits.masked_fill(self_mask, float("-inf"))
    return F.cross_entropy(logits, targets)  # NT-Xent over the 2N anchors

  def sync():
    if cuda:
      torch.cuda.synchronize()

  base = {"model": spec["model"], "image_size": size, "dtype": "bfloat16 autocast",
          "per_device_batch": batch, "global_batch": batch, "views": 2, "devices": 1,
          "platform": device.type,
          "device_kind": torch.cuda.get_device_name(0) if cuda else "cpu",
          "torch_version": torch.__version__, "timm_version": timm.__version__,
          "channels_last": True, "optimizer": optimizer_name}
  for mode in spec["modes"]:
    step_loss = torch.compile(loss_fn) if mode == "compile" else loss_fn

    def step():
      optimizer.zero_grad(set_to_none=True)
      loss = step_loss(views)
      loss.backward()
      optimizer.step()
      return loss

    record = dict(base, mode=mode, name_suffix=mode)
    try:
      if cuda:
        torch.cuda.reset_peak_memory_stats()
      start = time.perf_counter()
      loss = step()
      sync()
      record["compile_s"] = round(time.perf_counter() - start, 3)  # first step (+ compile)
      for _ in range(max(int(spec["warmup"]), 1)):
        step()
      sync()
      times = []
      for _ in range(int(spec["steps"])):
        start = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - start)
      median = statistics.median(times)
      record.update({
          "status": "ok", "steps": len(times), "median_step_s": median,
          "min_step_s": min(times), "max_step_s": max(times),
          "images_per_s": 2 * batch / median, "pairs_per_s": batch / median,
          "loss": float(loss.detach().float().cpu()),
          "peak_bytes_in_use": int(torch.cuda.max_memory_allocated()) if cuda else None,
          "peak_bytes_scope": ("torch.cuda.max_memory_allocated, reset per mode" if cuda
                               else "unavailable (cpu)")})
    except Exception as e:  # pylint: disable=broad-except
      record.update({"status": "error", "reason": f"{type(e).__name__}: {e}"[:2000]})
    emit(record)  # at once: a compile killed at the deadline keeps the eager number
