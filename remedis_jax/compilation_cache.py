"""JAX's persistent compilation cache for every run: compile once, reuse at every start.

A run compiles its update and evaluation programs at every start; on a pod every host does,
again after each preemption. With the cache on, a start whose programs were compiled before (the
same config, a resumed run, the next run of a sweep) loads them instead. `config.
compilation_cache_dir` says where it lives:

  ""        WORKDIR/compilation_cache (the default: a resumed run finds it in its own workdir)
  "off"     no persistent cache
  a folder  or a URL (gs://bucket/jax_cache): shared by every run and host that names it

JAX writes and reads gs:// caches through etils.epath, the same layer data_pipelines/storage.py
uses. A cache configured already (JAX_COMPILATION_CACHE_DIR in the environment, which the sweeps
set for their runs, or an earlier call in this process) is kept.

`CompileStats` counts what happened (programs loaded from the cache, compiled, seconds spent
compiling or loading), from JAX's monitoring events; the entry point logs it at the end of a run.
"""

from __future__ import annotations

import dataclasses
import threading

from data_pipelines import storage

SUBDIR = "compilation_cache"
OFF = "off"
MIN_COMPILE_TIME_S = 0.5  # programs that compile faster are not worth a file read
_HIT = "/jax/compilation_cache/cache_hits"
_MISS = "/jax/compilation_cache/cache_misses"
_COMPILE = "/jax/core/compile/backend_compile_duration"  # compiling, or loading from the cache


def cache_dir(setting: str, workdir: str) -> str | None:
  """The folder `config.compilation_cache_dir` = `setting` names for a run in `workdir`."""
  setting = (setting or "").strip()
  if setting.lower() == OFF:
    return None
  return setting or storage.join(storage.absolute(workdir), SUBDIR)


def enable(path: str, min_compile_time_s: float = MIN_COMPILE_TIME_S) -> str:
  """Turns the persistent cache on in this process, at `path`, unless one is configured already.

  Returns:
    The folder in effect (the earlier one when there was one).
  """
  # pylint: disable=g-import-not-at-top
  import jax
  from jax.experimental.compilation_cache import compilation_cache
  # pylint: enable=g-import-not-at-top
  if jax.config.jax_compilation_cache_dir:
    return jax.config.jax_compilation_cache_dir
  storage.makedirs(path)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_time_s)
  # A program compiled before this call must not have switched the cache off for the process:
  # reset_cache makes JAX read the settings again at the next compilation.
  compilation_cache.reset_cache()
  return path


def enable_for_run(setting: str, workdir: str) -> str | None:
  """`enable` for a run's `config.compilation_cache_dir`; returns the folder in effect."""
  path = cache_dir(setting, workdir)
  if path is None:
    import jax  # pylint: disable=g-import-not-at-top
    return jax.config.jax_compilation_cache_dir or None
  return enable(path)


@dataclasses.dataclass
class CompileStats:
  """Programs loaded from the persistent cache (`hits`), compiled (`misses`), and the seconds
  spent compiling or loading, since `start()`."""
  hits: int = 0
  misses: int = 0
  seconds: float = 0.0

  def __post_init__(self):
    self._lock = threading.Lock()
    self._started = False

  def start(self) -> "CompileStats":
    import jax  # pylint: disable=g-import-not-at-top
    if not self._started:
      jax.monitoring.register_event_listener(self._on_event)
      jax.monitoring.register_event_duration_secs_listener(self._on_duration)
      self._started = True
    return self

  def stop(self) -> None:
    import jax  # pylint: disable=g-import-not-at-top
    if self._started:
      jax.monitoring.unregister_event_listener(self._on_event)
      jax.monitoring.unregister_event_duration_listener(self._on_duration)
      self._started = False

  def _on_event(self, event: str, **kwargs) -> None:
    del kwargs
    with self._lock:
      if event == _HIT:
        self.hits += 1
      elif event == _MISS:
        self.misses += 1

  def _on_duration(self, event: str, duration: float, **kwargs) -> None:
    del kwargs
    if event == _COMPILE:
      with self._lock:
        self.seconds += float(duration)

  def summary(self, path: str | None) -> str:
    where = f"persistent cache {path}" if path else "no persistent cache"
    return (f"Compilation: {self.hits} program(s) loaded from the cache, {self.misses} "
            f"compiled, {self.seconds:.1f} s compiling or loading ({where}).")
