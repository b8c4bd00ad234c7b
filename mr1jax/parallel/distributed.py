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

import json
import os
import time
import socket
import threading
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


class PeerError(RuntimeError):
    """Another process of the job is gone (a collective failed), or the coordinator cannot be reached."""


#: Seconds the shutdown barrier waits for the other processes at exit (JAX's default: 300). A survivor of a lost
#: peer should not sit in it for minutes.
SHUTDOWN_TIMEOUT_S = 10


def wait_for_coordinator(address: str, timeout_s: float, *, poll_s: float = 0.5) -> None:
    """Return once `address` (host:port) accepts a TCP connection; PeerError naming it and the timeout when it
    does not within `timeout_s` (a process other than 0 would otherwise die in JAX's own C++ abort)."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        try:
            with socket.create_connection((host.strip("[]") or "localhost", int(port)), timeout=min(5.0, timeout_s)):
                return
        except OSError as e:
            last = e
        if time.monotonic() >= deadline:
            raise PeerError(f"the coordinator {address} (process 0) was not reachable within {timeout_s:g} s "
                            f"({type(last).__name__}: {last}); start process 0 first, check the host:port and the "
                            "firewall, or raise config.distributed.timeout_s")
        time.sleep(poll_s)


def initialize(cfg: Mapping[str, Any] | None = None) -> bool:
    """Join the job's processes (`jax.distributed.initialize`) when `requested`; returns whether it did.

    Must run before anything touches a JAX device. On CPU the collectives go through gloo. A process other than
    0 first waits for the coordinator's port (`wait_for_coordinator`), so an unreachable coordinator is a
    `PeerError` naming host:port, not JAX's abort."""
    args = requested(cfg)
    if args is None or jax.distributed.is_initialized():
        return bool(args)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")   # CPU devices' collectives (harmless elsewhere)
    timeout = int(dict(cfg or {}).get("timeout_s", 300))
    # JAX aborts the process (in C++) once a peer misses heartbeats this long: keep it well above PeerWatch's limit
    kw = dict(initialization_timeout=timeout, shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S,
              heartbeat_timeout_seconds=int(max(100, 3 * float(dict(cfg or {}).get("peer_timeout_s", 30)))))
    if "detected" in args:
        jax.distributed.initialize(**kw)
    else:
        if args["process_id"] != 0:
            wait_for_coordinator(args["coordinator_address"], timeout)
        jax.distributed.initialize(**args, **kw)
    return True


class PeerWatch:
    """A daemon thread that notices a lost peer before JAX's own heartbeat check aborts the process in C++.

    Every `interval_s` each process bumps its counter in the coordination service's key-value store and reads
    the others'; a peer whose counter has not moved for `stale_s` (or a coordinator that stops answering) is lost:
    `on_lost(message)` is called (the trainer prints one line and exits with status 4). `stale_s` stays below
    JAX's heartbeat timeout (`initialize` sets it to at least 3 x `distributed.peer_timeout_s`). A process that finished sets its "done" key first, so
    peers that end a little later are not taken for lost."""

    def __init__(self, on_lost, *, interval_s: float = 2.0, stale_s: float = 30.0):
        self.on_lost, self.interval_s, self.stale_s = on_lost, interval_s, stale_s
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self) -> "PeerWatch":
        if jax.process_count() > 1:
            self._thread = threading.Thread(target=self._run, name="mr1jax-peer-watch", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            try:
                _client().key_value_set(f"mr1jax/done/{jax.process_index()}", "1")
            except Exception:  # noqa: BLE001 - the coordinator may be gone already
                pass
            self._stop.set()
            self._thread.join(timeout=self.interval_s * 2)

    def _run(self) -> None:
        me, n = jax.process_index(), jax.process_count()
        client, beat = _client(), 0
        last_seen = {i: (None, time.monotonic()) for i in range(n) if i != me}
        while not self._stop.wait(self.interval_s):
            beat += 1
            try:
                client.key_value_set(f"mr1jax/alive/{me}", str(beat), allow_overwrite=True)
                for i, (value, since) in list(last_seen.items()):
                    if _try_get(client, f"mr1jax/done/{i}") is not None:        # finished normally
                        del last_seen[i]
                        continue
                    now = _try_get(client, f"mr1jax/alive/{i}")
                    if now != value:
                        last_seen[i] = (now, time.monotonic())
                    elif time.monotonic() - since > self.stale_s:
                        self.on_lost(f"process {i} of {n} stopped answering for {self.stale_s:g} s")
                        return
            except Exception as e:  # noqa: BLE001 - the coordination service (process 0) is gone
                if self._stop.is_set():
                    return
                self.on_lost(f"the coordinator (process 0) stopped answering ({type(e).__name__})")
                return


def _client():
    from jax._src import distributed as jax_distributed   # the client JAX itself uses for its key-value store

    return jax_distributed.global_state.client


def _try_get(client, key: str) -> str | None:
    try:
        return client.key_value_try_get(key)
    except Exception as e:  # noqa: BLE001 - NOT_FOUND until the peer's first beat
        if "not_found" in str(e).lower() or "not found" in str(e).lower():
            return None
        raise


_PEER_FAILURE = ("gloo", "connection reset", "connection refused", "connection closed", "broken pipe",
                 "deadline_exceeded", "unavailable", "another task", "heartbeat", "socket closed", "peer")


def is_peer_failure(error: BaseException) -> bool:
    """Whether `error` is a collective / coordination failure caused by another process going away (only
    meaningful with several processes)."""
    text = f"{type(error).__name__}: {error}".lower()
    return jax.process_count() > 1 and any(k in text for k in _PEER_FAILURE)


def agree(name: str, payload: Mapping[str, str], timeout_s: float = 120.0) -> list[dict[str, str]]:
    """Every process's `payload` (a flat str -> str dict), in process order, through the coordination service's
    key-value store (no device collective). One process: [payload]."""
    if jax.process_count() == 1:
        return [dict(payload)]
    client = _client()
    client.key_value_set(f"mr1jax/{name}/{jax.process_index()}", json.dumps(dict(payload), sort_keys=True))
    return [json.loads(client.blocking_key_value_get(f"mr1jax/{name}/{i}", int(timeout_s * 1000)))
            for i in range(jax.process_count())]


def differences(payloads: list[Mapping[str, str]], limit: int = 8) -> list[str]:
    """Lines naming each key whose value differs from process 0's, with the processes and values."""
    out = []
    keys = sorted(set().union(*payloads))
    for k in keys:
        ref = payloads[0].get(k)
        bad = [(i, p.get(k)) for i, p in enumerate(payloads) if p.get(k) != ref]
        if bad:
            out.append(f"{k}: process 0 {ref}, " + ", ".join(f"process {i} {v}" for i, v in bad))
    return out[:limit] + ([f"... and {len(out) - limit} more"] if len(out) > limit else [])


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
