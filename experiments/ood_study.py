r"""Out-of-distribution study (REMEDIS' data-efficient generalisation, simplified to sites).

  python -m experiments.ood_study --config=configs/sweeps/ood_tiny.py \
    --workdir=workdirs/quickstart/ood [--parallel=2] [--mode=run|plan|joblist|aggregate]

REMEDIS asks two questions of a representation: how well does a model trained at one hospital
work at others without new labels (zero-shot), and how many labels of the new hospital does it
need to match a supervised model trained on all of them (data-efficient generalisation). Here
the hospitals are the synthetic source's acquisition sites (A reference, B soft/bright,
C inverted, D low-resolution; data_pipelines/sources/synthetic.py):

  step 1  fine-tune each init on site A (`site_a_label_fraction` of its labels, default all),
          evaluate on site A (in distribution) and zero-shot on `zero_shot_sites` (B, C).
          -> WORKDIR/step1_site_A/ (a label-fraction sweep with one fraction)
  step 2  fine-tune each init on `label_fractions` of site-B labels (train and validation at
          site B, tested at site B). -> WORKDIR/step2_site_B/ (a label-fraction sweep)
  report  the smallest site-B fraction at which `headline_init` (REMEDIS) matches the baseline
          (`baseline` init, scratch, at `baseline_fraction` = 100% of site B).

Step 2 starts from the inits (the pretrained representations). REMEDIS
itself starts its OOD fine-tuning from the in-distribution fine-tuned model; with this code
that is an init pointing at a step-1 run folder (a workdir with checkpoints/), e.g.
`--config.inits.remedis=WORKDIR/step1_site_A/init=remedis/frac=1/seed=0` (one seed's model).

Both steps are planned and validated before either starts; each step is resumable and skips
finished runs (experiments/label_fraction_sweep.py). Outputs in WORKDIR: ood_results.csv and
ood_results.json (the rows of both steps with a `step` column, cells with mean, std and 95%
interval, paired differences against the baseline per seed for both steps, matches), ood.png
(left: zero-shot metric per site and init; right: site-B data efficiency) and ood_summary.md
(the headline sentence, the zero-shot table, the step-1 paired differences and step 2's
summary; sweep_results.py defines the statistics). WORKDIR and the inits may be URLs
(gs://...), as in the label-fraction sweep.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import ml_collections

from configs.sweeps import common as sweep_configs
from experiments import label_fraction_sweep as sweep
from experiments import sweep_plan
from experiments import sweep_results
from data_pipelines import storage
from remedis_jax import run_files

STEP1_DIR = "step1_site_{}"
STEP2_DIR = "step2_site_{}"
SYNTHETIC_SITES = ("A", "B", "C", "D")  # data_pipelines.sources.synthetic.SITE_NAMES


def default_ood_config() -> ml_collections.ConfigDict:
  """The keys every OOD config has: a sweep config plus the sites (configs/sweeps/common.py)."""
  return sweep_configs.default_ood_config()


def site_test_set(site: str) -> str:
  return f"site_{site}=test@{site}"


def _nested(flat: dict[str, Any]) -> ml_collections.ConfigDict:
  nested: dict[str, Any] = {}
  for key, value in flat.items():
    node = nested
    *parents, leaf = key.split(".")
    for parent in parents:
      node = node.setdefault(parent, {})
    node[leaf] = value
  return ml_collections.ConfigDict(nested)


def step_configs(ood_config: ml_collections.ConfigDict
                 ) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
  """The two label-fraction sweep configs (step 1 at site A, step 2 at site B).

  Raises:
    ValueError: unknown or repeated sites, or a headline init that is not an init.
  """
  sites = [ood_config.site_a, ood_config.site_b, *ood_config.zero_shot_sites]
  unknown = [s for s in sites if s not in SYNTHETIC_SITES]
  if unknown:
    raise ValueError(f"OOD config names unknown site(s) {unknown}; the synthetic source has "
                     f"sites {SYNTHETIC_SITES} (site_a, site_b, zero_shot_sites)")
  if ood_config.site_a in ood_config.zero_shot_sites:
    raise ValueError(f"OOD config zero_shot_sites {tuple(ood_config.zero_shot_sites)} contains "
                     f"site_a={ood_config.site_a!r}, the training site")
  if ood_config.site_a == ood_config.site_b:
    raise ValueError(f"OOD config site_b={ood_config.site_b!r} equals site_a: step 2 needs a new "
                     "site")
  if ood_config.headline_init not in ood_config.inits:
    raise ValueError(f"OOD config headline_init={ood_config.headline_init!r} is not one of the "
                     f"inits ({', '.join(ood_config.inits.keys())}); unknown init")
  shared = sweep_plan.flatten(ood_config.overrides)
  keys = ("base", "seeds", "inits", "baseline", "metric", "match_tolerance", "finetune_mode")

  def make(fractions, baseline_fraction, overrides):
    config = sweep_configs.default_sweep_config()
    for key in keys:
      config[key] = ood_config[key]
    config.label_fractions = tuple(fractions)
    config.baseline_fraction = baseline_fraction
    config.overrides = _nested(dict(shared, **overrides))
    return config

  a, b = ood_config.site_a, ood_config.site_b
  zero_shot = [s for s in dict.fromkeys(ood_config.zero_shot_sites)]
  step1 = make((ood_config.site_a_label_fraction,), ood_config.site_a_label_fraction, {
      "data.sites.train": a, "data.sites.val": a,
      "test_sets": tuple(site_test_set(s) for s in [a] + zero_shot)})
  step2 = make(ood_config.label_fractions, ood_config.baseline_fraction, {
      "data.sites.train": b, "data.sites.val": b, "test_sets": (site_test_set(b),)})
  return step1, step2


def zero_shot_table(cells, *, metric: str, inits, sites, site_a: str) -> str:
  """Markdown: mean +- std [95% interval] (n) of the step-1 models at each site."""
  label = sweep_results.METRIC_LABELS.get(metric, metric)
  header = [f"site {s}" + (" (in distribution)" if s == site_a else " (zero-shot)")
            for s in sites]
  lines = [f"## Step 1: trained on site {site_a}, {label} at each site (mean +- std "
           "[95% Student-t interval of the mean] over seeds (n))",
           "", "| init | " + " | ".join(header) + " |", "|---|" + "---|" * len(sites)]
  for init in inits:
    entries = []
    for s in sites:
      cell = next((c for c in cells if c["init"] == init and c["test_set"] == f"site_{s}"), None)
      entries.append("" if cell is None else sweep_results.format_cell(cell, metric))
    lines.append(f"| {init} | " + " | ".join(entries) + " |")
  return "\n".join(lines)


def headline(matches, *, init: str, baseline: str, baseline_fraction: float, site_b: str,
             metric: str) -> str:
  entry = next((m for m in matches if m["init"] == init), None)
  label = sweep_results.METRIC_LABELS.get(metric, metric)
  reference = (f"the supervised baseline ({baseline}) retrained on "
               f"{100 * baseline_fraction:g}% of site-{site_b} labels")
  if entry is None or entry["status"] == "no baseline":
    return f"No headline: {init} or the baseline has no finished site-{site_b} run."
  if entry["status"] == "matches":
    return (f"**{init} matches {reference} with {100 * entry['match_fraction']:g}% of the "
            f"site-{site_b} labels** ({label} {entry['match_mean']:.3f} vs "
            f"{entry['baseline_mean']:.3f}).")
  return (f"**{init} never matches {reference}** in this grid (best {label} "
          f"{entry['best_mean']:.3f} at {100 * entry['best_fraction']:g}% vs "
          f"{entry['baseline_mean']:.3f}).")


def plot_ood(step1_cells, step2_cells, path: str, *, metric: str, inits, sites, site_b: str,
             baseline: str, baseline_fraction: float, title: str = "") -> None:
  """ood.png: zero-shot per site (left) and site-B data efficiency (right)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
  width = 0.8 / max(len(inits), 1)
  for i, init in enumerate(inits):
    means, stds = [], []
    for s in sites:
      cell = next((c for c in step1_cells if c["init"] == init and c["test_set"] == f"site_{s}"),
                  None)
      means.append(math.nan if cell is None else cell[f"{metric}_mean"])
      stds.append(0.0 if cell is None else cell[f"{metric}_std"])
    left.bar([j + (i - (len(inits) - 1) / 2) * width for j in range(len(sites))], means, width,
             yerr=stds, capsize=3, label=init)
  left.set_xticks(range(len(sites)))
  left.set_xticklabels([f"site {s}" + (" (train)" if j == 0 else "")
                        for j, s in enumerate(sites)])
  left.set_ylabel(sweep_results.METRIC_LABELS.get(metric, metric))
  left.set_title("step 1: zero-shot at other sites")
  values = [c[f"{metric}_mean"] for c in step1_cells if math.isfinite(c[f"{metric}_mean"])]
  if values:
    left.set_ylim(max(0.0, min(values) - 0.1), min(1.0, max(values) + 0.1))
  if left.get_legend_handles_labels()[0]:
    left.legend(fontsize=8)
  left.grid(True, axis="y", alpha=0.3)
  sweep_results.draw_data_efficiency(right, step2_cells, test_set=f"site_{site_b}",
                                     metric=metric, inits=inits, baseline=baseline,
                                     baseline_fraction=baseline_fraction)
  right.set_title(f"step 2: fine-tuning on site-{site_b} labels")
  if right.get_legend_handles_labels()[0]:
    right.legend(fontsize=8)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  sweep_results.save_figure(fig, path)
  plt.close(fig)


def run_ood_study(ood_config: ml_collections.ConfigDict, workdir: str, *, parallel: int = 1,
                  mode: str = "run", python: str = sys.executable, verbose: bool = True,
                  **executor) -> dict[str, Any]:
  """Runs (or plans / lists / aggregates) both steps and writes the OOD outputs.

  `executor` holds run_sweep's executor keywords (executor, ray_address, ray_resources).

  Args:
    ood_config: an OOD config (configs/sweeps/ood_tiny.py).
    workdir: the study's folder (step1_site_<A>/, step2_site_<B>/ and the outputs).
    parallel, mode, python, verbose: as label_fraction_sweep.run_sweep.

  Returns:
    {"step1", "step2" (the run_sweep summaries), "failed" (run id -> error over both steps),
    "headline" (text), "matches" (step-2 matches), and with mode run/aggregate "results_csv",
    "results_json", "plot", "table_file", "table"}. A preemption in step 1 returns step1,
    step2 None and "preempted" True, before step 2 starts.

  Raises:
    ValueError / KeyError / TypeError / FileNotFoundError: a bad config, before any run.
  """
  start = time.time()
  log = print if verbose else (lambda *a, **k: None)
  step1, step2 = step_configs(ood_config)
  # Both steps are checked before either runs: a typo in step 2 must not cost step 1's time.
  sweep_plan.validate(step1, check_runs=mode != "aggregate")
  sweep_plan.validate(step2, check_runs=mode != "aggregate")
  workdir = storage.absolute(workdir)
  dir1 = storage.join(workdir, STEP1_DIR.format(ood_config.site_a))
  dir2 = storage.join(workdir, STEP2_DIR.format(ood_config.site_b))
  kwargs = dict(parallel=parallel, mode=mode, python=python, verbose=verbose, **executor)
  log(f"OOD step 1: fine-tune on site {ood_config.site_a}, test at "
      f"{', '.join([ood_config.site_a, *ood_config.zero_shot_sites])} -> {dir1}")
  summary1 = sweep.run_sweep(step1, dir1, title=f"step 1: trained on site {ood_config.site_a}",
                             **kwargs)
  if summary1["counts"].get("interrupted"):
    # SIGTERM stopped a run of step 1 (the sweep stopped after it): step 2 must not start.
    log("OOD study preempted in step 1; rerun the same command to resume.")
    return {"step1": summary1, "step2": None, "failed": summary1.get("failed", {}),
            "preempted": True, "wall_time_s": time.time() - start}
  log(f"OOD step 2: fine-tune on fractions of site-{ood_config.site_b} labels -> {dir2}")
  summary2 = sweep.run_sweep(step2, dir2, title=f"step 2: site-{ood_config.site_b} labels",
                             **kwargs)
  summary: dict[str, Any] = {"step1": summary1, "step2": summary2,
                             "failed": {**summary1.get("failed", {}),
                                        **summary2.get("failed", {})},
                             "preempted": bool(summary2.get("counts", {}).get(
                                 "interrupted"))}
  if mode in ("plan", "joblist"):
    if mode == "joblist":
      summary["jobs_files"] = [summary1["jobs_file"], summary2["jobs_file"]]
      log("Run both job lists (they are independent), then --mode=aggregate.")
    summary["wall_time_s"] = time.time() - start
    return summary

  metric = sweep_results.METRICS[ood_config.metric]
  inits = list(ood_config.inits.keys())
  sites = list(dict.fromkeys([ood_config.site_a, *ood_config.zero_shot_sites]))
  rows1 = sweep_results.collect_rows(dir1, sweep_plan.plan_runs(step1), summary1["failed"])
  rows2 = sweep_results.collect_rows(dir2, sweep_plan.plan_runs(step2), summary2["failed"])
  rows = ([dict(r, step=f"1_site_{ood_config.site_a}") for r in rows1]
          + [dict(r, step=f"2_site_{ood_config.site_b}") for r in rows2])
  matches = summary2["matches"]
  text = headline(matches, init=ood_config.headline_init, baseline=ood_config.baseline,
                  baseline_fraction=float(ood_config.baseline_fraction),
                  site_b=ood_config.site_b, metric=metric)
  table = "\n\n".join([
      "# Out-of-distribution study", text,
      zero_shot_table(summary1["cells"], metric=metric, inits=inits, sites=sites,
                      site_a=ood_config.site_a),
      sweep_results.format_paired_table(summary1["paired"], metric=metric,
                                        baseline=ood_config.baseline,
                                        title=f"step 1, trained on site {ood_config.site_a}"),
      summary2["table"]])
  paths = {"results_csv": storage.join(workdir, "ood_results.csv"),
           "results_json": storage.join(workdir, "ood_results.json"),
           "plot": storage.join(workdir, "ood.png"),
           "table_file": storage.join(workdir, "ood_summary.md")}
  sweep_results.write_csv(rows, paths["results_csv"], ("step",) + sweep_results.COLUMNS)
  sweep_results.write_json({
      "format": "remedis-jax-ood-results/1", "metric": metric,
      "site_a": ood_config.site_a, "site_b": ood_config.site_b,
      "zero_shot_sites": list(ood_config.zero_shot_sites), "baseline": ood_config.baseline,
      "baseline_fraction": float(ood_config.baseline_fraction),
      "match_tolerance": float(ood_config.match_tolerance), "headline": text,
      "ood_config": ood_config.to_dict(), "rows": rows,
      "step1_cells": summary1["cells"], "step2_cells": summary2["cells"], "matches": matches,
      "step1_paired": summary1["paired"], "step2_paired": summary2["paired"],
      "num_failed_runs": len(summary["failed"])}, paths["results_json"])
  plot_ood(summary1["cells"], summary2["cells"], paths["plot"], metric=metric, inits=inits,
           sites=sites, site_b=ood_config.site_b, baseline=ood_config.baseline,
           baseline_fraction=float(ood_config.baseline_fraction))
  storage.write_text(paths["table_file"], table + "\n")
  summary.update(paths, table=table, headline=text, matches=matches,
                 wall_time_s=time.time() - start)
  log("\n" + table + f"\n\nResults: {paths['results_csv']}\n         {paths['results_json']}\n"
      f"Plot:    {paths['plot']}\nTable:   {paths['table_file']}")
  return summary


def main(argv):
  from absl import flags, logging  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  flag_values = flags.FLAGS
  summary = run_ood_study(flag_values.config, flag_values.workdir,
                          parallel=flag_values.parallel, mode=flag_values.mode,
                          **sweep.executor_options(flag_values))
  if summary["failed"]:
    sys.exit(1)
  if summary["preempted"]:  # a run saved on SIGTERM; rerunning the same command resumes
    sys.exit(run_files.EXIT_PREEMPTED)


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  sweep.define_flags()
  app.run(main)
