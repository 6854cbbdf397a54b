"""Grain input pipelines: one global stream of batches, read in slices by every process.

Four entry points, one per use:

- `make_pretrain_dataset`: SimCLR pretraining, `num_views` augmented views per record.
  Batches: `views` uint8 (B, V, H, W, C), `label`, `site`, `skipped_records`.
- `make_multicrop_dataset`: multi-crop pretraining (SwAV; Ghesu et al. 2022), `num_global`
  large and `num_local` small views per record, plus which records count as labeled.
  Batches: `global_views` uint8 (B, G_n, G, G, C), `local_views` uint8 (B, L_n, L, L, C),
  `label`, `labeled`, `site`, `skipped_records`.
- `make_gmml_dataset`: GMML pretraining, a clean view and the same view corrupted by group
  masking. Batches: `clean`, `corrupted` uint8 (B, H, W, C), `mask` uint8 (B, H/p, W/p),
  `fill`, `label`, `site`, `skipped_records`.
- `make_train_dataset`: supervised fine-tuning, one augmented view.
  Batches: `image` uint8 (B, H, W, C), `label`, `site`, `skipped_records` (+ `lung_mask`).
- `make_eval_dataset`: one deterministic pass, the last batch padded, with a `valid` mask.
  Batches: `image`, `label`, `site`, `id`, `valid` (+ `lung_mask`).

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

Evaluation (`make_eval_dataset`) keeps a per-process split: process p reads records
p, p + P, p + 2P, ..., padded to the same number of batches on every process; every record is
evaluated exactly once across processes.

Outputs are uint8: normalising to [-1, 1] floats is the train step's job, on the device
(`views / 127.5 - 1`). uint8 moves 4x fewer bytes between worker processes and to the device.

Performance notes (2-core CPU, SimCLR recipe, 256 px PNG -> 2 views at 224 px; details in
`experiments/benchmarks/input_pipeline.py`): augmentation is PIL / scipy code that releases the
GIL for most of its time, so 2 reader threads in one process reach ~200 images/s, on par with a
torchvision DataLoader with 2 workers; `worker_count=2` (Grain worker processes, batches
through shared memory) measured ~8% faster still (~216 images/s), at the price of a ~2 s
process start and worker memory. Skipped-record counts travel with the elements, so they
survive worker processes; a bad record read after the last good one of a finite stream is
logged but not counted (no batch follows it).

Bounded skipping: skipping is for the odd broken file, not for a broken dataset. Once a
process has read `min(200, N)` records, more than `max_bad_record_share` of them bad
(default 10%; counted per process, or per worker process, since the start of this run) stops
the run with a `TooManyBadRecordsError` naming the source, the counts and the last bad record;
2N - 1 reads in a row without a good record stop it whatever the share limit (one process
then has read at least one whole epoch; each of P processes, its slices of about 2P epochs).
Bad records are logged one by one up to 10 per process, then every 100th.
"""
from __future__ import annotations

from collections.abc import Sequence
import logging
import math
import signal
from typing import Any

import grain
import numpy as np

from data_pipelines import ops as ops_lib
from data_pipelines import ops_geometric
from data_pipelines import ops_intensity
from data_pipelines import ops_masking
from data_pipelines.errors import BadRecordError, TooManyBadRecordsError

# Marks a record that failed to read; such elements never reach a batch.
_BAD_RECORD = "_bad_record"
# The largest share of bad records a run skips before it stops (config.data.max_bad_record_share).
DEFAULT_MAX_BAD_RECORD_SHARE = 0.1
# The share is judged once this many records (or N, if smaller) were read.
_MIN_RECORDS_FOR_SHARE = 200
# Bad records logged one by one per process before only every 100th is.
_LOGGED_BAD_RECORDS = 10
# The record's index in the source, added by _IndexedRecordReader (never reaches a batch).
_SOURCE_INDEX = "_source_index"
# Ops that end in a fixed spatial size, so records of different sizes batch together.
_SIZE_FIXING_OPS = (ops_geometric.RandomResizedCrop, ops_geometric.Resize,
                    ops_geometric.CentralCrop)


# ----------------------------------------------------------------------------------------
# Reading: bad records either propagate (default) or become markers that are counted.


class _RecordReader:
  """Random-access view of `source` restricted to `indices`; turns BadRecordError into a marker.

  Picklable as long as the source is, so Grain worker processes can rebuild it.
  """

  def __init__(self, source: Any, indices: np.ndarray, skip_bad_records: bool):
    self._source = source
    self._indices = np.asarray(indices, np.int64)
    self._skip_bad_records = skip_bad_records
    self._bad_seen = 0  # in this process (each worker process has its own copy)

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, index: int) -> dict[str, Any]:
    source_index = int(self._indices[index])
    try:
      return self._source[source_index]
    except BadRecordError as error:
      if not self._skip_bad_records:
        raise
      # Logged where it happens (possibly a worker process) and counted in the batch; after
      # the first few only every 100th, so a broken folder cannot flood the log.
      self._bad_seen += 1
      if self._bad_seen <= _LOGGED_BAD_RECORDS or self._bad_seen % 100 == 0:
        more = ("" if self._bad_seen < _LOGGED_BAD_RECORDS else
                f" ({self._bad_seen} bad records read by this process so far; from here on "
                "only every 100th is logged, all are counted)")
        logging.warning("Skipping bad record %s: %s%s", error.record, error.reason, more)
      return {_BAD_RECORD: f"{error.record}: {error.reason}"}


class _IndexedRecordReader(_RecordReader):
  """A _RecordReader whose good records also carry their source index (for `labeled`)."""

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = super().__getitem__(index)
    if _BAD_RECORD in record:
      return record
    return {**record, _SOURCE_INDEX: int(self._indices[index])}


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


def _stream_seed(seed: int) -> int:
  """The global stream's Grain seed in [0, 2**32): the shuffle and every record's generator.

  The same on every process. (seed, 0) is what process 0's shard seed was when every process
  shuffled its own shard, so single-process runs kept their data order and old checkpoints of
  single-process runs resume exactly.
  """
  return int(np.random.SeedSequence([int(seed), 0]).generate_state(1)[0])


# ----------------------------------------------------------------------------------------
# Per-record transforms (module-level classes: picklable for worker processes).


def _check_ops(ops: Sequence[ops_lib.Op], what: str) -> list[ops_lib.Op]:
  ops = ops_lib.parse_ops(ops)
  if not any(isinstance(op, _SIZE_FIXING_OPS) for op in ops):
    raise ValueError(
        f"{what}: the ops must contain random_resized_crop, resize or central_crop so that "
        f"every record ends at the same size and records batch together; got {ops}")
  return ops


def _prepare_features(record: dict[str, Any], ops: Sequence[ops_lib.Op]) -> dict[str, Any]:
  """The ops' input: image (uint8, unless the ops start with intensity_window) and lung_mask."""
  image = np.asarray(record["image"])
  if image.ndim == 2:
    image = image[..., None]
  features = {"image": image}
  if image.dtype != np.uint8 and not (ops and isinstance(ops[0], ops_intensity.IntensityWindow)):
    # High-bit-depth source without an explicit window: map the image's own range to 0..255.
    features = ops_intensity.IntensityWindow()(features, None)
  if "lung_mask" in record:
    features["lung_mask"] = np.asarray(record["lung_mask"], np.uint8)
  return features


def _metadata(record: dict[str, Any]) -> dict[str, Any]:
  return {"label": record["label"], "site": np.int32(record.get("site", 0))}


class _AugmentViews:
  """Record + rng -> {"views": (V, H, W, C) uint8, label, site}: V independent augmentations."""

  def __init__(self, ops: Sequence[ops_lib.Op], num_views: int, num_channels: int):
    self.ops, self.num_views, self.num_channels = list(ops), num_views, num_channels

  def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    if _BAD_RECORD in record:
      return record
    features = _prepare_features(record, self.ops)
    views = [ops_lib.set_channels(ops_lib.apply_ops(self.ops, features, rng)["image"],
                                  self.num_channels) for _ in range(self.num_views)]
    return {"views": np.stack(views), **_metadata(record)}


class _AugmentOne:
  """Record + rng -> {"image": (H, W, C) uint8, label, site (, lung_mask)}: one augmentation."""

  def __init__(self, ops: Sequence[ops_lib.Op], num_channels: int):
    self.ops, self.num_channels = list(ops), num_channels

  def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    if _BAD_RECORD in record:
      return record
    features = ops_lib.apply_ops(self.ops, _prepare_features(record, self.ops), rng)
    out = {"image": np.ascontiguousarray(ops_lib.set_channels(features["image"], self.num_channels)),
           **_metadata(record)}
    if "lung_mask" in features:
      out["lung_mask"] = np.ascontiguousarray(features["lung_mask"])
    return out


class _AugmentMultiCrop:
  """Record + rng -> global views, local views, label, labeled, site (multi-crop).

  The views are drawn from the record's generator in a fixed order (all global views, then all
  local ones), so the same record at the same stream position always gets the same crops.
  """

  def __init__(self, global_ops: Sequence[ops_lib.Op], local_ops: Sequence[ops_lib.Op],
               num_global: int, num_local: int, num_channels: int,
               labeled_indices: np.ndarray | None):
    self.global_ops, self.local_ops = list(global_ops), list(local_ops)
    self.num_global, self.num_local, self.num_channels = num_global, num_local, num_channels
    self.labeled_indices = labeled_indices  # Sorted unique int64, or None.

  def _is_labeled(self, record: dict[str, Any]) -> bool:
    if self.labeled_indices is None:
      # No explicit subset: a record is labeled when its source gives a label (-1 = unlabeled,
      # all -1 for multi-label; see data_pipelines/sources/base.py).
      return bool(np.all(np.asarray(record["label"]) >= 0))
    index = record[_SOURCE_INDEX]
    position = int(np.searchsorted(self.labeled_indices, index))
    return position < len(self.labeled_indices) and self.labeled_indices[position] == index

  def _views(self, ops: list[ops_lib.Op], record: dict[str, Any], count: int,
             rng: np.random.Generator) -> np.ndarray:
    features = _prepare_features(record, ops)
    return np.stack([ops_lib.set_channels(ops_lib.apply_ops(ops, features, rng)["image"],
                                          self.num_channels) for _ in range(count)])

  def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    if _BAD_RECORD in record:
      return record
    out = {"global_views": self._views(self.global_ops, record, self.num_global, rng)}
    if self.num_local > 0:
      out["local_views"] = self._views(self.local_ops, record, self.num_local, rng)
    out["labeled"] = np.float32(self._is_labeled(record))
    out.update(_metadata(record))
    return out


class _EvalTransform:
  """(index, record) -> deterministic eval example; `index` seeds any randomness in the ops."""

  def __init__(self, ops: Sequence[ops_lib.Op], num_channels: int, num_real: int):
    self.ops, self.num_channels, self.num_real = list(ops), num_channels, num_real

  def __call__(self, index: int, record: dict[str, Any]) -> dict[str, Any]:
    rng = np.random.default_rng(index % self.num_real)
    out = _AugmentOne(self.ops, self.num_channels)(record, rng)
    out["id"] = str(record.get("id", ""))
    out["valid"] = np.bool_(index < self.num_real)
    return out


# ----------------------------------------------------------------------------------------
# Dropping bad records while counting them: a tiny stateless IterDataset stage.


class _DropBadRecordsIterDataset(grain.IterDataset):
  """Drops bad-record markers; each kept element carries how many were dropped just before it.

  Stops with a TooManyBadRecordsError when more than `max_share` of the records read are bad
  (judged after `min(200, num_records)` reads), or after 2 * num_records - 1 bad records in a
  row (for one process, a whole epoch of the global stream without a good record).
  """

  def __init__(self, parent: grain.IterDataset, *, source_name: str, num_records: int,
               max_share: float):
    super().__init__(parent)
    self._source_name = source_name
    self._num_records = num_records
    self._max_share = max_share

  def __iter__(self) -> grain.DatasetIterator:
    return _DropBadRecordsIterator(self._parent.__iter__(), source_name=self._source_name,
                                   num_records=self._num_records, max_share=self._max_share)


class _DropBadRecordsIterator(grain.DatasetIterator):
  """Its state is its parent's (exact resume); the bad-share counts restart with the process."""

  def __init__(self, parent: grain.DatasetIterator, *, source_name: str, num_records: int,
               max_share: float):
    super().__init__(parent)
    self._source_name = source_name
    self._num_records = num_records
    self._max_share = max_share
    self._read = self._bad = self._bad_in_a_row = 0

  def _check(self, last_bad: str) -> None:
    if self._bad_in_a_row >= 2 * self._num_records - 1:  # so a whole pass was bad
      raise TooManyBadRecordsError(
          f"{self._source_name}: no readable record in {self._bad_in_a_row} reads in a row "
          f"(the source has {self._num_records} records); the last: {last_bad}. "
          "Check data.path / data.root / data.manifest and the files themselves.")
    if (self._read >= min(_MIN_RECORDS_FOR_SHARE, self._num_records)
        and self._bad > self._max_share * self._read):
      raise TooManyBadRecordsError(
          f"{self._source_name}: {self._bad} of the {self._read} records read so far are bad "
          f"({self._bad / self._read:.1%}), more than data.max_bad_record_share="
          f"{self._max_share:g} allows; the last: {last_bad}. Fix or remove the bad files (the "
          "log names each), or raise data.max_bad_record_share if losing them is acceptable.")

  def __next__(self) -> dict[str, Any]:
    skipped = 0
    while True:
      element = next(self._parent)  # StopIteration ends the stream.
      self._read += 1
      if _BAD_RECORD in element:
        skipped += 1
        self._bad += 1
        self._bad_in_a_row += 1
        self._check(element[_BAD_RECORD])
        continue
      self._bad_in_a_row = 0
      element["skipped_records"] = np.int32(skipped)
      return element

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state)


def _check_not_empty(source: Any) -> None:
  if len(source) == 0:
    name = getattr(source, "name", type(source).__name__)
    raise ValueError(f"source {name} has no records (an empty manifest, split or subset?)")


def _check_max_bad_share(max_bad_record_share: float) -> float:
  share = float(max_bad_record_share)
  if not 0.0 <= share <= 1.0:
    raise ValueError("max_bad_record_share (config.data.max_bad_record_share) must be in "
                     f"[0, 1]; got {max_bad_record_share}")
  return share


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


# ----------------------------------------------------------------------------------------
# The global stream, this process's slice of it, and an iterator whose state is a position.


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


# ----------------------------------------------------------------------------------------
# Public entry points.


def _make_augmented_dataset(source: Any, augment: Any, *, batch_size: int, seed: int,
                            shard_index: int | None, shard_count: int | None,
                            num_epochs: int | None, skip_bad_records: bool, worker_count: int,
                            read_threads: int, prefetch_buffer_size: int,
                            max_bad_record_share: float = DEFAULT_MAX_BAD_RECORD_SHARE,
                            reader_type: type[_RecordReader] = _RecordReader,
                            batch_transform: Any = None) -> grain.IterDataset:
  """This process's batches of the global stream (module docstring): the training graph."""
  if batch_size <= 0:
    raise ValueError(f"batch_size (per process) must be positive; got {batch_size}")
  if num_epochs is not None and num_epochs <= 0:
    raise ValueError(f"num_epochs must be positive or None (repeat forever); got {num_epochs}")
  if worker_count < 0:
    raise ValueError(f"worker_count must be >= 0; got {worker_count}")
  max_bad_record_share = _check_max_bad_share(max_bad_record_share)
  _check_not_empty(source)
  shard_index, shard_count = resolve_shard(shard_index, shard_count)
  num_records = len(source)
  global_batch_size = batch_size * shard_count
  if num_epochs is not None and num_epochs * num_records < global_batch_size:
    raise ValueError(f"{num_epochs} epoch(s) of {num_records} records hold no whole global "
                     f"batch of {global_batch_size} ({batch_size} per process x "
                     f"{shard_count} processes); repeat more epochs or use a smaller batch")
  source_name = str(getattr(source, "name", type(source).__name__))
  stream = (grain.MapDataset.source(
      reader_type(source, np.arange(num_records, dtype=np.int64), skip_bad_records))
            .seed(_stream_seed(seed))
            .shuffle()
            .repeat(num_epochs)
            .random_map(augment))

  def build(first_position: int) -> grain.IterDataset:
    records = _ProcessSlice(stream, global_batch_size=global_batch_size,
                            local_batch_size=batch_size, shard_index=shard_index,
                            first_position=first_position)
    dataset = records.to_iter_dataset(grain.ReadOptions(
        num_threads=read_threads, prefetch_buffer_size=prefetch_buffer_size))
    dataset = _DropBadRecordsIterDataset(dataset, source_name=source_name,
                                         num_records=num_records,
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


def make_pretrain_dataset(source: Any, *, batch_size: int, ops: Sequence[ops_lib.Op] | str,
                          num_views: int = 2, seed: int, shard_index: int | None = None,
                          shard_count: int | None = None, num_epochs: int | None = None,
                          num_channels: int = 3, skip_bad_records: bool = False,
                          worker_count: int = 0, read_threads: int = 2,
                          prefetch_buffer_size: int = 64,
    max_bad_record_share: float = DEFAULT_MAX_BAD_RECORD_SHARE) -> grain.IterDataset:
  """The contrastive pretraining pipeline: `num_views` augmented views of every record.

  Args:
    source: random-access source (`__len__`, `__getitem__` -> record dict, see
      data_pipelines/sources/base.py); must be picklable when worker_count > 0.
    batch_size: records per batch on this process, b = the global batch / shard_count.
    ops: op list (objects from `presets.get_preset`, or a spec `ops.parse_ops` accepts); must
      end at a fixed size.
    num_views: augmented views per record (SimCLR: 2).
    seed: pipeline seed; the global order and every record's views derive from it (the
      same on every process).
    shard_index: this process (default jax.process_index()): it reads positions
      shard_index * b ... (shard_index + 1) * b - 1 of every global batch.
    shard_count: number of processes (default jax.process_count()).
    num_epochs: passes over the whole source; None repeats forever (count steps in the
      trainer). A finite run has floor(num_epochs * N / (b * shard_count)) batches.
    num_channels: 3 repeats grayscale to RGB (BiT weights expect RGB); 1 keeps one channel.
    skip_bad_records: False: a BadRecordError from the source propagates (it names the record
      and the reason). True: the record is dropped, logged with its reason, and counted in the
      batch's `skipped_records`, up to `max_bad_record_share`.
    worker_count: Grain worker processes (0: augment in reader threads of this process).
    read_threads: threads reading and augmenting records in each process.
    prefetch_buffer_size: records prepared ahead per process.
    max_bad_record_share: with skip_bad_records, the largest share of bad records read before
      the pipeline stops with a TooManyBadRecordsError (see the module docstring).

  Returns:
    A Grain IterDataset; `iter()` gives a checkpointable iterator of dicts with `views` uint8
    (B, num_views, H, W, C), `label` (B,) int32 or (B, K) float32, `site` (B,) int32 and
    `skipped_records` (int).

  Raises:
    ValueError: bad sizes or shards, no whole global batch in a finite run, or ops that do
      not fix the output size.
  """
  if num_views < 1:
    raise ValueError(f"num_views must be >= 1; got {num_views}")
  ops = _check_ops(ops, "make_pretrain_dataset")
  return _make_augmented_dataset(
      source, _AugmentViews(ops, num_views, num_channels), batch_size=batch_size, seed=seed,
      shard_index=shard_index, shard_count=shard_count, num_epochs=num_epochs,
      skip_bad_records=skip_bad_records, worker_count=worker_count, read_threads=read_threads,
      prefetch_buffer_size=prefetch_buffer_size,
      max_bad_record_share=max_bad_record_share)


def _check_labeled_indices(labeled_indices: Any, num_records: int) -> np.ndarray:
  """Sorted unique int64 source indices, or a ValueError naming the problem."""
  indices = np.asarray(labeled_indices)
  if indices.ndim != 1 or not (indices.size == 0 or np.issubdtype(indices.dtype, np.integer)):
    hint = (" (a boolean mask? pass np.flatnonzero(mask))" if indices.dtype == np.bool_ else "")
    raise ValueError("labeled_indices must be a 1-D integer array of source indices, e.g. from "
                     "data_pipelines.subset.subset_indices; got dtype "
                     f"{indices.dtype}, shape {indices.shape}{hint}")
  indices = np.unique(indices.astype(np.int64))
  if indices.size and (indices[0] < 0 or indices[-1] >= num_records):
    raise ValueError(f"labeled_indices must lie in [0, {num_records}) (the source has "
                     f"{num_records} records); got values from {indices[0]} to {indices[-1]}")
  return indices


def make_multicrop_dataset(source: Any, *, batch_size: int,
                           global_ops: Sequence[ops_lib.Op] | str,
                           local_ops: Sequence[ops_lib.Op] | str | None, num_global: int = 2,
                           num_local: int = 4, seed: int,
                           labeled_indices: np.ndarray | None = None,
                           shard_index: int | None = None, shard_count: int | None = None,
                           num_epochs: int | None = None, num_channels: int = 3,
                           skip_bad_records: bool = False, worker_count: int = 0,
                           read_threads: int = 2,
                           prefetch_buffer_size: int = 64,
    max_bad_record_share: float = DEFAULT_MAX_BAD_RECORD_SHARE) -> grain.IterDataset:
  """The multi-crop pretraining pipeline (SwAV; Ghesu et al. 2022): global + local views.

  Same global stream, process slices, per-record seeding, bad-record counting and
  checkpointable iterator as `make_pretrain_dataset`; each record gives `num_global` views from `global_ops`
  and then `num_local` views from `local_ops` (e.g. `presets.get_multicrop_ops`), all from the
  record's own generator, so a resumed run sees the same crops.

  `labeled` marks the labeled part of a batch for the hybrid (contrastive + supervised) loss:
  with `labeled_indices`, 1.0 exactly for records whose SOURCE index is in it (the label
  fraction, e.g. `data_pipelines.subset.subset_indices(source, fraction, seed)`); without
  it, 1.0 for records whose label is not the unlabeled marker (label >= 0; all entries >= 0
  for multi-label). `label` is passed through as the source gives it either way: the loss must
  mask it with `labeled`.

  Args:
    source: random-access source (see `make_pretrain_dataset`).
    batch_size: records per batch on this process.
    global_ops: op list of the global views; must end at a fixed size G.
    local_ops: op list of the local views; must end at a fixed size L. May be None when
      num_local is 0.
    num_global: global views per record (>= 1; swapped prediction and NT-Xent need 2).
    num_local: local views per record (>= 0). With 0 the batches have NO `local_views` key
      (no empty (B, 0, ...) array): the loss then runs on global views only.
    seed: pipeline seed; the global order and every record's views derive from it.
    labeled_indices: 1-D integer array of source indices that count as labeled, or None.
    shard_index: this process (default jax.process_index()); see `make_pretrain_dataset`.
    shard_count: number of processes (default jax.process_count()).
    num_epochs: passes over the whole source; None repeats forever.
    num_channels: 3 repeats grayscale to RGB; 1 keeps one channel.
    skip_bad_records: as in `make_pretrain_dataset`.
    worker_count: Grain worker processes (0: augment in reader threads of this process).
    read_threads: threads reading and augmenting records in each process.
    prefetch_buffer_size: records prepared ahead per process.

  Returns:
    A Grain IterDataset; `iter()` gives a checkpointable iterator of dicts with
    `global_views` uint8 (B, num_global, G, G, C), `local_views` uint8 (B, num_local, L, L, C)
    (only when num_local > 0), `label` (B,) int32 or (B, K) float32, `labeled` (B,) float32
    in {0, 1}, `site` (B,) int32 and `skipped_records` (int).

  Raises:
    ValueError: bad view counts, sizes, shards or labeled_indices, or ops that do not fix the
      output size.
  """
  if num_global < 1:
    raise ValueError(f"num_global must be >= 1; got {num_global}")
  if num_local < 0:
    raise ValueError(f"num_local must be >= 0; got {num_local}")
  global_ops = _check_ops(global_ops, "make_multicrop_dataset (global_ops)")
  if num_local > 0:
    if local_ops is None:
      raise ValueError(f"make_multicrop_dataset: num_local={num_local} needs local_ops "
                       "(e.g. from presets.get_multicrop_ops); got None")
    local_ops = _check_ops(local_ops, "make_multicrop_dataset (local_ops)")
  else:
    local_ops = []
  if labeled_indices is not None:
    labeled_indices = _check_labeled_indices(labeled_indices, len(source))
  augment = _AugmentMultiCrop(global_ops, local_ops, num_global, num_local, num_channels,
                              labeled_indices)
  return _make_augmented_dataset(
      source, augment, batch_size=batch_size, seed=seed, shard_index=shard_index,
      shard_count=shard_count, num_epochs=num_epochs, skip_bad_records=skip_bad_records,
      worker_count=worker_count, read_threads=read_threads,
      prefetch_buffer_size=prefetch_buffer_size,
      max_bad_record_share=max_bad_record_share, reader_type=_IndexedRecordReader)


def make_train_dataset(source: Any, *, batch_size: int, ops: Sequence[ops_lib.Op] | str,
                       seed: int, shard_index: int | None = None, shard_count: int | None = None,
                       num_epochs: int | None = None, num_channels: int = 3,
                       skip_bad_records: bool = False, worker_count: int = 0,
                       read_threads: int = 2, prefetch_buffer_size: int = 64,
    max_bad_record_share: float = DEFAULT_MAX_BAD_RECORD_SHARE) -> grain.IterDataset:
  """The supervised fine-tuning pipeline: one augmented view per record.

  Args: as `make_pretrain_dataset`, without num_views.

  Returns:
    A Grain IterDataset of dicts with `image` uint8 (B, H, W, C), `label`, `site`,
    `skipped_records` (int), and `lung_mask` uint8 (B, H, W) when the source has masks.

  Raises:
    ValueError: bad sizes, shards, or ops that do not fix the output size.
  """
  ops = _check_ops(ops, "make_train_dataset")
  return _make_augmented_dataset(
      source, _AugmentOne(ops, num_channels), batch_size=batch_size, seed=seed,
      shard_index=shard_index, shard_count=shard_count, num_epochs=num_epochs,
      skip_bad_records=skip_bad_records, worker_count=worker_count, read_threads=read_threads,
      prefetch_buffer_size=prefetch_buffer_size,
      max_bad_record_share=max_bad_record_share)


def check_records(source: Any, *, skip_bad_records: bool = False,
                  max_bad_record_share: float = DEFAULT_MAX_BAD_RECORD_SHARE,
                  threads: int = 4) -> Any:
  """Reads every record of an evaluation source once, before any training time is spent.

  Evaluation never skips records on the fly (every record must count, and every process must
  see the same batches), so a bad file in a validation split used to stop the run at its first
  validation. Checking up front moves that failure to the start, or, with skip_bad_records,
  leaves the bad records out under the same policy as training.

  Args:
    source: random-access source.
    skip_bad_records: False: a bad record is an error naming it (and how many are bad). True:
      the bad records are logged, counted and left out.
    max_bad_record_share: with skip_bad_records, more bad records than this share is an error.
    threads: records read in parallel (decoding releases the GIL).

  Returns:
    `source` itself when every record reads, else a view without the bad ones (its
    `skipped` lists them as (record, reason)).

  Raises:
    BadRecordError: a bad record without skip_bad_records.
    TooManyBadRecordsError: more bad records than max_bad_record_share.
  """
  from concurrent import futures  # pylint: disable=g-import-not-at-top
  from data_pipelines.sources.base import IndexView  # pylint: disable=g-import-not-at-top
  max_bad_record_share = _check_max_bad_share(max_bad_record_share)

  def read(index: int) -> BadRecordError | None:
    try:
      source[index]
    except BadRecordError as error:
      return error
    return None

  with futures.ThreadPoolExecutor(max(1, threads)) as executor:
    errors = list(executor.map(read, range(len(source))))
  bad = [i for i, error in enumerate(errors) if error is not None]
  if not bad:
    return source
  name = str(getattr(source, "name", type(source).__name__))
  first = errors[bad[0]]
  if not skip_bad_records:
    raise BadRecordError(first.record, f"{first.reason} ({len(bad)} of the {len(source)} "
                         f"records of {name} are bad; found before training by checking the "
                         "evaluation split; fix them, or set data.skip_bad_records=True to "
                         "leave them out)")
  if len(bad) > max_bad_record_share * len(source):
    raise TooManyBadRecordsError(
        f"{name}: {len(bad)} of its {len(source)} records are bad ({len(bad) / len(source):.1%}),"
        f" more than data.max_bad_record_share={max_bad_record_share:g} allows; the first: "
        f"{first.record}: {first.reason}.")
  for i in bad[:_LOGGED_BAD_RECORDS]:
    logging.warning("Leaving bad record %s out of %s: %s", errors[i].record, name,
                    errors[i].reason)
  logging.warning("%s: %d of %d records are bad and left out of evaluation.", name, len(bad),
                  len(source))
  good = np.setdiff1d(np.arange(len(source)), bad)
  view = IndexView(source, good, name=name)
  view.skipped = list(getattr(source, "skipped", [])) + [
      (errors[i].record, errors[i].reason) for i in bad]
  return view


def num_eval_batches(num_records: int, batch_size: int, shard_count: int) -> int:
  """Batches every process runs in an eval pass: ceil(ceil(N / shard_count) / batch_size)."""
  return math.ceil(math.ceil(num_records / shard_count) / batch_size)


def make_eval_dataset(source: Any, *, batch_size: int, ops: Sequence[ops_lib.Op] | str,
                      shard_index: int | None = None, shard_count: int | None = None,
                      num_channels: int = 3, read_threads: int = 2) -> grain.IterDataset:
  """One deterministic pass over this process's shard, padded so all processes step together.

  Every process yields `num_eval_batches(len(source), batch_size, shard_count)` full batches;
  padding elements repeat the shard's first record with `valid` False. Concatenating the valid
  rows of all shards gives every record exactly once.

  Args:
    source: random-access source.
    batch_size: records per batch on this process.
    ops: eval op list (e.g. `presets.get_preset(name, "eval", size)`); must fix the size.
    shard_index: this process's shard (default jax.process_index()): records shard_index,
      shard_index + shard_count, ... (`shard_indices`).
    shard_count: number of shards (default jax.process_count()).
    num_channels: 3 (grey repeated to RGB) or 1.
    read_threads: threads reading and transforming records.

  Returns:
    A Grain IterDataset of dicts with `image` uint8 (B, H, W, C), `label`, `site` (B,) int32,
    `id` (B,) str, `valid` (B,) bool, and `lung_mask` when the source has masks.

  Raises:
    ValueError: bad sizes or shards, or ops that do not fix the output size. Bad records are
      never skipped in evaluation: their BadRecordError propagates.
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size (per process) must be positive; got {batch_size}")
  ops = _check_ops(ops, "make_eval_dataset")
  _check_not_empty(source)
  shard_index, shard_count = resolve_shard(shard_index, shard_count)
  indices = shard_indices(len(source), shard_index, shard_count)
  padded_length = num_eval_batches(len(source), batch_size, shard_count) * batch_size
  padded = np.concatenate([indices, np.full(padded_length - len(indices), indices[0])])
  dataset = (grain.MapDataset.source(_RecordReader(source, padded, skip_bad_records=False))
             .map_with_index(_EvalTransform(ops, num_channels, num_real=len(indices)))
             .batch(batch_size))
  return dataset.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                                   prefetch_buffer_size=2 * batch_size))


# ----------------------------------------------------------------------------------------
# GMML (group-masked image modelling) pretraining: a clean and a corrupted view per record.


def _check_intensity_only(ops: Sequence[ops_lib.Op], what: str) -> list[ops_lib.Op]:
  """The corrupted view's ops must keep the geometry: the clean view is its pixel target."""
  ops = ops_lib.parse_ops(ops)
  geometric = [op for op in ops if type(op).__module__ == ops_geometric.__name__]
  if geometric:
    raise ValueError(
        f"{what}: the corrupted view must have the clean view's geometry (the clean view is its "
        f"pixel-wise reconstruction target), so its ops must not move pixels; got geometric "
        f"ops {geometric}. Put crops and flips in clean_ops.")
  masking = [op for op in ops if isinstance(op, ops_masking.GroupMask)]
  if masking:
    raise ValueError(f"{what}: give the group mask through make_gmml_dataset's mask arguments "
                     f"(patch_size, coverage, ...), not as an op; got {masking}")
  return ops


class _AugmentGMML:
  """Record + rng -> clean view, corrupted view (same geometry), patch mask, fill kind.

  Draw order per record (fixed, so resume is exact): clean ops, corrupted-view intensity ops,
  group mask (target, groups, fill kind, donor offset, noise).
  """

  def __init__(self, clean_ops: Sequence[ops_lib.Op], corrupt_ops: Sequence[ops_lib.Op],
               mask_op: ops_masking.GroupMask, num_channels: int):
    self.clean_ops, self.corrupt_ops = list(clean_ops), list(corrupt_ops)
    self.mask_op, self.num_channels = mask_op, num_channels

  def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    if _BAD_RECORD in record:
      return record
    clean = ops_lib.apply_ops(self.clean_ops, _prepare_features(record, self.clean_ops), rng)
    # Masking runs on the source's own channels (grey noise on a grey image), before the
    # channel repetition; the corrupted view's ops see the clean image only.
    corrupted = ops_lib.apply_ops(self.corrupt_ops, {"image": clean["image"]}, rng)
    corrupted = self.mask_op(corrupted, rng)
    return {
        "clean": np.ascontiguousarray(ops_lib.set_channels(clean["image"], self.num_channels)),
        "corrupted": np.ascontiguousarray(
            ops_lib.set_channels(corrupted["image"], self.num_channels)),
        "mask": corrupted["gmml_mask"],
        "fill": corrupted["gmml_fill"],
        "gmml_donor_offset": corrupted["gmml_donor_offset"],
        **_metadata(record),
    }


class _FillFromOtherImages:
  """Batch -> batch: other-image fills copied from the donor's clean view (host, numpy)."""

  def __init__(self, patch_size: int):
    self.patch_size = patch_size

  def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
    batch = dict(batch)
    offsets = batch.pop("gmml_donor_offset")
    batch["corrupted"] = ops_masking.fill_from_other_images(
        batch["corrupted"], batch["clean"], batch["mask"], batch["fill"], offsets,
        self.patch_size)
    return batch


def make_gmml_dataset(source: Any, *, batch_size: int, clean_ops: Sequence[ops_lib.Op] | str,
                      corrupt_ops: Sequence[ops_lib.Op] | str, patch_size: int,
                      coverage: tuple[float, float] = (0.5, 0.75),
                      max_group_share: float = 0.3,
                      fill_shares: tuple[float, float, float] = (1.0, 0.0, 0.0),
                      noise: str = "uniform", seed: int, shard_index: int | None = None,
                      shard_count: int | None = None, num_epochs: int | None = None,
                      num_channels: int = 3, skip_bad_records: bool = False,
                      worker_count: int = 0, read_threads: int = 2,
                      prefetch_buffer_size: int = 64,
    max_bad_record_share: float = DEFAULT_MAX_BAD_RECORD_SHARE) -> grain.IterDataset:
  """The GMML pretraining pipeline: a clean view, and the same view corrupted by group masking.

  Per record: `clean_ops` (geometry + light intensity changes) give the clean view, the
  reconstruction target; `corrupt_ops` (intensity only: the geometry must stay the clean view's,
  otherwise the pixel target is undefined) then `ops_masking.GroupMask` give the corrupted
  view, the model's input. "other_image" fills are done per batch on the host after batching:
  the masked patches take the clean pixels of another record of the same PROCESS batch
  (`ops_masking.fill_from_other_images`), in the Grain workers when worker_count > 0. Host
  rather than device: it is one numpy select on data already in host memory (measured on this
  2-core CPU: 19 ms per 64-image 224 px batch with a third of the images filled from others,
  54 ms when all are, i.e. 0.3-0.8 ms per image against ~5 ms per image for the 224 px
  augmentations themselves), the jitted step stays a pure function of its input, a
  device-side donor from another shard of a sharded batch would need a collective permute
  of whole images, and the logged image grid shows exactly what the model saw.

  Same global stream, process slices, per-record seeding, bad-record counting and
  checkpointable iterator as `make_pretrain_dataset` (exact resume: a record's views, mask and
  donor offset come from its own generator; the donor is chosen from the batch position, which
  a resumed iterator reproduces). The one part that depends on the topology: an other-image
  fill's donor is a record of this process's batch, so with other processes (or another
  per-process batch size) an "other_image" row gets another donor; clean views, masks, fill
  kinds and noise or zero fills are the same on every topology.

  Args:
    source: random-access source (see `make_pretrain_dataset`).
    batch_size: records per batch on this process.
    clean_ops: op list of the clean view; must end at a fixed size divisible by patch_size.
    corrupt_ops: intensity-only op list applied to the clean view before masking (may be "").
    patch_size: the ViT patch size p; groups are made of whole p x p patches.
    coverage: (low, high) range of the per-image target masked fraction (uniform).
    max_group_share: a group's side is at most this share of the patch grid's side.
    fill_shares: relative shares of (noise, zeros, other_image) fills, one kind per image.
    noise: "uniform" or "gaussian" (see ops_masking).
    seed: pipeline seed; the global order and every record's views and mask derive from it.
    shard_index: this process (default jax.process_index()); see `make_pretrain_dataset`.
    shard_count: number of processes (default jax.process_count()).
    num_epochs: passes over the whole source; None repeats forever.
    num_channels: 3 repeats grayscale to RGB; 1 keeps one channel.
    skip_bad_records: as in `make_pretrain_dataset`.
    worker_count: Grain worker processes (0: augment in reader threads of this process).
    read_threads: threads reading and augmenting records in each process.
    prefetch_buffer_size: records prepared ahead per process.

  Returns:
    A Grain IterDataset; `iter()` gives a checkpointable iterator of dicts with `clean` uint8
    (B, H, W, C), `corrupted` uint8 (B, H, W, C), `mask` uint8 (B, H/p, W/p) (1 = masked
    patch), `fill` int8 (B,) (ops_masking.FILL_*), `label`, `site` (B,) int32 and
    `skipped_records` (int).

  Raises:
    ValueError: bad sizes, shards or mask settings, clean ops that do not fix the size, or
      corrupt ops that change the geometry.
  """
  clean_ops = _check_ops(clean_ops, "make_gmml_dataset (clean_ops)")
  corrupt_ops = _check_intensity_only(corrupt_ops, "make_gmml_dataset (corrupt_ops)")
  mask_op = ops_masking.GroupMask(patch_size=patch_size, coverage=tuple(coverage),
                                  max_group_share=max_group_share,
                                  fill_shares=tuple(fill_shares), noise=noise)
  return _make_augmented_dataset(
      source, _AugmentGMML(clean_ops, corrupt_ops, mask_op, num_channels),
      batch_size=batch_size, seed=seed, shard_index=shard_index, shard_count=shard_count,
      num_epochs=num_epochs, skip_bad_records=skip_bad_records, worker_count=worker_count,
      read_threads=read_threads, prefetch_buffer_size=prefetch_buffer_size,
      max_bad_record_share=max_bad_record_share,
      batch_transform=_FillFromOtherImages(patch_size))
