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
