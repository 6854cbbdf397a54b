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
