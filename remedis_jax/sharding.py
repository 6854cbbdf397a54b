"""Device mesh and shardings: data parallel by default, FSDP (ZeRO-3) on request.

The mesh has two axes, `('data', 'fsdp')`:
  * the batch is split over BOTH axes, so every device sees its own slice of
    examples whatever the split;
  * with `fsdp` size > 1, large parameters and their optimiser state are split
    along `fsdp` too, and XLA all-gathers a parameter where a computation
    needs it whole and reduce-scatters its gradient (ZeRO-3 memory, same math).
With the default `fsdp` size 1 this is plain data parallelism with replicated
parameters.

Everything is global `jax.Array`s under `jax.jit` with `NamedSharding` (no
pmap, no per-device code), as in big_vision and the flax examples.
"""

import json
import math
from collections.abc import Callable, Mapping
from typing import Any, Optional, Union

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

PyTree = Any

MESH_AXES = ("data", "fsdp")
# The batch dimension is split over every device: both mesh axes.
BATCH_AXES = ("data", "fsdp")
SHARDING_STRATEGIES = ("replicate", "fsdp")


def _resolve_axis_sizes(mesh_config: Optional[Mapping[str, int]], device_count: int) -> tuple[int, int]:
  """Axis sizes from {'data': d, 'fsdp': f}; -1 means 'the remaining devices'."""
  given = dict(mesh_config.items()) if mesh_config is not None else {}
  given.pop("devices", None)  # how many devices: resolved by _mesh_devices
  given.pop("dcn_data", None)  # the slices: resolved by _hybrid_mesh
  unknown = sorted(set(given) - set(MESH_AXES))
  if unknown:
    raise ValueError(
        f"mesh config has unknown axis name(s) {unknown}; valid axes are {list(MESH_AXES)} "
        "(e.g. {'data': -1, 'fsdp': 4}), 'devices' (-1: all, or how many to use) and "
        "'dcn_data' (data-parallel slices).")
  sizes = {"data": given.get("data", -1), "fsdp": given.get("fsdp", 1)}
  for name, size in sizes.items():
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or (size < 1 and size != -1):
      raise ValueError(
          f"mesh config {name}={size!r} is invalid: use a positive int, or -1 for "
          "'all remaining devices'.")
  free = [name for name, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise ValueError(
        f"mesh config: at most one axis may be -1; got {sizes}. Give the other axis a size.")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if free:
    if device_count % fixed:
      raise ValueError(
          f"mesh config {sizes}: {device_count} devices are not divisible by the fixed axis "
          f"size {fixed}, so {free[0]}=-1 has no integer size.")
    sizes[free[0]] = device_count // fixed
  if sizes["data"] * sizes["fsdp"] != device_count:
    raise ValueError(
        f"mesh config {sizes}: data x fsdp = {sizes['data'] * sizes['fsdp']} but there are "
        f"{device_count} devices; the product must equal the device count (use -1 for one axis).")
  return sizes["data"], sizes["fsdp"]


def _mesh_devices(mesh_config: Optional[Mapping[str, int]]) -> Optional[list[jax.Device]]:
  """The devices of the mesh: None for all of them, else the first devices/P of each process."""
  count = mesh_config.get("devices", -1) if mesh_config is not None else -1
  if count is None or count == -1:
    return None
  total, processes = jax.device_count(), jax.process_count()
  if (not isinstance(count, (int, np.integer)) or isinstance(count, bool) or count < 1
      or count > total or count % processes):
    raise ValueError(
        f"mesh config devices={count!r} is invalid: use -1 (all {total} devices) or a positive "
        f"int up to {total} that is a multiple of the number of processes ({processes}), "
        "e.g. --config.mesh.devices=1 for a one-device run on a multi-device host.")
  per_process = count // processes
  return [device for process in range(processes)
          for device in [d for d in jax.devices() if d.process_index == process][:per_process]]


def _dcn_data(mesh_config: Optional[Mapping[str, int]]) -> int:
  value = mesh_config.get("dcn_data", 1) if mesh_config is not None else 1
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
    raise ValueError(f"mesh config dcn_data={value!r} is invalid: use 1 (one slice) or the "
                     "number of slices the job spans.")
  return int(value)


def _hybrid_mesh(mesh_config: Mapping[str, int], dcn_data: int) -> Mesh:
  """The mesh of a job over several slices (TPU multislice; on GPU/CPU every process is a slice).

  The 'data' axis spans `dcn_data` slices over the data-centre network (DCN) times `data`
  devices inside each slice; 'fsdp' stays inside a slice, on its fast interconnect (ICI), so
  the only traffic between slices is the data-parallel gradient all-reduce.
  """
  from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
  if mesh_config.get("devices", -1) not in (-1, None):
    raise ValueError(f"mesh config devices={mesh_config.get('devices')!r} with "
                     f"dcn_data={dcn_data}: a multi-slice mesh uses every device; set "
                     "devices=-1.")
  devices = jax.devices()
  # TPU slices carry their index; on GPU or CPU hosts each process is a slice (its devices share
  # a host interconnect; hosts talk over the network).
  by_slice = devices[0].platform == "tpu" and hasattr(devices[0], "slice_index")
  slices = sorted({d.slice_index if by_slice else d.process_index for d in devices})
  if len(slices) != dcn_data:
    kind = "slices (device.slice_index)" if by_slice else "processes, each taken as a slice"
    raise ValueError(
        f"mesh config dcn_data={dcn_data}, but the job has {len(slices)} {kind}: dcn_data "
        f"must equal that number ({len(slices)}), or be 1 for a one-slice mesh.")
  data, fsdp = _resolve_axis_sizes(mesh_config, len(devices) // dcn_data)
  array = mesh_utils.create_hybrid_device_mesh(
      (data, fsdp), (dcn_data, 1), devices=devices, process_is_granule=not by_slice)
  return Mesh(array, MESH_AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def make_mesh(mesh_config: Optional[Mapping[str, int]] = None) -> Mesh:
  """Builds the ('data', 'fsdp') mesh over all devices of all processes, or some of them.

  Args:
    mesh_config: None, or a mapping (dict / ConfigDict) with optional keys
      `data` and `fsdp`: axis sizes, one of which may be -1 for "the rest".
      Defaults: data=-1, fsdp=1 (pure data parallelism). Optional key `devices`:
      -1 (default) for every device, or how many to use: the first devices/P of
      each of the P processes (e.g. 1 reproduces a one-device run on an 8-device
      host; the tests run most trainers this way, as 8 simulated CPU devices cost
      a quarter more CPU time than one). Optional key `dcn_data` (default 1): the
      number of slices of a multi-slice job; then `data` and `fsdp` are the sizes
      inside one slice and the 'data' axis is dcn_data x data long (`_hybrid_mesh`).

  Returns:
    A `jax.sharding.Mesh` with axis names ('data', 'fsdp') and Auto axis types.

  Raises:
    ValueError: unknown axis names, non-positive sizes, two -1 axes, sizes
      whose product is not the number of devices used, or an invalid `devices`.
  """
  dcn_data = _dcn_data(mesh_config)
  if dcn_data > 1:
    return _hybrid_mesh(mesh_config, dcn_data)
  devices = _mesh_devices(mesh_config)
  data, fsdp = _resolve_axis_sizes(mesh_config,
                                   jax.device_count() if devices is None else len(devices))
  # jax.make_mesh orders devices for the physical topology (TPU rings). Auto
  # axis types keep the classic "XLA inserts the collectives" semantics; the
  # default Explicit types would make every jnp op reason about shardings.
  return jax.make_mesh((data, fsdp), MESH_AXES, axis_types=(AxisType.Auto, AxisType.Auto),
                       devices=devices)


def describe_mesh(mesh: Mesh) -> str:
  """One line for the log: axis sizes, devices, and which process holds each device of the mesh
  (a multi-slice mesh shows one slice's processes per 'data' block)."""
  processes = json.dumps(np.vectorize(lambda d: d.process_index)(mesh.devices).tolist())
  return (", ".join(f"{name}={size}" for name, size in mesh.shape.items())
          + f" over {mesh.size} devices; process of each device: {processes}")


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a global batch: leading (example) dim over ('data', 'fsdp')."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  """A full copy on every device (scalars, small params, step counters)."""
  return NamedSharding(mesh, P())


def _fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size_to_shard: int) -> P:
  """Shard the largest dim divisible by the fsdp size; replicate small arrays."""
  if fsdp_size == 1 or math.prod(shape) < min_size_to_shard:
    return P()
  divisible = [d for d, n in enumerate(shape) if n % fsdp_size == 0]
  if not divisible:
    return P()
  # Largest dim; among equals the LAST one (output channels of conv/dense
  # kernels), so ties resolve the same way for every layer.
  dim = max(divisible, key=lambda d: (shape[d], d))
  spec = [None] * len(shape)
  spec[dim] = "fsdp"
  return P(*spec)


def param_shardings(
    abstract_tree: PyTree,
    mesh: Mesh,
    strategy: str = "replicate",
    min_size_to_shard: int = 2**14,
) -> PyTree:
  """Shardings for parameters or optimiser state.

  Args:
    abstract_tree: a pytree of arrays or `jax.ShapeDtypeStruct`s, typically
      `jax.eval_shape(model.init, ...)` or `jax.eval_shape(tx.init, params)`;
      optax states (scalar counters, empty states, masked nodes) are fine.
    mesh: a mesh from `make_mesh`.
    strategy: 'replicate' (every leaf on every device) or 'fsdp' (each leaf of
      at least `min_size_to_shard` elements is split along its largest dim
      divisible by the fsdp axis size; others are replicated).
    min_size_to_shard: leaves with fewer elements stay replicated: splitting
      a GroupNorm scale saves nothing and costs a collective.

  Returns:
    A pytree of `NamedSharding` with the structure of `abstract_tree`.

  Raises:
    ValueError: unknown strategy, or a mesh without an 'fsdp' axis for 'fsdp'.
  """
  if strategy not in SHARDING_STRATEGIES:
    raise ValueError(
        f"param_shardings: strategy {strategy!r} is unknown; valid strategies are "
        f"{', '.join(repr(s) for s in SHARDING_STRATEGIES)}.")
  if strategy == "replicate":
    return jax.tree.map(lambda _: replicated(mesh), abstract_tree)
  if "fsdp" not in mesh.shape:
    raise ValueError(
        f"param_shardings: strategy 'fsdp' needs a mesh axis named 'fsdp'; mesh axes are "
        f"{tuple(mesh.axis_names)} (build the mesh with make_mesh).")
  fsdp_size = mesh.shape["fsdp"]
  return jax.tree.map(
      lambda leaf: NamedSharding(mesh, _fsdp_spec(tuple(np.shape(leaf)), fsdp_size, min_size_to_shard)),
      abstract_tree)


def shard_host_batch(local_batch: PyTree, sharding: NamedSharding) -> PyTree:
  """Assembles global `jax.Array`s from each process's slice of the batch.

  Every process calls this with its own rows (the same number on every
  process); the global batch is their concatenation in process order. With
  one process the local batch IS the global batch.

  Args:
    local_batch: dict (or any pytree) of NumPy arrays whose leading dim is this
      process's share of the batch.
    sharding: usually `batch_sharding(mesh)`.

  Returns:
    The same pytree of global `jax.Array`s laid out by `sharding`.

  Raises:
    ValueError: if the global batch does not split evenly over the batch shards.
  """
  spec = tuple(sharding.spec)
  batch_axes = spec[0] if spec else None
  if batch_axes is None:
    batch_shards = 1
  else:
    batch_axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    batch_shards = math.prod(sharding.mesh.shape[a] for a in batch_axes)
  processes = jax.process_count()

  def to_global(path, local):
    local = np.asarray(local)
    if local.ndim == 0 or (local.shape[0] * processes) % batch_shards:
      name = jax.tree_util.keystr(path) or "batch"
      rows = local.shape[0] if local.ndim else "no (scalar)"
      raise ValueError(
          f"shard_host_batch: {name} has {rows} rows on this process x {processes} process(es), "
          f"which does not split into {batch_shards} batch shards (mesh {dict(sharding.mesh.shape)}); "
          f"make the per-process batch a multiple of {batch_shards // math.gcd(batch_shards, processes)}.")
    return jax.make_array_from_process_local_data(sharding, local)

  return jax.tree_util.tree_map_with_path(to_global, local_batch)


def create_sharded(
    init_fn: Callable[..., PyTree],
    *args: Any,
    shardings: Union[PyTree, Callable[[PyTree], PyTree]],
) -> PyTree:
  """Runs `init_fn(*args)` under jit so its outputs are born sharded.

  The pattern is `eval_shape -> shardings -> jit(init_fn, out_shardings=...)`:
  parameters and optimiser state never exist whole on one device. Without
  `out_shardings`, `jax.jit(tx.init)(sharded_params)` puts the state on one
  device and the next step fails with "incompatible devices".

  Args:
    init_fn: a pure function of `args` (close over modules and configs; e.g.
      `lambda rng: model.init(rng, images)`, or `tx.init`).
    *args: its arguments (arrays, PRNG keys, pytrees).
    shardings: a pytree of `Sharding`s matching the output, or a function
      from the abstract output (`jax.ShapeDtypeStruct`s) to such a pytree,
      e.g. `lambda abstract: param_shardings(abstract, mesh, 'fsdp')`.

  Returns:
    The output of `init_fn`, laid out as asked; read the layout back with
    `jax.tree.map(lambda x: x.sharding, output)` for the step's shardings.
  """
  if callable(shardings) and not isinstance(shardings, jax.sharding.Sharding):
    shardings = shardings(jax.eval_shape(init_fn, *args))
  return jax.jit(init_fn, out_shardings=shardings)(*args)
