"""The global-batch stream every training pipeline reads: one order of all records, read in
slices by every process, with an iterator whose state is a global position.

`make_stream(source, transform, batch_size=, options=)` builds this process's batches from a
per-record transform (data_pipelines/transforms.py) and the run's `StreamOptions` (seed,
epochs, shards, workers, bad-record policy; built once from `config.data`).

The same data on any topology. A training pipeline's `batch_size` is this process's part b of
the global batch B = b * shard_count (shard_count: the JAX processes, by default). The global
batch of step t is a function of (seed, t) only, whatever the number of processes, devices or
Grain worker processes:

  source -> seed -> shuffle -> repeat(num_epochs)    one order of ALL records per epoch (a
                                                     fresh permutation each epoch): the global
                                                     stream; position g holds record
                                                     perm_{g // N}[g % N]
    -> random_map(read + augment)                    the record's generator is keyed by
                                                     (seed, g): its views depend on its global
                                                     position, never on the process reading it
    -> this process's slice                          process p reads global positions
                                                     t*B + p*b ... t*B + (p+1)*b - 1 of step t
    [threads: read_threads]
    -> drop bad records, counting them               (only with skip_bad_records=True;
                                                      bounded by max_bad_record_share)
    -> batch(b, drop_remainder=True)                 [processes: worker_count; each worker
                                                      makes whole batches (steps w, w+W, ...)
                                                      and Grain interleaves them back in order]

So concatenating the P processes' batches of step t gives exactly the one-process batch of
step t: the same records, in the same order, with bit-identical views (tests/
test_data_topology.py checks P = 1, 2, 4). Grain's worker processes split the stream by whole
batches, not records, so worker_count does not change the batches either.

Epochs. A finite run (`num_epochs=E`) is the concatenation of E epochs, each a fresh
permutation of all N records, cut into global batches of B: a batch may straddle an epoch
boundary, every process yields floor(E * N / B) batches, and only the last (E * N) mod B
positions of the whole run are never read. (The trainers repeat forever and count steps.)

Resume. The iterator (`iter(ds)`, a Grain `DatasetIterator`) has `get_state()` /
`set_state()` and is saved inside an Orbax composite with `grain.checkpoint.CheckpointSave`.
Its state is JSON holding the global position (`global_position`: B * the batches consumed)
and the layout that saved it (process index and count, global batch size, worker count, N),
with Grain's own state of this process's pipeline (`inner`). Restored with the same layout, the
inner state is set as saved: exact, bad-record skips included. Restored with any other layout
(another process count or index, worker count or global batch size), the pipeline restarts at
the saved global position: the same continuation as an uninterrupted run, as long as no record
was skipped as bad before the save (a process that skipped s records had read s positions of
later steps; those are read again). A state saved by any one process therefore restores every
process of any topology. (Grain's Orbax handler files the state as
`process_<i>-of-<P>.json` and reads only the file of the current i and P; on another process
count `remedis_jax.checkpointing` hands over one of the saved files instead.)

Bad records and topology. A skipped bad record is replaced by the next record of the same
process's stream (the first of its slice of a later step), so the batches stay full but, from
the first skipped record on, differ between topologies (they are still a function of seed, step
and topology, and resume exactly). Without bad records (or with skip_bad_records=False, where a
bad record is an error) the run is topology-independent. In a finite multi-process run, a
process that skipped records runs out of batches before the others.

GMML's "other_image" fills take donor pixels from another record of the same process batch
(see `make_gmml_dataset`), so those fills depend on the local batch; every other part of a
GMML batch follows the rule above.

Performance notes (2-core CPU, SimCLR recipe, 256 px PNG -> 2 views at 224 px; details in
`experiments/benchmarks/input_pipeline.py`): augmentation is PIL / scipy code that releases the
GIL for most of its time, so 2 reader threads in one process reach ~200 images/s, on par with a
torchvision DataLoader with 2 workers; `worker_count=2` (Grain worker processes, batches
through shared memory) measured ~8% faster still (~216 images/s), at the price of a ~2 s
process start and worker memory.
"""
from __future__ import annotations

import dataclasses
import logging
import signal
from typing import Any

import grain
import numpy as np

from data_pipelines import bad_records


def resolve_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
  """(shard_index, shard_count), defaulting to (jax.process_index(), jax.process_count()).

  Raises:
    ValueError: only one of the two is given, or the index is out of range.
  """
  if (shard_index is None) != (shard_count is None):
    raise ValueError(f"give both shard_index and shard_count or neither; got "
                     f"shard_index={shard_index}, shard_count={shard_count}")
  if shard_index is None:
    import jax  # pylint: disable=g-import-not-at-top  (only needed for the default)
    shard_index, shard_count = jax.process_index(), jax.process_count()
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index must be in [0, {shard_count}); got {shard_index}")
  return int(shard_index), int(shard_count)


def shard_indices(num_records: int, shard_index: int, shard_count: int) -> np.ndarray:
  """Source indices one process evaluates: records shard_index, shard_index + shard_count, ...

  For evaluation only (every record once across processes). Training reads slices of the
  global stream instead (see the module docstring).

  Args:
    num_records: records in the source.
    shard_index: this process's shard.
    shard_count: number of shards.

  Returns:
    int64 array of source indices.

  Raises:
    ValueError: bad shard arguments, or fewer records than shards.
  """
  shard_index, shard_count = resolve_shard(shard_index, shard_count)
  if num_records < shard_count:
    raise ValueError(f"the source has {num_records} records, fewer than the {shard_count} "
                     "shards (processes); every process needs at least one record")
  return np.arange(shard_index, num_records, shard_count, dtype=np.int64)


def stream_seed(seed: int) -> int:
  """The global stream's Grain seed in [0, 2**32): the shuffle and every record's generator.

  The same on every process. (seed, 0) is what process 0's shard seed was when every process
  shuffled its own shard, so single-process runs kept their data order and old checkpoints of
  single-process runs resume exactly.
  """
  return int(np.random.SeedSequence([int(seed), 0]).generate_state(1)[0])


def check_not_empty(source: Any) -> None:
  if len(source) == 0:
    name = getattr(source, "name", type(source).__name__)
    raise ValueError(f"source {name} has no records (an empty manifest, split or subset?)")


def _ensure_absl_flags_parsed() -> None:
  """Grain's worker processes read absl flags; without absl.app.run they are unparsed.

  Grain then raises UnparsedFlagAccessError (a notebook, pytest, a script without app.run).
  Marking the flags parsed keeps every flag at its default; under app.run this is a no-op.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _ignore_ctrl_c(worker_index: int, worker_count: int) -> None:
  """Grain worker processes leave Ctrl-C to the main process.

  A terminal sends SIGINT to every process of the job. The main process saves the current step
  and exits (remedis_jax/preemption.py) and then stops its workers; a worker that took SIGINT
  itself would die with a KeyboardInterrupt traceback of its own and leave its shared memory
  behind.
  """
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)


def _out_of_shared_memory(batch: dict[str, Any]) -> dict[str, Any]:
  """Copies a batch from a worker process out of Grain's shared memory (in the main process).

  Grain frees a block when the array over it is garbage collected, but arrays on the JAX CPU
  backend can alias host memory, so the last batch's block can outlive the run (Python then
  warns of leaked shared_memory objects at exit). A copy bounds each block's life to this
  call; it is one memory copy of the batch (20 MB for 64 pairs of 224 px views), made while
  the device runs the previous step.
  """
  return {k: np.array(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}


def _sum_skipped(batch: dict[str, Any]) -> dict[str, Any]:
  """Per-element skip counts -> one int per batch (runs in the main process, after workers)."""
  batch = dict(batch)
  batch["skipped_records"] = int(np.sum(batch["skipped_records"]))
  return batch


class _ProcessSlice(grain.MapDataset):
  """The global stream -> this process's records: its b positions of every global batch.

  Local record j is global position
    first_position + (batch_offset + (j // b) * batch_stride) * B + shard_index * b + j % b,
  over the whole global batches the stream holds from first_position on. first_position is
  where a resumed run restarts; batch_offset and batch_stride pick a worker's batches.

  `slice(worker::num_workers)` splits by local BATCH, not by record: Grain's worker processes
  (mp_prefetch) call it to share out the stream, and whole batches per worker, interleaved
  back in order, make the batches independent of worker_count. Other slices are refused.
  """

  def __init__(self, parent: grain.MapDataset, *, global_batch_size: int,
               local_batch_size: int, shard_index: int, first_position: int = 0,
               batch_offset: int = 0, batch_stride: int = 1):
    super().__init__(parent)
    self._global_batch_size, self._local_batch_size = global_batch_size, local_batch_size
    self._shard_index, self._first_position = shard_index, first_position
    self._batch_offset, self._batch_stride = batch_offset, batch_stride
    whole_batches = max(0, len(parent) - first_position) // global_batch_size
    self._num_batches = max(0, -(-(whole_batches - batch_offset) // batch_stride))

  def __len__(self) -> int:
    return self._num_batches * self._local_batch_size

  def __str__(self) -> str:
    return (f"ProcessSlice(B={self._global_batch_size}, b={self._local_batch_size}, "
            f"p={self._shard_index}, first={self._first_position}, "
            f"batches={self._batch_offset}::{self._batch_stride})")

  def global_position(self, index: int) -> int:
    local_batch, offset = divmod(int(index), self._local_batch_size)
    step = self._batch_offset + local_batch * self._batch_stride
    return (self._first_position + step * self._global_batch_size
            + self._shard_index * self._local_batch_size + offset)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self.global_position(index)]

  def slice(self, sl: slice) -> "_ProcessSlice":
    start, step = sl.start or 0, sl.step or 1
    if sl.stop is not None or not 0 <= start < step:
      raise ValueError(f"_ProcessSlice splits only by whole batches (worker::num_workers, as "
                       f"Grain's worker processes do); got {sl}")
    return _ProcessSlice(self._parent, global_batch_size=self._global_batch_size,
                         local_batch_size=self._local_batch_size,
                         shard_index=self._shard_index, first_position=self._first_position,
                         batch_offset=self._batch_offset + start * self._batch_stride,
                         batch_stride=self._batch_stride * step)


class _GlobalBatchesIterDataset(grain.IterDataset):
  """This process's batches of the global stream; its iterator's state is a global position.

  `build(first_position)` makes this process's pipeline from that global position on.
  """

  def __init__(self, build: Any, layout: dict[str, int]):
    super().__init__()
    self._build, self._layout = build, dict(layout)

  def __iter__(self) -> grain.DatasetIterator:
    return _GlobalBatchesIterator(self._build, self._layout)

  def __str__(self) -> str:
    return f"GlobalBatchesIterDataset({self._layout})"


class _GlobalBatchesIterator(grain.DatasetIterator):
  """Counts the global positions consumed; restores a state saved with any layout.

  State (JSON): `global_position` (B * batches consumed since position 0), the saving
  `layout` (process_index, process_count, global_batch_size, worker_count, num_records),
  `skipped_records` (bad records this process skipped so far), `first_position` (where the
  inner pipeline started) and `inner` (Grain's state of that pipeline).
  """

  def __init__(self, build: Any, layout: dict[str, int]):
    super().__init__()
    self._build, self._layout = build, layout
    self._inner = None
    self._start(first_position=0)

  def _start(self, first_position: int, inner_state: Any = None) -> None:
    if self._inner is not None:
      self._inner.close()
    self._inner = iter(self._build(first_position))
    if inner_state is not None:
      self._inner.set_state(inner_state)
    self._first_position = first_position
    self._global_position = first_position
    self._skipped = 0

  def __next__(self) -> dict[str, Any]:
    batch = next(self._inner)  # StopIteration ends the stream.
    self._global_position += self._layout["global_batch_size"]
    self._skipped += int(batch.get("skipped_records", 0))
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"global_position": self._global_position, "layout": dict(self._layout),
            "skipped_records": self._skipped, "first_position": self._first_position,
            "inner": self._inner.get_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    if "global_position" not in state:
      self._set_legacy_state(state)
      return
    position = int(state["global_position"])
    saved = {k: int(v) for k, v in state["layout"].items()}
    if saved == self._layout:
      # Exact, including the shift of a stream that skipped bad records.
      self._start(int(state["first_position"]), state["inner"])
      self._global_position, self._skipped = position, int(state["skipped_records"])
      return
    if saved["num_records"] != self._layout["num_records"]:
      logging.warning(
          "Data: the iterator state was saved over %d records, the source now has %d: the "
          "global order is a different one; continuing at global position %d.",
          saved["num_records"], self._layout["num_records"], position)
    if int(state.get("skipped_records", 0)):
      logging.warning(
          "Data: the saved process had skipped %d bad records, so it had read that many "
          "positions of later steps; restarting the global stream at position %d reads them "
          "again.", int(state["skipped_records"]), position)
    logging.info("Data: iterator state saved by process %d of %d (global batch %d, %d "
                 "workers) restored on process %d of %d (global batch %d, %d workers) at "
                 "global position %d.", saved["process_index"], saved["process_count"],
                 saved["global_batch_size"], saved["worker_count"],
                 self._layout["process_index"], self._layout["process_count"],
                 self._layout["global_batch_size"], self._layout["worker_count"], position)
    self._start(position)

  def _set_legacy_state(self, state: dict[str, Any]) -> None:
    """A state saved before batches were global: Grain's own state of the whole pipeline.

    For one process without workers that pipeline was this one, so the resume is exact.
    """
    if self._layout["process_count"] > 1 or self._layout["worker_count"] > 0:
      logging.warning(
          "Data: the iterator state predates global batches (each process then shuffled its "
          "own shard); it is restored as saved, but the records after the resume are not the "
          "ones the original run would have read.")
    self._start(0, state)
    # Records this process had consumed (without workers) -> whole steps -> global position.
    global_batch_size = self._layout["global_batch_size"]
    local_batch_size = global_batch_size // self._layout["process_count"]
    self._global_position = (int(state.get("next_index", 0)) // local_batch_size
                             * global_batch_size)

  def start_prefetch(self) -> None:
    self._inner.start_prefetch()

  def close(self) -> None:
    """Stops the worker processes and frees their shared memory now.

    The train loops call it when they end. Left to garbage collection, the pipeline can live
    until interpreter shutdown, too late to clean up (Python then warns of leaked shared_memory
    objects). The reference is dropped, too, so that a later `__del__` at shutdown has nothing
    left to close.
    """
    inner, self._inner = getattr(self, "_inner", None), None
    if inner is not None:
      inner.close()


@dataclasses.dataclass(frozen=True)
class StreamOptions:
  """How a training stream is read, the same for every objective.

  Built once per run from the config (`from_config`) and passed to the pipeline factories of
  data_pipelines/pipeline.py; tests and benchmarks build one directly.

  Attributes:
    seed: the pipeline seed: the global order and every record's views derive from it (the
      same on every process).
    num_channels: 3 repeats grayscale to RGB (BiT weights expect RGB); 1 keeps one channel.
    num_epochs: passes over the whole source; None repeats forever (the trainers count steps).
      A finite run has floor(num_epochs * N / B) global batches.
    shard_index: this process (default jax.process_index()): it reads positions
      shard_index * b ... (shard_index + 1) * b - 1 of every global batch.
    shard_count: the number of processes (default jax.process_count()).
    skip_bad_records: False: a BadRecordError from the source propagates (it names the record
      and the reason). True: the record is dropped, logged with its reason, and counted in
      the batch's `skipped_records`, up to `max_bad_record_share` (bad_records.py).
    max_bad_record_share: with skip_bad_records, the largest share of bad records read before
      the pipeline stops with a TooManyBadRecordsError.
    worker_count: Grain worker processes (0: augment in reader threads of this process).
    read_threads: threads reading and augmenting records in each process.
    prefetch_buffer_size: records prepared ahead per process.
  """
  seed: int
  num_channels: int = 3
  num_epochs: int | None = None
  shard_index: int | None = None
  shard_count: int | None = None
  skip_bad_records: bool = False
  max_bad_record_share: float = bad_records.DEFAULT_MAX_BAD_RECORD_SHARE
  worker_count: int = 0
  read_threads: int = 2
  prefetch_buffer_size: int = 64

  @classmethod
  def from_config(cls, config, **overrides) -> "StreamOptions":
    """The options of a run config: `config.seed` and `config.data`'s num_channels,
    skip_bad_records, max_bad_record_share, worker_count, read_threads and
    prefetch_buffer_size (the defaults above where a field is missing); `overrides` win."""
    data = config.data
    options = dict(
        seed=int(config.seed), num_channels=int(data.get("num_channels", 3)),
        skip_bad_records=bool(data.get("skip_bad_records", False)),
        max_bad_record_share=float(data.get("max_bad_record_share",
                                            bad_records.DEFAULT_MAX_BAD_RECORD_SHARE)),
        worker_count=int(data.get("worker_count", 0)),
        read_threads=int(data.get("read_threads", 2)),
        prefetch_buffer_size=int(data.get("prefetch_buffer_size", 64)))
    options.update(overrides)
    return cls(**options)


def make_stream(source: Any, transform: Any, *, batch_size: int, options: StreamOptions,
                reader_type: type[bad_records.RecordReader] = bad_records.RecordReader,
                batch_transform: Any = None) -> grain.IterDataset:
  """This process's batches of the global stream (module docstring): the training graph.

  Args:
    source: random-access source (`__len__`, `__getitem__` -> record dict, see
      data_pipelines/sources/base.py); must be picklable when options.worker_count > 0.
    transform: `(record, np.random.Generator) -> element` (data_pipelines/transforms.py).
    batch_size: records per batch on this process, b = the global batch / shard_count.
    options: seed, epochs, shards, bad-record policy, workers and threads.
    reader_type: bad_records.RecordReader, or IndexedRecordReader when `transform` reads the
      record's source index.
    batch_transform: optional batch -> batch, after batching (in the worker processes).

  Raises:
    ValueError: bad sizes, shards, worker count or share, an empty source, or no whole global
      batch in a finite run.
  """
  num_epochs, worker_count = options.num_epochs, options.worker_count
  if batch_size <= 0:
    raise ValueError(f"batch_size (per process) must be positive; got {batch_size}")
  if num_epochs is not None and num_epochs <= 0:
    raise ValueError(f"num_epochs must be positive or None (repeat forever); got {num_epochs}")
  if worker_count < 0:
    raise ValueError(f"worker_count must be >= 0; got {worker_count}")
  max_bad_record_share = bad_records.check_max_bad_share(options.max_bad_record_share)
  check_not_empty(source)
  shard_index, shard_count = resolve_shard(options.shard_index, options.shard_count)
  num_records = len(source)
  global_batch_size = batch_size * shard_count
  if num_epochs is not None and num_epochs * num_records < global_batch_size:
    raise ValueError(f"{num_epochs} epoch(s) of {num_records} records hold no whole global "
                     f"batch of {global_batch_size} ({batch_size} per process x "
                     f"{shard_count} processes); repeat more epochs or use a smaller batch")
  source_name = str(getattr(source, "name", type(source).__name__))
  records = (grain.MapDataset.source(
      reader_type(source, np.arange(num_records, dtype=np.int64), options.skip_bad_records))
             .seed(stream_seed(options.seed))
             .shuffle()
             .repeat(num_epochs)
             .random_map(transform))

  def build(first_position: int) -> grain.IterDataset:
    process_slice = _ProcessSlice(records, global_batch_size=global_batch_size,
                                  local_batch_size=batch_size, shard_index=shard_index,
                                  first_position=first_position)
    dataset = process_slice.to_iter_dataset(grain.ReadOptions(
        num_threads=options.read_threads, prefetch_buffer_size=options.prefetch_buffer_size))
    dataset = bad_records.DropBadRecordsIterDataset(
        dataset, source_name=source_name, num_records=num_records,
        max_share=max_bad_record_share)
    dataset = dataset.batch(batch_size, drop_remainder=True)
    if batch_transform is not None:
      # Before mp_prefetch, so batch-level work (GMML's other-image fill) runs in the workers.
      dataset = dataset.map(batch_transform)
    if worker_count > 0:
      _ensure_absl_flags_parsed()
      dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=worker_count, per_worker_buffer_size=2), worker_init_fn=_ignore_ctrl_c)
      dataset = dataset.map(_out_of_shared_memory)
    return dataset.map(_sum_skipped)

  layout = {"process_index": shard_index, "process_count": shard_count,
            "global_batch_size": global_batch_size, "worker_count": worker_count,
            "num_records": num_records}
  return _GlobalBatchesIterDataset(build, layout)
