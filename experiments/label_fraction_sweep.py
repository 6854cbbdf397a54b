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
                      workdir, or an export folder, local or a URL (gs://...). Relative paths
                      are relative to the current directory and are made absolute before any
                      run starts; URLs are kept as they are.
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
A run whose workdir lock another process holds (a second sweep on the same WORKDIR, or a job of
the job list) is "running elsewhere", not failed: it is reported, the sweep goes on with the
other runs and then waits for it (checking every HELD_RUN_POLL_S seconds); once its holder
finishes it, it counts as finished, and if the holder stops without finishing it, this sweep
runs it. Two sweeps on one WORKDIR thus share the grid and both end with every run finished.
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
mean/std over seeds per cell, std with ddof=1, 0 for one seed, and the 95% Student-t interval
of the mean; per init, fraction and test set the paired difference to the baseline at the same
fraction, seed by seed, with its 95% interval), data_efficiency.png (metric vs % labels on a
log axis, one line per init with +-1 std error bars, one panel per test set, the baseline as a
dashed line) and summary.md (the smallest label fraction at which each init matches the
baseline, the grid of cells, and the paired differences).

Object stores: WORKDIR and the inits may be URLs (gs://bucket/sweep); every file of the sweep
goes through data_pipelines/storage.py, so a URL is never turned into a local path. An object
cannot grow while a subprocess writes it, so with --parallel=N and a URL workdir each run's
stdout and stderr go to a local temporary file (its path is printed), which is uploaded to
WORKDIR/<run>/log.txt every LOG_UPLOAD_INTERVAL_S seconds and when the run ends, after what
earlier attempts of the run logged there; the temporary file is then deleted. A local WORKDIR
gets log.txt appended to directly.

Compilation: every run of a grid compiles the same programs (same model, same batch shapes);
the sweep shares a persistent JAX compilation cache (WORKDIR/.jax_cache unless
JAX_COMPILATION_CACHE_DIR is set; a gs:// cache works too) so only the first run pays for XLA.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Iterable, Sequence

import ml_collections

from configs import common
from configs.sweeps import common as sweep_configs
from experiments import sweep_results
from data_pipelines import storage
from remedis_jax import compilation_cache, run_files, workdir_lock

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("run", "plan", "joblist", "aggregate")
EXECUTORS = ("local", "ray")
SCRATCH = ("", "none", "scratch")
FINETUNE_MODES = ("", "full", "linear")
PLAN_FILE = "sweep_plan.json"
JOBS_FILE = "jobs.txt"
ERROR_FILE = "sweep_error.txt"
LOG_FILE = "log.txt"
RESULTS_FILE = run_files.RESULTS_FILE
EXIT_PREEMPTED = run_files.EXIT_PREEMPTED  # a run saved on SIGTERM: the rerun resumes it
CACHE_SUBDIR = ".jax_cache"
# How often a URL workdir's log.txt is refreshed from a running subprocess's local log file.
LOG_UPLOAD_INTERVAL_S = 60.0
# How often a run that another process holds (running elsewhere) is checked again.
HELD_RUN_POLL_S = 10.0
DEFAULT_LABEL_FRACTIONS = sweep_configs.DEFAULT_LABEL_FRACTIONS
_INIT_NAME = re.compile(r"^[A-Za-z0-9_\-+]+$")


def default_sweep_config() -> ml_collections.ConfigDict:
  """The keys every sweep config has (configs/sweeps/common.py)."""
  return sweep_configs.default_sweep_config()


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
          f"--workdir={storage.absolute(run_dir(workdir, run))}"]
  argv += [f"--config.{key}={_flag_value(value)}" for key, value in run.overrides]
  return argv


# -------------------------------------------------------------------------------- running
RUNNING_ELSEWHERE = "running elsewhere"


@dataclasses.dataclass
class RunOutcome:
  run: Run
  status: str  # "finished" | "skipped" (finished before) | "failed" | "interrupted"
  wall_time_s: float = 0.0
  error: str = ""


class _HeldRuns:
  """Runs that another process holds: reported once each, checked again after a wait."""

  def __init__(self, num_runs: int, log):
    self._num_runs, self._log, self._reported = num_runs, log, set()

  def report(self, i: int, run: Run, holder: str) -> None:
    if i not in self._reported:
      self._reported.add(i)
      self._log(f"[{i + 1}/{self._num_runs}] {run.run_id}: {RUNNING_ELSEWHERE} ({holder}); "
                "not failed: the sweep goes on and waits for it")

  def finished_elsewhere(self, i: int, run: Run) -> RunOutcome:
    self._log(f"[{i + 1}/{self._num_runs}] {run.run_id}: finished by another process")
    return RunOutcome(run, "finished")

  def claim(self, i: int, run: Run, path: str, outcomes: dict[int, RunOutcome]) -> bool:
    """Whether this sweep may start the run now: False when another process finished it since
    the sweep started (its outcome is recorded) or holds it (reported; look again later)."""
    if is_finished(path):
      outcomes[i] = self.finished_elsewhere(i, run)
      return False
    holder = workdir_lock.holder(path)
    if holder is not None:
      self.report(i, run, holder)
      return False
    return True


def run_dir(workdir: str, run: Run) -> str:
  return storage.join(workdir, run.run_id)


def is_finished(path: str) -> bool:
  """Whether RUN_DIR/results.json exists and says finished (one read, also on a URL)."""
  try:
    return bool(storage.read_json(storage.join(path, RESULTS_FILE)).get("finished"))
  except (FileNotFoundError, IsADirectoryError, NotADirectoryError, ValueError):
    return False  # absent, or cut short by a killed writer (a local file): not finished


def compilation_cache_dir(workdir: str) -> str:
  """JAX_COMPILATION_CACHE_DIR when set (e.g. by the tests), else WORKDIR/.jax_cache."""
  return os.environ.get("JAX_COMPILATION_CACHE_DIR") or storage.join(
      storage.absolute(workdir), CACHE_SUBDIR)


def enable_compilation_cache(cache_dir: str) -> None:
  """Turns on JAX's persistent compilation cache in this process (if not configured already):
  the sweep's runs share one cache, in-process or in subprocesses (JAX_COMPILATION_CACHE_DIR)."""
  compilation_cache.enable(cache_dir)


def _record_failure(path: str, error: str) -> None:
  storage.makedirs(path)
  storage.write_text(storage.join(path, ERROR_FILE), error)


def _clear_failure(path: str) -> None:
  error_path = storage.join(path, ERROR_FILE)
  if storage.exists(error_path):
    storage.remove(error_path)


def _run_in_process(sweep_config, runs: Sequence[Run], workdir: str, log) -> list[RunOutcome]:
  from remedis_jax import train_finetune  # pylint: disable=g-import-not-at-top
  base = load_config_file(sweep_config.base)
  outcomes: dict[int, RunOutcome] = {}
  held = _HeldRuns(len(runs), log)
  ready, waiting = list(enumerate(runs)), []
  while ready or waiting:
    if not ready:  # only runs held by other processes are left: wait, then look again
      time.sleep(HELD_RUN_POLL_S)
      ready, waiting = waiting, []
    i, run = ready.pop(0)
    path = run_dir(workdir, run)
    if not held.claim(i, run, path, outcomes):
      if i not in outcomes:  # held by another process: look again after the others
        waiting.append((i, run))
      continue
    log(f"[{i + 1}/{len(runs)}] {run.run_id}: fine-tuning -> {path}")
    start = time.time()
    try:
      results = train_finetune.train_and_evaluate(build_run_config(sweep_config, run, base), path)
    except workdir_lock.WorkdirInUseError as e:  # taken by another process since the probe
      held.report(i, run, str(e))
      waiting.append((i, run))
      continue
    except Exception:  # pylint: disable=broad-except
      # One bad run must not lose the others; it is recorded and reported, never dropped.
      error = traceback.format_exc()
      _record_failure(path, error)
      outcomes[i] = RunOutcome(run, "failed", time.time() - start, error.strip())
      log(f"[{i + 1}/{len(runs)}] {run.run_id}: FAILED ({error.strip().splitlines()[-1]}); "
          f"traceback in {storage.join(path, ERROR_FILE)}")
      continue
    status = "finished" if results.get("finished") else "interrupted"
    if status == "finished":
      _clear_failure(path)
    outcomes[i] = RunOutcome(run, status, time.time() - start)
    log(f"[{i + 1}/{len(runs)}] {run.run_id}: {status} in {time.time() - start:.1f} s")
    if status == "interrupted":
      # The run saved and returned on a preemption notice (SIGTERM): this process is asked to
      # stop, so no further run starts; the rerun resumes this one and then the rest.
      log(f"Preempted: {len(runs) - len(outcomes)} run(s) not started; rerun the sweep to "
          "resume.")
      break
  return [outcomes[i] for i in sorted(outcomes)]


class RunLog:
  """Where a subprocess's stdout and stderr go: RUN_DIR/log.txt, appended across attempts.

  A local log.txt is the subprocess's own output file. An object (a URL) cannot be appended to
  or streamed into, so there the subprocess writes a local temporary file; `upload` writes the
  object as what it held before this attempt followed by the temporary file so far (called
  every LOG_UPLOAD_INTERVAL_S and at the end), and `close` uploads a last time and deletes the
  temporary file (kept if that upload fails).
  """

  def __init__(self, path: str):
    self.path = path
    self.remote = storage.is_url(path)
    if self.remote:
      try:  # earlier attempts of the run (a retry after a failure, a resumed run) stay in front
        self._earlier = storage.read_bytes(path)
      except FileNotFoundError:
        self._earlier = b""
      fd, self.local_path = tempfile.mkstemp(prefix="remedis_sweep_log_", suffix=".txt")
      self.file = os.fdopen(fd, "wb")
    else:
      storage.makedirs(storage.dirname(path))
      self.local_path = path
      self.file = open(path, "ab")  # pylint: disable=consider-using-with
    self.last_upload = time.time()

  def upload(self) -> None:
    """Refreshes a URL's log.txt (the subprocess writes the file itself: nothing to flush)."""
    if self.remote:
      with open(self.local_path, "rb") as f:
        storage.write_bytes(self.path, self._earlier + f.read())
      self.last_upload = time.time()

  def tail(self, num_lines: int) -> str:
    with open(self.local_path, encoding="utf-8", errors="replace") as f:
      return "".join(f.readlines()[-num_lines:])

  def close(self) -> None:
    if self.file.closed:
      return
    self.file.close()
    if self.remote:
      self.upload()
      os.remove(self.local_path)


def _run_subprocesses(sweep_config, runs: Sequence[Run], workdir: str, parallel: int, cache_dir,
                      python: str, log) -> list[RunOutcome]:
  env = dict(os.environ)
  env.setdefault("JAX_COMPILATION_CACHE_DIR", cache_dir)
  env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
  env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                   else "")
  pending = [(i, run, 0.0) for i, run in enumerate(runs)]  # (index, run, not before)
  active: dict[int, tuple[subprocess.Popen, Run, float, RunLog]] = {}
  outcomes: dict[int, RunOutcome] = {}
  held = _HeldRuns(len(runs), log)
  try:
    while pending or active:
      now = time.time()
      for entry in [e for e in pending if e[2] <= now]:
        if len(active) >= parallel:
          break
        pending.remove(entry)
        i, run, _ = entry
        path = run_dir(workdir, run)
        if not held.claim(i, run, path, outcomes):
          if i not in outcomes:  # held by another process: look again later
            pending.append((i, run, now + HELD_RUN_POLL_S))
          continue
        storage.makedirs(path)
        run_log = RunLog(storage.join(path, LOG_FILE))
        process = subprocess.Popen(run_command(sweep_config, run, workdir, python=python),
                                   cwd=REPO_ROOT, env=env, stdout=run_log.file,
                                   stderr=subprocess.STDOUT)
        active[i] = (process, run, time.time(), run_log)
        where = (f"{run_log.local_path}, uploaded to {run_log.path}" if run_log.remote
                 else run_log.path)
        log(f"[{i + 1}/{len(runs)}] {run.run_id}: started (pid {process.pid}, log {where})")
      time.sleep(0.2)
      for process, _, _, run_log in active.values():
        if (process.poll() is None
            and time.time() - run_log.last_upload >= LOG_UPLOAD_INTERVAL_S):
          run_log.upload()
      for i in [i for i, (p, *_) in active.items() if p.poll() is not None]:
        process, run, start, run_log = active.pop(i)
        path, elapsed = run_dir(workdir, run), time.time() - start
        tail = run_log.tail(25) if process.returncode != 0 else ""
        run_log.close()
        if process.returncode == 0 and is_finished(path):
          _clear_failure(path)
          outcomes[i] = RunOutcome(run, "finished", elapsed)
        elif process.returncode in (0, EXIT_PREEMPTED):  # saved on SIGTERM, not finished
          outcomes[i] = RunOutcome(run, "interrupted", elapsed)
        elif is_finished(path):  # another process held and finished it
          outcomes[i] = held.finished_elsewhere(i, run)
          continue
        elif "WorkdirInUseError" in tail or workdir_lock.holder(path) is not None:
          # Taken by another process between the probe and the start: not a failure.
          held.report(i, run, workdir_lock.holder(path) or "it was in use when this run started")
          pending.append((i, run, time.time() + HELD_RUN_POLL_S))
          continue
        else:
          error = f"exit status {process.returncode}; last lines of {LOG_FILE}:\n{tail}"
          _record_failure(path, error)
          outcomes[i] = RunOutcome(run, "failed", elapsed, error.strip())
        log(f"[{i + 1}/{len(runs)}] {run.run_id}: {outcomes[i].status} in {elapsed:.1f} s")
  finally:
    for process, *_ in active.values():  # interrupted sweep: stop only our own children
      process.terminate()
    for process, _, _, run_log in active.values():
      try:
        process.wait(timeout=30)
      except subprocess.TimeoutExpired:
        pass
      run_log.close()  # what the stopped runs logged reaches a URL workdir too
  return [outcomes[i] for i in sorted(outcomes)]


def write_job_list(sweep_config: ml_collections.ConfigDict, runs: Sequence[Run], workdir: str, *,
                   python: str = sys.executable) -> str:
  """WORKDIR/jobs.txt: one shell command per line (unfinished runs only).

  Each line is `cd <repo> && [env] python -m remedis_jax.main ...`; a line is independent of
  the others, so any scheduler can run them in any order or all at once.

  Returns:
    The path of the job list.
  """
  workdir = storage.absolute(workdir)
  cache = f"JAX_COMPILATION_CACHE_DIR={shlex.quote(compilation_cache_dir(workdir))}"
  lines = [f"cd {shlex.quote(REPO_ROOT)} && {cache} "
           + " ".join(shlex.quote(a) for a in run_command(sweep_config, r, workdir, python=python))
           for r in runs if not is_finished(run_dir(workdir, r))]
  path = storage.join(workdir, JOBS_FILE)
  storage.write_text(path, "".join(line + "\n" for line in lines))
  return path


def slurm_hint(jobs_path: str, num_jobs: int, sweep_spec: str, workdir: str) -> str:
  if storage.is_url(jobs_path):  # sed and xargs read the job list from the store's CLI
    line = (f"gcloud storage cat {jobs_path} | sed -n \"${{SLURM_ARRAY_TASK_ID}}p\"")
    local = f"gcloud storage cat {jobs_path} | xargs -P 2 -I{{}} bash -c {{}}"
  else:
    line = f"sed -n \"${{SLURM_ARRAY_TASK_ID}}p\" {jobs_path}"
    local = f"xargs -P 2 -I{{}} bash -c {{}} < {jobs_path}"
  return (f"{num_jobs} jobs in {jobs_path}. With SLURM, one array task per line:\n"
          f"  sbatch --array=1-{num_jobs} --wrap 'bash -c \"$({line})\"'\n"
          f"or locally: {local}\n"
          f"Then: python -m experiments.label_fraction_sweep --config={sweep_spec} "
          f"--workdir={workdir} --mode=aggregate")


def _write_plan(sweep_config, runs: Sequence[Run], workdir: str) -> None:
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


def run_status(workdir: str, run: Run) -> str:
  """"finished" (results.json says so), "running elsewhere" (another process holds its lock),
  "failed" (sweep_error.txt), "unfinished" (the folder exists: interrupted or preempted) or
  "missing" (never started)."""
  path = run_dir(workdir, run)
  if is_finished(path):
    return "finished"
  if workdir_lock.holder(path) is not None:
    return RUNNING_ELSEWHERE
  if storage.isfile(storage.join(path, ERROR_FILE)):
    return "failed"
  return "unfinished" if storage.isdir(path) else "missing"


def run_sweep(sweep_config: ml_collections.ConfigDict, workdir: str, *, parallel: int = 1,
              mode: str = "run", python: str = sys.executable, verbose: bool = True,
              title: str = "", sweep_spec: str = "", executor: str = "local",
              ray_address: str = "", ray_resources=None) -> dict[str, Any]:
  """Plans, validates, runs and aggregates a label-fraction sweep.

  Args:
    sweep_config: a sweep config (module docstring; configs/sweeps/*.py).
    workdir: the sweep's folder, local or a URL (gs://...); one subfolder per run. Rerunning
      skips finished runs.
    parallel: 1 = sequential in this process; N > 1 = N `python -m remedis_jax.main` processes
      (with executor="ray" and no ray_address: a local Ray instance with N CPUs).
    mode: "run", "plan", "joblist" or "aggregate" (module docstring).
    python: the interpreter for subprocesses and job lists.
    verbose: print progress and where the outputs are.
    title: a title for the table and the plot (default: the base config).
    sweep_spec: how the user named the sweep config (for the printed aggregate command).
    executor: "local" (this process, or the built-in process pool) or "ray" (each run a Ray
      task: experiments/sweep_ray.py).
    ray_address: "" = start a local Ray instance; "auto" or an address = join that cluster.
    ray_resources: a `sweep_ray.Resources` (CPUs, GPUs, TPU chips per run); default 1 CPU.

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
  if executor not in EXECUTORS:
    raise ValueError(f"executor={executor!r}; expected one of {EXECUTORS}")
  runs = validate(sweep_config, check_runs=mode != "aggregate")
  workdir = storage.absolute(workdir)
  status = {r.run_id: "finished" if is_finished(run_dir(workdir, r)) else "pending"
            for r in runs}
  summary: dict[str, Any] = {"mode": mode, "workdir": workdir, "num_runs": len(runs)}
  if mode == "plan":
    for r in runs:
      log(f"  {r.run_id:40s} {status[r.run_id]}")
    log(f"{len(runs)} runs, {sum(s == 'finished' for s in status.values())} finished")
    summary.update(runs=status, counts=_counts(status), failed={}, wall_time_s=0.0)
    return summary
  storage.makedirs(workdir)
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
    where = ("as Ray tasks" if executor == "ray" else
             "in this process" if parallel == 1 else f"in {parallel} processes")
    log(f"Sweep {workdir}: {len(runs)} runs, {len(runs) - len(todo)} already finished (skipped), "
        f"{len(todo)} to run {where}")
    cache_dir = compilation_cache_dir(workdir)
    if todo and executor == "ray":
      from experiments import sweep_ray  # pylint: disable=g-import-not-at-top
      outcomes = sweep_ray.run(sweep_config, todo, workdir, parallel=int(parallel),
                               address=ray_address,
                               resources=ray_resources or sweep_ray.Resources(),
                               cache_dir=cache_dir, python=python, log=log)
    elif todo and parallel == 1:
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
    for run_id in list(failed):  # finished by another process after this one's attempt failed
      if is_finished(storage.join(workdir, run_id)):
        status[run_id] = "finished"
        del failed[run_id]
  else:  # aggregate
    for r in runs:
      if status[r.run_id] != "finished":
        if workdir_lock.holder(run_dir(workdir, r)) is not None:
          status[r.run_id] = RUNNING_ELSEWHERE  # an error file there is an earlier attempt's
          continue
        try:
          failed[r.run_id] = storage.read_text(
              storage.join(run_dir(workdir, r), ERROR_FILE)).strip()
          status[r.run_id] = "failed"
        except FileNotFoundError:
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
                      sweep_spec=config_flags.get_config_filename(flag_values["config"]),
                      **executor_options(flag_values))
  if summary["mode"] == "joblist":
    print(f"Job list: {summary['jobs_file']}")
  if summary.get("failed"):
    sys.exit(1)
  if summary.get("counts", {}).get("interrupted"):  # a run was preempted and saved
    sys.exit(EXIT_PREEMPTED)


def define_flags(default_config: str | None = None) -> None:
  """The CLI flags (shared with experiments/ood_study.py)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", default_config, "Sweep config "
                                  "(configs/sweeps/*.py).", lock_config=True)
  flags.DEFINE_string("workdir", None, "The sweep's folder (one subfolder per run); a local "
                      "path or a URL (gs://bucket/sweep).")
  flags.DEFINE_integer("parallel", 1, "1: runs in this process, one after another; N > 1: N "
                       "local `python -m remedis_jax.main` processes.")
  flags.DEFINE_enum("mode", "run", list(MODES), "run | plan | joblist | aggregate.")
  flags.DEFINE_enum("executor", "local", list(EXECUTORS), "local: this process or --parallel "
                    "local processes; ray: one Ray task per run (experiments/sweep_ray.py).")
  flags.DEFINE_string("ray_address", "", "With --executor=ray: '' starts a local Ray instance "
                      "with --parallel CPUs; 'auto' (under `ray job submit`) or an address joins "
                      "that cluster.")
  flags.DEFINE_float("ray_cpus_per_run", 1.0, "CPUs each run asks of Ray.")
  flags.DEFINE_float("ray_gpus_per_run", 0.0, "GPUs each run asks of Ray.")
  flags.DEFINE_float("ray_tpus_per_run", 0.0, "TPU chips each run asks of Ray (the 'TPU' "
                     "resource).")
  flags.mark_flags_as_required(["config", "workdir"])


def executor_options(flag_values) -> dict[str, Any]:
  """run_sweep's executor keywords from the flags of `define_flags`."""
  if flag_values.executor != "ray":
    return {"executor": flag_values.executor}
  from experiments import sweep_ray  # pylint: disable=g-import-not-at-top
  return {"executor": "ray", "ray_address": flag_values.ray_address,
          "ray_resources": sweep_ray.Resources(cpus=flag_values.ray_cpus_per_run,
                                               gpus=flag_values.ray_gpus_per_run,
                                               tpus=flag_values.ray_tpus_per_run)}


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  define_flags()
  app.run(main)
