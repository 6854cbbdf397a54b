"""remedis_jax/compilation_cache.py: every run starts with JAX's persistent compilation cache, in
its workdir by default; a second start of the same config loads its programs from there."""

import os
import re
import subprocess
import sys

from remedis_jax import compilation_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUMMARY = re.compile(r"Compilation: (\d+) program\(s\) loaded from the cache, (\d+) compiled, "
                     r"([\d.]+) s compiling or loading \((.*)\)\.")


def test_where_the_cache_lives():
  assert compilation_cache.cache_dir("", "/runs/a") == "/runs/a/compilation_cache"
  assert compilation_cache.cache_dir(" OFF ", "/runs/a") is None
  assert compilation_cache.cache_dir("gs://bucket/jax", "/runs/a") == "gs://bucket/jax"
  assert compilation_cache.cache_dir("/shared/jax", "gs://bucket/run") == "/shared/jax"
  assert compilation_cache.cache_dir("", "gs://bucket/run") == "gs://bucket/run/compilation_cache"


def _start(workdir, *overrides):
  """One `remedis_jax.main` process (a tiny fine-tuning run); returns its compilation summary."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  command = [sys.executable, "-m", "remedis_jax.main", "--config=configs/finetune.py:smoke",
             f"--workdir={workdir}", "--config.total_steps=1", "--config.mesh.devices=1",
             "--config.robustness.perturbations=()", *overrides]
  out = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  found = SUMMARY.findall(out.stderr)
  assert len(found) == 1, out.stderr[-3000:]
  hits, misses, seconds, where = found[0]
  return int(hits), int(misses), float(seconds), where


def test_a_second_start_loads_its_programs_from_the_cache(tmp_path):
  first = tmp_path / "first"
  hits, misses, seconds, where = _start(first)
  cache = first / compilation_cache.SUBDIR
  assert where == f"persistent cache {cache}"
  assert hits == 0 and misses >= 1
  assert len(os.listdir(cache)) >= 1  # the compiled programs, one file each
  # Another run of the same config pointed at that cache: every program it compiled comes
  # from there. (The seconds are wall time on a shared machine; loading is ~10x faster than
  # compiling these programs on CPU, so the comparison has a wide margin.)
  again = _start(tmp_path / "second", f"--config.compilation_cache_dir={cache}")
  assert again[0] >= misses and again[1] == 0, again
  assert again[2] < seconds, (again, seconds)


def test_off_turns_no_cache_on(tmp_path):
  """In a process without a cache configured (this one has the suite's): none is turned on."""
  code = ("import jax\n"
          "from remedis_jax import compilation_cache\n"
          f"assert compilation_cache.enable_for_run('off', {str(tmp_path)!r}) is None\n"
          "assert not jax.config.jax_compilation_cache_dir\n"
          f"assert compilation_cache.enable_for_run('', {str(tmp_path)!r}) == "
          f"{str(tmp_path / compilation_cache.SUBDIR)!r}\n")
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True, timeout=120)
