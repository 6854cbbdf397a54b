"""Tests for remedis_jax.sharding on 8 simulated CPU devices (tests/conftest.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from remedis_jax import losses, optimizers, sharding


@pytest.fixture(autouse=True)
def _eight_devices():
  assert jax.device_count() == 8, "tests/conftest.py should provide 8 CPU devices"


@pytest.mark.parametrize("mesh_config, want", [
    (None, {"data": 8, "fsdp": 1}),
    ({"fsdp": 2}, {"data": 4, "fsdp": 2}),
    ({"data": 2, "fsdp": -1}, {"data": 2, "fsdp": 4}),
    ({"data": 1, "fsdp": 8}, {"data": 1, "fsdp": 8}),
    ({"dcn_data": 1, "fsdp": 4}, {"data": 2, "fsdp": 4}),  # one slice: the plain mesh
])
def test_make_mesh_shapes(mesh_config, want):
  mesh = sharding.make_mesh(mesh_config)
  assert dict(mesh.shape) == want
  assert tuple(mesh.axis_names) == ("data", "fsdp")
  assert all(t == AxisType.Auto for t in mesh.axis_types)
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


@pytest.mark.parametrize("mesh_config, message", [
    ({"data": 3}, r"data x fsdp = 3 but there are 8 devices"),
    ({"data": -1, "fsdp": -1}, r"at most one axis may be -1"),
    ({"data": -1, "fsdp": 3}, r"not divisible by the fixed axis size 3"),
    ({"model": 2}, r"unknown axis name\(s\) \['model'\]"),
    ({"fsdp": 0}, r"fsdp=0 is invalid"),
    # One process (and CPU devices have no slice index): one slice, so dcn_data must be 1.
    ({"dcn_data": 2}, r"dcn_data=2, but the job has 1 processes, each taken as a slice: "
                      r"dcn_data must equal that number \(1\)"),
    ({"dcn_data": 0}, r"dcn_data=0 is invalid"),
    ({"dcn_data": 2, "devices": 4}, r"devices=4 with dcn_data=2: a multi-slice mesh uses every"),
])
def test_make_mesh_errors(mesh_config, message):
  with pytest.raises(ValueError, match=message):
    sharding.make_mesh(mesh_config)


@pytest.mark.parametrize("mesh_config, want", [
    ({"devices": 1}, {"data": 1, "fsdp": 1}),
    ({"devices": 4, "fsdp": 2}, {"data": 2, "fsdp": 2}),
    ({"devices": 3}, {"data": 3, "fsdp": 1}),
    ({"devices": -1, "fsdp": 2}, {"data": 4, "fsdp": 2}),
])
def test_make_mesh_on_the_first_devices(mesh_config, want):
  mesh = sharding.make_mesh(mesh_config)
  assert dict(mesh.shape) == want
  count = want["data"] * want["fsdp"]
  assert sorted(d.id for d in mesh.devices.flat) == [d.id for d in jax.devices()[:count]]
  # A jitted computation on the mesh's shardings runs on those devices only.
  batch = np.arange(count * 6.0).reshape(count * 2, 3)
  x = jax.device_put(batch, sharding.batch_sharding(mesh))
  y = jax.jit(lambda a: a * 2, out_shardings=sharding.replicated(mesh))(x)
  assert y.sharding.device_set == set(mesh.devices.flat)
  np.testing.assert_array_equal(y, batch * 2)


@pytest.mark.parametrize("devices", [0, 9, -2, 1.5, True])
def test_make_mesh_rejects_a_bad_device_count(devices):
  with pytest.raises(ValueError, match=rf"mesh config devices={devices!r} is invalid: use -1 "
                                       r"\(all 8 devices\) or a positive int up to 8"):
    sharding.make_mesh({"devices": devices})


def test_mesh_devices_take_the_first_of_every_process(monkeypatch):
  """With several processes, `devices` counts all of them: the first devices/P of each."""

  class FakeDevice:
    def __init__(self, process_index, id_):
      self.process_index, self.id = process_index, id_

  fake = [FakeDevice(p, 10 * p + i) for p in (0, 1) for i in range(4)]
  monkeypatch.setattr(jax, "devices", lambda: fake)
  monkeypatch.setattr(jax, "device_count", lambda: len(fake))
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  assert [d.id for d in sharding._mesh_devices({"devices": 4})] == [0, 1, 10, 11]  # pylint: disable=protected-access
  assert sharding._mesh_devices({"devices": -1}) is None  # pylint: disable=protected-access
  with pytest.raises(ValueError, match=r"multiple of the number of processes \(2\)"):
    sharding._mesh_devices({"devices": 3})  # pylint: disable=protected-access


def test_make_mesh_axes_must_fit_the_devices_used():
  with pytest.raises(ValueError, match=r"data x fsdp = 4 but there are 2 devices"):
    sharding.make_mesh({"devices": 2, "data": 4})


def test_batch_and_replicated_shardings():
  mesh = sharding.make_mesh({"fsdp": 2})
  assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"))
  assert sharding.replicated(mesh).spec == P()
  x = jax.device_put(np.zeros((16, 3)), sharding.batch_sharding(mesh))
  assert {s.data.shape for s in x.addressable_shards} == {(2, 3)}


def test_fsdp_param_shardings_pick_largest_divisible_dim():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  abstract = {
      "conv": {"kernel": jax.ShapeDtypeStruct((3, 3, 64, 128), jnp.float32)},   # 73,728
      "square": {"kernel": jax.ShapeDtypeStruct((128, 128), jnp.float32)},      # tie -> last dim
      "odd_rows": {"kernel": jax.ShapeDtypeStruct((4099, 8), jnp.float32)},     # 4099 % 4 != 0
      "indivisible": jax.ShapeDtypeStruct((4097, 5), jnp.float32),              # no dim divisible
      "gn": {"scale": jax.ShapeDtypeStruct((128,), jnp.float32)},               # small
      "head": {"kernel": jax.ShapeDtypeStruct((128, 10), jnp.float32)},         # small
      "step": jax.ShapeDtypeStruct((), jnp.int32),
  }
  specs = jax.tree.map(lambda s: s.spec, sharding.param_shardings(abstract, mesh, "fsdp"))
  assert specs == {
      "conv": {"kernel": P(None, None, None, "fsdp")},
      "square": {"kernel": P(None, "fsdp")},
      "odd_rows": {"kernel": P(None, "fsdp")},
      "indivisible": P(),
      "gn": {"scale": P()},
      "head": {"kernel": P()},
      "step": P(),
  }
  # A lower threshold shards the head along its 128 rows (10 is not divisible by 4).
  low = sharding.param_shardings(abstract, mesh, "fsdp", min_size_to_shard=0)
  assert low["head"]["kernel"].spec == P("fsdp", None)
  assert low["gn"]["scale"].spec == P("fsdp")
  replicate = sharding.param_shardings(abstract, mesh, "replicate")
  assert all(s.spec == P() for s in jax.tree.leaves(replicate))
  with pytest.raises(ValueError, match=r"strategy 'zero3' is unknown; valid strategies are 'replicate', 'fsdp'"):
    sharding.param_shardings(abstract, mesh, "zero3")


def test_param_shardings_on_optax_state():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  params = {"encoder": {"kernel": jax.ShapeDtypeStruct((64, 512), jnp.float32)},
            "head": {"kernel": jax.ShapeDtypeStruct((512, 4), jnp.float32),
                     "bias": jax.ShapeDtypeStruct((4,), jnp.float32)}}
  config = optimizers.default_optimizer_config()
  config.frozen = (r"head/bias",)  # exercises MaskedNode / EmptyState leaves
  tx, _ = optimizers.make_optimizer(config, total_steps=10, batch_size=8)
  abstract_state = jax.eval_shape(tx.init, params)
  state_shardings = sharding.param_shardings(abstract_state, mesh, "fsdp", min_size_to_shard=1024)
  assert jax.tree.structure(state_shardings) == jax.tree.structure(abstract_state)
  by_shape = {}
  for leaf, s in zip(jax.tree.leaves(abstract_state), jax.tree.leaves(state_shardings)):
    by_shape[leaf.shape] = s.spec
  assert by_shape[(64, 512)] == P(None, "fsdp")  # momentum of the encoder kernel
  assert by_shape[(512, 4)] == P("fsdp", None)
  assert by_shape[()] == P()  # schedule counters


def test_shard_host_batch_round_trip():
  mesh = sharding.make_mesh({"fsdp": 2})
  rng = np.random.default_rng(0)
  local = {"image": rng.integers(0, 255, size=(16, 4, 4, 1), dtype=np.uint8),
           "label": np.arange(16, dtype=np.int32)}
  batch = sharding.shard_host_batch(local, sharding.batch_sharding(mesh))
  for key, value in local.items():
    assert batch[key].shape == value.shape and batch[key].dtype == value.dtype
    np.testing.assert_array_equal(np.asarray(batch[key]), value)
    assert batch[key].sharding == sharding.batch_sharding(mesh)
    for shard in batch[key].addressable_shards:
      assert shard.data.shape[0] == 2
      np.testing.assert_array_equal(np.asarray(shard.data), value[shard.index])
  with pytest.raises(ValueError, match=r"\['label'\] has 12 rows .* 8 batch shards"):
    sharding.shard_host_batch({"label": np.arange(12)}, sharding.batch_sharding(mesh))


def test_create_sharded_lays_out_outputs_and_matches_plain_init():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})

  def init(rng):
    k1, k2 = jax.random.split(rng)
    return {"big": jax.random.normal(k1, (64, 32)), "small": jax.random.normal(k2, (3,))}

  rng = jax.random.key(0)
  params = sharding.create_sharded(
      init, rng, shardings=lambda a: sharding.param_shardings(a, mesh, "fsdp", min_size_to_shard=512))
  assert params["big"].sharding.spec == P("fsdp", None)
  assert params["small"].sharding.spec == P()
  assert {s.data.shape for s in params["big"].addressable_shards} == {(16, 32)}
  want = jax.jit(init)(rng)
  np.testing.assert_array_equal(np.asarray(params["big"]), np.asarray(want["big"]))
  # A pytree of shardings works as well as a function.
  explicit = sharding.create_sharded(init, rng, shardings={"big": sharding.replicated(mesh),
                                                           "small": sharding.replicated(mesh)})
  assert explicit["big"].sharding.is_fully_replicated


def _train_two_steps(mesh, strategy):
  """Two LARS steps of a linear projection + NT-Xent, laid out per `strategy`."""
  rng = np.random.default_rng(1)
  views = rng.normal(size=(2, 16, 32)).astype(np.float32)
  tx, _ = optimizers.make_optimizer(
      {"learning_rate": 4.0, "weight_decay": 1e-3, "trust_coefficient": 0.01}, total_steps=4, batch_size=16)

  def init(rng):
    return {"projection": {"kernel": jax.random.normal(rng, (32, 64)) * 0.1,
                           "bias": jnp.zeros((64,))}}

  param_sharding_fn = lambda a: sharding.param_shardings(a, mesh, strategy, min_size_to_shard=512)
  params = sharding.create_sharded(init, jax.random.key(3), shardings=param_sharding_fn)
  opt_state = sharding.create_sharded(tx.init, params, shardings=param_sharding_fn)
  params_shardings = jax.tree.map(lambda x: x.sharding, params)
  state_shardings = jax.tree.map(lambda x: x.sharding, opt_state)

  def loss_fn(params, views):
    project = lambda x: x @ params["projection"]["kernel"] + params["projection"]["bias"]
    return losses.nt_xent(project(views[0]), project(views[1]), 0.2)

  def update(params, opt_state, views):
    loss, grads = jax.value_and_grad(loss_fn)(params, views)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  step = jax.jit(
      update,
      in_shardings=(params_shardings, state_shardings, NamedSharding(mesh, P(None, ("data", "fsdp")))),
      out_shardings=(params_shardings, state_shardings, sharding.replicated(mesh)),
      donate_argnums=(0, 1))
  views = jax.device_put(views, NamedSharding(mesh, P(None, ("data", "fsdp"))))
  step_losses = []
  for _ in range(2):
    params, opt_state, loss = step(params, opt_state, views)
    step_losses.append(float(loss))
  return params, opt_state, step_losses


def test_fsdp_step_matches_replicated_step():
  fsdp_mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  fsdp_params, fsdp_state, fsdp_losses = _train_two_steps(fsdp_mesh, "fsdp")
  kernel = fsdp_params["projection"]["kernel"]
  assert kernel.sharding.spec == P(None, "fsdp")
  assert {s.data.shape for s in kernel.addressable_shards} == {(32, 16)}
  momentum_specs = {x.sharding.spec for x in jax.tree.leaves(fsdp_state) if x.shape == (32, 64)}
  assert momentum_specs == {P(None, "fsdp")}

  one_device_mesh = jax.make_mesh((1, 1), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2,
                                  devices=jax.devices()[:1])
  want_params, _, want_losses = _train_two_steps(one_device_mesh, "replicate")
  np.testing.assert_allclose(fsdp_losses, want_losses, rtol=1e-6)
  for got, want in zip(jax.tree.leaves(fsdp_params), jax.tree.leaves(want_params)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-7)
  # The run must actually have trained, or equality would prove nothing.
  assert fsdp_losses[1] < fsdp_losses[0] - 1e-3, fsdp_losses
