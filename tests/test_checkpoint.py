"""Checkpointer: exact round trip, params-only restore, errors naming mismatched arrays and missing steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mr1jax.trainer.checkpoint import CheckpointMismatchError, Checkpointer, PreemptionGuard


def _state():
    params = {"w": jnp.arange(12.0).reshape(3, 4), "b": jnp.ones(4)}
    return {"params": params, "opt_state": optax.adamw(1e-3).init(params),
            "rng": jax.random.key_data(jax.random.key(7))}


def test_round_trip_and_params_only_restore(tmp_path):
    ck = Checkpointer(tmp_path, async_save=True)
    state = _state()
    ck.save(3, state, {"step": 3, "beta": 0.05})
    ck.wait()
    restored, meta = ck.restore(None, state)
    assert meta == {"step": 3, "beta": 0.05}
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(a, b)
    params = ck.restore_params(3, jax.tree.map(jnp.zeros_like, state["params"]))
    np.testing.assert_array_equal(params["w"], state["params"]["w"])
    ck.close()


def test_mismatch_and_missing_step_errors(tmp_path):
    ck = Checkpointer(tmp_path, async_save=False)
    ck.save(1, _state(), {"step": 1})
    other = _state()
    other["params"] = {"w": jnp.zeros((3, 5)), "c": jnp.zeros(4)}
    other["opt_state"] = optax.adamw(1e-3).init(other["params"])
    with pytest.raises(CheckpointMismatchError, match=r"params/w: checkpoint \[3, 4\] vs model \[3, 5\]") as e:
        ck.restore(1, other)
    assert "missing: " in str(e.value) and "params/c" in str(e.value) and "unexpected: " in str(e.value)
    with pytest.raises(CheckpointMismatchError, match=r"1 missing: params/c"):
        ck.restore_params(1, other["params"])
    with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 9 .* available steps: \[1\]"):
        ck.restore(9, _state())
    ck.close()


def test_preemption_guard_catches_sigterm():
    import os
    import signal

    with PreemptionGuard() as guard:
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.requested and guard.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
