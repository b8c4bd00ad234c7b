"""`python -m mr1jax.plan`: per-device memory and FLOPs of every jitted training step, before renting hardware.

    python -m mr1jax.plan --config=configs/othink_counting.py --topology=v5e:2x4
    python -m mr1jax.plan --config=configs/vision_r1.py --topology=v5p:2x2x2 --json=/tmp/plan.json
    python -m mr1jax.plan --config=configs/grpo.py --devices=8 --config.mesh.fsdp=4 --config.mesh.tensor=2

The model is built abstractly (`nnx.eval_shape`: no weights are allocated or read). For each rollout stage of
the config (`rl.ptst_stages`, else one stage from `rollout`) the real jitted steps are lowered and compiled
for the config's shapes on the requested mesh, and a table reports per device: argument / output / aliased
(donated) / temporary / generated-code bytes from `compiled.memory_analysis()`, their sum
(args + outputs - aliased + temp + code), XLA:TPU's peak (what its out-of-memory check uses), the train state
that stays on the devices during the step without being one of its arguments (the optimizer state and the
reference during the rollout, the reference during the update: the compiler does not see it) and the total
the verdicts use (peak where the backend reports it, else the sum, plus that resident state), FLOPs from
`compiled.cost_analysis()` and an analytic estimate, compile time, and whether the total fits each accelerator
of `mr1jax.accelerators`.

Steps: `grpo_update` (one optimizer step on a minibatch of prompt groups, micro-batched as configured),
`token_logprobs` (reference-model pass over the whole rollout batch; only when the KL term is on),
`rollout` (the sampler: prefill + G-way decode to max_new_tokens) and `sft_update` (cold-start SFT on
sequences of prompt_bucket + the longest stage's max_new_tokens; only in modes sft / sft_then_grpo).

Targets:
  --topology=v5e:2x4   compile-only TPU devices (`jax.experimental.topologies`; needs libtpu, i.e.
                       `pip install "jax[tpu]"`, no TPU). The memory numbers are XLA:TPU's own; a program that
                       does not fit fails to compile with RESOURCE_EXHAUSTED, reported as "does not fit"
                       with the compiler's numbers. Names: v5e:2x2, v5e:2x4, v6e:2x2, v5p:2x2x1, v5p:2x2x2,
                       v5p:2x2x4, v4:2x2x1 and v5:2x2x1 (megacore).
  --topology=h100x8    compile-only GPU devices (H100 / H200 SXM, `mr1jax.accelerators.gpu_target_config`;
                       needs only the CUDA PJRT plugin wheels: `pip install --no-deps jax-cuda12-plugin==0.10.2
                       jax-cuda12-pjrt==0.10.2`, about 180 MB, no CUDA libraries and no GPU). XLA:GPU's memory
                       analysis; no cost analysis (the XLA column is empty) and no out-of-memory check at
                       compile time: the verdict compares the total with the GPU's memory.
  --devices=8          N fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count, set before jax
                       is imported): the same sharded programs, but the memory numbers are XLA:CPU's
                       (different fusion and layouts), so fit verdicts for GPUs / TPUs are estimates.
  (neither)            the default backend's devices.
Other flags: --config.* overrides (mesh, micro-batches, shapes), --remat=none|full|dots (default: the config's
model.remat), --steps=rollout,grpo_update,... (a subset), --preset=... (the model when <hf_path>/config.json is
absent), --json=PATH. The exit status is 1 when a step could not be built or compiled for a reason other than
memory (e.g. prompts that do not split over the mesh); "does not fit" is a result, not an error.

Analytic FLOPs (whole step, all devices; `per device` divides by the device count). With P prompts,
R = P*G rows, prompt bucket L, completion length T, S = L + T, decoder matmul parameters N_d (all decoder
layer weights: embedding table excluded), LM head V*H, vision tower parameters N_v, n_p patches per image,
and A = layers * heads * head_dim (text) / A_v (vision):
  forward  F(R, S, T_logits, P) = 2*N_d*R*S + 2*V*H*R*T_logits + 4*A*R*S^2
                                  + 2*N_v*P*n_p + 4*A_v*P*n_p^2
  grpo_update    = 3 * F(R_mb, S, T, P_mb)      (forward + backward = 3 forwards: "6 x params x tokens"
                                                 plus 12 x A x S^2 x rows for attention)
  token_logprobs = F(R, S, T, P)
  sft_update     = 3 * F(B, S_sft, S_sft - 1, B)
  rollout        = prefill 2*N_d*P*L + 2*V*H*P + 4*A*P*L*S + vision
                   + T decode steps of R rows: T * R * (2*N_d + 2*V*H + 4*A*S)   (every row runs to T)
These are model FLOPs (as MFU counts them): recomputation by rematerialisation (`--remat`, the checkpointed LM-head
chunks) is not included. Attention is counted over full (masked) score matrices, as the model computes them
(Qwen2.5-VL's windowed vision blocks: n_p x min(n_p, 3 W^2) scores per head, W^2 the patches of one window, the
blocks the windowed attention computes). P counts images (prompts x data.images_per_prompt) in the vision
terms. XLA's cost analysis
counts a loop body once (the micro-batch `lax.scan` of the update, the decode `while_loop` of the sampler),
and undercounts collective matmuls on 8+ TPU chips, so its column is a lower bound; trust the analytic one.
"""

from __future__ import annotations

import os
import re
import sys


def _argv_value(argv: list[str], name: str) -> str | None:
    """Value of --name=V or --name V in argv (last one wins), without absl (jax is not imported yet)."""
    value = None
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
        elif arg == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def early_environment(argv: list[str]) -> None:
    """Set the environment that must exist before jax is imported: fake CPU devices, or CPU as the default
    platform when compiling for a TPU / GPU topology (compile-only devices need no accelerator backend)."""
    devices = _argv_value(argv, "devices")
    if devices and int(devices) > 1:
        flags = os.environ.get("XLA_FLAGS", "")
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags)
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={int(devices)}".strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    topology = _argv_value(argv, "topology")
    if topology:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        if GPU_TOPOLOGY.match(topology.lower()):
            os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")   # compile for the description, not a device


GPU_TOPOLOGY = re.compile(r"^(h100|h200)(?:x(\d+))?$")


if __name__ == "__main__":
    early_environment(sys.argv)

import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from mr1jax import sharding, steps  # noqa: E402
from mr1jax.accelerators import ACCELERATORS, GiB, for_topology  # noqa: E402
from mr1jax.models import Qwen25VLConfig, Qwen2VLConfig, config_from_hf, model_class  # noqa: E402
from mr1jax.models.qwen2_vl.model import set_attention_chunk  # noqa: E402
from mr1jax.rl.ptst import Stage  # noqa: E402
from mr1jax.train_steps import grpo_config, sft_config, updates_per_rl_step  # noqa: E402

PRESETS = ("qwen2_vl_2b_instruct", "qwen2_vl_7b_instruct", "qwen2_5_vl_3b_instruct", "qwen2_5_vl_7b_instruct",
           "tiny")


class PlanError(ValueError):
    """The plan cannot be made as asked (bad flag, missing model config, ...)."""


# ---------------------------------------------------------------------------------------------- model
def resolve_model_config(c: ml_collections.ConfigDict, preset: str | None) -> tuple[Qwen2VLConfig, str, str]:
    """(model config, name, how it was chosen): `<hf_path>/config.json` when it exists, else `preset`, else
    the size named in hf_path ("2B" / "7B"), else (empty hf_path) the config's tiny model as the trainer
    builds it."""
    path = c.model.hf_path
    if path and os.path.isfile(os.path.join(path, "config.json")) and preset is None:
        return config_from_hf(path), os.path.basename(path.rstrip("/")), f"{path}/config.json"
    if preset is not None:
        how = "--preset"
    elif path:
        name = os.path.basename(path.rstrip("/")).upper()
        if "2.5" in name or "2_5" in name:
            preset = "qwen2_5_vl_7b_instruct" if "7B" in name else "qwen2_5_vl_3b_instruct" if "3B" in name else None
        else:
            preset = "qwen2_vl_7b_instruct" if "7B" in name else "qwen2_vl_2b_instruct" if "2B" in name else None
        if preset is None:
            raise PlanError(f"no {path}/config.json and the path names no model size ('2B' / '7B', or '3B' / '7B' "
                            f"with '2.5'); pass "
                            f"--preset={'|'.join(PRESETS)}")
        how = f"no {path}/config.json; size inferred from the path name"
    else:
        preset, how = "tiny", "config.model.hf_path is empty: the trainer's tiny model (config.model.tiny)"
    if preset not in PRESETS:
        raise PlanError(f"--preset={preset!r}; choose one of {', '.join(PRESETS)}")
    if preset != "tiny":
        family = Qwen25VLConfig if preset.startswith("qwen2_5_vl") else Qwen2VLConfig
        return getattr(family, preset)(), preset, how
    from mr1jax.build import tiny_model_config
    from mr1jax.data.tokenizer import load_tokenizer

    return tiny_model_config(c, load_tokenizer(c.model.tokenizer_path or None)), "tiny", how


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def abstract_model(cfg: Qwen2VLConfig, dtype, param_dtype=None, remat: str = "none", attention_chunk: int = 0
                   ) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, state of ShapeDtypeStructs): no parameter is allocated."""
    model = nnx.eval_shape(lambda: model_class(cfg)(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype or dtype,
                                           remat=remat))
    set_attention_chunk(model, attention_chunk)
    return nnx.split(model)


@dataclasses.dataclass(frozen=True)
class ParamCounts:
    total: int
    vision: int
    embedding: int    # input embedding table (a lookup, no matmul FLOPs)
    lm_head: int      # separate head weights (0 when tied)
    decoder: int      # decoder layers + final norm: the matmul parameters of the text model

    @classmethod
    def of(cls, state: nnx.State) -> "ParamCounts":
        counts = dict(vision=0, embedding=0, lm_head=0, decoder=0)
        for path, leaf in jax.tree_util.tree_leaves_with_path(state):
            keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
            part = ("vision" if keys[0] == "visual" else "lm_head" if keys[0] == "lm_head"
                    else "embedding" if "embed_tokens" in keys else "decoder")
            counts[part] += math.prod(leaf.shape)
        return cls(total=sum(counts.values()), **counts)


# ---------------------------------------------------------------------------------------------- shapes
@dataclasses.dataclass(frozen=True)
class Shapes:
    """The static shapes of one rollout stage."""

    prompts: int            # P: prompts per rollout batch (data.batch_size)
    num_samples: int        # G
    max_new_tokens: int     # T
    prompt_len: int         # L (data.prompt_bucket)
    image_size: int         # pixels per side
    patches: int            # patches per image
    image_tokens: int       # <|image_pad|> tokens per image
    minibatch_prompts: int  # prompts per optimizer step (P / rl.minibatches)
    micro_batches: int
    images_per_prompt: int = 1  # data.images_per_prompt

    @property
    def rows(self) -> int:
        return self.prompts * self.num_samples

    @property
    def seq(self) -> int:
        return self.prompt_len + self.max_new_tokens


def stage_shapes(c: ml_collections.ConfigDict, model_cfg: Qwen2VLConfig, stage: Stage) -> Shapes:
    v = model_cfg.vision
    side = c.data.image_size // v.patch_size
    patches = side * side
    return Shapes(prompts=c.data.batch_size, num_samples=stage.num_samples, max_new_tokens=stage.max_new_tokens,
                  prompt_len=c.data.prompt_bucket, image_size=c.data.image_size, patches=patches,
                  image_tokens=patches // v.spatial_merge_size ** 2,
                  minibatch_prompts=c.data.batch_size // c.rl.minibatches, micro_batches=c.rl.micro_batches,
                  images_per_prompt=int(_opt(c, "data.images_per_prompt", 1)))


# ---------------------------------------------------------------------------------------------- FLOPs
def _forward_flops(m: Qwen2VLConfig, n: ParamCounts, rows: int, seq: int, logit_positions: int, images: int,
                   patches: int) -> float:
    t, v = m.text, m.vision
    attn = 4 * t.num_layers * t.num_heads * t.head_dim
    full = len(getattr(v, "fullatt_block_indexes", range(v.depth)))    # Qwen2-VL: every block attends fully
    keys = full * patches + (v.depth - full) * min(patches, 3 * getattr(v, "window_patches", 0) ** 2)
    head = t.vocab_size * t.hidden_size
    return (2 * n.decoder * rows * seq + 2 * head * rows * logit_positions + attn * rows * seq ** 2
            + 2 * n.vision * images * patches + 4 * v.num_heads * v.head_dim * images * patches * keys)


def analytic_flops(step: str, m: Qwen2VLConfig, n: ParamCounts, s: Shapes, sft_seq: int = 0) -> float:
    """Whole-step FLOPs (all devices) by the formulas of the module docstring."""
    k = s.images_per_prompt
    if step == "grpo_update":
        p = s.minibatch_prompts
        return 3 * _forward_flops(m, n, p * s.num_samples, s.seq, s.max_new_tokens, p * k, s.patches)
    if step == "token_logprobs":
        return _forward_flops(m, n, s.rows, s.seq, s.max_new_tokens, s.prompts * k, s.patches)
    if step == "sft_update":
        return 3 * _forward_flops(m, n, s.prompts, sft_seq, sft_seq - 1, s.prompts * k, s.patches)
    if step == "rollout":
        t = m.text
        attn = 4 * t.num_layers * t.num_heads * t.head_dim
        head = t.vocab_size * t.hidden_size
        prefill = _forward_flops(m, n, s.prompts, s.prompt_len, 1, s.prompts * k, s.patches) \
            - attn * s.prompts * s.prompt_len ** 2 + attn * s.prompts * s.prompt_len * s.seq
        decode = s.max_new_tokens * s.rows * (2 * n.decoder + 2 * head + attn * s.seq)
        return prefill + decode
    raise ValueError(step)


# ---------------------------------------------------------------------------------------------- steps
def _opt(c: ml_collections.ConfigDict, dotted: str, default: Any) -> Any:
    """config value at `dotted`, or `default` where the config has no such field."""
    for part in dotted.split("."):
        if not isinstance(c, ml_collections.ConfigDict) or part not in c:
            return default
        c = c[part]
    return c


def _per_device_bytes(tree: Any) -> int:
    """Bytes on the most loaded device of a tree of sharded ShapeDtypeStructs."""
    total = 0
    for a in jax.tree.leaves(tree):
        shape = a.sharding.shard_shape(a.shape) if getattr(a, "sharding", None) is not None else a.shape
        total += math.prod(shape) * np.dtype(a.dtype).itemsize
    return total


def _with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), tree, shardings)


def _sds(shape, dtype, sh: NamedSharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sh)


@dataclasses.dataclass
class StepProgram:
    """A jitted step and abstract arguments to lower it with."""

    name: str
    jitted: Any
    args: tuple
    shapes: str     # human-readable summary of the batch shapes
    resident: int = 0   # per-device bytes of train state held on the device during the step, not an argument


class Programs:
    """The trainer's jitted steps (`mr1jax.steps`, configured by `mr1jax.train_steps`; the sampler's `_rollout`)
    with abstract, sharded inputs."""

    def __init__(self, c: ml_collections.ConfigDict, model_cfg: Qwen2VLConfig, mesh: Mesh, *, kl: bool,
                 remat: str = "none"):
        from mr1jax.train import make_optimizers

        self.c, self.cfg, self.mesh, self.kl = c, model_cfg, mesh, kl
        self.warnings: dict[str, str] = {}
        self.dtype = _DTYPES[c.model.dtype]
        self.param_dtype = _DTYPES[_opt(c, "model.param_dtype", c.model.dtype)]
        from mr1jax import lora

        self.lora = lora.LoRAConfig.from_config(c)
        self.base_quant = _opt(c, "lora.base_quant", "none")
        chunk = _opt(c, "model.attention_chunk", 0)
        self.frozen = self.full_graphdef = self.full_state = None
        if self.lora.rank:      # as the trainer builds it: base in the compute dtype, fp32 adapters trained
            model = nnx.eval_shape(lambda: lora.quantize_base(lora.apply_lora(
                Qwen2VL(model_cfg, rngs=nnx.Rngs(0), dtype=self.dtype, param_dtype=self.dtype, remat=remat),
                self.lora, dtype=self.param_dtype), self.base_quant))
            set_attention_chunk(model, chunk)
            self.full_graphdef, full_state = nnx.split(model)
            self.graphdef, params, frozen = nnx.split(model, lora.LoRAParam, ...)
            self.counts = ParamCounts.of(abstract_model(model_cfg, self.dtype)[1])   # unquantised parameter counts
            self.frozen = _with_shardings(frozen, sharding.param_shardings(frozen, mesh))
            self.full_state = _with_shardings(full_state, sharding.param_shardings(full_state, mesh))
        else:
            self.graphdef, params = abstract_model(model_cfg, self.dtype, self.param_dtype, remat, chunk)
            self.counts = ParamCounts.of(params)
        self.frozen_shardings = None if self.frozen is None else jax.tree.map(lambda a: a.sharding, self.frozen)
        self.extra = () if self.frozen is None else (self.frozen,)
        self.sft_tx, self.rl_tx = make_optimizers(c)        # the trainer's (same state structure)
        ref = jax.eval_shape(lambda p: steps.cast_floating(p, self.dtype), params) if kl else None
        opt_state = jax.eval_shape((self.sft_tx or self.rl_tx).init, params)
        state = steps.TrainState(params=params, opt_state=opt_state, ref_params=ref,
                                 rng=jax.ShapeDtypeStruct((2,), jnp.uint32), step=0)
        self.shardings = steps.state_shardings(state, mesh)
        self.params = _with_shardings(params, self.shardings.params)
        self.opt_state = _with_shardings(state.opt_state, self.shardings.opt_state)
        self.ref_params = None if ref is None else _with_shardings(ref, self.shardings.ref_params)
        self.replicated = steps.replicated(mesh)
        # per-device bytes of each part of the train state the trainer keeps on the devices for the whole run
        self.state_bytes = {"params": _per_device_bytes(self.params), "opt_state": _per_device_bytes(self.opt_state),
                            "ref_params": _per_device_bytes(self.ref_params) if kl else 0,
                            "frozen": 0 if self.frozen is None else _per_device_bytes(self.frozen)}

    def resident(self, phase: str, *passed: str) -> int:
        """Bytes per device of the train state that stays on the devices while a step runs without being one
        of its arguments (the optimizer state during the rollout, the reference during the update, ...): the
        compiler's figures do not see them, the device's memory does. The reference exists in the RL phase."""
        parts = ("params", "opt_state", "ref_params") if phase == "rl" else ("params", "opt_state")
        return sum(self.state_bytes[k] for k in parts if k not in passed)

    def _check_split(self, name: str, prompts: int, micro_batches: int) -> None:
        """ValueError when the prompts do not split over the (data, fsdp) devices; a warning (kept in the
        result) when the micro-batches do not split evenly (the step still compiles)."""
        error, warning = steps.batch_split_problems(self.mesh, prompts, micro_batches, name)
        if error:
            raise ValueError(error)
        if warning:
            self.warnings[name] = warning

    def _batch(self, spec: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.ShapeDtypeStruct]:
        return _with_shardings(spec, steps.batch_shardings(spec, self.mesh))

    def _several_updates(self) -> bool:
        return updates_per_rl_step(self.c) > 1

    def grpo_update(self, s: Shapes, stage: Stage) -> StepProgram:
        """One optimizer step on a mini-batch, as `train_steps.rl_step` calls it."""
        p = s.minibatch_prompts
        cfg = grpo_config(self.c, stage)
        self._check_split("grpo_update", p, cfg.micro_batches)
        spec = steps.grpo_batch_spec(self.cfg, cfg, p, s.image_size, s.max_new_tokens, with_ref=self.kl,
                                     with_old=self._several_updates(), images_per_prompt=s.images_per_prompt)
        jitted = steps.jit_grpo_update(self.graphdef, self.mesh, self.shardings, spec, tx=self.rl_tx, cfg=cfg,
                                       frozen_shardings=self.frozen_shardings)
        beta = _sds((), jnp.float32, self.replicated)
        return StepProgram("grpo_update", jitted, (self.params, self.opt_state, self._batch(spec), beta, *self.extra),
                           f"{p}x{s.num_samples} rows x {s.seq}, {cfg.micro_batches} micro",
                           self.resident("rl", "params", "opt_state"))

    def token_logprobs(self, s: Shapes, stage: Stage) -> StepProgram:
        """The log-prob pass over the whole rollout batch: the reference's (KL on), else pi_old's."""
        cfg = grpo_config(self.c, stage, whole_batch=True)
        self._check_split("token_logprobs", s.prompts, cfg.micro_batches)
        spec = steps.grpo_batch_spec(self.cfg, cfg, s.prompts, s.image_size, s.max_new_tokens, with_ref=False,
                                     images_per_prompt=s.images_per_prompt)
        params = self.ref_params if self.kl else self.params
        jitted = steps.jit_token_logprobs(self.graphdef, self.mesh, self.shardings.params, spec, cfg=cfg,
                                          frozen_shardings=self.frozen_shardings)
        return StepProgram("token_logprobs", jitted, (params, self._batch(spec), *self.extra),
                           f"{'ref' if self.kl else 'old'}: {s.prompts}x{s.num_samples} rows x {s.seq}, "
                           f"{cfg.micro_batches} micro", self.resident("rl", "ref_params" if self.kl else "params"))

    def sft_update(self, s: Shapes, seq: int) -> StepProgram:
        rows, cfg = s.prompts, sft_config(self.c)
        self._check_split("sft_update", rows, cfg.micro_batches)
        spec = steps.sft_batch_spec(self.cfg, rows, seq, s.image_size, s.images_per_prompt)
        jitted = steps.jit_sft_update(self.graphdef, self.mesh, self.shardings, spec, tx=self.sft_tx, cfg=cfg,
                                      frozen_shardings=self.frozen_shardings)
        return StepProgram("sft_update", jitted, (self.params, self.opt_state, self._batch(spec), *self.extra),
                           f"{rows} rows x {seq}, {cfg.micro_batches} micro", self.resident("sft", "params", "opt_state"))

    def rollout(self, s: Shapes) -> StepProgram:
        """The sampler's whole rollout (`mr1jax.sampling._rollout`: prefill, G-way decode to max_new_tokens),
        prompts split over (data, fsdp) as `generate(..., mesh=...)` places them."""
        from mr1jax.sampling import _rollout

        rows = NamedSharding(self.mesh, P(sharding.BATCH_AXES))
        rows2 = NamedSharding(self.mesh, P(None, sharding.BATCH_AXES))
        rep = self.replicated
        p, length, g, t = s.prompts, s.prompt_len, s.num_samples, s.max_new_tokens
        self._check_split("rollout", p, 1)
        npatch = p * s.images_per_prompt * s.patches
        i32, f32 = jnp.int32, jnp.float32
        key = jax.eval_shape(lambda: jax.random.key(0))
        state = self.params if self.full_state is None else self.full_state   # LoRA: adapters + base
        args = (state, _sds((p, length), i32, rows), _sds((p, length), i32, rows),
                _sds((3, p, length), i32, rows2), _sds((p,), i32, rows),
                _sds((npatch, self.cfg.vision.patch_dim), f32, rep), _sds((npatch, 2), i32, rep),
                jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rep), _sds((), f32, rep), _sds((), i32, rep),
                _sds((), f32, rep), _sds((len(self.cfg.eos_token_ids),), i32, rep), _sds((2,), i32, rep))
        graphdef = self.graphdef if self.full_graphdef is None else self.full_graphdef

        def fn(state, ids, mask, pos, deltas, pixels, patch_pos, rng, temperature, top_k, top_p, eos, suppress):
            return _rollout(graphdef, state, ids, mask, pos, deltas, pixels, patch_pos, None, rng, temperature,
                            top_k, top_p, eos, suppress, patch_segments=p * s.images_per_prompt, num_samples=g, max_new_tokens=t)

        in_sh = (jax.tree.map(lambda a: a.sharding, state),) + tuple(a.sharding for a in args[1:])
        jitted = jax.jit(fn, in_shardings=in_sh, out_shardings=(rows, rows, rows, rows))
        return StepProgram("rollout", jitted, args, f"{p} prompts x {length} -> {g}x{t} new",
                           self.resident("rl", "params"))


# ---------------------------------------------------------------------------------------------- compiling
_OOM_NUMBERS = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT])(?:i?B)?\b")


def _oom_summary(message: str) -> dict:
    """The compiler's out-of-memory line and the byte counts it names (first = needed, last = available)."""
    line = next((ln.strip() for ln in message.splitlines() if "RESOURCE_EXHAUSTED" in ln), message.strip())
    line = line[line.index("RESOURCE_EXHAUSTED"):] if "RESOURCE_EXHAUSTED" in line else line
    scale = dict(K=1 << 10, M=1 << 20, G=1 << 30, T=1 << 40)
    numbers = [float(v) * scale[u] for v, u in _OOM_NUMBERS.findall(line)]
    out = {"message": line[:400]}
    if len(numbers) >= 2:
        out["needed_bytes"], out["available_bytes"] = numbers[0], numbers[-1]
    return out


def compile_program(prog: StepProgram, mesh: Mesh) -> dict:
    """Lower + compile; memory and cost analyses, timings, or the compiler's out-of-memory verdict."""
    res: dict[str, Any] = {"step": prog.name, "shapes": prog.shapes}
    t0 = time.perf_counter()
    try:
        with jax.sharding.use_mesh(mesh) if hasattr(jax.sharding, "use_mesh") else jax.set_mesh(mesh):
            lowered = prog.jitted.lower(*prog.args)
        t1 = time.perf_counter()
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - one step failing must not hide the others
        res["compile_s"] = time.perf_counter() - t0
        msg = str(e)
        if "RESOURCE_EXHAUSTED" in msg:
            res["error"] = "RESOURCE_EXHAUSTED"
            res["oom"] = _oom_summary(msg)
        else:
            res["error"] = f"{type(e).__name__}: {msg.splitlines()[0][:400] if msg else ''}"
        return res
    t2 = time.perf_counter()
    res["lower_s"], res["compile_s"] = t1 - t0, t2 - t1
    ma = compiled.memory_analysis()
    mem = {k: int(getattr(ma, f"{k}_size_in_bytes", 0) or 0)
           for k in ("argument", "output", "alias", "temp", "generated_code")}
    mem["sum"] = mem["argument"] + mem["output"] - mem["alias"] + mem["temp"] + mem["generated_code"]
    peak = int(getattr(ma, "peak_memory_in_bytes", 0) or 0)   # XLA:TPU reports it (what it checks); CPU/GPU: 0
    if peak:
        mem["peak"] = peak
    mem["resident"] = prog.resident                           # train state on the device, not an argument
    mem["total"] = (peak or mem["sum"]) + prog.resident       # the figure the fit verdicts use
    res["memory"] = mem
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    res["xla_flops_per_device"] = float(cost["flops"]) if cost and "flops" in cost else None
    return res


# ---------------------------------------------------------------------------------------------- targets
def target_devices(topology: str | None) -> tuple[list, str]:
    """(devices to compile for, description)."""
    if not topology:
        devs = jax.devices()
        return devs, f"{len(devs)} x {devs[0].platform.upper()} ({devs[0].device_kind})"
    from jax.experimental.topologies import get_topology_desc

    name = topology.lower()
    gpu = GPU_TOPOLOGY.match(name)
    if gpu:
        from mr1jax.accelerators import gpu_target_config

        count = int(gpu.group(2) or 1)
        try:
            topo = get_topology_desc(platform="cuda", topology=f"1x1x{count}",
                                     target_config=gpu_target_config(gpu.group(1).upper()))
        except Exception as e:  # noqa: BLE001
            raise PlanError(f"--topology={topology}: cannot build the GPU topology ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:300] if str(e) else ''}). It needs the CUDA PJRT plugin: "
                            "pip install --no-deps jax-cuda12-plugin==<jax version> jax-cuda12-pjrt==<jax "
                            "version> (no CUDA libraries or GPU needed)") from None
        devs = list(topo.devices)
        return devs, f"{len(devs)} x {devs[0].device_kind} (compile-only, topology {topology})"

    kwargs = {"chip_config_name": "megacore"} if name.split(":")[0] in ("v4", "v5") else {}
    try:
        topo = get_topology_desc(topology_name=topology, platform="tpu", **kwargs)
    except Exception as e:  # noqa: BLE001
        raise PlanError(f"--topology={topology}: cannot build the TPU topology ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:300] if str(e) else ''}). It needs libtpu "
                        "(pip install 'jax[tpu]') and a name such as v5e:2x4, v5p:2x2x2, v6e:2x2") from None
    devs = list(topo.devices)
    return devs, f"{len(devs)} x {devs[0].device_kind} (compile-only, topology {topology})"


def make_plan_mesh(mesh_cfg: dict, devices: list) -> Mesh:
    try:
        return sharding.make_mesh(mesh_cfg, devices)
    except ValueError:
        raise
    except Exception:  # noqa: BLE001 - device-layout helpers may not know compile-only devices
        sizes = dict(mesh_cfg)
        known = math.prod(v for v in sizes.values() if v != -1)
        sizes = {k: (len(devices) // known if v == -1 else v) for k, v in sizes.items()}
        shape = tuple(sizes.get(a, 1) for a in sharding.MESH_AXES)
        return Mesh(np.asarray(devices).reshape(shape), sharding.MESH_AXES)


# ---------------------------------------------------------------------------------------------- plan
def fit_verdicts(total: float | None, oom: dict | None, compiled_for: str | None, n_devices: int,
                 flops: float | None) -> dict:
    """Per accelerator: fits (bool or None = unknown), used fraction, ideal seconds at peak."""
    out = {}
    for name, acc in ACCELERATORS.items():
        v: dict[str, Any] = {"hbm_bytes": acc.hbm_bytes}
        if total is not None:
            v["fits"] = acc.fits(total)
            v["fraction"] = total / acc.hbm_bytes
            v["source"] = "compiler" if name == compiled_for else "estimate"
        elif oom is not None and name == compiled_for:
            v["fits"], v["source"] = False, "compiler"
        elif oom is not None and "needed_bytes" in oom:
            # the compiler's figure is a lower bound of what the step needs
            v["fits"] = False if oom["needed_bytes"] > acc.hbm_bytes else None
            v["source"] = "estimate"
        else:
            v["fits"] = None
        if flops is not None:
            v["seconds_at_peak"] = flops / n_devices / acc.bf16_flops
        out[name] = v
    return out


STEPS = ("rollout", "token_logprobs", "grpo_update", "sft_update")


def make_plan(c: ml_collections.ConfigDict, *, topology: str | None = None, preset: str | None = None,
              only_steps: tuple[str, ...] | None = None, remat: str | None = None,
              log: Callable[[str], None] = lambda s: None) -> dict:
    """Compile every step the config's run uses for the target; returns the plan as a JSON-able dict."""
    from mr1jax.config import phase_steps, uses_kl, validate_config

    unknown = set(only_steps or ()) - set(STEPS)
    if unknown:
        raise PlanError(f"--steps: unknown {sorted(unknown)}; choose from {', '.join(STEPS)}")
    stages = validate_config(c)
    remat = remat or _opt(c, "model.remat", "none")
    model_cfg, model_name, how = resolve_model_config(c, preset)
    devices, described = target_devices(topology)
    mesh = make_plan_mesh(dict(c.mesh), devices)
    compiled_for = getattr(for_topology(topology), "name", None)
    log(f"model {model_name} ({how}); {described}; mesh {dict(mesh.shape)}")
    sft_steps, rl_steps = phase_steps(c)
    kl = uses_kl(c) and rl_steps > 0
    progs = Programs(c, model_cfg, mesh, kl=kl, remat=remat)
    sft_seq = c.data.prompt_bucket + max(s.max_new_tokens for s in stages)
    wanted = set(only_steps or STEPS)
    n = progs.counts
    plan: dict[str, Any] = {
        "model": {"name": model_name, "source": how, "dtype": c.model.dtype,
                  "param_dtype": (c.model.dtype if not progs.lora.rank else f"{c.model.dtype} base"
                                  + (f" ({progs.base_quant})" if progs.base_quant != "none" else "")
                                  + f" + {_opt(c, 'model.param_dtype', c.model.dtype)} adapters")
                  if progs.lora.rank else _opt(c, "model.param_dtype", c.model.dtype),
                  "remat": remat, "params": n.total,
                  "params_vision": n.vision, "params_embedding": n.embedding, "params_lm_head": n.lm_head,
                  "params_decoder": n.decoder},
        "target": {"topology": topology, "devices": len(devices), "description": described,
                   "platform": devices[0].platform, "compiled_for": compiled_for},
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "lora": None if not progs.lora.rank else {
            "rank": progs.lora.rank, "alpha": progs.lora.alpha, "targets": progs.lora.targets,
            "trainable_params": int(sum(math.prod(a.shape) for a in jax.tree.leaves(progs.params))),
            "frozen_base_bytes_per_device": progs.state_bytes["frozen"]},
        "accelerators": {k: {"hbm_bytes": a.hbm_bytes, "bf16_flops": a.bf16_flops, "nominal": a.nominal}
                         for k, a in ACCELERATORS.items()},
        "kl": kl, "stages": []}

    def run(prog_fn, name, shapes, **kw) -> dict:
        log(f"compiling {name} ...")
        try:
            res = compile_program(prog_fn(shapes, **kw), mesh)
        except ValueError as e:   # e.g. prompts that do not split over the mesh
            res = {"step": name, "shapes": "-", "error": str(e).removeprefix(f"{name}: "), "compile_s": 0.0}
        if name in progs.warnings:
            res["warning"] = progs.warnings[name].removeprefix(f"{name}: ")
        flops = analytic_flops(name, model_cfg, n, shapes, sft_seq)
        res["analytic_flops"] = flops
        res["analytic_flops_per_device"] = flops / len(devices)
        total = res.get("memory", {}).get("total")
        res["fits"] = fit_verdicts(total, res.get("oom"), compiled_for, len(devices), flops)
        log(f"  {name}: " + (f"{total / (1 << 20):,.1f} MiB per device" if total is not None else res["error"])
            + f", {res['compile_s']:.1f} s")
        return res

    for i, stage in enumerate(stages if rl_steps else []):
        s = stage_shapes(c, model_cfg, stage)
        entry = {"index": i, "max_new_tokens": s.max_new_tokens, "num_samples": s.num_samples,
                 "steps": stage.steps, "prompts": s.prompts, "rows": s.rows, "prompt_len": s.prompt_len,
                 "seq": s.seq, "image_size": s.image_size, "patches_per_image": s.patches,
                 "image_tokens": s.image_tokens, "minibatch_prompts": s.minibatch_prompts,
                 "micro_batches": s.micro_batches, "results": []}
        if "rollout" in wanted:
            entry["results"].append(run(progs.rollout, "rollout", s))
        if (kl or progs._several_updates()) and "token_logprobs" in wanted:
            entry["results"].append(run(lambda sh: progs.token_logprobs(sh, stage), "token_logprobs", s))
        if "grpo_update" in wanted:
            entry["results"].append(run(lambda sh: progs.grpo_update(sh, stage), "grpo_update", s))
        plan["stages"].append(entry)
    if sft_steps and "sft_update" in wanted:
        s = stage_shapes(c, model_cfg, stages[0])
        res = run(lambda sh: progs.sft_update(sh, sft_seq), "sft_update", s)
        plan["sft"] = {"rows": s.prompts, "seq": sft_seq, "results": [res]}
    return plan


# ---------------------------------------------------------------------------------------------- report
def _unit(values: list[float | None], units: list[tuple[str, float]]) -> tuple[str, float]:
    """The largest unit that the biggest value reaches (the smallest unit when none does)."""
    top = max([v for v in values if v] or [0.0])
    return next(((n, f) for n, f in units if top >= f), units[-1])


def _seconds(x: float) -> str:
    return f"{x:.3g}s" if x >= 1 else f"{x * 1e3:.3g}ms" if x >= 1e-3 else f"{x * 1e6:.3g}us"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def line(r):
        return "  ".join(str(v).rjust(w) if i else str(v).ljust(w) for i, (v, w) in enumerate(zip(r, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _memory_table(results: list[dict]) -> str:
    sizes = [r["memory"]["total"] if "memory" in r else r.get("oom", {}).get("needed_bytes") for r in results]
    mem_unit, mem_f = _unit(sizes, [("GiB", GiB), ("MiB", 1 << 20)])
    flop_unit, flop_f = _unit([r.get("analytic_flops_per_device") for r in results],
                              [("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)])
    fmt_m = lambda x: "-" if x is None else f"{x / mem_f:.2f}"      # noqa: E731
    fmt_f = lambda x: "-" if x is None else f"{x / flop_f:.3g}"     # noqa: E731
    rows = []
    for r in results:
        mem = r.get("memory")
        if mem is None:
            needed = r.get("oom", {}).get("needed_bytes")
            cells = ["-"] * 6 + [f">{fmt_m(needed)}" if needed else "-", "-", "-"]
        else:
            cells = [fmt_m(mem[k]) for k in ("argument", "output", "alias", "temp", "generated_code", "sum")]
            cells += [fmt_m(mem.get("peak")), fmt_m(mem.get("resident", 0)), fmt_m(mem["total"])]
        rows.append([r["step"], r["shapes"], *cells, fmt_f(r.get("xla_flops_per_device")),
                     fmt_f(r.get("analytic_flops_per_device")), f"{r['compile_s']:.1f}"])
    return _table(["step", "shapes", f"args {mem_unit}", "out", "alias", "temp", "code", "sum", f"peak {mem_unit}",
                   "+state", f"total {mem_unit}", f"XLA {flop_unit}", f"analytic {flop_unit}", "compile s"], rows)


def verdict_text(v: dict) -> str:
    """'fits 23% 0.41s' / 'NO* 130%' / '?': the fit table's cell for one accelerator."""
    verdict = "?" if v.get("fits") is None else "fits" if v["fits"] else "NO"
    mark = "*" if v.get("source") == "compiler" else ""
    frac = f" {100 * v['fraction']:.0f}%" if "fraction" in v else ""
    secs = f" {_seconds(v['seconds_at_peak'])}" if "seconds_at_peak" in v else ""
    return f"{verdict}{mark}{frac}{secs}"


def format_plan(plan: dict) -> str:
    m, t = plan["model"], plan["target"]
    out = [f"mr1jax plan {plan.get('config', '')}".rstrip(),
           f"  model   {m['name']} ({m['source']}): {m['params']:,} parameters "
           f"({m.get('param_dtype', m['dtype'])} storage, {m['dtype']} compute, remat {m['remat']}; "
           f"vision {m['params_vision']:,}, decoder {m['params_decoder']:,}, embedding {m['params_embedding']:,}, "
           f"lm_head {m['params_lm_head']:,})",
           *([f"  LoRA    rank {plan['lora']['rank']} on {plan['lora']['targets']}: "
              f"{plan['lora']['trainable_params']:,} trainable parameters (fp32, Adam); frozen base "
              f"{plan['lora']['frozen_base_bytes_per_device'] / GiB:.2f} GiB per device in {m['dtype']}, "
              "an argument of every step"] if plan.get("lora") else []),
           f"  target  {t['description']}; mesh " + " ".join(f"{k}={v}" for k, v in plan["mesh"].items()),
           f"  memory  per device, XLA:{t['platform'].upper()} memory analysis; sum = args + out - alias + temp + code; "
           "peak = the compiler's peak (XLA:TPU only); +state = train state resident on the device but not an "
           "argument of the step (optimizer state, reference); total = (peak where reported, else sum) + state: "
           "the verdicts' figure",
           "  FLOPs   per device; XLA = compiler cost analysis (counts loop bodies once: a lower bound), "
           "analytic = formulas in the mr1jax.plan docstring",
           ""]
    blocks = [(f"stage {st['index']}: {st['max_new_tokens']} new tokens x G={st['num_samples']} "
               f"({st['steps']} steps): {st['prompts']} prompts -> {st['rows']} rows of {st['prompt_len']} + "
               f"{st['max_new_tokens']} tokens; {st['minibatch_prompts']} prompts per optimizer step in "
               f"{st['micro_batches']} micro-batch(es); image {st['image_size']} px = {st['patches_per_image']} "
               f"patches / {st['image_tokens']} tokens", st["results"]) for st in plan["stages"]]
    if "sft" in plan:
        blocks.append((f"cold-start SFT: {plan['sft']['rows']} rows x {plan['sft']['seq']} tokens",
                       plan["sft"]["results"]))
    accs = plan["accelerators"]
    for title, results in blocks:
        out += [title, _memory_table(results)]
        out.append(_table(["fits / used / time at peak"] + [f"{a} {info['nominal']}" for a, info in accs.items()],
                          [[r["step"]] + [verdict_text(r["fits"][a]) for a in accs] for r in results]))
        for r in results:
            if "oom" in r:
                out.append(f"  {r['step']}: does not fit: {r['oom']['message']}")
            elif "error" in r:
                out.append(f"  {r['step']}: not compiled: {r['error']}")
            if "warning" in r:
                out.append(f"  {r['step']}: warning: {r['warning']}")
        out.append("")
    out.append("fits* / NO* = from the program compiled for that accelerator (on TPU, XLA refuses a program that "
               "does not fit); the others compare the total with each device's memory. used = total / device memory. time at peak = analytic FLOPs per device / peak bf16 FLOP/s "
               "(a lower bound on the step time).")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- CLI
def main(argv: list[str]) -> None:
    from absl import flags

    F = flags.FLAGS
    if F.devices and F.topology:
        raise PlanError("--devices and --topology are exclusive (a topology fixes the device count)")
    if F.devices and jax.device_count() != F.devices:
        raise PlanError(f"--devices={F.devices} but jax has {jax.device_count()} devices: the flag must be "
                        "seen before jax is imported (run as python -m mr1jax.plan)")
    only = tuple(s.strip() for s in F.steps.split(",") if s.strip()) if F.steps else None
    t0 = time.perf_counter()
    plan = make_plan(F.config, topology=F.topology, preset=F.preset, only_steps=only, remat=F.remat,
                     log=lambda s: print(f"[{time.perf_counter() - t0:7.1f}s] {s}", file=sys.stderr, flush=True))
    plan["config"] = _argv_value(sys.argv, "config") or "configs/grpo.py"
    print(format_plan(plan))
    if F.json:
        with open(F.json, "w") as f:
            json.dump(plan, f, indent=1)
        print(f"wrote {F.json}")
    errors = [r for st in plan["stages"] for r in st["results"] if "error" in r and "oom" not in r]
    errors += [r for r in plan.get("sft", {}).get("results", []) if "error" in r and "oom" not in r]
    if errors:
        sys.exit(1)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", "configs/grpo.py", "training config file", lock_config=True)
    flags.DEFINE_string("topology", None, "compile for TPU topology NAME (compile-only devices), e.g. v5e:2x4")
    flags.DEFINE_integer("devices", 0, "compile for N fake CPU devices (memory numbers are XLA:CPU's)")
    flags.DEFINE_string("preset", None, f"model when <hf_path>/config.json is absent: {' | '.join(PRESETS)}")
    flags.DEFINE_string("steps", "", f"comma-separated subset of {','.join(STEPS)} (default: all the run uses)")
    flags.DEFINE_string("remat", None, "rematerialisation policy of the scanned layers (none | full | dots); "
                        "default: config.model.remat if the config has it, else none")
    flags.DEFINE_string("json", None, "also write the plan as JSON to this path")
    app.run(main)
