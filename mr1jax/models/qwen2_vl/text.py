"""Qwen2 text decoder with multimodal rotary embeddings and an optional KV cache.

The decoder layers are ONE `DecoderLayer` whose parameters are stacked along a leading layer axis
(logical name ``"layers"``), run with `layers.scan` (`jax.lax.scan`): compile time and program size do not
grow with depth. The KV cache is stacked the same way, [layers, B, S, kv_heads, head_dim], and travels in
the carry; each layer writes only its new positions into it (`dynamic_update_slice` at the layer index), so
a decode step never copies it. The sampler's decode loop instead runs per-layer weight slices taken once per
rollout (`unstacked`, `Qwen2VL.decode_layers`): inside a scan, XLA:CPU copies each layer's weight slice out
of the stacked arrays on every token (measured ~15-30% slower decode).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mr1jax.models.qwen2_vl.config import TextConfig
from mr1jax.parallel.sharding import constrain_batch
from mr1jax.models.qwen2_vl import layers as nn
from mr1jax.models.qwen2_vl.layers import Dense, Embed, RMSNorm
from mr1jax.models.qwen2_vl.rope import apply_rotary

# The KV cache of all layers: (keys, values), each [layers, B, S, kv_heads, head_dim] in the model dtype.
KVCache = tuple[jax.Array, jax.Array]
LayerCache = KVCache  # backwards-compatible name


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, chunk: int) -> jax.Array:
    """`jax.nn.dot_product_attention` computed `chunk` queries at a time, each block under `jax.checkpoint`.

    q [B, T, heads, D], k / v [B, S, kv_heads, D], mask [B, 1, T, S] -> [B, T, heads, D]. Only one block's
    scores [B, heads, chunk, S] exist at a time, in the forward and (recomputed) in the backward pass, instead
    of [B, heads, T, S]: what makes 8K-token completions fit. Equal to the unchunked attention up to rounding.
    """
    b, t, h, d = q.shape
    n = -(-t // chunk)
    pad = n * chunk - t
    qs = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, n, chunk, h, d).swapaxes(0, 1)
    ms = jnp.pad(mask, ((0, 0), (0, 0), (0, pad), (0, 0)), constant_values=True)   # padded queries: any keys
    ms = ms.reshape(b, 1, n, chunk, -1).transpose(2, 0, 1, 3, 4)                      # [n, B, 1, chunk, S]

    @jax.checkpoint
    def block(xs):
        qc, mc = xs
        return jax.nn.dot_product_attention(qc, k, v, mask=mc)

    out = jax.lax.map(block, (qs, ms))                                                # [n, B, chunk, heads, D]
    return out.swapaxes(0, 1).reshape(b, n * chunk, h, d)[:, :t]


def init_cache(cfg: TextConfig, batch: int, size: int, dtype) -> KVCache:
    """A zero KV cache of `size` slots for `batch` rows: (k, v) each [layers, batch, size, kv_heads, head_dim]."""
    shape = (cfg.num_layers, batch, size, cfg.num_kv_heads, cfg.head_dim)
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


class Attention(nnx.Module):
    """GQA self-attention: q/k/v with bias, o without; rotary on q and k (fp32)."""

    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        h, hd = cfg.hidden_size, cfg.head_dim
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q_proj = Dense(h, cfg.num_heads * hd, axes=("embed", "q_heads"), use_bias=True, **kw)
        self.k_proj = Dense(h, cfg.num_kv_heads * hd, axes=("embed", "kv_heads"), use_bias=True, **kw)
        self.v_proj = Dense(h, cfg.num_kv_heads * hd, axes=("embed", "kv_heads"), use_bias=True, **kw)
        self.o_proj = Dense(cfg.num_heads * hd, h, axes=("q_heads", "embed"), use_bias=False, **kw)
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
                 cache: KVCache | None = None, cache_index: jax.Array | int = 0, layer: jax.Array | int = 0,
                 q_chunk: int = 0) -> tuple[jax.Array, KVCache | None]:
        """
        Args:
          x: [B, T, hidden]; cos/sin: [B, T, head_dim].
          mask: [B, 1, T, S] bool, True where query t may attend key s (S = T without a cache, else cache size).
          cache: optional stacked (k, v) [layers, B, S, kv_heads, head_dim]; this call's keys/values are
            written into layer `layer` at positions [cache_index, cache_index + T) and attention reads that
            layer's whole cache.
          q_chunk: without a cache, attend this many queries at a time (`chunked_attention`); 0 = all at once.
        Returns:
          [B, T, hidden] and the updated cache (None without one).
        """
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k_all, v_all = cache
            zero = jnp.int32(0)
            start = (jnp.asarray(layer, jnp.int32), zero, jnp.asarray(cache_index, jnp.int32), zero, zero)
            k_all = jax.lax.dynamic_update_slice(k_all, k.astype(k_all.dtype)[None], start)
            v_all = jax.lax.dynamic_update_slice(v_all, v.astype(v_all.dtype)[None], start)
            k = jax.lax.dynamic_index_in_dim(k_all, layer, 0, keepdims=False)
            v = jax.lax.dynamic_index_in_dim(v_all, layer, 0, keepdims=False)
            cache = (k_all, v_all)
        k, v = k.astype(q.dtype), v.astype(q.dtype)
        if cache is None and 0 < q_chunk < t:
            out = chunked_attention(q, k, v, mask, q_chunk)
        else:
            out = jax.nn.dot_product_attention(q, k, v, mask=mask)
        return self.o_proj(out.reshape(b, t, -1)), cache


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, use_bias=False)
        self.gate_proj = Dense(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), **kw)
        self.up_proj = Dense(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), **kw)
        self.down_proj = Dense(cfg.intermediate_size, cfg.hidden_size, axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = Attention(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = MLP(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x, cos, sin, mask, cache=None, cache_index=0, layer=0, q_chunk=0):
        h, cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_index, layer, q_chunk)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), cache


class TextDecoder(nnx.Module):
    """Embedding table, decoder layers and final norm (the LM head lives on `Qwen2VL`).

    `layers` is one `DecoderLayer` with every parameter stacked along a leading axis of size num_layers;
    `remat` ("none" / "full" / "dots", see `layers.scan`) and `attention_chunk` (queries per attention block
    without a cache, 0 = unchunked; `chunked_attention`) are read at trace time.
    """

    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 remat: str = "none"):
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.layers = nn.stacked(lambda r: DecoderLayer(cfg, rngs=r, dtype=dtype, param_dtype=param_dtype),
                                 cfg.num_layers, rngs)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.remat = nn.check_remat(remat)
        self.attention_chunk = 0

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
                 cache: KVCache | None = None, cache_index: jax.Array | int = 0,
                 unstacked: Sequence[DecoderLayer] | None = None) -> tuple[jax.Array, KVCache | None]:
        """x [B, T, hidden] input embeddings -> normed hidden states [B, T, hidden] (and the new cache).

        cache: optional stacked (k, v) [layers, B, S, kv_heads, head_dim] (`init_cache`); this call's keys and
          values are written at slots [cache_index, cache_index + T).
        unstacked: optional ``layers.unstack(self.layers)`` (sliced once, outside a decode loop): run those
          per-layer modules as an unrolled Python loop instead of the scan. The sampler's decode step uses it,
          because a scan's per-layer dynamic weight slice is a copy on XLA:CPU; everything else scans.
        """
        def body(layer, carry, i):
            x, cache = carry
            x, cache = layer(constrain_batch(x), cos, sin, mask, cache, cache_index, i, self.attention_chunk)
            return constrain_batch(x), cache                  # rows stay split over (data, fsdp) under a mesh

        if unstacked is not None:
            for i, layer in enumerate(unstacked):
                x, cache = body(layer, (x, cache), i)
        else:
            x, cache = nn.scan(self.layers, body, (x, cache), remat=self.remat)
        return self.norm(x), cache
