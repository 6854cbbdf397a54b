"""The entry point's command line: a mistyped --config.<key> override gives a readable message."""
import os
import subprocess
import sys

import ml_collections

from remedis_jax import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lookup_error(config, path):
  """What ml_collections raises when an override names a missing key."""
  try:
    holder = config
    for key in path.split(".")[:-1]:
      holder = getattr(holder, key)
    getattr(holder, path.split(".")[-1])
  except (AttributeError, KeyError) as error:
    return error
  raise AssertionError(f"{path} exists")


def test_config_key_error_is_readable():
  config = ml_collections.ConfigDict({"batch_size": 8, "data": {"skip_bad_records": False}})
  config.lock()
  argv = ["main", "--config=c.py", "--config.data.skip_bad_recrods=True", "--workdir=/tmp/w"]
  error = _lookup_error(config, "data.skip_bad_recrods")
  assert "\\n" in str(error) and "\\'" in str(error)  # What used to be printed.
  assert main.config_key_error(error, argv) == (
      "--config.data.skip_bad_recrods=True: the config has no key 'skip_bad_recrods'. "
      "Did you mean --config.data.skip_bad_records?")
  argv = ["main", "--config.dta.skip_bad_records", "True"]
  assert main.config_key_error(_lookup_error(config, "dta.skip_bad_records"), argv).endswith(
      "no key 'dta'. Did you mean --config.data.skip_bad_records?")
  argv = ["main", "--config.zzz=1"]
  assert main.config_key_error(_lookup_error(config, "zzz"), argv) == (
      "--config.zzz=1: the config has no key 'zzz' (see the config file for its keys)")
  # An error that is not about an override is left alone (it keeps its traceback).
  assert main.config_key_error(KeyError("unrelated"), ["main", "--config.batch_size=2"]) is None


def test_mistyped_key_on_the_command_line():
  result = subprocess.run(
      [sys.executable, "-m", "remedis_jax.main", "--config=configs/pretrain_simclr.py:smoke",
       "--config.data.skip_bad_recrods=True", "--workdir=/tmp/unused_remedis_main_test"],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 1
  assert ("FATAL Flags parsing error: --config.data.skip_bad_recrods=True: the config has no key "
          "'skip_bad_recrods'. Did you mean --config.data.skip_bad_records?") in result.stderr
  assert "\\n" not in result.stderr and "Traceback" not in result.stderr
  assert not os.path.exists("/tmp/unused_remedis_main_test")


def test_exit_status_of_each_way_a_run_ends(caplog):
  """Finished 0, preempted 75, a failed checkpoint save 1 with its one line and no traceback,
  a second Ctrl-C 130."""
  from remedis_jax import checkpointing  # pylint: disable=g-import-not-at-top

  class Trainer:
    def __init__(self, outcome):
      self.outcome = outcome

    def train_and_evaluate(self, config, workdir):
      del config, workdir
      if isinstance(self.outcome, BaseException):
        raise self.outcome
      return self.outcome

  message = ("saving step 5 to /w/checkpoints failed: no space left on device; the last good "
             "checkpoint is step 4; free space and rerun")
  assert main.run_trainer(Trainer({"finished": True}), None, "/w") == 0
  assert main.run_trainer(Trainer({"preempted": True}), None, "/w") == 75
  with caplog.at_level("ERROR"):
    assert main.run_trainer(Trainer(checkpointing.CheckpointSaveError(message)), None, "/w") == 1
    assert main.run_trainer(Trainer(KeyboardInterrupt()), None, "/w") == 130
  errors = [r for r in caplog.records if r.levelname == "ERROR"]
  assert errors[0].getMessage() == message and errors[0].exc_info is None
  assert "second Ctrl-C" in errors[1].getMessage()
  # Anything else keeps its traceback.
  try:
    main.run_trainer(Trainer(ValueError("bad config")), None, "/w")
  except ValueError as error:
    assert str(error) == "bad config"
  else:
    raise AssertionError("ValueError was swallowed")
