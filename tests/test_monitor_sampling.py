"""Fixed evaluation subsets (kNN bank/query, GMML monitor batch, figure grids) are seeded,
class-stratified random samples, never the first N records of a (possibly class-sorted) split.
"""
import jax
import numpy as np
import pytest
from sklearn.neighbors import NearestNeighbors

from configs import pretrain_gmml, pretrain_simclr
from data_pipelines.sources.base import IndexView
from data_pipelines.subset import NO_FINDING, UNLABELED, sample, sample_counts, stratum_keys
from remedis_jax import sharding, train_gmml, train_simclr
from remedis_jax.evaluators import knn
from tests import fakes




def _largest_remainder(sizes, n):
  """Hand-rolled Hamilton apportionment, independent of subset.sample_counts."""
  total = sum(sizes)
  quotas = [n * s / total for s in sizes]
  counts = [int(q) for q in quotas]
  order = sorted(range(len(sizes)), key=lambda i: quotas[i] - counts[i], reverse=True)
  for i in order[:n - sum(counts)]:
    counts[i] += 1
  return counts


# ------------------------------------------------------------------------------------ sample
def test_sample_of_class_sorted_source_is_proportional_seeded_and_not_a_prefix():
  # Sorted by class like PneumoniaMNIST's training split: 700 of class 1, then 230 of class 0,
  # then 70 of class 2.
  labels = np.array([1] * 700 + [0] * 230 + [2] * 70, np.int32)
  source = fakes.LabelSource(labels)
  for n in (10, 37, 100, 333):
    view = sample(source, n, seed=0)
    assert len(view) == n
    counts = [int((view.labels == c).sum()) for c in (1, 0, 2)]
    assert counts == _largest_remainder([700, 230, 70], n), n
    assert np.all(np.diff(view.indices) > 0)  # source order, no repeats
  # n = 10: quotas 7.0, 2.3, 0.7 -> 7, 2, 1 (the 0.7 remainder takes the last record).
  assert [int((sample(source, 10).labels == c).sum()) for c in (1, 0, 2)] == [7, 2, 1]
  view = sample(source, 40, seed=3)
  assert set(view.labels.tolist()) == {0, 1, 2}
  assert view.indices.tolist() != list(range(40))
  assert sample(source, 40, seed=3).ids == view.ids
  assert sample(source, 40, seed=4).ids != view.ids
  # The classes in another order (interleaved, or normal first): the same class counts.
  for order in (np.random.default_rng(0).permutation(len(labels)), np.argsort(labels)):
    other = sample(fakes.LabelSource(labels[order]), 40, seed=3)
    assert sorted(other.labels.tolist()) == sorted(view.labels.tolist())


def test_sample_every_stratum_gets_one_when_n_allows():
  labels = np.array([0] * 990 + [1] * 6 + [2] * 4, np.int32)
  source = fakes.LabelSource(labels)
  # n = 5: quotas 4.95, 0.03, 0.02 -> 5, 0, 0; each missing class takes one from class 0.
  view = sample(source, 5, seed=1)
  assert [int((view.labels == c).sum()) for c in range(3)] == [3, 1, 1]
  # Fewer records than strata: proportional only (exactly n, no forcing).
  assert [int((sample(source, 2).labels == c).sum()) for c in range(3)] == [2, 0, 0]
  assert sample_counts({"a": 990, "b": 6, "c": 4}, 5) == {"a": 3, "b": 1, "c": 1}
  assert sample_counts({"a": 3, "b": 0}, 2) == {"a": 2}


def test_sample_all_records_for_nonpositive_or_large_n():
  source = fakes.LabelSource(np.array([1, 1, 0, 0, 0], np.int32))
  for n in (0, -1, 5, 50):
    assert sample(source, n, seed=7).indices.tolist() == [0, 1, 2, 3, 4]


def test_sample_unlabeled_records_form_their_own_stratum():
  labels = np.array([0] * 60 + [-1] * 30 + [1] * 10, np.int32)
  source = fakes.LabelSource(labels, num_classes=2)
  view = sample(source, 20, seed=0)
  # Quotas 12, 6, 2 of (class 0, unlabeled, class 1).
  assert [int((view.labels == c).sum()) for c in (0, -1, 1)] == [12, 6, 2]
  assert view.class_counts()[UNLABELED] == 6


def test_sample_multilabel_strata():
  # 3 findings: 40 records with only c0, 30 with c0 and c2 (rarest positive: c2), 50 with no
  # finding, 10 unlabeled (all -1), in blocks.
  labels = np.concatenate([np.tile([1, 0, 0], (40, 1)), np.tile([1, 0, 1], (30, 1)),
                           np.zeros((50, 3)), -np.ones((10, 3))]).astype(np.float32)
  source = fakes.LabelSource(labels, multi_label=True)
  keys = np.array(stratum_keys(labels, True, source.class_names))
  sizes = {key: int((keys == key).sum()) for key in ("c0", "c2", NO_FINDING, UNLABELED)}
  assert sizes == {"c0": 40, "c2": 30, NO_FINDING: 50, UNLABELED: 10}
  view = sample(source, 26, seed=5)
  assert len(view) == 26
  chosen_keys = keys[view.indices]
  # Quotas 8, 6, 10, 2 (26 / 130 = 0.2 of each stratum).
  assert {key: int((chosen_keys == key).sum()) for key in sizes} == {
      "c0": 8, "c2": 6, NO_FINDING: 10, UNLABELED: 2}


# --------------------------------------------------------------------------------------- kNN
def _write_class_sorted_npz(path, sizes_by_split, size=28):
  """A PneumoniaMNIST-layout file whose splits list all pneumonia (1) before normal (0) images.

  The class is in the image: pneumonia images have a bright disc on dark noise, normal images
  a dark disc on bright noise.
  """
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[:size, :size]
  disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2
  arrays = {}
  for split, (num_pneumonia, num_normal) in sizes_by_split.items():
    labels = np.array([1] * num_pneumonia + [0] * num_normal, np.uint8)
    images = rng.integers(0, 40, (len(labels), size, size)).astype(np.int32)
    images = np.where(labels[:, None, None] == 1,
                      np.where(disc, 215 + images, images),
                      np.where(disc, images, 215 + images))
    arrays[f"{split}_images"] = images.astype(np.uint8)
    arrays[f"{split}_labels"] = labels[:, None]
  np.savez(path, **arrays)
  return str(path)


def _knn_config(npz_path):
  config = pretrain_simclr.get_config("smoke")
  config.data.source = "medmnist"
  config.data.path = npz_path
  config.data.image_size = 32
  config.knn.bank_size, config.knn.query_size, config.knn.batch_size = 40, 30, 32
  config.knn.k = 5
  return config


def test_knn_evaluator_bank_is_stratified_and_separates_a_class_sorted_split(tmp_path):
  path = _write_class_sorted_npz(tmp_path / "pneumoniamnist.npz",
                                 {"train": (210, 90), "val": (140, 60)})
  config = _knn_config(path)
  mesh = sharding.make_mesh(None)
  setup = train_simclr.create_train_setup(config, mesh, num_classes=0, multi_label=False,
                                          total_steps=1, warmup_steps=0)
  params = sharding.create_sharded(setup.init_state, jax.random.key(0),
                                   shardings=setup.state_shardings).params
  evaluator = knn.KnnEvaluator.from_config(config, setup.model, mesh)
  bank, query = evaluator._bank, evaluator._query  # pylint: disable=protected-access
  assert len(bank) == 40 and len(query) == 30
  # 210 : 90 -> 28 : 12 of 40; 140 : 60 -> 21 : 9 of 30.
  assert (int((bank.labels == 1).sum()), int((bank.labels == 0).sum())) == (28, 12)
  assert (int((query.labels == 1).sum()), int((query.labels == 0).sum())) == (21, 9)
  values = dict(evaluator.run(params))
  assert values["auc"] > 0.9 and values["accuracy"] > 0.9, values

  # The old first-N bank (all pneumonia) gives every query the score (0, 1): no information.
  # Any AUC of these scores would only rank rounding noise of the vote weights (it differs
  # between machines), so what is checked is that the scores cannot rank the queries at all.
  ops = evaluator._ops  # pylint: disable=protected-access
  first_n = knn.KnnEvaluator(setup.model, IndexView(bank.parent, np.arange(40)), query, ops=ops,
                             batch_size=32, mesh=mesh, num_channels=config.data.num_channels,
                             k=5)
  assert set(first_n._bank.labels.tolist()) == {1}  # pylint: disable=protected-access
  bank_features, bank_labels = first_n._features(params, first_n._bank)  # pylint: disable=protected-access
  query_features, query_labels = first_n._features(params, query)  # pylint: disable=protected-access
  scores = knn.knn_scores(query_features, bank_features, bank_labels, k=5, temperature=0.07,
                          num_classes=2, multi_label=False)
  np.testing.assert_allclose(scores, np.tile([0.0, 1.0], (len(scores), 1)), atol=1e-6)
  assert np.ptp(scores[:, 1]) <= 1e-6 and len(set(query_labels.tolist())) == 2

  # Another seed: another bank.
  config.knn.sample_seed = 1
  other = knn.KnnEvaluator.from_config(config, setup.model, mesh)
  assert other._bank.ids != bank.ids  # pylint: disable=protected-access


@pytest.mark.parametrize("multi_label", [False, True])
def test_knn_scores_equal_sklearn_neighbours(multi_label):
  rng = np.random.default_rng(0)
  num_classes, k, temperature = 3, 7, 0.1
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
  query, bank = unit(rng.normal(size=(25, 16))), unit(rng.normal(size=(60, 16)))
  if multi_label:
    bank_labels = (rng.random((60, num_classes)) < 0.4).astype(np.float32)
  else:
    bank_labels = rng.integers(0, num_classes, 60)
  scores = knn.knn_scores(query, bank, bank_labels, k=k, temperature=temperature,
                          num_classes=num_classes, multi_label=multi_label)
  distance, neighbours = NearestNeighbors(n_neighbors=k, metric="cosine").fit(bank).kneighbors(
      query)
  weights = np.exp((1.0 - distance) / temperature)
  one_hot = bank_labels if multi_label else np.eye(num_classes)[bank_labels]
  expected = np.einsum("qk,qkc->qc", weights, one_hot[neighbours]) / weights.sum(1, keepdims=True)
  np.testing.assert_allclose(scores, expected, rtol=1e-6)


# -------------------------------------------------------------------------------------- GMML
def test_gmml_monitor_batch_is_a_stratified_sample_not_a_prefix(tmp_path):
  path = _write_class_sorted_npz(tmp_path / "pneumoniamnist.npz", {"val": (60, 40)})
  config = pretrain_gmml.get_config("smoke")
  config.data.source, config.data.path = "medmnist", path
  config.gmml.monitor_images = 10
  config.gmml.grid_images = 0
  from data_pipelines import sources  # pylint: disable=g-import-not-at-top
  source = sources.build_source(config.data, config.gmml.monitor_split)
  mesh = sharding.make_mesh(None)
  monitors = [train_gmml.create_train_setup(config, mesh, total_steps=4, warmup_steps=1,
                                            monitor_source=source).monitor for _ in range(2)]
  held_out = monitors[0].held_out
  assert len(held_out) == 10 and held_out.indices.tolist() != list(range(10))
  assert (int((held_out.labels == 1).sum()), int((held_out.labels == 0).sum())) == (6, 4)
  assert monitors[1].held_out.ids == held_out.ids
  np.testing.assert_array_equal(monitors[1].batch["clean"], monitors[0].batch["clean"])
  # The batch shows both classes: the disc is bright on pneumonia, dark on normal images.
  clean = monitors[0].batch["clean"].astype(np.float32).mean(axis=-1)
  centre, border = clean[:, 12:20, 12:20].mean(axis=(1, 2)), clean[:, :3, :3].mean(axis=(1, 2))
  assert int((centre > border).sum()) == 6 and int((centre < border).sum()) == 4


# ------------------------------------------------------------------------------ segmentation
class _IndexedMaskSource(fakes.LabelSource):
  """Records whose constant 8 px image holds the record index; every record has a lung mask."""

  def __getitem__(self, i):
    return {"image": np.full((8, 8, 1), i, np.uint8), "label": self._labels[i], "id": f"r{i}",
            "site": np.int32(0), "lung_mask": np.ones((8, 8), np.uint8)}


def test_segmentation_figure_samples_are_a_seeded_sample_of_the_whole_set():
  from data_pipelines import presets  # pylint: disable=g-import-not-at-top
  from remedis_jax.evaluators import segmentation  # pylint: disable=g-import-not-at-top
  source = _IndexedMaskSource(np.array([1] * 40 + [0] * 20, np.int32))
  predict_fn = jax.jit(lambda params, images: images[..., 0].astype(np.float32) / 255.0)
  evaluator = segmentation.SegmentationEvaluator(
      predict_fn, source, ops=presets.get_preset("cxr", "eval", 8), batch_size=8,
      mesh=sharding.make_mesh(None), num_channels=1)
  counts, samples = evaluator.predict({}, num_samples=6, sample_seed=2)
  assert len(counts.intersection) == 60
  expected = sample(source, 6, seed=2).indices
  assert expected.tolist() != list(range(6))
  np.testing.assert_array_equal(samples["image"][:, 0, 0, 0], expected)
  np.testing.assert_allclose(samples["probability"][:, 0, 0], expected / 255.0, rtol=1e-6)
  assert samples["mask"].shape == (6, 8, 8)
  assert set(source.labels[samples["image"][:, 0, 0, 0]].tolist()) == {0, 1}
  _, none = evaluator.predict({})
  assert none["image"].shape == (0,)
