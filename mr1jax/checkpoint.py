"""Orbax checkpointing with exact resume and preemption handling.

A checkpoint holds one step's training state pytree (parameters, optimizer state, step, RNG key - anything
`jax.tree` can map), a small JSON `meta` dict (schedule position, PTST stage, data counters, config hash)
and, optionally, the grain iterator state so data order resumes exactly.

Saves are asynchronous and atomic (Orbax writes to a temporary directory and renames it when complete),
so a crash or kill mid-save never corrupts the last good checkpoint. `PreemptionGuard` turns SIGTERM
(what cloud VMs send before preemption) into a flag the training loop checks between steps: it then saves,
waits for the write, and exits cleanly.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
    """A checkpoint's arrays do not fit the state being restored (another model or optimizer)."""


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


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` for (state, meta, data iterator) checkpoints.

    Args:
      directory: where checkpoints go (`<workdir>/checkpoints`); created if missing.
      max_to_keep: keep the newest N checkpoints.
      async_save: write in a background thread (the next training step overlaps the write).
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(os.fspath(directory))
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
        """Save `state` (a pytree of arrays) as checkpoint `step`. Returns whether a save started."""
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(dict(meta or {}))}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int | None, abstract_state: Any, data_iterator: Any = None
                ) -> tuple[Any, dict[str, Any]]:
        """Restore checkpoint `step` (default: the latest) into arrays shaped/sharded like `abstract_state`.

        `abstract_state` may hold arrays or `jax.ShapeDtypeStruct`s (with shardings, to restore straight onto
        a mesh). When `data_iterator` is given its position is restored in place.
        Raises CheckpointMismatchError naming every array whose shape differs or that is missing/unexpected.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if step not in self.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; available steps: "
                                    f"{self.all_steps()}")
        self._check_compatible(step, abstract_state)
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        items = {"state": ocp.args.StandardRestore(target), "meta": ocp.args.JsonRestore()}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"], dict(restored["meta"] or {})

    def restore_params(self, step: int | None, params: Any) -> Any:
        """Only the `params` subtree of checkpoint `step` (no optimizer state or reference copy), restored onto
        the shapes and shardings of `params` (arrays or ShapeDtypeStructs). Raises CheckpointMismatchError."""
        step = self.latest_step() if step is None else step
        if step not in self.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; available steps: "
                                    f"{self.all_steps()}")
        self._check_compatible(step, {"params": params}, subtree="params")
        target = {"params": jax.tree.map(ocp.utils.to_shape_dtype_struct, params)}
        with ocp.PyTreeCheckpointer() as reader:
            restored = reader.restore(os.path.join(self.directory, str(step), "state"), args=ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True))
        return restored["params"]

    def _check_compatible(self, step: int, abstract_state: Any, subtree: str | None = None) -> None:
        saved_meta = self.manager.item_metadata(step)["state"]
        if subtree is not None:
            saved_meta = {subtree: saved_meta[subtree]}
        saved = _flat_shapes(saved_meta)
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


class PreemptionGuard:
    """Sets `.requested` when SIGTERM (or SIGINT, if asked) arrives; restores the old handlers on exit.

    Use as a context manager around the training loop and check `guard.requested` between steps.
    Only installs handlers from the main thread (signals cannot be caught elsewhere).
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.signals = signals
        self.requested = False
        self.signal_name: str | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame):  # noqa: ARG002
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
