"""The accelerator benchmark (experiments/benchmarks/accelerator.py) in its CPU smoke mode.

One subprocess (a single CPU device) runs the smoke plan: fp32 without remat, bf16 with remat,
the PyTorch peer (recorded as skipped where torch is not installed, as in the project's venv)
and Grain, every item in that one process (`--isolate=none`: each worker process would cost its
own ~9 s of imports). The checks recompute every derived number from the raw ones in the record.
The device command's mode, each item in its own worker process, is tested below on the items
that start fastest, with its failure and timeout paths.
"""
import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from experiments.benchmarks import accelerator, accelerator_common

ROOT = pathlib.Path(__file__).resolve().parents[1]
PLAN = "jax:float32:4:off,jax:bfloat16:4:on,torch:4,grain:0"
PEAK_TFLOPS = 0.5  # made up, so that MFU is computed on the CPU
WARMUP, STEPS = 1, 2  # the smoke defaults


def _table_rows(text: str) -> list[list[str]]:
  lines = [line for line in text.splitlines() if line.startswith("|")]
  return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  out = tmp_path_factory.mktemp("accelerator") / "smoke.jsonl"
  env = dict(os.environ)
  # One CPU device (the suite simulates 8, which would make the per-device batch global x8).
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if "xla_force_host_platform_device_count" not in f)
  env["JAX_PLATFORMS"] = "cpu"
  result = subprocess.run(
      [sys.executable, "-m", "experiments.benchmarks.accelerator", "--smoke", f"--plan={PLAN}",
       f"--peak_tflops={PEAK_TFLOPS}", f"--out={out}", "--isolate=none"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200, check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
  return {"records": records, "stdout": result.stdout, "out": out}


def _by_kind(records, kind):
  return [r for r in records if r["kind"] == kind]


@pytest.mark.slow
def test_schema_and_files(smoke):
  records = smoke["records"]
  assert [r["kind"] for r in records] == ["environment", "jax_step", "jax_step", "torch_step",
                                          "input_pipeline", "summary"]
  for record in records:
    assert record["name"] and record["status"] in ("ok", "skipped", "error", "timeout")
    assert record["status"] == "ok" or record["reason"]
  assert len({r["name"] for r in records}) == len(records)
  # --out holds the same JSON lines, and the .md beside it the table printed last.
  lines = smoke["out"].read_text().splitlines()
  assert [json.loads(line) for line in lines] == records
  md = smoke["out"].with_suffix(".md").read_text()
  assert smoke["stdout"].rstrip().endswith(md.rstrip())


@pytest.mark.slow
def test_jax_records_are_consistent(smoke):
  fp32, bf16 = _by_kind(smoke["records"], "jax_step")
  assert (fp32["dtype"], fp32["remat"]) == ("float32", False)
  assert (bf16["dtype"], bf16["remat"]) == ("bfloat16", True)
  for r in (fp32, bf16):
    assert r["status"] == "ok", r
    assert r["model"] == "R_micro" and r["image_size"] == 32 and r["devices"] == 1
    assert r["global_batch"] == r["per_device_batch"] * r["devices"] == 4
    assert r["compile_s"] > 0 and r["steps"] == STEPS
    assert r["state_step"] == WARMUP + STEPS  # the step really ran (and was not skipped)
    assert r["min_step_s"] <= r["median_step_s"] <= r["max_step_s"]
    assert r["images_per_s"] == pytest.approx(2 * r["global_batch"] / r["median_step_s"])
    assert r["pairs_per_s"] == pytest.approx(r["global_batch"] / r["median_step_s"])
    assert r["tflops_per_s"] == pytest.approx(r["flops_per_step"] / r["median_step_s"] / 1e12)
    assert r["mfu"] == pytest.approx(r["tflops_per_s"] / PEAK_TFLOPS)
    assert r["hfu"] == pytest.approx(r["compiled_flops_per_step"] / r["median_step_s"] / 1e12
                                     / PEAK_TFLOPS)
    assert r["flops_per_image"] == pytest.approx(r["flops_per_step"] / 8)
    assert r["xla_peak_bytes"] > 0
    # No memory_stats() on the CPU: recorded as unavailable, not as a number.
    assert r["peak_bytes_in_use"] is None and "unavailable" in r["peak_bytes_scope"]
  # Model FLOPs (the lowered step without remat) barely depend on the compute dtype ...
  assert bf16["flops_per_step"] == pytest.approx(fp32["flops_per_step"], rel=0.1)
  assert bf16["flops_source"] == "lowered HLO of the same step without remat"
  # ... while the remat program's compiled count includes the recomputed forward pass.
  assert bf16["compiled_flops_per_step"] > bf16["flops_per_step"]


@pytest.mark.slow
def test_torch_and_grain_records(smoke):
  records = smoke["records"]
  (torch_record,) = _by_kind(records, "torch_step")
  # Whether they are installed, without importing them here (~10 s for torch's CUDA build).
  has_torch = all(importlib.util.find_spec(name) is not None for name in ("torch", "timm"))
  if has_torch:
    assert torch_record["status"] == "ok"
    assert torch_record["images_per_s"] == pytest.approx(8 / torch_record["median_step_s"])
  else:
    assert torch_record["status"] == "skipped"
    assert "not importable" in torch_record["reason"]
  (grain,) = _by_kind(records, "input_pipeline")
  assert grain["status"] == "ok"
  assert grain["views_shape"] == [4, 2, 32, 32, 3] and grain["views_dtype"] == "uint8"
  assert grain["batches"] >= 2
  assert grain["images_per_s"] == pytest.approx(2 * grain["pairs_per_s"])
  best = max(r["images_per_s"] for r in _by_kind(records, "jax_step"))
  assert grain["demand_images_per_s"] == pytest.approx(best)
  assert grain["supply_over_demand"] == pytest.approx(grain["images_per_s"] / best)
  (summary,) = _by_kind(records, "summary")
  assert summary["images_per_s"] == pytest.approx(best)
  assert summary["input_supply_over_demand"] == pytest.approx(grain["images_per_s"] / best)
  assert summary["best_bf16_mfu"] == pytest.approx(_by_kind(records, "jax_step")[1]["mfu"])


@pytest.mark.slow
def test_table_lists_every_record(smoke):
  records = smoke["records"]
  header, separator, *rows = _table_rows(smoke["stdout"])
  assert header == list(accelerator.TABLE_COLUMNS)
  assert set(separator) == {"---"}
  assert len(rows) == len(records)
  for row, record in zip(rows, records):
    assert row[:3] == [record["kind"], record["name"], record["status"]]
    if record.get("images_per_s"):
      assert float(row[5]) == pytest.approx(record["images_per_s"], abs=0.5)
    if record.get("mfu") is not None:
      assert row[7] == f"{record['mfu']:.1%}"


def test_items_run_in_their_own_worker_processes(tmp_path, monkeypatch):
  """--isolate=process, the default: records come back through each worker's stdout."""
  workers = []
  run_in_subprocess = accelerator.run_in_subprocess

  def spy(kind, spec, timeout_s, env):
    workers.append(kind)
    return run_in_subprocess(kind, spec, timeout_s, env)

  def not_here(kind, spec):
    raise AssertionError(f"{kind} ran in the parent process")

  monkeypatch.setattr(accelerator, "run_in_subprocess", spy)
  monkeypatch.setattr(accelerator, "run_in_process", not_here)
  out = tmp_path / "isolated.jsonl"
  # Two Grain items (the fastest to start; the PyTorch peer's worker spends ~10 s importing
  # torch, and the smoke run above already measures it).
  assert accelerator.main(["--smoke", "--plan=grain:0,grain:1", f"--out={out}"]) == 0
  records = [json.loads(line) for line in out.read_text().splitlines()]
  assert workers == ["grain", "grain"]
  assert [r["kind"] for r in records] == ["environment", "input_pipeline", "input_pipeline",
                                          "summary"]
  assert records[0]["isolate"] == "process"
  for grain, worker_count in zip(records[1:3], (0, 1)):
    assert grain["status"] == "ok" and grain["views_shape"] == [4, 2, 32, 32, 3]
    assert grain["name"].endswith(f"workers={worker_count}")
    assert grain["batches"] >= 2 and grain["item_wall_s"] > 0
    assert "demand_images_per_s" not in grain  # no JAX step measured


def test_worker_failure_and_timeout_are_reported():
  env = accelerator._worker_env(smoke=True)  # pylint: disable=protected-access
  records, failure = accelerator.run_in_subprocess("no_such_kind", {}, 60.0, env)
  assert records == [] and failure.startswith("worker exit code 2")
  assert "invalid choice" in failure  # the worker's stderr tail
  spec = {"config": "configs/pretrain_simclr.py:smoke", "workers": 0, "image_size": 32,
          "batch": 4, "num_images": 8, "seconds": 60.0, "warmup_batches": 1, "min_batches": 2}
  records, failure = accelerator.run_in_subprocess("grain", spec, 1.0, env)
  assert failure.startswith("timeout: killed after 1 s")


def test_budget_skips_with_a_reason(tmp_path, capsys):
  out = tmp_path / "skipped.jsonl"
  code = accelerator.main(["--smoke", "--budget_s=0", "--plan=jax:bfloat16:4:on,torch:4,grain:0",
                           f"--out={out}"])
  assert code == 0
  records = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r["kind"] for r in records] == ["environment", "jax_step", "torch_step",
                                          "input_pipeline", "summary"]
  for record in records[1:-1]:
    assert record["status"] == "skipped" and "time budget" in record["reason"]
  assert records[-1]["note"] == "nothing measured"
  rows = _table_rows(capsys.readouterr().out)[2:]
  assert [row[1] for row in rows] == [r["name"] for r in records]


def test_plan_parsing():
  items = accelerator.parse_plan(
      "jax:bfloat16:256:on, torch:128 ,torch:64:compile,grain:cpu,grain:0")
  assert items == [{"kind": "jax", "dtype": "bfloat16", "batch": 256, "remat": True},
                   {"kind": "torch", "batch": 128, "mode": "both"},
                   {"kind": "torch", "batch": 64, "mode": "compile"},
                   {"kind": "grain", "workers": os.cpu_count() or 1},
                   {"kind": "grain", "workers": 0}]
  for bad in ("jax:bfloat16:256", "jax:float16:8:on", "torch:64:jit", "tpu:8"):
    with pytest.raises(ValueError, match="bad plan item"):
      accelerator.parse_plan(bad)


def test_xla_flops_matches_a_hand_count():
  """XLA's cost analysis counts 2 FLOPs per multiply-add: a VALID conv and a matmul by hand."""
  conv = jax.jit(lambda x, k: jax.lax.conv_general_dilated(
      x, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")))
  lowered = conv.lower(jnp.zeros((2, 8, 8, 3)), jnp.zeros((3, 3, 3, 4)))
  assert accelerator_common.xla_flops(lowered) == 2 * (2 * 6 * 6 * 4) * (3 * 3 * 3)
  matmul = jax.jit(jnp.matmul).lower(jnp.zeros((16, 32)), jnp.zeros((32, 8)))
  assert accelerator_common.xla_flops(matmul) == 2 * 16 * 32 * 8


@pytest.mark.parametrize("cost, expected", [
    ({"flops": 12.0}, 12.0), ([{"flops": 7.0}], 7.0), ([], None), (None, None),
    ({"bytes accessed": 3.0}, None), ({"flops": -1.0}, None), ({"flops": math.nan}, None)])
def test_xla_flops_takes_any_cost_analysis_shape(cost, expected):
  class Stage:
    def cost_analysis(self):
      return cost

  assert accelerator_common.xla_flops(Stage()) == expected


def test_xla_flops_when_cost_analysis_raises():
  class Stage:
    def cost_analysis(self):
      raise NotImplementedError("no cost analysis on this backend")

  assert accelerator_common.xla_flops(Stage()) is None
