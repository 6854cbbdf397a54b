"""The accelerator benchmark's JAX item: the project's SimCLR update step, timed on the device
(experiments/benchmarks/accelerator.py runs it, one configuration per process)."""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from typing import Any, Callable

from experiments.benchmarks.accelerator_common import load_config, xla_flops


def run_jax_item(spec: dict[str, Any], emit: Callable[[dict[str, Any]], None]) -> None:
  """One configuration of the project's SimCLR update step: one record."""
  import jax  # pylint: disable=g-import-not-at-top
  from experiments.benchmarks import train_step  # pylint: disable=g-import-not-at-top
  from remedis_jax import sharding, train_simclr  # pylint: disable=g-import-not-at-top

  config = load_config(spec["config"])
  devices = jax.device_count()
  config.model.dtype = spec["dtype"]
  config.model.remat = bool(spec["remat"])
  config.batch_size = int(spec["batch"]) * devices
  if spec.get("image_size"):
    config.data.image_size = int(spec["image_size"])
  device = jax.devices()[0]
  record = {
      "model": config.model.name, "stem": config.model.get("stem", "bit"),
      "image_size": config.data.image_size, "dtype": config.model.dtype,
      "remat": config.model.remat, "per_device_batch": int(spec["batch"]),
      "global_batch": config.batch_size, "views": 2, "devices": devices,
      "platform": device.platform, "device_kind": device.device_kind,
      "jax_version": jax.__version__,
      "optimizer": config.optimizer.name,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }
  with contextlib.suppress(Exception):  # a config attribute that may move between versions
    record["default_matmul_precision"] = str(jax.config.jax_default_matmul_precision)

  start = time.perf_counter()
  mesh, setup, batch = train_step._setup(config)  # pylint: disable=protected-access
  state = sharding.create_sharded(setup.init_state, jax.random.key(0),
                                  shardings=setup.state_shardings)
  jax.block_until_ready(state)
  record["init_s"] = round(time.perf_counter() - start, 3)

  start = time.perf_counter()
  lowered = setup.update_fn.lower(state, batch)
  record["lower_s"] = round(time.perf_counter() - start, 3)
  start = time.perf_counter()
  compiled = lowered.compile()
  record["compile_s"] = round(time.perf_counter() - start, 3)

  # Model FLOPs: the step without remat (recompute is not model work); global over devices.
  model_flops = spec.get("model_flops_per_step")
  flops_source = "plan: lowered HLO of the same step without remat"
  if not model_flops:
    if not config.model.remat:
      model_flops, flops_source = xla_flops(lowered), "lowered HLO (no remat)"
    else:
      plain = config.copy_and_resolve_references()
      plain.model.remat = False  # same parameters and state: lower it on this state and batch
      plain_setup = train_simclr.create_train_setup(  # as train_step._setup builds it
          plain, mesh, num_classes=0, multi_label=False, total_steps=1000, warmup_steps=10)
      model_flops = xla_flops(plain_setup.update_fn.lower(state, batch))
      flops_source = "lowered HLO of the same step without remat"
  compiled_flops = xla_flops(compiled)
  if not model_flops and compiled_flops and not config.model.remat:
    model_flops, flops_source = compiled_flops * devices, "compiled HLO x devices"
  record["flops_per_step"] = model_flops
  record["flops_source"] = flops_source if model_flops else "unavailable"
  record["compiled_flops_per_step"] = compiled_flops
  record["flops_per_image"] = model_flops / (2 * config.batch_size) if model_flops else None
  with contextlib.suppress(Exception):  # memory_analysis() may be missing on a backend
    record.update({f"xla_{k}": v for k, v in
                   train_step._memory(compiled).items()})  # pylint: disable=protected-access

  for _ in range(max(int(spec["warmup"]), 1)):  # at least one: the first run loads the program
    state, metrics = compiled(state, batch)
  jax.block_until_ready(state)
  times = []
  for _ in range(int(spec["steps"])):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - start)
  del metrics
  median = statistics.median(times)
  record.update({
      "steps": len(times), "median_step_s": median, "min_step_s": min(times),
      "max_step_s": max(times), "images_per_s": 2 * config.batch_size / median,
      "pairs_per_s": config.batch_size / median,
      "state_step": int(jax.device_get(state.step)),
  })
  record["tflops_per_s"] = model_flops / median / 1e12 if model_flops else None
  record["compiled_tflops_per_s"] = compiled_flops / median / 1e12 if compiled_flops else None
  peak = float(spec.get("peak_tflops") or 0.0) or next(
      (v for k, v in train_step.PEAK_TFLOPS.items() if k in device.device_kind), 0.0)
  record["peak_tflops_per_device"] = peak or None
  record["mfu"] = (record["tflops_per_s"] / (peak * devices)
                   if peak and record["tflops_per_s"] else None)
  record["hfu"] = (record["compiled_tflops_per_s"] / peak
                   if peak and record["compiled_tflops_per_s"] else None)
  stats = None
  with contextlib.suppress(Exception):
    stats = device.memory_stats()
  stats = stats or {}
  record["peak_bytes_in_use"] = stats.get("peak_bytes_in_use")
  record["bytes_limit"] = stats.get("bytes_limit")
  record["peak_bytes_scope"] = spec.get("peak_bytes_scope", "this item's process")
  if record["peak_bytes_in_use"] is None:
    record["peak_bytes_scope"] = f"unavailable (memory_stats() on {device.platform})"
  del state, batch, compiled, lowered
  emit(record)
