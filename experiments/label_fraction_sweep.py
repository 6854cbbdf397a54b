r"""Label-fraction sweep: fine-tune every (initialisation, label fraction, seed) and compare.

  python -m experiments.label_fraction_sweep --config=configs/sweeps/tiny.py \
    --workdir=workdirs/sweep_tiny [--parallel=2] [--mode=run|plan|joblist|aggregate]

The REMEDIS headline ("matches the supervised baseline with 1-33% of the labels") is the output
of this script: a grid over label fractions x initialisations x seeds of
`remedis_jax.train_finetune` runs, then one table and one plot.

The grid (sweep config, configs/sweeps/*.py):
  base                the fine-tuning config every run starts from, "configs/finetune.py:tiny".
  overrides           nested keys of the base config applied to every run (e.g. total_steps).
  init_overrides      init name -> nested keys applied to that init's runs only, after
                      `overrides` (e.g. a ViT init: init_overrides.gmml_vit.model.name=
                      "ViT-tiny/4", so scratch stays a ResNet); absent or empty: no change. A
                      name that is not in `inits`, or a key the grid sets itself (model.init,
                      label_fraction, label_fraction_seed, seed), is an error.
  label_fractions     shares of the training labels, each in (0, 1].
  seeds               one run per seed; a run uses it as `seed` (model init, augmentation, data
                      order) AND as `label_fraction_seed`, so every seed sees a different
                      labeled subset (nested across fractions within one seed). The std over
                      seeds therefore covers both optimisation noise and the choice of labels.
  inits               name -> `config.model.init`: "" (scratch), a BiT .npz, a pretraining
                      workdir, or an export folder. Relative paths are relative to the current
                      directory and are made absolute before any run starts.
  baseline            the init whose run at `baseline_fraction` (default: scratch at 100%) is the
                      reference; those runs are added to the grid if the fractions lack it.
  metric              "macro_auc" (column `auc`), "accuracy" or "balanced_accuracy".
  match_tolerance     an init "matches" the baseline at fraction f when its mean metric over
                      seeds at f is >= the baseline's mean - match_tolerance (0: no worse).
  finetune_mode       "" (the base config's), "full" or "linear".

Every run has its own folder WORKDIR/init=<name>/frac=<f>/seed=<s> (the run id). A run whose
results.json exists is skipped without starting anything; an interrupted one resumes from its
checkpoint (the fine-tuning trainer does that); a failed one (exception or non-zero exit) is
recorded in its folder (sweep_error.txt), reported in the summary and retried on the next call.
The whole grid is checked (unknown init, fraction outside (0, 1], missing checkpoint, a typo in
`overrides`, bad test sets) before any run starts or any file is written.

Modes:
  run        train the grid here: sequentially in this process (--parallel=1) or as N local
             `python -m remedis_jax.main` processes; then aggregate.
  plan       print the grid (run ids and their status) and exit.
  joblist    write WORKDIR/jobs.txt, one shell command per unfinished run, for a scheduler
             (SLURM array example printed); afterwards `--mode=aggregate`.
  aggregate  read the finished runs and write the outputs below.

Outputs (sweep_results.py): WORKDIR/results.csv and results.json (one row per run and test set;
mean/std over seeds per cell, std with ddof=1, 0 for one seed), data_efficiency.png (metric vs %
labels on a log axis, one line per init with +-1 std error bars, one panel per test set, the
baseline as a dashed line) and summary.md (the smallest label fraction at which each init
matches the baseline).

Compilation: every run of a grid compiles the same programs (same model, same batch shapes);
the sweep shares a persistent JAX compilation cache (WORKDIR/.jax_cache unless
JAX_COMPILATION_CACHE_DIR is set) so only the first run pays for XLA.
"""

from __future__ import annotations

import copy
import dataclasses
import glob
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import time
import traceback
from typing import Any, Iterable, Sequence

import ml_collections

from experiments import sweep_results

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("run", "plan", "joblist", "aggregate")
SCRATCH = ("", "none", "scratch")
FINETUNE_MODES = ("", "full", "linear")
PLAN_FILE = "sweep_plan.json"
JOBS_FILE = "jobs.txt"
ERROR_FILE = "sweep_error.txt"
LOG_FILE = "log.txt"
RESULTS_FILE = "results.json"  # supervised.RESULTS_FILE, without importing JAX here
CACHE_SUBDIR = ".jax_cache"
DEFAULT_LABEL_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
_INIT_NAME = re.compile(r"^[A-Za-z0-9_\-+]+$")


def default_sweep_config() -> ml_collections.ConfigDict:
  """The keys every sweep config has (configs/sweeps/*.py start from this)."""
  config = ml_collections.ConfigDict()
  config.base = "configs/finetune.py:tiny"
  config.overrides = ml_collections.ConfigDict()
  config.init_overrides = ml_collections.ConfigDict()
  config.label_fractions = DEFAULT_LABEL_FRACTIONS
  config.seeds = (0, 1, 2)
  config.inits = ml_collections.ConfigDict({"scratch": ""})
  config.baseline = "scratch"
  config.baseline_fraction = 1.0
  config.metric = "macro_auc"
  config.match_tolerance = 0.0
  config.finetune_mode = ""
  return config


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
  config = copy.deepcopy(config)
  for key, value in overrides:
    node = config
    *parents, leaf = key.split(".")
    for i, parent in enumerate(parents):
      if parent not in node or not isinstance(node[parent], ml_collections.ConfigDict):
        raise KeyError(f"sweep config {where}: {key!r} is not a key of the base config "
                       f"({'.'.join(parents[:i + 1])!r} is not a config block)")
      node = node[parent]
    if leaf not in node:
      raise KeyError(f"sweep config {where}: {key!r} is not a key of the base config; known keys "
                     f"there: {', '.join(sorted(node.keys()))}")
    try:
      node[leaf] = value
    except TypeError as e:
      raise TypeError(f"sweep config {where}: {key}={value!r} does not fit the base config "
                      f"field ({e})") from None
  return config


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
    path = "" if path.lower() in SCRATCH else (path if "://" in path else os.path.abspath(path))
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
  """A cheap existence check of one init (nothing is loaded).

  Raises:
    FileNotFoundError: the path is missing or holds no checkpoint, naming the init and the fix.
  """
  fix = (f"fix --config.inits.{name}=... (a BiT .npz, a pretraining workdir with checkpoints/, "
         "an export folder with model.json, or '' for scratch)")
  if path.lower() in SCRATCH or "://" in path:
    return
  if not os.path.exists(path):
    raise FileNotFoundError(f"sweep config inits.{name}={path!r} does not exist; {fix}")
  if path.endswith(".npz"):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"sweep config inits.{name}={path!r} is not a file; {fix}")
    return
  if os.path.isfile(os.path.join(path, "model.json")):
    return  # an export (remedis_jax.export.METADATA_FILE)
  checkpoints = os.path.join(path, "checkpoints") if os.path.isdir(
      os.path.join(path, "checkpoints")) else path
  steps = [d for d in (os.listdir(checkpoints) if os.path.isdir(checkpoints) else ())
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


def _flag_value(value: Any) -> str:
  """A config value as ml_collections.config_flags parses it back."""
  if isinstance(value, (tuple, list)):
    return repr(tuple(value))
  if isinstance(value, float):
    return repr(value)
  return str(value)


def run_command(sweep_config: ml_collections.ConfigDict, run: Run, workdir: str, *,
                python: str = sys.executable) -> list[str]:
  """argv of `python -m remedis_jax.main` for one run (to be started in REPO_ROOT)."""
  argv = [python, "-m", "remedis_jax.main", f"--config={resolve_config_path(sweep_config.base)}",
          f"--workdir={os.path.abspath(os.path.join(workdir, run.run_id))}"]
  argv += [f"--config.{key}={_flag_value(value)}" for key, value in run.overrides]
  return argv


# -------------------------------------------------------------------------------- running
@dataclasses.dataclass
class RunOutcome:
  run: Run
  status: str  # "finished" | "skipped" (finished before) | "failed" | "interrupted"
  wall_time_s: float = 0.0
  error: str = ""


def run_dir(workdir: str, run: Run) -> str:
  return os.path.join(workdir, run.run_id)


def is_finished(path: str) -> bool:
  results = os.path.join(path, RESULTS_FILE)
  if not os.path.isfile(results):
    return False
  try:
    with open(results, encoding="utf-8") as f:
      return bool(json.load(f).get("finished"))
  except (OSError, ValueError):
    return False


def compilation_cache_dir(workdir: str) -> str:
  """JAX_COMPILATION_CACHE_DIR when set (e.g. by the tests), else WORKDIR/.jax_cache."""
  return os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
      os.path.abspath(workdir), CACHE_SUBDIR)


def enable_compilation_cache(cache_dir: str, min_compile_time_s: float = 0.5) -> None:
  """Turns on JAX's persistent compilation cache in this process (if not configured already)."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.config.jax_compilation_cache_dir:
    return
  os.makedirs(cache_dir, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_time_s)
  try:
    # JAX decides once per process whether the cache is used, at the first compilation (e.g. the
    # quickstart's pretraining ran before the sweep): make it look again.
    from jax._src import compilation_cache  # pylint: disable=g-import-not-at-top
    compilation_cache.reset_cache()
  except (ImportError, AttributeError):  # a private API; without it the cache may stay off
    pass


def _record_failure(path: str, error: str) -> None:
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, ERROR_FILE), "w", encoding="utf-8") as f:
    f.write(error)


def _clear_failure(path: str) -> None:
  if os.path.exists(os.path.join(path, ERROR_FILE)):
    os.remove(os.path.join(path, ERROR_FILE))


def _run_in_process(sweep_config, runs: Sequence[Run], workdir: str, log) -> list[RunOutcome]:
  from remedis_jax import train_finetune  # pylint: disable=g-import-not-at-top
  base = load_config_file(sweep_config.base)
  outcomes = []
  for i, run in enumerate(runs):
    path = run_dir(workdir, run)
    log(f"[{i + 1}/{len(runs)}] {run.run_id}: fine-tuning -> {path}")
    start = time.time()
    try:
      results = train_finetune.train_and_evaluate(build_run_config(sweep_config, run, base), path)
    except Exception:  # pylint: disable=broad-except
      # One bad run must not lose the others; it is recorded and reported, never dropped.
      error = traceback.format_exc()
      _record_failure(path, error)
      outcomes.append(RunOutcome(run, "failed", time.time() - start, error.strip()))
      log(f"[{i + 1}/{len(runs)}] {run.run_id}: FAILED ({error.strip().splitlines()[-1]}); "
          f"traceback in {os.path.join(path, ERROR_FILE)}")
      continue
    status = "finished" if results.get("finished") else "interrupted"
    if status == "finished":
      _clear_failure(path)
    outcomes.append(RunOutcome(run, status, time.time() - start))
    log(f"[{i + 1}/{len(runs)}] {run.run_id}: {status} in {time.time() - start:.1f} s")
  return outcomes


def _run_subprocesses(sweep_config, runs: Sequence[Run], workdir: str, parallel: int, cache_dir,
                      python: str, log) -> list[RunOutcome]:
  env = dict(os.environ)
  env.setdefault("JAX_COMPILATION_CACHE_DIR", cache_dir)
  env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
  env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                   else "")
  pending = list(enumerate(runs))
  active: dict[int, tuple[subprocess.Popen, Run, float, Any]] = {}
  outcomes: dict[int, RunOutcome] = {}
  try:
    while pending or active:
      while pending and len(active) < parallel:
        i, run = pending.pop(0)
        path = run_dir(workdir, run)
        os.makedirs(path, exist_ok=True)
        log_file = open(os.path.join(path, LOG_FILE), "a", encoding="utf-8")
        process = subprocess.Popen(run_command(sweep_config, run, workdir, python=python),
                                   cwd=REPO_ROOT, env=env, stdout=log_file,
                                   stderr=subprocess.STDOUT)
        active[i] = (process, run, time.time(), log_file)
        log(f"[{i + 1}/{len(runs)}] {run.run_id}: started (pid {process.pid}, log "
            f"{os.path.join(path, LOG_FILE)})")
      time.sleep(0.2)
      for i in [i for i, (p, *_) in active.items() if p.poll() is not None]:
        process, run, start, log_file = active.pop(i)
        log_file.close()
        path, elapsed = run_dir(workdir, run), time.time() - start
        if process.returncode == 0 and is_finished(path):
          _clear_failure(path)
          outcomes[i] = RunOutcome(run, "finished", elapsed)
        elif process.returncode == 0:
          outcomes[i] = RunOutcome(run, "interrupted", elapsed)
        else:
          with open(os.path.join(path, LOG_FILE), encoding="utf-8", errors="replace") as f:
            tail = "".join(f.readlines()[-25:])
          error = f"exit status {process.returncode}; last lines of {LOG_FILE}:\n{tail}"
          _record_failure(path, error)
          outcomes[i] = RunOutcome(run, "failed", elapsed, error.strip())
        log(f"[{i + 1}/{len(runs)}] {run.run_id}: {outcomes[i].status} in {elapsed:.1f} s")
  finally:
    for process, *_ in active.values():  # interrupted sweep: stop only our own children
      process.terminate()
  return [outcomes[i] for i in sorted(outcomes)]


def write_job_list(sweep_config: ml_collections.ConfigDict, runs: Sequence[Run], workdir: str, *,
                   python: str = sys.executable) -> str:
  """WORKDIR/jobs.txt: one shell command per line (unfinished runs only).

  Each line is `cd <repo> && [env] python -m remedis_jax.main ...`; a line is independent of
  the others, so any scheduler can run them in any order or all at once.

  Returns:
    The path of the job list.
  """
  workdir = os.path.abspath(workdir)
  cache = f"JAX_COMPILATION_CACHE_DIR={shlex.quote(compilation_cache_dir(workdir))}"
  lines = [f"cd {shlex.quote(REPO_ROOT)} && {cache} "
           + " ".join(shlex.quote(a) for a in run_command(sweep_config, r, workdir, python=python))
           for r in runs if not is_finished(run_dir(workdir, r))]
  path = os.path.join(workdir, JOBS_FILE)
  with open(path, "w", encoding="utf-8") as f:
    f.write("".join(line + "\n" for line in lines))
  return path


def slurm_hint(jobs_path: str, num_jobs: int, sweep_spec: str, workdir: str) -> str:
  return (f"{num_jobs} jobs in {jobs_path}. With SLURM, one array task per line:\n"
          f"  sbatch --array=1-{num_jobs} --wrap 'bash -c \"$(sed -n \"${{SLURM_ARRAY_TASK_ID}}p\" "
          f"{jobs_path})\"'\n"
          f"or locally: xargs -P 2 -I{{}} bash -c {{}} < {jobs_path}\n"
          f"Then: python -m experiments.label_fraction_sweep --config={sweep_spec} "
          f"--workdir={workdir} --mode=aggregate")


def _write_plan(sweep_config, runs: Sequence[Run], workdir: str) -> None:
  plan = {"format": "remedis-jax-sweep-plan/1", "sweep_config": sweep_config.to_dict(),
          "runs": [{"run_id": r.run_id, "init": r.init, "init_path": r.init_path,
                    "label_fraction": r.label_fraction, "seed": r.seed,
                    "overrides": dict(r.overrides)} for r in runs]}
  with open(os.path.join(workdir, PLAN_FILE), "w", encoding="utf-8") as f:
    json.dump(plan, f, indent=1, default=str)


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
  workdir = os.path.abspath(workdir)
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"sweep folder {workdir} does not exist; give the --workdir of "
                            "experiments.label_fraction_sweep")
  plan_path = os.path.join(workdir, PLAN_FILE)
  if os.path.isfile(plan_path):
    with open(plan_path, encoding="utf-8") as f:
      plan = json.load(f)
    runs = [Run(r["init"], r.get("init_path", ""), float(r["label_fraction"]), int(r["seed"]),
                r["run_id"], tuple((r.get("overrides") or {}).items())) for r in plan["runs"]]
    return plan.get("sweep_config") or {}, runs
  runs = []
  for path in glob.glob(os.path.join(workdir, "init=*", "frac=*", "seed=*")):
    relative = os.path.relpath(path, workdir).replace(os.sep, "/")
    match = _RUN_FOLDER.match(relative)
    if match and os.path.isdir(path):
      runs.append(Run(match["init"], "", float(match["fraction"]), int(match["seed"]),
                      relative, ()))
  if not runs:
    raise FileNotFoundError(f"{workdir} holds no {PLAN_FILE} and no run folder "
                            "init=<name>/frac=<f>/seed=<s>; is it a label-fraction sweep's "
                            "--workdir?")
  runs.sort(key=lambda r: (r.init, r.label_fraction, r.seed))
  return {}, runs


def run_status(workdir: str, run: Run) -> str:
  """"finished" (results.json says so), "failed" (sweep_error.txt), "unfinished" (the folder
  exists: running, interrupted or preempted) or "missing" (never started)."""
  path = run_dir(workdir, run)
  if is_finished(path):
    return "finished"
  if os.path.isfile(os.path.join(path, ERROR_FILE)):
    return "failed"
  return "unfinished" if os.path.isdir(path) else "missing"


def run_sweep(sweep_config: ml_collections.ConfigDict, workdir: str, *, parallel: int = 1,
              mode: str = "run", python: str = sys.executable, verbose: bool = True,
              title: str = "", sweep_spec: str = "") -> dict[str, Any]:
  """Plans, validates, runs and aggregates a label-fraction sweep.

  Args:
    sweep_config: a sweep config (module docstring; configs/sweeps/*.py).
    workdir: the sweep's folder; one subfolder per run. Rerunning skips finished runs.
    parallel: 1 = sequential in this process; N > 1 = N `python -m remedis_jax.main` processes.
    mode: "run", "plan", "joblist" or "aggregate" (module docstring).
    python: the interpreter for subprocesses and job lists.
    verbose: print progress and where the outputs are.
    title: a title for the table and the plot (default: the base config).
    sweep_spec: how the user named the sweep config (for the printed aggregate command).

  Returns:
    A summary: {"mode", "workdir", "num_runs", "counts" (status -> runs), "runs" (run id ->
    status), "failed" (run id -> error), "wall_time_s"} plus, after aggregation, the
    sweep_results.write_outputs keys ("results_csv", "results_json", "plot", "table",
    "table_file", "matches", "cells"); with mode="joblist": "jobs_file".

  Raises:
    ValueError / KeyError / TypeError / FileNotFoundError: a bad sweep config, before anything
      is written.
  """
  start = time.time()
  log = print if verbose else (lambda *a, **k: None)
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}; expected one of {MODES}")
  if int(parallel) < 1:
    raise ValueError(f"parallel={parallel} must be >= 1 (1 = in this process)")
  runs = validate(sweep_config, check_runs=mode != "aggregate")
  workdir = os.path.abspath(workdir)
  status = {r.run_id: "finished" if is_finished(run_dir(workdir, r)) else "pending"
            for r in runs}
  summary: dict[str, Any] = {"mode": mode, "workdir": workdir, "num_runs": len(runs)}
  if mode == "plan":
    for r in runs:
      log(f"  {r.run_id:40s} {status[r.run_id]}")
    log(f"{len(runs)} runs, {sum(s == 'finished' for s in status.values())} finished")
    summary.update(runs=status, counts=_counts(status), failed={}, wall_time_s=0.0)
    return summary
  os.makedirs(workdir, exist_ok=True)
  _write_plan(sweep_config, runs, workdir)

  if mode == "joblist":
    path = write_job_list(sweep_config, runs, workdir, python=python)
    num_jobs = sum(s != "finished" for s in status.values())
    log(slurm_hint(path, num_jobs, sweep_spec or "<sweep config>", workdir))
    summary.update(jobs_file=path, runs=status, counts=_counts(status), failed={},
                   wall_time_s=time.time() - start)
    return summary

  failed: dict[str, str] = {}
  if mode == "run":
    todo = [r for r in runs if status[r.run_id] != "finished"]
    for r in runs:
      if status[r.run_id] == "finished":
        status[r.run_id] = "skipped"
    log(f"Sweep {workdir}: {len(runs)} runs, {len(runs) - len(todo)} already finished (skipped), "
        f"{len(todo)} to run {'in this process' if parallel == 1 else f'in {parallel} processes'}")
    cache_dir = compilation_cache_dir(workdir)
    if todo and parallel == 1:
      enable_compilation_cache(cache_dir)
      outcomes = _run_in_process(sweep_config, todo, workdir, log)
    elif todo:
      outcomes = _run_subprocesses(sweep_config, todo, workdir, int(parallel), cache_dir,
                                   python, log)
    else:
      outcomes = []
    for outcome in outcomes:
      status[outcome.run.run_id] = outcome.status
      if outcome.status == "failed":
        failed[outcome.run.run_id] = outcome.error
  else:  # aggregate
    for r in runs:
      if status[r.run_id] != "finished":
        error_path = os.path.join(run_dir(workdir, r), ERROR_FILE)
        if os.path.isfile(error_path):
          status[r.run_id] = "failed"
          with open(error_path, encoding="utf-8") as f:
            failed[r.run_id] = f.read().strip()
        else:
          status[r.run_id] = "missing"

  rows = sweep_results.collect_rows(workdir, runs, failed)
  outputs = sweep_results.write_outputs(
      rows, workdir, metric=sweep_config.metric, baseline=sweep_config.baseline,
      baseline_fraction=float(sweep_config.baseline_fraction),
      tolerance=float(sweep_config.match_tolerance), inits=list(sweep_config.inits.keys()),
      title=title or f"{sweep_config.base}", sweep_config=sweep_config.to_dict(),
      run_status=status)
  summary.update(outputs)
  summary.update(runs=status, counts=_counts(status), failed=failed,
                 wall_time_s=time.time() - start)
  log("\n" + outputs["table"])
  log(f"\nResults: {outputs['results_csv']}\n         {outputs['results_json']}\n"
      f"Plot:    {outputs['plot']}\nTable:   {outputs['table_file']}")
  if failed:
    log(f"{len(failed)} run(s) FAILED: {', '.join(failed)} (see {ERROR_FILE} in their folders; "
        "rerun the same command to retry them)")
  return summary


def _counts(status: dict[str, str]) -> dict[str, int]:
  counts: dict[str, int] = {}
  for s in status.values():
    counts[s] = counts.get(s, 0) + 1
  return counts


# ------------------------------------------------------------------------------------ CLI
def main(argv):
  from absl import flags, logging  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  flag_values = flags.FLAGS
  logging.set_verbosity(logging.WARNING)
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  summary = run_sweep(flag_values.config, flag_values.workdir, parallel=flag_values.parallel,
                      mode=flag_values.mode,
                      sweep_spec=config_flags.get_config_filename(flag_values["config"]))
  if summary["mode"] == "joblist":
    print(f"Job list: {summary['jobs_file']}")
  if summary.get("failed"):
    sys.exit(1)


def define_flags(default_config: str | None = None) -> None:
  """The CLI flags (shared with experiments/ood_study.py)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", default_config, "Sweep config "
                                  "(configs/sweeps/*.py).", lock_config=True)
  flags.DEFINE_string("workdir", None, "The sweep's folder (one subfolder per run).")
  flags.DEFINE_integer("parallel", 1, "1: runs in this process, one after another; N > 1: N "
                       "local `python -m remedis_jax.main` processes.")
  flags.DEFINE_enum("mode", "run", list(MODES), "run | plan | joblist | aggregate.")
  flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  define_flags()
  app.run(main)
