"""Run in its own process with 8 fake CPU devices (tests/test_sharded_training.py): the same short training run
(cold-start SFT then GRPO, the real loop) on several meshes equals the 1-device run, each step function
compiles once, and the FSDP update's compiled HLO reduce-scatters gradients / all-gathers parameters.

Prints lines `RESULT <json>` for the test to check.
"""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from configs import grpo  # noqa: E402
from mr1jax.trainer import rollout  # noqa: E402
from mr1jax.trainer.loop import train_and_evaluate  # noqa: E402


def fake_reward_parts(texts, answers, timeout_s):
    """A random model never earns the real reward (all advantages 0): score a deterministic function of the
    text instead, so the policy gradient is non-zero and identical on every mesh."""
    acc = np.array([float(len(t) % 3 == 0) for t in texts], np.float32)
    fmt = np.array([float(sum(map(ord, t)) % 2) for t in texts], np.float32)
    return acc, fmt, {}


rollout.reward_parts = fake_reward_parts

MESHES = {"1dev": None, "fsdp8": dict(data=1, fsdp=8, tensor=1), "data2_fsdp4": dict(data=2, fsdp=4, tensor=1),
          "fsdp4_tensor2": dict(data=1, fsdp=4, tensor=2)}


def config(mesh):
    c = grpo.get_config()
    c.sft.steps, c.total_steps = 2, 3
    c.data.batch_size, c.rollout.num_samples, c.rollout.max_new_tokens = 8, 2, 8
    c.data.num_train, c.data.num_eval, c.eval.num_batches, c.eval.every_steps = 64, 8, 1, 0
    c.model.tiny.hidden_size = 64
    c.sft.learning_rate, c.optim.learning_rate, c.optim.warmup_steps = 1e-3, 1e-3, 0
    c.rl.micro_batches = 2
    c.model.logit_chunk = 4
    c.checkpoint.async_save = False
    if os.environ.get("SHARDED_CHECK_LORA_RANK"):       # the same run with LoRA adapters (merged at SFT -> RL)
        c.lora.rank, c.lora.alpha = int(os.environ["SHARDED_CHECK_LORA_RANK"]), 16.0
        c.lora.targets = "language+vision"
    if mesh:
        c.mesh.update(mesh)
    return c


def run(name):
    mesh = MESHES[name]
    work = tempfile.mkdtemp(prefix=f"sharded_{name}_")
    out = train_and_evaluate(config(mesh), work, devices=jax.devices()[:1] if mesh is None else None)
    rows = [json.loads(line) for line in open(os.path.join(work, "metrics.jsonl"))]
    steps = [r for r in rows if "sft_loss" in r or "loss" in r]
    params = load_file(os.path.join(work, "hf", "model.safetensors"))
    return dict(losses=[r.get("sft_loss", r.get("loss")) for r in steps], grad_norms=[r["grad_norm"] for r in steps],
                kl=[r.get("kl", 0.0) for r in steps], rewards=[r.get("reward", 0.0) for r in steps],
                compile_counts=out["compile_counts"]), params


def fsdp_collectives(devices=None):
    """Collective ops in the compiled GRPO update on an 8-device fsdp mesh (abstract model and batch; `devices`:
    e.g. compile-only TPU devices, default the fake CPU ones)."""
    import optax
    from flax import nnx

    from mr1jax.parallel import sharding

    from mr1jax.trainer import state as st
    from mr1jax.models.qwen2_vl import Qwen2VL, Qwen2VLConfig
    from mr1jax.rl.update import GRPOConfig

    mesh = sharding.make_mesh(MESHES["fsdp8"], devices)
    cfg = Qwen2VLConfig.tiny(vocab_size=1024, hidden_size=256)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Qwen2VL(cfg, rngs=nnx.Rngs(0))))
    tx = optax.adamw(1e-3)
    state = st.TrainState(params=params, opt_state=jax.eval_shape(tx.init, params), ref_params=None,
                          rng=jax.ShapeDtypeStruct((2,), np.uint32))
    sh = st.state_shardings(state, mesh)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, sh.params)
    gcfg = GRPOConfig(num_samples=2, prompt_len=32, patch_segments=8)
    spec = st.grpo_batch_spec(cfg, gcfg, 8, 56, 8)
    fn = st.jit_grpo_update(graphdef, mesh, sh, spec, tx=tx, cfg=gcfg)
    hlo = fn.lower(params, state.opt_state, spec, jax.ShapeDtypeStruct((), np.float32)).compile().as_text()
    # instructions, plus fusions that perform the op (XLA:TPU fuses reduce-scatter into "all-reduce-scatter")
    return {op: hlo.count(op + "(") + hlo.count(op + "-start(") + hlo.count(f"calls=%{op}") +
            hlo.count(f"calls=%all-{op}") for op in ("reduce-scatter", "all-gather", "all-reduce")}


if __name__ == "__main__":
    if sys.argv[1:] == ["tpu"]:                 # compile-only TPU devices (needs jax[tpu]): collectives only
        from jax.experimental.topologies import get_topology_desc

        print("COLLECTIVES", json.dumps(fsdp_collectives(get_topology_desc("v5e:2x4", "tpu").devices)), flush=True)
        sys.exit(0)
    names = sys.argv[1:] or list(MESHES)
    base, base_params = run("1dev")
    print("RESULT", json.dumps({"mesh": "1dev", **base}), flush=True)
    for name in names:
        if name == "1dev":
            continue
        res, params = run(name)
        diffs = np.concatenate([np.abs(params[k].astype(np.float64) - base_params[k]).ravel() for k in base_params])
        print("RESULT", json.dumps({"mesh": name, **res, "param_maxdiff": float(diffs.max()),
                                    "param_meandiff": float(diffs.mean())}), flush=True)
    print("COLLECTIVES", json.dumps(fsdp_collectives()), flush=True)
