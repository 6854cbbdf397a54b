"""What the tests that start real `remedis_jax.main` processes share: the environment of a
process with N simulated CPU devices, and a free port for a coordinator on 127.0.0.1."""

import os
import socket

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_env(devices: int = 1) -> dict:
  """This session's environment (its XLA flags: -O0, the compilation cache), on CPU with
  `devices` simulated devices, with the repository importable."""
  env = dict(os.environ)
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if "xla_force_host_platform_device_count" not in f]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = REPO
  return env


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]
