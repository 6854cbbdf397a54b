r"""`make quickstart`: the whole REMEDIS pipeline on the built-in synthetic chest X-rays, on CPU.

  python -m experiments.quickstart --workdir=workdirs/quickstart

1. SimCLR-pretrains the tiny BiT encoder (`configs/pretrain_simclr.py:tiny`) on unlabeled
   synthetic radiographs from all sites, with a kNN monitor on the validation split;
2. exports the encoder (`<workdir>/export/step_<N>`) so fine-tuning loads it with one call;
3. runs the small label-fraction sweep of `configs/sweeps/tiny.py`: fine-tunes from scratch and
   from the export (REMEDIS) on fractions of the site-A labels, tests at site A (in
   distribution) and site B, and writes the table, `data_efficiency.png` and `results.csv`.

Rerunning resumes: finished pretraining steps and finished sweep runs are skipped. A SIGTERM
(a preemption, or `kill`) stops it once the current step is saved, in pretraining or in a sweep
run; nothing after that starts, and the process exits with status 75 (EXIT_PREEMPTED). The
numbers are what this CPU-sized run measures, whatever they show; the README reports one run
of it.
The workdir may be a URL (gs://bucket/quickstart): every file goes through
remedis_jax/storage.py, TensorBoard's event files through TensorFlow's file system.
"""

import time

from absl import app, flags, logging

from configs import pretrain_simclr
from configs.sweeps import tiny as tiny_sweep
from experiments import label_fraction_sweep
from remedis_jax import export, storage, train_simclr


def define_flags() -> None:
  """The command-line flags; defined when run as a script only, so that importing this module
  (the tests do) does not clash with other entry points' flags of the same name."""
  flags.DEFINE_string("workdir", "workdirs/quickstart", "Where everything is written.")
  flags.DEFINE_integer("total_steps", None, "Override the pretraining length (steps).")
  flags.DEFINE_bool("sweep", True, "Run the label-fraction sweep after pretraining.")


def run(workdir: str, total_steps: int | None = None, sweep: bool = True) -> dict:
  """Pretrains, exports and (optionally) sweeps; returns {"pretrain", "export", "sweep"}."""
  start = time.time()
  config = pretrain_simclr.get_config("tiny")
  if total_steps is not None:
    config.total_steps = total_steps
  num_stages = 3 if sweep else 2
  pretrain_dir = storage.join(workdir, "pretrain_simclr")
  print(f"[1/{num_stages}] SimCLR pretraining ({config.model.name}, {config.total_steps} steps, "
        f"batch {config.batch_size}, {config.data.image_size} px, unlabeled images from all "
        f"sites) -> {pretrain_dir}", flush=True)
  summary = train_simclr.train_and_evaluate(config, pretrain_dir)
  if summary.get("preempted"):
    # SIGTERM (a preemption, or `kill`): the run saved its step and this process should stop,
    # not export a half-trained encoder and fine-tune from it.
    print(f"\nPretraining was preempted at step {summary['steps']} and saved; rerun the same "
          "command to resume.", flush=True)
    return {"pretrain": summary, "export": None, "sweep": None, "preempted": True}
  export_dir = storage.join(workdir, "export", f"step_{summary['steps']}")
  if export.is_export(export_dir):
    print(f"[2/{num_stages}] Export already present: {export_dir}")
  else:
    print(f"[2/{num_stages}] Exporting the encoder -> {export_dir}", flush=True)
    export.export_workdir(pretrain_dir, export_dir, include_head=True)
  result = {"pretrain": summary, "export": export_dir, "sweep": None, "preempted": False}

  if sweep:
    sweep_config = tiny_sweep.get_config()
    sweep_config.inits.remedis = storage.absolute(export_dir)
    sweep_dir = storage.join(workdir, "sweep")
    num_runs = len(label_fraction_sweep.plan_runs(sweep_config))
    print(f"\n[3/{num_stages}] Label-fraction sweep: {', '.join(sweep_config.inits.keys())} x "
          f"{len(sweep_config.label_fractions)} fractions x {len(sweep_config.seeds)} seeds "
          f"({num_runs} fine-tuning runs of configs/finetune.py:tiny) -> {sweep_dir}", flush=True)
    result["sweep"] = label_fraction_sweep.run_sweep(
        sweep_config, sweep_dir, title="quickstart: scratch vs REMEDIS (built-in data, CPU)",
        sweep_spec="configs/sweeps/tiny.py")
    if result["sweep"]["counts"].get("interrupted"):
      result["preempted"] = True
      print("\nThe sweep was preempted; rerun the same command to resume.", flush=True)
      return result

  print(f"\nDone in {time.time() - start:.0f} s.\n"
        f"  TensorBoard:     tensorboard --logdir {workdir}\n"
        f"  Pretraining:     {storage.join(pretrain_dir, 'metrics.jsonl')}\n"
        f"  Encoder export:  {export_dir}")
  if result["sweep"] is not None:
    print(f"  Sweep table:     {result['sweep']['table_file']}\n"
          f"  Sweep plot:      {result['sweep']['plot']}\n"
          f"  Sweep results:   {result['sweep']['results_csv']}")
    if result["sweep"].get("failed"):
      print(f"  {len(result['sweep']['failed'])} sweep run(s) failed; rerun to retry them.")
  return result


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  flag_values = flags.FLAGS
  result = run(flag_values.workdir, flag_values.total_steps, flag_values.sweep)
  if result["sweep"] is not None and result["sweep"].get("failed"):
    raise SystemExit(1)
  if result["preempted"]:  # saved; rerunning the same command resumes
    raise SystemExit(label_fraction_sweep.EXIT_PREEMPTED)


if __name__ == "__main__":
  define_flags()
  app.run(main)
