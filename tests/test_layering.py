"""Imports run one way: experiments -> configs -> trainers (remedis_jax) -> data_pipelines.

Within a label-fraction sweep too: the command (label_fraction_sweep) -> the Ray executor
(sweep_ray) -> running (sweep_run) -> the plan (sweep_plan) -> the aggregation (sweep_results).

Read from the source (every import statement, module level or inside a function), so a new
import against the direction fails here before it makes a cycle.
"""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def imported_packages(folder):
  """{file: top-level packages it imports}, for every .py file under `folder`."""
  out = {}
  for root, _, names in os.walk(os.path.join(REPO, folder)):
    for name in names:
      if not name.endswith(".py"):
        continue
      path = os.path.join(root, name)
      with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
      found = set()
      for node in ast.walk(tree):
        if isinstance(node, ast.Import):
          found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
          found.add(node.module.split(".")[0])
      out[os.path.relpath(path, REPO)] = found
  return out


@pytest.mark.parametrize("folder, forbidden", [
    ("data_pipelines", {"remedis_jax", "experiments", "configs"}),
    ("remedis_jax", {"experiments", "configs"}),
    ("configs", {"experiments"}),
])
def test_imports_run_one_way(folder, forbidden):
  wrong = {path: sorted(found & forbidden) for path, found in imported_packages(folder).items()
           if found & forbidden}
  assert not wrong, f"{folder} imports what depends on it: {wrong}"


def imported_modules(path, package="remedis_jax"):
  """The modules of `package` (`package.x`) that one file imports."""
  with open(os.path.join(REPO, path), encoding="utf-8") as f:
    tree = ast.parse(f.read(), path)
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      found.add(node.module)
      found.update(f"{node.module}.{alias.name}" for alias in node.names)
  return {name for name in found if name.startswith(package + ".")}


TRAINERS = {"remedis_jax.pretraining", "remedis_jax.supervised", "remedis_jax.train_simclr",
            "remedis_jax.train_cluster", "remedis_jax.train_gmml", "remedis_jax.train_finetune",
            "remedis_jax.train_segment"}


@pytest.mark.parametrize("path, forbidden", [
    # The shared core: what every trainer calls; it calls no trainer.
    ("remedis_jax/train_state.py", TRAINERS | {"remedis_jax.writers", "remedis_jax.loop"}),
    ("remedis_jax/loop.py", TRAINERS),
    ("remedis_jax/checkpointing.py", TRAINERS),
    ("remedis_jax/optimizers.py", TRAINERS),
    ("remedis_jax/sharding.py", TRAINERS),
    # Supervised training does not reach into pretraining for shared pieces.
    ("remedis_jax/supervised.py", {"remedis_jax.pretraining"}),
    ("remedis_jax/train_finetune.py", {"remedis_jax.pretraining"}),
    ("remedis_jax/train_segment.py", {"remedis_jax.pretraining", "remedis_jax.train_finetune"}),
])
def test_the_shared_core_imports_no_trainer(path, forbidden):
  wrong = sorted(imported_modules(path) & forbidden)
  assert not wrong, f"{path} imports {wrong}"


# Each module of a sweep may import only those before it.
SWEEP_MODULES = ("sweep_results", "sweep_plan", "sweep_run", "sweep_ray", "label_fraction_sweep")


@pytest.mark.parametrize("index", range(len(SWEEP_MODULES)))
def test_sweep_modules_import_one_way(index):
  path = f"experiments/{SWEEP_MODULES[index]}.py"
  later = {f"experiments.{name}" for name in SWEEP_MODULES[index + 1:]}
  wrong = sorted(imported_modules(path, "experiments") & later)
  assert not wrong, f"{path} imports what depends on it: {wrong}"


def test_sweeps_studies_and_reports_load_no_jax():
  """They plan, run runs as processes and read results: JAX loads in the runs, not here."""
  import json  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  modules = ["experiments.label_fraction_sweep", "experiments.sweep_plan",
             "experiments.sweep_run", "experiments.sweep_results", "experiments.sweep_ray",
             "experiments.study", "experiments.ood_study", "experiments.convergence_report",
             "experiments.robustness_report", "remedis_jax.run_files"]
  code = ("import importlib, json, sys\n"
          f"for name in {modules!r}:\n"
          "  importlib.import_module(name)\n"
          "print(json.dumps(sorted(m for m in ('jax', 'flax', 'tensorflow') if m in sys.modules)))\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       check=True, timeout=120)
  assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_only_the_savedmodel_export_imports_tensorflow_and_nothing_imports_torch():
  """The runtime is TensorFlow- and PyTorch-free: TensorFlow (and orbax-export, which needs it)
  only in remedis_jax/export_savedmodel.py, loaded by `--format=savedmodel` alone; the timm
  export writes PyTorch's files with NumPy. (experiments/benchmarks/ has PyTorch peers.)"""
  found = {}
  for folder in ("remedis_jax", "data_pipelines", "configs"):
    for path, packages in imported_packages(folder).items():
      heavy = packages & {"tensorflow", "torch", "timm", "torchvision"}
      if heavy:
        found[path] = sorted(heavy)
  assert found == {os.path.join("remedis_jax", "export_savedmodel.py"): ["tensorflow"]}
