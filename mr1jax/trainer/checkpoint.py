"""Orbax checkpointing with exact resume and preemption handling.

A checkpoint holds one step's training state pytree (parameters, optimizer state, step, RNG key - anything
`jax.tree` can map), a small JSON `meta` dict (schedule position, PTST stage, data counters, config hash)
and, optionally, the grain iterator state so data order resumes exactly.

Saves are asynchronous and atomic (Orbax writes to a temporary directory and renames it when complete),
so a crash or kill mid-save never corrupts the last good checkpoint.

Integrity: `save` refuses a state holding NaN / inf (`NonFiniteStateError`: a saved checkpoint is always
finite, so `max_to_keep` can only ever delete finite ones) and records a fingerprint per array in ``meta``
(``fingerprints``: two position-weighted wrap-around sums of the array's bits, computed on device; integer sums
are exact in any order, so they do not depend on the sharding). `restore` recomputes and compares them; an
unreadable checkpoint or a mismatching array raises `CheckpointCorruptError` naming the array / path, and
`restore_latest_good` then falls back to the newest good checkpoint, moving the bad ones to
``<directory>_bad/``. `PreemptionGuard` turns SIGTERM
(what cloud VMs send before preemption) into a flag the training loop checks between steps: it then saves,
waits for the write, and exits cleanly.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import signal
import socket
import sys
import threading
import time
from typing import Any, Callable

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from mr1jax.parallel import distributed
from mr1jax.parallel.storage import is_url
from mr1jax.trainer import state as st


class CheckpointMismatchError(ValueError):
    """A checkpoint's arrays do not fit the state being restored (another model or optimizer)."""


class CheckpointCorruptError(RuntimeError):
    """A checkpoint cannot be read, or an array does not match the fingerprint recorded when it was saved."""


class NonFiniteStateError(RuntimeError):
    """The state to save holds NaN or inf values (it is never written)."""


def _absolute(path: str | os.PathLike) -> str:
    """`path` made absolute when it is local; URLs (``gs://bucket/run``, any `etils.epath` file system) as given."""
    return os.fspath(path) if is_url(path) else os.path.abspath(os.fspath(path))


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """'a/b/0/c' -> shape for every leaf; named tuples and dicts give the same paths (Orbax metadata
    stores optimizer states as dicts)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]:
        shape = getattr(leaf, "shape", None)
        name = "/".join(_key_name(k) for k in path)
        name = name[:-len("/value")] if name.endswith("/value") else name  # nnx Variables may carry a 'value' key
        out[name] = tuple(shape) if shape is not None else ()
    return out


def _flat_leaves(tree: Any) -> dict[str, Any]:
    """'a/b/0/c' -> leaf (arrays or ShapeDtypeStructs), named like `_flat_shapes`."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:       # arrays (inside nnx Variables too)
        name = "/".join(_key_name(k) for k in path)
        out[name[:-len("/value")] if name.endswith("/value") else name] = leaf
    return out


def _bits(x: jax.Array) -> jax.Array:
    """The raw bits of `x` as uint32 (16- and 8-bit types widened; 64-bit types split in two words)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    word = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, word).astype(jnp.uint32)


def _leaf_stats(x: jax.Array) -> jax.Array:
    """uint32[3]: (non-finite count, two position-weighted wrap-around sums of the bits). Integer sums wrap
    exactly, in any order, so the fingerprint does not depend on how the array is sharded."""
    b = _bits(x)
    idx = jnp.zeros(b.shape, jnp.uint32)
    for d in range(b.ndim):                                   # flat index without a (resharding) reshape
        idx = idx * jnp.uint32(b.shape[d]) + jax.lax.broadcasted_iota(jnp.uint32, b.shape, d)
    h1 = jnp.sum(b * (idx * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
    rot = (b << jnp.uint32(13)) | (b >> jnp.uint32(19))
    h2 = jnp.sum(rot ^ (idx * jnp.uint32(0x9E3779B1)), dtype=jnp.uint32)
    bad = jnp.sum(~jnp.isfinite(x), dtype=jnp.uint32) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.uint32(0)
    return jnp.stack([bad, h1, h2])


@jax.jit
def _stats_of(leaves: list[jax.Array]) -> list[jax.Array]:
    return [_leaf_stats(x) for x in leaves]


def array_stats(tree: Any) -> dict[str, tuple[int, list[int], str]]:
    """{array name: (non-finite values, fingerprint [h1, h2], dtype)} for every array leaf of `tree`, computed on
    device in one jitted pass (only 3 numbers per array come back to the host)."""
    flat = {k: v for k, v in _flat_leaves(tree).items() if isinstance(v, jax.Array) or isinstance(v, np.ndarray)}
    names = list(flat)
    stats = jax.device_get(_stats_of([jnp.asarray(flat[k]) for k in names]))
    return {k: (int(s[0]), [int(s[1]), int(s[2])], str(flat[k].dtype)) for k, s in zip(names, stats)}


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` for (state, meta, data iterator) checkpoints.

    Args:
      directory: where checkpoints go (`<workdir>/checkpoints`); created if missing.
      max_to_keep: keep the newest N checkpoints.
      async_save: write in a background thread (the next training step overlaps the write).
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = _absolute(directory)
        self.bad_directory = self.directory.rstrip("/") + "_bad"
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler(),
                           "data": grain.checkpoint.CheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any] | None = None, data_iterator: Any = None,
             *, force: bool = True) -> bool:
        """Save `state` (a pytree of arrays) as checkpoint `step`, with a fingerprint per array in its meta.
        Returns whether a save started. Raises NonFiniteStateError (writing nothing) when any floating-point
        array holds NaN or inf."""
        stats = array_stats(state)
        bad = [f"{k} ({n} values)" for k, (n, _, _) in stats.items() if n]
        if bad:
            raise NonFiniteStateError(
                f"refusing to save checkpoint step {step} in {self.directory}: {len(bad)} of {len(stats)} arrays hold "
                f"NaN / inf: " + "; ".join(bad[:10]) + (f"; ... {len(bad) - 10} more" if len(bad) > 10 else ""))
        meta = dict(meta or {}, fingerprints={k: [*fp, dt] for k, (_, fp, dt) in stats.items()})
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int | None, abstract_state: Any, data_iterator: Any = None
                ) -> tuple[Any, dict[str, Any]]:
        """Restore checkpoint `step` (default: the latest) into arrays shaped/sharded like `abstract_state`.

        `abstract_state` may hold arrays or `jax.ShapeDtypeStruct`s (with shardings, to restore straight onto
        a mesh). When `data_iterator` is given its position is restored in place.
        Raises CheckpointMismatchError naming every array whose shape differs or that is missing/unexpected,
        CheckpointCorruptError when the checkpoint cannot be read or an array differs from its fingerprint.
        The returned meta has no ``fingerprints``.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if step not in self.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; available steps: "
                                    f"{self.all_steps()}")
        meta = self.read_meta(step)
        self._check_compatible(step, abstract_state)
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        items = {"state": ocp.args.StandardRestore(target)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        with self._reading(step, "state"):
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        self._verify(step, restored["state"], meta)
        meta.pop("fingerprints", None)
        return restored["state"], meta

    def restore_latest_good(self, abstract_state: Callable[[int], Any], data_iterator: Any = None,
                            warn: Callable[[str], None] = print) -> tuple[int, Any, dict[str, Any]] | None:
        """`restore` the newest checkpoint that reads back intact; None when there is none at all.

        abstract_state(step): the target tree for that step. A corrupt checkpoint (`CheckpointCorruptError`) is
        reported through `warn` and the next older one tried; once a good one is found, the bad newer ones are
        moved to `bad_directory` (so the run can save those steps again). Raises CheckpointCorruptError naming
        every checkpoint when none is good (moving nothing)."""
        bad: list[tuple[int, CheckpointCorruptError]] = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                state, meta = self.restore(step, abstract_state(step), data_iterator)
            except CheckpointCorruptError as e:
                warn(f"warning: {e}")
                bad.append((step, e))
                continue
            for b, _ in bad:
                dest = self.quarantine(b)
                warn(f"warning: moved the bad checkpoint {os.path.join(self.directory, str(b))} to {dest}")
            if bad:
                warn(f"warning: fell back to checkpoint step {step} (newest good one)")
            return step, state, meta
        if bad:
            raise CheckpointCorruptError(f"no usable checkpoint in {self.directory}; every one is bad:\n  "
                                         + "\n  ".join(str(e) for _, e in bad))
        return None

    def quarantine(self, step: int) -> str:
        """Move checkpoint `step` out of the manager's directory (to `bad_directory`); returns where to."""
        src = epath.Path(self.directory) / str(step)
        dest = epath.Path(self.bad_directory) / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        if distributed.is_primary():                      # one process moves it; the others wait and re-list
            dest.parent.mkdir(parents=True, exist_ok=True)
            src.rename(dest)
        distributed.sync(f"mr1jax_quarantine_{step}")
        self.manager.reload()
        return os.fspath(dest)

    def read_meta(self, step: int) -> dict[str, Any]:
        """Checkpoint `step`'s meta dict (with ``fingerprints``); CheckpointCorruptError naming the file when it
        is unreadable."""
        with self._reading(step, "meta"):
            restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        meta = restored["meta"]
        if not isinstance(meta, dict):
            raise CheckpointCorruptError(f"checkpoint step {step}: {os.path.join(self.directory, str(step), 'meta')} "
                                         f"holds no JSON object ({type(meta).__name__})")
        return dict(meta)

    @contextlib.contextmanager
    def _reading(self, step: int, what: str):
        """Turns any error while reading item `what` of checkpoint `step` into CheckpointCorruptError naming it."""
        try:
            yield
        except (CheckpointMismatchError, CheckpointCorruptError):
            raise
        except Exception as exc:  # noqa: BLE001  (tensorstore / JSON / OS errors of a damaged checkpoint)
            detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            raise CheckpointCorruptError(f"checkpoint step {step}: cannot read "
                                         f"{os.path.join(self.directory, str(step), what)}: {type(exc).__name__}: "
                                         f"{detail}") from exc

    def _verify(self, step: int, tree: Any, meta: dict[str, Any], prefix: str = "") -> None:
        """CheckpointCorruptError naming each restored array whose fingerprint differs from the saved one (arrays
        restored in another dtype, or checkpoints without fingerprints, are not compared)."""
        saved = meta.get("fingerprints")
        if not saved:
            return
        bad = []
        for name, (nonfinite, fp, dtype) in array_stats(tree).items():
            want = saved.get(prefix + name)
            if want is not None and want[2] == dtype and (list(want[:2]) != fp or nonfinite):
                bad.append(prefix + name)
        if bad:
            raise CheckpointCorruptError(
                f"checkpoint step {step}: {len(bad)} array(s) in {os.path.join(self.directory, str(step), 'state')} "
                f"do not match the fingerprints recorded at save (corrupted on disk?): " + "; ".join(bad[:10])
                + (f"; ... {len(bad) - 10} more" if len(bad) > 10 else ""))

    def restore_params(self, step: int | None, params: Any) -> Any:
        """Only the `params` subtree of checkpoint `step` (no optimizer state or reference copy), restored onto
        the shapes and shardings of `params` (arrays or ShapeDtypeStructs). Raises CheckpointMismatchError."""
        step = self.latest_step() if step is None else step
        if step not in self.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; available steps: "
                                    f"{self.all_steps()}")
        meta = self.read_meta(step)
        self._check_compatible(step, {"params": params}, subtree="params")
        target = {"params": jax.tree.map(ocp.utils.to_shape_dtype_struct, params)}
        with ocp.PyTreeCheckpointer() as reader, self._reading(step, "state"):
            restored = reader.restore(os.path.join(self.directory, str(step), "state"), args=ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True))
        self._verify(step, restored, meta)
        return restored["params"]

    def _check_compatible(self, step: int, abstract_state: Any, subtree: str | None = None) -> None:
        with self._reading(step, "state"):
            saved_meta = self.manager.item_metadata(step)["state"]
            if subtree is not None:
                saved_meta = {subtree: saved_meta[subtree]}
            saved = _flat_shapes(saved_meta)
        if not saved:
            raise CheckpointCorruptError(f"checkpoint step {step}: {os.path.join(self.directory, str(step), 'state')} "
                                         "lists no arrays (its _METADATA is missing or broken)")
        want = _flat_shapes(abstract_state)
        missing = sorted(set(want) - set(saved))
        unexpected = sorted(set(saved) - set(want))
        misshaped = [f"{k}: checkpoint {list(saved[k])} vs model {list(want[k])}"
                     for k in sorted(set(want) & set(saved)) if saved[k] != want[k]]
        if missing or unexpected or misshaped:
            lines = [f"checkpoint step {step} in {self.directory} does not match the state being restored "
                     "(a checkpoint of another model shape or optimizer?):"]
            for title, items in (("missing", missing), ("unexpected", unexpected), ("misshaped", misshaped)):
                if items:
                    shown = items[:20] + ([f"... {len(items) - 20} more"] if len(items) > 20 else [])
                    lines.append(f"  {len(items)} {title}: " + "; ".join(shown))
            raise CheckpointMismatchError("\n".join(lines))

    def wait(self) -> None:
        """Block until any in-flight asynchronous save has finished."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class WorkdirLockedError(RuntimeError):
    """Another live run holds the work dir's lock."""


class WorkdirLock:
    """One run per work dir: an exclusive `fcntl.flock` on `<workdir>/run.lock`, holding the holder's host, pid,
    start time and command line.

    The kernel drops the lock when the holding process exits in any way (exception, SIGTERM, SIGKILL), so a
    lock left by a dead run is never stale: the file stays, its lock does not. `acquire` raises
    WorkdirLockedError naming the holder when a live process has it. (flock on a network file system is only
    as good as that file system's lock support; a work dir on an object store, gs://..., is not locked.)"""

    def __init__(self, workdir: str | os.PathLike):
        self.path = os.path.join(os.fspath(workdir), "run.lock")
        self._fd: int | None = None

    def acquire(self) -> "WorkdirLock":
        if is_url(self.path):            # object stores have no locks: the scheduler must run one job per dir
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise WorkdirLockedError(f"{os.path.dirname(self.path)} is in use by another run: {self.holder()} "
                                     f"(lock {self.path}); wait for it to finish, stop it, or use another "
                                     "--workdir") from None
        info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "argv": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(info) + "\n").encode())
        self._fd = fd
        return self

    def holder(self) -> str:
        """The lock file's holder as text ("pid 123 on host, started ...")."""
        try:
            with open(self.path) as f:
                h = json.loads(f.read() or "{}")
            return f"pid {h.get('pid')} on {h.get('host')}, started {h.get('started')} ({h.get('argv', '')})"
        except (OSError, ValueError):
            return "a process that has not yet written its name"

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class PreemptionGuard:
    """Sets `.requested` when SIGTERM (or SIGINT, if asked) arrives; restores the old handlers on exit. A second
    SIGINT raises KeyboardInterrupt at once (Ctrl-C twice aborts without waiting for the save).

    Use as a context manager around the training loop and check `guard.requested` between steps.
    Only installs handlers from the main thread (signals cannot be caught elsewhere).
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.signals = signals
        self.requested = False
        self.signal_name: str | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame):  # noqa: ARG002
        if signum == signal.SIGINT and self.requested:      # a second Ctrl-C: stop now, without saving
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()


def checkpoint_tree(state: st.TrainState) -> dict[str, Any]:
    """What a checkpoint holds: parameters, optimizer state, RNG and, when present, the reference."""
    tree = {"params": state.params, "opt_state": state.opt_state, "rng": state.rng}
    if state.ref_params is not None:
        tree["ref_params"] = state.ref_params
    return tree


def restore_state(ckpt: Checkpointer, state: st.TrainState, data_iter, *, with_ref_after: int | None,
                  ref_dtype, warn=print) -> tuple[st.TrainState, dict[str, Any]]:
    """(`state` from the newest good checkpoint (and the data iterator's position), its meta), or (`state`, {})
    without one. A corrupt checkpoint is reported through `warn` and the previous one used
    (`Checkpointer.restore_latest_good`).

    with_ref_after: a checkpoint of step >= this holds the reference (the SFT model); None = never saved (the
    reference is the starting model, rebuilt at start).
    """
    def tree_for(step: int) -> dict[str, Any]:
        tree = checkpoint_tree(state)
        if with_ref_after is not None and step >= with_ref_after and state.ref_params is None:
            tree["ref_params"] = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
                x.shape, ref_dtype if jax.numpy.issubdtype(x.dtype, jax.numpy.floating) else x.dtype,
                sharding=x.sharding), state.params)
        elif with_ref_after is not None and step < with_ref_after:
            tree.pop("ref_params", None)
        return tree

    found = ckpt.restore_latest_good(tree_for, data_iterator=data_iter, warn=warn)
    if found is None:
        return state, {}
    _, restored, meta = found
    return st.TrainState(params=restored["params"], opt_state=restored["opt_state"],
                         ref_params=restored.get("ref_params", state.ref_params if with_ref_after is None else None),
                         rng=restored["rng"], step=int(meta["step"])), meta
