"""The test-suite profile reader (experiments/benchmarks/test_suite_profile.py) on a py-spy raw
file written here: categories, process kinds and per-process import time."""
from experiments.benchmarks import test_suite_profile as profile

RAW = (
    # an xdist worker: 10 samples importing, 5 tracing (inside an import-free stack)
    'process 1:"";process 2:"/v/bin/python -u -c import sys;exec(eval(sys.stdin.readline()))";'
    "<module> (x.py:1);_find_and_load (<frozen importlib._bootstrap>:1176) 10\n"
    'process 1:"";process 2:"/v/bin/python -u -c import sys;exec(eval(sys.stdin.readline()))";'
    "run (a.py:3);trace_to_jaxpr (jax/_src/interpreters/partial_eval.py:9) 5\n"
    # a training subprocess whose command line spans two lines: 25 importing, 4 saving
    'process 1:"";process 3:"/v/bin/python -m remedis_jax.main --config=c.py\n--workdir=w";'
    "<module> (main.py:1);_find_and_load (<frozen importlib._bootstrap>:1176) 25\n"
    'process 1:"";process 3:"/v/bin/python -m remedis_jax.main --config=c.py\n--workdir=w";'
    "run (p.py:2);CheckpointManager.save (orbax/checkpoint_manager.py:1) 4\n"
    # a Grain worker, and a sample no category claims
    'process 1:"";process 4:"/v/bin/python -B -c from multiprocessing.spawn import spawn_main";'
    "run (w.py:1);ShuffleMapDataset.__getitem__ (shuffle.py:7) 6\n"
)


def test_categories_kinds_and_imports_per_process(tmp_path):
  path = tmp_path / "suite.raw"
  path.write_text(RAW)
  result = profile.read_profile(str(path))
  assert result["total"] == 50
  assert dict(result["categories"]) == {"import": 35, "JAX tracing": 5, "Orbax save": 4,
                                        "other": 6}
  assert dict(result["kinds"]) == {"pytest-xdist worker": 15, "python -m remedis_jax.main": 29,
                                   "Grain worker process": 6}
  assert result["imports"] == {"2": ["pytest-xdist worker", 10],
                               "3": ["python -m remedis_jax.main", 25]}
  text = " ".join(profile.report(result).split())
  assert "import 70.0%" in text and "Orbax save 8.0%" in text
  assert "python -m remedis_jax.main 1 processes, 1.0 s each" in text  # 25 samples at 25 Hz
