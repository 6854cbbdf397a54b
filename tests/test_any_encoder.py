"""Any encoder of the model zoo (BiT or ViT) for the contrastive objectives, chosen by name."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import pretrain_cluster, pretrain_simclr
from remedis_jax import models, sharding, train_cluster, train_simclr

VIT = "ViT-micro/4"


def _shapes(tree):
  return jax.tree.map(lambda x: tuple(x.shape), tree)


def _views(rng, batch, count, size):
  return rng.integers(0, 256, (batch, count, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("trainer", ["simclr", "cluster"])
def test_vit_encoder_for_simclr_and_clustering(trainer):
  module, config = {"simclr": (train_simclr, pretrain_simclr.get_config("smoke")),
                    "cluster": (train_cluster, pretrain_cluster.get_config("smoke"))}[trainer]
  config.model.name = VIT
  config.mesh.devices = 1  # the ViT's sharded steps: tests/test_train_gmml.py
  mesh = sharding.make_mesh(config.mesh)
  setup = module.create_train_setup(config, mesh, num_classes=0, multi_label=False,
                                    total_steps=10, warmup_steps=1)
  # The encoder's parameters are exactly the zoo's ViT (so an export fine-tunes like any ViT).
  size = config.data.image_size
  zoo_params = jax.eval_shape(models.create_model(VIT).init, jax.random.key(0),
                              jnp.zeros((1, size, size, 3)))["params"]
  assert _shapes(setup.abstract_state.params["encoder"]) == _shapes(zoo_params)

  state = sharding.create_sharded(setup.init_state, jax.random.key(0),
                                  shardings=setup.state_shardings)
  before = jax.device_get(state.params["encoder"])
  rng = np.random.default_rng(0)
  batch = {"views": _views(rng, config.batch_size, 2, size),
           "global_views": _views(rng, config.batch_size, 2, size),
           "site": np.zeros(config.batch_size, np.int32)}
  if trainer == "cluster" and config.multicrop.num_local > 0:
    batch["local_views"] = _views(rng, config.batch_size, config.multicrop.num_local,
                                  config.multicrop.local_size)
  batch = sharding.shard_host_batch({k: batch[k] for k in setup.batch_keys},
                                    sharding.batch_sharding(mesh))
  for _ in range(2):  # the first step has learning rate 0 (warm-up starts there)
    state, metrics = setup.update_fn(state, batch)
    assert np.isfinite(float(metrics.compute()["loss"]))
  assert int(state.step) == 2
  after = jax.device_get(state.params["encoder"])
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), before, after))
  assert any(changed)  # the ViT itself was trained, not only the head


def test_bit_only_option_with_a_vit_is_a_clear_error():
  config = pretrain_simclr.get_config("smoke")
  config.model.name = VIT
  config.model.stem = "small"
  with pytest.raises(ValueError, match="stem='small' is a BiT ResNet option"):
    train_simclr.build_model(config)
