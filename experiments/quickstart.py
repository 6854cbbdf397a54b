r"""`make quickstart`: the REMEDIS pretraining stage on the built-in synthetic chest X-rays, on CPU.

  python -m experiments.quickstart --workdir=workdirs/quickstart

1. SimCLR-pretrains the tiny BiT encoder (`configs/pretrain_simclr.py:tiny`) on unlabeled
   synthetic radiographs from all sites, with a kNN monitor on the validation split;
2. exports the encoder (`<workdir>/export/step_<N>`) so fine-tuning can load it with one call.
Rerunning resumes an interrupted run and skips finished steps.
"""

import os

from absl import app, flags, logging

from configs import pretrain_simclr
from remedis_jax import export, train_simclr

flags.DEFINE_string("workdir", "workdirs/quickstart", "Where everything is written.")
flags.DEFINE_integer("total_steps", None, "Override the pretraining length (steps).")
FLAGS = flags.FLAGS


def run(workdir: str, total_steps: int | None = None) -> dict:
  config = pretrain_simclr.get_config("tiny")
  if total_steps is not None:
    config.total_steps = total_steps
  pretrain_dir = os.path.join(workdir, "pretrain_simclr")
  print(f"[1/2] SimCLR pretraining ({config.model.name}, {config.total_steps} steps, batch "
        f"{config.batch_size}, {config.data.image_size} px) -> {pretrain_dir}", flush=True)
  summary = train_simclr.train_and_evaluate(config, pretrain_dir)
  export_dir = os.path.join(workdir, "export", f"step_{summary['steps']}")
  if export.is_export(export_dir):
    print(f"[2/2] Export already present: {export_dir}")
  else:
    print(f"[2/2] Exporting the encoder -> {export_dir}", flush=True)
    export.export_workdir(pretrain_dir, export_dir, include_head=True)
  print(f"\nDone. TensorBoard: tensorboard --logdir {pretrain_dir}\n"
        f"Metrics (text): {os.path.join(pretrain_dir, 'metrics.jsonl')}\n"
        f"Encoder export: {export_dir}")
  return summary


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  run(FLAGS.workdir, FLAGS.total_steps)


if __name__ == "__main__":
  app.run(main)
