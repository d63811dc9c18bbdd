"""Device mesh, logical-axis rules, and parameter / batch shardings.

The model annotates every parameter and key activation with *logical* axis names (`embed`, `mlp`,
`heads`, `vocab`, `act_batch`, ...; see `default_sharding_rules`). One rules table, kept in the
config (`config.sharding_rules`), maps those names onto the three mesh axes:

  data    pure data parallelism (params replicated over it),
  fsdp    data parallelism with parameters and optimizer state sharded over it (ZeRO-3 style),
  tensor  tensor (Megatron) parallelism inside attention heads / FFN hidden units.

Typical use in a trainer (MaxText's `get_abstract_state` pattern)::

  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules(config)
  boxed = jax.eval_shape(model.init, rngs, *dummy_inputs)             # tree of nn.Partitioned
  abstract_params = sharding.abstract_with_shardings(boxed['params'], mesh, rules)
  params = jax.jit(init_fn, out_shardings=sharding.tree_shardings(abstract_params))(rng)
  batch = sharding.make_global_batch(next(local_iterator), mesh)

The same code runs on 1 CPU, 8 fake CPU devices, one GPU and a pod: only `config.mesh` changes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import logging
import math
from typing import Any

import flax.linen as nn
import jax
from jax.experimental import mesh_utils
import ml_collections
import numpy as np

P = jax.sharding.PartitionSpec
NamedSharding = jax.sharding.NamedSharding

MESH_AXES = ("data", "fsdp", "tensor")
# The leading (batch) dimension of inputs and activations is split over both data-parallel axes.
BATCH_AXES = ("data", "fsdp")

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]


def default_sharding_rules() -> list[tuple[str, MeshAxes]]:
  """MaxText-like logical → mesh axis rules (first matching, still-unused mesh axis wins).

  Weights are sharded FSDP-style over their model-width dimension and Megatron-style over
  their heads / FFN / vocab dimension; LayerNorm vectors, relative-position tables, projection
  and class dimensions stay replicated. With the default mesh (`fsdp=1, tensor=1`) every
  parameter is replicated and the batch is split over all devices (plain data parallelism).
  """
  return [
      # Activations and inputs.
      ("batch", BATCH_AXES),
      ("act_batch", BATCH_AXES),
      ("act_len", None),
      ("act_embed", None),
      ("act_heads", "tensor"),
      ("act_mlp", "tensor"),
      ("act_vocab", "tensor"),
      # Parameters.
      ("embed", "fsdp"),
      ("kv_embed", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("vocab", "tensor"),
      ("norm", None),
      ("rel_pos", None),
      ("proj", None),
      ("classes", None),
      ("patch", None),
      ("frames", None),
      ("layers", None),  # the leading layer axis of scanned stacks (`model.scan_layers`)
  ]


def mesh_config() -> ml_collections.ConfigDict:
  """Default `config.mesh`: every device on the `data` axis."""
  return ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))


def _mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves the one optional -1 entry of `mesh_cfg` so the product equals `num_devices`."""
  unknown = set(mesh_cfg) - set(MESH_AXES)
  if unknown:
    raise ValueError(
        f"config.mesh has unknown axes {sorted(unknown)}; expected exactly {MESH_AXES}.")
  sizes = [int(mesh_cfg.get(name, 1)) for name in MESH_AXES]
  described = ", ".join(f"{n}={s}" for n, s in zip(MESH_AXES, sizes))
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh ({described}): at most one axis may be -1.")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh ({described}): sizes must be positive or -1.")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(
          f"config.mesh ({described}): the fixed axes ({known} devices) do not divide the "
          f"{num_devices} available devices.")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(
        f"config.mesh ({described}) has {math.prod(sizes)} devices in total but "
        f"{num_devices} devices are available; use -1 on one axis to take the rest.")
  return tuple(sizes)


def make_mesh(mesh_cfg: Mapping[str, int],
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """Builds the ('data', 'fsdp', 'tensor') mesh from `config.mesh`.

  Args:
    mesh_cfg: mapping with keys among 'data', 'fsdp', 'tensor' (missing = 1); one value may be
      -1, meaning "all remaining devices".
    devices: devices to use; defaults to `jax.devices()` (all processes).

  Returns:
    A `jax.sharding.Mesh` with axis names `MESH_AXES`. On GPU/TPU the device order follows the
    physical topology (`mesh_utils.create_device_mesh`), so `tensor` stays inside fast links.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = _mesh_shape(dict(mesh_cfg), len(devices))
  try:
    device_array = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError):
    # Topologies mesh_utils does not know (e.g. a device subset): keep the given order.
    device_array = np.asarray(devices, dtype=object).reshape(shape)
  return jax.sharding.Mesh(device_array, MESH_AXES)


def logical_rules(config: ml_collections.ConfigDict) -> Rules:
  """Returns `config.sharding_rules` (or the defaults) as a tuple of (logical, mesh axes) pairs.

  Lists coming from a config (`['embed', 'fsdp']`, `['batch', ['data', 'fsdp']]`) are normalised
  to tuples. Raises ValueError for a malformed entry or a mesh axis outside `MESH_AXES`.
  """
  raw = config.get("sharding_rules", None)
  raw = default_sharding_rules() if raw is None else raw
  rules = []
  for i, entry in enumerate(raw):
    if len(entry) != 2 or not isinstance(entry[0], str):
      raise ValueError(
          f"config.sharding_rules[{i}] = {entry!r}: expected (logical_name, mesh_axes).")
    name, axes = entry
    if isinstance(axes, (list, tuple)):
      axes = tuple(axes)
      bad = [a for a in axes if a not in MESH_AXES]
    else:
      bad = [] if axes is None or axes in MESH_AXES else [axes]
    if bad:
      raise ValueError(
          f"config.sharding_rules[{i}] = {entry!r}: unknown mesh axis {bad}; expected one of "
          f"{MESH_AXES} (or None).")
    rules.append((name, axes))
  return tuple(rules)


def _axes_size(mesh: jax.sharding.Mesh, axes: MeshAxes) -> int:
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def _shape_of(x: Any) -> tuple[int, ...]:
  return tuple(x) if isinstance(x, (tuple, list)) else tuple(np.shape(x))


def _is_spec(x: Any) -> bool:
  return isinstance(x, P) or x is None


def shardings_from_logical(logical_specs: Any, mesh: jax.sharding.Mesh, rules: Rules, *,
                           shapes: Any = None) -> Any:
  """Maps a tree of logical PartitionSpecs to a tree of `NamedSharding`s on `mesh`.

  Args:
    logical_specs: tree whose leaves are logical `PartitionSpec`s, e.g.
      `nn.get_partition_spec(jax.eval_shape(model.init, ...))`.
    mesh: the device mesh.
    rules: (logical name, mesh axes) pairs, see `logical_rules`.
    shapes: optional tree with the same structure whose leaves are arrays, `ShapeDtypeStruct`s or
      shape tuples. When given, a dimension whose size is not divisible by the number of devices
      of its mesh axes is replicated instead (one log line lists all such fallbacks).

  Returns:
    A tree of `NamedSharding` with the structure of `logical_specs`.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(logical_specs, is_leaf=_is_spec)
  shape_leaves = [None] * len(leaves) if shapes is None else treedef.flatten_up_to(shapes)
  fallbacks = []
  out = []
  for (path, spec), shape in zip(leaves, shape_leaves):
    mesh_spec = list(nn.logical_to_mesh_axes(tuple(spec) if spec is not None else (), rules))
    if shape is not None:
      shape = _shape_of(shape)
      if len(mesh_spec) > len(shape):
        raise ValueError(
            f"{jax.tree_util.keystr(path, simple=True, separator='/')}: logical spec {spec} has "
            f"{len(mesh_spec)} dims but the array has shape {shape}.")
      for dim, axes in enumerate(mesh_spec):
        if axes is not None and shape[dim] % _axes_size(mesh, axes):
          fallbacks.append(
              f"{jax.tree_util.keystr(path, simple=True, separator='/')}[dim {dim}: "
              f"{shape[dim]} % {_axes_size(mesh, axes)} ({axes})]")
          mesh_spec[dim] = None
    out.append(NamedSharding(mesh, P(*mesh_spec)))
  if fallbacks:
    logging.warning("Replicating %d dims not divisible by their mesh axes: %s",
                    len(fallbacks), ", ".join(fallbacks))
  return jax.tree_util.tree_unflatten(treedef, out)


def abstract_with_shardings(boxed_abstract: Any, mesh: jax.sharding.Mesh, rules: Rules) -> Any:
  """`jax.eval_shape` output with `nn.Partitioned` boxes → unboxed `ShapeDtypeStruct`s + sharding.

  Works for params (`jax.eval_shape(model.init, ...)['params']`) and for anything derived from
  boxed params, e.g. `jax.eval_shape(tx.init, boxed_params)`: optax maps over the boxes, so
  the Adam moments inherit the parameters' logical axes, while leaves without a box (step
  counters) are replicated. The result is the abstract target for `jax.jit(out_shardings=...)`
  and for `Checkpointer.restore`.
  """
  specs = nn.get_partition_spec(boxed_abstract)
  unboxed = nn.meta.unbox(boxed_abstract)
  shardings = shardings_from_logical(specs, mesh, rules, shapes=unboxed)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      unboxed, shardings)


def tree_shardings(tree: Any) -> Any:
  """The `.sharding` of every leaf (arrays or `ShapeDtypeStruct`s), for `out_shardings=`."""
  return jax.tree.map(lambda x: x.sharding, tree)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) dimension split over ('data', 'fsdp'); all other dims replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Fully replicated on every device of `mesh`."""
  return NamedSharding(mesh, P())


def make_global_batch(local_batch: Mapping[str, Any], mesh: jax.sharding.Mesh) -> dict[str, Any]:
  """Turns this process's numpy batch into global `jax.Array`s sharded over the batch axes.

  Args:
    local_batch: (possibly nested) dict of numpy arrays; arrays of rank ≥ 1 hold this process's
      slice of the global batch on their leading dimension (`[B_local, ...]`); 0-d values
      (per-batch statistics such as `num_bad_records`) are replicated and should agree across
      processes.
    mesh: the device mesh.

  Returns:
    The same structure of `jax.Array`s with global leading dim `B_local * process_count`.

  Raises:
    ValueError naming the key when a leading dim cannot be split over this process's devices.
  """
  batch_sh, repl_sh = batch_sharding(mesh), replicated(mesh)
  # Number of distinct batch shards held by this process's devices.
  local_shards = len({idx[0].start for idx in batch_sh.addressable_devices_indices_map(
      (_axes_size(mesh, BATCH_AXES),)).values()})

  def put(path, x):
    x = np.asarray(x)
    if x.ndim == 0:
      return jax.make_array_from_process_local_data(repl_sh, x)
    if x.shape[0] % local_shards:
      raise ValueError(
          f"batch['{jax.tree_util.keystr(path, simple=True, separator='/')}']: leading dim "
          f"{x.shape[0]} (shape {x.shape}) is not divisible by the {local_shards} batch shards "
          f"of this process (mesh {dict(mesh.shape)}, batch axes {BATCH_AXES}).")
    return jax.make_array_from_process_local_data(batch_sh, x)

  return jax.tree_util.tree_map_with_path(put, dict(local_batch))


def _per_device_bytes(tree: Any) -> tuple[int, int, int]:
  """(bytes on the most loaded device, total logical bytes, number of elements) of a tree."""
  per_device, total, count = 0, 0, 0
  for x in jax.tree.leaves(tree):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      continue
    itemsize = np.dtype(x.dtype).itemsize
    size = math.prod(x.shape)
    sharding = getattr(x, "sharding", None)
    shard_shape = sharding.shard_shape(x.shape) if sharding is not None else x.shape
    per_device += math.prod(shard_shape) * itemsize
    total += size * itemsize
    count += size
  return per_device, total, count


def _mib(n: int) -> str:
  return f"{n / 2**20:.1f} MiB"


def describe_memory(params: Any, opt_state: Any, mesh: jax.sharding.Mesh) -> str:
  """One start-up log line: per-device and total bytes of params and optimizer state.

  Leaves may be `jax.Array`s or `ShapeDtypeStruct`s carrying a `.sharding`; leaves without
  sharding (numpy) count as replicated. Example::

    mesh data=2 fsdp=4 tensor=1 | params 93.2M = 355.5 MiB total, 88.9 MiB/device |
    opt_state 711.0 MiB total, 177.8 MiB/device | sum 266.7 MiB/device
  """
  p_dev, p_tot, p_count = _per_device_bytes(params)
  o_dev, o_tot, _ = _per_device_bytes(opt_state)
  mesh_str = " ".join(f"{k}={v}" for k, v in mesh.shape.items())
  return (f"mesh {mesh_str} | params {p_count / 1e6:.1f}M = {_mib(p_tot)} total, "
          f"{_mib(p_dev)}/device | opt_state {_mib(o_tot)} total, {_mib(o_dev)}/device | "
          f"sum {_mib(p_dev + o_dev)}/device")
