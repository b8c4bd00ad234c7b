"""Several processes (hosts), one program: JAX's multi-controller runtime, and the few helpers the trainer needs.

Every process runs the same training loop on its own devices; `jax.distributed.initialize` joins them so that
`jax.devices()` lists every process's devices and a jitted step is one SPMD program over all of them. What
differs per process is only the data: process `i` of `n` reads its `1/n` of the prompts, builds those rows'
pixels and tokens, scores those rows' rewards, and hands them to the mesh with `to_global` (rows of a batch
split over the processes in order: process 0 holds the first `1/n` of the global rows). `local_rows` brings
the rows a process owns back to it. With one process all of this is the identity, so there is one code path.

    from mr1jax.parallel import distributed
    distributed.initialize(config.distributed)      # no-op on one process
    g = distributed.to_global(local_rows_np, sharding)   # [rows_local * n, ...] global array
    mine = distributed.local_rows(g)                      # [rows_local, ...] numpy, this process's rows

Startup is automatic where JAX can detect the cluster (TPU VM slices, SLURM, Open MPI) and explicit elsewhere:
`distributed.coordinator=host:port`, `distributed.num_processes=N`, `distributed.process_id=i`, or the
environment variables `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

#: What `initialize` does: "auto" joins a cluster when one is configured or detected, "off" never does.
MODES = ("auto", "off")

# Environment variables of the schedulers and runtimes JAX's own cluster detection handles.
_CLUSTER_ENV = {
    "SLURM_NTASKS": "SLURM",
    "OMPI_COMM_WORLD_SIZE": "Open MPI",
}


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    return int(value) if value else None


def requested(cfg: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The `jax.distributed.initialize` arguments `cfg` (the config's `distributed` block) and the environment
    ask for, or None for a single-process run. Raises ValueError naming the field when they are incomplete."""
    cfg = dict(cfg or {})
    if cfg.get("mode", "auto") == "off":
        return None
    coordinator = cfg.get("coordinator") or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    num = int(cfg.get("num_processes") or 0) or _env_int("JAX_NUM_PROCESSES") or 0
    pid = int(cfg.get("process_id", -1))
    pid = pid if pid >= 0 else (_env_int("JAX_PROCESS_ID") if _env_int("JAX_PROCESS_ID") is not None else -1)
    if coordinator:
        if num < 1 or pid < 0:
            raise ValueError(f"config.distributed.coordinator = {coordinator!r} also needs "
                             "config.distributed.num_processes and config.distributed.process_id (or "
                             "JAX_NUM_PROCESSES / JAX_PROCESS_ID)")
        if not 0 <= pid < num:
            raise ValueError(f"config.distributed.process_id = {pid} must be in [0, num_processes = {num})")
        return dict(coordinator_address=coordinator, num_processes=num, process_id=pid)
    if num > 1 or pid >= 0:
        raise ValueError("config.distributed.num_processes / process_id are set but config.distributed.coordinator "
                         "(host:port of process 0) is not (nor JAX_COORDINATOR_ADDRESS)")
    for var, name in _CLUSTER_ENV.items():
        if (_env_int(var) or 0) > 1:
            return {"detected": name}
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if "," in hosts:                                     # a TPU slice of several hosts
        return {"detected": "TPU slice"}
    return None


def initialize(cfg: Mapping[str, Any] | None = None) -> bool:
    """Join the job's processes (`jax.distributed.initialize`) when `requested`; returns whether it did.

    Must run before anything touches a JAX device. On CPU the collectives go through gloo."""
    args = requested(cfg)
    if args is None or jax.distributed.is_initialized():
        return bool(args)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")   # CPU devices' collectives (harmless elsewhere)
    timeout = int(dict(cfg or {}).get("timeout_s", 300))
    if "detected" in args:
        jax.distributed.initialize(initialization_timeout=timeout)
    else:
        jax.distributed.initialize(**args, initialization_timeout=timeout)
    return True


def is_primary() -> bool:
    """Process 0: the one that writes logs, metrics, summaries and exports."""
    return jax.process_index() == 0


def describe() -> str:
    """One line naming this process and the devices it sees."""
    return (f"process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} local / "
            f"{jax.device_count()} global {jax.devices()[0].platform} device(s)")


def to_global(local: np.ndarray | jax.Array, sharding: jax.sharding.Sharding, dim: int = 0) -> jax.Array:
    """A global array from this process's rows (`local`: [rows_local, ...] along `dim`); the global array has
    `rows_local * process_count` rows, process `i`'s after those of processes `< i`. One process: a device_put."""
    if isinstance(local, jax.Array) and not local.is_fully_addressable:
        return jax.device_put(local, sharding)                       # already global: reshard
    local = np.asarray(local)
    if jax.process_count() == 1:
        return jax.device_put(local, sharding)
    shape = list(local.shape)
    shape[dim] *= jax.process_count()
    return jax.make_array_from_process_local_data(sharding, local, tuple(shape))


def local_rows(x: jax.Array | np.ndarray, dim: int = 0) -> np.ndarray:
    """This process's rows of a global array split along `dim` (the inverse of `to_global`); the whole array
    when it is fully addressable (one process)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    pieces: dict[int, Any] = {}
    for shard in x.addressable_shards:                 # replicas (e.g. over `tensor`) hold the same rows
        pieces.setdefault(shard.index[dim].start or 0, shard.data)
    return np.concatenate([np.asarray(pieces[k]) for k in sorted(pieces)], axis=dim)


def fetch(x: jax.Array | np.ndarray) -> np.ndarray:
    """The whole of `x` on this host, also when it spans several processes' devices (then a collective: all
    processes call it, each gets every value)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def gather(x: np.ndarray) -> np.ndarray:
    """Every process's `x` concatenated along axis 0 in process order (a collective: all processes call it)."""
    x = np.asarray(x)
    if jax.process_count() == 1:
        return x
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is true on any (a collective: all processes call it)."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(gather(np.array([int(bool(flag))], np.int32)).max())


def sync(name: str) -> None:
    """Wait until every process reaches this point (no-op on one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
