"""The programs a plan compiles: the model config resolved (run config, checkpoint or preset), built abstractly
(no weights), the per-stage shapes, and each jitted training step (rollout, reference log-probs, GRPO / SFT
update) lowered with the trainer's own shardings."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mr1jax.data.tokenizer import load_tokenizer
from mr1jax.generate.sampler import _rollout
from mr1jax.models import Qwen25VLConfig, Qwen2VLConfig, config_from_hf, lora, model_class
from mr1jax.models.qwen2_vl.model import set_attention_chunk
from mr1jax.parallel import sharding
from mr1jax.rl.ptst import Stage
from mr1jax.trainer import state as steps
from mr1jax.trainer.build import tiny_model_config
from mr1jax.trainer.config import DTYPES, image_sizing, make_optimizers, updates_per_rl_step
from mr1jax.trainer.step import grpo_config, sft_config


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
    return tiny_model_config(c, load_tokenizer(c.model.tokenizer_path or None)), "tiny", how


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
    native: bool = False        # native resolution: `patches` is the largest per-prompt patch bucket (one block)

    @property
    def rows(self) -> int:
        return self.prompts * self.num_samples

    @property
    def seq(self) -> int:
        return self.prompt_len + self.max_new_tokens


def stage_shapes(c: ml_collections.ConfigDict, model_cfg: Qwen2VLConfig, stage: Stage) -> Shapes:
    v = model_cfg.vision
    if not c.data.image_size:           # native resolution: memory for the largest per-prompt patch bucket
        top = image_sizing(c).patch_buckets().sizes[-1]
        return Shapes(prompts=c.data.batch_size, num_samples=stage.num_samples, max_new_tokens=stage.max_new_tokens,
                      prompt_len=c.data.prompt_bucket, image_size=0, patches=top,
                      image_tokens=top // v.spatial_merge_size ** 2,
                      minibatch_prompts=c.data.batch_size // c.rl.minibatches, micro_batches=c.rl.micro_batches,
                      images_per_prompt=1, native=True)
    side = c.data.image_size // v.patch_size
    patches = side * side
    return Shapes(prompts=c.data.batch_size, num_samples=stage.num_samples, max_new_tokens=stage.max_new_tokens,
                  prompt_len=c.data.prompt_bucket, image_size=c.data.image_size, patches=patches,
                  image_tokens=patches // v.spatial_merge_size ** 2,
                  minibatch_prompts=c.data.batch_size // c.rl.minibatches, micro_batches=c.rl.micro_batches,
                  images_per_prompt=int(_opt(c, "data.images_per_prompt", 1)))


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
    """The trainer's jitted steps (`mr1jax.trainer.state`, configured by `mr1jax.trainer.step`; the sampler's `_rollout`)
    with abstract, sharded inputs."""

    def __init__(self, c: ml_collections.ConfigDict, model_cfg: Qwen2VLConfig, mesh: Mesh, *, kl: bool,
                 remat: str = "none"):
        self.c, self.cfg, self.mesh, self.kl = c, model_cfg, mesh, kl
        self.warnings: dict[str, str] = {}
        self.dtype = DTYPES[c.model.dtype]
        self.param_dtype = DTYPES[_opt(c, "model.param_dtype", c.model.dtype)]

        self.lora = lora.LoRAConfig.from_config(c)
        self.base_quant = _opt(c, "lora.base_quant", "none")
        chunk = _opt(c, "model.attention_chunk", 0)
        self.frozen = self.full_graphdef = self.full_state = None
        if self.lora.rank:      # as the trainer builds it: base in the compute dtype, fp32 adapters trained
            model = nnx.eval_shape(lambda: lora.quantize_base(lora.apply_lora(
                model_class(model_cfg)(model_cfg, rngs=nnx.Rngs(0), dtype=self.dtype, param_dtype=self.dtype, remat=remat),
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
                                     with_old=self._several_updates(), images_per_prompt=s.images_per_prompt,
                                     patches_per_prompt=s.patches if s.native else None)
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
                                     images_per_prompt=s.images_per_prompt,
                                     patches_per_prompt=s.patches if s.native else None)
        params = self.ref_params if self.kl else self.params
        jitted = steps.jit_token_logprobs(self.graphdef, self.mesh, self.shardings.params, spec, cfg=cfg,
                                          frozen_shardings=self.frozen_shardings)
        return StepProgram("token_logprobs", jitted, (params, self._batch(spec), *self.extra),
                           f"{'ref' if self.kl else 'old'}: {s.prompts}x{s.num_samples} rows x {s.seq}, "
                           f"{cfg.micro_batches} micro", self.resident("rl", "ref_params" if self.kl else "params"))

    def sft_update(self, s: Shapes, seq: int) -> StepProgram:
        rows, cfg = s.prompts, sft_config(self.c)
        self._check_split("sft_update", rows, cfg.micro_batches)
        spec = steps.sft_batch_spec(self.cfg, rows, seq, s.image_size, s.images_per_prompt,
                                    patches_per_prompt=s.patches if s.native else None)
        jitted = steps.jit_sft_update(self.graphdef, self.mesh, self.shardings, spec, tx=self.sft_tx, cfg=cfg,
                                      frozen_shardings=self.frozen_shardings)
        return StepProgram("sft_update", jitted, (self.params, self.opt_state, self._batch(spec), *self.extra),
                           f"{rows} rows x {seq}, {cfg.micro_batches} micro", self.resident("sft", "params", "opt_state"))

    def rollout(self, s: Shapes) -> StepProgram:
        """The sampler's whole rollout (`mr1jax.generate.sampler._rollout`: prefill, G-way decode to max_new_tokens),
        prompts split over (data, fsdp) as `generate(..., mesh=...)` places them."""

        rows = NamedSharding(self.mesh, P(sharding.BATCH_AXES))
        rows2 = NamedSharding(self.mesh, P(None, sharding.BATCH_AXES))
        rep = self.replicated
        p, length, g, t = s.prompts, s.prompt_len, s.num_samples, s.max_new_tokens
        self._check_split("rollout", p, 1)
        npatch = p * s.images_per_prompt * s.patches
        i32, f32 = jnp.int32, jnp.float32
        key = jax.eval_shape(lambda: jax.random.key(0))
        state = self.params if self.full_state is None else self.full_state   # LoRA: adapters + base
        img = rows if s.native else rep             # native: each prompt's block of patches goes with it
        args = (state, _sds((p, length), i32, rows), _sds((p, length), i32, rows),
                _sds((3, p, length), i32, rows2), _sds((p,), i32, rows),
                _sds((npatch, self.cfg.vision.patch_dim), f32, img), _sds((npatch, 2), i32, img),
                _sds((npatch,), i32, img) if s.native else None,
                jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rep), _sds((), f32, rep), _sds((), i32, rep),
                _sds((), f32, rep), _sds((len(self.cfg.eos_token_ids),), i32, rep), _sds((2,), i32, rep))
        graphdef = self.graphdef if self.full_graphdef is None else self.full_graphdef
        uniform, block = (None, s.patches) if s.native else (p * s.images_per_prompt, None)

        def fn(state, ids, mask, pos, deltas, pixels, patch_pos, seg, rng, temperature, top_k, top_p, eos, suppress):
            return _rollout(graphdef, state, ids, mask, pos, deltas, pixels, patch_pos, seg, rng, temperature,
                            top_k, top_p, eos, suppress, patch_segments=uniform, num_samples=g, max_new_tokens=t,
                            patch_block=block)

        in_sh = (jax.tree.map(lambda a: a.sharding, state),) + tuple(None if a is None else a.sharding
                                                                      for a in args[1:])
        jitted = jax.jit(fn, in_shardings=in_sh, out_shardings=(rows, rows, rows, rows))
        return StepProgram("rollout", jitted, args, f"{p} prompts x {length} -> {g}x{t} new",
                           self.resident("rl", "params"))
