"""Device mesh with axes (data, fsdp, tensor) and the logical-axis rules that place parameters on it.

Parameters carry ``logical_axes`` metadata (see `mr1jax.models.qwen2_vl.layers`). `logical_to_spec` maps
those names to mesh axes with `DEFAULT_RULES`; a dimension that the mesh axis does not divide evenly stays
replicated, so any mesh works with any model (tiny test models included). Batches are split over
(data, fsdp); weights over fsdp (ZeRO-3 style) and tensor (Megatron style).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mr1jax.parallel import distributed

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis name -> mesh axis (or None = replicated)
DEFAULT_RULES: Mapping[str, str | None] = {
    "layers": None,  # leading axis of scanned (stacked) layer parameters: never sharded
    "vocab": "tensor",
    "embed": "fsdp",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "norm": None,
    "patch": None,
    "vision_embed": "fsdp",
    "vision_heads": "tensor",
    "vision_mlp": "tensor",
    "vision_merge": "fsdp",
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape; -1 on one axis means "all remaining devices"."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1


def make_mesh(cfg: MeshConfig | Mapping[str, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """Build a (data, fsdp, tensor) mesh over `devices` (default: all devices, every host)."""
    if cfg is None:
        cfg = MeshConfig()
    elif isinstance(cfg, Mapping):
        unknown = set(cfg) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"mesh config has unknown axes {sorted(unknown)}; allowed: {list(MESH_AXES)}")
        cfg = MeshConfig(**cfg)
    devices = list(jax.devices() if devices is None else devices)
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    for name, size in zip(MESH_AXES, sizes):
        if size == 0 or size < -1:
            raise ValueError(f"mesh.{name} must be a positive integer or -1, got {size}")
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh {dict(zip(MESH_AXES, sizes))}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                         f"but {len(devices)} are available")
    return jax.make_mesh(tuple(sizes), MESH_AXES, devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(logical_axes: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                    rules: Mapping[str, str | None] = DEFAULT_RULES) -> P:
    """PartitionSpec for an array of `shape` whose dimensions have `logical_axes` names.

    A mesh axis is used at most once, and only where it divides the dimension evenly.
    """
    if logical_axes is None:
        return P()
    used: set[str] = set()
    spec = []
    for name, dim in zip(logical_axes, shape):
        axis = rules.get(name) if name is not None else None
        if axis is not None and axis not in used and dim % mesh.shape[axis] == 0 and mesh.shape[axis] > 1:
            spec.append(axis)
            used.add(axis)
        else:
            spec.append(None)
    return P(*spec)


def param_shardings(model_or_state: Any, mesh: Mesh, rules: Mapping[str, str | None] = DEFAULT_RULES) -> Any:
    """Pytree (matching `nnx.state(model, nnx.Param)`) of NamedShardings, from each Param's logical axes."""
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state, nnx.Param)

    def one(var):
        spec = logical_to_spec(var.get_metadata().get("logical_axes"), var.shape, mesh, rules)
        return var.replace(NamedSharding(mesh, spec))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: Mesh, rules: Mapping[str, str | None] = DEFAULT_RULES) -> nnx.Module:
    """Move every parameter of `model` onto its shards in place; returns the model."""
    state = nnx.state(model, nnx.Param)
    shardings = param_shardings(state, mesh, rules)
    nnx.update(model, jax.tree.map(lambda x, s: jax.device_put(x, s), state, shardings))
    return model


def constrain_batch(x: jax.Array, batch_dim: int = 0) -> jax.Array:
    """Pin dimension `batch_dim` of an activation to the (data, fsdp) axes of the mesh in context
    (`jax.set_mesh`, as the trainer's steps and the sampler trace); a no-op without one, or when the axes do not
    divide it.

    Inside the scanned layers XLA may otherwise split activations like the FSDP-sharded weights (along the
    hidden dimension) and keep every row on every device; pinning the rows makes it all-gather the weights
    instead, as FSDP intends (the 7B reference pass: 63 -> 15 GiB of temporaries per device in the plan).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not all(a in mesh.axis_names for a in BATCH_AXES):
        return x
    n = math.prod(dict(zip(mesh.axis_names, mesh.axis_sizes))[a] for a in BATCH_AXES)
    if n == 1 or x.shape[batch_dim] % n:
        return x
    spec = [None] * x.ndim
    spec[batch_dim] = BATCH_AXES
    return jax.lax.with_sharding_constraint(x, P(*spec))


def local_batch_devices(mesh: Mesh) -> int:
    """How many of the mesh's (data, fsdp) batch positions this process's rows fill: data x fsdp / processes."""
    return max(1, mesh.shape["data"] * mesh.shape["fsdp"] // jax.process_count())


def batch_sharding(mesh: Mesh, ndim: int, batch_dim: int = 0) -> NamedSharding:
    """Sharding that splits dimension `batch_dim` over (data, fsdp) and replicates the rest."""
    spec = [None] * ndim
    spec[batch_dim] = BATCH_AXES
    return NamedSharding(mesh, P(*spec))


def shard_batch(mesh: Mesh, array: np.ndarray | jax.Array, batch_dim: int = 0) -> jax.Array:
    """Place a batch on the mesh, split along `batch_dim` over (data, fsdp). With several processes `array` is
    this process's rows (`mr1jax.parallel.distributed.to_global`); they must split over its share of the batch devices."""
    n = local_batch_devices(mesh)
    if array.shape[batch_dim] % n:
        raise ValueError(f"batch dimension {array.shape[batch_dim]} is not divisible by data*fsdp = {n}"
                         + (" (per process)" if jax.process_count() > 1 else ""))
    return distributed.to_global(array, batch_sharding(mesh, array.ndim, batch_dim), batch_dim)
