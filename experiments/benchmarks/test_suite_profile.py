"""Where the test suite spends its time: a py-spy profile of `pytest`, every subprocess included.

  .venv/bin/python -m pip install py-spy   # not a project dependency
  .venv/bin/python -m experiments.benchmarks.test_suite_profile --out=/tmp/suite.raw
  .venv/bin/python -m experiments.benchmarks.test_suite_profile --read=/tmp/suite.raw

The first form runs `py-spy record --subprocesses -f raw` around the suite (as `make test` runs
it: two xdist workers) and then reads the profile; the second only reads one. It prints the
share of all samples per category (imports, JAX tracing and lowering, XLA compilation, Orbax
saves and restores, ...; a sample counts in the first category whose frame it contains), per
kind of process, and, for processes that train (`python -m remedis_jax.main`), the import
seconds per process. Sampling rate 25 Hz; a sample is a running Python thread, so on a loaded
machine waiting for a core counts too: read shares, not seconds.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys

RATE = 25
# (name, substring of a frame): the first match names a sample.
CATEGORIES = (
    ("import", "_find_and_load"),
    ("XLA compilation", "backend_compile"),
    ("Orbax save", "CheckpointManager.save"),
    ("Orbax restore", "CheckpointManager.restore"),
    ("JAX tracing", "trace_to_jaxpr"),
    ("JAX lowering", "lower_sharding_computation"),
    ("JAX lowering", "lower_jaxpr_to_module"),
    ("scikit-learn", "sklearn/"),
)
_ENTRY = re.compile(r"(.*?) (\d+)\n", flags=re.S)
_PROCESS = re.compile(r'process (\d+):"([^"]*)"', flags=re.S)


def process_kind(command: str) -> str:
  if "exec(eval(sys.stdin.readline()))" in command:
    return "pytest-xdist worker"
  if "spawn_main" in command:
    return "Grain worker process"
  match = re.search(r"-m (\S+)", command)
  if match:
    return f"python -m {match.group(1)}"
  return " ".join(command.split())[:60] or "pytest"


def read_profile(path: str) -> dict:
  """{"total": samples, "categories": Counter, "kinds": Counter, "imports": {pid: (kind,
  samples)}} from a py-spy raw file (folded stacks; command lines may span lines)."""
  with open(path, encoding="utf-8", errors="replace") as f:
    text = f.read()
  categories, kinds = collections.Counter(), collections.Counter()
  imports = collections.defaultdict(lambda: ["", 0])
  total = 0
  for stack, count in _ENTRY.findall(text):
    count = int(count)
    total += count
    processes = _PROCESS.findall(stack)
    pid, command = processes[-1] if processes else ("?", "")
    kind = process_kind(command)
    kinds[kind] += count
    name = next((n for n, frame in CATEGORIES if frame in stack), "other")
    categories[name] += count
    if name == "import":
      imports[pid][0] = kind
      imports[pid][1] += count
  return {"total": total, "categories": categories, "kinds": kinds, "imports": dict(imports)}


def report(profile: dict) -> str:
  total = max(profile["total"], 1)
  lines = [f"{profile['total']} samples ({profile['total'] / RATE:.0f} s of running threads)",
           "", "share of samples by category:"]
  lines += [f"  {n:<24} {c / total:6.1%}" for n, c in profile["categories"].most_common()]
  lines += ["", "share of samples by process kind:"]
  lines += [f"  {n:<48} {c / total:6.1%}" for n, c in profile["kinds"].most_common(12)]
  per_kind = collections.defaultdict(list)
  for kind, count in profile["imports"].values():
    per_kind[kind].append(count)
  lines += ["", "imports per process:"]
  for kind, counts in sorted(per_kind.items(), key=lambda kv: -sum(kv[1])):
    lines.append(f"  {kind:<48} {len(counts):3d} processes, "
                 f"{sum(counts) / len(counts) / RATE:5.1f} s each")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", help="run the suite under py-spy and write the raw profile here")
  parser.add_argument("--read", help="only read this raw profile")
  parser.add_argument("--workers", type=int, default=2, help="pytest-xdist workers")
  args = parser.parse_args(argv)
  if bool(args.out) == bool(args.read):
    parser.error("give exactly one of --out and --read")
  path = args.read
  if args.out:
    py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=sys.prefix + "/bin")
    if py_spy is None:
      parser.error("py-spy is not installed: python -m pip install py-spy")
    subprocess.run([py_spy, "record", "-o", args.out, "-f", "raw", "--subprocesses", "-r",
                    str(RATE), "--nonblocking", "--", sys.executable, "-m", "pytest", "-q",
                    "-p", "no:cacheprovider", "-n", str(args.workers), "--dist", "worksteal",
                    "tests"], check=False)
    path = args.out
  print(report(read_profile(path)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
