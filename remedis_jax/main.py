r"""Entry point for every trainer:

  python -m remedis_jax.main --config=configs/pretrain_simclr.py:tiny --workdir=workdirs/simclr

`config.trainer` picks the trainer module; rerunning the same command on the same workdir resumes.
Multi-process runs outside TPU pods / SLURM add --coordinator_address, --num_processes and
--process_id (the same on every process but the id).
"""

import importlib
import logging as std_logging
import os

from absl import app, flags, logging
from ml_collections import config_flags

from remedis_jax import distributed

TRAINERS = {"simclr": "remedis_jax.train_simclr", "cluster": "remedis_jax.train_cluster",
            "finetune": "remedis_jax.train_finetune",
            "segment": "remedis_jax.train_segment",
            "gmml": "remedis_jax.train_gmml"}

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, logs and summaries go.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")
flags.DEFINE_bool("verbose_libraries", False,
                  "Keep Orbax's per-save INFO lines (by default only its warnings are shown).")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(std_logging.Filter):
  """Drops INFO records logged from inside Orbax (about a dozen lines per checkpoint save)."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.verbose_libraries:
    logging.get_absl_handler().addFilter(_QuietLibraries())
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  config = FLAGS.config
  if config.trainer not in TRAINERS:
    raise app.UsageError(f"config.trainer={config.trainer!r}; known: {', '.join(TRAINERS)}")
  logging.info("Config:\n%s", config)
  trainer = importlib.import_module(TRAINERS[config.trainer])
  trainer.train_and_evaluate(config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
