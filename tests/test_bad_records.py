"""Bounded bad-record skipping: a broken dataset stops the run with a clear error, never spins."""
import csv
import logging
import re

import numpy as np
import pytest

from data_pipelines import bad_records, pipeline
from tests.fakes import with_options
from data_pipelines.errors import BadRecordError, TooManyBadRecordsError
from data_pipelines.sources.folder import FolderSource

_OPS = "resize(8)"


def test_check_records_before_training(caplog):
  # A bad record in an evaluation split used to stop the run at its first validation, after
  # the training time was spent; checked up front it fails at once, or is left out and counted.
  source = MostlyGoodSource(50, bad={4, 30})
  with pytest.raises(BadRecordError, match=r"images/4.png: truncated PNG \(2 of the 50 records "
                     r"of tiny/train are bad"):
    bad_records.check_records(source)
  with caplog.at_level(logging.WARNING):
    view = bad_records.check_records(source, skip_bad_records=True)
  assert len(view) == 48 and 4 not in [int(view[i]["label"]) for i in range(48)]
  assert [r for r, _ in view.skipped] == ["images/4.png", "images/30.png"]
  assert any("2 of 50 records are bad and left out" in r.getMessage() for r in caplog.records)
  with pytest.raises(TooManyBadRecordsError, match=r"tiny/train: 2 of its 50 records are bad"):
    bad_records.check_records(source, skip_bad_records=True, max_bad_record_share=0.02)
  good = MostlyGoodSource(10)
  assert bad_records.check_records(good) is good


class MostlyGoodSource:
  """`num_records` records; those in `bad` raise BadRecordError. Counts every read."""

  name = "tiny/train"
  num_classes, multi_label, class_names, num_channels = 0, False, [], 1

  def __init__(self, num_records, bad=()):
    self.num_records, self.bad, self.reads = num_records, set(bad), 0
    self.labels = np.arange(num_records, dtype=np.int32)

  def __len__(self):
    return self.num_records

  def __getitem__(self, index):
    self.reads += 1
    if index in self.bad:
      raise BadRecordError(f"images/{index}.png", "truncated PNG")
    return {"image": np.full((10, 10, 1), index % 256, np.uint8), "label": np.int32(index),
            "id": str(index), "site": np.int32(0)}


def _iterate(source, **kwargs):
  defaults = dict(batch_size=4, ops=_OPS, seed=0, shard_index=0, shard_count=1,
                  skip_bad_records=True, read_threads=0, num_channels=1)
  return iter(pipeline.make_train_dataset(source, **with_options({**defaults, **kwargs})))


def test_all_bad_folder_manifest_stops_instead_of_spinning(tmp_path):
  # A folder manifest whose every file is missing used to loop forever
  # in the record-dropping stage, logging a warning per read.
  with open(tmp_path / "m.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["path", "label"])
    writer.writerows([[f"missing_{i}.png", i % 2] for i in range(30)])
  source = FolderSource(str(tmp_path), "m.csv", skip_bad_records=True)
  iterator = _iterate(source)
  with pytest.raises(TooManyBadRecordsError, match=r"m/?\S* .*30 of the 30 records read so far "
                     r"are bad \(100\.0%\).*max_bad_record_share=0\.1.*missing_"):
    next(iterator)


def test_whole_pass_without_a_good_record_stops_even_with_share_one():
  source = MostlyGoodSource(12, bad=range(12))
  with pytest.raises(TooManyBadRecordsError,
                     match=r"tiny/train: no readable record in 23 reads in a row .*12 records"):
    next(_iterate(source, max_bad_record_share=1.0))
  assert source.reads == 23  # 2 * 12 - 1: certainly one whole pass, and not more


def test_share_above_the_limit_stops_after_the_minimum_sample():
  bad = set(range(0, 300, 4))  # 25% bad
  source = MostlyGoodSource(300, bad=bad)
  iterator = _iterate(source)
  with pytest.raises(TooManyBadRecordsError,
                     match=r"tiny/train: (\d+) of the (\d+) records read") as e:
    while True:
      next(iterator)
  # Judged only once 200 records were read (not at the first bad one), well within the epoch.
  bad_count, read_count = map(int, re.search(r"(\d+) of the (\d+) records", str(e.value)).groups())
  assert 200 <= read_count < 250 and bad_count > 0.2 * read_count
  assert "images/" in str(e.value) and "truncated PNG" in str(e.value)


def test_share_below_the_limit_runs_and_counts_every_skip():
  bad = set(range(0, 300, 25))  # 4% bad
  source = MostlyGoodSource(300, bad=bad)
  batches = list(_iterate(source, num_epochs=2, batch_size=1))
  labels = np.concatenate([b["label"] for b in batches])
  assert len(labels) == 2 * (300 - len(bad)) and not set(labels.tolist()) & bad
  # batch_size 1: every bad read is followed by a good one except possibly at the very end.
  assert sum(b["skipped_records"] for b in batches) in (2 * len(bad) - 1, 2 * len(bad))


def test_the_limit_is_configurable_and_checked():
  source = MostlyGoodSource(40, bad=range(0, 40, 2))  # 50% bad
  batches = list(_iterate(source, num_epochs=1, batch_size=1, max_bad_record_share=0.6))
  assert len(batches) == 20
  with pytest.raises(ValueError, match=r"max_bad_record_share .* must be in \[0, 1\]; got 1.5"):
    _iterate(source, max_bad_record_share=1.5)


def test_bad_record_warnings_are_bounded(caplog):
  source = MostlyGoodSource(1000, bad=range(0, 1000, 20))  # 5% bad
  with caplog.at_level(logging.WARNING):
    batches = list(_iterate(source, num_epochs=1, batch_size=1))
  logged = [r.getMessage() for r in caplog.records if "Skipping bad record" in r.getMessage()]
  # 50 bad records: the first 10 one by one; the 100th would be next.
  assert len(batches) == 950
  assert len(logged) == 10
  assert "only every 100th is logged" in logged[-1]


def test_an_empty_source_is_named():
  with pytest.raises(ValueError, match=r"source tiny/train has no records"):
    _iterate(MostlyGoodSource(0))
  with pytest.raises(ValueError, match=r"source tiny/train has no records"):
    pipeline.make_eval_dataset(MostlyGoodSource(0), batch_size=2, ops=_OPS, shard_index=0,
                               shard_count=1)


def test_bad_validation_file_stops_fine_tuning_before_training(tmp_path):
  # A bad image in the validation split crashed the run at its first
  # validation, after the training time was spent. Now it is found before anything is built.
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from configs import finetune  # pylint: disable=g-import-not-at-top
  from remedis_jax import train_finetune  # pylint: disable=g-import-not-at-top
  rows = []
  for i in range(12):
    split = "train" if i < 8 else ("val" if i < 10 else "test")
    if i != 9:
      Image.fromarray(np.full((16, 16), 20 * i, np.uint8)).save(tmp_path / f"{i}.png")
    rows.append(f"{i}.png,{i % 2},{split}")
  (tmp_path / "m.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
  config = finetune.get_config("folder")
  config.data.root, config.data.manifest = str(tmp_path), "m.csv"
  config.test_sets = ("test",)
  workdir = tmp_path / "run"
  with pytest.raises(BadRecordError, match=r"9.png: .*\(1 of the 2 records of m/val are bad; "
                     r"found before training"):
    train_finetune.train_and_evaluate(config, str(workdir))
  assert not (workdir / "checkpoints").exists()
