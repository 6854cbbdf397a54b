"""Aggregation of label-fraction sweeps: rows, mean/std/95% interval per cell, paired
differences against the baseline, the "matches the baseline" table, CSV/JSON files and the
data-efficiency plot.

Reads each run's results.json (schema "remedis-jax-finetune-results/1", documented in
remedis_jax/train_finetune.py) and nothing else, so it works the same for runs made in-process,
by local subprocesses or by a cluster scheduler. Reads and writes through data_pipelines/storage.py,
so the sweep folder may be a URL (gs://...). Imports neither JAX nor TensorFlow.

Definitions (also written into the table header):
* A cell is (init, label_fraction, test_set); its mean and std are over the seeds whose run
  finished. std uses ddof=1 (the sample standard deviation) when a cell has more than one seed,
  and is 0 for one seed. A NaN value (e.g. an AUC that is undefined on a test set) makes the
  cell's mean NaN rather than being silently left out.
* A cell's 95% interval is the two-sided Student-t confidence interval of its mean:
  mean +- t_{0.975, n-1} * std / sqrt(n). Seeds are few (often 3), so it uses the t quantile
  (12.7 for n = 2, 4.3 for n = 3), not the normal 1.96, which would be far too narrow. It is
  NaN for one seed (no spread to estimate) and NaN when the mean is.
* The paired difference of an init against the baseline at fraction f on a test set is, per
  seed present in both cells (init, f, test set) and (baseline, f, test set), init's value minus
  the baseline's. A seed draws the labeled subset (label_fraction_seed = seed), so both runs of
  a pair saw the same labels: the difference cancels what a lucky or unlucky subset does to
  both runs alike, a spread that both cells' own intervals contain. Reported with the mean,
  std (ddof=1, 0 for one pair), the 95% t-interval of the mean difference (as above, over the n
  pairs), n and the seeds used; a seed finished on one side only is left out of the pairs.
* An init "matches" the baseline on a test set at fraction f when its cell mean at f is
  >= (baseline cell mean) - tolerance, where the baseline cell is (baseline init,
  baseline_fraction, that test set). The reported fraction is the SMALLEST such f in the grid
  (the first crossing; a larger fraction may still fall below, which the full grid table shows).
  No fraction matching is reported as "never" with the best mean reached, not as 100%.
"""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Any, Iterable, Sequence

import numpy as np
from scipy import stats

from data_pipelines import storage
from remedis_jax import run_files

RESULTS_FILE = run_files.RESULTS_FILE
CSV_FILE = "results.csv"
JSON_FILE = "results.json"
PLOT_FILE = "data_efficiency.png"
TABLE_FILE = "summary.md"
FORMAT = "remedis-jax-sweep-results/1"
# Sweep metric name -> row column (train_finetune metric key in parentheses).
METRICS = {"macro_auc": "auc", "accuracy": "accuracy", "balanced_accuracy": "balanced_accuracy"}
METRIC_LABELS = {"auc": "macro AUC", "accuracy": "accuracy",
                 "balanced_accuracy": "balanced accuracy", "ece": "ECE"}
# Row column -> results.json test-set metric key.
ROW_METRICS = {"auc": "macro_auc", "accuracy": "accuracy", "balanced_accuracy": "balanced_accuracy",
               "ece": "ece", "sensitivity": "sensitivity", "specificity": "specificity"}
COLUMNS = ("run_id", "init", "label_fraction", "seed", "test_set", "status", "auc", "accuracy",
           "balanced_accuracy", "ece", "sensitivity", "specificity", "num_train_labels",
           "best_step", "best_val", "steps", "wall_time_s", "error", "run_dir")
CELL_METRICS = ("auc", "accuracy", "balanced_accuracy", "ece")
CONFIDENCE = 0.95  # of every interval in the summaries (two-sided)
INTERVAL = "two-sided 95% Student-t interval of the mean over seeds (NaN for one seed)"


def _float(value) -> float:
  return math.nan if value is None else float(value)


def rows_from_results(results: dict[str, Any], *, run_id: str, init: str, label_fraction: float,
                      seed: int, run_dir: str = "") -> list[dict[str, Any]]:
  """One row per test set of one finished run's results.json."""
  rows = []
  for test_set, entry in results["test_sets"].items():
    metrics = entry["metrics"]
    row = {"run_id": run_id, "init": init, "label_fraction": float(label_fraction),
           "seed": int(seed), "test_set": test_set, "status": "finished",
           "num_train_labels": results.get("num_train_labels"),
           "best_step": results.get("best", {}).get("step"),
           "best_val": _float(results.get("best", {}).get("value")),
           "steps": results.get("steps"), "wall_time_s": _float(results.get("wall_time_s")),
           "error": "", "run_dir": run_dir}
    row.update({column: _float(metrics.get(key)) for column, key in ROW_METRICS.items()})
    rows.append(row)
  return rows


def failed_row(*, run_id: str, init: str, label_fraction: float, seed: int, status: str,
               error: str = "", run_dir: str = "") -> dict[str, Any]:
  """The single row of a run that did not finish (test_set is empty, metrics NaN)."""
  row = {c: "" for c in COLUMNS}
  row.update({column: math.nan for column in ROW_METRICS})
  row.update({"run_id": run_id, "init": init, "label_fraction": float(label_fraction),
              "seed": int(seed), "status": status, "error": error, "run_dir": run_dir,
              "best_val": math.nan, "wall_time_s": math.nan})
  return row


def collect_rows(workdir: str, runs: Iterable[Any], failed: dict[str, str] | None = None
                 ) -> list[dict[str, Any]]:
  """Rows of every planned run: finished runs per test set; the others as one row each.

  Args:
    workdir: the sweep folder (runs live in workdir/<run_id>).
    runs: objects with run_id, init, label_fraction, seed (sweep_plan.Run).
    failed: run id -> error text of runs that failed in this call or before.

  Returns:
    Rows with the keys COLUMNS.
  """
  failed = failed or {}
  rows = []
  for run in runs:
    path = storage.join(workdir, run.run_id)
    try:
      results = storage.read_json(storage.join(path, RESULTS_FILE))
    except FileNotFoundError:
      results = None
    ids = dict(run_id=run.run_id, init=run.init, label_fraction=run.label_fraction,
               seed=run.seed, run_dir=path)
    if results is not None and results.get("finished"):
      rows.extend(rows_from_results(results, **ids))
    elif run.run_id in failed:
      rows.append(failed_row(status="failed", error=failed[run.run_id], **ids))
    else:
      rows.append(failed_row(status="missing" if results is None else "interrupted", **ids))
  return rows


def mean_std_interval(values: Sequence[float], confidence: float = CONFIDENCE
                      ) -> tuple[float, float, float, float]:
  """Mean, std (ddof=1; 0 for one value) and the Student-t interval of the mean.

  The interval is mean +- t_{(1 + confidence) / 2, n-1} * std / sqrt(n): exact for normal
  values, and the usual choice for a handful of seeds, where the normal quantile would be too
  narrow. It is (NaN, NaN) for fewer than two values, and NaN whenever a value is NaN.

  Returns:
    (mean, std, low, high); all NaN for no values.
  """
  values = np.asarray(values, np.float64)
  n = len(values)
  if n == 0:
    return math.nan, math.nan, math.nan, math.nan
  mean = float(np.mean(values))
  if n == 1:
    return mean, 0.0, math.nan, math.nan
  std = float(np.std(values, ddof=1))
  half_width = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * std / math.sqrt(n)
  return mean, std, mean - half_width, mean + half_width


def summarize(rows: Sequence[dict[str, Any]], metrics: Sequence[str] = CELL_METRICS
              ) -> list[dict[str, Any]]:
  """Mean, std and 95% interval over seeds per (init, label_fraction, test_set) cell.

  Returns:
    Cells {init, label_fraction, test_set, n (finished seeds), n_failed (runs of that
    (init, fraction) that did not finish), seeds, <metric>_mean, <metric>_std,
    <metric>_ci_low, <metric>_ci_high} (`mean_std_interval`), in the order the cells first
    appear in `rows`.
  """
  groups: dict[tuple, list[dict[str, Any]]] = {}
  not_finished: dict[tuple, int] = {}
  for row in rows:
    if row["status"] != "finished":
      key = (row["init"], row["label_fraction"])
      not_finished[key] = not_finished.get(key, 0) + 1
      continue
    groups.setdefault((row["init"], row["label_fraction"], row["test_set"]), []).append(row)
  cells = []
  for (init, fraction, test_set), members in groups.items():
    cell = {"init": init, "label_fraction": fraction, "test_set": test_set, "n": len(members),
            "n_failed": not_finished.get((init, fraction), 0),
            "seeds": [m["seed"] for m in members]}
    for metric in metrics:
      (cell[f"{metric}_mean"], cell[f"{metric}_std"], cell[f"{metric}_ci_low"],
       cell[f"{metric}_ci_high"]) = mean_std_interval([m[metric] for m in members])
    cells.append(cell)
  return cells


def paired_differences(rows: Sequence[dict[str, Any]], *, metric: str, baseline: str,
                       inits: Sequence[str] | None = None) -> list[dict[str, Any]]:
  """Per seed, each init minus the baseline at the same label fraction and test set.

  The seed of a sweep run also draws its labeled subset, so the runs (init, f, seed) and
  (baseline, f, seed) were trained on the same labels; their difference is free of the
  subset-to-subset spread, and its interval is what says whether an init beats the baseline
  at f. Only finished rows count; a seed finished on one side only is left out (see
  `unpaired_seeds`). A NaN value makes its difference, and so the mean, NaN.

  Args:
    rows: `collect_rows` output.
    metric: the sweep metric name ("macro_auc", ...) or a row column ("auc", ...).
    baseline: the baseline init's name.
    inits: the inits to compare, in order (default: as they appear in rows); the baseline
      itself is skipped.

  Returns:
    One dict per (test_set, init, label_fraction) of a finished init run, ordered by test set
    (as in rows), init, then fraction: test_set, init, baseline, label_fraction, metric (the
    row column), n (pairs), seeds (paired, ascending), differences (per paired seed),
    unpaired_seeds (finished for one side only), mean, std, ci_low, ci_high
    (`mean_std_interval`; mean NaN for no pairs).

  Raises:
    ValueError: two finished rows of one (init, fraction, test set, seed).
  """
  column = METRICS.get(metric, metric)
  values: dict[tuple, dict[int, float]] = {}
  for row in rows:
    if row["status"] != "finished":
      continue
    key = (row["init"], float(row["label_fraction"]), row["test_set"])
    per_seed = values.setdefault(key, {})
    if row["seed"] in per_seed:
      raise ValueError(f"two finished rows for init={row['init']} "
                       f"label_fraction={row['label_fraction']} test_set={row['test_set']} "
                       f"seed={row['seed']}; a seed must be one run")
    per_seed[row["seed"]] = float(row[column])
  inits = list(inits) if inits is not None else list(dict.fromkeys(k[0] for k in values))
  test_sets = list(dict.fromkeys(k[2] for k in values))
  pairs = []
  for test_set in test_sets:
    for init in inits:
      if init == baseline:
        continue
      fractions = sorted(k[1] for k in values if k[0] == init and k[2] == test_set)
      for fraction in fractions:
        own = values[(init, fraction, test_set)]
        reference = next((v for (i, f, t), v in values.items() if i == baseline
                          and t == test_set and math.isclose(f, fraction)), {})
        seeds = sorted(set(own) & set(reference))
        differences = [own[s] - reference[s] for s in seeds]
        mean, std, low, high = mean_std_interval(differences)
        pairs.append({"test_set": test_set, "init": init, "baseline": baseline,
                      "label_fraction": fraction, "metric": column, "n": len(seeds),
                      "seeds": seeds, "differences": differences,
                      "unpaired_seeds": sorted(set(own) ^ set(reference)),
                      "mean": mean, "std": std, "ci_low": low, "ci_high": high})
  return pairs


def _interval(cell: dict[str, Any] | None, metric: str) -> list[float]:
  """[low, high] of a cell's interval; NaN for none (also for cells made without one)."""
  if cell is None:
    return [math.nan, math.nan]
  return [cell.get(f"{metric}_ci_low", math.nan), cell.get(f"{metric}_ci_high", math.nan)]


def find_cell(cells, init: str, fraction: float, test_set: str) -> dict[str, Any] | None:
  for cell in cells:
    if (cell["init"] == init and math.isclose(cell["label_fraction"], fraction)
        and cell["test_set"] == test_set):
      return cell
  return None


def matching_fractions(cells: Sequence[dict[str, Any]], *, metric: str, baseline: str,
                       baseline_fraction: float = 1.0, tolerance: float = 0.0,
                       inits: Sequence[str] | None = None) -> list[dict[str, Any]]:
  """The smallest label fraction at which each init matches the baseline, per test set.

  Args:
    cells: `summarize` output.
    metric: a row column, e.g. "auc".
    baseline: the baseline init's name; its cell at `baseline_fraction` is the reference.
    baseline_fraction: e.g. 1.0 (the supervised baseline trained on all labels).
    tolerance: "matches" = cell mean >= baseline mean - tolerance.
    inits: the inits to report, in order (default: as they appear in cells).

  Returns:
    One dict per (test_set, init): test_set, init, baseline_mean, baseline_ci (the baseline
    cell's [low, high], NaN when it has none), threshold, status ("matches" | "never" |
    "no baseline"), match_fraction (None unless "matches"), match_mean, match_ci ([low, high]
    of the matching cell, None unless "matches"), best_fraction, best_mean.
  """
  test_sets = list(dict.fromkeys(c["test_set"] for c in cells))
  inits = list(inits) if inits is not None else list(dict.fromkeys(c["init"] for c in cells))
  key = f"{metric}_mean"
  matches = []
  for test_set in test_sets:
    reference = find_cell(cells, baseline, baseline_fraction, test_set)
    baseline_mean = reference[key] if reference is not None else math.nan
    baseline_ci = _interval(reference, metric)
    threshold = baseline_mean - tolerance
    for init in inits:
      own = sorted((c for c in cells if c["init"] == init and c["test_set"] == test_set
                    and c["n"] > 0 and math.isfinite(c[key])), key=lambda c: c["label_fraction"])
      entry = {"test_set": test_set, "init": init, "baseline_mean": baseline_mean,
               "baseline_ci": baseline_ci, "threshold": threshold, "status": "never",
               "match_fraction": None, "match_mean": None, "match_ci": None,
               "best_fraction": None, "best_mean": None}
      if own:
        best = max(own, key=lambda c: c[key])
        entry.update(best_fraction=best["label_fraction"], best_mean=best[key])
      if not math.isfinite(baseline_mean):
        entry["status"] = "no baseline"
      else:
        first = next((c for c in own if c[key] >= threshold), None)
        if first is not None:
          entry.update(status="matches", match_fraction=first["label_fraction"],
                       match_mean=first[key], match_ci=_interval(first, metric))
      matches.append(entry)
  return matches


# ------------------------------------------------------------------------------- formatting
def _percent(fraction: float) -> str:
  return f"{100 * fraction:g}%"


def _bracket(low: float, high: float, sign: str = "") -> str:
  """" [low, high]" for a finite interval, "" otherwise (one seed, a NaN value)."""
  if not (math.isfinite(low) and math.isfinite(high)):
    return ""
  return f" [{low:{sign}.3f}, {high:{sign}.3f}]"


def format_cell(cell: dict[str, Any], metric: str) -> str:
  """"mean +- std [95% low, high] (n)"; the interval is left out where it is undefined."""
  failed = f", {cell['n_failed']} failed" if cell.get("n_failed") else ""
  return (f"{cell[metric + '_mean']:.3f} +- {cell[metric + '_std']:.3f}"
          f"{_bracket(*_interval(cell, metric))} ({cell['n']}{failed})")


def format_match_table(matches: Sequence[dict[str, Any]], *, metric: str, baseline: str,
                       baseline_fraction: float, tolerance: float, title: str = "") -> str:
  """Markdown: one row per test set, one column per init, the smallest matching fraction."""
  inits = list(dict.fromkeys(m["init"] for m in matches))
  test_sets = list(dict.fromkeys(m["test_set"] for m in matches))
  label = METRIC_LABELS.get(metric, metric)
  lines = [f"## Smallest label fraction matching the baseline{(' - ' + title) if title else ''}",
           "",
           f"Baseline: `{baseline}` fine-tuned on {_percent(baseline_fraction)} of the labels. "
           f"An init matches at f when its mean {label} over seeds at f is >= the baseline's "
           f"mean - {tolerance:g} (tolerance); the smallest such f of the grid is shown with "
           "its mean [95% interval of that mean, where defined]. \"never\" = no fraction of "
           "the grid matched (best mean and its fraction shown).",
           "",
           "| test set | baseline " + label + " | " + " | ".join(inits) + " |",
           "|---|---|" + "---|" * len(inits)]
  for test_set in test_sets:
    per_init = {m["init"]: m for m in matches if m["test_set"] == test_set}
    first = next(iter(per_init.values()))
    baseline_mean = first["baseline_mean"]
    cells = []
    for init in inits:
      m = per_init[init]
      if m["status"] == "matches":
        interval = _bracket(*(m.get("match_ci") or (math.nan, math.nan)))
        cells.append(f"{_percent(m['match_fraction'])} ({m['match_mean']:.3f}{interval})")
      elif m["status"] == "no baseline":
        cells.append("no baseline")
      elif m["best_mean"] is None:
        cells.append("never (no finished run)")
      else:
        cells.append(f"never (best {m['best_mean']:.3f} at {_percent(m['best_fraction'])})")
    shown = (f"{baseline_mean:.3f}"
             f"{_bracket(*first.get('baseline_ci', (math.nan, math.nan)))}"
             if math.isfinite(baseline_mean) else "n/a")
    lines.append(f"| {test_set} | {shown} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def format_grid_table(cells: Sequence[dict[str, Any]], *, metric: str) -> str:
  """Markdown: per test set, mean +- std [95% interval] (n seeds) for every init and fraction."""
  lines = [f"## {METRIC_LABELS.get(metric, metric)} per cell: mean +- std [95% interval] over "
           "seeds (n); std with ddof=1; the interval is the Student-t interval of the mean "
           "(none for one seed)"]
  fractions = sorted({c["label_fraction"] for c in cells})
  for test_set in dict.fromkeys(c["test_set"] for c in cells):
    lines += ["", f"**{test_set}**", "",
              "| init | " + " | ".join(_percent(f) for f in fractions) + " |",
              "|---|" + "---|" * len(fractions)]
    for init in dict.fromkeys(c["init"] for c in cells):
      entries = []
      for f in fractions:
        c = find_cell(cells, init, f, test_set)
        entries.append("" if c is None else format_cell(c, metric))
      lines.append(f"| {init} | " + " | ".join(entries) + " |")
  return "\n".join(lines)


def format_paired_table(pairs: Sequence[dict[str, Any]], *, metric: str, baseline: str,
                        title: str = "") -> str:
  """Markdown: per test set, init x fraction, the mean paired difference [95% interval] (n)."""
  label = METRIC_LABELS.get(metric, metric)
  lines = [f"## Paired difference vs `{baseline}` at the same fraction, per seed: "
           f"mean [95% CI] (n){(' - ' + title) if title else ''}", "",
           f"Per seed, the init's {label} minus `{baseline}`'s at the same label fraction and "
           "seed, i.e. on the same labeled subset; mean over the n seeds finished on both "
           "sides, with the Student-t 95% interval of that mean (none for one pair); \"k "
           "unpaired\" counts seeds finished on one side only. An interval entirely above 0 "
           "says the init scores higher than the baseline at that fraction."]
  if not pairs:
    return "\n".join(lines + ["", "(no init other than the baseline has a finished run)"])
  fractions = sorted({p["label_fraction"] for p in pairs})
  for test_set in dict.fromkeys(p["test_set"] for p in pairs):
    lines += ["", f"**{test_set}**", "",
              "| init | " + " | ".join(_percent(f) for f in fractions) + " |",
              "|---|" + "---|" * len(fractions)]
    own = [p for p in pairs if p["test_set"] == test_set]
    for init in dict.fromkeys(p["init"] for p in own):
      entries = []
      for f in fractions:
        p = next((p for p in own if p["init"] == init and math.isclose(p["label_fraction"], f)),
                 None)
        if p is None:
          entries.append("")
        elif p["n"] == 0:
          entries.append(f"no common seed with {baseline}")
        else:
          unpaired = (f", {len(p['unpaired_seeds'])} unpaired" if p["unpaired_seeds"] else "")
          mean = f"{p['mean']:+.3f}" if math.isfinite(p["mean"]) else "nan"
          entries.append(f"{mean}{_bracket(p['ci_low'], p['ci_high'], '+')} "
                         f"({p['n']}{unpaired})")
      lines.append(f"| {init} | " + " | ".join(entries) + " |")
  return "\n".join(lines)


def write_csv(rows: Sequence[dict[str, Any]], path: str,
              columns: Sequence[str] = COLUMNS) -> None:
  """Rows -> CSV at `path` (a file or a URL, written at once); NaN as an empty field."""
  text = io.StringIO(newline="")
  writer = csv.DictWriter(text, fieldnames=list(columns), extrasaction="ignore")
  writer.writeheader()
  for row in rows:
    writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v)
                     for k, v in row.items()})
  storage.write_text(path, text.getvalue())


def write_json(payload: dict[str, Any], path: str) -> None:
  """Strict JSON (NaN -> null), written atomically to a file or a URL."""
  storage.write_text(path, json.dumps(storage.json_safe(payload), indent=1, allow_nan=False))


def save_figure(fig, path: str, dpi: int = 110) -> None:
  """`fig.savefig(path)` for a file or a URL: rendered in memory, written in one piece."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=dpi)
  storage.write_bytes(path, buffer.getvalue())


# ------------------------------------------------------------------------------------ plots
def draw_data_efficiency(ax, cells: Sequence[dict[str, Any]], *, test_set: str, metric: str,
                         inits: Sequence[str], baseline: str | None = None,
                         baseline_fraction: float = 1.0) -> None:
  """One panel: metric vs % labels (log x), one line per init with +-1 std error bars."""
  fractions = sorted({c["label_fraction"] for c in cells if c["test_set"] == test_set})
  for init in inits:
    own = sorted((c for c in cells if c["init"] == init and c["test_set"] == test_set),
                 key=lambda c: c["label_fraction"])
    if not own:
      continue
    ax.errorbar([100 * c["label_fraction"] for c in own], [c[f"{metric}_mean"] for c in own],
                yerr=[c[f"{metric}_std"] for c in own], marker="o", capsize=3, label=init)
  if baseline is not None:
    reference = find_cell(cells, baseline, baseline_fraction, test_set)
    if reference is not None and math.isfinite(reference[f"{metric}_mean"]):
      ax.axhline(reference[f"{metric}_mean"], color="gray", linestyle="--", linewidth=1,
                 label=f"{baseline} @ {_percent(baseline_fraction)}")
  ax.set_xscale("log")
  if fractions:
    ax.set_xticks([100 * f for f in fractions])
    ax.set_xticklabels([f"{100 * f:g}" for f in fractions])
    ax.minorticks_off()
  ax.set_xlabel("% of training labels (log scale)")
  ax.set_ylabel(METRIC_LABELS.get(metric, metric))
  ax.set_title(test_set)
  ax.grid(True, alpha=0.3)


def plot_data_efficiency(cells: Sequence[dict[str, Any]], path: str, *, metric: str,
                         inits: Sequence[str], baseline: str | None, baseline_fraction: float,
                         title: str = "") -> None:
  """data_efficiency.png: one panel per test set."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  test_sets = list(dict.fromkeys(c["test_set"] for c in cells)) or ["(no finished runs)"]
  fig, axes = plt.subplots(1, len(test_sets), figsize=(4.2 * len(test_sets), 3.8), squeeze=False,
                           sharey=True)
  for ax, test_set in zip(axes[0], test_sets):
    draw_data_efficiency(ax, cells, test_set=test_set, metric=metric, inits=inits,
                         baseline=baseline, baseline_fraction=baseline_fraction)
  if axes[0][0].get_legend_handles_labels()[0]:
    axes[0][0].legend(fontsize=8)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  save_figure(fig, path)
  plt.close(fig)


def write_outputs(rows: Sequence[dict[str, Any]], workdir: str, *, metric: str, baseline: str,
                  baseline_fraction: float, tolerance: float, inits: Sequence[str],
                  title: str = "", sweep_config: dict[str, Any] | None = None,
                  run_status: dict[str, str] | None = None, prefix: str = "") -> dict[str, Any]:
  """results.csv, results.json, data_efficiency.png and summary.md (with an optional prefix).

  Args:
    rows: `collect_rows` output.
    workdir: where the files go.
    metric: the sweep metric name ("macro_auc", ...) or a row column ("auc", ...).
    baseline, baseline_fraction, tolerance: see `matching_fractions`.
    inits: the init names, in legend order.
    title: plot and table title.
    sweep_config: stored in results.json.
    run_status: run id -> status, stored in results.json.
    prefix: file name prefix (e.g. "ood_").

  Returns:
    {"results_csv", "results_json", "plot", "table_file", "table" (markdown), "matches",
    "cells", "paired" (`paired_differences` of `inits` against the baseline)}.
  """
  column = METRICS.get(metric, metric)
  cells = summarize(rows)
  matches = matching_fractions(cells, metric=column, baseline=baseline,
                               baseline_fraction=baseline_fraction, tolerance=tolerance,
                               inits=inits)
  paired = paired_differences(rows, metric=column, baseline=baseline, inits=inits)
  failed = [r for r in rows if r["status"] != "finished"]
  table = format_match_table(matches, metric=column, baseline=baseline,
                             baseline_fraction=baseline_fraction, tolerance=tolerance,
                             title=title)
  table += "\n\n" + format_grid_table(cells, metric=column)
  table += "\n\n" + format_paired_table(paired, metric=column, baseline=baseline, title=title)
  if failed:
    table += (f"\n\n**{len(failed)} run(s) did not finish** (not in the means): "
              + ", ".join(f"{r['run_id']} ({r['status']})" for r in failed))
  paths = {"results_csv": storage.join(workdir, prefix + CSV_FILE),
           "results_json": storage.join(workdir, prefix + JSON_FILE),
           "plot": storage.join(workdir, prefix + PLOT_FILE),
           "table_file": storage.join(workdir, prefix + TABLE_FILE)}
  write_csv(rows, paths["results_csv"])
  write_json({"format": FORMAT, "metric": column, "baseline": baseline,
              "baseline_fraction": baseline_fraction, "match_tolerance": tolerance,
              "std_ddof": 1, "interval": INTERVAL, "sweep_config": sweep_config or {},
              "run_status": run_status or {},
              "num_failed_runs": len(failed), "rows": list(rows), "cells": cells,
              "matches": matches, "paired": paired}, paths["results_json"])
  plot_data_efficiency(cells, paths["plot"], metric=column, inits=inits, baseline=baseline,
                       baseline_fraction=baseline_fraction, title=title)
  storage.write_text(paths["table_file"], table + "\n")
  return dict(paths, table=table, matches=matches, cells=cells, paired=paired)
