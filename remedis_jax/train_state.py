"""What every trainer's update step shares, whatever its objective.

- `TrainState`: step, parameters, optimiser state (a trainer that carries more across steps
  extends it, e.g. the clustering trainer's feature queue).
- `apply_gradients`: the tail of every update step: the optimiser update, kept only when the
  loss and every gradient are finite (a checkpoint never holds NaNs; the loop stops the run),
  and the gradient and parameter norms.
- `build_step`: the abstract state (`jax.eval_shape`), its shardings over the mesh, and the
  update step jitted with those shardings and the state donated.
- `TrainSetup`: what a trainer hands the loop (remedis_jax/loop.py) besides its data.
- `make_metrics_cls` / `merge_metrics`: per-step metrics averaged over a logging window.
- `normalize_images` and `put_host_tree`: uint8 images to the model's range; host arrays to
  global, sharded arrays.

Imports neither a trainer nor the writers: a step can be built (benchmarks, tests, export)
without the training loop.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
import optax
from clu import metrics as clu_metrics

from remedis_jax import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


class TrainSetup(NamedTuple):
  """Everything the loop needs besides data: built by a trainer's `create_train_setup`."""
  model: nn.Module  # pretraining: encoder + projection head (the kNN monitor and export read it)
  tx: optax.GradientTransformation
  schedule: Callable[[int], float]  # step -> learning rate, for the log
  optimizer_config: ml_collections.ConfigDict  # resolved (warm-up in steps), for the mask log
  init_state: Callable[[jax.Array], Any]  # rng -> a fresh TrainState (or an extension)
  abstract_state: Any  # jax.eval_shape of init_state: .step, .params (["encoder"], ...)
  state_shardings: Any
  update_fn: Callable  # jitted (state, batch) -> (state, metrics); donates `state`
  batch_keys: tuple[str, ...]  # the host batch entries the update step reads
  # Supervised trainers: their jitted (params, images uint8) -> probabilities.
  predict_fn: Callable | None = None
  # Optional objective-specific monitor (e.g. GMML's held-out reconstruction): an object with
  # `every_steps` and `run(params, step) -> {name: float}`; the pretraining loop runs it at
  # step 0 of a fresh run, every `every_steps` steps and at the last step.
  monitor: Any = None


def normalize_images(images: jax.Array) -> jax.Array:
  """uint8 [0, 255] -> float32 [-1, 1] (BiT's input range), on the device."""
  return images.astype(jnp.float32) * (1.0 / 127.5) - 1.0


def keep_if_finite(new_state, old_state, total_loss, grads):
  """`new_state` if the loss and every gradient are finite, else `old_state` (no host sync).

  Returns:
    (state, finite): the chosen state and the float32 scalar flag.
  """
  finite = jnp.isfinite(total_loss) & jnp.all(
      jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
  state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, old_state)
  return state, finite.astype(jnp.float32)


def apply_gradients(state, tx: optax.GradientTransformation, loss: jax.Array, grads: Any,
                    metrics: dict[str, jax.Array], *,
                    transform_updates: Callable[[Any], Any] | None = None, **fields):
  """One optimiser update inside a jitted step, skipped if the loss or a gradient is not finite.

  Args:
    state: a `TrainState` (or an extension of it).
    tx: the optimiser.
    loss: the total loss the gradients are of.
    grads: gradients with the structure of `state.params`.
    metrics: the step's metrics so far.
    transform_updates: applied to the optimiser's updates before they are added (e.g. zeroing
      a frozen part: its weight decay too).
    **fields: other state fields for the new state (e.g. the clustering queue).

  Returns:
    (new state, metrics + nonfinite_steps, grad_norm, param_norm (before the update)).
  """
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  if transform_updates is not None:
    updates = transform_updates(updates)
  new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                            opt_state=opt_state, **fields)
  new_state, finite = keep_if_finite(new_state, state, loss, grads)
  return new_state, {**metrics, "nonfinite_steps": 1.0 - finite,
                     "grad_norm": optax.tree.norm(grads),
                     "param_norm": optax.tree.norm(state.params)}


def build_step(init_state: Callable[[jax.Array], Any], update_fn: Callable, mesh, *,
               param_sharding: str = "replicate", replicated_fields: Iterable[str] = ()):
  """The abstract state, its shardings and the jitted update step.

  Args:
    init_state: `rng -> state` (traced once with `jax.eval_shape`: nothing is allocated).
    update_fn: `(state, batch) -> (state, metrics)`.
    mesh: the device mesh; the batch is sharded over its batch axes, metrics replicated.
    param_sharding: "replicate" or "fsdp" (sharding.param_shardings).
    replicated_fields: state fields every device reads whole (e.g. the clustering queue).

  Returns:
    (abstract_state, state_shardings, jitted update step that donates its state).
  """
  abstract_state = jax.eval_shape(init_state, jax.random.key(0))
  state_shardings = sharding.param_shardings(abstract_state, mesh, strategy=param_sharding)
  for field in replicated_fields:
    if getattr(abstract_state, field) is not None:
      state_shardings = state_shardings.replace(**{field: sharding.replicated(mesh)})
  jitted = jax.jit(update_fn, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                   out_shardings=(state_shardings, sharding.replicated(mesh)),
                   donate_argnums=(0,))
  return abstract_state, state_shardings, jitted


def make_metrics_cls(names):
  """A clu Collection averaging every named per-step metric over the logging window."""
  fields = {name: clu_metrics.Average.from_output(name) for name in names}
  fields["nonfinite_steps"] = clu_metrics.Average.from_output("nonfinite_steps")
  return clu_metrics.Collection.create(**fields)


@jax.jit
def merge_metrics(window):
  """Merges one logging window's per-step metric collections in a single compiled call.

  Merging eagerly after every step dispatches a few tiny device ops per metric per step, which
  shows up as loop overhead when steps are short; this runs once per `log_every_steps`.
  """
  return functools.reduce(lambda a, b: a.merge(b), window)


def put_host_tree(tree, shardings):
  """Host numpy tree -> global jax.Arrays with `shardings` (the same values on every process)."""
  def put(value, sharding_):
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding_, lambda index: value[index])
  return jax.tree.map(put, tree, shardings)
