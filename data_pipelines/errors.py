"""Errors shared by the data sources and the pipeline."""


class BadRecordError(ValueError):
  """A single record (image file, array entry, row) that cannot be turned into an example.

  Sources raise it from `__getitem__`; the pipeline either lets it propagate (the default:
  fail fast) or, with `skip_bad_records=True`, drops the record and counts it.

  Attributes:
    record: what identifies the record for a human (a file path, "train_images[17]", ...).
    reason: why it is bad, in words ("truncated PNG", "label 7 outside classes 0..1").
  """

  def __init__(self, record: str, reason: str):
    self.record = record
    self.reason = reason
    super().__init__(f"{record}: {reason}")

  def __reduce__(self):  # Survives pickling across Grain worker processes.
    return (type(self), (self.record, self.reason))


class TooManyBadRecordsError(RuntimeError):
  """More records of a source are bad than `data.max_bad_record_share` allows.

  Raised by the pipeline instead of skipping on and on (a folder whose every file is broken
  would otherwise spin forever). It names the source, the counts and the last bad record.
  """

  def __init__(self, message: str):
    self.message = message
    super().__init__(message)

  def __reduce__(self):  # Survives pickling across Grain worker processes.
    return (type(self), (self.message,))
