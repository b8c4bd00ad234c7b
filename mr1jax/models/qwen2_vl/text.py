"""Qwen2 text decoder with multimodal rotary embeddings and an optional KV cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mr1jax.models.qwen2_vl.config import TextConfig
from mr1jax.models.qwen2_vl.layers import Dense, Embed, RMSNorm
from mr1jax.models.qwen2_vl.rope import apply_rotary

# One layer's cache: (keys, values), each [B, S, kv_heads, head_dim] in the model dtype.
LayerCache = tuple[jax.Array, jax.Array]


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
                 cache: LayerCache | None = None, cache_index: jax.Array | int = 0
                 ) -> tuple[jax.Array, LayerCache | None]:
        """
        Args:
          x: [B, T, hidden]; cos/sin: [B, T, head_dim].
          mask: [B, 1, T, S] bool, True where query t may attend key s (S = T without a cache, else cache size).
          cache: optional (k, v) [B, S, kv_heads, head_dim]; this call's keys/values are written at
            positions [cache_index, cache_index + T) and attention reads the whole cache.
        Returns:
          [B, T, hidden] and the updated cache (None without one).
        """
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k_cache, v_cache = cache
            start = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), start)
            v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), start)
            cache = (k, v)
        out = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask)
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

    def __call__(self, x, cos, sin, mask, cache=None, cache_index=0):
        h, cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_index)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), cache


class TextDecoder(nnx.Module):
    """Embedding table, decoder layers and final norm (the LM head lives on `Qwen2VL`)."""

    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
                                for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
                 cache: list[LayerCache] | None = None, cache_index: jax.Array | int = 0
                 ) -> tuple[jax.Array, list[LayerCache] | None]:
        """x [B, T, hidden] input embeddings -> normed hidden states [B, T, hidden] (and the new cache)."""
        new_cache = [] if cache is not None else None
        for i, layer in enumerate(self.layers):
            x, layer_cache = layer(x, cos, sin, mask, None if cache is None else cache[i], cache_index)
            if new_cache is not None:
                new_cache.append(layer_cache)
        return self.norm(x), new_cache
