"""Fakes and config helpers the tests share.

- `IndexSource`: in-memory records of random images whose label is the record index, for the
  input pipelines (sharding, seeding, resume, bad records).
- `LabelSource`: a source that is only a label array (records hold a label and an id), for
  subset sampling and evaluator banks.
- `smoke_config`: a trainer config's `:smoke` variant on one device with dotted overrides.
- `with_options`: pipeline-factory keyword arguments with the stream options gathered.
- `take`, `assert_batches_equal`: the next batches of an iterator; two lists of them compared.
- `fake_run_workdir`: a finished fine-tuning or pretraining workdir holding given parameters.
- `random_bit_params`, `max_relative_difference`: the exports' exactness tests.
"""

import importlib

import ml_collections
import numpy as np

from configs import common
from data_pipelines.errors import BadRecordError
from data_pipelines.sources.base import Source

MASKS = (None, "top_half", "random")


class IndexSource:
  """In-memory records in the record format; label = record index, so every position of a
  stream can be traced.

  Record i: an image drawn from `np.random.default_rng(i)` of shape (size[0] + i % size_cycle[0],
  size[1] + i % size_cycle[1], channels) (sizes vary per record), values in [0, 256) for uint8
  and [0, 4096) otherwise; label i (-1 for the indices in `unlabeled`); id "r<i>"; site
  i % num_sites. Records in `bad` raise BadRecordError; `raised` counts them (exact when read
  in-process, read_threads=0).

  Args:
    num_records: how many records.
    size: the smallest (height, width).
    size_cycle: the height and width grow by i % size_cycle.
    channels: image channels.
    dtype: image dtype.
    num_sites: site = i % num_sites.
    bad: indices that raise BadRecordError("images/<i>.png", "truncated PNG").
    unlabeled: indices whose label is -1.
    mask: None; "top_half" (a lung_mask of ones in the top half); "random" (a lung_mask of
      uniform draws > 0.5 from the record's generator, after the image).
    name: the source's `name` (what the pipeline's messages call it); None: no such attribute.
  """

  def __init__(self, num_records, *, size=(20, 24), size_cycle=(7, 5), channels=1,
               dtype=np.uint8, num_sites=3, bad=(), unlabeled=(), mask=None, name=None):
    if mask not in MASKS:
      raise ValueError(f"mask={mask!r}; expected one of {MASKS}")
    self.num_records, self.size, self.size_cycle = num_records, tuple(size), tuple(size_cycle)
    self.channels, self.dtype, self.num_sites = channels, dtype, num_sites
    self.bad, self.unlabeled, self.mask = set(bad), set(unlabeled), mask
    if name is not None:
      self.name = name
    self.raised = 0

  def __len__(self):
    return self.num_records

  def __getitem__(self, index):
    if index in self.bad:
      self.raised += 1
      raise BadRecordError(f"images/{index}.png", "truncated PNG")
    rng = np.random.default_rng(index)
    height = self.size[0] + index % self.size_cycle[0]
    width = self.size[1] + index % self.size_cycle[1]
    high = 256 if self.dtype == np.uint8 else 4096
    record = {"image": rng.integers(0, high, (height, width, self.channels)).astype(self.dtype),
              "label": np.int32(-1 if index in self.unlabeled else index), "id": f"r{index}",
              "site": np.int32(index % self.num_sites)}
    if self.mask == "top_half":
      mask = np.zeros((height, width), np.uint8)
      mask[: height // 2] = 1
      record["lung_mask"] = mask
    elif self.mask == "random":
      record["lung_mask"] = (rng.random((height, width)) > 0.5).astype(np.uint8)
    return record


class LabelSource(Source):
  """A source that is just a label array (its images are never read)."""

  def __init__(self, labels, multi_label=False, num_classes=None, names=None):
    self._labels = np.asarray(labels)
    self.multi_label = multi_label
    self.num_classes = (self._labels.shape[1] if multi_label
                        else num_classes or int(self._labels.max()) + 1)
    self.class_names = names or [f"c{i}" for i in range(self.num_classes)]
    self.name = "array"
    self.num_channels = 1
    self.skipped = []

  @property
  def labels(self):
    return self._labels

  @property
  def ids(self):
    return [f"r{i}" for i in range(len(self._labels))]

  def __len__(self):
    return len(self._labels)

  def __getitem__(self, i):
    return {"label": self._labels[i], "id": f"r{i}"}


def smoke_config(config_module: str, variant: str = "smoke", *, devices: int = 1,
                 **overrides) -> ml_collections.ConfigDict:
  """`configs/<config_module>.py:<variant>` on `devices` devices with dotted `overrides`
  (`configs.common.override`: an unknown key is an error)."""
  module = importlib.import_module(f"configs.{config_module}")
  config = module.get_config(variant)
  return common.override(config, {"mesh.devices": devices, **overrides})


def with_options(kwargs):
  """A pipeline factory's keyword arguments with the `StreamOptions` fields among `kwargs`
  (seed, shard_index, num_channels, skip_bad_records, ...) gathered into `options`."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from data_pipelines import stream  # pylint: disable=g-import-not-at-top
  fields = {field.name for field in dataclasses.fields(stream.StreamOptions)}
  options = {k: v for k, v in kwargs.items() if k in fields}
  rest = {k: v for k, v in kwargs.items() if k not in fields}
  return {**rest, "options": stream.StreamOptions(**options)}


def take(iterator, count):
  """The next `count` batches of `iterator`."""
  return [next(iterator) for _ in range(count)]


def assert_batches_equal(first, second):
  """Two lists of batches hold the same keys and bit-identical arrays."""
  assert len(first) == len(second)
  for a, b in zip(first, second):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
def fake_run_workdir(path, parts, *, trainer="finetune", model=None, data=None, results=None,
                     step=7):
  """A training workdir as the trainers leave it, with `parts` ({"encoder", ...}) as its params.

  trainer="finetune": config.json, results.json and the best/ checkpoint of a finished
  fine-tuning run; any other trainer: config.json and checkpoints/ of a pretraining run.
  """
  import json  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  from remedis_jax import checkpointing, export  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path)
  path.mkdir(parents=True)
  config = {"trainer": trainer,
            "model": {"name": "R_micro", "stem": "bit", "head_hidden_dims": [16],
                      "projection_dim": 8, "head_norm": "layer", "from_head_layer": False,
                      **(model or {})},
            "data": {"image_size": 32, "num_channels": 3, "source": "synthetic",
                     "train_split": "train", **(data or {})}}
  (path / export.RUN_CONFIG_FILE).write_text(json.dumps(config))
  state = {"step": np.int32(step), "params": parts}
  folder = path
  if trainer == "finetune":
    folder = path / export.BEST_DIR
    state["value"] = np.float32(0.5)
    (path / "results.json").write_text(json.dumps(results or {}))
  manager = checkpointing.make_manager(str(folder), asynchronous=False, with_data=False)
  checkpointing.save(manager, step, state, force=True)
  manager.close()
  return str(path)


def random_bit_params(name, seed=0, channels=3):
  """Random parameters for BiT `name` (GroupNorm scales and offsets away from 1 and 0 too)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from remedis_jax import models  # pylint: disable=g-import-not-at-top
  abstract = jax.eval_shape(models.create_model(name).init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 32, 32, channels), jnp.float32))["params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: rng.normal(1.0 if a.ndim == 1 else 0.0, 0.2, a.shape)
                      .astype(np.float32), abstract)


def max_relative_difference(actual, expected):
  """max |actual - expected| / max |expected|: per-element ratios are meaningless for features
  near zero (ReLU, then the average)."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def read_tensorboard_events(logdir):
  """TensorBoard's own reader over the event files in `logdir` (an EventAccumulator, loaded).

  TensorFlow is hidden while it loads, as in the runtime users install: TensorBoard's reader
  imports TensorFlow whenever it is installed (the dev extra has it, for the SavedModel test's
  child process), and TensorFlow loaded before timm in the same process aborts it ("LLVM ERROR:
  inconsistency in registered CommandLine options"; tests/test_export_timm.py). With the
  `tensorflow` entry None, `import tensorflow` fails and TensorBoard takes its own file reader.
  """
  import sys  # pylint: disable=g-import-not-at-top
  missing = object()
  previous = sys.modules.get("tensorflow", missing)
  if previous is missing:
    sys.modules["tensorflow"] = None
  try:
    from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=all
    accumulator = event_accumulator.EventAccumulator(
        str(logdir), size_guidance={event_accumulator.TENSORS: 0})
    accumulator.Reload()
  finally:
    if previous is missing:
      del sys.modules["tensorflow"]
  return accumulator
