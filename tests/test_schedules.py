"""The learning-rate and weight-decay schedules (optax's, joined) equal the project's earlier
hand-written formulas step for step (a NumPy transcription of them here)."""

import itertools

import numpy as np
import pytest

from remedis_jax import optimizers


def _reference_lr(kind, peak, end_factor, warmup, total, step):
  """The formula the project used before it built schedules from optax."""
  end = peak * end_factor
  progress = np.clip((step - warmup) / max(total - warmup, 1), 0.0, 1.0)
  if kind == "cosine":
    decayed = end + (peak - end) * 0.5 * (1.0 + np.cos(np.pi * progress))
  elif kind == "linear":
    decayed = peak + (end - peak) * progress
  else:
    decayed = peak
  if warmup == 0:
    return decayed
  return peak * step / warmup if step < warmup else decayed


def _reference_wd(start, end, total, step):
  progress = np.clip(step / max(total - 1, 1), 0.0, 1.0)
  return end + (start - end) * 0.5 * (1.0 + np.cos(np.pi * progress))


@pytest.mark.parametrize("kind,warmup,end_factor", list(itertools.product(
    ["cosine", "linear", "constant"], [0, 1, 7], [0.0, 0.1])))
def test_learning_rate_schedule_equals_the_formula_step_for_step(kind, warmup, end_factor):
  config = optimizers.default_optimizer_config()
  config.update(schedule=kind, warmup_steps=warmup, end_lr_factor=end_factor,
                learning_rate=0.3, lr_scaling="none")
  total = 40
  _, schedule = optimizers.make_optimizer(config, total_steps=total, batch_size=256)
  for step in range(total + 5):  # past the end too
    np.testing.assert_allclose(float(schedule(step)),
                               _reference_lr(kind, 0.3, end_factor, warmup, total, step),
                               rtol=2e-6, atol=1e-8, err_msg=f"step {step}")


@pytest.mark.parametrize("start,end", [(0.04, 0.4), (0.4, 0.04), (0.0, 0.1)])
def test_weight_decay_schedule_equals_the_formula_step_for_step(start, end):
  config = optimizers.default_optimizer_config()
  config.update(name="adamw", weight_decay=start, weight_decay_end=end)
  total = 30
  schedule = optimizers.make_weight_decay_schedule(config, total)
  for step in range(total + 3):
    np.testing.assert_allclose(float(schedule(step)), _reference_wd(start, end, total, step),
                               rtol=2e-6, atol=1e-8, err_msg=f"step {step}")
