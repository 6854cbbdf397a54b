"""The per-test CPU-time plugin and its reader (experiments/benchmarks/test_cpu_times.py).

The plugin runs inside a small pytest process on two generated tests: one burns CPU in the test
process, the other in a child process; the reader is checked on records written here."""
import json
import os
import subprocess
import sys

import pytest

from experiments.benchmarks import test_cpu_times

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BURN = "import time\nstart = time.process_time()\nwhile time.process_time() - start < 0.3: pass\n"
TESTS = f'''
import subprocess, sys

def test_burns_here():
{"".join("  " + line + chr(10) for line in BURN.splitlines())}
def test_burns_in_a_child():
  subprocess.run([sys.executable, "-c", {BURN!r}], check=True)
'''


def test_plugin_records_own_and_child_cpu_per_test(tmp_path):
  (tmp_path / "test_generated.py").write_text(TESTS)
  out = tmp_path / "cpu.jsonl"
  # Not this session's pytest-xdist settings (PYTEST_XDIST_WORKER would name a worker).
  env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
  env.update({"PYTHONPATH": REPO, test_cpu_times.OUT_ENV: str(out)})
  result = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
       "experiments.benchmarks.test_cpu_times", str(tmp_path / "test_generated.py")],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stdout + result.stderr
  here, child = test_cpu_times.read_records(str(out))
  assert here["test"].endswith("::test_burns_here") and child["test"].endswith("_in_a_child")
  assert here["self_cpu"] >= 0.28 and here["child_cpu"] == 0.0
  assert child["child_cpu"] >= 0.28 and child["self_cpu"] < 0.28
  for record in (here, child):
    assert record["wall"] >= 0.28 and record["worker"] == ""


def test_summary_totals_modules_and_workers():
  records = [
      {"test": "tests/a.py::one", "worker": "gw0", "start": 100.0, "wall": 10.0,
       "self_cpu": 8.0, "child_cpu": 0.0},
      {"test": "tests/a.py::two", "worker": "gw1", "start": 100.5, "wall": 30.0,
       "self_cpu": 1.0, "child_cpu": 40.0},
      {"test": "tests/b.py::three", "worker": "gw0", "start": 110.0, "wall": 5.0,
       "self_cpu": 5.0, "child_cpu": 0.0},
  ]
  summary = test_cpu_times.summarize(records, top=2)
  assert summary["tests"] == 3 and summary["self_cpu"] == 14.0 and summary["child_cpu"] == 40.0
  assert [r["test"] for r in summary["top_tests"]] == ["tests/a.py::two", "tests/a.py::one"]
  assert summary["top_modules"] == [("tests/a.py", 49.0, 40.0, 2), ("tests/b.py", 5.0, 5.0, 1)]
  assert summary["workers"] == {"gw0": {"finished_at": 15.0, "cpu": 13.0, "tests": 2},
                                "gw1": {"finished_at": 30.5, "cpu": 41.0, "tests": 1}}
  text = test_cpu_times.format_summary(summary)
  assert text.startswith("3 tests: 54 CPU s (14 in the pytest processes, 40 in their")
  worker_lines = [line.split() for line in text.splitlines() if line.startswith("  gw")]
  assert worker_lines == [["gw0", "2", "tests,", "13", "CPU", "s,", "last", "test", "ended", "at",
                           "15", "s"],
                          ["gw1", "1", "tests,", "41", "CPU", "s,", "last", "test", "ended", "at",
                           "30", "s"]]
  with pytest.raises(ValueError, match=test_cpu_times.OUT_ENV):
    test_cpu_times.summarize([])


def test_reader_skips_blank_lines(tmp_path):
  path = tmp_path / "cpu.jsonl"
  record = {"test": "t.py::x", "worker": "", "start": 0.0, "wall": 1.0, "self_cpu": 1.0,
            "child_cpu": 0.0}
  path.write_text(json.dumps(record) + "\n\n" + json.dumps(record) + "\n")
  assert test_cpu_times.read_records(str(path)) == [record, record]
