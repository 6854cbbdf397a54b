"""Fine-tuning recipes that keep pretrained features: encoder learning-rate multiplier, LP-FT."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from remedis_jax import train_finetune


def _params():
  return {"encoder": {"conv": {"kernel": jnp.ones((3, 2))}, "norm": {"scale": jnp.ones((2,))}},
          "classifier": {"kernel": jnp.ones((2, 4)), "bias": jnp.zeros((4,))}}


@pytest.mark.parametrize("multiplier,frozen_steps", [(0.1, 0), (1.0, 3), (0.25, 2)])
def test_encoder_updates_are_scaled_after_the_frozen_steps(multiplier, frozen_steps):
  learning_rate = 0.5
  tx = train_finetune.scale_encoder_updates(optax.sgd(learning_rate), multiplier=multiplier,
                                            frozen_steps=frozen_steps)
  params = _params()
  state = tx.init(params)
  rng = np.random.default_rng(0)
  for step in range(5):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    updates, state = tx.update(grads, state, params)
    encoder_factor = 0.0 if step < frozen_steps else multiplier
    for part, factor in (("encoder", encoder_factor), ("classifier", 1.0)):
      for got, grad in zip(jax.tree.leaves(updates[part]), jax.tree.leaves(grads[part])):
        np.testing.assert_allclose(got, -learning_rate * factor * np.asarray(grad), rtol=1e-6)


def test_defaults_leave_the_optimiser_untouched_and_bad_values_fail():
  tx = optax.adam(1e-3)
  assert train_finetune.scale_encoder_updates(tx, multiplier=1.0, frozen_steps=0) is tx
  with pytest.raises(ValueError, match="encoder_lr_multiplier"):
    train_finetune.scale_encoder_updates(tx, multiplier=-0.1, frozen_steps=0)
  with pytest.raises(ValueError, match="encoder_frozen_steps"):
    train_finetune.scale_encoder_updates(tx, multiplier=1.0, frozen_steps=-1)
