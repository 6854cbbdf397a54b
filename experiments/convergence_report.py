r"""Convergence of downstream training: validation steps to reach a target, per init and fraction.

  python -m experiments.convergence_report --workdir=SWEEP_DIR [--metric=macro_auc] \
    [--target=0.8 | --target_fraction_of_baseline=0.95] [--baseline=scratch]

Ghesu et al. (2022) report that their self-supervised initialisation makes downstream training
converge up to 85% faster. This report measures that on a finished label-fraction sweep
(experiments/label_fraction_sweep.py) from what every fine-tuning run already records: the
validation pass every `eval_every_steps` writes `val/<metric>` with its step to
WORKDIR/<run>/metrics.jsonl (remedis_jax/train_finetune.py). Nothing is trained or evaluated.

Definitions (also written into the table header):
* Validation curve of a run: (step, val/<metric>) from its metrics.jsonl. A resumed run appends
  to the file and may validate a step twice; the LAST record of a step wins (the run that went
  on). Steps are as coarse as `eval_every_steps` (100 in configs/finetune.py:tiny), so steps to
  target and reductions are quantised by it.
* Target, per label fraction: `--target` (an absolute metric value, the same at every fraction)
  or, by default, `--target_fraction_of_baseline` (0.95) x the baseline's best validation value
  at that fraction, where "best" is the mean over the baseline's finished seeds of each seed's
  maximum of its validation curve (= its results.json best.value). A fraction whose baseline has
  no finished run has no target ("no target"). For AUC, remember that 0.5 is chance: 0.95 x 0.88
  = 0.84 is a demanding target, 0.95 x 0.60 = 0.57 is barely above chance.
* Steps to target of a run: the first validated step whose value is >= the target; a run whose
  curve never gets there is "not reached" (NaN values never reach). Only FINISHED runs count
  (results.json with finished=true); failed, unfinished (interrupted, running) and missing runs
  are counted and listed per cell, never silently dropped.
* Per (init, label fraction) cell: mean and std (ddof=1; 0 for one seed) of steps to target over
  the seeds that reached it, and how many of the finished seeds did. The mean over reached seeds
  is optimistic when some seeds did not reach: the table shows reached/finished beside it.
* Reduction vs the baseline init (default: the sweep config's `baseline`, else "scratch") at the
  same fraction: 1 - mean steps(init) / mean steps(baseline), the paper's "x% faster
  convergence" (0.85 = 85% fewer steps; negative = slower). It is marked "*" (and
  `reduction_complete` is false) when a seed of either cell did not reach the target or did
  not finish, and is empty when either cell has no seed that reached it.

Outputs (in --output_dir, default the sweep folder): convergence.csv (one row per cell),
convergence_runs.csv (one row per run: status, target, steps to target), convergence.json
(settings, runs with their curves, cells), convergence.md (the markdown table, also printed) and
convergence.png (mean validation curve over finished seeds per init, one panel per label
fraction, the target as a dashed line). The sweep folder and --output_dir may be URLs
(gs://...; data_pipelines/storage.py). Imports neither JAX nor TensorFlow.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any, Sequence

import numpy as np

from data_pipelines import storage
from experiments import sweep_plan
from experiments import sweep_run
from experiments import sweep_results
from remedis_jax import run_files

METRICS_FILE = run_files.METRICS_FILE
CSV_FILE = "convergence.csv"
RUNS_CSV_FILE = "convergence_runs.csv"
JSON_FILE = "convergence.json"
TABLE_FILE = "convergence.md"
PLOT_FILE = "convergence.png"
FORMAT = "remedis-jax-convergence/1"
DEFAULT_FRACTION_OF_BASELINE = 0.95
DEFAULT_BASELINE = "scratch"
# Lower is better for these: "reaching a target from below" does not apply.
LOWER_IS_BETTER = ("ece",)
CELL_COLUMNS = ("init", "label_fraction", "target", "n_planned", "n_finished", "n_reached",
                "n_not_reached", "n_not_finished", "steps_to_target_mean", "steps_to_target_std",
                "steps_to_target_low", "steps_to_target_high", "steps_to_target",
                "baseline_steps_to_target_mean", "reduction", "reduction_complete",
                "best_val_mean", "not_reached_runs", "not_finished_runs")
RUN_COLUMNS = ("run_id", "init", "label_fraction", "seed", "status", "target", "reached",
               "steps_to_target", "best_val", "best_val_step", "last_step", "num_validations",
               "run_dir")


# --------------------------------------------------------------------------- reading runs
def read_validation_curve(run_dir: str, metric: str = "macro_auc") -> list[tuple[int, float]]:
  """(step, value) of `val/<metric>` in RUN_DIR/metrics.jsonl, sorted by step.

  The file is what remedis_jax.writers.JsonlWriter writes (one JSON object per line with a
  "step"; hparams lines have none). A step recorded twice (a resumed run) keeps its last value.
  None (a NaN written as null) becomes NaN.

  Args:
    run_dir: a fine-tuning run's folder.
    metric: the validation metric key, e.g. "macro_auc" (read from "val/macro_auc").

  Returns:
    The curve; [] when the file or the key is absent.
  """
  key = f"val/{metric}"
  by_step: dict[int, float] = {}
  for record in _read_records(run_dir):
    if "step" in record and key in record:
      value = record[key]
      by_step[int(record["step"])] = math.nan if value is None else float(value)
  return sorted(by_step.items())


def _read_records(run_dir: str) -> list[dict[str, Any]]:
  """The JSON objects of RUN_DIR/metrics.jsonl (one read, also on a URL); [] when absent."""
  try:
    text = storage.read_text(storage.join(run_dir, METRICS_FILE))
  except FileNotFoundError:
    return []
  records = []
  for line in text.splitlines():
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except ValueError:
      continue  # a line cut short by a killed process: the records before it still count
  return records


def steps_to_target(curve: Sequence[tuple[int, float]], target: float) -> int | None:
  """The first step whose value is >= target (curve sorted by step); None if never."""
  for step, value in curve:
    if math.isfinite(value) and value >= target:
      return int(step)
  return None


def best_value(curve: Sequence[tuple[int, float]]) -> tuple[float, int | None]:
  """(max finite value, its first step) of a curve; (NaN, None) when it has none."""
  finite = [(v, s) for s, v in curve if math.isfinite(v)]
  if not finite:
    return math.nan, None
  value = max(v for v, _ in finite)
  return value, min(s for v, s in finite if v == value)


def collect_runs(workdir: str, metric: str = "macro_auc") -> tuple[dict[str, Any],
                                                                   list[dict[str, Any]]]:
  """Every run of a sweep with its status and validation curve.

  Args:
    workdir: the sweep's folder (experiments.label_fraction_sweep --workdir).
    metric: the validation metric key.

  Returns:
    (the sweep config from its plan, {} without one; runs as dicts with run_id, init,
    label_fraction, seed, status ("finished" | "failed" | "unfinished" | "missing"), curve
    (finished runs only; [] otherwise), run_dir), in plan order.

  Raises:
    FileNotFoundError: not a sweep folder (sweep_plan.list_runs).
  """
  workdir = storage.absolute(workdir)
  sweep_config, planned = sweep_plan.list_runs(workdir)
  runs = []
  for run in planned:
    status = sweep_run.run_status(workdir, run)
    path = sweep_run.run_dir(workdir, run)
    runs.append({"run_id": run.run_id, "init": run.init, "label_fraction": run.label_fraction,
                 "seed": run.seed, "status": status, "run_dir": path,
                 "curve": read_validation_curve(path, metric) if status == "finished" else []})
  return sweep_config, runs


# ------------------------------------------------------------------------------ analysis
def _fraction_key(fraction: float) -> float:
  return round(float(fraction), 12)


def compute_targets(runs: Sequence[dict[str, Any]], *, baseline: str, target: float | None = None,
                    fraction_of_baseline: float = DEFAULT_FRACTION_OF_BASELINE
                    ) -> dict[float, dict[str, Any]]:
  """The target of every label fraction.

  Args:
    runs: `collect_runs` output.
    baseline: the baseline init's name.
    target: an absolute target for every fraction; None: `fraction_of_baseline` x the
      baseline's best validation value at each fraction (module docstring).
    fraction_of_baseline: see `target`.

  Returns:
    {label_fraction: {"target" (NaN: no target), "baseline_best_mean", "baseline_seeds",
    "source" ("absolute" | "fraction_of_baseline" | "no finished baseline run")}}.
  """
  fractions = sorted({_fraction_key(r["label_fraction"]) for r in runs})
  targets = {}
  for fraction in fractions:
    per_seed = {r["seed"]: best_value(r["curve"])[0] for r in runs
                if r["init"] == baseline and _fraction_key(r["label_fraction"]) == fraction
                and r["status"] == "finished"}
    seeds = [s for s, b in per_seed.items() if math.isfinite(b)]
    bests = [per_seed[s] for s in seeds]
    baseline_best = float(np.mean(bests)) if bests else math.nan
    if target is not None:
      entry = {"target": float(target), "source": "absolute"}
    elif bests:
      entry = {"target": fraction_of_baseline * baseline_best, "source": "fraction_of_baseline"}
    else:
      entry = {"target": math.nan, "source": "no finished baseline run"}
    entry.update(baseline_best_mean=baseline_best, baseline_seeds=seeds)
    targets[fraction] = entry
  return targets


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
  if not values:
    return math.nan, math.nan
  array = np.asarray(values, np.float64)
  return float(np.mean(array)), float(np.std(array, ddof=1)) if len(array) > 1 else 0.0


def analyse(runs: Sequence[dict[str, Any]], targets: dict[float, dict[str, Any]], *,
            baseline: str, inits: Sequence[str] | None = None
            ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  """Steps to target per run and per (init, label fraction) cell.

  Args:
    runs: `collect_runs` output.
    targets: `compute_targets` output.
    baseline: the baseline init's name (its cell at the same fraction is the reference).
    inits: the inits in report order (default: as they appear in runs).

  Returns:
    (run rows with RUN_COLUMNS; cells with CELL_COLUMNS, ordered by fraction then init).
  """
  run_rows = []
  for run in runs:
    target = targets[_fraction_key(run["label_fraction"])]["target"]
    finished = run["status"] == "finished"
    steps = steps_to_target(run["curve"], target) if finished and math.isfinite(target) else None
    best, best_step = best_value(run["curve"])
    run_rows.append({
        "run_id": run["run_id"], "init": run["init"], "label_fraction": run["label_fraction"],
        "seed": run["seed"], "status": run["status"], "target": target,
        "reached": steps is not None, "steps_to_target": steps, "best_val": best,
        "best_val_step": best_step,
        "last_step": run["curve"][-1][0] if run["curve"] else None,
        "num_validations": len(run["curve"]), "run_dir": run["run_dir"]})

  inits = list(inits) if inits is not None else list(dict.fromkeys(r["init"] for r in runs))
  inits += [i for i in dict.fromkeys(r["init"] for r in runs) if i not in inits]
  cells = []
  for fraction in sorted(targets):
    for init in inits:
      members = [r for r in run_rows
                 if r["init"] == init and _fraction_key(r["label_fraction"]) == fraction]
      if not members:
        continue
      finished = [r for r in members if r["status"] == "finished"]
      reached = [r for r in finished if r["reached"]]
      mean, std, low, high = sweep_results.mean_std_interval(
          [r["steps_to_target"] for r in reached])
      cells.append({
          "init": init, "label_fraction": members[0]["label_fraction"],
          "target": targets[fraction]["target"], "n_planned": len(members),
          "n_finished": len(finished), "n_reached": len(reached),
          "n_not_reached": len(finished) - len(reached),
          "n_not_finished": len(members) - len(finished),
          "steps_to_target_mean": mean, "steps_to_target_std": std,
          "steps_to_target_low": low, "steps_to_target_high": high,
          "steps_to_target": {str(r["seed"]): r["steps_to_target"] for r in finished},
          "best_val_mean": _mean_std([r["best_val"] for r in finished])[0],
          "not_reached_runs": [r["run_id"] for r in finished if not r["reached"]],
          "not_finished_runs": [f"{r['run_id']} ({r['status']})" for r in members
                                if r["status"] != "finished"]})
  for cell in cells:
    reference = next((c for c in cells if c["init"] == baseline
                      and math.isclose(c["label_fraction"], cell["label_fraction"])), None)
    base_mean = reference["steps_to_target_mean"] if reference else math.nan
    cell["baseline_steps_to_target_mean"] = base_mean
    defined = math.isfinite(base_mean) and math.isfinite(cell["steps_to_target_mean"])
    cell["reduction"] = 1.0 - cell["steps_to_target_mean"] / base_mean if defined else math.nan
    cell["reduction_complete"] = bool(
        defined and all(c["n_reached"] == c["n_planned"] for c in (cell, reference)))
  return run_rows, cells


# ------------------------------------------------------------------------------ formatting
def _percent(fraction: float) -> str:
  return f"{100 * fraction:g}%"


def format_table(cells: Sequence[dict[str, Any]], *, metric: str, baseline: str,
                 target: float | None, fraction_of_baseline: float,
                 targets: dict[float, dict[str, Any]]) -> str:
  """Markdown: one row per (label fraction, init), then the runs that did not reach or finish."""
  column = sweep_results.METRICS.get(metric, metric)
  label = f"validation {sweep_results.METRIC_LABELS.get(column, metric)}"
  if target is not None:
    rule = f"target = {target:g} (absolute) at every fraction"
  else:
    rule = (f"target = {fraction_of_baseline:g} x the mean over seeds of `{baseline}`'s best "
            f"{label} at that fraction")
  lines = [f"## Convergence: validation steps to reach the target ({label})", "",
           f"{rule}. Steps to target = first validated step with a value >= target; mean +- "
           "std (ddof=1) [95% Student-t interval of the mean] over the seeds that reached it, "
           "with reached/finished seeds. Reduction "
           f"= 1 - mean steps(init) / mean steps(`{baseline}`) at the same fraction (the "
           "paper's \"x% faster convergence\"); * = some seed of either cell did not reach the "
           "target or did not finish. Resolution: the validation interval.", "",
           "| label fraction | init | target | steps to target | reached | reduction vs "
           f"{baseline} | best {label} (mean) | not finished |",
           "|---|---|---|---|---|---|---|---|"]
  for cell in cells:
    source = targets[_fraction_key(cell["label_fraction"])]["source"]
    target_text = f"{cell['target']:.3f}" if math.isfinite(cell["target"]) else \
        f"n/a ({source})"
    if cell["n_reached"]:
      steps = f"{cell['steps_to_target_mean']:.0f} +- {cell['steps_to_target_std']:.0f}"
      if math.isfinite(cell["steps_to_target_low"]):
        steps += f" [{cell['steps_to_target_low']:.0f}, {cell['steps_to_target_high']:.0f}]"
    elif not cell["n_finished"]:
      steps = "no finished run"
    elif not math.isfinite(cell["target"]):
      steps = "no target"
    else:
      steps = "not reached"
    if math.isfinite(cell["reduction"]):
      reduction = f"{100 * cell['reduction']:.0f}%" + ("" if cell["reduction_complete"] else "*")
    else:
      reduction = "n/a"
    best = f"{cell['best_val_mean']:.3f}" if math.isfinite(cell["best_val_mean"]) else "n/a"
    lines.append(f"| {_percent(cell['label_fraction'])} | {cell['init']} | {target_text} | "
                 f"{steps} | {cell['n_reached']}/{cell['n_finished']} | {reduction} | {best} | "
                 f"{cell['n_not_finished'] or ''} |")
  not_reached = [r for c in cells for r in c["not_reached_runs"]]
  not_finished = [r for c in cells for r in c["not_finished_runs"]]
  if not_reached:
    lines += ["", f"**{len(not_reached)} finished run(s) never reached the target** (counted in "
              "'reached' as misses): " + ", ".join(not_reached)]
  if not_finished:
    lines += ["", f"**{len(not_finished)} run(s) did not finish** (not in any number above): "
              + ", ".join(not_finished)]
  return "\n".join(lines)


def _csv_value(value: Any) -> Any:
  if isinstance(value, float) and not math.isfinite(value):
    return ""
  if value is None:
    return ""
  if isinstance(value, (list, dict)):
    return json.dumps(value)
  return value


def write_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str], path: str) -> None:
  """Rows -> CSV (a file or a URL); NaN/None as empty fields, lists and dicts as JSON text."""
  sweep_results.write_csv([{k: _csv_value(v) for k, v in row.items()} for row in rows], path,
                          columns)


# ------------------------------------------------------------------------------------ plot
def mean_curve(curves: Sequence[Sequence[tuple[int, float]]]
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(steps, mean, std) over curves at every step any of them has (mean over those that do)."""
  steps = sorted({s for curve in curves for s, _ in curve})
  by_step = [[dict(curve)[s] for curve in curves if s in dict(curve)] for s in steps]
  means = np.array([np.mean(v) for v in by_step], np.float64)
  stds = np.array([np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in by_step], np.float64)
  return np.asarray(steps), means, stds


def plot_convergence(runs: Sequence[dict[str, Any]], cells: Sequence[dict[str, Any]], path: str,
                     *, metric: str, inits: Sequence[str], title: str = "") -> None:
  """convergence.png: one panel per label fraction, mean validation curve per init."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fractions = sorted({_fraction_key(r["label_fraction"]) for r in runs})
  fig, axes = plt.subplots(1, max(len(fractions), 1), figsize=(4.2 * max(len(fractions), 1), 3.8),
                           squeeze=False, sharey=True)
  for ax, fraction in zip(axes[0], fractions):
    for init in inits:
      curves = [r["curve"] for r in runs if r["init"] == init and r["curve"]
                and r["status"] == "finished" and _fraction_key(r["label_fraction"]) == fraction]
      if not curves:
        continue
      steps, means, stds = mean_curve(curves)
      line, = ax.plot(steps, means, marker=".", label=f"{init} (n={len(curves)})")
      ax.fill_between(steps, means - stds, means + stds, color=line.get_color(), alpha=0.15)
    cell = next((c for c in cells if _fraction_key(c["label_fraction"]) == fraction), None)
    if cell is not None and math.isfinite(cell["target"]):
      ax.axhline(cell["target"], color="gray", linestyle="--", linewidth=1, label="target")
    ax.set_title(f"{_percent(fraction)} of the labels")
    ax.set_xlabel("training step")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
  axes[0][0].set_ylabel(f"validation {metric} (mean +- std over seeds)")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  sweep_results.save_figure(fig, path)
  plt.close(fig)


# ------------------------------------------------------------------------------------ report
def convergence_report(workdir: str, *, metric: str = "macro_auc", target: float | None = None,
                       fraction_of_baseline: float | None = None, baseline: str | None = None,
                       output_dir: str | None = None, verbose: bool = True) -> dict[str, Any]:
  """Reads a sweep's runs, computes steps to target and writes the report files.

  Args:
    workdir: the sweep's folder.
    metric: the validation metric key (`val/<metric>` in metrics.jsonl), higher is better.
    target: an absolute target; exclusive with `fraction_of_baseline`.
    fraction_of_baseline: target = this x the baseline's best validation value per fraction
      (default 0.95 when `target` is None).
    baseline: the reference init (default: the sweep config's `baseline`, else "scratch").
    output_dir: where the files go (default: `workdir`).
    verbose: print the table and the file names.

  Returns:
    {"csv", "runs_csv", "json", "table_file", "plot" (paths), "table" (markdown), "targets",
    "runs" (run rows), "cells", "counts" (status -> runs)}.

  Raises:
    ValueError: both targets given, a bad value, a lower-is-better metric, an unknown baseline,
      no finished run, or no finished run with a `val/<metric>` curve (lists the keys there).
    FileNotFoundError: not a sweep folder.
  """
  if target is not None and fraction_of_baseline is not None:
    raise ValueError(f"give --target ({target}) or --target_fraction_of_baseline "
                     f"({fraction_of_baseline}), not both")
  if fraction_of_baseline is None:
    fraction_of_baseline = DEFAULT_FRACTION_OF_BASELINE
  if not fraction_of_baseline > 0 or not math.isfinite(fraction_of_baseline):
    raise ValueError(f"--target_fraction_of_baseline={fraction_of_baseline} must be > 0 "
                     "(e.g. 0.95)")
  if target is not None and not math.isfinite(target):
    raise ValueError(f"--target={target} must be finite")
  if metric in LOWER_IS_BETTER:
    raise ValueError(f"--metric={metric}: lower is better, so 'steps to reach a target' is not "
                     "defined here; use macro_auc, accuracy or balanced_accuracy")
  workdir = storage.absolute(workdir)
  output_dir = storage.absolute(output_dir or workdir)
  sweep_config, runs = collect_runs(workdir, metric)
  baseline = baseline or sweep_config.get("baseline") or DEFAULT_BASELINE
  inits = list(sweep_config.get("inits") or {}) or list(dict.fromkeys(r["init"] for r in runs))
  inits = [baseline] + [i for i in inits if i != baseline]  # the reference first
  if baseline not in {r["init"] for r in runs}:
    raise ValueError(f"--baseline={baseline!r} has no run in {workdir}; inits there: "
                     f"{', '.join(dict.fromkeys(r['init'] for r in runs))}")
  finished = [r for r in runs if r["status"] == "finished"]
  if not finished:
    raise ValueError(f"no finished run in {workdir} ({len(runs)} planned); run the sweep first")
  if not any(r["curve"] for r in finished):
    keys = sorted({k for r in finished[:3] for k in _metric_keys(r["run_dir"])
                   if k.startswith("val/")})
    raise ValueError(f"no finished run in {workdir} has 'val/{metric}' in its {METRICS_FILE}; "
                     f"validation keys there: {', '.join(keys) or 'none'}; pick --metric from "
                     "them (without 'val/')")

  targets = compute_targets(runs, baseline=baseline, target=target,
                            fraction_of_baseline=fraction_of_baseline)
  run_rows, cells = analyse(runs, targets, baseline=baseline, inits=inits)
  table = format_table(cells, metric=metric, baseline=baseline, target=target,
                       fraction_of_baseline=fraction_of_baseline, targets=targets)
  storage.makedirs(output_dir)
  paths = {"csv": storage.join(output_dir, CSV_FILE),
           "runs_csv": storage.join(output_dir, RUNS_CSV_FILE),
           "json": storage.join(output_dir, JSON_FILE),
           "table_file": storage.join(output_dir, TABLE_FILE),
           "plot": storage.join(output_dir, PLOT_FILE)}
  counts: dict[str, int] = {}
  for r in runs:
    counts[r["status"]] = counts.get(r["status"], 0) + 1
  write_csv(cells, CELL_COLUMNS, paths["csv"])
  write_csv(run_rows, RUN_COLUMNS, paths["runs_csv"])
  curves = {r["run_id"]: [[s, v] for s, v in r["curve"]] for r in runs}
  sweep_results.write_json({
      "format": FORMAT, "workdir": workdir, "metric": metric, "baseline": baseline,
      "target": target, "target_fraction_of_baseline": None if target is not None
      else fraction_of_baseline, "std_ddof": 1, "counts": counts,
      "targets": {f"{f:g}": t for f, t in targets.items()},
      "runs": [dict(r, curve=curves[r["run_id"]]) for r in run_rows], "cells": cells},
      paths["json"])
  storage.write_text(paths["table_file"], table + "\n")
  plot_convergence(runs, cells, paths["plot"], metric=metric, inits=inits,
                   title=f"Convergence - {storage.basename(workdir)}")
  if verbose:
    print(table)
    print("\n" + "\n".join(f"{name:10s} {path}" for name, path in paths.items()))
  return dict(paths, table=table, targets=targets, runs=run_rows, cells=cells, counts=counts)


def _metric_keys(run_dir: str) -> set[str]:
  return {key for record in _read_records(run_dir) for key in record}


# ------------------------------------------------------------------------------------ CLI
def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  values = flags.FLAGS
  try:
    convergence_report(values.workdir, metric=values.metric, target=values.target,
                       fraction_of_baseline=values.target_fraction_of_baseline,
                       baseline=values.baseline, output_dir=values.output_dir)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"convergence_report: {e}")


def define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", None, "The sweep's folder (experiments.label_fraction_sweep).")
  flags.DEFINE_string("metric", "macro_auc", "Validation metric key (val/<metric> in "
                      "metrics.jsonl); higher is better.")
  flags.DEFINE_float("target", None, "Absolute target value at every label fraction.")
  flags.DEFINE_float("target_fraction_of_baseline", None, "Target = this x the baseline's best "
                     f"validation value at each fraction (default {DEFAULT_FRACTION_OF_BASELINE} "
                     "when --target is not given).")
  flags.DEFINE_string("baseline", None, "Reference init (default: the sweep config's baseline, "
                      "else scratch).")
  flags.DEFINE_string("output_dir", None, "Where the files go (default: --workdir).")
  flags.mark_flags_as_required(["workdir"])


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  define_flags()
  app.run(main)
