"""Qwen2.5-VL vision tower: Qwen2-VL's patch embedding, attention and 2-D rotary, with RMSNorm, a SwiGLU MLP
and window attention.

Window attention with static shapes. Each patch's window is (attention segment, h // W, w // W), W the window
side in patches (8 for the real models), read from the patch coordinates the trainer already carries
(`patch_pos`), so no extra host input and no data-dependent shape reaches `jax.jit`:

1. the patches (and their rotary tables) are sorted on device by (segment, window row, window column,
   original index) - a static-shape `lexsort`; each window becomes a contiguous run of at most W*W patches
   and each segment (image / temporal slice) stays contiguous;
2. windowed blocks attend in fixed blocks of W*W sorted patches: each block's queries look at the keys of
   the previous, own and next block (a window of <= W*W contiguous patches lies within them) under a
   same-window mask. Cost 3*W*W per query instead of N;
3. full-attention blocks (`fullatt_block_indexes`) attend over the whole segment: batched without a mask
   when every segment has the same size (the static-int path), else under a segment mask;
4. after the last block the sort is undone, so the merger sees (and returns) the original patch order.

Attention is permutation-equivariant under these masks, so this equals transformers' reordering by window
index (which also regroups rotary tables and un-permutes the merger output) up to float rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mr1jax.models.qwen2_5_vl.config import Qwen25VisionConfig
from mr1jax.models.qwen2_vl import layers as nn
from mr1jax.models.qwen2_vl.layers import Dense, RMSNorm
from mr1jax.models.qwen2_vl.rope import vision_cos_sin
from mr1jax.models.qwen2_vl.vision import VisionAttention, VisionTower, segment_attention
from mr1jax.parallel.sharding import constrain_batch


class SwiGLU(nnx.Module):
    """down(silu(gate(x)) * up(x)); all three projections with bias (the Qwen2.5-VL vision MLP)."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(use_bias=True, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.gate_proj = Dense(dim, hidden, axes=("vision_embed", "vision_mlp"), **kw)
        self.up_proj = Dense(dim, hidden, axes=("vision_embed", "vision_mlp"), **kw)
        self.down_proj = Dense(hidden, dim, axes=("vision_mlp", "vision_embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class WindowBlock(nnx.Module):
    """Pre-RMSNorm ViT block; the attention pattern comes from the caller (`attend(q, k, v) -> out`)."""

    def __init__(self, cfg: Qwen25VisionConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        e = cfg.embed_dim
        self.norm1 = RMSNorm(e, eps=cfg.layer_norm_eps, param_dtype=param_dtype)
        self.norm2 = RMSNorm(e, eps=cfg.layer_norm_eps, param_dtype=param_dtype)
        self.attn = VisionAttention(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.mlp = SwiGLU(e, cfg.mlp_dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x, cos, sin, attend):
        q, k, v = self.attn.heads(self.norm1(x), cos, sin)
        x = x + self.attn.proj(attend(q, k, v).reshape(x.shape[0], -1))
        return x + self.mlp(self.norm2(x))


def local_window_attention(q: jax.Array, k: jax.Array, v: jax.Array, window_id: jax.Array, block: int) -> jax.Array:
    """Attention within windows that are contiguous runs of at most `block` positions.

    q, k, v [N, heads, D]; window_id [N] int, non-decreasing runs. Queries of block i (positions
    [i*block, (i+1)*block)) attend the keys of blocks i-1, i, i+1 that share their window id.
    """
    n, h, d = q.shape
    nb = -(-n // block)
    pad = nb * block - n
    ids = jnp.concatenate([window_id.astype(jnp.int32), -1 - jnp.arange(pad, dtype=jnp.int32)])  # pads: alone
    fill = jnp.iinfo(jnp.int32).min                                                 # matches no query

    def blocks(a, value):
        a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)).reshape(nb, block, *a.shape[1:])
        if nb == 1:
            return a
        a = jnp.pad(a, [(1, 1)] + [(0, 0)] * (a.ndim - 1), constant_values=value)
        return jnp.concatenate([a[:-2], a[1:-1], a[2:]], axis=1)                     # [nb, 3*block, ...]

    qb = jnp.pad(q, ((0, pad), (0, 0), (0, 0))).reshape(nb, block, h, d)
    kb, vb = blocks(k, 0), blocks(v, 0)
    ids_q = ids.reshape(nb, block)
    ids_k = ids_q if nb == 1 else jnp.concatenate(
        [jnp.pad(ids_q, ((1, 0), (0, 0)), constant_values=fill)[:-1], ids_q,
         jnp.pad(ids_q, ((0, 1), (0, 0)), constant_values=fill)[1:]], axis=1)
    mask = (ids_q[:, :, None] == ids_k[:, None, :])[:, None]                       # [nb, 1, block, keys]
    out = jax.nn.dot_product_attention(qb, kb, vb, mask=mask)
    return out.reshape(nb * block, h, d)[:n]


def window_order(patch_pos: jax.Array, segment_ids: jax.Array, window: int, blocks: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array]:
    """(order, window_id): the permutation sorting patches by (block, segment, window row, window column, index),
    and each sorted patch's window number (0, 1, ... in sorted order). `blocks` [N]: the row block of each patch
    in the per-prompt padded layout (segment ids restart in every block), or None. Static shapes."""
    n = patch_pos.shape[0]
    wh, ww = patch_pos[:, 0] // window, patch_pos[:, 1] // window
    blocks = jnp.zeros((n,), jnp.int32) if blocks is None else blocks
    order = jnp.lexsort((jnp.arange(n), ww, wh, segment_ids, blocks))
    keys = jnp.stack([blocks, segment_ids, wh, ww], axis=-1)[order]
    new = jnp.concatenate([jnp.ones((1,), bool), jnp.any(keys[1:] != keys[:-1], axis=-1)])
    return order, jnp.cumsum(new) - 1


class WindowVisionTower(VisionTower):
    """pixel_values [N, C*T*P*P] -> image features [N / merge^2, out_hidden_size], same call as Qwen2-VL's
    `VisionTower` (`patch_pos`, `segments`); blocks in `fullatt_block_indexes` attend over whole segments,
    the others within windows (module docstring)."""

    block_class = WindowBlock
    merger_norm = RMSNorm

    def __call__(self, pixel_values: jax.Array, patch_pos: jax.Array, segments: jax.Array | int,
                 block: int | None = None) -> jax.Array:
        cfg = self.cfg
        n = pixel_values.shape[0]
        seg_ids = (jnp.asarray(np.repeat(np.arange(segments), n // segments), jnp.int32)
                   if isinstance(segments, int) else segments)
        # per-prompt padded layout: the row block is the sort's leading key, so each block stays in place
        blocks = None if block is None else jnp.arange(n, dtype=jnp.int32) // block
        order, window_id = window_order(patch_pos, seg_ids, cfg.window_patches, blocks)
        cos, sin = vision_cos_sin(patch_pos[order], cfg.head_dim, cfg.rope_theta)
        x = self.patch_embed(pixel_values.astype(self.dtype))[order]
        full_segments = segments if isinstance(segments, int) else \
            seg_ids[order] if block is None else (block, seg_ids[order])
        is_full = jnp.asarray(np.isin(np.arange(cfg.depth), cfg.fullatt_block_indexes))
        block_len = cfg.window_patches**2

        def full(q, k, v):
            return segment_attention(q, k, v, full_segments)

        def windowed(q, k, v):
            return local_window_attention(q, k, v, window_id, block_len)

        def body(block, x, i):
            x = constrain_batch(x)
            out = jax.lax.cond(is_full[i], lambda: block(x, cos, sin, full), lambda: block(x, cos, sin, windowed))
            return constrain_batch(out)

        x = nn.scan(self.blocks, body, x, remat=self.remat)
        inverse = jnp.argsort(order)
        return self.merger(x[inverse])
