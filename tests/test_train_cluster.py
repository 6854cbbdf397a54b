"""Clustering / hybrid trainer: sharded update step, prototype freezing, queue, hybrid mask, runs."""

import os

import jax
import ml_collections
import numpy as np
import pytest

from configs import pretrain_cluster
from remedis_jax import checkpointing, export, sharding, train_cluster, writers
from remedis_jax.train_state import normalize_images
from tests import fakes


def smoke_config(variant="smoke", **overrides) -> ml_collections.ConfigDict:
  """One device; sharding: the 8-device hybrid step test."""
  return fakes.smoke_config("pretrain_cluster", variant, **overrides)


def _batch(batch_size=16, num_local=2, seed=0, labeled=None):
  rng = np.random.default_rng(seed)
  batch = {"global_views": rng.integers(0, 256, (batch_size, 2, 32, 32, 3), dtype=np.uint8),
           "label": (rng.random((batch_size, 4)) < 0.3).astype(np.float32),
           "labeled": np.ones(batch_size, np.float32) if labeled is None else labeled}
  if num_local:
    batch["local_views"] = rng.integers(0, 256, (batch_size, num_local, 16, 16, 3),
                                        dtype=np.uint8)
  return batch


def _setup(config, mesh, num_classes=4):
  return train_cluster.create_train_setup(config, mesh, num_classes=num_classes,
                                          multi_label=True, total_steps=10, warmup_steps=0)


def _mesh(num_devices):
  return sharding.make_mesh({"devices": num_devices})


def _step(setup, state, batch, mesh):
  device_batch = sharding.shard_host_batch({k: batch[k] for k in setup.batch_keys},
                                           sharding.batch_sharding(mesh))
  return setup.update_fn(state, device_batch)


def test_hybrid_update_step_freezing_queue_and_8_devices():
  """One compiled hybrid step (1 and 8 devices) checks sharding, freezing, queue and the mask.

  Codes are balanced over the GLOBAL batch: 8 shards of 2 images give the 1-device step.
  """
  config = smoke_config("hybrid_smoke", **{"cluster.queue_size": 48,
                                            "cluster.freeze_prototypes_steps": 1})
  batch = _batch(labeled=(np.arange(16) % 2).astype(np.float32))
  mesh_1, mesh = _mesh(1), _mesh(8)
  setup_1, setup = _setup(config, mesh_1), _setup(config, mesh)
  # One initialisation (one program to compile), its state placed on 1 and on 8 devices.
  initial_state = jax.device_get(sharding.create_sharded(
      setup_1.init_state, jax.random.key(0), shardings=setup_1.state_shardings))
  initial = initial_state.params
  state_1, metrics_1 = _step(setup_1, jax.device_put(initial_state, setup_1.state_shardings),
                             batch, mesh_1)
  state_8, metrics_8 = _step(setup, jax.device_put(initial_state, setup.state_shardings), batch,
                             mesh)
  state_1, metrics_1 = jax.device_get(state_1), metrics_1.compute()
  state_8, metrics_8 = jax.device_get(state_8), metrics_8.compute()
  for name in ("loss", "contrastive_loss", "cluster_loss", "supervised_loss",
               "cluster_usage_entropy", "grad_norm"):
    np.testing.assert_allclose(metrics_8[name], metrics_1[name], rtol=1e-4, err_msg=name)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               state_8.params, state_1.params)
  np.testing.assert_allclose(state_8.queue, state_1.queue, atol=1e-5)
  # The objective is the weighted sum of its logged terms.
  expected = (metrics_1["contrastive_loss"] + metrics_1["cluster_loss"]
              + config.loss.supervised_weight * metrics_1["supervised_loss"])
  np.testing.assert_allclose(metrics_1["loss"], expected, rtol=1e-5)
  # Half the records are labeled (labeled = 0/1 alternating); all have 4 valid labels.
  np.testing.assert_allclose(metrics_1["labeled_fraction"], 0.5)

  # Step 0 < freeze_prototypes_steps: the prototypes did not move; the encoder did.
  np.testing.assert_array_equal(state_1.params["prototypes"]["kernel"],
                                initial["prototypes"]["kernel"])
  assert not np.allclose(state_1.params["encoder"]["root_block"]["conv_root"]["kernel"],
                         initial["encoder"]["root_block"]["conv_root"]["kernel"])
  # The queue's newest 32 rows are the l2-normalised projections of this batch's global views
  # (computed with the parameters the step started from), the rest still empty.
  images = normalize_images(batch["global_views"].reshape((32, 32, 32, 3)))
  project = jax.jit(lambda params, images: setup.model.apply({"params": params}, images,
                                                            train=True)[0])
  z = project({"encoder": initial["encoder"], "head": initial["head"]}, images)
  z = np.asarray(z, np.float64)
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  np.testing.assert_allclose(state_1.queue[:32], z, atol=1e-5)
  np.testing.assert_array_equal(state_1.queue[32:], 0.0)

  # Step 1 (on the 8 devices): the prototypes train; FIFO moved the first batch's rows back
  # (16 still fit).
  state = jax.device_put(state_1, setup.state_shardings)
  state, _ = _step(setup, state, _batch(seed=1), mesh)
  after_2 = jax.device_get(state)
  assert not np.allclose(after_2.params["prototypes"]["kernel"], initial["prototypes"]["kernel"])
  np.testing.assert_allclose(after_2.queue[32:48], state_1.queue[:16])

  # A batch without a labeled record gives no supervised signal: loss 0 and the zero-initialised
  # classifier gets no gradient (momentum starts at 0 and weight decay keeps zeros at zero).
  state = jax.device_put(initial_state, setup.state_shardings)
  state, metrics = _step(setup, state, _batch(labeled=np.zeros(16, np.float32)), mesh)
  values = metrics.compute()
  assert float(values["supervised_loss"]) == 0.0 and float(values["labeled_fraction"]) == 0.0
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params["classifier"]),
               initial["classifier"])


def test_hybrid_without_labels_is_rejected():
  config = smoke_config("hybrid_smoke")
  with pytest.raises(ValueError, match="needs labels"):
    _setup(config, _mesh(1), num_classes=0)


def test_cluster_run_resume_and_export(tmp_path):
  workdir = str(tmp_path / "run")
  config = smoke_config(**{"total_steps": 3, "cluster.queue_size": 32})
  summary = train_cluster.train_and_evaluate(config, workdir)
  assert summary["steps"] == 3 and summary["initialisation"] == "scratch"
  records = [r for r in writers.read_metrics(workdir) if "train/loss" in r]
  assert len(records) == 3 and all(np.isfinite(r["train/cluster_loss"]) for r in records)
  assert all(0.0 <= r["train/cluster_usage_entropy"] <= np.log(8) + 1e-6 for r in records)
  params, step = checkpointing.load_params(workdir)
  assert step == 3 and set(params) == {"encoder", "head", "prototypes", "probe"}

  # Resuming the finished run restores its state (queue included) and trains nothing more.
  again = train_cluster.train_and_evaluate(config, workdir)
  assert again["steps"] == 3 and again["initialisation"].startswith("resumed")

  # The encoder exports like a SimCLR one, so fine-tuning and sweeps can start from it.
  out = str(tmp_path / "export")
  metadata = export.export_workdir(workdir, out)
  assert metadata["model_name"] == "R_micro" and os.path.isdir(out)


def test_queue_is_used_from_the_step_it_is_full():
  # 48 rows, 16 images x 2 global views per step: full after 2 steps.
  assert train_cluster.queue_full_step(48, 16, 2) == 2
  assert train_cluster.queue_full_step(65, 16, 2) == 3
  assert train_cluster.queue_full_step(0, 16, 2) == 0


@pytest.mark.parametrize("variant", pretrain_cluster.VARIANTS)
def test_every_variant_builds_and_names_the_cluster_trainer(variant):
  from remedis_jax import main  # pylint: disable=g-import-not-at-top
  config = pretrain_cluster.get_config(variant)
  assert main.TRAINERS[config.trainer] == "remedis_jax.train_cluster"
  assert config.multicrop.num_local >= 0 and config.cluster.num_prototypes > 0
  assert (config.loss.supervised_weight > 0) == variant.startswith("hybrid_")
