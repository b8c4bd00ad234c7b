"""The jitted GRPO and SFT updates: pure functions of explicit state.

    params, opt_state, metrics = grpo_update(graphdef, params, opt_state, batch, beta, tx=..., cfg=...)

`params` is the model's `nnx.State`, `graphdef` its structure (`nnx.split(model)`); `beta` is a traced scalar
(so a KL schedule never recompiles the step). The batch is split into `cfg.micro_batches` equal parts
along the prompt axis and gradients are accumulated with `lax.scan`: the loss is kept in (sum, count) form
and every micro-batch divides by the *global* count, so accumulation gives exactly the full-batch gradient.

Rows are grouped: the G completions of prompt p are rows p*G .. p*G+G-1 and share its image. The vision
tower runs once per prompt and its features are repeated G times (gradients flow through the repeat).
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
    """Static (compile-time) settings of the GRPO update."""

    num_samples: int = 8
    prompt_len: int = 256
    eps_low: float = 0.2
    eps_high: float = 0.2
    agg: str = "seq_mean_token_mean"
    kl_estimator: str = "k3"
    k3_clamp: float | None = None
    micro_batches: int = 1
    patch_segments: int | None = None  # images per micro-batch's prompts, uniform grid (static)


def completion_logprobs(model: Qwen2VL, input_ids: jax.Array, attention_mask: jax.Array,
                        position_ids: jax.Array, pixel_values: jax.Array | None, patch_pos: jax.Array | None,
                        *, prompt_len: int, num_samples: int, patch_segments: int | None) -> jax.Array:
    """log pi(token) of every completion token, teacher-forced.

    Args:
      input_ids / attention_mask: [R, L + T] prompt (left-padded to L) followed by the completion.
      position_ids: [3, R, L + T] M-RoPE ids of the full sequences (`prepare_inputs`).
      pixel_values: [P_prompts * patches, patch_dim], one image per *prompt* (R = prompts * num_samples).
    Returns:
      [R, T] float32.
    """
    feats = None
    if pixel_values is not None:
        per_prompt = model.image_features(pixel_values, patch_pos, patch_segments)      # [B*M, D]
        prompts = input_ids.shape[0] // num_samples
        feats = per_prompt.reshape(prompts, -1, per_prompt.shape[-1])
        feats = jnp.repeat(feats, num_samples, axis=0).reshape(-1, per_prompt.shape[-1])
    hidden = model.hidden_states(input_ids, attention_mask, position_ids, feats)
    logits = model.logits(hidden[:, prompt_len - 1:-1]).astype(jnp.float32)                 # [R, T, V]
    return sequence_logprobs(logits, input_ids[:, prompt_len:])


def _split(x: jax.Array | None, parts: int, axis: int = 0) -> jax.Array | None:
    if x is None:
        return None
    x = jnp.moveaxis(x, axis, 0)
    x = x.reshape(parts, x.shape[0] // parts, *x.shape[1:])
    return jnp.moveaxis(x, 1, axis + 1) if axis else x


def grpo_update(graphdef: nnx.GraphDef, params: nnx.State, opt_state: Any, batch: dict[str, jax.Array],
                beta: jax.Array, *, tx: optax.GradientTransformation, cfg: GRPOConfig
                ) -> tuple[nnx.State, Any, dict[str, jax.Array]]:
    """One optimizer step on a rollout (mini-)batch. Jit with `graphdef`, `tx` and `cfg` static.

    batch keys: input_ids, attention_mask [R, L+T]; position_ids [3, R, L+T]; pixel_values, patch_pos
    (or absent); completion_mask [R, T]; old_logps [R, T] (sampler log-probs; absent = current policy,
    detached); ref_logps [R, T] (absent = no KL term); advantages [R].
    """
    m = cfg.micro_batches
    mask = batch["completion_mask"]
    max_len = mask.shape[1]
    total = aggregation_count(mask, cfg.agg, max_len)
    split_rows = {k: _split(batch.get(k), m) for k in ("input_ids", "attention_mask", "completion_mask",
                                                       "old_logps", "ref_logps", "advantages")}
    split_rows["position_ids"] = _split(batch["position_ids"], m, axis=1)
    split_rows["pixel_values"] = _split(batch.get("pixel_values"), m)
    split_rows["patch_pos"] = _split(batch.get("patch_pos"), m)

    def micro_loss(p, mb):
        model = nnx.merge(graphdef, p)
        logps = completion_logprobs(
            model, mb["input_ids"], mb["attention_mask"], mb["position_ids"], mb["pixel_values"],
            mb["patch_pos"], prompt_len=cfg.prompt_len, num_samples=cfg.num_samples,
            patch_segments=cfg.patch_segments)
        loss_sum, _, stats = grpo_loss_terms(
            logps, mb["old_logps"], mb["ref_logps"], mb["advantages"], mb["completion_mask"], beta=beta,
            eps_low=cfg.eps_low, eps_high=cfg.eps_high, agg=cfg.agg, kl_estimator=cfg.kl_estimator,
            k3_clamp=cfg.k3_clamp, max_length=max_len)
        return loss_sum / jnp.maximum(total, 1), stats

    grad_fn = jax.grad(micro_loss, has_aux=True)

    def body(carry, mb):
        grads, stats = carry
        g, s = grad_fn(params, mb)
        grads = jax.tree.map(jnp.add, grads, g)
        return (grads, merge_loss_stats(stats, s)), None

    g0, s0 = grad_fn(params, jax.tree.map(lambda x: x[0], split_rows))   # None entries stay None
    if m > 1:
        (g0, s0), _ = jax.lax.scan(body, (g0, s0), jax.tree.map(lambda x: x[1:], split_rows))
    updates, opt_state = tx.update(g0, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = finalize_loss_stats(s0)
    metrics["grad_norm"] = optax.tree.norm(g0)
    metrics["beta"] = jnp.asarray(beta, jnp.float32)
    return params, opt_state, metrics


def sft_loss_terms(model: Qwen2VL, input_ids: jax.Array, attention_mask: jax.Array, position_ids: jax.Array,
                   loss_mask: jax.Array, pixel_values: jax.Array | None = None, patch_pos: jax.Array | None = None,
                   patch_segments: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Next-token cross-entropy on the tokens where loss_mask [B, S] is 1 (assistant tokens), as (sum, count).

    loss_mask[b, s] marks token s as a *target* (predicted from position s - 1).
    """
    feats = None if pixel_values is None else model.image_features(pixel_values, patch_pos, patch_segments)
    hidden = model.hidden_states(input_ids, attention_mask, position_ids, feats)
    logits = model.logits(hidden[:, :-1]).astype(jnp.float32)
    logps = sequence_logprobs(logits, input_ids[:, 1:])
    target = loss_mask[:, 1:].astype(jnp.float32)
    return -(logps * target).sum(), target.sum()


def sft_update(graphdef: nnx.GraphDef, params: nnx.State, opt_state: Any, batch: dict[str, jax.Array], *,
               tx: optax.GradientTransformation, patch_segments: int | None = None
               ) -> tuple[nnx.State, Any, dict[str, jax.Array]]:
    """One supervised (cold-start) optimizer step: mean cross-entropy over assistant tokens."""

    def loss_fn(p):
        model = nnx.merge(graphdef, p)
        s, n = sft_loss_terms(model, batch["input_ids"], batch["attention_mask"], batch["position_ids"],
                              batch["loss_mask"], batch.get("pixel_values"), batch.get("patch_pos"),
                              patch_segments)
        return s / jnp.maximum(n, 1), n

    (loss, n), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, {"loss": loss, "tokens": n, "grad_norm": optax.tree.norm(grads)}
