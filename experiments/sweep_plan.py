"""Plan of a label-fraction sweep: the grid of fine-tuning runs a sweep config asks for, and the
checks of that config before any run starts.

A sweep config (configs/sweeps/*.py; its keys: the docstring of experiments/label_fraction_sweep.py)
becomes a list of `Run`s: inits x label_fractions x seeds, plus the baseline cell. `validate`
checks the whole grid (unknown init, fraction outside (0, 1], missing checkpoint, a typo in
`overrides`, bad test sets) before anything is written; `write_plan` records the grid in
WORKDIR/sweep_plan.json and `list_runs` reads it back for the reports.

Imports no JAX (`validate(check_runs=True)` loads the fine-tuning trainer only then).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import os
import re
from typing import Any, Iterable, Sequence

import ml_collections

from configs import common
from experiments import sweep_results
from data_pipelines import storage

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRATCH = ("", "none", "scratch")
FINETUNE_MODES = ("", "full", "linear")
PLAN_FILE = "sweep_plan.json"
_INIT_NAME = re.compile(r"^[A-Za-z0-9_\-+]+$")


@dataclasses.dataclass(frozen=True)
class Run:
  """One fine-tuning run of the grid.

  Attributes:
    init: the init's name in the sweep config.
    init_path: `config.model.init` ("" for scratch; absolute otherwise).
    label_fraction: share of the training labels.
    seed: `config.seed` and `config.label_fraction_seed`.
    run_id: "init=<name>/frac=<f>/seed=<s>", also the run's folder under the sweep workdir.
    overrides: flat dotted key -> value applied to the base config (sweep overrides + the run's).
  """
  init: str
  init_path: str
  label_fraction: float
  seed: int
  run_id: str
  overrides: tuple[tuple[str, Any], ...]


def run_id(init: str, label_fraction: float, seed: int) -> str:
  return f"init={init}/frac={label_fraction:g}/seed={seed}"


# ------------------------------------------------------------------------------- config files
def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """`path/to/config.py[:arg]` -> `get_config(arg)`; relative paths: cwd, then the repo root.

  Raises:
    FileNotFoundError: the file does not exist.
    ValueError: the file has no get_config (or get_config rejects the argument).
  """
  path, _, arg = str(spec).partition(":")
  candidates = [path] if os.path.isabs(path) else [path, os.path.join(REPO_ROOT, path)]
  found = next((p for p in candidates if os.path.isfile(p)), None)
  if found is None:
    raise FileNotFoundError(f"config file {path!r} (from {spec!r}) does not exist; looked in "
                            f"{', '.join(os.path.abspath(c) for c in candidates)}")
  module_spec = importlib.util.spec_from_file_location(
      "_sweep_loaded_config_" + re.sub(r"\W", "_", os.path.abspath(found)), found)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"{found} has no get_config()")
  return module.get_config(arg) if arg else module.get_config()


def resolve_config_path(spec: str) -> str:
  """The base spec with an absolute file path (for job lists that run from anywhere)."""
  path, sep, arg = str(spec).partition(":")
  if not os.path.isabs(path) and not os.path.isfile(path):
    path = os.path.join(REPO_ROOT, path)
  return os.path.abspath(path) + sep + arg


def flatten(config: ml_collections.ConfigDict | dict, prefix: str = "") -> dict[str, Any]:
  """Nested ConfigDict -> {"a.b.c": leaf}."""
  items = config.items() if isinstance(config, (dict, ml_collections.ConfigDict)) else ()
  flat = {}
  for key, value in items:
    name = f"{prefix}{key}"
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      flat.update(flatten(value, name + "."))
    else:
      flat[name] = value
  return flat


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[tuple[str, Any]],
                    *, where: str = "overrides") -> ml_collections.ConfigDict:
  """Sets dotted keys on a copy of `config`; a key the config lacks is an error.

  Raises:
    KeyError: the key does not exist in the base config.
    TypeError: the value's type does not fit the field.
  """
  # A deep copy: ConfigDict(config) shares the nested blocks, so setting `model.name` for one
  # run would leak into every later run built from the same base.
  return common.override(copy.deepcopy(config), overrides, where=f"sweep config {where}")


# --------------------------------------------------------------------------- plan + validate
# Keys every run gets from the grid itself; an init's overrides may not set them.
GRID_KEYS = ("model.init", "label_fraction", "label_fraction_seed", "seed")


def init_overrides(sweep_config: ml_collections.ConfigDict) -> dict[str, dict[str, Any]]:
  """`sweep_config.init_overrides` as {init name: {dotted key: value}} ({} when absent).

  Accepts nested blocks (`{"gmml_vit": {"model": {"name": "ViT-tiny/4"}}}`, what a ConfigDict
  holds) and, in a plain dict, dotted keys (`{"gmml_vit": {"model.name": "ViT-tiny/4"}}`).

  Raises:
    ValueError: an entry that is not a block of keys.
  """
  per_init = sweep_config.get("init_overrides") or {}
  flat = {}
  for name, block in per_init.items():
    if not isinstance(block, (dict, ml_collections.ConfigDict)):
      raise ValueError(f"sweep config init_overrides.{name}={block!r}: expected a block of "
                       f"config keys, e.g. init_overrides.{name}.model.name='ViT-tiny/4'")
    flat[name] = flatten(block)
  return flat


def plan_runs(sweep_config: ml_collections.ConfigDict) -> list[Run]:
  """The grid: inits x label_fractions x seeds, plus the baseline cell if the grid lacks it.

  Ordered by init, then fraction, then seed. Does not check anything (see `validate`).
  """
  fractions = [float(f) for f in sweep_config.label_fractions]
  inits = {name: str(path if path is not None else "") for name, path in
           sweep_config.inits.items()}
  cells = [(name, f) for name in inits for f in fractions]
  baseline_cell = (sweep_config.baseline, float(sweep_config.baseline_fraction))
  if baseline_cell[0] in inits and baseline_cell not in cells:
    cells.append(baseline_cell)
  cells.sort(key=lambda c: (list(inits).index(c[0]), c[1]))
  shared = flatten(sweep_config.overrides)
  per_init = init_overrides(sweep_config)
  runs = []
  for name, fraction in cells:
    path = inits[name].strip()
    path = "" if path.lower() in SCRATCH else storage.absolute(path)
    for seed in sweep_config.seeds:
      overrides = dict(shared)
      if sweep_config.finetune_mode:
        overrides["finetune_mode"] = sweep_config.finetune_mode
      overrides.update(per_init.get(name, {}))  # the init's own keys win over the shared ones
      overrides.update({"model.init": path, "label_fraction": fraction,
                        "label_fraction_seed": int(seed), "seed": int(seed)})
      runs.append(Run(name, path, fraction, int(seed), run_id(name, fraction, int(seed)),
                      tuple(overrides.items())))
  return runs


def check_init_path(name: str, path: str) -> None:
  """A cheap existence check of one init, local or a URL (nothing is loaded).

  Raises:
    FileNotFoundError: the path is missing or holds no checkpoint, naming the init and the fix.
  """
  fix = (f"fix --config.inits.{name}=... (a BiT .npz, a pretraining workdir with checkpoints/, "
         "an export folder with model.json, or '' for scratch)")
  if path.lower() in SCRATCH:
    return
  if not storage.exists(path):
    raise FileNotFoundError(f"sweep config inits.{name}={path!r} does not exist; {fix}")
  if path.endswith(".npz"):
    if not storage.isfile(path):
      raise FileNotFoundError(f"sweep config inits.{name}={path!r} is not a file; {fix}")
    return
  if storage.isfile(storage.join(path, "model.json")):
    return  # an export (remedis_jax.export.METADATA_FILE)
  checkpoints = storage.join(path, "checkpoints")
  if not storage.isdir(checkpoints):
    checkpoints = path
  steps = [d for d in (storage.listdir(checkpoints) if storage.isdir(checkpoints) else ())
           if d.isdigit()]
  if not steps:
    raise FileNotFoundError(f"sweep config inits.{name}={path!r} holds no checkpoint (no "
                            f"model.json and no checkpoints/<step>/ folder); {fix}")


def validate(sweep_config: ml_collections.ConfigDict, runs: Sequence[Run] | None = None, *,
             check_runs: bool = True) -> list[Run]:
  """Checks the whole sweep before anything runs or is written.

  Args:
    sweep_config: a sweep config (see the module docstring).
    runs: the planned runs (default: `plan_runs(sweep_config)`).
    check_runs: also build every run's fine-tuning config and pass it through
      `train_finetune.check_config` (imports JAX; catches bad test sets, modes, ...).

  Returns:
    The runs.

  Raises:
    ValueError / KeyError / TypeError / FileNotFoundError: naming the sweep config key, the
      value and the fix.
  """
  fractions = list(sweep_config.label_fractions)
  if not fractions:
    raise ValueError("sweep config label_fractions is empty; e.g. (0.01, 0.1, 1.0)")
  for f in fractions:
    if not isinstance(f, (int, float)) or isinstance(f, bool) or not 0.0 < float(f) <= 1.0:
      raise ValueError(f"sweep config label_fractions has {f!r}; every fraction must be in "
                       "(0, 1] (0.01 = 1% of the labels, 1.0 = all)")
  if len({float(f) for f in fractions}) != len(fractions):
    raise ValueError(f"sweep config label_fractions has duplicates: {tuple(fractions)}")
  seeds = list(sweep_config.seeds)
  if not seeds or any(not isinstance(s, int) or isinstance(s, bool) for s in seeds):
    raise ValueError(f"sweep config seeds={tuple(seeds)!r}; give one or more integers, e.g. "
                     "(0, 1, 2)")
  if len(set(seeds)) != len(seeds):
    raise ValueError(f"sweep config seeds has duplicates: {tuple(seeds)}")
  if not sweep_config.inits:
    raise ValueError("sweep config inits is empty; e.g. inits.scratch='' and "
                     "inits.remedis='workdirs/quickstart/pretrain_simclr'")
  for name, path in sweep_config.inits.items():
    if not _INIT_NAME.match(name):
      raise ValueError(f"sweep config inits.{name}: names become folder names; use letters, "
                       "digits, '_', '-' or '+'")
    if path is not None and not isinstance(path, str):
      raise ValueError(f"sweep config inits.{name}={path!r}: expected a path string ('' for "
                       "scratch)")
    check_init_path(name, str(path or "").strip())
  if sweep_config.baseline not in sweep_config.inits:
    raise ValueError(f"sweep config baseline={sweep_config.baseline!r} is not one of the inits "
                     f"({', '.join(sweep_config.inits.keys())}); unknown init")
  if not 0.0 < float(sweep_config.baseline_fraction) <= 1.0:
    raise ValueError(f"sweep config baseline_fraction={sweep_config.baseline_fraction} must be "
                     "in (0, 1]")
  if sweep_config.metric not in sweep_results.METRICS:
    raise ValueError(f"sweep config metric={sweep_config.metric!r}; expected one of "
                     f"{tuple(sweep_results.METRICS)}")
  if float(sweep_config.match_tolerance) < 0:
    raise ValueError(f"sweep config match_tolerance={sweep_config.match_tolerance} must be >= 0")
  if sweep_config.finetune_mode not in FINETUNE_MODES:
    raise ValueError(f"sweep config finetune_mode={sweep_config.finetune_mode!r}; expected one "
                     f"of {FINETUNE_MODES} ('' keeps the base config's)")
  per_init = init_overrides(sweep_config)
  for name, overrides in per_init.items():
    if name not in sweep_config.inits:
      raise ValueError(f"sweep config init_overrides.{name}: {name!r} is not one of the inits "
                       f"({', '.join(sweep_config.inits.keys())}); unknown init")
    grid_keys = sorted(set(overrides) & set(GRID_KEYS))
    if grid_keys:
      raise ValueError(f"sweep config init_overrides.{name} sets {grid_keys}, which the grid "
                       f"sets for every run; use inits.{name}, label_fractions or seeds instead")
  base = load_config_file(sweep_config.base)
  if base.get("trainer") != "finetune":
    raise ValueError(f"sweep config base={sweep_config.base!r} is a {base.get('trainer')!r} "
                     "config; a label-fraction sweep needs a fine-tuning config "
                     "(configs/finetune.py:<variant>)")
  for name, overrides in per_init.items():
    apply_overrides(base, overrides.items(), where=f"init_overrides.{name}")
  runs = plan_runs(sweep_config) if runs is None else list(runs)
  for run in runs:
    config = apply_overrides(base, run.overrides)  # raises on unknown keys
    if check_runs:
      from remedis_jax import train_finetune  # pylint: disable=g-import-not-at-top
      try:
        train_finetune.check_config(config)
      except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"run {run.run_id}: {e}") from None
  if check_runs and runs:
    # Every run reads the same data: open its training split once now (a missing file or
    # an empty data.path fails here, not in each of N runs).
    from data_pipelines import sources  # pylint: disable=g-import-not-at-top
    config = apply_overrides(base, runs[0].overrides)
    try:
      sources.build_source(config.data, config.data.train_split)
    except (ValueError, OSError, KeyError) as e:
      raise type(e)(f"sweep config base={sweep_config.base!r} + overrides: the training data "
                    f"cannot be opened ({e}); set e.g. --config.overrides.data.path=...") from None
  return runs


def build_run_config(sweep_config: ml_collections.ConfigDict, run: Run,
                     base: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
  """The fine-tuning config of one run (what the subprocess gets from its command line)."""
  base = load_config_file(sweep_config.base) if base is None else base
  return apply_overrides(base, run.overrides)


# ----------------------------------------------------------------------------- plan file
def write_plan(sweep_config: ml_collections.ConfigDict, runs: Sequence[Run], workdir: str
               ) -> None:
  """WORKDIR/sweep_plan.json: the sweep config and every run of the grid (read by `list_runs`)."""
  plan = {"format": "remedis-jax-sweep-plan/1", "sweep_config": sweep_config.to_dict(),
          "runs": [{"run_id": r.run_id, "init": r.init, "init_path": r.init_path,
                    "label_fraction": r.label_fraction, "seed": r.seed,
                    "overrides": dict(r.overrides)} for r in runs]}
  storage.write_text(storage.join(workdir, PLAN_FILE), json.dumps(plan, indent=1, default=str))


_RUN_FOLDER = re.compile(r"^init=(?P<init>[A-Za-z0-9_\-+]+)/frac=(?P<fraction>[0-9.eE+\-]+)/"
                         r"seed=(?P<seed>-?\d+)$")


def list_runs(workdir: str) -> tuple[dict[str, Any], list[Run]]:
  """The runs of an existing sweep folder, for reports that get only --workdir.

  Reads WORKDIR/sweep_plan.json (written by --mode=run, joblist and aggregate), so runs that
  never started are listed too. Without a plan, the run folders init=<name>/frac=<f>/seed=<s>
  that exist are listed (a run that never started cannot be known then).

  Args:
    workdir: the sweep's folder.

  Returns:
    (the sweep config as stored in the plan, {} without a plan; the runs in plan order, or
    sorted by init, fraction and seed without a plan).

  Raises:
    FileNotFoundError: the folder does not exist, or holds neither a plan nor a run folder.
  """
  workdir = storage.absolute(workdir)
  if not storage.isdir(workdir):
    raise FileNotFoundError(f"sweep folder {workdir} does not exist; give the --workdir of "
                            "experiments.label_fraction_sweep")
  plan_path = storage.join(workdir, PLAN_FILE)
  if storage.isfile(plan_path):
    plan = storage.read_json(plan_path)
    runs = [Run(r["init"], r.get("init_path", ""), float(r["label_fraction"]), int(r["seed"]),
                r["run_id"], tuple((r.get("overrides") or {}).items())) for r in plan["runs"]]
    return plan.get("sweep_config") or {}, runs
  runs = []
  # Folder by folder rather than one glob: a URL pattern may have wildcards in its last part only.
  for relative in _subfolders(workdir, "init=", "frac=", "seed="):
    match = _RUN_FOLDER.match(relative)
    if match:
      runs.append(Run(match["init"], "", float(match["fraction"]), int(match["seed"]),
                      relative, ()))
  if not runs:
    raise FileNotFoundError(f"{workdir} holds no {PLAN_FILE} and no run folder "
                            "init=<name>/frac=<f>/seed=<s>; is it a label-fraction sweep's "
                            "--workdir?")
  runs.sort(key=lambda r: (r.init, r.label_fraction, r.seed))
  return {}, runs


def _subfolders(root: str, *prefixes: str) -> list[str]:
  """Relative paths "a/b/c" of the folders under `root` whose name at level i starts with
  prefixes[i]."""
  found = [""]
  for prefix in prefixes:
    found = [f"{parent}/{name}".lstrip("/") for parent in found
             for name in storage.listdir(storage.join(root, parent))
             if name.startswith(prefix) and storage.isdir(storage.join(root, parent, name))]
  return found

