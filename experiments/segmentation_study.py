r"""Lung segmentation from GMML pretraining vs from scratch, over label fractions and seeds, tested
in distribution and at shifted sites (test-time drift).

  python -m experiments.segmentation_study --workdir=workdirs/segmentation_study \
    --gmml_init=workdirs/gmml/pretrain [--fractions=0.01,0.05,1.0] [--seeds=0,1] [--steps=150]

Every run is `remedis_jax.train_segment` with `configs/segment.py:tiny` (synthetic CXR at 32 px,
ViT-tiny/4, trained and validated on site A, tested on sites A, B, C, D) and these changes:
`label_fraction` (share of the 2048 training masks, nested across fractions for one seed),
`seed` = `label_fraction_seed` (so seeds differ in init, augmentation, order AND which masks),
`total_steps` (the same for every fraction: small fractions see their masks many times) and
`model.init` ("" for scratch, the GMML workdir for gmml). Runs live in
WORKDIR/init=<name>/frac=<f>/seed=<s>; a finished run (results.json) is not run again, so an
interrupted study resumes by rerunning the command. Without --gmml_init, or when its
checkpoints/ folder does not exist, only scratch runs (and the summary says so).

Outputs in WORKDIR (the sweep helpers of experiments/sweep_results.py do the mean/std):
  segmentation_results.csv   one row per run and test set (dice, iou, dice_global, iou_global,
                             num_train_masks, best_step, best_val, wall_time_s, run_dir)
  segmentation_results.json  rows, cells (mean, std with ddof=1 over seeds) and the study config
  segmentation_summary.md    Dice and IoU grids per test set, and the drift table (Dice at each
                             shifted site minus in distribution, per init and fraction)
  segmentation_dice.png      Dice vs % masks (log axis), one panel per test set
Runs are sequential in this process and share a persistent compilation cache
(WORKDIR/.jax_cache unless JAX_COMPILATION_CACHE_DIR is set), so only the first run of each
model pays for XLA. WORKDIR and --gmml_init may be URLs (gs://...; data_pipelines/storage.py).
"""

from __future__ import annotations

import math
import time
from typing import Any, Sequence

from experiments import sweep_results
from data_pipelines import storage

COLUMNS = ("run_id", "init", "label_fraction", "seed", "test_set", "status", "dice", "iou",
           "dice_global", "iou_global", "num_train_masks", "best_step", "best_val", "steps",
           "wall_time_s", "error", "run_dir")
METRICS = ("dice", "iou", "dice_global", "iou_global")
CSV_FILE = "segmentation_results.csv"
JSON_FILE = "segmentation_results.json"
TABLE_FILE = "segmentation_summary.md"
PLOT_FILE = "segmentation_dice.png"
FORMAT = "remedis-jax-segmentation-study/1"
IN_DISTRIBUTION = "in_distribution"


def run_id(init: str, fraction: float, seed: int) -> str:
  return f"init={init}/frac={fraction:g}/seed={seed}"


def gmml_available(path: str) -> bool:
  """Whether `path` is a pretraining workdir with a checkpoints/ folder (or an export)."""
  return bool(path) and (storage.isdir(storage.join(path, "checkpoints"))
                         or storage.isfile(storage.join(path, "model.json")))


def build_config(*, init_path: str, fraction: float, seed: int, steps: int, model: str,
                 variant: str = "tiny"):
  """The configs/segment.py config of one run."""
  from configs import segment  # pylint: disable=g-import-not-at-top
  config = segment.get_config(variant)
  config.model.init = init_path
  config.model.name = model
  config.label_fraction = float(fraction)
  config.seed = config.label_fraction_seed = int(seed)
  if steps > 0:
    config.total_steps = int(steps)
    config.checkpoint_every_steps = int(steps)
    config.eval_every_steps = max(int(steps) // 4, 1)
    config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, max(int(steps) // 10, 1))
  return config


def rows_from_results(results: dict[str, Any], *, run: str, init: str, fraction: float,
                      seed: int, run_dir: str) -> list[dict[str, Any]]:
  """One row per test set of a finished train_segment results.json."""
  rows = []
  for test_set, entry in results["test_sets"].items():
    row = {"run_id": run, "init": init, "label_fraction": float(fraction), "seed": int(seed),
           "test_set": test_set, "status": "finished", "error": "", "run_dir": run_dir,
           "num_train_masks": results.get("num_train_masks"),
           "best_step": results["best"]["step"], "best_val": results["best"]["value"],
           "steps": results["steps"], "wall_time_s": results.get("wall_time_s")}
    row.update({m: math.nan if entry["metrics"].get(m) is None else float(entry["metrics"][m])
                for m in METRICS})
    rows.append(row)
  return rows


def drift_table(cells: Sequence[dict[str, Any]], metric: str = "dice") -> str:
  """Markdown: per init and fraction, the metric in distribution and its change at each site."""
  test_sets = [t for t in dict.fromkeys(c["test_set"] for c in cells) if t != IN_DISTRIBUTION]
  lines = [f"## Test-time drift: {metric} in distribution, and (site - in distribution)", "",
           "| init | % masks | in distribution | " + " | ".join(test_sets) + " |",
           "|---|---|---|" + "---|" * len(test_sets)]
  keys = list(dict.fromkeys((c["init"], c["label_fraction"]) for c in cells))
  for init, fraction in sorted(keys, key=lambda k: (k[0] != "scratch", k[0], k[1])):
    reference = sweep_results.find_cell(cells, init, fraction, IN_DISTRIBUTION)
    if reference is None:
      continue
    base = reference[f"{metric}_mean"]
    entries = []
    for test_set in test_sets:
      cell = sweep_results.find_cell(cells, init, fraction, test_set)
      entries.append("" if cell is None else
                     f"{cell[metric + '_mean']:.3f} ({cell[metric + '_mean'] - base:+.3f})")
    lines.append(f"| {init} | {100 * fraction:g}% | {base:.3f} +- "
                 f"{reference[metric + '_std']:.3f} | " + " | ".join(entries) + " |")
  return "\n".join(lines)


def write_outputs(rows: list[dict[str, Any]], workdir: str, study: dict[str, Any]) -> str:
  """CSV, JSON, markdown and the plot; returns the markdown."""
  sweep_results.write_csv(rows, storage.join(workdir, CSV_FILE), COLUMNS)
  cells = sweep_results.summarize(rows, metrics=METRICS)
  inits = list(dict.fromkeys(r["init"] for r in rows))
  notes = "\n".join(f"- {n}" for n in study.get("notes", []))
  table = "\n\n".join([
      f"# Lung segmentation: GMML vs scratch ({study['model']}, {study['steps']} steps, "
      f"seeds {study['seeds']})", notes,
      sweep_results.format_grid_table(cells, metric="dice"),
      sweep_results.format_grid_table(cells, metric="iou"),
      drift_table(cells, "dice")])
  # A seed also draws the labeled masks, so GMML and scratch of one seed share their subset.
  paired = (sweep_results.paired_differences(rows, metric="dice", baseline="scratch")
            if "scratch" in inits else [])
  if paired:
    table += "\n\n" + sweep_results.format_paired_table(paired, metric="dice",
                                                        baseline="scratch")
  storage.write_text(storage.join(workdir, TABLE_FILE), table + "\n")
  sweep_results.write_json({"format": FORMAT, "study": study, "rows": rows, "cells": cells,
                            "paired": paired}, storage.join(workdir, JSON_FILE))
  if cells:
    sweep_results.plot_data_efficiency(cells, storage.join(workdir, PLOT_FILE), metric="dice",
                                       inits=inits, baseline="scratch", baseline_fraction=1.0,
                                       title="Lung segmentation Dice (synthetic CXR, 32 px)")
  return table


def run_study(workdir: str, *, gmml_init: str, fractions: Sequence[float], seeds: Sequence[int],
              steps: int, model: str = "ViT-tiny/4", variant: str = "tiny") -> dict[str, Any]:
  """Runs (or resumes) every (init, fraction, seed) and writes the outputs.

  Returns:
    {"rows", "table" (markdown), "failed" (run id -> error), "preempted" (a run was preempted
    and the study stopped after it)}.
  """
  from remedis_jax import train_segment  # pylint: disable=g-import-not-at-top
  from experiments import sweep_run  # pylint: disable=g-import-not-at-top
  workdir = storage.absolute(workdir)
  storage.makedirs(workdir)
  sweep_run.enable_compilation_cache(sweep_run.compilation_cache_dir(workdir))
  inits = {"scratch": ""}
  notes = []
  if gmml_available(gmml_init):
    inits["gmml"] = storage.absolute(gmml_init)
    notes.append(f"gmml = encoder of {inits['gmml']}")
  else:
    notes.append(f"no GMML run at {gmml_init!r} (no checkpoints/): scratch only")
  rows, failed = [], {}
  study = {"model": model, "variant": variant, "steps": steps, "fractions": list(fractions),
           "seeds": list(seeds), "inits": inits, "notes": notes, "failed": failed}
  table = ""
  # Seed-major, inits innermost: an interrupted study still holds matched (scratch, gmml) pairs.
  plan = [(init, init_path, fraction, seed) for seed in seeds for fraction in fractions
          for init, init_path in inits.items()]
  for init, init_path, fraction, seed in plan:
    run = run_id(init, fraction, seed)
    path = storage.join(workdir, run)
    config = build_config(init_path=init_path, fraction=fraction, seed=seed, steps=steps,
                          model=model, variant=variant)
    start = time.time()
    try:
      results = train_segment.train_and_evaluate(config, path)
    except Exception as error:  # pylint: disable=broad-except  (recorded, study goes on)
      failed[run] = f"{type(error).__name__}: {error}"
      row = {c: "" for c in COLUMNS}
      row.update({m: math.nan for m in METRICS})
      row.update(run_id=run, init=init, label_fraction=float(fraction), seed=int(seed),
                 status="failed", error=failed[run], run_dir=path)
      rows.append(row)
      continue
    if results.get("preempted"):
      # SIGTERM: the run saved its step; stop here (the rerun resumes it, then the rest).
      print(f"{run}: preempted at step {results['steps']} and saved; rerun the study to "
            "resume.", flush=True)
      return {"rows": rows, "table": write_outputs(rows, workdir, study) if rows else table,
              "failed": failed, "preempted": True}
    print(f"{run}: in-distribution Dice "
          f"{results['test_sets'][IN_DISTRIBUTION]['metrics']['dice']:.4f} "
          f"({time.time() - start:.0f} s)", flush=True)
    rows.extend(rows_from_results(results, run=run, init=init, fraction=fraction, seed=seed,
                                  run_dir=path))
    # After every run, so a study stopped early still leaves its tables.
    table = write_outputs(rows, workdir, study)
  if failed or not rows:
    table = write_outputs(rows, workdir, study)
  return {"rows": rows, "table": table, "failed": failed, "preempted": False}


def main(argv):
  from absl import flags, logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  flag_values = flags.FLAGS
  summary = run_study(
      flag_values.workdir, gmml_init=flag_values.gmml_init,
      fractions=[float(f) for f in flag_values.fractions],
      seeds=[int(s) for s in flag_values.seeds], steps=flag_values.steps,
      model=flag_values.model, variant=flag_values.variant)
  print(summary["table"])
  if summary["failed"]:
    raise SystemExit(f"{len(summary['failed'])} run(s) failed: {summary['failed']}")
  if summary["preempted"]:  # the run saved on SIGTERM; rerunning the study resumes it
    from remedis_jax import preemption  # pylint: disable=g-import-not-at-top
    raise SystemExit(preemption.EXIT_PREEMPTED)


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", "workdirs/segmentation_study", "Study folder.")
  flags.DEFINE_string("gmml_init", "workdirs/gmml/pretrain", "GMML pretraining workdir/export.")
  flags.DEFINE_list("fractions", ["0.01", "0.05", "1.0"], "Shares of the training masks.")
  flags.DEFINE_list("seeds", ["0", "1"], "Seeds (also the subset seeds).")
  flags.DEFINE_integer("steps", 150, "Training steps of every run (<= 0: the config's).")
  flags.DEFINE_string("model", "ViT-tiny/4", "Encoder (the GMML run's model).")
  flags.DEFINE_string("variant", "tiny", "configs/segment.py variant.")
  app.run(main)
