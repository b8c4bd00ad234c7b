"""One SFT step and one RL step of the training loop, as functions of an explicit `TrainState`.

    state, metrics = sft_step(state, fns, examples, ...)
    state, metrics = rl_step(state, fns, prompts, stage, beta, ...)

`StepFunctions` holds the run's jitted steps (from `mr1jax.trainer.state`), compiled once per static configuration:
one SFT step, and per PTST stage one GRPO update, one reference pass and (with several updates per batch)
one pi_old pass. `compile_counts()` reports how many executables each holds.

pi_old, as the papers and peers define it: with one optimizer step per rollout batch (updates_per_batch x
minibatches == 1) the ratio is exactly 1 (old = stop_gradient of the current log-probs); with more, old
log-probs are recomputed by the training forward before the first update. The sampler's log-probs are kept
only to log their gap to the trainer's (``sampler_gap_mean`` / ``sampler_gap_max``).
"""

from __future__ import annotations

import time
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from mr1jax.trainer import state as st
from mr1jax.data.examples import example_images
from mr1jax.data.sft import sft_batch, sft_examples_for_step, sft_update_batch
from mr1jax.data.sizing import ImageSizing
from mr1jax.rl.ptst import Stage
from mr1jax.rl.update import GRPOConfig, SFTConfig
from mr1jax.trainer.config import image_sizing, images_per_prompt, updates_per_rl_step
from mr1jax.trainer.rollout import rollout_batch, select_groups

# Metrics of several updates in one RL step combine like this (the rest: mean over updates).
_COMBINE = {"ratio_min": min, "ratio_max": max, "sampler_gap_max": max, "skipped": sum}


class StepFunctions:
    """The jitted, explicitly sharded steps of one run (see `mr1jax.trainer.state`), built lazily and cached by their
    static configuration."""

    def __init__(self, graphdef: nnx.GraphDef, mesh: Mesh, shardings: st.TrainState, *,
                 sft_tx: optax.GradientTransformation | None, rl_tx: optax.GradientTransformation,
                 frozen: nnx.State | None = None):
        self.graphdef, self.mesh, self.shardings = graphdef, mesh, shardings
        self.sft_tx, self.rl_tx = sft_tx, rl_tx
        # LoRA: the frozen base model (passed to every step, never donated); None for full fine-tuning
        self.frozen = frozen
        self.frozen_shardings = None if frozen is None else jax.tree.map(lambda x: x.sharding, frozen)
        self._jitted: dict[Any, Any] = {}

    def _extra(self) -> tuple:
        return () if self.frozen is None else (self.frozen,)

    def model(self, params):
        """The policy (or reference) model on `params` (and, with LoRA, the frozen base)."""
        return nnx.merge(self.graphdef, params, *self._extra())

    def _get(self, key, build):
        if key not in self._jitted:
            self._jitted[key] = build()
        return self._jitted[key]

    def sft(self, params, opt_state, batch, cfg: SFTConfig):
        fn = self._get(("sft", cfg, tuple(sorted(batch))), lambda: st.jit_sft_update(
            self.graphdef, self.mesh, self.shardings, batch, tx=self.sft_tx, cfg=cfg,
            frozen_shardings=self.frozen_shardings))
        with jax.set_mesh(self.mesh):          # traced under the mesh: activations pinned to the batch axes
            return fn(params, opt_state, batch, *self._extra())

    def grpo(self, params, opt_state, batch, beta, cfg: GRPOConfig):
        fn = self._get(("grpo", cfg, tuple(sorted(batch))), lambda: st.jit_grpo_update(
            self.graphdef, self.mesh, self.shardings, batch, tx=self.rl_tx, cfg=cfg,
            frozen_shardings=self.frozen_shardings))
        with jax.set_mesh(self.mesh):
            return fn(params, opt_state, batch, np.float32(beta), *self._extra())

    def logprobs(self, params, batch, cfg: GRPOConfig, which: str):
        """which: "ref" (the reference copy, compute dtype) or "old" (the current fp32 params)."""
        sh = self.shardings.params
        fn = self._get((which, cfg, tuple(sorted(batch))), lambda: st.jit_token_logprobs(
            self.graphdef, self.mesh, sh, batch, cfg=cfg, frozen_shardings=self.frozen_shardings))
        with jax.set_mesh(self.mesh):
            return fn(params, batch, *self._extra())

    def advantages(self, rewards, num_samples: int, scale: str):
        """Group advantages [R] from the global rewards [R], on device (`mr1jax.trainer.state.jit_advantages`)."""
        return self._get(("advantages", num_samples, scale), lambda: st.jit_advantages(self.mesh, num_samples, scale))(
            rewards)

    def compile_counts(self) -> dict[str, int]:
        """{step name: executables compiled}, summed over the step's static configurations."""
        out: dict[str, int] = {}
        for key, fn in self._jitted.items():
            out[key[0]] = out.get(key[0], 0) + fn._cache_size()
        return out


def sft_patch_bucket(sizing: ImageSizing, rows, step: int, global_batch: int, seed: int) -> int | None:
    """Native resolution: the patch bucket of SFT step `step`'s whole (global) batch, from its images' headers,
    so that every process pads its share to the same shape; None at fixed size."""
    if not sizing.native:
        return None
    examples = sft_examples_for_step(rows, step, global_batch, seed)
    most = max(sum(h * w for h, w in map(sizing.grid_of, example_images(e))) for e in examples)
    return sizing.patch_buckets()(most)


def sft_config(c: ml_collections.ConfigDict) -> SFTConfig:
    m = c.sft.micro_batches
    uniform = c.data.batch_size // m * images_per_prompt(c) if c.data.image_size else None   # native: ids
    return SFTConfig(micro_batches=m, patch_segments=uniform, logit_chunk=c.model.logit_chunk)


def grpo_config(c: ml_collections.ConfigDict, stage: Stage, *, whole_batch: bool = False) -> GRPOConfig:
    """The update's static config for one mini-batch (or, `whole_batch`, the log-prob pass over the whole rollout
    batch, in as many micro-batches as the update uses in all, so both hold the same number of rows at once)."""
    per_update = c.data.batch_size // c.rl.minibatches
    micro = c.rl.micro_batches * (c.rl.minibatches if whole_batch else 1)
    return GRPOConfig(num_samples=stage.num_samples, prompt_len=c.data.prompt_bucket, eps_low=c.rl.eps_low,
                      eps_high=c.rl.eps_high, agg=c.rl.agg, kl_estimator=c.rl.kl_estimator,
                      k3_clamp=c.rl.k3_clamp or None, micro_batches=micro,
                      patch_segments=per_update // c.rl.micro_batches * images_per_prompt(c) if c.data.image_size
                      else None,                            # native resolution: segment ids in the batch
                      logit_chunk=c.model.logit_chunk)



def sft_step(state: st.TrainState, fns: StepFunctions, tokenizer, model_config, examples: list[dict], *,
             c: ml_collections.ConfigDict, seq_len: int, response_fn, spare=(), patches_per_example: int | None = None
             ) -> tuple[st.TrainState, dict[str, float]]:
    """One cold-start SFT optimizer step on `examples` (with `data.skip_bad_rows`, a bad one is replaced by the
    next good one of `spare`). Native resolution: every example's patches padded to `patches_per_example` (the
    global batch's bucket; None = this batch's own)."""
    t0 = time.perf_counter()
    b = sft_batch(tokenizer, examples, sizing=image_sizing(c), seq_len=seq_len,
                  question_template=c.data.question_template, response_fn=response_fn,
                  skip_bad_rows=c.data.skip_bad_rows, spare=spare, patches_per_example=patches_per_example)
    batch = st.put_batch(sft_update_batch(model_config, b), fns.mesh)
    params, opt_state, m = fns.sft(state.params, state.opt_state, batch, sft_config(c))
    state = state.replace(params=params, opt_state=opt_state, step=state.step + 1)
    out = {"sft_loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]), "skipped": int(m["skipped"]),
           "time_step": time.perf_counter() - t0}
    if "patches_per_example" in b:           # native resolution: the bucket and its share of padding patches
        out.update(patch_bucket=int(b["patches_per_example"]),
                   patch_padding=_padding(b["image_grid_thw"], len(examples) * b["patches_per_example"]))
    return state, out


def rl_step(state: st.TrainState, fns: StepFunctions, tokenizer, prompts, stage: Stage, beta: float, *,
            c: ml_collections.ConfigDict) -> tuple[st.TrainState, dict[str, Any]]:
    """Rollouts -> rewards -> reference (and pi_old) log-probs -> mu x mini-batch GRPO updates.

    Returns the new state and the step's metrics (averaged over its updates; ``skipped``: how many of its
    updates were skipped as non-finite; ``sample``: one completion text).
    """
    t0 = time.perf_counter()
    rng, sample_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
    policy = fns.model(state.params)
    host, info = rollout_batch(policy, tokenizer, prompts, stage, c, sample_rng, fns.mesh)
    t1 = time.perf_counter()
    batch = st.put_batch(host, fns.mesh)
    batch["advantages"] = fns.advantages(batch.pop("rewards"), stage.num_samples, c.rl.advantage_scale)
    whole = grpo_config(c, stage, whole_batch=True)
    if state.ref_params is not None:
        batch["ref_logps"] = fns.logprobs(state.ref_params, batch, whole, "ref")
    if updates_per_rl_step(c) > 1:
        batch["old_logps"] = fns.logprobs(state.params, batch, whole, "old")
    jax.block_until_ready([batch.get("ref_logps"), batch.get("old_logps")])   # time_reference: the real pass
    t2 = time.perf_counter()
    cfg, prompts_n, g = grpo_config(c, stage), c.data.batch_size, stage.num_samples
    params, opt_state, updates = state.params, state.opt_state, []
    order = np.random.default_rng([c.seed, state.step])
    for _ in range(c.rl.updates_per_batch):                 # mu passes over shuffled mini-batches of groups
        for groups in np.split(order.permutation(prompts_n), c.rl.minibatches):
            sub = batch if c.rl.minibatches == 1 else st.put_batch(
                select_groups(batch, np.sort(groups), g, prompts_n), fns.mesh)
            params, opt_state, m = fns.grpo(params, opt_state, sub, beta, cfg)
            updates.append(m)
    m = {k: _COMBINE.get(k, np.mean)([float(u[k]) for u in updates]) for k in updates[0]}
    t3 = time.perf_counter()
    state = state.replace(params=params, opt_state=opt_state, rng=jax.random.key_data(rng), step=state.step + 1)
    metrics = dict(info, **{k: m[k] for k in ("loss", "policy_loss", "beta", "grad_norm", "clip_frac")},
                   skipped=int(m["skipped"]),
                   kl=m.get("kl", 0.0), sampler_gap_mean=m["sampler_gap_mean"],
                   sampler_gap_max=m["sampler_gap_max"], time_rollout=t1 - t0, time_reference=t2 - t1,
                   time_update=t3 - t2, time_step=t3 - t0)
    if getattr(prompts, "patches_per_prompt", None) is not None:
        metrics.update(patch_bucket=int(prompts.patches_per_prompt),
                       patch_padding=_padding(prompts.image_grid_thw, len(prompts.pixel_values)))
    return state, metrics


def _padding(image_grid_thw, slots: int) -> float:
    """Fraction of a padded batch's patch slots that are padding."""
    return 1.0 - float(np.asarray(image_grid_thw).reshape(-1, 3).prod(-1).sum()) / max(slots, 1)


def start_rl(state: st.TrainState, fns: StepFunctions, *, kl_on: bool, ref_dtype, lora_merge_seed: int | None = None
             ) -> st.TrainState:
    """The SFT -> RL boundary: the SFT model becomes the frozen reference (in `ref_dtype`), and RL starts with
    fresh optimizer state.

    With LoRA (`fns.frozen` set) the SFT adapters either stay the policy's and a copy becomes the reference
    adapters (``lora.sft_to_rl = "keep"``), or (`lora_merge_seed` given, ``"merge"``) are folded into the base,
    which becomes the reference (adapters disabled), and RL trains fresh adapters drawn from that seed."""
    params, ref = state.params, None
    if fns.frozen is not None and lora_merge_seed is not None:
        from mr1jax.models import lora

        params, fns.frozen = lora.fold_adapters(fns.graphdef, params, fns.frozen, seed=lora_merge_seed)
        if kl_on:
            ref = lora.disabled(st.cast_floating(params, ref_dtype))
    elif kl_on:
        ref = st.make_reference(params, fns.mesh, ref_dtype)
    opt_state = jax.jit(fns.rl_tx.init, out_shardings=fns.shardings.opt_state)(params)
    return state.replace(params=params, opt_state=opt_state, ref_params=ref)
