"""The one train loop (remedis_jax/loop.py) on a model small enough to check by hand.

A linear regression y = w.x trained by SGD: the loop must run every step once and in order,
call its hooks when they are due and in the documented order, resume exactly from its
checkpoint with the same hooks, and stop on a non-finite step.
"""

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from remedis_jax import loop, sharding, train_state, writers

W_TRUE = np.array([1.5, -2.0, 0.5], np.float32)


def _config(total_steps=6, **overrides):
  config = ml_collections.ConfigDict({
      "seed": 0, "batch_size": 8, "log_every_steps": 2, "checkpoint_every_steps": 3,
      "keep_checkpoints": 3, "async_checkpointing": False, "progress_every_secs": 3600,
      "profile": {"first_step": 1, "num_steps": 0}, "total_steps": total_steps})
  config.update(overrides)
  return config


def _setup(mesh, learning_rate=0.1):
  tx = optax.sgd(learning_rate)
  metrics_cls = train_state.make_metrics_cls(("loss",))

  def init_state(rng):
    params = {"w": jnp.zeros((3,), jnp.float32) + 0.0 * jax.random.normal(rng, ())}
    return train_state.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                  opt_state=tx.init(params))

  def update_fn(state, batch):
    def loss_fn(params):
      return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    state, metrics = train_state.apply_gradients(state, tx, loss, grads, {"loss": loss})
    return state, metrics_cls.single_from_model_output(**metrics)

  abstract_state, state_shardings, jitted = train_state.build_step(init_state, update_fn, mesh)
  return train_state.TrainSetup(
      model=None, tx=tx, schedule=lambda step: learning_rate,
      optimizer_config=ml_collections.ConfigDict({"frozen": ()}), init_state=init_state,
      abstract_state=abstract_state, state_shardings=state_shardings, update_fn=jitted,
      batch_keys=("x", "y"))


def _batches(scale=1.0):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 8, 3)).astype(np.float32)
  y = (x @ W_TRUE * scale).astype(np.float32)
  records = [{"x": x[i], "y": y[i]} for i in range(64)]
  return grain.MapDataset.source(records)


def _sgd_reference(steps, learning_rate=0.1):
  """NumPy SGD on the same batches, in float64."""
  data = list(_batches())
  w = np.zeros(3)
  for i in range(steps):
    x, y = data[i]["x"].astype(np.float64), data[i]["y"].astype(np.float64)
    w -= learning_rate * 2.0 * x.T @ (x @ w - y) / len(y)
  return w


class RecordingHook(loop.Hook):
  name = "recording"

  def __init__(self, every):
    self.every, self.calls = every, []

  def start(self, step, state):
    self.calls.append(("start", step, int(state.step)))

  def due(self, step, is_last):
    return step % self.every == 0 or is_last

  def run(self, step, state):
    self.calls.append(("run", step, int(state.step)))

  def end(self, step, state):
    self.calls.append(("end", step, int(state.step)))


def _train(config, workdir, hook, data=None, init=None):
  mesh = sharding.make_mesh(None)
  writer = writers.create_writer(str(workdir), "")
  return loop.train(config, str(workdir), setup=_setup(mesh), mesh=mesh, writer=writer,
                    data_iterator=iter(data or _batches()), total_steps=config.total_steps,
                    init=init or (lambda state: (state, "scratch")), hooks=[hook])


def test_loop_trains_every_step_once_and_calls_hooks_when_due(tmp_path):
  hook = RecordingHook(every=4)
  result = _train(_config(total_steps=6), tmp_path, hook)
  assert (result.steps, result.start_step, result.preempted) == (6, 0, False)
  assert result.initialisation == "scratch"
  assert hook.calls == [("start", 0, 0), ("run", 4, 4), ("run", 6, 6), ("end", 6, 6)]
  np.testing.assert_allclose(np.asarray(result.state.params["w"]), _sgd_reference(6),
                             rtol=1e-4)
  assert result.checkpoint.endswith("/6")
  logged = [r["step"] for r in writers.read_metrics(str(tmp_path)) if "train/loss" in r]
  assert logged == [2, 4, 6]


def test_loop_resumes_from_its_checkpoint_and_starts_hooks_there(tmp_path):
  _train(_config(total_steps=3), tmp_path, RecordingHook(every=100))  # checkpoint at step 3
  hook = RecordingHook(every=100)
  result = _train(_config(total_steps=6), tmp_path, hook,
                  init=lambda state: pytest.fail("a resumed run must not initialise"))
  assert result.start_step == 3 and result.initialisation.startswith("resumed from")
  assert hook.calls == [("start", 3, 3), ("run", 6, 6), ("end", 6, 6)]
  # The same parameters as six steps in one go: the iterator resumed at batch 3.
  np.testing.assert_allclose(np.asarray(result.state.params["w"]), _sgd_reference(6),
                             rtol=1e-4)


def test_loop_stops_on_a_non_finite_step_and_keeps_the_last_good_checkpoint(tmp_path):
  records = list(_batches())
  records[4] = {"x": records[4]["x"], "y": np.full_like(records[4]["y"], np.nan)}
  hook = RecordingHook(every=100)
  with pytest.raises(FloatingPointError, match=r"before step 6 .*checkpoint is kept: .*/3"):
    _train(_config(total_steps=8), tmp_path, hook, data=grain.MapDataset.source(records))
  assert ("end", 8, 8) not in hook.calls
