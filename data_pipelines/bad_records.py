"""Bad records: read, mark, drop and count them, and stop when there are too many.

A source raises `BadRecordError` (naming the record and the reason) for a file it cannot read.
In training, `RecordReader` turns it into a marker element (with `skip_bad_records`; without,
it propagates and stops the run), and `DropBadRecordsIterDataset` drops the markers after the
records are read, so that every kept element carries how many were dropped just before it: the
batch's `skipped_records`, summed by the trainers and saved with their checkpoints. Evaluation
never skips on the fly (every record must count, and every process must see the same batches):
`check_records` reads an evaluation source once, up front, and leaves the bad records out
under the same policy, or fails at the start instead of at the first validation.

Bounded skipping: skipping is for the odd broken file, not for a broken dataset. Once a
process has read `min(200, N)` records, more than `max_bad_record_share` of them bad
(default 10%; counted per process, or per worker process, since the start of this run) stops
the run with a `TooManyBadRecordsError` naming the source, the counts and the last bad record;
2N - 1 reads in a row without a good record stop it whatever the share limit (one process
then has read at least one whole epoch; each of P processes, its slices of about 2P epochs).
Bad records are logged one by one up to 10 per process, then every 100th. Skipped-record
counts travel with the elements, so they survive Grain's worker processes; a bad record read
after the last good one of a finite stream is logged but not counted (no batch follows it).
"""
from __future__ import annotations

from concurrent import futures
import logging
from typing import Any

import grain
import numpy as np

from data_pipelines.errors import BadRecordError, TooManyBadRecordsError

# Marks a record that failed to read; such elements never reach a batch.
BAD_RECORD = "_bad_record"
# The record's index in the source, added by IndexedRecordReader (never reaches a batch).
SOURCE_INDEX = "_source_index"
# The largest share of bad records a run skips before it stops (config.data.max_bad_record_share).
DEFAULT_MAX_BAD_RECORD_SHARE = 0.1
# The share is judged once this many records (or N, if smaller) were read.
_MIN_RECORDS_FOR_SHARE = 200
# Bad records logged one by one per process before only every 100th is.
_LOGGED_BAD_RECORDS = 10


class RecordReader:
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
      return {BAD_RECORD: f"{error.record}: {error.reason}"}


class IndexedRecordReader(RecordReader):
  """A RecordReader whose good records also carry their source index (for `labeled`)."""

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = super().__getitem__(index)
    if BAD_RECORD in record:
      return record
    return {**record, SOURCE_INDEX: int(self._indices[index])}


class DropBadRecordsIterDataset(grain.IterDataset):
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
      if BAD_RECORD in element:
        skipped += 1
        self._bad += 1
        self._bad_in_a_row += 1
        self._check(element[BAD_RECORD])
        continue
      self._bad_in_a_row = 0
      element["skipped_records"] = np.int32(skipped)
      return element

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state)


def check_max_bad_share(max_bad_record_share: float) -> float:
  share = float(max_bad_record_share)
  if not 0.0 <= share <= 1.0:
    raise ValueError("max_bad_record_share (config.data.max_bad_record_share) must be in "
                     f"[0, 1]; got {max_bad_record_share}")
  return share


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
  from data_pipelines.sources.base import IndexView  # pylint: disable=g-import-not-at-top
  max_bad_record_share = check_max_bad_share(max_bad_record_share)

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
