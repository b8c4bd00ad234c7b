"""Qwen2-VL vision tower: patch embedding, ViT blocks with 2-D rotary, per-image attention, patch merger."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mr1jax.models.qwen2_vl.config import VisionConfig
from mr1jax.parallel.sharding import constrain_batch
from mr1jax.models.qwen2_vl import layers as nn
from mr1jax.models.qwen2_vl.layers import Dense, LayerNorm
from mr1jax.models.qwen2_vl.rope import apply_rotary, vision_cos_sin


def segment_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments) -> jax.Array:
    """Full attention within segments; q, k, v [N, heads, D] -> [N, heads, D]. `segments` is one of:

    - a static int S: S equal contiguous segments (every image one size): batched, no mask;
    - a tuple (P, ids [N]): contiguous blocks of P patches (the per-prompt padded layout), and within a block
      the patches of equal id (one image, or the padding): batched over blocks, a [P, P] mask per block;
    - ids [N]: equal ids attend each other (a dense [N, N] mask).
    """
    n, h, d = q.shape
    if isinstance(segments, int):
        shape = (segments, n // segments, h, d)
        return jax.nn.dot_product_attention(q.reshape(shape), k.reshape(shape), v.reshape(shape)).reshape(n, h, d)
    if isinstance(segments, tuple):
        block, ids = segments
        shape = (n // block, block, h, d)
        ids = ids.reshape(n // block, block)
        mask = (ids[:, :, None] == ids[:, None, :])[:, None]                       # [blocks, 1, P, P]
        out = jax.nn.dot_product_attention(q.reshape(shape), k.reshape(shape), v.reshape(shape), mask=mask)
        return out.reshape(n, h, d)
    mask = (segments[:, None] == segments[None, :])[None, None]                   # [1, 1, N, N]
    return jax.nn.dot_product_attention(q[None], k[None], v[None], mask=mask)[0]


def quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        e = cfg.embed_dim
        self.qkv = Dense(e, 3 * e, axes=("vision_embed", "vision_heads"), use_bias=True, rngs=rngs,
                         dtype=dtype, param_dtype=param_dtype)
        self.proj = Dense(e, e, axes=("vision_heads", "vision_embed"), use_bias=True, rngs=rngs,
                          dtype=dtype, param_dtype=param_dtype)
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim

    def heads(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [N, E] -> rotated q, k and v, each [N, heads, head_dim]."""
        n = x.shape[0]
        qkv = self.qkv(x).reshape(n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segments) -> jax.Array:
        """x [N, E]; cos/sin [N, head_dim]; segments: see `segment_attention`."""
        q, k, v = self.heads(x, cos, sin)
        return self.proj(segment_attention(q, k, v, segments).reshape(x.shape[0], -1))


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        e = cfg.embed_dim
        self.norm1 = LayerNorm(e, eps=cfg.layer_norm_eps, param_dtype=param_dtype)
        self.norm2 = LayerNorm(e, eps=cfg.layer_norm_eps, param_dtype=param_dtype)
        self.attn = VisionAttention(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.fc1 = Dense(e, cfg.mlp_dim, axes=("vision_embed", "vision_mlp"), use_bias=True, rngs=rngs,
                         dtype=dtype, param_dtype=param_dtype)
        self.fc2 = Dense(cfg.mlp_dim, e, axes=("vision_mlp", "vision_embed"), use_bias=True, rngs=rngs,
                         dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x, cos, sin, segments):
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.fc2(quick_gelu(self.fc1(self.norm2(x))))


class PatchMerger(nnx.Module):
    """Norm (`norm`: LayerNorm for Qwen2-VL, RMSNorm for Qwen2.5-VL), then each 2x2 block of neighbouring
    patches (4*E) -> MLP (exact GELU) -> text hidden size."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype, param_dtype, norm=LayerNorm):
        e, m = cfg.embed_dim, cfg.embed_dim * cfg.spatial_merge_size**2
        self.ln_q = norm(e, eps=cfg.layer_norm_eps, param_dtype=param_dtype)
        self.fc1 = Dense(m, m, axes=("vision_merge", "vision_mlp"), use_bias=True, rngs=rngs, dtype=dtype,
                         param_dtype=param_dtype)
        self.fc2 = Dense(m, cfg.out_hidden_size, axes=("vision_mlp", "embed"), use_bias=True, rngs=rngs,
                         dtype=dtype, param_dtype=param_dtype)
        self.merged_dim = m

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.ln_q(x).reshape(-1, self.merged_dim)
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class VisionTower(nnx.Module):
    """pixel_values [N, C*T*P*P] -> image features [N / merge^2, text hidden].

    `blocks` is one `VisionBlock` with every parameter stacked along a leading axis of size depth, run with
    `layers.scan`; `remat` ("none" / "full" / "dots") is read at trace time.
    """

    block_class = VisionBlock     # Qwen2.5-VL swaps these two (`mr1jax.models.qwen2_5_vl.vision`)
    merger_norm = LayerNorm

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 remat: str = "none"):
        self.cfg = cfg
        self.patch_embed = Dense(cfg.patch_dim, cfg.embed_dim, axes=("patch", "vision_embed"), use_bias=False,
                                 rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        block = self.block_class
        self.blocks = nn.stacked(lambda r: block(cfg, rngs=r, dtype=dtype, param_dtype=param_dtype), cfg.depth, rngs)
        self.merger = PatchMerger(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype, norm=self.merger_norm)
        self.dtype = dtype
        self.remat = nn.check_remat(remat)

    def __call__(self, pixel_values: jax.Array, patch_pos: jax.Array, segments: jax.Array | int,
                 block: int | None = None) -> jax.Array:
        """
        Args:
          pixel_values: [N, patch_dim] float, patches in 2x2-block-major order (see `mr1jax.data.vision`).
          patch_pos: [N, 2] int (h, w) patch coordinates (`rope.vision_position_ids`).
          segments: [N] int attention segment per patch (`rope.vision_segment_ids`), or a static Python int:
            the number of equal-size segments (all images share one grid; no mask is built).
          block: static P of the per-prompt padded layout (`rope.padded_patch_layout`): attention stays within
            each prompt's block of P patches and, inside it, within a segment; `segments` numbers them per row.
        Returns:
          [N / merge^2, out_hidden_size] in the compute dtype.
        """
        if block is not None:
            segments = (block, segments)
        cos, sin = vision_cos_sin(patch_pos, self.cfg.head_dim, self.cfg.rope_theta)
        x = self.patch_embed(pixel_values.astype(self.dtype))
        x = nn.scan(self.blocks, lambda block, x, _: constrain_batch(block(constrain_batch(x), cos, sin, segments)),
                    x, remat=self.remat)
        return self.merger(x)
