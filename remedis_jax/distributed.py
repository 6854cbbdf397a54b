"""Multi-host start-up: one call on every process, before anything else uses JAX.

How `initialize()` decides, in this order:

1. Explicit flags (the same on every process but the id), for any other cluster and for the
   tests, which run 2 processes on 127.0.0.1:
     python -m remedis_jax.main ... --coordinator_address=10.0.0.1:1234 --num_processes=4 \
         --process_id=$RANK
2. jax.distributed already started by the caller: kept as it is.
3. SLURM with more than one task: `jax.distributed.initialize()` reads SLURM's variables.
4. A Cloud TPU host, single host or pod slice, GCE or GKE: always
   `jax.distributed.initialize()` without arguments (as big_vision and maxtext do); JAX finds
   the slice's hosts, this host's id and the coordinator (worker 0, port 8482) from the TPU
   metadata or GKE's variables. On a pod this is what makes preemption work: libtpu lets every
   host see all chips without it, but only the coordination service it starts can make the
   hosts agree on the step to save at when SIGTERM arrives (remedis_jax/preemption.py); on a
   single host it is a one-process service and costs nothing.
   "A TPU host" is decided without starting the backend (which would have to come after
   jax.distributed): JAX_PLATFORMS (or jax_platforms) allows "tpu", and either the TPU
   runtime (the libtpu package) is installed and Google TPU chips are on the PCI bus (the
   sysfs check JAX itself makes at import) or /dev/accel* exists (TPU v2-v4 drivers), or the
   environment describes a TPU job (TPU_WORKER_HOSTNAMES, TPU_PROCESS_ADDRESSES,
   TPU_ACCELERATOR_TYPE, TPU_WORKER_ID, MEGASCALE_COORDINATOR_ADDRESS, JAX_FORCE_TPU_INIT).
   If JAX then finds no TPU cluster to describe (a TPU VM without a metadata server), the run
   goes on as one process with a warning when the backend reports one process, and stops
   with an error naming the flags when it reports several.
5. Anything else: one process, nothing to start.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import logging
import os
from typing import Mapping

import jax

# Google's PCI vendor id and the device ids of its TPU chips (v2/v3, v4, v5p, v5e, v6e,
# TPU7x), as in JAX's own sysfs check (which has no public API). A chip newer than this list
# is still found through /dev/accel* (v2-v4), the TPU variables above or the explicit flags.
# The vendor alone is not enough: Google's gVNIC network card has it too.
_GOOGLE_PCI_VENDOR = "0x1ae0"
_TPU_PCI_DEVICES = frozenset({"0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f",
                              "0x0076"})
# Set on GKE TPU pods (and multislice jobs); any of them means "a TPU job".
_TPU_ENVIRONMENT = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "TPU_ACCELERATOR_TYPE",
                    "TPU_WORKER_ID", "MEGASCALE_COORDINATOR_ADDRESS", "JAX_FORCE_TPU_INIT")


@dataclasses.dataclass(frozen=True)
class StartUp:
  """What `initialize` will do: `method` is "explicit", "already", "slurm", "tpu" or "none"."""
  method: str
  reason: str


def tpu_chips_on_pci(sysfs: str = "/sys/bus/pci/devices") -> int:
  """Google TPU chips attached to this host, read from sysfs (0 when there is no sysfs)."""
  chips = 0
  for vendor_path in glob.glob(os.path.join(sysfs, "*", "vendor")):
    try:
      with open(vendor_path, encoding="ascii") as f:
        if f.read().strip() != _GOOGLE_PCI_VENDOR:
          continue
      with open(os.path.join(os.path.dirname(vendor_path), "device"), encoding="ascii") as f:
        chips += f.read().strip() in _TPU_PCI_DEVICES
    except OSError:
      continue
  return chips


def _accel_devices(dev: str = "/dev") -> list[str]:
  return sorted(glob.glob(os.path.join(dev, "accel[0-9]*")))


def _platforms() -> str | None:
  return jax.config.jax_platforms  # JAX_PLATFORMS, or "tpu,cpu" once JAX has seen a TPU VM


def _libtpu_installed(environ: Mapping[str, str]) -> bool:
  if os.path.isfile(environ.get("TPU_LIBRARY_PATH", "")):
    return True
  try:
    return importlib.util.find_spec("libtpu") is not None
  except (ImportError, ValueError):
    return False


def decide(environ: Mapping[str, str], *, platforms: str | None, explicit: bool,
           already: bool, libtpu: bool, tpu_chips: int, accel_devices: int) -> StartUp:
  """The start-up decision from facts gathered without starting any JAX backend.

  Args:
    environ: the process environment.
    platforms: jax_platforms ("cpu", "tpu,cpu", ...; None or "" = JAX picks).
    explicit: the three --coordinator_address/--num_processes/--process_id flags are given.
    already: jax.distributed is already initialised.
    libtpu: the TPU runtime is installed.
    tpu_chips: Google TPU chips on this host's PCI bus.
    accel_devices: /dev/accel* device files (TPU v2-v4 drivers).

  Returns:
    A `StartUp` whose `reason` names what was found (it goes into the log).
  """
  if explicit:
    return StartUp("explicit", "--coordinator_address/--num_processes/--process_id")
  if already:
    return StartUp("already", "jax.distributed was initialised before remedis_jax.main")
  slurm_tasks = environ.get("SLURM_NTASKS", "")
  if slurm_tasks.isdigit() and int(slurm_tasks) > 1:
    return StartUp("slurm", f"SLURM_NTASKS={slurm_tasks}")
  if platforms and "tpu" not in [p.strip() for p in platforms.split(",")]:
    return StartUp("none", f"jax_platforms={platforms!r} excludes TPU")
  hints = [name for name in _TPU_ENVIRONMENT if environ.get(name)]
  if hints:
    return StartUp("tpu", "TPU job variables " + ", ".join(hints))
  if libtpu and (tpu_chips or accel_devices):
    found = f"{tpu_chips} TPU chip(s) on PCI" if tpu_chips else f"{accel_devices} /dev/accel*"
    return StartUp("tpu", f"libtpu and {found}")
  return StartUp("none", "no TPU, SLURM job or explicit coordinator")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> StartUp:
  """Starts JAX's distributed runtime where the run may span hosts (see the module docstring).

  Args:
    coordinator_address: "host:port" of process 0's coordinator.
    num_processes: total number of processes.
    process_id: this process's index in [0, num_processes).

  Returns:
    What was decided (for logs and tests).

  Raises:
    ValueError: some but not all of the three explicit settings are given, or the id is out
      of range.
    RuntimeError: on a TPU host JAX found no TPU cluster, yet the backend has several
      processes (their hosts could not agree on checkpoints or preemption).
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
  environ = os.environ
  start = decide(environ, platforms=_platforms(),
                 explicit=coordinator_address is not None,
                 already=jax.distributed.is_initialized(),
                 libtpu=_libtpu_installed(environ), tpu_chips=tpu_chips_on_pci(),
                 accel_devices=len(_accel_devices()))
  if start.method == "none":
    logging.info("One process (%s); jax.distributed not started.", start.reason)
    return start
  if start.method == "explicit":
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  elif start.method in ("slurm", "tpu"):
    logging.info("Starting jax.distributed with %s auto-detection (%s).", start.method.upper(),
                 start.reason)
    try:
      jax.distributed.initialize()
    except ValueError as error:
      if start.method != "tpu":
        raise
      # JAX found no TPU cluster description (no metadata server, no GKE variables).
      _continue_as_one_process(start, error)
      return dataclasses.replace(start, method="none",
                                 reason=f"{start.reason}; no TPU cluster found: {error}")
  logging.info("jax.distributed (%s): process %d of %d; %d local / %d global devices.",
               start.method, jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  return start


def _continue_as_one_process(start: StartUp, error: Exception) -> None:
  if jax.process_count() > 1:
    raise RuntimeError(
        f"this is a TPU host ({start.reason}) of a {jax.process_count()}-process job, but "
        f"jax.distributed.initialize() found no TPU cluster to join ({error}). Start the same "
        "command on every host with --coordinator_address=<worker 0's IP>:8482 "
        "--num_processes=<hosts> --process_id=<this host's index>.") from error
  logging.warning(
      "TPU host (%s), but jax.distributed.initialize() found no TPU cluster (%s): running as "
      "one process without the coordination service (preemption is handled by this process "
      "alone). Pass --coordinator_address/--num_processes/--process_id to override.",
      start.reason, error)
