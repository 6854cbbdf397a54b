r"""Speed and memory of the SimCLR train step, printed as JSON lines.

  python -m experiments.benchmarks.train_step --config=configs/pretrain_simclr.py:tiny
  python -m experiments.benchmarks.train_step --config=configs/pretrain_simclr.py:r50x1 \
      --config.batch_size=8 --mode=memory            # remat on/off peak memory, compile only

Modes:
  step    compile time, median step time, images/s, XLA memory analysis of the bare jitted
          update step on random uint8 views; model FLOPs per step (XLA cost analysis) and, with
          --peak_tflops or a known accelerator, model-FLOPs utilisation.
  loop    the full training loop (`train_and_evaluate`: metrics, logging every
          config.log_every_steps, progress, host-to-device) against the bare step of the same
          model and batch, once fed from cached batches (the loop's own overhead) and once from
          the real input pipeline (on a CPU host its augmentation threads share the cores).
  memory  remat off vs on: activation bytes saved for the backward pass (jax.vjp residuals
          under eval_shape) and XLA's compiled peak (XLA:CPU hoists the recompute, so only
          the first number shows remat on CPU).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from remedis_jax import checkpointing, losses, sharding, train_simclr, writers

config_flags.DEFINE_config_file("config", "configs/pretrain_simclr.py:tiny", "Config file.",
                                lock_config=True)
flags.DEFINE_enum("mode", "step", ["step", "loop", "memory", "all"], "What to measure.")
flags.DEFINE_integer("steps", 20, "Timed steps (after warm-up).")
flags.DEFINE_integer("repeats", 3, "loop mode: interleaved bare/loop measurements.")
flags.DEFINE_float("peak_tflops", 0.0, "Accelerator peak TFLOP/s for MFU (0: from device kind).")
FLAGS = flags.FLAGS

# Dense bf16 peak TFLOP/s (vendor numbers, no sparsity) by jax device_kind substring.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "TPU v4": 275.0, "TPU v5 lite": 197.0,
               "TPU v5p": 459.0, "TPU v6": 918.0}


def _emit(record):
  print(json.dumps(record), flush=True)


def _setup(config):
  mesh = sharding.make_mesh(config.get("mesh"))
  setup = train_simclr.create_train_setup(config, mesh, num_classes=0, multi_label=False,
                                          total_steps=1000, warmup_steps=10)
  size, channels = config.data.image_size, config.data.num_channels
  views = np.random.default_rng(0).integers(
      0, 256, (config.batch_size, 2, size, size, channels), dtype=np.uint8)
  batch = sharding.shard_host_batch({"views": views}, sharding.batch_sharding(mesh))
  return mesh, setup, batch


def _memory(compiled) -> dict:
  analysis = compiled.memory_analysis()
  if analysis is None:
    return {}
  fields = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
            "alias_size_in_bytes", "generated_code_size_in_bytes")
  out = {f: int(getattr(analysis, f, 0)) for f in fields}
  # Peak live memory of the step: inputs + outputs + XLA's temporaries, minus donated aliases.
  out["peak_bytes"] = (out["temp_size_in_bytes"] + out["argument_size_in_bytes"]
                       + out["output_size_in_bytes"] - out["alias_size_in_bytes"])
  return out


def measure_step(config, steps: int, peak_tflops: float) -> dict:
  mesh, setup, batch = _setup(config)
  state = sharding.create_sharded(setup.init_state, jax.random.key(0),
                                  shardings=setup.state_shardings)
  start = time.perf_counter()
  compiled = setup.update_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  state, metrics = compiled(state, batch)  # warm-up
  jax.block_until_ready(state)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - start)
  median = statistics.median(times)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0)) if cost else 0.0
  device_kind = jax.devices()[0].device_kind
  peak = peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in device_kind), 0.0)
  record = {
      "mode": "step", "model": config.model.name, "stem": config.model.get("stem", "bit"),
      "dtype": config.model.dtype,
      "remat": config.model.remat, "image_size": config.data.image_size,
      "global_batch": config.batch_size, "views": 2, "devices": mesh.size,
      "device_kind": device_kind, "compile_s": round(compile_s, 2),
      "median_step_s": median, "images_per_s": 2 * config.batch_size / median,
      "pairs_per_s": config.batch_size / median, "flops_per_step": flops,
      "tflops_per_s": flops / median / 1e12 if flops else None,
  }
  if peak and flops:
    record["mfu"] = flops / median / (peak * 1e12 * mesh.size)
    record["peak_tflops_per_device"] = peak
  record.update(_memory(compiled))
  return record


def _loop_step_time(config, steps: int, dataset=None) -> dict:
  """Median seconds per step of `train_and_evaluate`, from its logged window timestamps."""
  log_every = int(config.log_every_steps)
  with tempfile.TemporaryDirectory() as workdir:
    config = config.copy_and_resolve_references()
    config.total_steps = steps + 2 * log_every  # the first window holds the compilation
    config.total_epochs = -1.0
    config.knn.every_steps = 0
    config.linear_probe.enabled = False  # the end-of-run read-out is not part of the loop
    config.checkpoint_every_steps = 10**9
    config.optimizer.warmup_epochs = -1.0
    config.optimizer.warmup_steps = 1
    train_simclr.train_and_evaluate(config, workdir, dataset=dataset)
    records = [r for r in writers.read_metrics(workdir) if "train/loss" in r]
  records = records[1:-1]  # drop the compile window and the last (it includes the save)
  per_step = [(b["time"] - a["time"]) / (b["step"] - a["step"])
              for a, b in zip(records, records[1:])]
  return {"median_step_s": float(np.median(per_step)),
          "input_wait_ms_per_step": float(np.median(
              [r["train/input_wait_ms_per_step"] for r in records]))}


def measure_loop(config, steps: int, repeats: int = 3) -> dict:
  """The full loop against the bare step, with the real input pipeline and with cached batches.

  On a CPU host the augmentation threads share cores with the XLA:CPU step, so the real
  pipeline's number includes their CPU time; the cached-batch run (8 batches of the same
  shapes, cycled through a Grain dataset) isolates the loop itself: metrics, logging, progress,
  the preemption check and host-to-device transfer. Bare step and cached loop are measured
  `repeats` times, interleaved, so that load from other jobs hits both alike; the overhead is
  the ratio of the medians.
  """
  import grain  # pylint: disable=g-import-not-at-top
  size, channels = config.data.image_size, config.data.num_channels
  rng = np.random.default_rng(0)
  # `site` too: with a multi-site source the step also computes the site diagnostics.
  batches = [{"views": rng.integers(0, 256, (config.batch_size, 2, size, size, channels),
                                    dtype=np.uint8),
              "site": (np.arange(config.batch_size) % 4).astype(np.int32)} for _ in range(8)]
  bare_runs, cached_runs = [], []
  for _ in range(max(int(repeats), 1)):
    bare_runs.append(measure_step(config, steps, 0.0)["median_step_s"])
    cached_runs.append(_loop_step_time(
        config, steps, grain.MapDataset.source(batches).repeat().to_iter_dataset())
                       ["median_step_s"])
  real = _loop_step_time(config, steps)
  base, cached = statistics.median(bare_runs), statistics.median(cached_runs)
  return {
      "mode": "loop", "model": config.model.name, "image_size": config.data.image_size,
      "global_batch": config.batch_size, "log_every_steps": config.log_every_steps,
      "worker_count": config.data.get("worker_count", 0), "repeats": len(bare_runs),
      "bare_step_s_runs": bare_runs, "loop_cached_input_step_s_runs": cached_runs,
      "bare_median_step_s": base,
      "loop_cached_input_median_step_s": cached,
      "loop_overhead_percent": 100.0 * (cached / base - 1.0),
      "loop_real_input_median_step_s": real["median_step_s"],
      "loop_real_input_overhead_percent": 100.0 * (real["median_step_s"] / base - 1.0),
      "input_wait_ms_per_step": real["input_wait_ms_per_step"],
  }


def _tree_bytes(tree) -> int:
  return int(sum(int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
                 for leaf in jax.tree.leaves(tree)))


def saved_for_backward_bytes(config) -> dict:
  """Bytes autodiff keeps from the forward pass for the backward pass (shapes only, no compile).

  The residuals of `jax.vjp` of the contrastive loss (encoder + head + NT-Xent on a
  (batch, 2 views) uint8 batch), found with `jax.eval_shape`: this is the activation memory
  that rematerialisation trades for recompute, independent of the backend's scheduler.
  Returns the total and the part that is not parameters or input images.
  """
  model = train_simclr.build_model(config)
  size, channels = config.data.image_size, config.data.num_channels
  images = jax.ShapeDtypeStruct((2 * config.batch_size, size, size, channels), np.float32)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, size, size, channels),
                                                                       np.float32),
                                             train=False)["params"])

  def loss(params, images):
    z, _ = model.apply({"params": params}, images, train=True)
    z = z.reshape((config.batch_size, 2, -1))
    return losses.nt_xent(z[:, 0], z[:, 1], config.loss.temperature)

  residuals = jax.eval_shape(lambda p, x: jax.vjp(loss, p, x)[1], params, images)
  total = _tree_bytes(residuals)
  return {"total": total,
          "activations": total - _tree_bytes(params) - _tree_bytes(images)}


def measure_memory(config) -> dict:
  """Remat off vs on: activation memory saved for the backward pass, and XLA's compiled peak.

  The first is the number remat is about. The second is what this backend's compiler
  schedules: XLA:CPU hoists the recomputation into the forward pass, so on CPU its peak does
  not drop with remat (measured: it grows by ~1%); GPU/TPU numbers need that hardware.
  """
  results = {}
  for remat in (False, True):
    config = config.copy_and_resolve_references()
    config.model.remat = remat
    saved = saved_for_backward_bytes(config)
    _, setup, batch = _setup(config)
    abstract = checkpointing.abstract_with_shardings(setup.abstract_state,
                                                                  setup.state_shardings)
    start = time.perf_counter()
    compiled = setup.update_fn.lower(abstract, batch).compile()
    results[remat] = dict(_memory(compiled), compile_s=round(time.perf_counter() - start, 2),
                          saved=saved)
  off, on = results[False], results[True]
  return {
      "mode": "memory", "model": config.model.name, "stem": config.model.get("stem", "bit"),
      "image_size": config.data.image_size,
      "global_batch": config.batch_size, "dtype": config.model.dtype,
      "device_kind": jax.devices()[0].device_kind,
      "saved_activation_bytes_no_remat": off["saved"]["activations"],
      "saved_activation_bytes_remat": on["saved"]["activations"],
      "saved_activation_cut_percent": 100.0 * (1 - on["saved"]["activations"]
                                               / off["saved"]["activations"]),
      "xla_temp_bytes_no_remat": off.get("temp_size_in_bytes"),
      "xla_temp_bytes_remat": on.get("temp_size_in_bytes"),
      "xla_peak_bytes_no_remat": off.get("peak_bytes"),
      "xla_peak_bytes_remat": on.get("peak_bytes"),
      "xla_temp_cut_percent": 100.0 * (1 - on["temp_size_in_bytes"]
                                       / off["temp_size_in_bytes"]),
  }


def main(argv):
  del argv
  config = FLAGS.config
  if FLAGS.mode in ("step", "all"):
    _emit(measure_step(config, FLAGS.steps, FLAGS.peak_tflops))
  if FLAGS.mode in ("loop", "all"):
    _emit(measure_loop(config, FLAGS.steps, FLAGS.repeats))
  if FLAGS.mode in ("memory", "all"):
    _emit(measure_memory(config))


if __name__ == "__main__":
  app.run(main)
