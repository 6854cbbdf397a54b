"""Distillation through the unlabeled training images (remedis_jax/distillation.py): the soft
loss against NumPy, the eval-batch layout against the pipeline's own shards, the targets of
labeled and unlabeled records, the teacher checks, and a teacher -> student run end to end."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from configs import common, finetune as finetune_config
from data_pipelines import pipeline
from data_pipelines.errors import BadRecordError
from data_pipelines.sources import base as sources_base
from remedis_jax import distillation, losses, sharding, train_finetune


class IndexImages(sources_base.Source):
  """Records whose every pixel is the record's index (so a batch row tells which record it is).
  Labels: `labels` (int class or multi-hot); `bad`: indices that raise BadRecordError."""

  def __init__(self, labels, multi_label=False, bad=()):
    self._labels, self.bad = np.asarray(labels), set(bad)
    self.multi_label = multi_label
    self.num_classes = self._labels.shape[1] if multi_label else int(self._labels.max()) + 1
    self.class_names = [f"c{i}" for i in range(self.num_classes)]
    self.num_channels, self.name = 1, "index_images"

  @property
  def labels(self):
    return self._labels

  @property
  def ids(self):
    return [f"r{i}" for i in range(len(self))]

  def __len__(self):
    return len(self._labels)

  def __getitem__(self, index):
    if index in self.bad:
      raise BadRecordError(f"images/{index}.png", "truncated PNG")
    return {"image": np.full((8, 8, 1), index, np.uint8), "label": self._labels[index],
            "id": f"r{index}", "site": np.int32(0)}


def test_soft_cross_entropy_matches_numpy_and_the_hard_loss_on_one_hot_targets():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 3)) * 3
  targets = rng.dirichlet(np.ones(3), size=6)
  weights = np.array([1, 0, 2, 1, 1, 0.5])
  log_softmax = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  per_example = -(targets * log_softmax).sum(1)
  np.testing.assert_allclose(losses.soft_cross_entropy(jnp.asarray(logits), jnp.asarray(targets)),
                             per_example.mean(), rtol=1e-5)
  np.testing.assert_allclose(
      losses.soft_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights)),
      (per_example * weights).sum() / weights.sum(), rtol=1e-5)
  labels = np.array([0, 2, 1, 1, 0, 2])
  np.testing.assert_allclose(
      losses.soft_cross_entropy(jnp.asarray(logits), jnp.asarray(np.eye(3)[labels])),
      losses.softmax_cross_entropy(jnp.asarray(logits), jnp.asarray(labels)), rtol=1e-6)
  with pytest.raises(ValueError, match="same"):
    losses.soft_cross_entropy(jnp.zeros((2, 3)), jnp.zeros((2, 2)))


@pytest.mark.parametrize("num_records,batch_size,processes", [(11, 3, 2), (7, 4, 1), (9, 2, 3)])
def test_gathered_indices_follow_the_eval_pipelines_shards(num_records, batch_size, processes):
  source = IndexImages(np.zeros(num_records, np.int32))
  layout = distillation.gathered_indices(num_records, batch_size, processes)
  per_process = [list(pipeline.make_eval_dataset(source, batch_size=batch_size, ops="resize(8)",
                                                 shard_index=p, shard_count=processes,
                                                 num_channels=1))
                 for p in range(processes)]
  assert layout.shape == (len(per_process[0]), batch_size * processes)
  for j, row in enumerate(layout):
    # Process order, as multihost_utils.process_allgather(..., tiled=True) concatenates.
    valid = np.concatenate([b[j]["valid"] for b in per_process])
    seen = np.concatenate([b[j]["image"][:, 0, 0, 0] for b in per_process]).astype(np.int64)
    np.testing.assert_array_equal(row >= 0, valid)
    np.testing.assert_array_equal(row[valid], seen[valid])
  assert sorted(layout[layout >= 0].tolist()) == list(range(num_records))


def test_targets_keep_the_labeled_records_labels_and_the_teachers_elsewhere():
  labels = np.array([0, 1, 2, 1, 0, 2, 1], np.int32)
  source = IndexImages(labels, bad=(5,))
  labeled = sources_base.IndexView(source, np.array([1, 4]))

  def predict(images):  # a "teacher" that says which record it saw: p = (i, 1, 1) / (i + 2)
    index = images[:, 0, 0, 0].astype(np.float32)
    return np.stack([index, np.ones_like(index), np.ones_like(index)], 1) / (index + 2)[:, None]

  soft = distillation.build_soft_targets(
      source, labeled, predict, ops="resize(8)", batch_size=3, num_channels=1,
      skip_bad_records=True, max_bad_record_share=0.5)
  assert len(soft) == 7 and soft.num_labeled == 2
  for i in (0, 2, 3, 6):
    np.testing.assert_allclose(soft[i]["label"], np.array([i, 1, 1]) / (i + 2), rtol=1e-6)
  np.testing.assert_array_equal(soft[1]["label"], [0, 1, 0])  # its own label
  np.testing.assert_array_equal(soft[4]["label"], [1, 0, 0])
  np.testing.assert_array_equal(soft.labels[5], [-1, -1, -1])  # unreadable: no target
  with pytest.raises(BadRecordError):
    soft[5]  # pylint: disable=pointless-statement
  assert soft[3]["label"].dtype == np.float32 and soft[3]["id"] == "r3"
  # Without skip_bad_records a bad training record is an error naming it, before training.
  with pytest.raises(BadRecordError, match="images/5.png"):
    distillation.build_soft_targets(source, labeled, predict, ops="resize(8)", batch_size=3,
                                    num_channels=1, skip_bad_records=False,
                                    max_bad_record_share=0.5)
  # Multi-label: the labeled record keeps its multi-hot vector; an unlabeled one (all -1) among
  # the labeled subset takes the teacher's.
  multi = IndexImages(np.array([[1, 0], [0, 1], [-1, -1]], np.float32), multi_label=True)
  soft = distillation.build_soft_targets(
      multi, sources_base.IndexView(multi, np.array([1, 2])),
      lambda images: np.full((len(images), 2), 0.25, np.float32), ops="resize(8)",
      batch_size=2, num_channels=1, skip_bad_records=False, max_bad_record_share=0.1)
  np.testing.assert_array_equal(soft.labels, [[0.25, 0.25], [0, 1], [0.25, 0.25]])


def test_teacher_path_placeholders():
  config = finetune_config.get_config("smoke")
  config.label_fraction, config.label_fraction_seed, config.seed = 0.1, 2, 2
  config.distill.teacher = "sw/init=a/frac={label_fraction:g}/seed={label_fraction_seed}"
  assert distillation.teacher_path(config) == "sw/init=a/frac=0.1/seed=2"
  config.distill.teacher = "sw/{fraction}"
  with pytest.raises(ValueError, match=r"cannot be filled in .*\{label_fraction\}"):
    distillation.teacher_path(config)


def _config(**overrides):
  """The smoke config as tests/test_finetune.py runs it (so the teacher's programs are the
  compilation cache's), with one test set and no perturbations."""
  config = finetune_config.get_config("smoke")
  config.mesh.devices = 1
  config.robustness.perturbations = ()
  config.test_sets = ("in_distribution=test@A",)
  return common.override(config, overrides)


def test_teacher_to_student_end_to_end_and_the_teacher_checks(tmp_path):
  teacher = str(tmp_path / "teacher_0")
  train_finetune.train_and_evaluate(_config(), teacher)

  # The student reads all 96 training records, 51 of them (the teacher's subset) labeled; the
  # placeholder names the teacher of its seed.
  student = str(tmp_path / "student")
  config = _config(**{"distill.teacher": str(tmp_path / "teacher_{seed}"),
                      "total_steps": -1, "total_epochs": 1.0})
  results = train_finetune.train_and_evaluate(config, student)
  assert results["distillation"]["num_records"] == 96
  assert results["distillation"]["num_labeled"] == results["num_train_labels"] == 51
  assert results["distillation"]["teacher"] == teacher
  assert results["distillation"]["teacher_step"] == results["distillation"]["teacher_best"]["step"]
  assert results["total_steps"] == 6  # one epoch of the 96 records at batch 16, not of the 51
  with open(os.path.join(student, "subset_manifest.json")) as f:
    student_ids = json.load(f)["ids"]
  with open(os.path.join(teacher, "subset_manifest.json")) as f:
    assert student_ids == json.load(f)["ids"]

  # The teacher's probabilities at temperature T are its logits / T through the sigmoid.
  loaded = distillation.load_teacher(
      teacher, num_classes=4, multi_label=True,
      class_names=["nodule", "opacity", "effusion", "cardiomegaly"], label_fraction=0.5,
      label_fraction_seed=0, labeled_ids=student_ids)
  mesh = sharding.make_mesh(config.mesh)
  # 16 images: the eval batch of the student's own teacher pass, so one compiled program.
  images = np.stack([train_finetune.data_sources.build_source(config.data, "train")[i]["image"]
                     for i in range(16)])
  images = np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images
  p1, p3 = (np.asarray(train_finetune.teacher_predict_fn(
      loaded, mesh, num_classes=4, multi_label=True, temperature=t)(images)) for t in (1.0, 3.0))
  logit = lambda p: np.log(p) - np.log1p(-p)
  np.testing.assert_allclose(logit(p3) * 3.0, logit(p1), rtol=1e-3, atol=1e-4)

  # A teacher trained on another subset, a bad temperature, class weights: clear errors.
  with pytest.raises(ValueError, match=r"label_fraction=0.5, label_fraction_seed=0; the student "
                                       r"uses 0.25, 0"):
    train_finetune.train_and_evaluate(
        _config(**{"distill.teacher": teacher, "label_fraction": 0.25}), str(tmp_path / "x"))
  with pytest.raises(FileNotFoundError, match="has no results.json"):
    train_finetune.train_and_evaluate(_config(**{"distill.teacher": str(tmp_path)}),
                                      str(tmp_path / "y"))
  with pytest.raises(ValueError, match="temperature=0.0 must be > 0"):
    train_finetune.train_and_evaluate(
        _config(**{"distill.teacher": teacher, "distill.temperature": 0.0}), str(tmp_path / "z"))
  with pytest.raises(ValueError, match="class_weights='1,2,1,1' does not apply"):
    train_finetune.train_and_evaluate(
        _config(**{"distill.teacher": teacher, "loss.class_weights": "1,2,1,1"}),
        str(tmp_path / "w"))
