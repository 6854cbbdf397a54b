"""Multi-host start-up: one call before any other JAX use.

TPU pods and SLURM jobs are detected by `jax.distributed.initialize()` itself; other clusters
and local tests pass the coordinator explicitly (the same three flags on every process):

  python -m remedis_jax.main ... --coordinator_address=10.0.0.1:1234 --num_processes=4 --process_id=$RANK
"""

from __future__ import annotations

import logging
import os

import jax

# Environment variables that mean "this process is one of several that JAX can find itself".
_AUTO_DETECTED = {
    "SLURM_NTASKS": lambda v: int(v) > 1,
    "TPU_WORKER_HOSTNAMES": lambda v: "," in v,
    "MEGASCALE_COORDINATOR_ADDRESS": bool,
}


def _auto_detectable() -> str | None:
  for name, is_multi in _AUTO_DETECTED.items():
    value = os.environ.get(name)
    if value:
      try:
        if is_multi(value):
          return name
      except ValueError:
        continue
  return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Starts JAX's distributed runtime when this is a multi-process run; no-op otherwise.

  Args:
    coordinator_address: "host:port" of process 0's coordinator.
    num_processes: total number of processes.
    process_id: this process's index in [0, num_processes).

  Raises:
    ValueError: some but not all of the three explicit settings are given.
  """
  explicit = [coordinator_address, num_processes, process_id]
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise ValueError(
          "--coordinator_address, --num_processes and --process_id must be given together; "
          f"got coordinator_address={coordinator_address!r}, num_processes={num_processes!r}, "
          f"process_id={process_id!r}")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} is outside [0, --num_processes={num_processes})")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  elif (reason := _auto_detectable()) is not None:
    logging.info("Multi-process environment detected (%s); initialising jax.distributed.", reason)
    jax.distributed.initialize()
  else:
    return
  logging.info("Process %d of %d; %d local / %d global devices.", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
