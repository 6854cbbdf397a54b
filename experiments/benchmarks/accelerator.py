r"""Accelerator numbers in one command: the SimCLR step (JAX, bf16/fp32, batch, remat), the
PyTorch peer and the host input pipeline; JSON lines, then a markdown table.

What it measures (each plan item in its own subprocess, so that a crash or out-of-memory of one
configuration does not end the run and the device's peak memory belongs to that item alone):

  jax     the project's SimCLR update step (`train_simclr.create_train_setup`, the jitted step
          the trainer runs: encoder + projection head + NT-Xent + LARS + the non-finite guard)
          of `--config` (default configs/pretrain_simclr.py:r50x1, 224 px, two views) with
          `config.model.dtype` and `config.model.remat` overridden, on random uint8 views
          already on the device: compile time, median step time, images/s (views the encoder
          sees: 2 per pair), model TFLOP/s and MFU, peak device memory.
  torch   the same step in PyTorch: timm `resnetv2_50x1_bit` (the same BiT ResNet-v2: weight-
          standardised convs, GroupNorm) + the same projection head (Linear/LayerNorm/ReLU) +
          NT-Xent, SGD with momentum (fused on CUDA), channels_last, bf16 autocast; eager, then
          `torch.compile`d. Skipped, with a record saying why, without torch/timm or CUDA.
  grain   the host input pipeline (`data_pipelines.pipeline.make_pretrain_dataset`, the config's
          preset, 2 views, 224 px) reading grayscale PNGs rendered from the built-in synthetic
          chest X-ray source, on this machine's CPU cores: images/s (views) against the step's
          demand (the images/s of the best JAX configuration).

The items live in accelerator_jax.py, accelerator_torch.py and accelerator_grain.py; this module
is the harness (the plan, one subprocess per item, the budget, the table).

FLOPs are XLA's cost analysis of the lowered (unoptimised) HLO of the step WITHOUT remat (the
model FLOPs, global over devices; a remat configuration recomputes the forward pass, which MFU
does not count); `compiled_flops_per_step` is the compiled (per-device) program's count, remat
recompute included (`hfu` uses it). MFU = model FLOPs per step / median step time / (peak x
devices), against the chip's dense bf16 peak (experiments/benchmarks/train_step.py:PEAK_TFLOPS,
H200 989 TFLOP/s; `--peak_tflops` overrides), also for float32 rows. Peak device memory is
`device.memory_stats()["peak_bytes_in_use"]`, which is per process and never resets: with the
default `--isolate=process` every JAX item runs in a fresh process, so it is that item's own
peak (`peak_bytes_scope`); with `--isolate=none` it is the maximum over the items run so far.
`xla_peak_bytes` is XLA's static estimate for the compiled step (arguments + outputs +
temporaries - donated aliases).

The plan runs in priority order; an item whose estimated time would end past `--budget_s` is
skipped with a record saying so, and a running item is killed at `--deadline_s` (its records so
far are kept). Defaults: budget 420 s, deadline 470 s, so the whole run ends inside 8 minutes.

Smoke mode (CPU, about a minute on 2 cores, mostly XLA compiling: the smoke variant's R_micro at
32 px, per-device batch 4, 1 warm-up + 2 timed steps, fp32 and bf16, remat off and on; the torch
peer eager on CPU with timm's small resnetv2_18 when torch and timm are importable, else a
'skipped' record; Grain on 8 images) prints the same records and table;
tests/test_accelerator_benchmark.py runs it:

  python -m experiments.benchmarks.accelerator --smoke --out=/tmp/accelerator_smoke.jsonl

On any GPU or TPU host with the project installed (`pip install -e ".[cuda12]"` or
`".[tpu]"`):

  python -m experiments.benchmarks.accelerator --out=/tmp/accelerator.jsonl

On a host without network access that already has JAX for its accelerator (torch and timm too,
for the peer), only the pure-Python and manylinux wheels it lacks travel with the repository:
typically grain, array-record, portpicker, clu, ml-collections and tensorboard (pin the versions of
pyproject.toml). On a machine with network, in the repository root, for the host's Python
version and platform:

  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
      -d .whl grain array-record portpicker clu ml-collections tensorboard

then, on the host, in the copied repository root:

  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 -m experiments.benchmarks.accelerator \
      --out=/tmp/accelerator.jsonl

With `--out=DIR/NAME.jsonl` it also writes the markdown table to DIR/NAME.md (the table is
also the last thing it prints). Items the budget skipped can be run in a second call with
`--plan=` listing them, e.g. `--plan=jax:bfloat16:256:on,jax:float32:128:off`. Plan items:
`jax:DTYPE:BATCH:REMAT` (DTYPE float32|bfloat16, BATCH per device, REMAT off|on),
`torch:BATCH[:eager|compile]` (neither: both, in one process), `grain:WORKERS` (Grain worker
processes, `cpu` = one per core, each with one reader thread; 0 = one process with a reader
thread per core).
For a torch row, "compile s" is the first step (cuDNN autotuning; plus torch.compile).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

from experiments.benchmarks import accelerator_common, accelerator_grain, accelerator_jax
from experiments.benchmarks import accelerator_torch

RECORD_PREFIX = "@@accelerator-record@@ "
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# In priority order: the headline bf16 step, its PyTorch peer (eager is cheap; torch.compile
# may take minutes), the input pipeline, then batch, remat and float32 comparisons.
FULL_PLAN = ("jax:bfloat16:128:off,torch:128:eager,grain:cpu,torch:128:compile,"
             "jax:bfloat16:256:off,jax:bfloat16:256:on,jax:float32:128:off,"
             "jax:bfloat16:64:off,jax:float32:256:off,jax:bfloat16:128:on,grain:0")
SMOKE_PLAN = "jax:float32:4:off,jax:bfloat16:4:off,jax:bfloat16:4:on,torch:4,grain:0"

# Seconds an item is expected to take before one of its kind has run (then: the longest seen).
PRIOR_SECONDS = {"jax": 75.0, "torch:eager": 30.0, "torch:compile": 150.0,
                 "torch:both": 180.0, "grain": 35.0}
SMOKE_PRIOR_SECONDS = {"jax": 30.0, "torch:eager": 30.0, "torch:compile": 300.0,
                       "torch:both": 330.0, "grain": 10.0}


# ------------------------------------------------------------------------------------ helpers
def _emit_worker_record(record: dict[str, Any]) -> None:
  print(RECORD_PREFIX + json.dumps(record, default=_json_default), flush=True)


def _json_default(value):
  if hasattr(value, "item"):
    return value.item()
  return str(value)


def _log(message: str) -> None:
  print(f"[accelerator] {message}", file=sys.stderr, flush=True)


def _dtype_tag(dtype: str) -> str:
  return {"bfloat16": "bf16", "float32": "fp32"}.get(dtype, dtype)


WORKERS = {"jax": accelerator_jax.run_jax_item, "torch": accelerator_torch.run_torch_item,
           "grain": accelerator_grain.run_grain_item}


def _worker_main(kind: str, spec: dict[str, Any]) -> int:
  """Entry point of a worker subprocess: prints its records, prefixed, one per line."""
  WORKERS[kind](spec, _emit_worker_record)
  return 0


# ------------------------------------------------------------------------------------- plan
def parse_plan(plan: str) -> list[dict[str, Any]]:
  items = []
  for token in [t.strip() for t in plan.split(",") if t.strip()]:
    parts = token.split(":")
    kind = parts[0]
    if (kind == "jax" and len(parts) == 4 and parts[1] in ("float32", "bfloat16")
        and parts[3] in ("on", "off")):
      items.append({"kind": "jax", "dtype": parts[1], "batch": int(parts[2]),
                    "remat": parts[3] == "on"})
    elif kind == "torch" and len(parts) in (2, 3) and parts[2:] in ([], ["eager"],
                                                                       ["compile"]):
      items.append({"kind": "torch", "batch": int(parts[1]),
                    "mode": parts[2] if len(parts) == 3 else "both"})
    elif kind == "grain" and len(parts) == 2:
      workers = (os.cpu_count() or 1) if parts[1] == "cpu" else int(parts[1])
      items.append({"kind": "grain", "workers": workers})
    else:
      raise ValueError(f"bad plan item {token!r}: expected jax:DTYPE:BATCH:on|off, "
                       "torch:BATCH[:eager|compile] or grain:WORKERS|cpu")
  return items


def item_name(item: dict[str, Any], config_model: str, image_size: int) -> str:
  if item["kind"] == "jax":
    return (f"jax {config_model} {image_size}px {_dtype_tag(item['dtype'])} "
            f"b{item['batch']}/dev remat={'on' if item['remat'] else 'off'}")
  if item["kind"] == "torch":
    mode = "" if item["mode"] == "both" else f" {item['mode']}"
    return (f"torch {item.get('model', 'timm')} {image_size}px bf16-autocast "
            f"b{item['batch']}{mode}")
  return f"grain {image_size}px 2 views workers={item['workers']}"


def _parse_worker_output(stdout: str) -> list[dict[str, Any]]:
  records = []
  for line in (stdout or "").splitlines():
    if line.startswith(RECORD_PREFIX):
      with contextlib.suppress(json.JSONDecodeError):
        records.append(json.loads(line[len(RECORD_PREFIX):]))
  return records


def _tail(text: str | bytes | None, chars: int = 1500) -> str:
  if isinstance(text, bytes):
    text = text.decode("utf-8", "replace")
  return (text or "")[-chars:]


def run_in_subprocess(kind: str, spec: dict[str, Any], timeout_s: float,
                      env: dict[str, str]) -> tuple[list[dict[str, Any]], str | None]:
  """Runs one worker; returns (records, failure reason or None)."""
  command = [sys.executable, "-m", "experiments.benchmarks.accelerator", f"--_worker={kind}",
             "--_spec=" + json.dumps(spec)]
  # Its own process group, so that a kill at the deadline also ends what it started (Grain
  # worker processes, torch.compile's compile workers).
  process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
  try:
    stdout, stderr = process.communicate(timeout=max(timeout_s, 1.0))
  except subprocess.TimeoutExpired:
    with contextlib.suppress(ProcessLookupError, PermissionError):
      os.killpg(process.pid, signal.SIGKILL)
    stdout, stderr = process.communicate()
    return (_parse_worker_output(stdout),
            f"timeout: killed after {timeout_s:.0f} s (--deadline_s); stderr tail: "
            f"{_tail(stderr, 600)}")
  records = _parse_worker_output(stdout)
  if process.returncode != 0:
    return records, f"worker exit code {process.returncode}; stderr tail: {_tail(stderr)}"
  return records, None


def run_in_process(kind: str, spec: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
  import traceback  # pylint: disable=g-import-not-at-top
  records = []
  try:
    WORKERS[kind](spec, records.append)
    return records, None
  except Exception as e:  # pylint: disable=broad-except
    return records, f"{type(e).__name__}: {e}; {_tail(traceback.format_exc(), 1200)}"


# ------------------------------------------------------------------------------------ table
def _fmt(value, spec: str = ".1f", scale: float = 1.0) -> str:
  if value is None or value == "":
    return ""
  if isinstance(value, (int, float)):
    return format(value * scale, spec)
  return str(value)


TABLE_COLUMNS = ("kind", "name", "status", "compile s", "step ms", "images/s", "TFLOP/s",
                 "MFU", "peak mem GiB", "note")


def table_row(record: dict[str, Any]) -> list[str]:
  kind = record.get("kind", "")
  mfu = record.get("mfu")
  peak = record.get("peak_bytes_in_use")
  note = record.get("reason", "") if record.get("status") != "ok" else record.get("note", "")
  return [kind, record.get("name", ""), record.get("status", ""),
          _fmt(record.get("compile_s")),
          _fmt(record.get("median_step_s"), ".1f", 1e3),
          _fmt(record.get("images_per_s"), ".0f"),
          _fmt(record.get("tflops_per_s"), ".3g"),
          _fmt(mfu, ".1%") if mfu is not None else "",
          _fmt(peak, ".2f", 1 / 2**30) if peak is not None else "",
          str(note).replace("|", "/").replace("\n", " ")[:160]]


def markdown_table(records: list[dict[str, Any]]) -> str:
  lines = ["| " + " | ".join(TABLE_COLUMNS) + " |",
           "| " + " | ".join("---" for _ in TABLE_COLUMNS) + " |"]
  lines += ["| " + " | ".join(table_row(r)) + " |" for r in records]
  return "\n".join(lines)


# ------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--smoke", action="store_true",
                      help="CPU, tiny model (configs/pretrain_simclr.py:smoke), 32 px, batch 4")
  parser.add_argument("--config", default=None,
                      help="config file:variant (default pretrain_simclr r50x1; smoke: smoke)")
  parser.add_argument("--plan", default=None, help="comma-separated items (see the docstring)")
  parser.add_argument("--image_size", type=int, default=0, help="0: the config's (smoke: 32)")
  parser.add_argument("--steps", type=int, default=0, help="timed steps (0: 20; smoke 2)")
  parser.add_argument("--warmup", type=int, default=0, help="untimed steps (0: 2; smoke 1)")
  parser.add_argument("--peak_tflops", type=float, default=0.0,
                      help="peak TFLOP/s per device for MFU (0: from the device kind)")
  parser.add_argument("--budget_s", type=float, default=None,
                      help="start no item expected to end later (default 420; smoke 900)")
  parser.add_argument("--deadline_s", type=float, default=None,
                      help="kill a running item at this time (default 470; smoke 1200)")
  parser.add_argument("--isolate", choices=["process", "none"], default="process",
                      help="process: each item in its own subprocess; none: all in this one")
  parser.add_argument("--torch_model", default=None,
                      help="timm model (default resnetv2_50x1_bit; smoke: resnetv2_18)")
  parser.add_argument("--torch_compile", choices=["auto", "on", "off"], default="auto",
                      help="auto: torch.compile on CUDA only (on CPU it takes minutes)")
  parser.add_argument("--grain_seconds", type=float, default=None, help="default 10; smoke 0")
  parser.add_argument("--grain_images", type=int, default=None, help="default 256; smoke 8")
  parser.add_argument("--grain_batch", type=int, default=None, help="default 32; smoke 4")
  parser.add_argument("--out", default="", help="also write JSON lines here (+ .md table)")
  parser.add_argument("--_worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
  parser.add_argument("--_spec", help=argparse.SUPPRESS)
  return parser


def _defaults(args) -> None:
  smoke = args.smoke
  args.config = args.config or ("configs/pretrain_simclr.py:smoke" if smoke
                                else "configs/pretrain_simclr.py:r50x1")
  args.plan = args.plan or (SMOKE_PLAN if smoke else FULL_PLAN)
  args.image_size = args.image_size or (32 if smoke else 0)
  args.torch_model = args.torch_model or ("resnetv2_18" if smoke else "resnetv2_50x1_bit")
  args.steps = args.steps or (2 if smoke else 20)
  args.warmup = args.warmup or (1 if smoke else 2)
  args.budget_s = args.budget_s if args.budget_s is not None else (900.0 if smoke else 420.0)
  args.deadline_s = (args.deadline_s if args.deadline_s is not None
                     else (1200.0 if smoke else 470.0))
  args.grain_seconds = args.grain_seconds if args.grain_seconds is not None else (
      0.0 if smoke else 10.0)
  args.grain_images = args.grain_images or (8 if smoke else 256)
  args.grain_batch = args.grain_batch or (4 if smoke else 32)


def _config_facts(config_arg: str) -> dict[str, Any]:
  """Model name, image size and head of the config, read without importing JAX."""
  config = accelerator_common.load_config(config_arg)
  return {"model": config.model.name, "image_size": config.data.image_size,
          "head_hidden_dims": list(config.model.head_hidden_dims),
          "projection_dim": config.model.projection_dim,
          "temperature": config.loss.temperature}


def _worker_env(smoke: bool) -> dict[str, str]:
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH", "")) if p)
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  if smoke:
    env["JAX_PLATFORMS"] = "cpu"
  return env


def _package_version(name: str) -> str | None:
  try:
    import importlib.metadata as metadata  # pylint: disable=g-import-not-at-top
    return metadata.version(name)
  except Exception:  # pylint: disable=broad-except
    return None


def _summary(records: list[dict[str, Any]], smoke: bool = False) -> dict[str, Any]:
  ok = [r for r in records if r.get("status") == "ok"]
  jax_ok = [r for r in ok if r.get("kind") == "jax_step" and r.get("images_per_s")]
  torch_ok = [r for r in ok if r.get("kind") == "torch_step" and r.get("images_per_s")]
  grain_ok = [r for r in ok if r.get("kind") == "input_pipeline" and r.get("images_per_s")]
  summary = {"kind": "summary", "name": "summary", "status": "ok"}
  notes = []
  if jax_ok:
    best = max(jax_ok, key=lambda r: r["images_per_s"])
    summary.update({"best_jax": best["name"], "images_per_s": best["images_per_s"],
                    "median_step_s": best.get("median_step_s"),
                    "tflops_per_s": best.get("tflops_per_s"), "mfu": best.get("mfu"),
                    "peak_bytes_in_use": best.get("peak_bytes_in_use")})
    bf16 = [r for r in jax_ok if r.get("dtype") == "bfloat16" and r.get("mfu") is not None]
    if bf16:
      summary["best_bf16_mfu"] = max(r["mfu"] for r in bf16)
      summary["mfu_target_0.45_met"] = summary["best_bf16_mfu"] >= 0.45
      notes.append(f"best bf16 MFU {summary['best_bf16_mfu']:.1%} (target 45%)")
    notes.insert(0, f"best JAX: {best['name']}")
  if torch_ok:
    best_torch = max(torch_ok, key=lambda r: r["images_per_s"])
    summary["best_torch"] = best_torch["name"]
    summary["torch_images_per_s"] = best_torch["images_per_s"]
    if jax_ok:
      summary["jax_over_torch"] = summary["images_per_s"] / best_torch["images_per_s"]
      summary["speedup_target_1.3_met"] = summary["jax_over_torch"] >= 1.3
      notes.append(f"JAX/torch {summary['jax_over_torch']:.2f}x (target 1.3x)")
      same = [r for r in jax_ok if r.get("dtype") == "bfloat16" and not r.get("remat")
              and r.get("global_batch") == best_torch.get("global_batch")]
      if same:  # like for like: bf16, no remat, the torch batch
        summary["jax_over_torch_same_batch"] = (max(r["images_per_s"] for r in same)
                                                / best_torch["images_per_s"])
  if grain_ok:
    best_grain = max(grain_ok, key=lambda r: r["images_per_s"])
    summary["input_images_per_s"] = best_grain["images_per_s"]
    if jax_ok:
      summary["input_supply_over_demand"] = best_grain["images_per_s"] / summary["images_per_s"]
      notes.append(f"input pipeline supplies {summary['input_supply_over_demand']:.2f}x "
                   "the best step's demand")
  if smoke and notes:
    notes.insert(0, "smoke run (toy models, CPU): not a measurement")
  summary["note"] = "; ".join(notes) or "nothing measured"
  return summary


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  if args._worker:  # pylint: disable=protected-access
    return _worker_main(args._worker, json.loads(args._spec))  # pylint: disable=protected-access
  _defaults(args)
  t0 = time.perf_counter()
  items = parse_plan(args.plan)
  facts = _config_facts(args.config)
  image_size = args.image_size or facts["image_size"]
  env = _worker_env(args.smoke)
  torch_compile = {"on": True, "off": False, "auto": not args.smoke}[args.torch_compile]
  out_file = None
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    out_file = open(args.out, "w", encoding="utf-8")  # pylint: disable=consider-using-with
  records: list[dict[str, Any]] = []

  def emit(record: dict[str, Any]) -> None:
    record.setdefault("wall_clock_s", round(time.perf_counter() - t0, 2))
    records.append(record)
    line = json.dumps(record, default=_json_default)
    print(line, flush=True)
    if out_file:
      out_file.write(line + "\n")
      out_file.flush()

  emit({"kind": "environment", "name": "environment", "status": "ok", "smoke": args.smoke,
        "config": args.config, "plan": args.plan, "image_size": image_size,
        "budget_s": args.budget_s, "deadline_s": args.deadline_s, "isolate": args.isolate,
        "python": sys.version.split()[0], "cpus": os.cpu_count(),
        "versions": {p: _package_version(p) for p in ("jax", "jaxlib", "flax", "optax", "grain",
                                                        "torch", "timm")},
        "note": f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, jax "
                f"{_package_version('jax')}, torch {_package_version('torch')}"})

  priors = dict(SMOKE_PRIOR_SECONDS if args.smoke else PRIOR_SECONDS)
  seen: dict[str, float] = {}
  model_flops: dict[tuple, float] = {}
  kinds = {"jax": "jax_step", "torch": "torch_step", "grain": "input_pipeline"}
  for index, item in enumerate(items):
    kind = item["kind"]
    if kind == "torch":
      item["model"] = args.torch_model
      modes = {"eager": ["eager"], "compile": ["compile"], "both": ["eager", "compile"]}[
          item["mode"]]
      if not torch_compile:
        modes = [m for m in modes if m != "compile"]
    name = item_name(item, facts["model"], image_size)
    base = {"kind": kinds[kind], "name": name}
    if kind == "torch" and not modes:
      emit(dict(base, status="skipped", reason="torch.compile is off (--torch_compile; auto: "
                                               "on CUDA runs only)"))
      continue
    elapsed = time.perf_counter() - t0
    cost_key = f"torch:{item['mode']}" if kind == "torch" else kind
    estimate = seen.get(cost_key, priors[cost_key])
    if elapsed >= args.deadline_s - 1.0:
      emit(dict(base, status="skipped",
                reason=f"deadline: {elapsed:.0f} s of --deadline_s={args.deadline_s:.0f} used"))
      continue
    if args.budget_s <= 0 or (index > 0 and elapsed + estimate > args.budget_s):
      emit(dict(base, status="skipped",
                reason=f"time budget: {elapsed:.0f} s of --budget_s={args.budget_s:.0f} used, "
                       f"this item is expected to take ~{estimate:.0f} s"))
      continue
    if kind == "jax":
      spec = {"config": args.config, "dtype": item["dtype"], "batch": item["batch"],
              "remat": item["remat"], "image_size": args.image_size, "steps": args.steps,
              "warmup": args.warmup, "peak_tflops": args.peak_tflops}
      flops_key = (item["dtype"], item["batch"])
      if item["remat"] and flops_key in model_flops:
        spec["model_flops_per_step"] = model_flops[flops_key]
      if args.isolate == "none":
        spec["peak_bytes_scope"] = "this process, cumulative over the items run so far"
    elif kind == "torch":
      spec = dict(facts, model=args.torch_model, batch=item["batch"], image_size=image_size,
                  steps=args.steps, warmup=args.warmup, modes=modes, allow_cpu=args.smoke)
    else:
      spec = {"config": args.config, "workers": item["workers"], "image_size": image_size,
              "batch": args.grain_batch, "num_images": args.grain_images,
              "seconds": args.grain_seconds, "warmup_batches": 1 if args.smoke else 3,
              "min_batches": 2 if args.smoke else 5}
    _log(f"{name}: starting at {elapsed:.0f} s")
    start = time.perf_counter()
    if args.isolate == "process":
      timeout = args.deadline_s - (time.perf_counter() - t0)
      item_records, failure = run_in_subprocess(kind, spec, timeout, env)
    else:
      item_records, failure = run_in_process(kind, spec)
    wall = time.perf_counter() - start
    seen[cost_key] = max(seen.get(cost_key, 0.0), wall)
    _log(f"{name}: {wall:.1f} s" + (f" ({failure[:200]})" if failure else ""))
    for record in item_records:
      suffix = record.pop("name_suffix", None)
      record = dict(base, **record)
      if suffix and not name.endswith(suffix):
        record["name"] = f"{name} {suffix}"
      record.setdefault("status", "ok")
      record["item_wall_s"] = round(wall, 2)
      if kind == "jax" and not item["remat"] and record.get("flops_per_step"):
        model_flops[(item["dtype"], item["batch"])] = record["flops_per_step"]
      if kind == "grain":
        demand = [r["images_per_s"] for r in records
                  if r.get("kind") == "jax_step" and r.get("status") == "ok"]
        if demand:
          record["demand_images_per_s"] = max(demand)
          record["supply_over_demand"] = record["images_per_s"] / max(demand)
          record["note"] = (f"{record['supply_over_demand']:.2f}x the best JAX step's "
                            f"{max(demand):.0f} images/s so far")
      emit(record)
    if failure:
      status = "timeout" if failure.startswith("timeout") else "error"
      if any(r.get("name") == name for r in records):
        base = dict(base, name=f"{name} (worker {status})")
      emit(dict(base, status=status, reason=failure, item_wall_s=round(wall, 2)))

  emit(_summary(records, smoke=args.smoke))
  table = markdown_table(records)
  print("\n" + table, flush=True)
  if out_file:
    out_file.close()
    with open(os.path.splitext(args.out)[0] + ".md", "w", encoding="utf-8") as f:
      f.write(table + "\n")
  _log(f"done in {time.perf_counter() - t0:.0f} s")
  return 1 if any(r.get("status") == "error" for r in records) else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
