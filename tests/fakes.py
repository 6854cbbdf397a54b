"""Fakes and config helpers the tests share.

- `LabelSource`: a source that is only a label array (records hold a label and an id), for
  subset sampling and evaluator banks.
- `smoke_config`: a trainer config's `:smoke` variant on one device with dotted overrides.
- `with_options`: pipeline-factory keyword arguments with the stream options gathered.
"""

import importlib

import ml_collections
import numpy as np

from configs import common
from data_pipelines.sources.base import Source


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
