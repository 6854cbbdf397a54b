r"""Entry point for every trainer:

  python -m remedis_jax.main --config=configs/pretrain_simclr.py:tiny --workdir=workdirs/simclr

`config.trainer` picks the trainer module; rerunning the same command on the same workdir resumes.
Exit status: 0 finished, 75 (`preemption.EXIT_PREEMPTED`) preempted (SIGTERM or a first
Ctrl-C: the step was saved and the rerun resumes it), 1 for errors (a checkpoint that could not
be written says why in one line), 130 after a second Ctrl-C (stopped without saving).
Multi-process runs outside TPU pods / SLURM add --coordinator_address, --num_processes and
--process_id (the same on every process but the id).
"""

import importlib
import logging as std_logging
import os
import re
import sys
from typing import Sequence

from absl import app, flags, logging
from ml_collections import config_flags

from remedis_jax import compilation_cache, distributed, preemption

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


def _error_text(error: BaseException) -> str:
  """The message of a (possibly nested) KeyError, without the repr quoting of KeyError.__str__.

  ml_collections raises AttributeError(KeyError("'key'\\nDid you mean ...")) for an unknown
  key, whose str() shows escaped quotes and a literal backslash-n.
  """
  while (isinstance(error, (AttributeError, KeyError)) and len(error.args) == 1
         and isinstance(error.args[0], BaseException)):
    error = error.args[0]
  if len(error.args) == 1 and isinstance(error.args[0], str):
    return error.args[0]
  return str(error)


def config_key_error(error: BaseException, argv: Sequence[str]) -> str | None:
  """A readable message for an unknown key in a --config.<path> override, or None.

  Args:
    error: what parsing the flags raised.
    argv: the command line.

  Returns:
    E.g. "--config.data.skip_bad_recrods=True: the config has no key 'skip_bad_recrods'. Did
    you mean --config.data.skip_bad_records?"; None when the error is not about an override
    (then the caller lets it propagate with its traceback).
  """
  text = _error_text(error)
  first, _, rest = text.partition("\n")
  key = first.strip().strip("'\"")
  overrides = [arg for arg in argv if arg.startswith("--config.")]
  for arg in overrides:
    path = arg[len("--"):].split("=", 1)[0].split(".")[1:]
    if key in path:
      break
    if "Attempting to lookup: " + ".".join(path) in text:  # e.g. a field of an int.
      return f"{arg}: {first.strip()}"
  else:
    return None
  message = f"{arg}: the config has no key {key!r}"
  match = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', rest)
  if match and match.group(2) == key:
    path[path.index(key)] = match.group(1)
    return f"{message}. Did you mean --config.{'.'.join(path)}?"
  return message + " (see the config file for its keys)"


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a readable message for a mistyped --config.<key> override."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as error:
    message = config_key_error(error, argv)
    if message is None:
      raise
    sys.stderr.write(f"FATAL Flags parsing error: {message}\n"
                     "Pass --helpshort or --helpfull to see help on flags.\n")
    sys.exit(1)


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
  cache = compilation_cache.enable_for_run(config.get("compilation_cache_dir", ""), FLAGS.workdir)
  stats = compilation_cache.CompileStats().start()
  trainer = importlib.import_module(TRAINERS[config.trainer])
  try:
    code = run_trainer(trainer, config, FLAGS.workdir)
  finally:
    stats.stop()
    logging.info("%s", stats.summary(cache))
  if code:
    sys.exit(code)


def run_trainer(trainer, config, workdir: str) -> int:
  """Runs `trainer.train_and_evaluate`; returns the exit status.

  0 finished; EXIT_PREEMPTED (75) saved and interrupted (SIGTERM or a first Ctrl-C: the rerun
  resumes); 1 when a checkpoint could not be written (its one-line cause, e.g. a full disk, is
  the last thing printed, without a traceback: the message says what to do); 130 after a second
  Ctrl-C, which stops without saving.
  """
  from remedis_jax import checkpointing  # pylint: disable=g-import-not-at-top
  try:
    result = trainer.train_and_evaluate(config, workdir)
  except checkpointing.CheckpointSaveError as error:
    logging.error("%s", error)
    return 1
  except KeyboardInterrupt:
    logging.error("Stopped by a second Ctrl-C without saving; the last checkpoint in %s "
                  "stands: rerun the same command to resume from it.", workdir)
    return 130
  if result.get("preempted"):  # saved, not finished: the rerun of this command resumes it
    return preemption.EXIT_PREEMPTED
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
