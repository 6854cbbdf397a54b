r"""Whether two runs of the same config computed the same numbers (wall times aside).

  python -m experiments.compare_runs REFERENCE_WORKDIR OTHER_WORKDIR [...more pairs]

Compares every logged value of WORKDIR/metrics.jsonl (step by step) and every value of
WORKDIR/results.json, exactly, skipping what measures time or names a place (wall and step
times, images/s, paths). Prints one line per pair and the first differences; exits 1 if any
value differs. Made for refactors that must not change results, e.g. every trainer's smoke
config before and after:

  for c in pretrain_simclr pretrain_cluster pretrain_gmml finetune segment; do
    python -m remedis_jax.main --config=configs/$c.py:smoke --workdir=/tmp/after/$c \
      --config.compilation_cache_dir=off
  done   # the same at the earlier commit into /tmp/before, then
  python -m experiments.compare_runs /tmp/before/pretrain_simclr /tmp/after/pretrain_simclr ...
"""

from __future__ import annotations

import json
import sys
from typing import Any

from data_pipelines import storage

# Keys (or parts of keys) that measure time or name places: they differ between any two runs.
IGNORED = ("time", "images_per_s", "steps_per_sec", "wall", "uptime", "timing/", "input_wait",
           "seconds", "run_dir", "workdir", "path", "initialisation", "checkpoint", "roc_file")


def ignored(key: str) -> bool:
  return any(part in key for part in IGNORED)


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(value, dict):
    out = {}
    for key, item in value.items():
      out.update(_flat(item, f"{prefix}{key}."))
    return out
  return {prefix.rstrip("."): json.dumps(value) if isinstance(value, list) else value}


def _metrics(workdir: str) -> dict[tuple[Any, str], Any]:
  path = storage.join(workdir, "metrics.jsonl")
  if not storage.exists(path):
    return {}
  out = {}
  for line in storage.read_lines(path):
    if line.strip():
      record = json.loads(line)
      out.update({(record.get("step"), k): v for k, v in record.items()
                  if k != "step" and not ignored(k)})
  return out


def _results(workdir: str) -> dict[str, Any]:
  path = storage.join(workdir, "results.json")
  if not storage.exists(path):
    return {}
  return {k: v for k, v in _flat(storage.read_json(path)).items() if not ignored(k)}


def differences(reference: str, other: str) -> tuple[int, list[tuple[Any, Any, Any]]]:
  """(how many values were compared, [(key, reference value, other value)] that differ)."""
  found = []
  count = 0
  for a, b in ((_metrics(reference), _metrics(other)), (_results(reference), _results(other))):
    keys = sorted(set(a) | set(b), key=str)
    count += len(keys)
    found += [(k, a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k)]
  return count, found


def main(argv: list[str]) -> int:
  if len(argv) < 2 or len(argv) % 2:
    print(__doc__)
    return 2
  differ = False
  for reference, other in zip(argv[::2], argv[1::2]):
    count, found = differences(reference, other)
    print(f"{other}: {count} values, {len(found)} differ from {reference}")
    for entry in found[:5]:
      print(f"  {entry}")
    differ |= bool(found) or count == 0
  return 1 if differ else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
