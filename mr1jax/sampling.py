"""Jitted grouped-rollout sampler for Qwen2-VL with a KV cache.

One call of `generate` runs, inside a single `jax.jit`:

1. the vision tower and the prompt prefill once per prompt, filling a KV cache of
   ``prompt_bucket + max_new_tokens`` slots;
2. the cache (and the last prompt logits) repeated G times, so the G samples of a prompt share one prefill;
3. a `lax.while_loop` decode that stops as soon as every row has emitted a stop token.

Shapes are static (prompt bucket, G, max_new_tokens, image grid layout); temperature, top-p, top-k, the stop
ids and the rng are traced, so changing them, or the prompt contents, never recompiles (`compile_count`).

**Log-probability convention.** ``Rollouts.logprobs[r, t]`` is ``log pi(token | context)`` under the model's
*untempered, untruncated* distribution (``log_softmax(logits)``), whatever temperature / top-k / top-p drew the
token. This is the quantity GRPO's ratio needs for pi_old when the policy is defined at temperature 1, and it
equals a teacher-forced forward pass over the same tokens.

**KV cache memory.** Per token per layer the cache holds keys and values:
``2 * num_kv_heads * head_dim * bytes(dtype)`` bytes. Qwen2-VL-2B (2 KV heads x 128, 28 layers, bf16):
1 KiB per token per layer, 28 KiB per token. G=8 rows of a 1024-token prompt bucket + 1024 new tokens:
8 * 2048 * 28 KiB = 448 MiB per prompt.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mr1jax.models.qwen2_vl.model import Qwen2VL, attention_mask_4d, prepare_inputs
from mr1jax.sharding import shard_batch

_TRACE_COUNT = [0]


def compile_count() -> int:
    """How many times the rollout function has been traced (= compiled) in this process."""
    return _TRACE_COUNT[0]


def kv_cache_bytes_per_token(model_or_config, dtype=None) -> int:
    """Bytes of KV cache per token summed over layers: 2 * layers * kv_heads * head_dim * itemsize."""
    cfg = getattr(model_or_config, "config", model_or_config).text
    itemsize = jnp.dtype(dtype or getattr(model_or_config, "dtype", jnp.bfloat16)).itemsize
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize


@dataclasses.dataclass(frozen=True)
class Rollouts:
    """G completions per prompt; rows of one prompt are contiguous (row r belongs to prompt r // G).

    tokens:       [B*G, T] int32 sampled ids (pad id after a row finished).
    logprobs:     [B*G, T] float32 log pi(token) under the untempered model distribution (0 where masked).
    mask:         [B*G, T] int32, 1 up to and including the first stop token.
    truncated:    [B*G] bool, True when a row hit max_new_tokens without a stop token.
    prompt_index: [B*G] int32, the prompt each row came from.
    lengths:      [B*G] int32 completion lengths (sum of mask).
    """

    tokens: jax.Array
    logprobs: jax.Array
    mask: jax.Array
    truncated: jax.Array
    prompt_index: jax.Array
    lengths: jax.Array


def filter_logits(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Temperature-scaled logits with everything outside the top-k / top-p (nucleus) set at -inf.

    Args:
      logits: [R, V]; temperature > 0; top_k: int, 0 = off; top_p: float in (0, 1], 1 = off.
    The top-p set is the smallest prefix of tokens (by probability) whose mass reaches top_p, computed after
    top-k; ties at the boundary are kept.
    """
    scaled = logits.astype(jnp.float32) / temperature
    sorted_desc = -jnp.sort(-scaled, axis=-1)
    vocab = scaled.shape[-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(sorted_desc, jnp.broadcast_to(k - 1, (scaled.shape[0], 1)).astype(jnp.int32), -1)
    sorted_desc = jnp.where(jnp.arange(vocab) < k, sorted_desc, -jnp.inf)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = (mass_before < top_p) | (jnp.arange(vocab) == 0)
    threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    threshold = jnp.maximum(threshold, kth)
    return jnp.where(scaled >= threshold, scaled, -jnp.inf)


def sample_tokens(logits: jax.Array, rng: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """Draw one token per row of logits [R, V]; temperature == 0 means greedy (argmax)."""
    greedy = jnp.argmax(logits, axis=-1)
    safe_t = jnp.where(temperature > 0, temperature, 1.0)
    # The vocabulary sort behind top-k / top-p runs only when one of them is on (a runtime branch).
    filtered = jax.lax.cond((top_k > 0) | (top_p < 1.0), filter_logits, lambda lg, t, k, p: lg / t,
                            logits.astype(jnp.float32), safe_t, top_k, top_p)
    drawn = jax.random.categorical(rng, filtered, axis=-1)
    return jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)


def _rollout(graphdef, state, input_ids, attention_mask, position_ids, rope_deltas, pixel_values, patch_pos,
             segment_ids, rng, temperature, top_k, top_p, eos_ids, *, patch_segments, num_samples, max_new_tokens):
    _TRACE_COUNT[0] += 1
    model: Qwen2VL = nnx.merge(graphdef, state)
    cfg = model.config.text
    b, length = input_ids.shape
    g, t_new = num_samples, max_new_tokens
    size = length + t_new

    # ---- prefill once per prompt
    segments = patch_segments if patch_segments is not None else segment_ids
    feats = None if pixel_values is None else model.image_features(pixel_values, patch_pos, segments)
    x = model.embed(input_ids, feats)
    valid = attention_mask.astype(bool)
    key_valid = jnp.concatenate([valid, jnp.zeros((b, t_new), bool)], axis=1)
    slots = jnp.arange(size)
    q_slots = jnp.broadcast_to(slots[:length], (b, length))
    mask = attention_mask_4d(valid, key_valid, q_slots, jnp.broadcast_to(slots, (b, size)))
    cache = [(jnp.zeros((b, size, cfg.num_kv_heads, cfg.head_dim), model.dtype),) * 2 for _ in range(cfg.num_layers)]
    hidden, cache = model.decode_hidden(x, position_ids, mask, cache, 0)
    last_logits = model.logits(hidden[:, -1]).astype(jnp.float32)                         # [B, V]

    # ---- share the prefill across the G samples of each prompt
    rep = lambda a: jnp.repeat(a, g, axis=0)  # noqa: E731
    cache = [(rep(k), rep(v)) for k, v in cache]
    key_valid, last_logits = rep(key_valid), rep(last_logits)
    next_pos = rep(valid.sum(-1).astype(jnp.int32) + rope_deltas)                          # [B*G]
    rows = b * g
    pad = jnp.int32(model.config.pad_token_id)

    def cond(carry):
        step, done = carry[0], carry[3]
        return (step < t_new) & ~jnp.all(done)

    def body(carry):
        step, tokens, logprobs, done, cache, key_valid, logits, rng = carry
        rng, sub = jax.random.split(rng)
        tok = sample_tokens(logits, sub, temperature, top_k, top_p)
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tok[:, None], -1)[:, 0]
        alive = ~done
        tok = jnp.where(alive, tok, pad)
        tokens = tokens.at[:, step].set(tok)
        logprobs = logprobs.at[:, step].set(jnp.where(alive, lp, 0.0))
        done = done | jnp.isin(tok, eos_ids)
        # feed the new token: slot length + step, M-RoPE position next_pos + step on all three rows
        slot = length + step
        key_valid = key_valid.at[:, slot].set(True)
        pos = jnp.broadcast_to((next_pos + step)[None, :, None], (3, rows, 1))
        m = key_valid[:, None, None, :]
        hidden, cache = model.decode_hidden(model.embed(tok[:, None]), pos, m, cache, slot)
        logits = model.logits(hidden[:, 0]).astype(jnp.float32)
        return step + 1, tokens, logprobs, done, cache, key_valid, logits, rng

    carry = (jnp.int32(0), jnp.full((rows, t_new), pad, jnp.int32), jnp.zeros((rows, t_new), jnp.float32),
             jnp.zeros((rows,), bool), cache, key_valid, last_logits, rng)
    steps, tokens, logprobs, done, *_ = jax.lax.while_loop(cond, body, carry)
    # mask: 1 for every step the row was still alive at (includes the stop token itself)
    is_stop = jnp.isin(tokens, eos_ids) & (jnp.arange(t_new) < steps)
    stopped_before = jnp.cumsum(is_stop, axis=1) - is_stop
    mask = ((stopped_before == 0) & (jnp.arange(t_new) < steps)).astype(jnp.int32)
    return tokens, logprobs * mask, mask, ~done


_rollout_jit = jax.jit(_rollout, static_argnums=(0,),
                       static_argnames=("patch_segments", "num_samples", "max_new_tokens"))


def pad_to_bucket(input_ids: np.ndarray, attention_mask: np.ndarray, buckets: Sequence[int], pad_id: int,
                  truncate: bool = False, protected_ids: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad [B, L] prompts to the smallest bucket >= the longest prompt.

    A prompt longer than the largest bucket raises ValueError naming its row, length and the bucket, unless
    `truncate`: then its oldest tokens are dropped, but a cut that would remove any of `protected_ids`
    (image pad / vision start / vision end) raises instead.
    """
    lengths = np.asarray(attention_mask).sum(-1)
    largest = max(buckets)
    longest = int(lengths.max())
    if longest > largest and not truncate:
        row = int(lengths.argmax())
        raise ValueError(f"prompt {row} has {longest} tokens, longer than the largest prompt bucket {largest}; "
                         "add a bigger bucket or pass truncate=True")
    target = min([bk for bk in buckets if bk >= longest], default=largest)
    out_ids = np.full((len(input_ids), target), pad_id, np.int32)
    out_mask = np.zeros((len(input_ids), target), np.int32)
    for r, (ids, m) in enumerate(zip(np.asarray(input_ids), np.asarray(attention_mask))):
        tokens = ids[m.astype(bool)]
        cut = np.isin(tokens[:-target], protected_ids).sum() if len(tokens) > target else 0
        if cut:
            raise ValueError(f"prompt {r} has {len(tokens)} tokens, more than the largest prompt bucket {target}, "
                             f"and truncating it would remove {cut} image token(s)")
        tokens = tokens[-target:]
        out_ids[r, target - len(tokens):] = tokens
        out_mask[r, target - len(tokens):] = 1
    return out_ids, out_mask


def generate(model: Qwen2VL, input_ids, attention_mask, pixel_values=None, image_grid_thw=None, *,
             num_samples: int = 1, max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0,
             top_k: int = 0, eos_token_ids: Sequence[int] | None = None, rng: jax.Array | None = None,
             prompt_buckets: Sequence[int] | None = None, truncate: bool = False,
             mesh: jax.sharding.Mesh | None = None) -> Rollouts:
    """Sample `num_samples` completions per prompt.

    Args:
      model: the live policy (its current parameters are read; nothing is copied).
      input_ids, attention_mask: [B, L] left-padded prompts (numpy or jax).
      pixel_values, image_grid_thw: images of the batch in row-major order, as `preprocess_images` gives.
      temperature: 0 = greedy. top_k: 0 = off. top_p: 1 = off. All traced: changing them never recompiles.
      eos_token_ids: stop ids (default: the model config's).
      prompt_buckets: when given, prompts are re-padded to the smallest fitting bucket (see `pad_to_bucket`).
      mesh: when given, prompts are split over the mesh's (data, fsdp) axes (B must divide); parameters stay
        wherever they are (e.g. sharded by `load_pretrained(..., mesh=mesh)`).
    Returns:
      `Rollouts` with B * num_samples rows.
    """
    cfg = model.config
    input_ids = np.asarray(input_ids)
    attention_mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
    if prompt_buckets is not None:
        protected = (cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id)
        input_ids, attention_mask = pad_to_bucket(input_ids, attention_mask, prompt_buckets, cfg.pad_token_id,
                                                  truncate, protected)
    if num_samples < 1 or max_new_tokens < 1:
        raise ValueError(f"num_samples ({num_samples}) and max_new_tokens ({max_new_tokens}) must be >= 1")
    extra = prepare_inputs(cfg, input_ids, attention_mask, image_grid_thw)
    eos = np.asarray(tuple(eos_token_ids if eos_token_ids is not None else cfg.eos_token_ids), np.int32)
    rng = jax.random.key(0) if rng is None else rng
    graphdef, state = nnx.split(model)
    put = lambda a, dim=0: jnp.asarray(a) if mesh is None else shard_batch(mesh, jnp.asarray(a), dim)  # noqa: E731
    uniform = extra.patch_segments if isinstance(extra.patch_segments, int) else None
    segment_ids = None if uniform is not None or extra.patch_segments is None else jnp.asarray(extra.patch_segments)
    tokens, logprobs, mask, truncated = _rollout_jit(
        graphdef, state, put(input_ids), put(attention_mask), put(extra.position_ids, 1), put(extra.rope_deltas), None if pixel_values is None else jnp.asarray(pixel_values),
        None if extra.patch_pos is None else jnp.asarray(extra.patch_pos), segment_ids, rng,
        jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p), jnp.asarray(eos),
        patch_segments=uniform,
        num_samples=num_samples, max_new_tokens=max_new_tokens)
    prompt_index = jnp.repeat(jnp.arange(input_ids.shape[0], dtype=jnp.int32), num_samples)
    return Rollouts(tokens, logprobs, mask, truncated, prompt_index, mask.sum(-1))
