"""`--format=savedmodel`: the SavedModel, loaded and run by TensorFlow itself on uint8 images,
gives the JAX model's outputs (features, logits, probabilities; a projection head's output).

TensorFlow runs in a child process (`EXPORT_AND_SERVE`): it exports the workdirs and serves
the SavedModels there, and the test compares with the JAX model in this process. In a pytest
worker, TensorFlow would have to be imported before timm's torchvision (tests/
test_export_timm.py) or the process aborts, and the worker order is not ours to choose.
"""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from remedis_jax import export, models
from tests.fakes import fake_run_workdir, max_relative_difference, random_bit_params

SIZE = 48

EXPORT_AND_SERVE = """
import json, sys
import numpy as np
import tensorflow as tf
from remedis_jax import export
request = json.loads(sys.argv[1])
images = np.load(request["images"])
served = {}
for name, job in request["exports"].items():
  export.export_workdir(job["workdir"], job["out"], include_head=job["include_head"],
                        export_format="savedmodel")
  signature = tf.saved_model.load(job["out"]).signatures["serving_default"]
  spec = signature.structured_input_signature[1]["images"]
  served[name + "/spec"] = np.array([spec.dtype.name, str(spec.shape.as_list())])
  for key, value in signature(images=tf.constant(images)).items():
    served[name + "/" + key] = value.numpy()
np.savez(request["served"], **served)
"""

CLASSIFIER_SEED, ENCODER_SEEDS = 6, {"finetuned": 5, "pretrained": 8}


def classifier_params():
  rng = np.random.default_rng(CLASSIFIER_SEED)
  return {"kernel": rng.normal(0, 0.1, (256, 2)).astype(np.float32),
          "bias": rng.normal(0, 0.1, (2,)).astype(np.float32)}


HEAD = models.ProjectionHead(hidden_dims=(16,), output_dim=8, norm="layer")


def head_params():
  return jax.jit(HEAD.init)(jax.random.key(1), jnp.zeros((1, 256)))["params"]


@pytest.fixture(scope="module", name="served")
def fixture_served(tmp_path_factory):
  """Exports a fine-tuning run and a pretraining run (with its projection head) as
  SavedModels and serves them; returns (images, {name: output}, tmp folder)."""
  tmp = tmp_path_factory.mktemp("savedmodel")
  results = {"task": {"num_classes": 2, "multi_label": True, "class_names": ["a", "b"]},
             "test_sets": {"test": {"metrics": {"macro_auc": 0.5}}}}
  finetuned = fake_run_workdir(
      tmp / "finetuned_run", {"encoder": random_bit_params("R_micro", ENCODER_SEEDS["finetuned"]),
                              "classifier": classifier_params()},
      data={"image_size": SIZE}, results=results)
  pretrained = fake_run_workdir(
      tmp / "pretrained_run", {"encoder": random_bit_params("R_micro",
                                                            ENCODER_SEEDS["pretrained"]),
                               "head": head_params()},
      trainer="simclr", data={"image_size": SIZE})
  images = np.random.default_rng(7).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
  np.save(tmp / "images.npy", images)
  request = {"images": str(tmp / "images.npy"), "served": str(tmp / "served.npz"), "exports": {
      "finetuned": {"workdir": finetuned, "out": str(tmp / "finetuned"), "include_head": False},
      "pretrained": {"workdir": pretrained, "out": str(tmp / "pretrained"),
                     "include_head": True}}}
  subprocess.run([sys.executable, "-c", EXPORT_AND_SERVE, json.dumps(request)], check=True,
                 timeout=300)
  with np.load(tmp / "served.npz") as served:
    return images, dict(served), tmp


def jax_features(seed, images):
  _, intermediates = jax.jit(models.create_model("R_micro").apply)(
      {"params": random_bit_params("R_micro", seed)}, images.astype(np.float32) / 127.5 - 1.0)
  return np.asarray(intermediates["pre_logits"])


def test_finetuned_savedmodel_serves_the_jax_outputs(served):
  images, outputs, tmp = served
  assert list(outputs["finetuned/spec"]) == ["uint8", f"[None, {SIZE}, {SIZE}, 3]"]
  assert sorted(k for k in outputs if k.startswith("finetuned/") and k != "finetuned/spec") == [
      "finetuned/logits", "finetuned/pre_logits", "finetuned/probabilities"]
  features = jax_features(ENCODER_SEEDS["finetuned"], images)
  classifier = classifier_params()
  logits = features @ classifier["kernel"] + classifier["bias"]
  assert max_relative_difference(outputs["finetuned/pre_logits"], features) <= 1e-4
  assert max_relative_difference(outputs["finetuned/logits"], logits) <= 1e-4
  # Multi-label: one sigmoid per class.
  assert max_relative_difference(outputs["finetuned/probabilities"],
                                 1 / (1 + np.exp(-logits))) <= 1e-4
  metadata = json.loads((tmp / "finetuned" / export.SAVEDMODEL_METADATA_FILE).read_text())
  assert metadata["task"]["class_names"] == ["a", "b"]
  assert metadata["test_metrics"] == {"test": {"macro_auc": 0.5}}
  assert metadata["input"]["image_size"] == SIZE
  assert not list(tmp.glob("finetuned.partial-*"))


def test_pretraining_savedmodel_serves_the_projection_head(served):
  images, outputs, _ = served
  features = jax_features(ENCODER_SEEDS["pretrained"], images)
  projection, _ = HEAD.apply({"params": head_params()}, features)
  assert max_relative_difference(outputs["pretrained/pre_logits"], features) <= 1e-4
  assert max_relative_difference(outputs["pretrained/projection"], projection) <= 1e-4
  assert "pretrained/logits" not in outputs
