r"""The converter as an Apache Beam pipeline: the same shards, on this machine's cores or a cluster.

  python -m data_pipelines.convert --source=folder --root=/data/cxr --manifest=train.csv \
      --split=train --out=gs://bucket/cxr_ar --num_shards=64 --decode_size=448 \
      --beam_pipeline_options=direct_num_workers=2,direct_running_mode=multi_processing

The same command with `runner=DataflowRunner,project=...,region=...,temp_location=gs://...`
(or a Flink / Spark runner) runs on a cluster; docs/convert_at_scale.md has the worker set-up.

One shard is one work item. A worker rebuilds the source from the data config (cached per
worker), encodes the shard's index range into a local temporary ArrayRecord file and moves it to
the output (`convert.encode_shard`, `storage.put_file`): the output may be a local folder or a
gs:// bucket, a shard appears at its name only complete, and a retried shard writes the same
bytes under the same name. Every shard reports its ids, labels, sites and bad records; one last
step gathers the reports and writes the split's JSON and index once (`convert.write_side_files`).
The output is byte for byte the records, index and JSON of the single-process converter (apart
from the per-shard timings and writers in the JSON).

Runner. Without `runner=` (or with `runner=DirectRunner`) this runs Beam's FnApiRunner, in this
process or in `direct_num_workers` worker processes (`direct_running_mode=multi_processing`).
Beam's DirectRunner would first try its Prism runner, which downloads a binary: on a machine
without network (or a cluster's locked-down driver) that means waiting for a failure.

Bad records are skipped and counted as in the single process (`--strict` fails on the first);
more than `max_bad_record_share` of the split fails the pipeline when the side files would be
written. Any other failure of a shard fails the pipeline, naming the shard's index range and the
error. Counters (Beam Metrics, namespace `remedis_convert`): records_written, records_skipped,
bytes_written, shards_written.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from data_pipelines import convert, storage
from data_pipelines.sources import build_source

METRICS_NAMESPACE = "remedis_convert"
# Runner names that mean "this machine": run on the FnApiRunner, named explicitly.
_LOCAL_RUNNERS = (None, "", "DirectRunner", "FnApiRunner")


class ShardFailedError(RuntimeError):
  """A shard failed for a reason other than a skipped bad record; names its index range."""


def parse_pipeline_options(options: str | Sequence[str]) -> list[str]:
  """Beam pipeline options as command-line flags.

  Args:
    options: "key=value,key=value" (the converter's --beam_pipeline_options; a key may repeat,
      e.g. experiments=a,experiments=b), or a list of "--key=value" / "key=value" strings.

  Returns:
    ["--key=value", ...].

  Raises:
    ValueError: an entry without '=', or an option no Beam options class defines (a typo would
      otherwise be dropped with a warning and the pipeline run without it).
  """
  entries = options.split(",") if isinstance(options, str) else list(options)
  flags = []
  for entry in (e.strip() for e in entries):
    if not entry:
      continue
    if "=" not in entry:
      raise ValueError(f"Beam pipeline option {entry!r} is not key=value (e.g. "
                       "direct_num_workers=2); --beam_pipeline_options is a comma-separated "
                       "list of them")
    flags.append(entry if entry.startswith("--") else f"--{entry}")
  known = set(PipelineOptions([]).get_all_options())
  unknown = sorted({f[2:].split("=", 1)[0] for f in flags} - known)
  if unknown:
    raise ValueError(f"unknown Beam pipeline option(s) {', '.join(unknown)} in "
                     f"--beam_pipeline_options; e.g. runner, direct_num_workers, "
                     "direct_running_mode, project, region, temp_location, setup_file")
  return flags


def make_pipeline(options: str | Sequence[str]) -> tuple[beam.Pipeline, str]:
  """A Pipeline for `options`, and the name of its runner.

  Without a runner (or DirectRunner) the FnApiRunner is named explicitly, so that nothing is
  downloaded (see the module docstring); any other runner is Beam's to build.
  """
  pipeline_options = PipelineOptions(parse_pipeline_options(options))
  runner_name = pipeline_options.view_as(StandardOptions).runner
  if runner_name in _LOCAL_RUNNERS:
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    return beam.Pipeline(runner=fn_runner.FnApiRunner(), options=pipeline_options), "FnApiRunner"
  return beam.Pipeline(options=pipeline_options), str(runner_name)


def _print(line: str) -> None:
  print(line, flush=True)


class WriteShard(beam.DoFn):
  """(shard, start, stop) -> the shard written under `out`, and its report."""

  def __init__(self, data_config, split: str, out: str, num_shards: int, strict: bool):
    self._data_config = data_config
    self._split = split
    self._out = out
    self._num_shards = num_shards
    self._strict = strict
    self._source = None
    self._written = Metrics.counter(METRICS_NAMESPACE, "records_written")
    self._skipped = Metrics.counter(METRICS_NAMESPACE, "records_skipped")
    self._bytes = Metrics.counter(METRICS_NAMESPACE, "bytes_written")
    self._shards = Metrics.counter(METRICS_NAMESPACE, "shards_written")

  def setup(self):
    self._source = None  # Built at the first shard (an error then names that shard).

  def process(self, item: tuple[int, int, int]):
    shard, start, stop = item
    try:
      if self._source is None:
        self._source = build_source(self._data_config, self._split)
      report = convert.encode_shard(self._source, self._split, self._out, shard,
                                    self._num_shards, start, stop, strict=self._strict,
                                    progress=_print)
    except Exception as e:  # pylint: disable=broad-except
      raise ShardFailedError(
          f"{self._split} shard {shard + 1}/{self._num_shards} (records {start}..{stop - 1}) "
          f"for {self._out} failed: {type(e).__name__}: {e}") from e
    self._written.inc(report["count"])
    self._skipped.inc(len(report["skipped"]))
    self._bytes.inc(report["bytes"])
    self._shards.inc()
    yield report


def _write_side_files(reports: list[dict[str, Any]], **kwargs) -> str:
  info = convert.write_side_files(reports=reports, **kwargs)
  return f"{info['count']} records, {info['num_skipped']} skipped"


def convert_with_beam(data_config, split: str, out: str, num_shards: int = 1, *,
                      pipeline_options: str | Sequence[str] = "", strict: bool = False,
                      limit: int = 0, log: Callable[[str], None] = print,
                      max_bad_record_share: float = convert.DEFAULT_MAX_BAD_RECORD_SHARE
                      ) -> dict[str, Any]:
  """`convert.convert` as a Beam pipeline: one work item per shard, on any runner.

  Args:
    data_config: the `data` config section (see default_data_config); every worker rebuilds
      the source from it, so its paths must be readable there (a bucket, a shared file system).
    split: split to convert.
    out: output folder, local or a URL (gs://).
    num_shards: number of shards, i.e. of work items (more shards than workers balances load).
    pipeline_options: Beam options, "key=value,..." or a list (see parse_pipeline_options).
    strict: fail on the first bad record.
    limit: convert only the first `limit` records (0 = all).
    log: where this process prints (workers print their shards' progress themselves).
    max_bad_record_share: more bad records than this share of the split fails the pipeline.

  Returns:
    The JSON info written next to the shards, and under "counters" the pipeline's counters.

  Raises:
    ValueError: bad pipeline options or num_shards.
    Exception: what the runner raises for a failed pipeline; its message holds the failing
      shard's index range and error (ShardFailedError), or the bad-record share
      (TooManyBadRecordsError).
  """
  data_config = convert.conversion_config(data_config)
  pipeline, runner = make_pipeline(pipeline_options)
  # The driver builds the source once for its length, metadata and bad manifest rows; a
  # folder's manifest is read, no image is opened.
  source = build_source(data_config, split)
  total = len(source) if not limit else min(limit, len(source))
  ranges = convert.shard_ranges(total, num_shards)
  convert.prepare_output(out, split)
  items = [(k, start, stop) for k, (start, stop) in enumerate(ranges)]
  side_files = dict(out=out, split=split, info=convert.source_info(source),
                    earlier_skipped=list(getattr(source, "skipped", [])),
                    data_source=str(data_config.get("source", "")),
                    max_bad_record_share=max_bad_record_share)
  log(f"{split} of {source.name}: {total} records in {len(ranges)} shards to {out} on Beam's "
      f"{runner}")
  began = time.time()
  reports = (pipeline
             | "Shards" >> beam.Create(items)
             # One shard per work item, spread over the workers (Create alone may keep them
             # in one bundle).
             | "Spread" >> beam.Reshuffle()
             | "Encode" >> beam.ParDo(WriteShard(data_config, split, out, len(ranges), strict)))
  _ = (reports
       | "Gather" >> beam.combiners.ToList()
       | "SideFiles" >> beam.Map(_write_side_files, **side_files))
  result = pipeline.run()
  result.wait_until_finish()
  counters = {}
  for counter in result.metrics().query(
      MetricsFilter().with_namespace(METRICS_NAMESPACE))["counters"]:
    value = counter.committed if counter.committed is not None else counter.attempted
    counters[counter.key.metric.name] = counters.get(counter.key.metric.name, 0) + int(value)
  info = storage.read_json(storage.join(out, f"{split}.json"))
  info["counters"] = counters
  log(f"done: {split} of {source.name}: {info['count']} records in {len(ranges)} shards at "
      f"{out}, {info['num_skipped']} bad records skipped, {time.time() - began:.1f} s; "
      f"counters: {counters}")
  return info
