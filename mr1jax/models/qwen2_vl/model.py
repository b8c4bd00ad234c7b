"""Qwen2-VL: vision tower + Qwen2 decoder with M-RoPE + LM head, in Flax NNX.

Two ways to call it:

* ``model(input_ids, attention_mask, pixel_values, image_grid_thw)`` - eager/host convenience: computes the
  multimodal position ids and vision patch layout in numpy (as `transformers` does), checks that the number
  of image pad tokens matches the image features, then runs `Qwen2VL.forward`.
* ``model.forward(input_ids, attention_mask, position_ids, pixel_values, patch_pos, patch_segments)`` -
  array-only, for use under `jax.jit` (build its extra inputs once on the host with `prepare_inputs`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mr1jax.models.qwen2_vl import rope
from mr1jax.models.qwen2_vl.config import Qwen2VLConfig
from mr1jax.models.qwen2_vl.layers import REMAT_POLICIES, Dense, check_remat, unstack
from mr1jax.models.qwen2_vl.text import KVCache, TextDecoder, init_cache
from mr1jax.models.qwen2_vl.vision import VisionTower


__all__ = ["REMAT_POLICIES", "ImageTokenMismatchError", "ModelInputs", "Qwen2VL", "attention_mask_4d", "init_cache",
           "prepare_inputs", "set_attention_chunk", "set_remat"]


class ImageTokenMismatchError(ValueError):
    """The prompt's `<|image_pad|>` count differs from the number of image features."""


@dataclasses.dataclass(frozen=True)
class ModelInputs:
    """Host-computed extras for `Qwen2VL.forward`.

    position_ids:   [3, B, L] int32 M-RoPE rows (0 at padding).
    rope_deltas:    [B] int32; decode position of step k after n valid prompt tokens is n + k + delta.
    patch_pos:      [N, 2] int32 (h, w) per patch, or None without images.
    patch_segments: [N] int32 attention segment per patch, or a Python int (number of equal-size segments,
                    used when every image has the same grid: a static value, no N x N mask).
    patch_block:    None, or P of the per-prompt padded layout (`prepare_inputs(..., patches_per_row=P)`):
                    N = B * P, row b's patches in [b*P, (b+1)*P) followed by padding; `patch_segments` then
                    numbers the images within each row (padding: `rope.PAD_SEGMENT`) and vision attention
                    stays inside each row's block and segment.
    """

    position_ids: np.ndarray
    rope_deltas: np.ndarray
    patch_pos: np.ndarray | None = None
    patch_segments: np.ndarray | int | None = None
    patch_block: int | None = None
    features_per_row: int | None = None     # P / merge^2: image-feature slots per row of the padded layout


def images_per_row(config: Qwen2VLConfig, input_ids, image_grid_thw) -> np.ndarray:
    """[B] how many of the batch's images (grids in row-major order) each row holds, from its `<|image_pad|>`
    count. Raises `ImageTokenMismatchError` naming the row and both counts when a row's tokens do not add up to
    whole images."""
    merge = config.vision.spatial_merge_size
    tokens = (np.asarray(input_ids) == config.image_token_id).sum(1)
    per_image = np.asarray(image_grid_thw, np.int64).reshape(-1, 3).prod(-1) // merge**2
    counts, i = np.zeros(len(tokens), np.int64), 0
    for b, want in enumerate(tokens):
        got = 0
        while got < want and i < len(per_image):
            got += int(per_image[i])
            i += 1
            counts[b] += 1
        if got != want:
            raise ImageTokenMismatchError(
                f"Image features and image tokens do not match in row {b}: it holds {int(want)} <|image_pad|> "
                f"tokens but its image(s) give {got} features")
    return counts


def prepare_inputs(config: Qwen2VLConfig, input_ids, attention_mask=None, image_grid_thw=None,
                   patches_per_row: int | None = None) -> ModelInputs:
    """Position ids, rope deltas and vision patch layout for a batch (numpy, host side).

    patches_per_row: None (the images' patches concatenated), or P of the per-prompt padded layout (each row's
    patches padded to P; see `ModelInputs.patch_block`).

    Raises `ImageTokenMismatchError` when the number of `<|image_pad|>` tokens differs from what the image grids
    produce (t*h*w / merge^2 each), naming both numbers.
    """
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
    merge = config.vision.spatial_merge_size
    n_tokens = int((input_ids == config.image_token_id).sum())
    grid = None if image_grid_thw is None else np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
    n_features = 0 if grid is None else int((grid.prod(-1) // merge**2).sum())
    if n_tokens != n_features:
        raise ImageTokenMismatchError(
            f"Image features and image tokens do not match: the prompts hold {n_tokens} <|image_pad|> tokens "
            f"(id {config.image_token_id}) but the {0 if grid is None else len(grid)} image(s) give {n_features} "
            "features (t*h*w/merge^2 each); expand each image placeholder to its feature count")
    counts = images_per_row(config, input_ids, np.zeros((0, 3)) if grid is None else grid)   # names a bad row
    position_ids, deltas = rope.mrope_position_ids(input_ids, attention_mask, grid,
                                                   image_token_id=config.image_token_id, merge_size=merge)
    if patches_per_row is not None:
        if patches_per_row % merge**2:
            raise ValueError(f"patches_per_row = {patches_per_row} must be a multiple of {merge**2}")
        patch_pos, segments = rope.padded_patch_layout(np.zeros((0, 3)) if grid is None else grid, counts,
                                                       patches_per_row, merge)
        return ModelInputs(position_ids, deltas, patch_pos, segments, patches_per_row, patches_per_row // merge**2)
    if grid is None or len(grid) == 0:
        return ModelInputs(position_ids, deltas)
    patch_pos = rope.vision_position_ids(grid, merge)
    slice_sizes = np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0])
    segments = int(len(slice_sizes)) if np.all(slice_sizes == slice_sizes[0]) else rope.vision_segment_ids(grid)
    return ModelInputs(position_ids, deltas, patch_pos, segments)


def attention_mask_4d(query_valid: jax.Array, key_valid: jax.Array, query_pos: jax.Array,
                      key_pos: jax.Array) -> jax.Array:
    """Causal + padding mask [B, 1, T, S].

    A query attends keys that are valid and not in its future (by slot index). Padded queries also attend
    to themselves, so no row is fully masked (their outputs are ignored, but must not be NaN).
    """
    causal = key_pos[:, None, :] <= query_pos[:, :, None]                            # [B, T, S]
    allowed = causal & key_valid[:, None, :]
    own = (key_pos[:, None, :] == query_pos[:, :, None]) & ~query_valid[:, :, None]
    return (allowed | own)[:, None]


class Qwen2VL(nnx.Module):
    """Qwen2-VL for conditional generation.

    Attributes mirror the Hugging Face layout: `visual` (vision tower), `model` (text decoder), `lm_head`
    (None when embeddings are tied; the head then reads `model.embed_tokens`). The decoder layers
    (`model.layers`) and vision blocks (`visual.blocks`) are single modules whose parameters are stacked along
    a leading layer axis and run under `jax.lax.scan`.

    remat: rematerialisation of each scanned layer in the backward pass, one of `REMAT_POLICIES`: "none"
      (save everything), "full" (`jax.checkpoint`, nothing saved: recompute the layer), "dots" (save matmul
      outputs without batch dimensions, recompute the rest). Change it later with `set_remat`.
    """

    vision_class = VisionTower  # the one piece a model family swaps (Qwen2.5-VL: windowed attention)

    def __init__(self, config: Qwen2VLConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 remat: str = "none"):
        self.config = config
        self.dtype = dtype
        self.remat = check_remat(remat)
        self.visual = self.vision_class(config.vision, rngs=rngs, dtype=dtype, param_dtype=param_dtype, remat=remat)
        self.model = TextDecoder(config.text, rngs=rngs, dtype=dtype, param_dtype=param_dtype, remat=remat)
        self.lm_head = None if config.tie_word_embeddings else Dense(
            config.text.hidden_size, config.text.vocab_size, axes=("embed", "vocab"), use_bias=False, rngs=rngs,
            dtype=dtype, param_dtype=param_dtype)

    def set_remat(self, policy: str) -> None:
        """Switch the rematerialisation policy (read at trace time: the next jit trace uses it)."""
        self.remat = self.model.remat = self.visual.remat = check_remat(policy)

    # ------------------------------------------------------------------ pieces (used by the sampler)
    def image_features(self, pixel_values: jax.Array, patch_pos: jax.Array, patch_segments,
                       patch_block: int | None = None) -> jax.Array:
        """[N, patch_dim] pixels -> [N / merge^2, hidden] features (`patch_block`: see `ModelInputs`)."""
        return self.visual(pixel_values, patch_pos, patch_segments, patch_block)

    def embed(self, input_ids: jax.Array, image_features: jax.Array | None = None,
              features_per_row: int | None = None) -> jax.Array:
        """Token embeddings [B, L, hidden] with image features scattered into the `<|image_pad|>` positions: in
        row-major order over the whole batch, or, with `features_per_row` F (the per-prompt padded layout), row
        b's k-th image token takes feature b * F + k."""
        x = self.model.embed_tokens(input_ids)
        if image_features is None:
            return x
        is_image = input_ids == self.config.image_token_id
        if features_per_row is None:
            idx = (jnp.cumsum(is_image.reshape(-1)) - 1).reshape(input_ids.shape)
        else:
            rows = jnp.arange(input_ids.shape[0], dtype=jnp.int32)[:, None]
            idx = rows * features_per_row + jnp.cumsum(is_image, axis=1, dtype=jnp.int32) - 1
        idx = jnp.clip(idx, 0, image_features.shape[0] - 1)
        return jnp.where(is_image[..., None], image_features.astype(x.dtype)[idx], x)

    def logits(self, hidden: jax.Array, out_dtype=jnp.float32) -> jax.Array:
        """[..., hidden] -> [..., vocab] in `out_dtype`.

        The matmul runs on compute-dtype (e.g. bf16) inputs and accumulates in `out_dtype` (fp32 by default,
        `preferred_element_type`), so log-softmax and sampling see fp32 logits without an fp32 weight copy.
        `out_dtype=None` returns the compute dtype.
        """
        if self.lm_head is None:
            return self.model.embed_tokens.attend(hidden, out_dtype)
        return self.lm_head(hidden, out_dtype)

    def decode_hidden(self, embeds: jax.Array, position_ids: jax.Array, mask: jax.Array,
                      cache: KVCache | None = None, cache_index: jax.Array | int = 0, unstacked=None):
        """Run the decoder on embeddings [B, T, hidden] at M-RoPE positions [3, B, T] with mask [B,1,T,S].

        cache: optional stacked (k, v) [layers, B, S, kv_heads, head_dim] (`init_cache`), written at slots
        [cache_index, cache_index + T). Returns (hidden [B, T, hidden], updated cache or None).
        unstacked: optional per-layer modules (`decode_layers`) run as a Python loop instead of the scan.
        """
        t = self.config.text
        cos, sin = rope.mrope_cos_sin(position_ids, t.head_dim, t.rope_theta, t.mrope_section)
        return self.model(embeds, cos, sin, mask, cache, cache_index, unstacked)

    def decode_layers(self) -> list:
        """The decoder layers as per-layer modules (static slices of the stacked parameters), for
        `decode_hidden(..., unstacked=...)` in a decode loop: slice once, before the loop."""
        return unstack(self.model.layers)

    # ------------------------------------------------------------------ full forward
    def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array, position_ids: jax.Array,
                      image_features: jax.Array | None = None, features_per_row: int | None = None) -> jax.Array:
        """Final-norm hidden states [B, L, hidden] of full (causal, left-padded) sequences, no cache.

        image_features: [n_pad_tokens, hidden] already computed (e.g. once per prompt and repeated), or
        [B * features_per_row, hidden] in the per-prompt padded layout; or None.
        """
        x = self.embed(input_ids, image_features, features_per_row)
        valid = attention_mask.astype(bool)
        slots = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        hidden, _ = self.decode_hidden(x, position_ids, attention_mask_4d(valid, valid, slots, slots))
        return hidden

    def forward(self, input_ids: jax.Array, attention_mask: jax.Array, position_ids: jax.Array,
                pixel_values: jax.Array | None = None, patch_pos: jax.Array | None = None,
                patch_segments: jax.Array | int | None = None, patch_block: int | None = None) -> jax.Array:
        """Jittable forward pass.

        Args:
          input_ids: [B, L] int, left-padded.
          attention_mask: [B, L] (1 = token, 0 = padding).
          position_ids: [3, B, L] from `prepare_inputs`.
          pixel_values: [N, patch_dim] for all images of the batch in row-major order, or None.
          patch_pos, patch_segments: from `prepare_inputs` (patch_segments as a static int when uniform).
          patch_block: static P of the per-prompt padded layout (`ModelInputs.patch_block`), or None.
        Returns:
          logits [B, L, vocab] in float32 (bf16 matmul inputs, fp32 accumulation).
        """
        feats = None
        if pixel_values is not None:
            feats = self.image_features(pixel_values, patch_pos, patch_segments, patch_block)
        per_row = None if patch_block is None else patch_block // self.config.vision.spatial_merge_size**2
        return self.logits(self.hidden_states(input_ids, attention_mask, position_ids, feats, per_row))

    def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None) -> jax.Array:
        """Host convenience call: logits [B, L, vocab]. Not for use under `jax.jit` (see `forward`)."""
        if isinstance(input_ids, jax.core.Tracer) or isinstance(image_grid_thw, jax.core.Tracer):
            raise TypeError("Qwen2VL.__call__ computes position ids on the host; under jax.jit call "
                            "model.forward(...) with arrays from prepare_inputs(...) instead")
        input_ids = np.asarray(input_ids)
        if attention_mask is None:
            attention_mask = np.ones_like(input_ids)
        if (pixel_values is None) != (image_grid_thw is None):
            raise ValueError("pixel_values and image_grid_thw must be given together")
        extra = prepare_inputs(self.config, input_ids, attention_mask, image_grid_thw)
        if pixel_values is not None:
            n_patches = int(np.asarray(image_grid_thw).reshape(-1, 3).prod(-1).sum())
            if pixel_values.shape != (n_patches, self.config.vision.patch_dim):
                raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; image_grid_thw needs "
                                 f"({n_patches}, {self.config.vision.patch_dim})")
        return self.forward(jnp.asarray(input_ids), jnp.asarray(attention_mask), jnp.asarray(extra.position_ids),
                            None if pixel_values is None else jnp.asarray(pixel_values),
                            None if extra.patch_pos is None else jnp.asarray(extra.patch_pos),
                            extra.patch_segments if isinstance(extra.patch_segments, int | None)
                            else jnp.asarray(extra.patch_segments))


def set_attention_chunk(model: Qwen2VL, chunk: int) -> Qwen2VL:
    """Attend `chunk` queries at a time in full-sequence (training / scoring) passes of the text decoder
    (`text.chunked_attention`; 0 = all at once). Read at trace time; returns the model."""
    if not isinstance(chunk, int) or chunk < 0:
        raise ValueError(f"attention chunk must be an integer >= 0, got {chunk!r}")
    model.model.attention_chunk = chunk
    return model


def set_remat(model: Qwen2VL, policy: str) -> Qwen2VL:
    """Set `model`'s rematerialisation policy (one of `REMAT_POLICIES`) in place; returns the model."""
    model.set_remat(policy)
    return model
