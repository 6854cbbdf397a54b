"""Test sets of a supervised run: a split of its own data, or a split of another dataset.

`config.test_sets` names them ('split', 'name=split', 'name=split@sites' for the synthetic
source's sites, 'name=split@SOURCE:LOCATION[;key=value...]' for another dataset, e.g. another
hospital's MedMNIST-layout file). Another dataset is read with the run's own evaluation
preprocessing (image size, channels, eval ops) and checked against the run before anything
trains: its labels against the run's classes, its image size and channels against what the run
takes. Fine-tuning, segmentation and experiments/evaluate_run.py read test sets through here.
"""

from __future__ import annotations

import os
import re
from typing import Any, NamedTuple, Sequence

import numpy as np

from data_pipelines import bad_records, pipeline
from data_pipelines import sources as data_sources
from data_pipelines import storage
from remedis_jax import supervised


class TestSet(NamedTuple):
  """One test set: a split of the run's data (`sites`: of those synthetic sites), or a split of
  another dataset (`data`: the (key, value) pairs that replace the run's data keys)."""
  name: str
  split: str
  sites: str = ""  # "" = the data config's own sites for that split
  data: tuple[tuple[str, Any], ...] = ()  # () = the run's own data


class Task(NamedTuple):
  """What the run classifies (results.json "task"): another dataset must have the same."""
  num_classes: int
  multi_label: bool
  class_names: list[str]


# Another dataset as a test set: its kind -> the data key that says where it is.
OTHER_DATASET_LOCATION = data_sources.OTHER_DATASET_LOCATION
# What a test set of another dataset may set: where it is and how its files are laid out. Every
# other data key -- image size, channels, eval ops, bit depth, decode size -- is the run's.
OTHER_DATASET_KEYS = ("path", "manifest", "root", "tfds_name", "data_dir", "image_column",
                      "label_columns", "classes", "patient_column", "split_column",
                      "split_fractions", "split_seed", "site_column", "mask_column", "image_key",
                      "label_key")
TEST_SET_FORMS = ("'split', 'name=split', 'name=split@sites' (sites of the synthetic source) or "
                  "'name=split@SOURCE:LOCATION[;key=value...]' (another dataset: SOURCE one of "
                  f"{', '.join(OTHER_DATASET_LOCATION)}; LOCATION its data.path, for folder its "
                  "data.manifest, for tfds its data.tfds_name)")


def other_dataset(name: str, split: str, data: dict[str, Any], what: str) -> TestSet:
  """A test set reading `split` of another dataset, read as the run reads its own.

  Args:
    name: the test set's name; "" = "<the dataset's file name without extension>_<split>".
    split: the split of that dataset ("test", "all" for a folder without splits, ...).
    data: `source` (one of OTHER_DATASET_LOCATION), its location key and any other
      OTHER_DATASET_KEYS; a folder's `root` defaults to the manifest's folder.
    what: where the user wrote it, for error messages.

  Raises:
    ValueError: an unknown source, no location, or a key that is not the dataset's to set.
  """
  data = dict(data)
  source = data.get("source", "")
  if source not in OTHER_DATASET_LOCATION:
    raise ValueError(f"{what}: source {source!r} cannot be read as another dataset; expected one "
                     f"of {', '.join(OTHER_DATASET_LOCATION)}")
  unknown = sorted(set(data) - {"source"} - set(OTHER_DATASET_KEYS))
  if unknown:
    raise ValueError(f"{what}: {', '.join(unknown)} cannot be set for another dataset: its image "
                     "size, channels and eval ops are the run's. Keys it may set: "
                     f"{', '.join(OTHER_DATASET_KEYS)}")
  location_key = OTHER_DATASET_LOCATION[source]
  location = str(data.get(location_key) or "").strip()
  if not location:
    raise ValueError(f"{what}: source {source!r} needs data.{location_key} (where the dataset is)")
  if "split_seed" in data:
    try:
      data["split_seed"] = int(data["split_seed"])
    except ValueError:
      raise ValueError(f"{what}: split_seed={data['split_seed']!r} is not an integer") from None
  if source == "folder" and not data.get("root"):
    data["root"] = storage.dirname(location)  # image paths relative to the manifest
  if not name:
    stem = os.path.splitext(storage.basename(location.rstrip("/")))[0]
    name = f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', stem)}_{split}"
  return TestSet(name, split, "", tuple(sorted(data.items())))


def _parse_other_dataset(spec: str, kind: str, rest: str) -> dict[str, Any]:
  """"SOURCE" + ":LOCATION;key=value;..." of a config.test_sets entry -> data keys."""
  location, *options = rest.split(";")
  data = {"source": kind.strip(), OTHER_DATASET_LOCATION.get(kind.strip(), "path"):
          location.strip()}
  for option in options:
    key, equals, value = option.partition("=")
    key = key.strip()
    if not option.strip():
      continue
    if not equals or not key:
      raise ValueError(f"config.test_sets entry {spec!r}: option {option!r} is not key=value")
    if key in data:
      raise ValueError(f"config.test_sets entry {spec!r} sets {key} twice")
    data[key] = value.strip()
  return data


def parse_test_sets(specs, source: str) -> list[TestSet]:
  """`("name=split@sites", "split", "name=split@medmnist:FILE", ...)` -> TestSets (forms in
  TEST_SET_FORMS and configs/finetune.py).

  Raises:
    ValueError: empty list, a malformed or duplicate entry (naming it and the forms), sites
      with a non-synthetic source, or another dataset that `other_dataset` refuses.
  """
  if isinstance(specs, str):
    specs = [s for s in specs.split(",")]
  specs = [str(s).strip() for s in specs if str(s).strip()]
  if not specs:
    raise ValueError("config.test_sets is empty; give at least one, e.g. ('test',) or "
                     "('in_distribution=test@A', 'site_B=test@B')")
  test_sets = []
  for spec in specs:
    head, _, where = spec.partition("@")
    name, _, split = head.rpartition("=")
    name, split, where = name.strip(), split.strip(), where.strip()
    if not split:
      raise ValueError(f"config.test_sets entry {spec!r} has no split; expected {TEST_SET_FORMS}")
    kind, colon, rest = where.partition(":")
    if colon:
      test_sets.append(other_dataset(name, split, _parse_other_dataset(spec, kind, rest),
                                     what=f"config.test_sets entry {spec!r}"))
      continue
    if where and source != "synthetic":
      raise ValueError(f"config.test_sets entry {spec!r}: '@sites' selects sites of the "
                       f"synthetic source only; data.source is {source!r}. Expected "
                       f"{TEST_SET_FORMS}")
    name = name or (f"{split}_{where.replace(',', '')}" if where else split)
    test_sets.append(TestSet(name, split, where))
  names = [t.name for t in test_sets]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise ValueError(f"config.test_sets has duplicate names {duplicates}; name them "
                     "'name=split@sites'")
  return test_sets


def check_other_dataset_exists(test_set: TestSet) -> None:
  """Fails fast when another dataset's file or folder is missing (before a workdir is made).

  Raises:
    FileNotFoundError: naming the test set and the path.
  """
  data = dict(test_set.data)
  kind = data.get("source")
  if kind not in ("medmnist", "folder", "array_record"):
    return
  location = data[OTHER_DATASET_LOCATION[kind]]
  candidates = [location]
  if kind == "folder":  # a relative manifest is also looked up under the root
    candidates.append(storage.join(data["root"], location))
  if kind == "array_record" and any(c in location for c in "*?["):
    found = bool(storage.glob(location))
  else:
    found = any(storage.exists(c) for c in candidates)
  if not found:
    raise FileNotFoundError(f"test set {test_set.name!r}: {location} does not exist "
                            f"(data.{OTHER_DATASET_LOCATION[kind]} of its {kind} dataset)")


def data_config_for(config, test_set: TestSet) -> dict[str, Any]:
  """The data config a test set is read with: the run's, with the synthetic sites of its split
  or another dataset's keys replaced (image size, channels and eval ops stay the run's)."""
  data = config.data.to_dict()
  if test_set.sites:
    data["sites"] = dict(data["sites"], **{test_set.split: test_set.sites})
  data.update(test_set.data)
  return data


def build_test_source(config, test_set: TestSet, task: Task | None = None):
  """The source of one test set (`data_config_for`); another dataset's is checked against the
  run first (`check_other_dataset`; its labels only when `task` is given)."""
  data = data_config_for(config, test_set)
  source = data_sources.build_source(data, test_set.split)
  if test_set.data:
    source = check_other_dataset(source, config, data, test_set.split, task)
  return source


def _dataset_fields(source, data: dict[str, Any], split: str) -> tuple[str, str, str]:
  """(file, image field, label field) of another dataset, as its error messages name them."""
  kind = data["source"]
  if kind == "medmnist":
    return data["path"], f"'{split}_images'", f"'{split}_labels'"
  if kind == "folder":
    manifest = getattr(getattr(source, "parent", source), "manifest", data["manifest"])
    return (manifest, f"column '{data['image_column']}' (data.image_column)",
            f"column(s) '{data['label_columns']}' (data.label_columns)")
  if kind == "array_record":
    return data["path"], "the records' 'image'", "the records' 'label'"
  return (f"TFDS dataset {data['tfds_name']}", f"feature '{data['image_key']}'",
          f"feature '{data['label_key']}'")


def check_other_dataset(source, config, data: dict[str, Any], split: str,
                        task: Task | None):
  """Checks, before any model runs, that the run can take another dataset's records.

  Each failure names the file and the field:
    * labels (with `task`): the run's kind (one class id per record, or K 0/1 columns), every
      class id below K, at least one label, and declared class names equal to the run's;
    * channels: grey (repeated, as the run's pipeline does) or data.num_channels; colour images
      for a one-channel run are refused, not turned grey behind the user's back;
    * image size: the run's eval ops turn the first readable image into the run's input
      (image_size x image_size); they resize, so this fails only for ops that cannot (e.g. a
      central_crop larger than the images).

  Returns:
    `source`, as a view carrying the run's class names and count when `task` is given.

  Raises:
    ValueError: the run cannot take the dataset.
  """
  file, image_field, label_field = _dataset_fields(source, data, split)
  if task is not None:
    labels = np.asarray(source.labels)
    run_kind = (f"multi-label over {task.num_classes} classes" if task.multi_label else
                f"multi-class over {task.num_classes} classes")
    run_kind += f" ({', '.join(task.class_names)})"
    if source.multi_label != task.multi_label or (task.multi_label and
                                                   labels.shape[1:] != (task.num_classes,)):
      theirs = (f"multi-label rows of {labels.shape[-1]} 0/1 values" if source.multi_label
                else "one class id per record (multi-class)")
      raise ValueError(f"{file}: {label_field} holds {theirs}; the run is {run_kind}")
    labeled = labels[np.all(labels >= 0, axis=1)] if task.multi_label else labels[labels >= 0]
    if not task.multi_label:
      outside = labeled[labeled >= task.num_classes]
      if outside.size:
        values = np.unique(outside)
        raise ValueError(f"{file}: {label_field} has labels {values[:10].tolist()}"
                         f"{' ...' if values.size > 10 else ''} ({outside.size} of "
                         f"{len(labeled)} records) outside the run's classes "
                         f"0..{task.num_classes - 1}: the run is {run_kind}")
    if not len(labeled):
      raise ValueError(f"{file}: {label_field} holds no labels in split {split!r}: there is "
                       "nothing to score")
    defaults = [f"class_{i}" for i in range(len(source.class_names))]
    declared = list(source.class_names) != defaults
    run_declared = list(task.class_names) != [f"class_{i}" for i in range(task.num_classes)]
    if declared and run_declared and list(source.class_names) != list(task.class_names):
      raise ValueError(f"{file}: {label_field} names the classes {list(source.class_names)}; "
                       f"the run's are {list(task.class_names)} (another task?)")
  channels = int(data["num_channels"])
  if int(source.num_channels) not in (1, channels):
    raise ValueError(f"{file}: {image_field} holds {source.num_channels}-channel images; the run "
                     f"takes {channels}-channel images (its data.num_channels): convert the "
                     "dataset to grey first if that is what the run should see")
  _check_image_size(source, config, file, image_field)
  if task is None:
    return source
  view = data_sources.IndexView(source, np.arange(len(source)), name=source.name)
  view.num_classes, view.class_names = task.num_classes, list(task.class_names)
  return view


def _check_image_size(source, config, file: str, image_field: str) -> None:
  """The run's eval ops make the first readable record the run's input shape (else ValueError)."""
  from data_pipelines.errors import BadRecordError  # pylint: disable=g-import-not-at-top
  index = None
  for i in range(len(source)):
    try:
      image_shape = np.shape(source[i]["image"])
    except BadRecordError:
      continue  # the record check (check_eval_records) names or skips it
    index = i
    break
  if index is None:
    return
  ops = supervised.eval_ops(config)
  size, channels = int(config.data.image_size), int(config.data.num_channels)
  first = data_sources.IndexView(source, np.array([index]))
  try:
    batch = next(iter(pipeline.make_eval_dataset(first, batch_size=1, ops=ops,
                                                 num_channels=channels)))
    shape = tuple(np.shape(batch["image"])[1:])
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{file}: {image_field}: the run's eval ops ({ops}) cannot take an image of "
                     f"shape {image_shape} (record {index}): {e}") from e
  if shape != (size, size, channels):
    raise ValueError(f"{file}: {image_field}: the run's eval ops ({ops}) turn an image of shape "
                     f"{image_shape} into {shape}; the run takes ({size}, {size}, {channels}) "
                     "(data.image_size, data.num_channels)")


def check_eval_records(config, source):
  """`source` with every record read once up front (`config.data.check_eval_splits`, default
  on): a bad one is an error naming it, or, with `data.skip_bad_records`, left out and counted
  under `data.max_bad_record_share` (`data_pipelines.bad_records.check_records`)."""
  if not config.data.get("check_eval_splits", True):
    return source
  return bad_records.check_records(
      source, skip_bad_records=config.data.skip_bad_records,
      max_bad_record_share=config.data.get("max_bad_record_share", 0.1))


def build_eval_sources(config, test_sets: Sequence[TestSet], task: Task | None = None):
  """(validation source, {test set name: source}), each checked record by record up front.

  A bad record in an evaluation split used to stop the run at the first validation (or at the
  test after all training), after the time was spent; `check_eval_records` moves that to the
  start. A test set of another dataset is checked against the run too (`check_other_dataset`;
  its labels against `task`).
  """
  val_source = check_eval_records(config, data_sources.build_source(config.data,
                                                                    config.data.val_split))
  return val_source, {t.name: check_eval_records(config, build_test_source(config, t, task))
                      for t in test_sets}
