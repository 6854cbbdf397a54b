r"""Robustness to test-time perturbations across a sweep: per init, label fraction and test set.

  python -m experiments.robustness_report --workdir=SWEEP_DIR [--metric=macro_auc]

Ghesu et al. (2022) report that their self-supervised initialisation makes the fine-tuned
models more robust to intensity, rotation and scale changes. Every fine-tuning run already
measures that when its config lists perturbations: the best checkpoint is evaluated on each test
set named in `config.robustness.test_sets` once per perturbation in
`config.robustness.perturbations` (remedis_jax/evaluators/robustness.py: intensity_scale,
intensity_shift, gamma, rotate, scale), and results.json gets
`robustness: {test set: {perturbation: {metric: value}}}` beside the clean
`test_sets: {test set: {metrics: {metric: value}}}`. This report reads those sections from every
run of a label-fraction sweep (experiments/label_fraction_sweep.py); nothing is evaluated.

Definitions (also written into the table header):
* Drop of a run = clean metric - perturbed metric on the same test set with the same
  checkpoint and thresholds (positive = worse under the perturbation, for a higher-is-better
  metric such as macro AUC).
* A cell is (init, label fraction, test set, perturbation): mean and std (ddof=1; 0 for one
  seed) over the finished seeds of the clean value, the perturbed value and the drop. The mean
  drop equals clean mean - perturbed mean (same seeds). A NaN value makes the mean NaN rather
  than being left out.
* "mean drop" (the table's last row) = the mean of a cell group's drop means over its
  perturbations: one number per init to compare methods by.
* Only finished runs count. Failed, unfinished and missing runs, and finished runs without a
  robustness section, are counted and listed, never silently dropped.

If no finished run has robustness results the report stops with an error: set
`config.overrides.robustness.perturbations` (and `robustness.test_sets`) in the sweep config
(configs/sweeps/methods_tiny.py does) and run the sweep into a FRESH workdir: finished runs are
skipped by the sweep, not re-evaluated.

Outputs (in --output_dir, default the sweep folder): robustness.csv (one row per cell),
robustness_runs.csv (one row per run, test set and perturbation), robustness.json (settings,
runs, cells, counts) and robustness.md (the markdown tables, also printed). The sweep folder and
--output_dir may be URLs (gs://...; data_pipelines/storage.py). Imports neither JAX nor TensorFlow.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Sequence

import numpy as np

from experiments import convergence_report
from experiments import sweep_plan
from experiments import sweep_run
from experiments import sweep_results
from data_pipelines import storage
from remedis_jax import run_files

CSV_FILE = "robustness.csv"
RUNS_CSV_FILE = "robustness_runs.csv"
JSON_FILE = "robustness.json"
TABLE_FILE = "robustness.md"
FORMAT = "remedis-jax-robustness/1"
ROW_COLUMNS = ("run_id", "init", "label_fraction", "seed", "test_set", "perturbation", "clean",
               "perturbed", "drop", "run_dir")
CELL_COLUMNS = ("init", "label_fraction", "test_set", "perturbation", "n", "seeds", "clean_mean",
                "clean_std", "perturbed_mean", "perturbed_std", "drop_mean", "drop_std")
EXAMPLE_PERTURBATIONS = ("gamma(0.7)", "rotate(15)", "scale(0.85)")


class NoRobustnessResultsError(ValueError):
  """No finished run of the sweep has a robustness section in its results.json."""


def _float(value: Any) -> float:
  return math.nan if value is None else float(value)


def rows_from_results(results: dict[str, Any], *, run_id: str, init: str, label_fraction: float,
                      seed: int, metric: str = "macro_auc", run_dir: str = ""
                      ) -> list[dict[str, Any]]:
  """One row per (test set, perturbation) of one finished run's results.json.

  Raises:
    KeyError: a robustness test set missing from `test_sets` (no clean value to compare with),
      or `metric` missing from a perturbation's metrics (names the keys there).
  """
  rows = []
  for test_set, per_perturbation in (results.get("robustness") or {}).items():
    clean_entry = (results.get("test_sets") or {}).get(test_set)
    if clean_entry is None:
      raise KeyError(f"{run_dir}/results.json: robustness test set {test_set!r} is not in "
                     f"test_sets ({', '.join(results.get('test_sets') or {})})")
    if metric not in clean_entry["metrics"]:
      raise KeyError(f"{run_dir}/results.json: --metric={metric!r} is not a test metric; keys: "
                     f"{', '.join(sorted(clean_entry['metrics']))}")
    clean = _float(clean_entry["metrics"][metric])
    for perturbation, metrics in per_perturbation.items():
      if metric not in metrics:
        raise KeyError(f"{run_dir}/results.json: robustness/{test_set}/{perturbation} has no "
                       f"{metric!r}; keys: {', '.join(sorted(metrics))}")
      perturbed = _float(metrics[metric])
      rows.append({"run_id": run_id, "init": init, "label_fraction": float(label_fraction),
                   "seed": int(seed), "test_set": test_set, "perturbation": perturbation,
                   "clean": clean, "perturbed": perturbed, "drop": clean - perturbed,
                   "run_dir": run_dir})
  return rows


def collect_rows(workdir: str, metric: str = "macro_auc"
                 ) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
  """The robustness rows of every finished run of a sweep, and what could not be used.

  Args:
    workdir: the sweep's folder.
    metric: the test metric key, e.g. "macro_auc".

  Returns:
    (sweep config from the plan ({} without one); rows with ROW_COLUMNS; status: {"counts":
    status -> runs, "not_finished": ["run_id (status)"], "without_robustness": [run ids of
    finished runs whose results.json has no robustness section]}).

  Raises:
    FileNotFoundError: not a sweep folder.
  """
  workdir = storage.absolute(workdir)
  sweep_config, runs = sweep_plan.list_runs(workdir)
  rows, counts, not_finished, without = [], {}, [], []
  for run in runs:
    status = sweep_run.run_status(workdir, run)
    counts[status] = counts.get(status, 0) + 1
    path = sweep_run.run_dir(workdir, run)
    if status != "finished":
      not_finished.append(f"{run.run_id} ({status})")
      continue
    results = storage.read_json(storage.join(path, run_files.RESULTS_FILE))
    run_rows = rows_from_results(results, run_id=run.run_id, init=run.init,
                                 label_fraction=run.label_fraction, seed=run.seed, metric=metric,
                                 run_dir=path)
    if not run_rows:
      without.append(run.run_id)
    rows.extend(run_rows)
  return sweep_config, rows, {"counts": counts, "not_finished": not_finished,
                              "without_robustness": without}


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Mean and std over seeds per (init, label fraction, test set, perturbation), in row order."""
  groups: dict[tuple, list[dict[str, Any]]] = {}
  for row in rows:
    key = (row["init"], round(row["label_fraction"], 12), row["test_set"], row["perturbation"])
    groups.setdefault(key, []).append(row)
  cells = []
  for (init, _, test_set, perturbation), members in groups.items():
    cell = {"init": init, "label_fraction": members[0]["label_fraction"], "test_set": test_set,
            "perturbation": perturbation, "n": len(members),
            "seeds": [m["seed"] for m in members]}
    for name in ("clean", "perturbed", "drop"):
      (cell[f"{name}_mean"], cell[f"{name}_std"], cell[f"{name}_ci_low"],
       cell[f"{name}_ci_high"]) = sweep_results.mean_std_interval([m[name] for m in members])
    cells.append(cell)
  return cells


def _percent(fraction: float) -> str:
  return f"{100 * fraction:g}%"


def format_tables(cells: Sequence[dict[str, Any]], *, metric: str,
                  inits: Sequence[str] | None = None) -> str:
  """Markdown: per test set and label fraction, perturbations x inits."""
  column = sweep_results.METRICS.get(metric, metric)
  label = sweep_results.METRIC_LABELS.get(column, metric)
  inits = list(inits or [])
  inits += [i for i in dict.fromkeys(c["init"] for c in cells) if i not in inits]
  inits = [i for i in inits if any(c["init"] == i for c in cells)]
  lines = [f"## Robustness: test {label} under perturbations", "",
           f"Each entry: perturbed {label}, mean +- std over seeds (ddof=1), and in brackets the "
           "mean drop from the clean value (clean - perturbed; positive = worse) with the "
           "Student-t 95% interval of that mean over seeds where there are two or more. "
           "\"clean\" is the unperturbed test set; \"mean drop\" averages the drops over the "
           "perturbations."]
  test_sets = list(dict.fromkeys(c["test_set"] for c in cells))
  fractions = sorted({round(c["label_fraction"], 12) for c in cells})
  for test_set in test_sets:
    for fraction in fractions:
      group = [c for c in cells if c["test_set"] == test_set
               and math.isclose(c["label_fraction"], fraction)]
      if not group:
        continue
      lines += ["", f"**{test_set}, {_percent(fraction)} of the labels**", "",
                "| perturbation | " + " | ".join(inits) + " |", "|---|" + "---|" * len(inits)]
      by_init = {i: [c for c in group if c["init"] == i] for i in inits}
      clean = []
      for init in inits:
        own = by_init[init]
        clean.append(f"{own[0]['clean_mean']:.3f} +- {own[0]['clean_std']:.3f} (n={own[0]['n']})"
                     if own else "")
      lines.append("| clean | " + " | ".join(clean) + " |")
      for perturbation in dict.fromkeys(c["perturbation"] for c in group):
        entries = []
        for init in inits:
          cell = next((c for c in by_init[init] if c["perturbation"] == perturbation), None)
          interval = ""
          if cell is not None and math.isfinite(cell["drop_ci_low"]):
            interval = f" [{cell['drop_ci_low']:+.3f}, {cell['drop_ci_high']:+.3f}]"
          entries.append("" if cell is None else
                         f"{cell['perturbed_mean']:.3f} +- {cell['perturbed_std']:.3f} "
                         f"({cell['drop_mean']:+.3f}{interval})")
        lines.append(f"| {perturbation} | " + " | ".join(entries) + " |")
      mean_drops = [f"{np.mean([c['drop_mean'] for c in by_init[i]]):+.3f}" if by_init[i] else ""
                    for i in inits]
      lines.append("| mean drop | " + " | ".join(mean_drops) + " |")
  return "\n".join(lines)


def robustness_report(workdir: str, *, metric: str = "macro_auc", output_dir: str | None = None,
                      verbose: bool = True) -> dict[str, Any]:
  """Reads a sweep's robustness results and writes the report files.

  Args:
    workdir: the sweep's folder.
    metric: the test metric key (results.json test_sets/robustness metrics), e.g. "macro_auc".
    output_dir: where the files go (default: `workdir`).
    verbose: print the tables and the file names.

  Returns:
    {"csv", "runs_csv", "json", "table_file" (paths), "table" (markdown), "rows", "cells",
    "status"}.

  Raises:
    NoRobustnessResultsError: no finished run has a robustness section (says how to enable it).
    ValueError: no finished run at all.
    KeyError: the metric is not in the results (names the keys there).
    FileNotFoundError: not a sweep folder.
  """
  workdir = storage.absolute(workdir)
  output_dir = storage.absolute(output_dir or workdir)
  sweep_config, rows, status = collect_rows(workdir, metric)
  num_finished = status["counts"].get("finished", 0)
  if not num_finished:
    raise ValueError(f"no finished run in {workdir} ({sum(status['counts'].values())} planned: "
                     f"{status['counts']}); run the sweep first")
  if not rows:
    raise NoRobustnessResultsError(
        f"none of the {num_finished} finished runs in {workdir} has robustness results (their "
        "results.json 'robustness' section is empty): the sweep ran without test-time "
        "perturbations. Set config.overrides.robustness.perturbations in the sweep config, e.g. "
        f"{EXAMPLE_PERTURBATIONS} (names: intensity_scale, intensity_shift, gamma, rotate, "
        "scale; remedis_jax/evaluators/robustness.py), optionally "
        "config.overrides.robustness.test_sets, as configs/sweeps/methods_tiny.py does, and run "
        "the sweep into a fresh --workdir (finished runs are skipped, not re-evaluated).")
  cells = summarize(rows)
  inits = list(sweep_config.get("inits") or {})
  baseline = sweep_config.get("baseline", convergence_report.DEFAULT_BASELINE)
  inits = ([baseline] if baseline in inits else []) + [i for i in inits if i != baseline]
  table = format_tables(cells, metric=metric, inits=inits)
  if status["without_robustness"]:
    table += (f"\n\n**{len(status['without_robustness'])} finished run(s) have no robustness "
              "results** (not in the means): " + ", ".join(status["without_robustness"]))
  if status["not_finished"]:
    table += (f"\n\n**{len(status['not_finished'])} run(s) did not finish** (not in the means): "
              + ", ".join(status["not_finished"]))
  storage.makedirs(output_dir)
  paths = {"csv": storage.join(output_dir, CSV_FILE),
           "runs_csv": storage.join(output_dir, RUNS_CSV_FILE),
           "json": storage.join(output_dir, JSON_FILE),
           "table_file": storage.join(output_dir, TABLE_FILE)}
  convergence_report.write_csv(cells, CELL_COLUMNS, paths["csv"])
  convergence_report.write_csv(rows, ROW_COLUMNS, paths["runs_csv"])
  sweep_results.write_json({"format": FORMAT, "workdir": workdir, "metric": metric,
                            "std_ddof": 1, "status": status, "rows": rows, "cells": cells},
                           paths["json"])
  storage.write_text(paths["table_file"], table + "\n")
  if verbose:
    print(table)
    print("\n" + "\n".join(f"{name:10s} {path}" for name, path in paths.items()))
  return dict(paths, table=table, rows=rows, cells=cells, status=status)


# ------------------------------------------------------------------------------------ CLI
def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  values = flags.FLAGS
  try:
    robustness_report(values.workdir, metric=values.metric, output_dir=values.output_dir)
  except (ValueError, KeyError, FileNotFoundError) as e:
    sys.exit(f"robustness_report: {e.args[0] if isinstance(e, KeyError) else e}")


def define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", None, "The sweep's folder (experiments.label_fraction_sweep).")
  flags.DEFINE_string("metric", "macro_auc", "Test metric key in results.json (macro_auc, "
                      "accuracy, balanced_accuracy, ...).")
  flags.DEFINE_string("output_dir", None, "Where the files go (default: --workdir).")
  flags.mark_flags_as_required(["workdir"])


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  define_flags()
  app.run(main)
