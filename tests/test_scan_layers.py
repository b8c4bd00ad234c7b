"""Scanned (stacked-parameter) decoder layers and vision blocks: remat policies, program size vs depth,
sharding of the layer axis, per-layer init, and the sampler's unstacked decode path."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from mr1jax.parallel import sharding as shd
from mr1jax.models.qwen2_vl import REMAT_POLICIES, Qwen2VL, Qwen2VLConfig, prepare_inputs, set_remat
from mr1jax.models.qwen2_vl.model import attention_mask_4d, init_cache
from mr1jax.testing.hf_reference import make_batch


def _batch(cfg):
    ids, mask, pv, grid = make_batch(cfg, [{"text": 7, "images": [(1, 4, 4)]}, {"text": 5, "images": [(1, 4, 4)]}],
                                     seed=3)
    extra = prepare_inputs(cfg, ids, mask, grid)
    return (jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(extra.position_ids), jnp.asarray(pv),
            jnp.asarray(extra.patch_pos)), extra.patch_segments


def _loss_fn(graphdef, segments):
    def loss(state, ids, mask, pos, pv, patch_pos):
        logits = nnx.merge(graphdef, state).forward(ids, mask, pos, pv, patch_pos, segments)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 3] * mask), logits
    return jax.jit(jax.value_and_grad(loss, has_aux=True))


def test_remat_policies_match_none():
    cfg = Qwen2VLConfig.tiny(num_layers=3, vision_depth=2)
    model = Qwen2VL(cfg, rngs=nnx.Rngs(0))
    args, segments = _batch(cfg)
    results = {}
    for policy in REMAT_POLICIES:
        set_remat(model, policy)
        assert model.model.remat == model.visual.remat == model.remat == policy
        graphdef, state = nnx.split(model)
        jaxpr = str(jax.make_jaxpr(lambda s: _loss_fn(graphdef, segments)(s, *args))(state))
        assert ("checkpoint" in jaxpr or "remat" in jaxpr) == (policy != "none"), policy
        (loss, logits), grads = _loss_fn(graphdef, segments)(state, *args)
        results[policy] = (loss, logits, grads)
    ref_loss, ref_logits, ref_grads = results["none"]
    for policy in ("full", "dots"):
        loss, logits, grads = results[policy]
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-6)
        for (path, g), (_, r) in zip(jax.tree_util.tree_leaves_with_path(grads),
                                     jax.tree_util.tree_leaves_with_path(ref_grads)):
            np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-7, err_msg=f"{policy} {path}")
    # gradients reach every layer of both stacks
    for stack in (ref_grads["model"]["layers"], ref_grads["visual"]["blocks"]):
        for g in jax.tree.leaves(stack):
            assert np.all(np.abs(np.asarray(g)).reshape(g.shape[0], -1).max(-1) > 0)


def test_remat_policy_validation():
    cfg = Qwen2VLConfig.tiny()
    with pytest.raises(ValueError, match="'none', 'full', 'dots'"):
        Qwen2VL(cfg, rngs=nnx.Rngs(0), remat="everything")
    model = Qwen2VL(cfg, rngs=nnx.Rngs(0), remat="dots")
    assert model.model.remat == model.visual.remat == "dots"
    with pytest.raises(ValueError, match="allowed"):
        set_remat(model, "some")
    assert REMAT_POLICIES == ("none", "full", "dots")


def _program_size(num_layers: int, depth: int, remat: str = "none") -> tuple[int, int]:
    cfg = Qwen2VLConfig.tiny(num_layers=num_layers, vision_depth=depth)
    model = nnx.eval_shape(lambda: Qwen2VL(cfg, rngs=nnx.Rngs(0), remat=remat))
    graphdef, state = nnx.split(model)
    args, segments = _batch(cfg)
    lowered = _loss_fn(graphdef, segments).lower(state, *args)
    jaxpr = jax.make_jaxpr(jax.value_and_grad(
        lambda s: jnp.sum(nnx.merge(graphdef, s).forward(*args[:3], *args[3:], segments))))(state)
    return len(lowered.as_text()), len(str(jaxpr))


@pytest.mark.parametrize("remat", ["none", "full"])
def test_program_size_does_not_grow_with_depth(remat):
    hlo2, jaxpr2 = _program_size(2, 2, remat)
    hlo8, jaxpr8 = _program_size(8, 8, remat)
    assert hlo8 <= 1.1 * hlo2, (hlo2, hlo8)
    assert jaxpr8 <= 1.1 * jaxpr2, (jaxpr2, jaxpr8)


def test_stacked_params_have_layer_axis_and_distinct_init():
    cfg = Qwen2VLConfig.tiny(num_layers=4, vision_depth=3)
    model = Qwen2VL(cfg, rngs=nnx.Rngs(0))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = var.get_metadata()["logical_axes"]
        assert len(axes) == var.ndim, path
        stacked = path[:2] in (("model", "layers"), ("visual", "blocks"))
        assert (axes[0] == "layers") == stacked, (path, axes)
        if stacked:
            assert var.shape[0] == (4 if path[0] == "model" else 3)
            if path[-1] == "kernel":   # independently drawn per layer
                v = np.asarray(var[...])
                assert all(not np.allclose(v[0], v[i]) for i in range(1, v.shape[0])), path


def test_stacked_param_specs_never_shard_layer_axis():
    # logical_to_spec only reads mesh.shape: a stand-in gives an 8-device (1, 2, 4) mesh on one CPU.
    mesh = types.SimpleNamespace(shape={"data": 1, "fsdp": 2, "tensor": 4})
    assert shd.DEFAULT_RULES["layers"] is None
    assert shd.logical_to_spec(("layers", "embed", "q_heads"), (4, 64, 64), mesh) == P(None, "fsdp", "tensor")
    assert shd.logical_to_spec(("layers", "mlp", "embed"), (8, 128, 64), mesh) == P(None, "tensor", "fsdp")
    cfg = Qwen2VLConfig.tiny(num_layers=4, vision_depth=4)     # layer count divisible by every mesh axis
    state = nnx.state(nnx.eval_shape(lambda: Qwen2VL(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    for path, var in nnx.to_flat_state(state):
        spec = shd.logical_to_spec(var.get_metadata()["logical_axes"], var.shape, mesh)
        if path[:2] in (("model", "layers"), ("visual", "blocks")):
            assert spec[0] is None, (path, spec)
    q = dict(nnx.to_flat_state(state))[("model", "layers", "self_attn", "q_proj", "kernel")]
    assert shd.logical_to_spec(q.get_metadata()["logical_axes"], q.shape, mesh) == P(None, "fsdp", "tensor")
    # the real 1-device mesh: param_shardings works on stacked state
    specs = shd.param_shardings(state, shd.make_mesh())
    assert specs["model"]["layers"]["self_attn"]["q_proj"]["kernel"].get_value().spec == P(None, None, None)


def test_unstacked_decode_matches_scanned_decode():
    cfg = Qwen2VLConfig.tiny(num_layers=3)
    model = Qwen2VL(cfg, rngs=nnx.Rngs(1))
    b, length, size = 2, 6, 9
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 400, (b, length)), jnp.int32)
    valid = jnp.ones((b, length), bool)
    key_valid = jnp.concatenate([valid, jnp.zeros((b, size - length), bool)], 1)
    slots = jnp.arange(size)
    mask = attention_mask_4d(valid, key_valid, jnp.broadcast_to(slots[:length], (b, length)),
                             jnp.broadcast_to(slots, (b, size)))
    pos = jnp.broadcast_to(jnp.arange(length)[None, None], (3, b, length))
    cache0 = init_cache(cfg.text, b, size, jnp.float32)
    assert cache0[0].shape == (3, b, size, cfg.text.num_kv_heads, cfg.text.head_dim)
    h_scan, c_scan = model.decode_hidden(model.embed(ids), pos, mask, cache0, 0)
    h_loop, c_loop = model.decode_hidden(model.embed(ids), pos, mask, cache0, 0, model.decode_layers())
    np.testing.assert_allclose(h_scan, h_loop, rtol=1e-5, atol=1e-6)
    for a, c in zip(c_scan, c_loop):
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)
        assert np.all(np.asarray(a)[:, :, length:] == 0)        # only the written slots changed
    # the cached prefill equals the cache-free forward
    h_full = model.hidden_states(ids, valid.astype(jnp.int32), pos)
    np.testing.assert_allclose(h_scan, h_full, rtol=1e-5, atol=1e-5)


def test_load_pretrained_forwards_remat(tmp_path):
    from mr1jax.models.qwen2_vl.hf import load_pretrained, save_pretrained

    cfg = Qwen2VLConfig.tiny(num_layers=2, vision_depth=1)
    model = Qwen2VL(cfg, rngs=nnx.Rngs(0))
    save_pretrained(model, tmp_path)
    loaded = load_pretrained(tmp_path, dtype=jnp.float32, remat="dots")
    assert loaded.remat == loaded.model.remat == loaded.visual.remat == "dots"
    k = loaded.model.layers.self_attn.q_proj.kernel[...]
    np.testing.assert_array_equal(k, model.model.layers.self_attn.q_proj.kernel[...])


def test_sampler_reads_compute_dtype_weights():
    """fp32 master weights with bf16 compute sample exactly as bf16-stored weights (cast once, up front)."""
    from mr1jax.generate.sampler import generate

    cfg = Qwen2VLConfig.tiny(num_layers=2, vision_depth=1)
    master = Qwen2VL(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.float32)
    lowp = Qwen2VL(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    nnx.update(lowp, jax.tree.map(lambda a: a.astype(jnp.bfloat16), nnx.state(master, nnx.Param)))
    ids = np.random.default_rng(0).integers(0, 400, (2, 6)).astype(np.int32)
    kw = dict(num_samples=2, max_new_tokens=5, temperature=0.0, eos_token_ids=[cfg.eos_token_ids[0]])
    a, b = generate(master, ids, None, **kw), generate(lowp, ids, None, **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
