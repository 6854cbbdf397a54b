"""SyntheticCXR: record contract, determinism, fairness (labels independent of site), site
shift that hurts a one-site model, visible-but-not-trivial findings, patients that differ more
than sites, the shape renderer against a direct evaluation. Speed is measured by
`python -m data_pipelines.sources.synthetic` (a benchmark, not a timed test: the box is shared)."""
import pickle

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from data_pipelines.sources import synthetic
from data_pipelines.sources.synthetic import FINDINGS, PREVALENCE, SyntheticCXR, hash_uniform


def test_record_contract_64_and_224():
  for size in (64, 224):
    source = SyntheticCXR("train", num_examples=8, image_size=size, seed=3)
    example = source[5]
    assert example["image"].shape == (size, size, 1) and example["image"].dtype == np.uint8
    assert example["lung_mask"].shape == (size, size) and example["lung_mask"].dtype == np.uint8
    assert set(np.unique(example["lung_mask"])) <= {0, 1} and example["lung_mask"].sum() > 0
    assert example["label"].dtype == np.float32 and example["label"].shape == (4,)
    assert example["site"].dtype == np.int32 and example["id"] == "train/00005"
  assert source.class_names == list(FINDINGS) and source.multi_label and source.num_classes == 4
  np.testing.assert_array_equal(source.labels[5], example["label"])
  assert len(set(source.ids)) == 8


def test_deterministic_across_instances_and_pickling():
  a = SyntheticCXR("val", 20, 64, seed=1)
  b = pickle.loads(pickle.dumps(a))
  for i in (0, 7, 19):
    np.testing.assert_array_equal(a[i]["image"], b[i]["image"])
  np.testing.assert_array_equal(a[-1]["image"], a[19]["image"])
  assert not np.array_equal(a[0]["image"], SyntheticCXR("val", 20, 64, seed=2)[0]["image"])
  assert not np.array_equal(a.labels, SyntheticCXR("test", 20, 64, seed=1).labels)
  # The label column equals what rendering returns, without rendering.
  np.testing.assert_array_equal(a.labels, np.stack([a[i]["label"] for i in range(20)]))
  with pytest.raises(IndexError):
    a[20]


def test_hash_uniform_is_uniform():
  u = hash_uniform(0, "train", np.arange(200_000), 0)
  assert abs(u.mean() - 0.5) < 0.003 and u.min() >= 0 and u.max() < 1
  counts = np.histogram(u, bins=10, range=(0, 1))[0]
  assert counts.min() > 19_000 and counts.max() < 21_000


def test_tasks_and_unlabeled():
  multi = SyntheticCXR("train", 300, 32, task="multilabel")
  binary = SyntheticCXR("train", 300, 32, task="any_finding")
  np.testing.assert_array_equal(binary.labels, multi.labels.any(axis=1).astype(np.int32))
  one = SyntheticCXR("train", 300, 32, task="effusion")
  np.testing.assert_array_equal(one.labels, multi.labels[:, 2].astype(np.int32))
  assert binary[0]["label"].dtype == np.int32 and binary[0]["label"].shape == ()
  unlabeled = SyntheticCXR("unlabeled", 10, 32)
  assert (unlabeled.labels == -1).all() and (unlabeled[3]["label"] == -1).all()
  with pytest.raises(ValueError, match="valid tasks"):
    SyntheticCXR(task="pneumothorax")
  with pytest.raises(ValueError, match="valid sites"):
    SyntheticCXR(sites="A,E")


def test_labels_independent_of_site():
  source = SyntheticCXR("train", 40_000, 64, seed=0)
  findings, sites = source.findings, source.record_sites
  assert set(np.unique(sites)) == {0, 1, 2, 3}
  for s in range(4):
    prevalence = findings[sites == s].mean(axis=0)
    # 4 sigma of a binomial proportion at n ~ 10000.
    np.testing.assert_allclose(prevalence, PREVALENCE, atol=4 * np.sqrt(0.25 * 0.75 / 9000))
  only_a = SyntheticCXR("train", 1000, 64, sites="A")
  assert (only_a.record_sites == 0).all()
  # Choosing sites does not change who is sick: the findings come first.
  np.testing.assert_array_equal(only_a.findings, SyntheticCXR("train", 1000, 64, sites="C").findings)


def _features(source, n):
  # 2x2 mean pooling of 64 px images: 1024 pixel features for a linear probe.
  images = np.stack([source[i]["image"][:, :, 0] for i in range(n)]).astype(np.float32) / 255
  return images.reshape(n, 32, 2, 32, 2).mean(axis=(2, 4)).reshape(n, -1)


def test_findings_visible_not_trivial_and_site_shift_hurts():
  train = SyntheticCXR("train", 600, 64, sites="A", seed=7)
  x_train = _features(train, 600)
  auc = {}
  for site in ("A", "C"):
    test = SyntheticCXR("test", 400, 64, sites=site, seed=7)
    x_test = _features(test, 400)
    auc[site] = []
    for k in (1, 3):  # opacity, cardiomegaly
      probe = LogisticRegression(C=0.05, max_iter=3000).fit(x_train, train.findings[:, k])
      auc[site].append(roc_auc_score(test.findings[:, k], probe.decision_function(x_test)))
  assert all(0.65 < a < 0.995 for a in auc["A"]), auc
  assert all(c < a - 0.2 for a, c in zip(auc["A"], auc["C"])), auc


def test_sites_look_different_for_the_same_patient():
  source = SyntheticCXR("train", 4, 64)
  findings = np.zeros(4, bool)
  images = {s: source.render(0, findings, s)[0].astype(np.float32) for s in "ABCD"}
  for s in "BCD":
    assert np.abs(images[s] - images["A"]).mean() > 10, s
  # Site C is stored inverted: its lungs are bright where A's are dark.
  _, mask = source.render(0, findings, "A")
  lung = mask.astype(bool)
  assert images["A"][lung].mean() < images["A"][~lung].mean() + 60
  assert images["C"][lung].mean() > 128 > images["A"][lung].mean()


def _standardised_pixels(images):
  x = np.stack([image.reshape(-1) for image in images]).astype(np.float64)
  x -= x.mean(axis=1, keepdims=True)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_patients_differ_more_than_sites_at_32px():
  # The quickstart pretrains at 32 px. Before patients varied this much, two patients at
  # site A correlated at 0.87 in raw pixels and one patient at sites A and B at only 0.82,
  # so SimCLR could tell images apart by site and hardly by patient. Now about 0.70 and 0.89.
  n = 64
  source = SyntheticCXR("unlabeled", n, 32, seed=0)
  pixels = {site: _standardised_pixels([source.render(i, source.findings[i], site)[0]
                                        for i in range(n)]) for site in "ABD"}
  other = ~np.eye(n, dtype=bool)
  same_site = {site: float((z @ z.T)[other].mean()) for site, z in pixels.items()}
  for site in "BD":
    same_patient = np.sum(pixels["A"] * pixels[site], axis=1)  # one patient at A and at site
    cross = pixels["A"] @ pixels[site].T
    assert same_patient.mean() > cross[other].mean() + 0.1, site  # the patient shows through
  assert same_site["A"] < 0.8, same_site
  same_patient_b = float(np.sum(pixels["A"] * pixels["B"], axis=1).mean())
  assert same_patient_b > max(same_site["A"], same_site["B"]) + 0.08, (same_patient_b, same_site)


def test_sites_stay_distinct():
  # Different patients: same site correlates more than across sites, and a raw-pixel nearest
  # neighbour almost always comes from the image's own site (the sites are the OOD test).
  source = SyntheticCXR("unlabeled", 256, 32, seed=1)
  images = [source[i]["image"] for i in range(256)]
  sites = source.record_sites
  z = _standardised_pixels(images)
  correlation = z @ z.T
  same = sites[:, None] == sites[None, :]
  other = ~np.eye(256, dtype=bool)
  assert correlation[same & other].mean() > correlation[~same].mean() + 0.3
  x = np.stack([image.reshape(-1) for image in images]).astype(np.float64)
  distance = np.square(x).sum(1)[:, None] + np.square(x).sum(1)[None, :] - 2 * x @ x.T
  np.fill_diagonal(distance, np.inf)
  assert np.mean(sites[np.argmin(distance, axis=1)] == sites) > 0.9


def test_patient_depends_only_on_seed_split_index():
  # Which sites a split draws from, its size and the task do not change a patient.
  small = SyntheticCXR("train", 10, 48, sites="A", seed=5)
  large = SyntheticCXR("train", 500, 48, sites="B,C", seed=5, task="effusion")
  for i in (0, 3, 9):
    image, mask = large.render(i, small.findings[i], "A")
    np.testing.assert_array_equal(image, small[i]["image"])
    np.testing.assert_array_equal(mask, small[i]["lung_mask"])
  assert not np.array_equal(small[3]["image"], SyntheticCXR("val", 10, 48, sites="A", seed=5)[3]
                            ["image"])


def test_findings_are_drawn_into_the_same_patient():
  # A finding changes its own pixels and nothing about the patient: the lung mask stays, and
  # most of the image is identical. So no label can leak through the anatomy or devices.
  source = SyntheticCXR("train", 40, 64, seed=2)
  healthy = np.zeros(4, bool)
  for i in range(0, 40, 4):
    base, base_mask = source.render(i, healthy, "A")
    for k in range(4):
      findings = healthy.copy()
      findings[k] = True
      image, mask = source.render(i, findings, "A")
      np.testing.assert_array_equal(mask, base_mask)
      changed = np.mean(image != base)
      assert 0.0 < changed < 0.35, (i, FINDINGS[k], changed)


def test_ellipses_equal_direct_evaluation():
  # _Canvas.ellipses evaluates every shape as a quadratic polynomial in image coordinates;
  # check it against _soft_ellipse on the rotated, shifted patient coordinates.
  rng = np.random.default_rng(0)
  for size in (32, 97):
    canvas = synthetic._Canvas(size, shift_x=0.05, shift_y=-0.03, zoom=1.07,
                               angle=np.radians(-4.0))
    specs = [(rng.uniform(-0.6, 0.6), rng.uniform(-0.6, 0.6), rng.uniform(0.1, 0.9),
              rng.uniform(0.1, 0.9), rng.uniform(1.0, 6.0), rng.uniform(-0.3, 0.3))
             for _ in range(6)] + [(0.0, 0.1, 0.8, 0.9, 6.0), None]
    shapes = canvas.ellipses(*specs)
    assert shapes.shape == (len(specs), size, size) and shapes.dtype == np.float32
    for shape, spec in zip(shapes, specs):
      expected = (np.zeros((size, size)) if spec is None
                  else synthetic._soft_ellipse(canvas.x, canvas.y, *spec))
      np.testing.assert_allclose(shape, expected, atol=2e-5)
    assert shapes[-2].sum() > 0.3 * size * size  # the large one covers most of the image
