"""What the accelerator benchmark's workers share: the config loader and XLA's FLOP count."""

from __future__ import annotations

import importlib
import importlib.util
import math
import os


def xla_flops(stage) -> float | None:
  """FLOPs from `Lowered.cost_analysis()` / `Compiled.cost_analysis()`, whatever the version.

  Older JAX returns a list with one dict per program, newer a dict; either may be None,
  empty, lack "flops" or raise (backend without cost analysis): then None.
  """
  try:
    cost = stage.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or not hasattr(cost, "get"):
    return None
  flops = cost.get("flops")
  try:
    flops = float(flops)
  except (TypeError, ValueError):
    return None
  return flops if flops > 0 and math.isfinite(flops) else None


def load_config(config_arg: str):
  """'path/to/config.py:variant' -> ConfigDict (the configs/ files are importable modules)."""
  path, _, variant = config_arg.partition(":")
  module_name = os.path.splitext(os.path.normpath(path))[0].replace(os.sep, ".")
  try:
    module = importlib.import_module(module_name)
  except ImportError:
    spec = importlib.util.spec_from_file_location("benchmark_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  return module.get_config(variant or None)
