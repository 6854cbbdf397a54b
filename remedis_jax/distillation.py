"""Distillation through the unlabeled training images (SimCLR v2's third step).

SimCLR v2 (Chen et al. 2020, "Big Self-Supervised Models are Strong Semi-Supervised Learners",
section 2.3) pretrains, fine-tunes on the few labels, and then uses the fine-tuned network as a
teacher: its class probabilities on EVERY training image, labeled or not, become the targets of
a student. The labels of the other 90-99% of the images are never read; the student sees the
whole training distribution instead of the labeled few.

Here (`config.distill.teacher`, configs/finetune.py):
  * the teacher is a finished fine-tuning run (its workdir): its best checkpoint on validation,
    rebuilt from its own config.json (model, stem, head layer, eval ops and resolution);
  * it must have been trained on the student's labeled subset: the same label_fraction and
    label_fraction_seed and the same record ids in subset_manifest.json (else an error), so
    the student uses no label the teacher did not;
  * targets: the labeled records keep their own labels (one-hot, or multi-hot); every other
    record of the training split gets the teacher's probabilities at `config.distill.temperature`
    (softmax, or per-class sigmoid for multi-label), and the student's loss is the
    cross-entropy against them at the same temperature (losses.soft_cross_entropy or
    losses.sigmoid_cross_entropy with soft targets);
  * a record that cannot be read is skipped by the teacher's pass (counted under
    data.skip_bad_records, as in evaluation) and by the training pipeline alike.

The teacher path may name a run per label fraction and seed, for sweeps:
  "workdirs/sweep/init=simclr/frac={label_fraction:g}/seed={label_fraction_seed}"
(placeholders: label_fraction, label_fraction_seed, seed).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, NamedTuple

import ml_collections
import numpy as np

from data_pipelines import bad_records, pipeline, storage, stream
from data_pipelines.sources import base as sources_base
from remedis_jax import checkpointing, export, supervised

# What a finished fine-tuning run holds (remedis_jax/supervised.py writes them).
RESULTS_FILE = supervised.RESULTS_FILE
MANIFEST_FILE = supervised.SUBSET_MANIFEST_FILE
BEST_DIR = supervised.BEST_DIR


def teacher_path(config: ml_collections.ConfigDict) -> str:
  """`config.distill.teacher` with its {label_fraction}, {label_fraction_seed}, {seed} filled in.

  Raises:
    ValueError: an unknown placeholder or a malformed format string.
  """
  spec = config.distill.teacher
  values = {"label_fraction": float(config.label_fraction),
            "label_fraction_seed": int(config.label_fraction_seed), "seed": int(config.seed)}
  try:
    return spec.format(**values)
  except (KeyError, IndexError, ValueError) as e:
    raise ValueError(f"config.distill.teacher={spec!r} cannot be filled in ({type(e).__name__}: "
                     f"{e}); the placeholders are {{label_fraction}}, {{label_fraction_seed}} and "
                     "{seed}, e.g. 'workdirs/sweep/init=simclr/frac={label_fraction:g}/"
                     "seed={label_fraction_seed}'") from None


class Teacher(NamedTuple):
  workdir: str
  config: ml_collections.ConfigDict  # the teacher run's own config (config.json)
  params: Any                        # its best checkpoint's parameters (host numpy arrays)
  step: int                          # the step they were saved at
  best: dict[str, Any]               # results.json "best": {metric, split, step, value}


def load_teacher(path: str, *, num_classes: int, multi_label: bool, class_names: list[str],
                 label_fraction: float, label_fraction_seed: int,
                 labeled_ids: list[str]) -> Teacher:
  """Reads a finished fine-tuning run and checks that it fits the student.

  Raises:
    FileNotFoundError: `path` is not a finished fine-tuning run (no results.json, config.json,
      subset_manifest.json or best/ checkpoint).
    ValueError: another task (classes, multi-label) or another labeled subset.
  """
  what = f"config.distill.teacher={path}"
  for name in (RESULTS_FILE, export.RUN_CONFIG_FILE, MANIFEST_FILE):
    if not storage.isfile(storage.join(path, name)):
      raise FileNotFoundError(f"{what} has no {name}: the teacher must be a finished "
                              "fine-tuning run (a workdir of configs/finetune.py)")
  results = storage.read_json(storage.join(path, RESULTS_FILE))
  if not results.get("finished"):
    raise FileNotFoundError(f"{what}: its {RESULTS_FILE} does not say finished")
  task = results.get("task", {})
  theirs = (task.get("num_classes"), task.get("multi_label"), task.get("class_names"))
  if theirs != (num_classes, multi_label, list(class_names)):
    raise ValueError(f"{what} was trained for (num_classes, multi_label, class_names) = "
                     f"{theirs}; the student's data has {(num_classes, multi_label, class_names)}")
  run = results.get("config", {})
  if (run.get("label_fraction"), run.get("label_fraction_seed")) != (label_fraction,
                                                                      label_fraction_seed):
    raise ValueError(
        f"{what} was trained with label_fraction={run.get('label_fraction')}, "
        f"label_fraction_seed={run.get('label_fraction_seed')}; the student uses "
        f"{label_fraction}, {label_fraction_seed}. The teacher must have seen exactly the "
        "student's labeled subset (a placeholder path picks the matching run per fraction "
        "and seed)")
  manifest = storage.read_json(storage.join(path, MANIFEST_FILE))
  if list(manifest.get("ids", [])) != list(labeled_ids):
    raise ValueError(f"{what}: its {MANIFEST_FILE} lists other records "
                     f"({len(manifest.get('ids', []))}) than the student's labeled subset "
                     f"({len(labeled_ids)}): another data file or split?")
  config = ml_collections.ConfigDict(storage.read_json(storage.join(path,
                                                                    export.RUN_CONFIG_FILE)))
  params, step = checkpointing.load_params(storage.join(path, BEST_DIR))
  return Teacher(path, config, params, int(step), dict(results.get("best", {})))


def gathered_indices(num_records: int, batch_size: int, process_count: int) -> np.ndarray:
  """Source index of every row of the gathered eval batches, -1 for padding: (batches, B * P).

  The layout of `pipeline.make_eval_dataset` (process p reads records p, p + P, ... in
  batches of `batch_size`, padded at the end) gathered over processes in process order.
  """
  num_batches = pipeline.num_eval_batches(num_records, batch_size, process_count)
  rows = []
  for p in range(process_count):
    shard = stream.shard_indices(num_records, p, process_count)
    padded = np.full(num_batches * batch_size, -1, np.int64)
    padded[:len(shard)] = shard
    rows.append(padded.reshape(num_batches, batch_size))
  return np.concatenate(rows, axis=1)


def teacher_targets(predict: Callable[[np.ndarray], np.ndarray], source: Any, *,
                    ops: Any, batch_size: int, num_channels: int, num_outputs: int) -> np.ndarray:
  """The teacher's outputs on every record of `source`, in source order: (N, K) float32.

  `predict(host uint8 images of the global batch) -> (B, K)` runs the teacher (the caller
  shards and gathers). Every process computes all N rows.
  """
  import jax  # pylint: disable=g-import-not-at-top
  per_process = batch_size // jax.process_count()
  dataset = pipeline.make_eval_dataset(source, batch_size=per_process, ops=ops,
                                       num_channels=num_channels)
  layout = gathered_indices(len(source), per_process, jax.process_count())
  targets = np.full((len(source), num_outputs), np.nan, np.float32)
  for j, batch in enumerate(dataset):
    outputs = np.asarray(predict(np.asarray(batch["image"])), np.float32)
    rows = layout[j]
    targets[rows[rows >= 0]] = outputs[rows >= 0]
  missing = int(np.isnan(targets).any(axis=1).sum())
  if missing:
    raise RuntimeError(f"the teacher's pass left {missing} of {len(source)} records without "
                       "targets (an eval-batch layout mismatch)")
  return targets


class SoftTargetSource(sources_base.IndexView):
  """Every record of the training split, each with its distillation target as `label`.

  `label` is float32 (K,): the record's own label (one-hot / multi-hot) for the labeled
  subset, the teacher's probabilities for the rest; -1 everywhere for a record without a
  target (one the teacher could not read: training skips it as well).
  """

  def __init__(self, parent: Any, targets: np.ndarray, labeled_indices: np.ndarray):
    super().__init__(parent, np.arange(len(parent)), name=parent.name)
    targets = np.array(targets, np.float32)
    labels = np.asarray(parent.labels)
    for index in np.asarray(labeled_indices, np.int64):
      label = labels[index]
      if parent.multi_label:
        if np.all(label >= 0):
          targets[index] = label
      elif label >= 0:
        targets[index] = np.eye(parent.num_classes, dtype=np.float32)[int(label)]
    self.targets = targets
    self.num_labeled = len(labeled_indices)

  @property
  def labels(self) -> np.ndarray:
    return self.targets

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = dict(self.parent[index])
    record["label"] = self.targets[index]
    return record


def build_soft_targets(full_train: Any, labeled: Any, predict: Callable, *, ops: Any,
                       batch_size: int, num_channels: int, skip_bad_records: bool,
                       max_bad_record_share: float) -> SoftTargetSource:
  """The teacher's pass over `full_train` (bad records skipped and counted under the training
  policy), then the SoftTargetSource with `labeled` (a label-fraction subset of it) on top.

  Without skip_bad_records the pass itself stops at the first bad record (BadRecordError
  naming it); with it, every record is read once up front (bad_records.check_records) so that all
  processes leave out the same ones: a second full read, paid only when skipping is on."""
  readable = full_train
  if skip_bad_records:
    readable = bad_records.check_records(full_train, skip_bad_records=True,
                                      max_bad_record_share=max_bad_record_share)
  outputs = teacher_targets(predict, readable, ops=ops, batch_size=batch_size,
                            num_channels=num_channels, num_outputs=full_train.num_classes)
  targets = np.full((len(full_train), full_train.num_classes), -1.0, np.float32)
  if readable is full_train:
    targets[:] = outputs
  else:
    targets[np.asarray(readable.indices)] = outputs
    logging.warning("Distillation: the teacher skipped %d unreadable training records",
                    len(full_train) - len(readable))
  return SoftTargetSource(full_train, targets, np.asarray(labeled.indices))
