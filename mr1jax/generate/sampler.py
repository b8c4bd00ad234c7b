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
8 * 2048 * 28 KiB = 448 MiB per prompt. The cache is stacked over layers, (k, v) each
[layers, rows, slots, kv_heads, head_dim], and is carried through the decoder layers (the prefill's scan carry, the decode step's unrolled
loop over per-layer weight slices taken once per rollout): each layer writes only its new slots
(`dynamic_update_slice` at the layer index), never copying the cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mr1jax.models.qwen2_vl.model import Qwen2VL, attention_mask_4d, init_cache, prepare_inputs
from mr1jax.parallel.sharding import local_batch_devices, shard_batch

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


# Top-k / top-p look at the best TOP_CANDIDATES tokens of each row (`lax.top_k`) instead of sorting the
# whole vocabulary (a [rows, 151936] sort costs ~1 s per step on a 2-core CPU). When a row's nucleus
# needs more tokens than that (or top_k is larger), an exact bisection over threshold values runs instead.
TOP_CANDIDATES = 256
_BISECTION_STEPS = 40


def _largest_threshold(values: jax.Array, reaches) -> jax.Array:
    """Per row, the largest tau (to fp32 resolution) with reaches(values >= tau) True; [R, 1].

    `reaches(mask [R, V]) -> [R] bool` must be monotone: true for tau = row minimum.
    """
    finite = jnp.isfinite(values)
    lo = jnp.min(jnp.where(finite, values, jnp.inf), -1, keepdims=True)
    hi = jnp.max(values, -1, keepdims=True)

    def step(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) / 2
        ok = reaches(values >= mid)[:, None]
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, hi = jax.lax.fori_loop(0, _BISECTION_STEPS, step, (lo, hi))
    return jnp.where(reaches(values >= hi)[:, None], hi, lo)


def _bisection_threshold(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Exact top-k then top-p threshold [R, 1] over the full vocabulary without sorting."""
    vocab = scaled.shape[-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    tau_k = _largest_threshold(scaled, lambda m: m.sum(-1) >= k)
    in_k = jnp.where(scaled >= tau_k, scaled, -jnp.inf)
    probs = jax.nn.softmax(in_k, axis=-1)
    # keep the smallest top set whose mass reaches top_p: the largest tau whose set {>= tau} has mass >= top_p
    tau_p = _largest_threshold(in_k, lambda m: jnp.sum(jnp.where(m, probs, 0.0), -1) >= jnp.minimum(top_p, 1.0))
    return jnp.maximum(tau_k, tau_p)


def _nucleus_threshold(sorted_desc: jax.Array, log_norm: jax.Array, top_k: jax.Array, top_p: jax.Array
                       ) -> tuple[jax.Array, jax.Array]:
    """Smallest kept scaled logit per row from its best C values (descending) [R, C].

    log_norm [R, 1] normalises the distribution the nucleus is measured in. Returns (threshold [R, 1],
    covered [R]): covered is False where the top-k / top-p set may extend past the C values given.
    """
    c = sorted_desc.shape[-1]
    rank = jnp.arange(c)
    k = jnp.where(top_k > 0, top_k, c)
    s = jnp.where(rank < k, sorted_desc, -jnp.inf)
    probs = jnp.exp(s - log_norm)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = ((mass_before < top_p) | (rank == 0)) & (rank < k)
    threshold = jnp.min(jnp.where(keep, s, jnp.inf), axis=-1, keepdims=True)
    covered = ((top_k > 0) & (top_k <= c)) | (probs.sum(-1) >= top_p)
    return threshold, covered


def filter_logits(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Temperature-scaled logits with everything outside the top-k / top-p (nucleus) set at -inf.

    Args:
      logits: [R, V]; temperature > 0; top_k: int, 0 = off; top_p: float in (0, 1], 1 = off.
    The top-p set is the smallest prefix of tokens (by probability, after top-k and renormalisation) whose
    mass reaches top_p; ties at the boundary are kept. Exact up to fp32 rounding of the cumulative mass.
    """
    scaled = logits.astype(jnp.float32) / temperature
    vocab = scaled.shape[-1]
    cand = min(TOP_CANDIDATES, vocab)
    best = jax.lax.top_k(scaled, cand)[0]                                                  # [R, C]
    k_in_cand = (top_k > 0) & (top_k <= cand)
    masked_best = jnp.where(jnp.arange(cand) < jnp.where(top_k > 0, top_k, cand), best, -jnp.inf)
    log_norm = jnp.where(k_in_cand, jax.nn.logsumexp(masked_best, -1, keepdims=True),
                         jax.nn.logsumexp(scaled, -1, keepdims=True))
    threshold, covered = _nucleus_threshold(best, log_norm, top_k, top_p)

    def exact(_):
        return _bisection_threshold(scaled, top_k, top_p)

    threshold = jax.lax.cond(jnp.all(covered), lambda _: threshold, exact, None)
    return jnp.where(scaled >= threshold, scaled, -jnp.inf)


CDF_BLOCK = 256


def inverse_cdf_sample(weights: jax.Array, u: jax.Array, block: int = CDF_BLOCK) -> jax.Array:
    """Index drawn with probability proportional to `weights` [R, V] (>= 0) for uniforms u [R, 1] in (0, 1].

    Two-level inversion: block sums and their (short) cumulative sum pick a block, then a cumulative sum over
    that block's `block` weights picks the token. A cumulative sum over a 151,936-entry vocabulary is slow
    on XLA:CPU (~80 ms for 32 rows); this takes ~10 ms. Zero-weight entries are never returned.
    """
    rows, vocab = weights.shape
    w = jnp.pad(weights, ((0, 0), (0, (-vocab) % block))).reshape(rows, -1, block)
    block_sums = w.sum(-1)                                                                 # [R, NB]
    block_cdf = jnp.cumsum(block_sums, -1)
    target = u * block_cdf[:, -1:]
    b = jnp.minimum(jnp.sum(block_cdf < target, -1), block_sums.shape[1] - 1)              # [R]
    before = (jnp.take_along_axis(block_cdf, b[:, None], -1) - jnp.take_along_axis(block_sums, b[:, None], -1))
    inner = jnp.take_along_axis(w, b[:, None, None], 1)[:, 0]                               # [R, block]
    j = jnp.sum(before + jnp.cumsum(inner, -1) < target, -1)
    last_nonzero = block - 1 - jnp.argmax((inner > 0)[:, ::-1], -1)                         # rounding guard
    return (b * block + jnp.minimum(j, last_nonzero)).astype(jnp.int32)


def sample_tokens(logits: jax.Array, rng: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """Draw one token per row of logits [R, V]; temperature == 0 means greedy (argmax).

    Sampling inverts the CDF with one uniform per row (`inverse_cdf_sample`; cheaper than Gumbel noise over
    the whole vocabulary);
    top-k / top-p filtering runs only when one of them is on. Both choices are runtime branches.
    """
    logits = logits.astype(jnp.float32)

    def draw(_):
        t = jnp.where(temperature > 0, temperature, 1.0)
        filtered = jax.lax.cond((top_k > 0) | (top_p < 1.0), filter_logits, lambda lg, t, k, p: lg / t,
                                logits, t, top_k, top_p)
        u = 1.0 - jax.random.uniform(rng, (logits.shape[0], 1))                            # in (0, 1]
        return inverse_cdf_sample(jnp.exp(filtered - jnp.max(filtered, -1, keepdims=True)), u)

    return jax.lax.cond(temperature > 0, draw, lambda _: jnp.argmax(logits, axis=-1).astype(jnp.int32), None)


def _rollout(graphdef, state, input_ids, attention_mask, position_ids, rope_deltas, pixel_values, patch_pos,
             segment_ids, rng, temperature, top_k, top_p, eos_ids, suppress_ids, *, patch_segments, num_samples,
             max_new_tokens, patch_block=None):
    _TRACE_COUNT[0] += 1
    # Cast floating parameters to the compute dtype once (e.g. fp32 master weights, bf16 compute): the
    # decode loop then reads the compute-dtype copy every token instead of re-casting fp32 weights.
    dtype = nnx.merge(graphdef, state).dtype
    state = jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, state)
    model: Qwen2VL = nnx.merge(graphdef, state)
    cfg = model.config.text
    b, length = input_ids.shape
    g, t_new = num_samples, max_new_tokens
    size = length + t_new

    # ---- prefill once per prompt
    segments = patch_segments if patch_segments is not None else segment_ids
    feats = None if pixel_values is None else model.image_features(pixel_values, patch_pos, segments, patch_block)
    per_row = None if patch_block is None else patch_block // model.config.vision.spatial_merge_size**2
    x = model.embed(input_ids, feats, per_row)
    valid = attention_mask.astype(bool)
    key_valid = jnp.concatenate([valid, jnp.zeros((b, t_new), bool)], axis=1)
    slots = jnp.arange(size)
    q_slots = jnp.broadcast_to(slots[:length], (b, length))
    mask = attention_mask_4d(valid, key_valid, q_slots, jnp.broadcast_to(slots, (b, size)))
    cache = init_cache(cfg, b, size, model.dtype)                                          # [layers, B, S, ...]
    hidden, cache = model.decode_hidden(x, position_ids, mask, cache, 0)
    last_logits = model.logits(hidden[:, -1]).astype(jnp.float32)                         # [B, V]

    # ---- share the prefill across the G samples of each prompt
    rep = lambda a: jnp.repeat(a, g, axis=0)  # noqa: E731
    cache = tuple(jnp.repeat(c, g, axis=1) for c in cache)
    key_valid, last_logits = rep(key_valid), rep(last_logits)
    next_pos = rep(valid.sum(-1).astype(jnp.int32) + rope_deltas)                          # [B*G]
    # Decode runs the layers from per-layer weight slices taken once here: a scan would slice (on XLA:CPU,
    # copy) every layer's weights out of the stacked arrays on every token.
    layers = model.decode_layers()
    rows = b * g
    pad = jnp.int32(model.config.pad_token_id)

    def cond(carry):
        step, done = carry[0], carry[3]
        return (step < t_new) & ~jnp.all(done)

    def body(carry):
        step, tokens, logprobs, done, cache, key_valid, logits, rng = carry
        rng, sub = jax.random.split(rng)
        banned = jnp.zeros((logits.shape[-1],), bool).at[suppress_ids].set(True)
        tok = sample_tokens(jnp.where(banned, -jnp.inf, logits), sub, temperature, top_k, top_p)
        lp = jnp.take_along_axis(logits, tok[:, None], -1)[:, 0] - jax.nn.logsumexp(logits, -1)
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
        hidden, cache = model.decode_hidden(model.embed(tok[:, None]), pos, m, cache, slot, layers)
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
                       static_argnames=("patch_segments", "num_samples", "max_new_tokens", "patch_block"))


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


def _image_placer(mesh, uniform: int | None, put, padded: bool = False):
    """How the sampler places pixel values / patch positions: split over the batch devices with their prompts when
    every image has one size and the split is even, or in the per-prompt padded layout (`padded`: every prompt
    has a block of P patches) - necessary with several processes, which hold different images; else whole on
    every device (per-image segment ids index the whole batch)."""
    n = 1 if mesh is None else local_batch_devices(mesh)

    def place(a):
        split = mesh is not None and (padded or (uniform is not None and uniform % n == 0))
        if jax.process_count() > 1 and not split:
            raise ValueError("with several processes every prompt's images must have one size and each process "
                             "the same number of them (config.data.image_size), or be padded per prompt "
                             "(native resolution: patches_per_prompt)")
        return put(a) if split else jnp.asarray(a)

    return place


def generate(model: Qwen2VL, input_ids, attention_mask, pixel_values=None, image_grid_thw=None, *,
             num_samples: int = 1, max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0,
             top_k: int = 0, eos_token_ids: Sequence[int] | None = None, rng: jax.Array | None = None,
             prompt_buckets: Sequence[int] | None = None, truncate: bool = False,
             mesh: jax.sharding.Mesh | None = None, suppress_token_ids: Sequence[int] | None = None,
             patches_per_prompt: int | None = None) -> Rollouts:
    """Sample `num_samples` completions per prompt.

    Args:
      model: the live policy (its current parameters are read; nothing is copied).
      input_ids, attention_mask: [B, L] left-padded prompts (numpy or jax); with several processes, this
        process's prompts (the rollouts are then global arrays over every process's prompts, in process order:
        `mr1jax.parallel.distributed.local_rows` gives back this process's rows).
      pixel_values, image_grid_thw: images of the batch in row-major order, as `preprocess_images` gives; with
        `patches_per_prompt` P, pixel_values is the per-prompt padded layout [B * P, patch_dim]
        (`mr1jax.data.vision.pad_pixel_values`: images of any size, 0 or more per prompt; one compile per P).
      temperature: 0 = greedy. top_k: 0 = off. top_p: 1 = off. All traced: changing them never recompiles.
      eos_token_ids: stop ids (default: the model config's).
      prompt_buckets: when given, prompts are re-padded to the smallest fitting bucket (see `pad_to_bucket`).
      suppress_token_ids: ids never sampled (default: the image and video pad tokens, which would break the
        training forward over prompt + completion). Log-probabilities stay those of the unmodified model.
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
    extra = prepare_inputs(cfg, input_ids, attention_mask, image_grid_thw, patches_per_row=patches_per_prompt)
    if patches_per_prompt is not None and pixel_values is None:
        raise ValueError("patches_per_prompt needs pixel_values in the per-prompt padded layout")
    eos = np.asarray(tuple(eos_token_ids if eos_token_ids is not None else cfg.eos_token_ids), np.int32)
    suppress = np.asarray(tuple(suppress_token_ids if suppress_token_ids is not None
                                else (cfg.image_token_id, cfg.video_token_id)), np.int32)
    rng = jax.random.key(0) if rng is None else rng
    graphdef, state = nnx.split(model)
    put = lambda a, dim=0: jnp.asarray(a) if mesh is None else shard_batch(mesh, np.asarray(a), dim)  # noqa: E731
    uniform = extra.patch_segments if isinstance(extra.patch_segments, int) else None
    padded = extra.patch_block is not None
    put_images = _image_placer(mesh, uniform, put, padded)
    segment_ids = None if uniform is not None or extra.patch_segments is None else \
        (put_images(extra.patch_segments) if padded else jnp.asarray(extra.patch_segments))
    if uniform is not None:
        uniform *= jax.process_count()           # every process holds as many images (same-size batches)
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():   # rows pinned to the batch axes
        tokens, logprobs, mask, truncated = _rollout_jit(
            graphdef, state, put(input_ids), put(attention_mask), put(extra.position_ids, 1), put(extra.rope_deltas),
            None if pixel_values is None else put_images(pixel_values),
            None if extra.patch_pos is None else put_images(extra.patch_pos), segment_ids, rng,
            jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p), jnp.asarray(eos),
            jnp.asarray(suppress),
            patch_segments=uniform, patch_block=extra.patch_block,
            num_samples=num_samples, max_new_tokens=max_new_tokens)
    prompt_index = jnp.repeat(jnp.arange(tokens.shape[0] // num_samples, dtype=jnp.int32), num_samples)
    return Rollouts(tokens, logprobs, mask, truncated, prompt_index, mask.sum(-1))
