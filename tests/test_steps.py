"""mr1jax.trainer.state: the TrainState helpers and donation-safe asynchronous checkpointing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mr1jax.parallel import sharding
from mr1jax.trainer import state as st
from mr1jax.trainer.checkpoint import Checkpointer
from mr1jax.models.qwen2_vl import Qwen2VL, Qwen2VLConfig


def _state(param_dtype=jnp.float32):
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, jax.devices()[:1])
    model = Qwen2VL(Qwen2VLConfig.tiny(vocab_size=256, hidden_size=32), rngs=nnx.Rngs(0), dtype=jnp.bfloat16,
                    param_dtype=param_dtype)
    graphdef, params = nnx.split(sharding.shard_model(model, mesh))
    tx = optax.adamw(1e-2)
    return mesh, graphdef, tx, st.init_train_state(params, tx, mesh, ref_dtype=jnp.bfloat16, keep_ref=True, seed=0)


def test_reference_is_a_compute_dtype_copy_and_opt_state_follows_params():
    mesh, _, _, state = _state()
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state.ref_params))
    for p, r in zip(jax.tree.leaves(state.params), jax.tree.leaves(state.ref_params)):
        np.testing.assert_array_equal(np.asarray(p.astype(jnp.bfloat16)), np.asarray(r))
    sh = st.state_shardings(state, mesh)
    mu = state.opt_state[0].mu  # adamw = chain(scale_by_adam, ...): Adam moments mirror the params
    assert jax.tree.structure(mu) == jax.tree.structure(state.params)
    assert jax.tree.structure(sh.opt_state[0].mu) == jax.tree.structure(sh.params)


def test_async_save_then_donating_update_keeps_the_saved_values(tmp_path):
    """An asynchronous Orbax save followed at once by a step that donates (and overwrites) the saved buffers
    still writes the values as they were at save time."""
    mesh, _, tx, state = _state()
    saved = jax.tree.map(lambda x: np.array(x, copy=True), state.params)   # not a view: would pin the buffer
    ckpt = Checkpointer(tmp_path / "ck", async_save=True)
    ckpt.save(1, {"params": state.params, "opt_state": state.opt_state})

    donating = jax.jit(lambda p: jax.tree.map(lambda x: x * 2.0 + 1.0, p), donate_argnums=0)
    new = donating(state.params)
    assert all(x.is_deleted() for x in jax.tree.leaves(state.params) if hasattr(x, "is_deleted"))
    ckpt.wait()
    restored, _ = ckpt.restore(1, {"params": new, "opt_state": state.opt_state})
    for a, b in zip(jax.tree.leaves(restored["params"]), jax.tree.leaves(saved)):
        np.testing.assert_array_equal(np.asarray(a), b)
    ckpt.close()
