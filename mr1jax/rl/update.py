"""The jitted GRPO and SFT updates and the forward-only log-prob pass: pure functions of explicit state.

    params, opt_state, metrics = grpo_update(graphdef, params, opt_state, batch, beta, tx=..., cfg=...)
    logps = token_logprobs(graphdef, params, batch, cfg=...)          # reference / pi_old, [R, T]
    params, opt_state, metrics = sft_update(graphdef, params, opt_state, batch, tx=..., cfg=...)

`params` is the model's `nnx.State` (fp32 master weights in training; the model's compute dtype, e.g. bf16,
is applied inside each layer), `graphdef` its structure (`nnx.split(model)`); `beta` is a traced scalar (a KL
schedule never recompiles the step). With LoRA (`mr1jax.models.lora`), `params` are the adapters only and the frozen
base model is the extra `frozen` argument (``graphdef, params, frozen = nnx.split(model, LoRAParam, ...)``):
gradients, the optimizer and donation see only the adapters. Explicitly sharded, donating jit wrappers live in `mr1jax.trainer.state`.

**Memory bounds.** Rows are grouped: the G completions of prompt p are rows p*G .. p*G+G-1 and share its
image; the vision tower runs once per prompt and its features are repeated G times. Every pass is split into
`micro_batches` parts over *prompt groups* (`lax.scan` for gradients, `lax.map` forward-only), and
completion log-probs are computed `logit_chunk` positions at a time under `jax.checkpoint`
(`chunked_token_logprobs`), so neither the forward nor the backward pass holds `[rows, T, vocab]` logits.
Micro-batch k takes prompts k, k+m, k+2m, ...: with the batch split over devices in contiguous blocks,
every device contributes equally to every micro-batch and no rows move between devices.

**Exact accumulation.** The loss is kept in (sum, count) form and every micro-batch divides by the *global*
count, so accumulating micro-batch gradients (in the fp32 parameter dtype) gives the full-batch gradient.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mr1jax.models.qwen2_vl.model import Qwen2VL
from mr1jax.rl.losses import aggregation_count, finalize_loss_stats, grpo_loss_terms, merge_loss_stats
from mr1jax.rl.losses import sequence_logprobs


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """Static (compile-time) settings of the GRPO update and the log-prob pass."""

    num_samples: int = 8
    prompt_len: int = 256
    eps_low: float = 0.2
    eps_high: float = 0.2
    agg: str = "seq_mean_token_mean"
    kl_estimator: str = "k3"
    k3_clamp: float | None = None
    micro_batches: int = 1
    patch_segments: int | None = None  # images per micro-batch's prompts, uniform grid (static)
    logit_chunk: int = 0               # completion positions per LM-head chunk; 0 = all at once


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """Static settings of the SFT step: micro-batches over examples, LM-head chunk (0 = unchunked)."""

    micro_batches: int = 1
    patch_segments: int | None = None  # images per micro-batch (one per example), uniform grid (static)
    logit_chunk: int = 0


# --------------------------------------------------------------------------------------- log-probs
def chunked_token_logprobs(model: Qwen2VL, hidden: jax.Array, targets: jax.Array, chunk: int) -> jax.Array:
    """log softmax(lm_head(hidden))[targets] in float32, `chunk` positions at a time.

    Args:
      hidden: [R, T, hidden] final-norm hidden states; position t scores targets[:, t].
      targets: [R, T] token ids.
      chunk: positions per chunk (0 or >= T: one pass). Each chunk's fp32 logits [R, chunk, vocab] live only
        inside a `jax.checkpoint`ed body, so the backward pass recomputes them chunk by chunk too.
    Returns:
      [R, T] float32.
    """
    r, t, h = hidden.shape
    if chunk <= 0 or chunk >= t:
        return sequence_logprobs(model.logits(hidden), targets)
    n = -(-t // chunk)
    pad = n * chunk - t
    hs = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(r, n, chunk, h).swapaxes(0, 1)    # [n, R, c, H]
    ts = jnp.pad(targets, ((0, 0), (0, pad))).reshape(r, n, chunk).swapaxes(0, 1)              # [n, R, c]

    @jax.checkpoint
    def one(xs):
        hc, tc = xs
        return sequence_logprobs(model.logits(hc), tc)

    out = jax.lax.map(one, (hs, ts))                                                           # [n, R, c]
    return out.swapaxes(0, 1).reshape(r, n * chunk)[:, :t]


def completion_logprobs(model: Qwen2VL, input_ids: jax.Array, attention_mask: jax.Array,
                        position_ids: jax.Array, pixel_values: jax.Array | None, patch_pos: jax.Array | None,
                        *, prompt_len: int, num_samples: int, patch_segments: int | None,
                        logit_chunk: int = 0, segment_ids: jax.Array | None = None) -> jax.Array:
    """log pi(token) of every completion token, teacher-forced.

    Args:
      input_ids / attention_mask: [R, L + T] prompt (left-padded to L) followed by the completion.
      position_ids: [3, R, L + T] M-RoPE ids of the full sequences (`prepare_inputs`).
      pixel_values: [P_prompts * patches, patch_dim], one image per *prompt* (R = prompts * num_samples).
      logit_chunk: LM-head chunk (see `chunked_token_logprobs`).
      segment_ids: [P_prompts * P] per-row patch segments of the per-prompt padded layout (native resolution:
        every prompt's patches padded to P = pixel_values rows / prompts), or None.
    Returns:
      [R, T] float32.
    """
    feats, per_row = None, None
    if pixel_values is not None:
        prompts = input_ids.shape[0] // num_samples
        block = None if segment_ids is None else pixel_values.shape[0] // prompts
        segments = patch_segments if segment_ids is None else segment_ids
        per_prompt = model.image_features(pixel_values, patch_pos, segments, block)      # [B*M, D]
        feats = per_prompt.reshape(prompts, -1, per_prompt.shape[-1])
        per_row = None if block is None else feats.shape[1]
        feats = jnp.repeat(feats, num_samples, axis=0).reshape(-1, per_prompt.shape[-1])
    hidden = model.hidden_states(input_ids, attention_mask, position_ids, feats, per_row)
    return chunked_token_logprobs(model, hidden[:, prompt_len - 1:-1], input_ids[:, prompt_len:], logit_chunk)


# --------------------------------------------------------------------------------------- micro-batches
def _split_grouped(x: jax.Array | None, parts: int, groups: int, axis: int = 0) -> jax.Array | None:
    """[..., groups * k, ...] (k entries per prompt group along `axis`) -> [parts, ..., groups/parts * k, ...].

    Micro-batch i holds groups i, i + parts, i + 2 parts, ... (strided; see the module docstring).
    """
    if x is None:
        return None
    x = jnp.moveaxis(x, axis, 0)
    k = x.shape[0] // groups
    x = x.reshape(groups // parts, parts, k, *x.shape[1:])    # group j*parts + i -> [j, i]
    x = jnp.moveaxis(x, 1, 0).reshape(parts, (groups // parts) * k, *x.shape[3:])
    return jnp.moveaxis(x, 1, axis + 1) if axis else x


def _merge_grouped(x: jax.Array, parts: int, groups: int) -> jax.Array:
    """Inverse of `_split_grouped` along axis 0: [parts, groups/parts * k, ...] -> [groups * k, ...]."""
    k = x.shape[1] // (groups // parts)
    x = x.reshape(parts, groups // parts, k, *x.shape[2:])
    return jnp.moveaxis(x, 0, 1).reshape(groups * k, *x.shape[3:])


_ROW_KEYS = ("input_ids", "attention_mask", "completion_mask", "old_logps", "ref_logps", "advantages",
             "sampler_logps", "loss_mask")


def split_batch(batch: dict[str, jax.Array], parts: int, groups: int) -> dict[str, jax.Array | None]:
    """Every array of a rollout / SFT batch split into `parts` micro-batches of whole prompt groups."""
    out = {k: _split_grouped(batch.get(k), parts, groups) for k in _ROW_KEYS}
    out["position_ids"] = _split_grouped(batch["position_ids"], parts, groups, axis=1)
    out["pixel_values"] = _split_grouped(batch.get("pixel_values"), parts, groups)
    out["patch_pos"] = _split_grouped(batch.get("patch_pos"), parts, groups)
    out["patch_segments"] = _split_grouped(batch.get("patch_segments"), parts, groups)
    return out


def _num_prompts(batch: dict[str, jax.Array], num_samples: int) -> int:
    return batch["input_ids"].shape[0] // num_samples


def _merge(graphdef: nnx.GraphDef, params: nnx.State, frozen: nnx.State | None):
    """The model on `params` (and the frozen base `frozen`, with LoRA)."""
    return nnx.merge(graphdef, params) if frozen is None else nnx.merge(graphdef, params, frozen)


def token_logprobs(graphdef: nnx.GraphDef, params: nnx.State, batch: dict[str, jax.Array],
                   frozen: nnx.State | None = None, *, cfg: GRPOConfig) -> jax.Array:
    """Forward-only completion log-probs [R, T] (fp32) of a rollout batch, `cfg.micro_batches` groups of prompts
    at a time: the reference model's log-probs, or pi_old before the first of several updates.

    batch keys: input_ids, attention_mask [R, L+T]; position_ids [3, R, L+T]; pixel_values, patch_pos (or
    absent). `params` may be in any dtype (e.g. a bf16 reference copy). With LoRA, `params` are adapters and
    `frozen` the base (the reference with adapters disabled: adapters of zeros, `lora.disabled`).
    """
    m, prompts = cfg.micro_batches, _num_prompts(batch, cfg.num_samples)
    model = _merge(graphdef, params, frozen)
    parts = split_batch(batch, m, prompts)

    def one(mb):
        return completion_logprobs(model, mb["input_ids"], mb["attention_mask"], mb["position_ids"],
                                   mb["pixel_values"], mb["patch_pos"], prompt_len=cfg.prompt_len,
                                   num_samples=cfg.num_samples, patch_segments=cfg.patch_segments,
                                   logit_chunk=cfg.logit_chunk, segment_ids=mb["patch_segments"])

    keys = ("input_ids", "attention_mask", "position_ids", "pixel_values", "patch_pos", "patch_segments")
    out = jax.lax.map(one, {k: parts[k] for k in keys})
    return _merge_grouped(out, m, prompts)


# --------------------------------------------------------------------------------------- updates
def _accumulate(grad_fn, params, parts: dict[str, Any], m: int):
    """Sum of grad_fn(params, micro-batch) over the m micro-batches (fp32 in the params' dtype), with stats
    merged by `merge_loss_stats`."""
    g0, s0 = grad_fn(params, jax.tree.map(lambda x: x[0], parts))

    def body(carry, mb):
        grads, stats = carry
        g, s = grad_fn(params, mb)
        return (jax.tree.map(jnp.add, grads, g), merge_loss_stats(stats, s)), None

    if m > 1:
        (g0, s0), _ = jax.lax.scan(body, (g0, s0), jax.tree.map(lambda x: x[1:], parts))
    return g0, s0


def _apply_if_finite(tx: optax.GradientTransformation, grads, opt_state, params, loss: jax.Array):
    """One optimizer step, skipped (params and opt_state returned unchanged) when `loss` or the gradient norm is
    not finite, as optax's `apply_if_finite` does. Returns (params, opt_state, grad_norm, skipped 0./1.).

    The choice is an elementwise select fused into the update, so it costs no extra copy of the state."""
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt_state = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
    return (jax.tree.map(keep, new_params, params), jax.tree.map(keep, new_opt_state, opt_state), grad_norm,
            1.0 - ok.astype(jnp.float32))


def _constrain(tree, shardings):
    return tree if shardings is None else jax.lax.with_sharding_constraint(tree, shardings)


def grpo_update(graphdef: nnx.GraphDef, params: nnx.State, opt_state: Any, batch: dict[str, jax.Array],
                beta: jax.Array, frozen: nnx.State | None = None, *, tx: optax.GradientTransformation, cfg: GRPOConfig, grad_shardings: Any = None
                ) -> tuple[nnx.State, Any, dict[str, jax.Array]]:
    """One optimizer step on a rollout (mini-)batch. Jit with `graphdef`, `tx` and `cfg` static.

    batch keys: input_ids, attention_mask [R, L+T]; position_ids [3, R, L+T]; pixel_values, patch_pos
    (or absent); completion_mask [R, T]; advantages [R]; old_logps [R, T] (pi_old recomputed by
    `token_logprobs`; absent = the current policy, detached: ratio exactly 1, as with one optimizer step per
    rollout batch); ref_logps [R, T] (absent = no KL term); sampler_logps [R, T] (optional: the sampler's
    log-probs, only compared with the trainer's: ``sampler_gap_mean`` / ``sampler_gap_max`` metrics).
    grad_shardings: optional pytree of shardings (like params) that gradients are constrained to, so FSDP
    reduces them with reduce-scatter into the parameters' layout.
    """
    m = cfg.micro_batches
    mask = batch["completion_mask"]
    max_len = mask.shape[1]
    total = aggregation_count(mask, cfg.agg, max_len)
    parts = split_batch(batch, m, _num_prompts(batch, cfg.num_samples))

    def micro_loss(p, mb):
        model = _merge(graphdef, p, frozen)
        logps = completion_logprobs(
            model, mb["input_ids"], mb["attention_mask"], mb["position_ids"], mb["pixel_values"],
            mb["patch_pos"], prompt_len=cfg.prompt_len, num_samples=cfg.num_samples,
            patch_segments=cfg.patch_segments, logit_chunk=cfg.logit_chunk, segment_ids=mb["patch_segments"])
        loss_sum, _, stats = grpo_loss_terms(
            logps, mb["old_logps"], mb["ref_logps"], mb["advantages"], mb["completion_mask"], beta=beta,
            eps_low=cfg.eps_low, eps_high=cfg.eps_high, agg=cfg.agg, kl_estimator=cfg.kl_estimator,
            k3_clamp=cfg.k3_clamp, max_length=max_len)
        if mb["sampler_logps"] is not None:
            valid = mb["completion_mask"] > 0
            gap = jnp.where(valid, jnp.abs(jax.lax.stop_gradient(logps) - mb["sampler_logps"]), 0.0)
            stats = dict(stats, sampler_gap_sum=gap.sum(), sampler_gap_max=gap.max())
        return loss_sum / jnp.maximum(total, 1), stats

    def grad_fn(p, mb):
        g, s = jax.grad(micro_loss, has_aux=True)(p, mb)
        return _constrain(g, grad_shardings), s

    grads, stats = _accumulate(grad_fn, params, parts, m)
    metrics = finalize_loss_stats(stats)
    params, opt_state, metrics["grad_norm"], metrics["skipped"] = _apply_if_finite(
        tx, grads, opt_state, params, metrics["loss"])
    if "sampler_gap_sum" in stats:
        metrics["sampler_gap_mean"] = stats["sampler_gap_sum"] / jnp.maximum(stats["tokens"], 1)
        metrics["sampler_gap_max"] = stats["sampler_gap_max"]
    metrics["beta"] = jnp.asarray(beta, jnp.float32)
    return params, opt_state, metrics


def sft_loss_terms(model: Qwen2VL, input_ids: jax.Array, attention_mask: jax.Array, position_ids: jax.Array,
                   loss_mask: jax.Array, pixel_values: jax.Array | None = None, patch_pos: jax.Array | None = None,
                   patch_segments: int | None = None, logit_chunk: int = 0, segment_ids: jax.Array | None = None
                   ) -> tuple[jax.Array, jax.Array]:
    """Next-token cross-entropy on the tokens where loss_mask [B, S] is 1 (assistant tokens), as (sum, count).

    loss_mask[b, s] marks token s as a *target* (predicted from position s - 1). segment_ids: the per-example
    padded patch layout's segments (native resolution; P = pixel_values rows / B), or None.
    """
    feats, per_row = None, None
    if pixel_values is not None:
        block = None if segment_ids is None else pixel_values.shape[0] // input_ids.shape[0]
        feats = model.image_features(pixel_values, patch_pos, patch_segments if segment_ids is None else segment_ids,
                                     block)
        per_row = None if block is None else feats.shape[0] // input_ids.shape[0]
    hidden = model.hidden_states(input_ids, attention_mask, position_ids, feats, per_row)
    logps = chunked_token_logprobs(model, hidden[:, :-1], input_ids[:, 1:], logit_chunk)
    target = loss_mask[:, 1:].astype(jnp.float32)
    return -(logps * target).sum(), target.sum()


def sft_update(graphdef: nnx.GraphDef, params: nnx.State, opt_state: Any, batch: dict[str, jax.Array],
               frozen: nnx.State | None = None, *,
               tx: optax.GradientTransformation, cfg: SFTConfig = SFTConfig(), grad_shardings: Any = None
               ) -> tuple[nnx.State, Any, dict[str, jax.Array]]:
    """One supervised (cold-start) optimizer step: mean cross-entropy over assistant tokens.

    batch keys: input_ids, attention_mask, loss_mask [B, S]; position_ids [3, B, S]; pixel_values, patch_pos
    (one image per example, or absent). Split into `cfg.micro_batches` groups of examples, accumulated exactly.
    """
    m = cfg.micro_batches
    total = batch["loss_mask"][:, 1:].astype(jnp.float32).sum()
    parts = split_batch(batch, m, batch["input_ids"].shape[0])

    def micro_loss(p, mb):
        s, n = sft_loss_terms(_merge(graphdef, p, frozen), mb["input_ids"], mb["attention_mask"], mb["position_ids"],
                              mb["loss_mask"], mb["pixel_values"], mb["patch_pos"], cfg.patch_segments,
                              cfg.logit_chunk, mb["patch_segments"])
        return s / jnp.maximum(total, 1), {"loss_sum": jax.lax.stop_gradient(s), "tokens": n}

    def grad_fn(p, mb):
        g, s = jax.grad(micro_loss, has_aux=True)(p, mb)
        return _constrain(g, grad_shardings), s

    grads, stats = _accumulate(grad_fn, params, parts, m)
    loss = stats["loss_sum"] / jnp.maximum(stats["tokens"], 1)
    params, opt_state, grad_norm, skipped = _apply_if_finite(tx, grads, opt_state, params, loss)
    return params, opt_state, {"loss": loss, "tokens": stats["tokens"], "grad_norm": grad_norm,
                               "skipped": skipped}
