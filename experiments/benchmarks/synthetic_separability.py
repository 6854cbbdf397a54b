r"""Can SimCLR tell synthetic patients apart? Pixel-space separability of SyntheticCXR (a script).

SimCLR learns what tells a view's partner from the batch's other views. If two different
patients from the same site look almost alike in pixel space while the sites differ a lot, the
easiest solution is the site, and the loss floors at ln(images per site in the batch)
(ln 31 = 3.45 at batch 64 over four sites). This script measures, without training anything:

  correlation   mean Pearson correlation of the raw pixels of two different images, for
                pairs from the same site and pairs from different sites; and of the same
                patient rendered at two sites (`render` with the same index). `site_nn` is the
                share of images whose raw-pixel nearest neighbour (Euclidean) is from their own
                site (sites must stay distinct: they are the out-of-distribution test).
  retrieval     the pretraining pipeline itself (`pipeline.make_pretrain_dataset`, two views
                per record, the cxr preset's "pretrain" ops at --image_size, batch
                --batch_size): the share of views whose nearest neighbour among the batch's
                other 2B-1 views is their own partner, by Euclidean distance on raw pixels and
                by Pearson correlation (invariant to the brightness/contrast jitter). Chance is
                1 / (2B - 1). `nearest_other_same_site`: the share of views whose nearest view
                other than the partner comes from their own site (site dominance; 1/4 if the
                site did not matter).
  reference     the same retrieval for unrelated images (Gaussian random fields, `RandomFields`):
                the ceiling the ops themselves leave to any data set.
  probe         findings still visible to a linear model: logistic regression (scikit-learn,
                standardised pixels, C=0.1) on --probe_train site-A "train" images, macro AUC
                over the four findings on --probe_test site-A "test" images.

Output: one JSON object per line (one per measurement, then `"summary": true`).

  # The module in the working tree:
  python -m experiments.benchmarks.synthetic_separability
  # Another version of the module, e.g. the last committed one, for a before/after:
  git show HEAD:data_pipelines/sources/synthetic.py > /tmp/synthetic_before.py
  python -m experiments.benchmarks.synthetic_separability --source_file=/tmp/synthetic_before.py

A before/after of a generator change, and how to read these numbers (partner retrieval
measures the augmentation more than the data; whether SimCLR learns patients has to be measured
by training): experiments/results/quickstart/README.md.
"""
from __future__ import annotations

import importlib.util
import json
import time
from typing import Any

from absl import app
from absl import flags
import numpy as np

from data_pipelines import pipeline, stream
from data_pipelines import presets

_SOURCE_FILE = flags.DEFINE_string(
    "source_file", "", "Path of another synthetic.py to measure (default: the package's).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 32, "Rendered (and view) side in pixels.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 1024, "Images for the correlations.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Records per retrieval batch.")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 32, "Retrieval batches.")
_PROBE_TRAIN = flags.DEFINE_integer("probe_train", 2048, "Site-A training images; 0: no probe.")
_PROBE_TEST = flags.DEFINE_integer("probe_test", 1024, "Site-A test images.")
_SEED = flags.DEFINE_integer("seed", 0, "Dataset (and pipeline) seed.")
_REFERENCE = flags.DEFINE_bool(
    "reference", True, "Also measure retrieval on unrelated random images (the ops' ceiling).")


def load_source_class(path: str) -> type:
  """SyntheticCXR from the package, or from the file at `path` (an older copy of the module)."""
  if not path:
    from data_pipelines.sources.synthetic import SyntheticCXR  # pylint: disable=g-import-not-at-top
    return SyntheticCXR
  spec = importlib.util.spec_from_file_location("synthetic_under_test", path)
  if spec is None or spec.loader is None:
    raise ValueError(f"--source_file={path!r} is not a Python file")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.SyntheticCXR


def _pixels(source: Any, indices: Any) -> np.ndarray:
  return np.stack([source[int(i)]["image"].reshape(-1) for i in indices]).astype(np.float64)


def _standardise(x: np.ndarray) -> np.ndarray:
  x = x - x.mean(axis=1, keepdims=True)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def pixel_correlations(source_class: type, num_images: int, image_size: int,
                       seed: int) -> dict[str, Any]:
  """Mean raw-pixel Pearson correlation of different patients, same site vs across sites.

  Args:
    source_class: SyntheticCXR (or an older version of it).
    num_images: images of split "unlabeled" (all sites).
    image_size: side in pixels.
    seed: dataset seed.

  Returns:
    same_site / cross_site means, per-site same-site means, the same patient across sites
    (per site pair, site A's rendering against each other's), and site_nn (share of images
    whose Euclidean nearest neighbour is from their own site).
  """
  source = source_class("unlabeled", num_examples=num_images, image_size=image_size, seed=seed)
  pixels = _pixels(source, range(num_images))
  sites = np.asarray(source.record_sites)
  z = _standardise(pixels)
  corr = z @ z.T
  same = sites[:, None] == sites[None, :]
  off_diagonal = ~np.eye(num_images, dtype=bool)
  result = {
      "same_site": float(corr[same & off_diagonal].mean()),
      "cross_site": float(corr[~same].mean()),
      "same_site_by_site": {
          "ABCD"[s]: float(corr[np.ix_(sites == s, sites == s)][
              ~np.eye(int((sites == s).sum()), dtype=bool)].mean()) for s in range(4)},
  }
  # The same patient (anatomy and findings) at two sites.
  count = min(num_images, 128)
  findings = np.asarray(source.findings)
  renders = {s: np.stack([source.render(i, findings[i], s)[0].reshape(-1) for i in range(count)])
             for s in "ABCD"}
  result["same_patient_a_vs"] = {
      s: float(np.mean(np.sum(_standardise(renders["A"].astype(np.float64)) *
                              _standardise(renders[s].astype(np.float64)), axis=1)))
      for s in "BCD"}
  squared = np.square(pixels).sum(axis=1)
  distance = squared[:, None] + squared[None, :] - 2 * pixels @ pixels.T
  np.fill_diagonal(distance, np.inf)
  result["site_nn"] = float(np.mean(sites[np.argmin(distance, axis=1)] == sites))
  return result


def partner_retrieval(source: Any, image_size: int, batch_size: int, num_batches: int,
                      seed: int) -> dict[str, Any]:
  """Share of augmented views whose pixel-space nearest neighbour in the batch is their partner.

  Args:
    source: a source of at least batch_size * num_batches records (SyntheticCXR "unlabeled",
      or RandomFields for the reference).
    image_size: view side in pixels.
    batch_size: records per batch (each gives two views).
    num_batches: batches measured.
    seed: pipeline seed.

  Returns:
    euclidean / correlation top-1 partner retrieval, the chance level, and the share of views
    whose (Euclidean) nearest non-partner view is from the same site.
  """
  options = stream.StreamOptions(seed=seed, shard_index=0, shard_count=1, num_epochs=1,
                                 num_channels=1, worker_count=0, read_threads=1)
  dataset = pipeline.make_pretrain_dataset(
      source, batch_size=batch_size, ops=presets.get_preset("cxr", "pretrain", image_size),
      options=options, num_views=2)
  hits = {"euclidean": [], "correlation": []}
  same_site_neighbour = []
  for batch in dataset:
    views = np.asarray(batch["views"], np.float64)          # (B, 2, H, W, 1)
    b = views.shape[0]
    x = views.reshape(2 * b, -1)                            # view 2i and 2i+1 are partners
    sites = np.repeat(np.asarray(batch["site"]), 2)
    partner = np.arange(2 * b) ^ 1
    squared = np.square(x).sum(axis=1)
    scores = {"euclidean": -(squared[:, None] + squared[None, :] - 2 * x @ x.T)}
    z = _standardise(x)
    scores["correlation"] = z @ z.T
    for name, score in scores.items():
      np.fill_diagonal(score, -np.inf)
      hits[name].append(np.argmax(score, axis=1) == partner)
    score = scores["euclidean"]
    score[np.arange(2 * b), partner] = -np.inf
    same_site_neighbour.append(sites[np.argmax(score, axis=1)] == sites)
  return {"euclidean": float(np.concatenate(hits["euclidean"]).mean()),
          "correlation": float(np.concatenate(hits["correlation"]).mean()),
          "chance": 1.0 / (2 * batch_size - 1),
          "nearest_other_same_site": float(np.concatenate(same_site_neighbour).mean()),
          "views": int(sum(len(h) for h in hits["euclidean"]))}


class RandomFields:
  """A source of unrelated images: Gaussian random fields (white noise smoothed at `sigma`
  pixels), one per record, uint8 with mean 128 and standard deviation 50. The retrieval of
  such images under the pretraining ops is the ceiling the ops leave to any data set."""

  def __init__(self, num_examples: int, image_size: int, sigma: float, seed: int):
    self.num_examples, self.image_size, self.sigma, self.seed = (num_examples, image_size,
                                                                  sigma, seed)

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict[str, Any]:
    from scipy import ndimage  # pylint: disable=g-import-not-at-top
    rng = np.random.default_rng([self.seed, int(index)])
    field = ndimage.gaussian_filter(rng.standard_normal((self.image_size,) * 2), self.sigma,
                                    mode="wrap")
    image = np.clip(128 + 50 * field / field.std(), 0, 255).astype(np.uint8)
    return {"image": image[:, :, None], "label": np.int32(-1), "site": np.int32(0)}


def findings_probe(source_class: type, image_size: int, num_train: int, num_test: int,
                   seed: int) -> dict[str, Any]:
  """Macro AUC of a pixel-space logistic regression on site A (train -> test split)."""
  from sklearn import linear_model, metrics, preprocessing  # pylint: disable=g-import-not-at-top
  train = source_class("train", num_examples=num_train, image_size=image_size, sites="A",
                       seed=seed)
  test = source_class("test", num_examples=num_test, image_size=image_size, sites="A", seed=seed)
  x_train, x_test = _pixels(train, range(num_train)), _pixels(test, range(num_test))
  scaler = preprocessing.StandardScaler().fit(x_train)
  x_train, x_test = scaler.transform(x_train), scaler.transform(x_test)
  aucs = {}
  for k, name in enumerate(("nodule", "opacity", "effusion", "cardiomegaly")):
    model = linear_model.LogisticRegression(C=0.1, max_iter=2000)
    model.fit(x_train, train.findings[:, k])
    aucs[name] = float(metrics.roc_auc_score(test.findings[:, k], model.decision_function(x_test)))
  return {"macro_auc": float(np.mean(list(aucs.values()))), "auc": aucs}


def main(argv):
  del argv
  source_class = load_source_class(_SOURCE_FILE.value)
  which = _SOURCE_FILE.value or "data_pipelines/sources/synthetic.py"
  common = {"source": which, "image_size": _IMAGE_SIZE.value, "seed": _SEED.value}
  summary = dict(common, summary=True)

  start = time.perf_counter()
  corr = pixel_correlations(source_class, _NUM_IMAGES.value, _IMAGE_SIZE.value, _SEED.value)
  print(json.dumps(dict(common, measurement="correlation", num_images=_NUM_IMAGES.value,
                        seconds=round(time.perf_counter() - start, 1), **corr)), flush=True)
  summary.update(same_site_correlation=corr["same_site"], cross_site_correlation=corr["cross_site"],
                 site_nn=corr["site_nn"])

  num_records = _BATCH_SIZE.value * _NUM_BATCHES.value
  start = time.perf_counter()
  retrieval = partner_retrieval(
      source_class("unlabeled", num_examples=num_records, image_size=_IMAGE_SIZE.value,
                   seed=_SEED.value),
      _IMAGE_SIZE.value, _BATCH_SIZE.value, _NUM_BATCHES.value, _SEED.value)
  print(json.dumps(dict(common, measurement="retrieval", batch_size=_BATCH_SIZE.value,
                        seconds=round(time.perf_counter() - start, 1), **retrieval)), flush=True)
  summary.update(retrieval_euclidean=retrieval["euclidean"],
                 retrieval_correlation=retrieval["correlation"],
                 nearest_other_same_site=retrieval["nearest_other_same_site"])
  if _REFERENCE.value:
    sigma = _IMAGE_SIZE.value / 8
    reference = partner_retrieval(RandomFields(num_records, _IMAGE_SIZE.value, sigma, _SEED.value),
                                  _IMAGE_SIZE.value, _BATCH_SIZE.value, _NUM_BATCHES.value,
                                  _SEED.value)
    del reference["nearest_other_same_site"]  # one site
    print(json.dumps(dict(common, source="random_fields", sigma_px=sigma,
                          measurement="retrieval_reference", batch_size=_BATCH_SIZE.value,
                          **reference)), flush=True)
    summary.update(reference_retrieval_euclidean=reference["euclidean"],
                   reference_retrieval_correlation=reference["correlation"])

  if _PROBE_TRAIN.value > 0:
    start = time.perf_counter()
    probe = findings_probe(source_class, _IMAGE_SIZE.value, _PROBE_TRAIN.value, _PROBE_TEST.value,
                           _SEED.value)
    print(json.dumps(dict(common, measurement="probe", num_train=_PROBE_TRAIN.value,
                          num_test=_PROBE_TEST.value,
                          seconds=round(time.perf_counter() - start, 1), **probe)), flush=True)
    summary.update(probe_macro_auc=probe["macro_auc"])
  print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()}),
        flush=True)


if __name__ == "__main__":
  app.run(main)
