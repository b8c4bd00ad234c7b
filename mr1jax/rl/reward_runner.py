"""A crash/timeout-proof batch runner for host-side reward functions: `RewardRunner`, `score_batch`.

The reward functions themselves (answer parsing, format/accuracy rewards) live in `mr1jax.rl.rewards`; this
module imports them, never the other way round.

Over 500 lines: one worker-pool protocol (start, load, task, deadline, kill / replace, shutdown) whose parts share
the pool's state; split, each half would be unreadable without the other.

**math_verify and timeouts.** math_verify bounds its own work with ``signal.alarm``, which raises outside the
main thread. `mr1jax.rl.rewards` always calls it with ``parsing_timeout=None`` and ``timeout_seconds=None``,
so the reward functions work from any thread but are not time-bounded by themselves: sympy can hang on
adversarial input (``"9^{9^{9^{9}}}"``). Bound them with `RewardRunner` / `score_batch`, which run the reward
function in worker processes (multiprocessing ``forkserver`` context on Linux, ``spawn`` elsewhere; never
``fork``, the trainer process holds JAX threads), give every sample its own deadline, and kill and replace a
worker that overruns it. A sample whose reward raises, returns a non-finite or non-numeric value, kills its
worker, or overruns the deadline gets 0.0 and is counted in the stats; the runner never raises for a
per-sample failure. It does raise for systemic failures: a reward function that cannot be pickled (use a
module-level function or `functools.partial` of one) or loaded in the workers, or workers that repeatedly fail
to start.

Worker start-up: workers import the trainer's ``__main__`` module (standard multiprocessing behaviour: keep an
``if __name__ == "__main__":`` guard; a script read from stdin cannot start workers) and the reward function's
module, and warm up math_verify, before they take work; that time is bounded by ``startup_timeout_s``, not by
the per-sample timeout. With ``forkserver`` the runner adds ``__main__``, `mr1jax.rl.rewards`, this module and
math_verify to the process-wide forkserver preload list (if the forkserver has not started yet), so they are
imported once in the forkserver and each worker, including the replacement of a killed one, starts by a fork
in milliseconds. Note that importing these modules imports ``mr1jax.rl``'s package ``__init__`` (JAX, ~1 s),
once per forkserver or per ``spawn`` worker. The pool is created lazily on first use, reused across calls, and
shut down by `close()` (or the context manager; `score_batch`'s shared runner closes at interpreter exit).
"""

from __future__ import annotations

import atexit
import collections
import functools
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np

from mr1jax.rl.rewards import load_math_verify

__all__ = ["RewardFn", "RewardRunner", "close_default_runner", "score_batch"]

logger = logging.getLogger(__name__)

RewardFn = Callable[[str, Any], float]


def _error_text(exc: BaseException) -> str:
    try:
        text = f"{type(exc).__name__}: {exc}"
    except Exception:  # a hostile __str__
        text = type(exc).__name__
    return text[:500]


def _set_parent_death_signal() -> None:
    """Linux: have the kernel SIGKILL this worker if its parent (the forkserver / trainer) dies."""
    try:
        import ctypes  # noqa: PLC0415

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _warmup() -> None:
    """Import math_verify (sympy) and run one parse/verify so the first sample is not charged for it."""
    try:
        mv = load_math_verify()
        mv.verify(mv.parse("$1$", parsing_timeout=None), mv.parse("$1$", parsing_timeout=None), timeout_seconds=None)
    except Exception:  # a missing math_verify shows up as per-sample errors with the message
        pass


def _worker_main(conn: multiprocessing.connection.Connection, warmup: bool, max_memory_mb: int | None) -> None:
    """Worker loop. Messages in: ("load", fn_bytes) | ("task", idx, completion, answer) | ("stop",).

    Messages out: ("ready",) once, ("loaded", error_or_None), ("result", idx, ok, value_or_error).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's business; it kills us in close()
    _set_parent_death_signal()
    if warmup:
        _warmup()
    if max_memory_mb:
        try:
            import resource  # noqa: PLC0415

            _, hard = resource.getrlimit(resource.RLIMIT_AS)
            soft = int(max_memory_mb) * 2**20
            if hard != resource.RLIM_INFINITY:
                soft = min(soft, hard)
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        except Exception:
            pass
    conn.send(("ready",))
    fn: RewardFn | None = None
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        kind = msg[0]
        if kind == "stop":
            return
        if kind == "load":
            try:
                fn = pickle.loads(msg[1])
                reply = ("loaded", None)
            except BaseException as exc:  # noqa: BLE001
                fn = None
                reply = ("loaded", _error_text(exc))
            try:
                conn.send(reply)
            except (EOFError, OSError):
                return
        elif kind == "task":
            _, idx, completion, answer = msg
            try:
                if fn is None:
                    raise RuntimeError("no reward function loaded")
                raw = fn(completion, answer)
                if isinstance(raw, (bool, np.bool_)):
                    raw = float(raw)
                if not isinstance(raw, (int, float, np.integer, np.floating)) and not (
                    isinstance(raw, np.ndarray) and raw.size == 1
                ):
                    raise TypeError(f"reward must be a number, got {type(raw).__name__}")
                value = float(raw)
                if not math.isfinite(value):
                    raise ValueError(f"non-finite reward {value}")
                out = ("result", idx, True, value)
            except BaseException as exc:  # noqa: BLE001  (SystemExit, MemoryError, …: the sample fails, not us)
                out = ("result", idx, False, _error_text(exc))
            try:
                conn.send(out)
            except (EOFError, OSError):
                return


class _Worker:
    """One worker process and the parent's end of its pipe, with the parent's view of its state."""

    __slots__ = ("proc", "conn", "state", "deadline", "idx", "loaded", "loading")

    def __init__(self, ctx, warmup: bool, max_memory_mb: int | None, startup_timeout_s: float):
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(
            target=_worker_main, args=(child_conn, warmup, max_memory_mb), daemon=True, name="mr1jax-reward"
        )
        self.proc.start()
        child_conn.close()
        self.conn = parent_conn
        self.state = "starting"  # starting -> idle <-> (loading | busy)
        self.deadline = time.monotonic() + startup_timeout_s
        self.idx = -1
        self.loaded: bytes | None = None  # the pickled reward function the worker holds
        self.loading: bytes | None = None  # the one it was last asked to load (acks may arrive a call later)

    def send(self, msg: tuple) -> bool:
        try:
            self.conn.send(msg)
            return True
        except (OSError, ValueError):
            return False

    def kill(self) -> None:
        try:
            if self.proc.is_alive():
                self.proc.kill()
            self.proc.join(timeout=5.0)
        except Exception:
            pass
        try:
            self.conn.close()
        except Exception:
            pass

    def stop(self) -> None:
        if self.send(("stop",)):
            self.proc.join(timeout=1.0)
        self.kill()


_FORKSERVER_PRELOAD = ("__main__", "mr1jax.rl.rewards", "mr1jax.rl.reward_runner", "math_verify")


def _add_forkserver_preload(ctx) -> None:
    """Have the forkserver import the main module, the reward modules and math_verify once, so each worker (and
    each replacement of a killed one) forks with them loaded instead of importing them again (~1-2 s each).

    Only effective if this process has not started its forkserver yet; keeps any preload already set.
    Modules that fail to import are skipped by the forkserver.
    """
    try:
        from multiprocessing import forkserver  # noqa: PLC0415

        current = list(getattr(forkserver._forkserver, "_preload_modules", []) or [])
        ctx.set_forkserver_preload(current + [m for m in _FORKSERVER_PRELOAD if m not in current])
    except Exception:
        pass


def _default_start_method() -> str:
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


class RewardRunner:
    """Evaluates a reward function over a batch in worker processes with a deadline per sample.

    ``runner.score(fn, completions, answers)`` returns ``(rewards, stats)``: ``rewards`` is a float32 array
    ``[N]`` of ``fn(completions[i], answers[i])``, with 0.0 for every sample whose call raised, returned a
    non-finite or non-numeric value, crashed its worker, or ran past ``timeout_s`` (the worker is then
    killed and replaced, so the pool is never poisoned). ``stats``:

    - ``n``: samples; ``n_errors``: failed samples (raised / bad value / worker died);
      ``n_timeouts``: samples that ran past their deadline;
    - ``n_restarts``: workers replaced during the call; ``first_error``: the first error text or None;
    - ``wall_s``: wall-clock seconds of the call.

    ``fn`` must be picklable by reference: a module-level function, or `functools.partial` of one (pass
    options that way or through ``fn_kwargs``). Calls are serialised by a lock, so the runner may be used
    from any thread, including non-main ones. ``workers=0`` runs ``fn`` in the calling thread instead (for
    debugging and unpicklable functions): exceptions still score 0 and are counted, but a slow sample cannot
    be interrupted; it is counted as a timeout and scored 0 after it finishes.

    Args:
      workers: worker processes; default ``min(8, os.cpu_count())``.
      timeout_s: default per-sample deadline in seconds (``score`` may override it per call).
      start_method: ``"forkserver"`` (default where available) or ``"spawn"``. ``"fork"`` is refused: the
        trainer process runs JAX threads.
      startup_timeout_s: how long a worker may take to start (imports, warm-up) or to load ``fn``.
      max_memory_mb: optional per-worker address-space limit (``RLIMIT_AS``, set after start-up); an
        allocation past it raises MemoryError inside the worker, which scores that sample 0.
      warmup: import and exercise math_verify in each worker before it takes work.
    """

    def __init__(
        self,
        workers: int | None = None,
        *,
        timeout_s: float = 2.0,
        start_method: str | None = None,
        startup_timeout_s: float = 120.0,
        max_memory_mb: int | None = None,
        warmup: bool = True,
    ):
        if workers is None:
            workers = min(8, os.cpu_count() or 1)
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        start_method = start_method or _default_start_method()
        if start_method == "fork":
            raise ValueError("start_method='fork' is unsafe in a process that runs JAX; use forkserver or spawn")
        self.workers = int(workers)
        self.timeout_s = float(timeout_s)
        self.start_method = start_method
        self.startup_timeout_s = float(startup_timeout_s)
        self.max_memory_mb = max_memory_mb
        self.warmup = warmup
        self._ctx = None
        self._pool: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------------------

    def __enter__(self) -> "RewardRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop every worker process. Idempotent; the runner cannot be used afterwards."""
        with self._lock:
            self._closed = True
            self._stop_all()

    @property
    def worker_pids(self) -> list[int]:
        """PIDs of the current worker processes (for monitoring and tests)."""
        return [w.proc.pid for w in self._pool if w.proc.pid is not None]

    def _stop_all(self) -> None:
        pool, self._pool = self._pool, []
        for w in pool:
            w.stop()

    def _kill_all(self) -> None:
        pool, self._pool = self._pool, []
        for w in pool:
            w.kill()

    def _new_worker(self) -> _Worker:
        if self._ctx is None:
            self._ctx = multiprocessing.get_context(self.start_method)
            if self.start_method == "forkserver":
                _add_forkserver_preload(self._ctx)
        return _Worker(self._ctx, self.warmup, self.max_memory_mb, self.startup_timeout_s)

    def _replace(self, w: _Worker, stats: dict) -> None:
        w.kill()
        self._pool[self._pool.index(w)] = self._new_worker()
        stats["n_restarts"] += 1

    # -- scoring ---------------------------------------------------------------------------------------

    def score(
        self,
        fn: RewardFn,
        completions: Sequence[str],
        answers: Sequence[Any],
        *,
        timeout_s: float | None = None,
        fn_kwargs: dict[str, Any] | None = None,
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Rewards ``fn(completions[i], answers[i])`` as float32 ``[N]`` and the stats dict (see the class doc).

        Raises ValueError for mismatched lengths, TypeError for an unpicklable ``fn`` and RuntimeError when
        workers cannot start or cannot load ``fn``; never for a per-sample failure.
        """
        completions = list(completions)
        answers = list(answers)
        if len(completions) != len(answers):
            raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
        timeout_s = self.timeout_s if timeout_s is None else float(timeout_s)
        if fn_kwargs:
            fn = functools.partial(fn, **fn_kwargs)
        n = len(completions)
        rewards = np.zeros(n, dtype=np.float32)
        stats: dict[str, Any] = {
            "n": n, "n_errors": 0, "n_timeouts": 0, "n_restarts": 0, "first_error": None, "wall_s": 0.0,
        }
        t0 = time.monotonic()
        with self._lock:
            if self._closed:
                raise RuntimeError("RewardRunner is closed")
            if n:
                if self.workers == 0:
                    self._score_inline(fn, completions, answers, timeout_s, rewards, stats)
                else:
                    try:
                        fn_bytes = pickle.dumps(fn)
                    except Exception as exc:
                        raise TypeError(
                            "the reward function must be picklable by reference (a module-level function or a "
                            f"functools.partial of one), or use workers=0: {_error_text(exc)}"
                        ) from exc
                    try:
                        self._score_pool(fn_bytes, completions, answers, timeout_s, rewards, stats)
                    except BaseException:
                        self._kill_all()  # in-flight work would confuse the next call
                        raise
        stats["wall_s"] = time.monotonic() - t0
        if stats["n_errors"] or stats["n_timeouts"]:
            logger.warning(
                "rewards: %d/%d samples failed (%d errors, %d timeouts); first error: %s",
                stats["n_errors"] + stats["n_timeouts"], n, stats["n_errors"], stats["n_timeouts"],
                stats["first_error"],
            )
        return rewards, stats

    __call__ = score

    @staticmethod
    def _record_error(stats: dict, text: str) -> None:
        stats["n_errors"] += 1
        if stats["first_error"] is None:
            stats["first_error"] = text

    def _score_inline(self, fn, completions, answers, timeout_s, rewards, stats) -> None:
        for i, (completion, answer) in enumerate(zip(completions, answers)):
            t = time.monotonic()
            try:
                value = float(fn(completion, answer))
                if not math.isfinite(value):
                    raise ValueError(f"non-finite reward {value}")
            except Exception as exc:  # noqa: BLE001
                self._record_error(stats, _error_text(exc))
                continue
            if time.monotonic() - t > timeout_s:
                stats["n_timeouts"] += 1
                continue
            rewards[i] = value

    def _score_pool(self, fn_bytes, completions, answers, timeout_s, rewards, stats) -> None:
        while len(self._pool) < self.workers:
            self._pool.append(self._new_worker())
        pending = collections.deque(range(len(completions)))
        remaining = len(completions)
        failed_starts = 0
        max_failed_starts = 3 * self.workers + 2

        while remaining:
            # Hand out work: load the function where needed, then one sample per idle worker.
            for w in list(self._pool):
                if w.state != "idle":
                    continue
                if w.loaded != fn_bytes:
                    if w.send(("load", fn_bytes)):
                        w.state, w.loading = "loading", fn_bytes
                        w.deadline = time.monotonic() + self.startup_timeout_s
                    else:
                        failed_starts += 1
                        self._replace(w, stats)
                elif pending:
                    i = pending.popleft()
                    if w.send(("task", i, completions[i], answers[i])):
                        w.state, w.idx, w.deadline = "busy", i, time.monotonic() + timeout_s
                    else:  # the worker died while idle: not this sample's fault, retry it elsewhere
                        pending.appendleft(i)
                        failed_starts += 1
                        self._replace(w, stats)
            if failed_starts > max_failed_starts:
                raise RuntimeError(f"reward workers keep failing to start ({failed_starts} failures)")

            active = [w for w in self._pool if w.state != "idle"]
            if not active:
                continue
            wait_for = min(w.deadline for w in active) - time.monotonic()
            handles = [w.conn for w in active] + [w.proc.sentinel for w in active]
            ready = set(multiprocessing.connection.wait(handles, timeout=max(0.0, wait_for)))
            now = time.monotonic()

            for w in active:
                msg = None
                if w.conn in ready or w.proc.sentinel in ready:
                    try:
                        if w.conn.poll():
                            msg = w.conn.recv()
                    except (EOFError, OSError):
                        msg = None
                    if msg is None:  # the process is gone without answering
                        w.proc.join(timeout=1.0)
                        reason = f"worker died (exit code {w.proc.exitcode})"
                        failed_starts += w.state in ("starting", "loading")
                        remaining -= self._on_lost(w, stats, reason, timed_out=False)
                        continue
                elif now >= w.deadline:
                    failed_starts += w.state in ("starting", "loading")
                    remaining -= self._on_lost(w, stats, "timeout", timed_out=True)
                    continue
                else:
                    continue

                kind = msg[0]
                if kind == "ready" and w.state == "starting":
                    w.state = "idle"
                    failed_starts = 0
                elif kind == "loaded" and w.state == "loading":
                    # The ack may belong to a previous call whose batch finished while this worker was
                    # loading; record what was really loaded, so an outdated function is reloaded.
                    if msg[1] is not None and w.loading == fn_bytes:
                        raise RuntimeError(f"reward function could not be loaded in a worker: {msg[1]}")
                    w.state, w.loaded = "idle", (w.loading if msg[1] is None else None)
                    failed_starts = 0
                elif kind == "result" and w.state == "busy" and msg[1] == w.idx:
                    _, idx, ok, payload = msg
                    if ok:
                        rewards[idx] = payload
                    else:
                        self._record_error(stats, payload)
                    remaining -= 1
                    w.state, w.idx = "idle", -1
                else:  # protocol confusion should be impossible; recover by replacing the worker
                    remaining -= self._on_lost(w, stats, f"unexpected worker message {kind!r}", timed_out=False)

            if failed_starts > max_failed_starts:
                raise RuntimeError(f"reward workers keep failing to start ({failed_starts} failures)")

    def _on_lost(self, w: _Worker, stats: dict, reason: str, *, timed_out: bool) -> int:
        """A worker timed out, died or misbehaved: score its sample 0 (counted) and replace it.

        Returns the number of samples finished by this (1 if the worker was busy, else 0).
        """
        lost = 0
        if w.state == "busy":
            if timed_out:
                stats["n_timeouts"] += 1
            else:
                self._record_error(stats, reason)
            lost = 1
        elif w.state in ("starting", "loading"):
            logger.warning("reward worker failed to %s: %s", "start" if w.state == "starting" else "load", reason)
        self._replace(w, stats)
        return lost


_DEFAULT_RUNNER: RewardRunner | None = None
_DEFAULT_RUNNER_LOCK = threading.Lock()


def score_batch(
    fn: RewardFn,
    completions: Sequence[str],
    answers: Sequence[Any],
    *,
    timeout_s: float = 2.0,
    workers: int | None = None,
    fn_kwargs: dict[str, Any] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """`RewardRunner.score` on a shared, lazily created runner (re-created if ``workers`` changes).

    Returns ``(rewards float32 [N], stats)`` with ``stats["n_errors"]`` and ``stats["n_timeouts"]``; failed or
    overrunning samples score 0.0 and never raise. Safe to call from any thread. The shared runner is
    closed at interpreter exit or by `close_default_runner`.
    """
    global _DEFAULT_RUNNER
    wanted = min(8, os.cpu_count() or 1) if workers is None else workers
    with _DEFAULT_RUNNER_LOCK:
        runner = _DEFAULT_RUNNER
        if runner is None or runner.workers != wanted:
            if runner is not None:
                runner.close()
            runner = _DEFAULT_RUNNER = RewardRunner(wanted, timeout_s=timeout_s)
    return runner.score(fn, completions, answers, timeout_s=timeout_s, fn_kwargs=fn_kwargs)


def close_default_runner() -> None:
    """Stop the worker processes of `score_batch`'s shared runner (a later call starts new ones)."""
    global _DEFAULT_RUNNER
    with _DEFAULT_RUNNER_LOCK:
        runner, _DEFAULT_RUNNER = _DEFAULT_RUNNER, None
    if runner is not None:
        runner.close()


atexit.register(close_default_runner)
