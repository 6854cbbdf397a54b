"""CPU seconds per test, subprocesses included: where `make test` spends its time.

  .venv/bin/python -m experiments.benchmarks.test_cpu_times --out=/tmp/cpu_times.jsonl
  .venv/bin/python -m experiments.benchmarks.test_cpu_times --read=/tmp/cpu_times.jsonl

The first form runs the suite as `make test` runs it (two pytest-xdist workers, worksteal) with
this module loaded as a pytest plugin, then prints the summary; the second only reads a file.
Every test appends one JSON line: its wall seconds and the CPU seconds (user + system) of the
worker process (`self_cpu`, its threads included) and of the child processes that ended during
the test (`child_cpu`: training subprocesses, Grain worker processes; a child still running when
the test ends is not counted).

Why CPU seconds: on a small machine the suite keeps every core busy, so its wall time is its
CPU time over the core count, and wall times of single tests move by +-30% with whatever else
runs. The summary
lists the tests and modules that cost the most CPU, and each worker's last finish, which shows
whether one worker idled at the end (a long test started late).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import subprocess
import sys
import time

OUT_ENV = "REMEDIS_TEST_CPU_TIMES"  # the JSON-lines file the plugin appends to


def _cpu(who: int) -> float:
  usage = resource.getrusage(who)
  return usage.ru_utime + usage.ru_stime


# --------------------------------------------------------------------- the pytest plugin
try:
  import pytest  # pylint: disable=g-import-not-at-top
except ImportError:  # only the reader is needed without pytest
  pytest = None

if pytest is not None:

  @pytest.hookimpl(hookwrapper=True)
  def pytest_runtest_protocol(item, nextitem):  # pylint: disable=unused-argument
    """Wraps setup, call and teardown of one test (module fixtures count for the first)."""
    out = os.environ.get(OUT_ENV)
    if not out:
      yield
      return
    start, own, children = time.time(), _cpu(resource.RUSAGE_SELF), _cpu(
        resource.RUSAGE_CHILDREN)
    yield
    record = {"test": item.nodeid, "worker": os.environ.get("PYTEST_XDIST_WORKER", ""),
              "start": start, "wall": time.time() - start,
              "self_cpu": _cpu(resource.RUSAGE_SELF) - own,
              "child_cpu": _cpu(resource.RUSAGE_CHILDREN) - children}
    with open(out, "a", encoding="utf-8") as f:
      f.write(json.dumps(record) + "\n")


# --------------------------------------------------------------------------- the reader
def read_records(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def summarize(records: list[dict], top: int = 20) -> dict:
  """Totals, the `top` tests and modules by CPU seconds, and per-worker finish times."""
  if not records:
    raise ValueError("no test records: was the suite run with the plugin and "
                     f"{OUT_ENV} set?")
  cpu = lambda r: r["self_cpu"] + r["child_cpu"]
  modules = collections.defaultdict(lambda: [0.0, 0.0, 0])
  for r in records:
    entry = modules[r["test"].split("::")[0]]
    entry[0] += cpu(r)
    entry[1] += r["wall"]
    entry[2] += 1
  t0 = min(r["start"] for r in records)
  workers = collections.defaultdict(lambda: [0.0, 0.0, 0])
  for r in records:
    entry = workers[r["worker"] or "main"]
    entry[0] = max(entry[0], r["start"] + r["wall"] - t0)
    entry[1] += cpu(r)
    entry[2] += 1
  return {
      "tests": len(records),
      "self_cpu": sum(r["self_cpu"] for r in records),
      "child_cpu": sum(r["child_cpu"] for r in records),
      "top_tests": sorted(records, key=cpu, reverse=True)[:top],
      "top_modules": sorted(((m, *v) for m, v in modules.items()), key=lambda x: -x[1])[:top],
      "workers": {w: {"finished_at": v[0], "cpu": v[1], "tests": v[2]}
                  for w, v in sorted(workers.items())},
  }


def format_summary(summary: dict) -> str:
  lines = [f"{summary['tests']} tests: {summary['self_cpu'] + summary['child_cpu']:.0f} CPU s "
           f"({summary['self_cpu']:.0f} in the pytest processes, {summary['child_cpu']:.0f} in "
           "their subprocesses)", "", "by worker (finish time from the first test's start):"]
  for worker, w in summary["workers"].items():
    lines.append(f"  {worker:6s} {w['tests']:4d} tests, {w['cpu']:6.0f} CPU s, "
                 f"last test ended at {w['finished_at']:6.0f} s")
  lines += ["", "modules by CPU seconds:      CPU s   wall s  tests"]
  for module, cpu, wall, count in summary["top_modules"]:
    lines.append(f"  {module:40s} {cpu:6.1f} {wall:7.1f} {count:5d}")
  lines += ["", "tests by CPU seconds:  wall s   self  children"]
  for r in summary["top_tests"]:
    lines.append(f"  {r['wall']:6.1f} {r['self_cpu']:6.1f} {r['child_cpu']:8.1f}  {r['test']}")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--out", help="run the suite with the plugin, appending to this file")
  parser.add_argument("--read", help="only summarize this file")
  parser.add_argument("--workers", default="2", help="pytest-xdist workers (as make test)")
  parser.add_argument("--dist", default="worksteal",
                      help="pytest-xdist schedule (make test: worksteal); loadfile and loadscope "
                           "keep tests/conftest.py's module order")
  parser.add_argument("--top", type=int, default=20)
  args = parser.parse_args(argv)
  if bool(args.out) == bool(args.read):
    parser.error("give exactly one of --out and --read")
  path = args.read
  if args.out:
    path = os.path.abspath(args.out)
    if os.path.exists(path):
      os.remove(path)
    env = dict(os.environ, **{OUT_ENV: path})
    # As `make test` does: let Python cache bytecode, or every test process compiles JAX, Flax
    # etc. again and the numbers are not the suite's.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "experiments.benchmarks.test_cpu_times",
               "-n", args.workers, "--dist", args.dist, "tests"]
    if args.dist in ("loadfile", "loadscope"):
      command.insert(-1, "--no-loadscope-reorder")  # keep tests/conftest.py's order
    print("$", " ".join(command), flush=True)
    start = time.time()
    result = subprocess.run(command, env=env, check=False)
    print(f"pytest exited with {result.returncode} after {time.time() - start:.0f} s")
  print(format_summary(summarize(read_records(path), top=args.top)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
