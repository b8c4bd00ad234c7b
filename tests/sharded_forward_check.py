"""Run in its own process (8 host CPU devices): sharded load + forward, and sharded greedy rollouts, equal
the single-device ones.

Invoked by tests/test_sharding.py as ``sharded_forward_check.py [qwen2_vl | qwen2_5_vl]`` (the model family;
Qwen2.5-VL runs its windowed vision tower on an image larger than one window); prints one line
"MAXDIFF <float>" and exits non-zero on failure.
"""

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import tempfile  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from mr1jax.parallel import sharding as shd  # noqa: E402
from mr1jax.models import config_class, load_pretrained, model_class, prepare_inputs, save_pretrained  # noqa: E402
from mr1jax.generate.sampler import generate  # noqa: E402
from mr1jax.testing.hf_reference import make_batch  # noqa: E402


def jitted_logits(model, batch, extra):
    graphdef, state = nnx.split(model)
    ids, mask, pv, _ = batch

    @jax.jit
    def fwd(state, ids, mask, pos, pv, patch_pos):
        return nnx.merge(graphdef, state).forward(ids, mask, pos, pv, patch_pos, extra.patch_segments)

    return fwd(state, ids, mask, extra.position_ids, pv, extra.patch_pos)


def main(family: str) -> int:
    assert jax.device_count() == 8, jax.devices()
    cfg = config_class(family).tiny(vocab_size=512, hidden_size=64, num_layers=2, vision_depth=2)
    single = model_class(cfg)(cfg, rngs=nnx.Rngs(0))
    side = 4 if family == "qwen2_vl" else 8   # 8 x 8 patches: four of the tiny Qwen2.5-VL's 4 x 4 windows
    rows = [{"text": 9, "images": [(1, side, side)]}, {"text": 4, "images": [(1, side, side)]}, {"text": 12},
            {"text": 5, "images": [(1, side, side)]}]
    ids, mask, pv, grid = make_batch(cfg, rows, seed=1)
    extra = prepare_inputs(cfg, ids, mask, grid)
    ref = np.asarray(jitted_logits(single, (ids, mask, pv, grid), extra))

    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(single, d)
        sharded = load_pretrained(d, dtype=jnp.float32, mesh=mesh)
    # Parameters really are split: the stacked q projection [layers, in, out] over (-, fsdp, tensor) -> each
    # device holds a quarter of every layer; the layer axis is never split.
    q = sharded.model.layers.self_attn.q_proj.kernel[...]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor"), q.sharding.spec
    assert q.addressable_shards[0].data.shape == (2, 32, 32), q.addressable_shards[0].data.shape
    blocks = sharded.visual.blocks
    fc1 = (blocks.fc1 if family == "qwen2_vl" else blocks.mlp.gate_proj).kernel[...]
    assert fc1.sharding.spec[0] is None, fc1.sharding.spec
    emb = sharded.model.embed_tokens.embedding[...]
    assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp"), emb.sharding.spec

    batch = tuple(shd.shard_batch(mesh, jnp.asarray(a)) for a in (ids, mask))
    pos = shd.shard_batch(mesh, jnp.asarray(extra.position_ids), batch_dim=1)
    with jax.set_mesh(mesh):
        out = jitted_logits(sharded, (*batch, jnp.asarray(pv), grid),
                            extra.__class__(pos, extra.rope_deltas, jnp.asarray(extra.patch_pos),
                                            extra.patch_segments))
    assert len(out.sharding.device_set) == 8
    diff = float(np.abs(np.asarray(out) - ref)[mask.astype(bool)].max())
    print(f"MAXDIFF {diff:.3e}")

    # Greedy rollouts: sharded params + batch over (data, fsdp) give the same tokens as one device.
    kw = dict(num_samples=2, max_new_tokens=16, temperature=0.0, eos_token_ids=[cfg.eos_token_ids[0]])
    want = generate(single, ids, mask, pv, grid, **kw)
    with jax.set_mesh(mesh):
        got = generate(sharded, ids, mask, pv, grid, mesh=mesh, **kw)
    same = np.array_equal(np.asarray(want.tokens), np.asarray(got.tokens))
    lp_diff = float(np.abs(np.asarray(want.logprobs) - np.asarray(got.logprobs)).max())
    print(f"GREEDY_SAME {same} LOGPROB_DIFF {lp_diff:.3e}")
    return 0 if diff <= 1e-5 and same and lp_diff <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "qwen2_vl"))
