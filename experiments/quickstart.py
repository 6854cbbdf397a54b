r"""`make quickstart`: the REMEDIS pipeline on real chest X-rays (PneumoniaMNIST), on CPU.

  python -m experiments.quickstart --workdir=workdirs/quickstart [--medmnist_dir=DIR]

Data: PneumoniaMNIST (MedMNIST v2, Yang et al. 2023, CC BY 4.0; pediatric chest X-rays, normal
vs pneumonia, 28 px). `pneumoniamnist.npz` is looked for in DIR (default $MEDMNIST_DIR, else
~/.medmnist, the medmnist package's folder); a file there is used as is. When it is absent it is
downloaded once from the official MedMNIST record and kept only if its MD5 is the published one
(data_pipelines/download.py). Without network, or when the download fails its checksum, one
line says so and the quickstart runs on the built-in synthetic chest X-rays instead, whose
numbers show the pipeline, not the method (`--dataset=synthetic` picks them directly).

On PneumoniaMNIST (configs/sweeps/quickstart_pneumoniamnist.py), under WORKDIR/pneumoniamnist/:
1. SimCLR-pretrains R_tiny on the training images without their labels (500 steps; a kNN
   monitor on the validation split, from the random encoder at step 0 to the last step);
2. exports the encoder (`export/step_<N>`);
3. fine-tunes from scratch and from the export at 1% and 10% of the training labels, seeds 0-2
   (12 runs, MedMNIST v2 protocol), tests on the official test split, and writes the table
   (mean and 95% interval per cell, the paired difference SimCLR - scratch per seed with its
   interval), `data_efficiency.png` and `results.csv`; the last line says whether SimCLR is ahead
   at 1%.
On the synthetic data (configs/pretrain_simclr.py:tiny, configs/sweeps/tiny.py), directly
under WORKDIR: the same three stages on unlabeled images from four sites, then scratch vs
REMEDIS at 2/10/100% of the site-A labels, tested at sites A and B.

Rerunning resumes: finished pretraining steps and finished sweep runs are skipped. A SIGTERM
(a preemption, or `kill`) stops it once the current step is saved, in pretraining or in a sweep
run; nothing after that starts, and the process exits with status 75 (EXIT_PREEMPTED).
The workdir may be a URL (gs://bucket/quickstart): every file goes through
data_pipelines/storage.py.
"""

from __future__ import annotations

import math
import time

from absl import app, flags, logging

from configs import common, pretrain_simclr
from configs.sweeps import quickstart_pneumoniamnist
from configs.sweeps import tiny as tiny_sweep
from data_pipelines import download
from experiments import label_fraction_sweep
from experiments import sweep_plan
from data_pipelines import storage
from remedis_jax import export, run_files, train_simclr

DATASETS = ("pneumoniamnist", "synthetic")
SYNTHETIC_NOTE = ("The numbers below come from the built-in synthetic chest X-rays: they show "
                  "the pipeline, not the method.")


def define_flags() -> None:
  """The command-line flags; defined when run as a script only, so that importing this module
  (the tests do) does not clash with other entry points' flags of the same name."""
  flags.DEFINE_string("workdir", "workdirs/quickstart", "Where everything is written.")
  flags.DEFINE_enum("dataset", "pneumoniamnist", list(DATASETS),
                    "pneumoniamnist (found or downloaded; synthetic when unavailable) or "
                    "synthetic (the built-in data, no download).")
  flags.DEFINE_string("medmnist_dir", None, "Where pneumoniamnist.npz is looked for and "
                      f"downloaded to (default: ${download.FOLDER_ENV}, else ~/.medmnist).")
  flags.DEFINE_integer("total_steps", None, "Override the pretraining length (steps).")
  flags.DEFINE_bool("sweep", True, "Run the label-fraction sweep after pretraining.")


def choose_data(dataset: str = "pneumoniamnist", medmnist_dir: str | None = None) -> str | None:
  """The PneumoniaMNIST file to run on, or None for the built-in synthetic data.

  Finds or downloads the file (data_pipelines/download.py); a failed download (no network, a
  wrong checksum, ...) is one printed line and the synthetic data, not an error.

  Raises:
    ValueError: the file present in the folder is not a MedMNIST .npz (naming the fix).
  """
  if dataset == "synthetic":
    return None
  try:
    return download.find_or_download("pneumoniamnist", medmnist_dir)
  except download.DownloadError as e:
    print(f"PneumoniaMNIST is unavailable: {e}.\nFalling back to the built-in synthetic chest "
          "X-rays: the numbers will show the pipeline, not the method.", flush=True)
    return None


def pipeline_configs(data_file: str | None, workdir: str) -> dict:
  """The pretraining config, sweep config and names of the chosen data's pipeline.

  Returns:
    {"pretrain", "sweep", "pretrained_init" (the sweep's init that the export fills in),
    "sweep_spec", "title", "workdir" (where this data's stages write), "data" (what the
    pretraining reads, in words)}.
  """
  if data_file is None:
    return {"pretrain": pretrain_simclr.get_config("tiny"), "sweep": tiny_sweep.get_config(),
            "pretrained_init": "remedis", "sweep_spec": "configs/sweeps/tiny.py",
            "workdir": workdir, "title": "quickstart: scratch vs REMEDIS (built-in data, CPU)",
            "data": "unlabeled images from all sites"}
  spec = quickstart_pneumoniamnist
  pretrain = common.override(sweep_plan.load_config_file(spec.PRETRAIN_CONFIG),
                             spec.pretrain_overrides(data_file))
  sweep = spec.get_config()
  sweep.overrides.data.path = data_file
  return {"pretrain": pretrain, "sweep": sweep, "pretrained_init": "simclr",
          "sweep_spec": "configs/sweeps/quickstart_pneumoniamnist.py",
          "workdir": storage.join(workdir, "pneumoniamnist"),
          "title": "quickstart: scratch vs SimCLR on PneumoniaMNIST (CPU)",
          "data": f"the training images of {data_file}, no labels"}


def effect_line(sweep: dict) -> str:
  """One line: SimCLR - scratch at the smallest label fraction, paired over seeds, and what its
  interval says; "" when the sweep has no such pair."""
  pairs = [p for p in sweep.get("paired", ()) if p["init"] == "simclr" and p["n"] > 0]
  if not pairs:
    return ""
  pair = min(pairs, key=lambda p: p["label_fraction"])
  if not math.isfinite(pair["ci_low"]):
    verdict = "one pair: no interval"
  elif pair["ci_low"] > 0:
    verdict = "SimCLR is ahead (the interval lies above 0)"
  elif pair["ci_high"] < 0:
    verdict = "SimCLR is behind (the interval lies below 0)"
  else:
    verdict = "no clear difference (the interval spans 0)"
  return (f"SimCLR - scratch at {pair['label_fraction']:.0%} of the labels, test macro AUC "
          f"paired over {pair['n']} seeds: {pair['mean']:+.3f} [95% CI {pair['ci_low']:+.3f}, "
          f"{pair['ci_high']:+.3f}]: {verdict}.")


def run(workdir: str, total_steps: int | None = None, sweep: bool = True,
        data_file: str | None = None) -> dict:
  """Pretrains, exports and (optionally) sweeps; returns {"pretrain", "export", "sweep",
  "preempted"}.

  Args:
    workdir: the quickstart's folder (local or a URL).
    total_steps: overrides the pretraining length.
    sweep: run the label-fraction sweep after pretraining.
    data_file: a PneumoniaMNIST .npz (`choose_data`), or None for the built-in synthetic data.
  """
  start = time.time()
  plan = pipeline_configs(data_file, workdir)
  config = plan["pretrain"]
  if total_steps is not None:
    config.total_steps = total_steps
  num_stages = 3 if sweep else 2
  pretrain_dir = storage.join(plan["workdir"], "pretrain_simclr")
  print(f"[1/{num_stages}] SimCLR pretraining ({config.model.name}, {config.total_steps} steps, "
        f"batch {config.batch_size}, {config.data.image_size} px, {plan['data']}) -> "
        f"{pretrain_dir}", flush=True)
  summary = train_simclr.train_and_evaluate(config, pretrain_dir)
  if summary.get("preempted"):
    # SIGTERM (a preemption, or `kill`): the run saved its step and this process should stop,
    # not export a half-trained encoder and fine-tune from it.
    print(f"\nPretraining was preempted at step {summary['steps']} and saved; rerun the same "
          "command to resume.", flush=True)
    return {"pretrain": summary, "export": None, "sweep": None, "preempted": True}
  export_dir = storage.join(plan["workdir"], "export", f"step_{summary['steps']}")
  if export.is_export(export_dir):
    print(f"[2/{num_stages}] Export already present: {export_dir}")
  else:
    print(f"[2/{num_stages}] Exporting the encoder -> {export_dir}", flush=True)
    export.export_workdir(pretrain_dir, export_dir, include_head=True)
  result = {"pretrain": summary, "export": export_dir, "sweep": None, "preempted": False}

  if sweep:
    sweep_config = plan["sweep"]
    sweep_config.inits[plan["pretrained_init"]] = storage.absolute(export_dir)
    sweep_dir = storage.join(plan["workdir"], "sweep")
    num_runs = len(sweep_plan.plan_runs(sweep_config))
    print(f"\n[3/{num_stages}] Label-fraction sweep: {', '.join(sweep_config.inits.keys())} x "
          f"{len(sweep_config.label_fractions)} fractions x {len(sweep_config.seeds)} seeds "
          f"({num_runs} fine-tuning runs of {sweep_config.base}) -> {sweep_dir}", flush=True)
    result["sweep"] = label_fraction_sweep.run_sweep(
        sweep_config, sweep_dir, title=plan["title"], sweep_spec=plan["sweep_spec"])
    if result["sweep"]["counts"].get("interrupted"):
      result["preempted"] = True
      print("\nThe sweep was preempted; rerun the same command to resume.", flush=True)
      return result

  print(f"\nDone in {time.time() - start:.0f} s.\n"
        f"  TensorBoard:     tensorboard --logdir {plan['workdir']}\n"
        f"  Pretraining:     {storage.join(pretrain_dir, 'metrics.jsonl')}\n"
        f"  Encoder export:  {export_dir}")
  if result["sweep"] is not None:
    print(f"  Sweep table:     {result['sweep']['table_file']}\n"
          f"  Sweep plot:      {result['sweep']['plot']}\n"
          f"  Sweep results:   {result['sweep']['results_csv']}")
    if result["sweep"].get("failed"):
      print(f"  {len(result['sweep']['failed'])} sweep run(s) failed; rerun to retry them.")
    if data_file is not None and effect_line(result["sweep"]):
      print("\n" + effect_line(result["sweep"]))
  if data_file is None:
    print("\n" + SYNTHETIC_NOTE)
  return result


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  flag_values = flags.FLAGS
  try:
    data_file = choose_data(flag_values.dataset, flag_values.medmnist_dir)
  except ValueError as e:  # the user's file is damaged: theirs to replace, not to run around
    raise SystemExit(f"error: {e}") from None
  result = run(flag_values.workdir, flag_values.total_steps, flag_values.sweep, data_file)
  if result["sweep"] is not None and result["sweep"].get("failed"):
    raise SystemExit(1)
  if result["preempted"]:  # saved; rerunning the same command resumes
    raise SystemExit(run_files.EXIT_PREEMPTED)


if __name__ == "__main__":
  define_flags()
  app.run(main)
