"""Rotary position embeddings for Qwen2-VL.

Host side (numpy, run once per batch before the jitted call):
  * `mrope_position_ids` - the text decoder's three position rows (time, height, width) and the per-row
    rope delta the sampler needs at decode time, exactly as `transformers`' ``get_rope_index``.
  * `vision_position_ids` / `vision_segment_ids` - (h, w) patch coordinates in 2x2-block-major order
    and the attention segment (image, temporal slice) of each patch.

Device side (jnp, fp32):
  * `mrope_cos_sin` - cos/sin tables [B, L, head_dim] from the three position rows.
  * `vision_cos_sin` - cos/sin tables [N, head_dim] from patch coordinates.
  * `apply_rotary` - rotate-half rotary applied in fp32.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


# ---------------------------------------------------------------------------------------------- host side
def vision_position_ids(image_grid_thw: np.ndarray, merge_size: int) -> np.ndarray:
    """(h, w) coordinates of every patch, in the 2x2-block-major order of `pixel_values`.

    Args:
      image_grid_thw: [n_images, 3] int, (t, h, w) in patches.
    Returns:
      [N, 2] int32 with N = sum(t*h*w).
    """
    out = []
    for t, h, w in np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3):
        hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        shape = (h // merge_size, merge_size, w // merge_size, merge_size)
        hh = hh.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        ww = ww.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([hh, ww], axis=-1), (t, 1)))
    if not out:
        return np.zeros((0, 2), np.int32)
    return np.concatenate(out).astype(np.int32)


def vision_segment_ids(image_grid_thw: np.ndarray) -> np.ndarray:
    """Attention segment of every patch: one segment per (image, temporal slice). [N] int32."""
    grid = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
    sizes = np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0])
    return np.repeat(np.arange(len(sizes)), sizes).astype(np.int32)


#: Segment id of the padding patches in a per-prompt padded layout (`padded_patch_layout`); real segments are
#: numbered 0, 1, ... within each prompt.
PAD_SEGMENT = 2**30


def padded_patch_layout(image_grid_thw: np.ndarray, images_per_row: np.ndarray, patches_per_row: int,
                        merge_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(patch_pos [B*P, 2], segments [B*P]) of the per-prompt padded layout: row b's images' patches (in order)
    fill its block [b*P, (b+1)*P), then padding patches (position (0, 0), segment `PAD_SEGMENT`). Segment ids
    count the (image, temporal slice) pairs within each row from 0, so a row's ids do not depend on the other
    rows (nor on which process holds them).

    Args:
      image_grid_thw: [n_images, 3] (t, h, w) of every image, row by row.
      images_per_row: [B] how many of those images each row holds.
      patches_per_row: P, a multiple of merge_size**2, at least any row's patch count.
    """
    grid = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
    counts = np.asarray(images_per_row, dtype=np.int64)
    if counts.sum() != len(grid):
        raise ValueError(f"images_per_row sums to {int(counts.sum())} but there are {len(grid)} image grids")
    pos = np.zeros((len(counts) * patches_per_row, 2), np.int32)
    seg = np.full((len(counts) * patches_per_row,), PAD_SEGMENT, np.int32)
    start = 0
    for b, k in enumerate(counts):
        rows = grid[start:start + k]
        start += k
        n = int((rows[:, 0] * rows[:, 1] * rows[:, 2]).sum()) if k else 0
        if n > patches_per_row:
            raise ValueError(f"row {b} has {n} patches, more than the {patches_per_row} per row of the layout")
        if k:
            pos[b * patches_per_row:b * patches_per_row + n] = vision_position_ids(rows, merge_size)
            seg[b * patches_per_row:b * patches_per_row + n] = vision_segment_ids(rows)
    return pos, seg


def mrope_position_ids(
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None,
    image_grid_thw: np.ndarray | None,
    *,
    image_token_id: int,
    merge_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Multimodal (M-RoPE) position ids, as `transformers`' ``Qwen2VLModel.get_rope_index``.

    Text tokens advance all three rows together. A run of image pad tokens for an image of grid (t, h, w)
    gets a (t, h/m, w/m) meshgrid offset by the current position; afterwards the position advances by
    max(h, w)/m. Padded positions get 0.

    Args:
      input_ids: [B, L] int.
      attention_mask: [B, L] (1 = token, 0 = padding) or None.
      image_grid_thw: [n_images, 3] for the images in row-major order across the batch, or None.
    Returns:
      position_ids [3, B, L] int32 and rope_deltas [B] int32, where
      rope_delta = (max position + 1) - (number of valid tokens): at decode step k (0-based) after a prompt of
      n valid tokens, every row's new token sits at position n + k + rope_delta in all three rows.
    """
    input_ids = np.asarray(input_ids)
    b, length = input_ids.shape
    mask = np.ones_like(input_ids, dtype=bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    grids = iter(np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)) if image_grid_thw is not None else iter(())
    position_ids = np.zeros((3, b, length), np.int32)
    deltas = np.zeros((b,), np.int32)
    for row in range(b):
        ids = input_ids[row][mask[row]]
        is_image = ids == image_token_id
        pieces, pos, i = [], 0, 0
        while i < len(ids):
            j = i
            while j < len(ids) and is_image[j] == is_image[i]:
                j += 1
            if not is_image[i]:
                pieces.append(np.broadcast_to(np.arange(pos, pos + j - i), (3, j - i)))
                pos += j - i
            else:
                # A contiguous run of pad tokens may hold several images back to back.
                k = i
                while k < j:
                    t, h, w = next(grids)
                    gh, gw = h // merge_size, w // merge_size
                    tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
                    block = np.stack([tt, hh, ww]).reshape(3, -1) + pos
                    pieces.append(block)
                    pos += max(h, w) // merge_size
                    k += block.shape[1]
                if k != j:
                    raise ValueError(f"row {row}: image pad run of {j - i} tokens does not match the image grids")
            i = j
        if pieces:
            llm_positions = np.concatenate(pieces, axis=1)
            position_ids[:, row, mask[row]] = llm_positions
            deltas[row] = llm_positions.max() + 1 - len(ids)
    return position_ids, deltas


# ---------------------------------------------------------------------------------------------- device side
def rotate_half(x: jnp.ndarray) -> jnp.ndarray:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate `x` [..., T, heads, head_dim] by cos/sin [..., T, head_dim]; computed in fp32, cast back."""
    dtype = x.dtype
    xf = x.astype(jnp.float32)
    cos, sin = cos[..., None, :], sin[..., None, :]
    return (xf * cos + rotate_half(xf) * sin).astype(dtype)


def inverse_frequencies(dim: int, theta: float) -> np.ndarray:
    """[dim/2] float32 inverse frequencies theta^(-2i/dim), computed as torch does (fp32)."""
    return (1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))).astype(np.float32)


def mrope_cos_sin(position_ids: jnp.ndarray, head_dim: int, theta: float,
                  mrope_section: tuple[int, ...]) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos/sin tables for M-RoPE.

    Args:
      position_ids: [3, B, L] int (time, height, width rows).
    Returns:
      cos, sin: [B, L, head_dim] float32. Frequency chunk j of `mrope_section` reads position row j mod 3.
    """
    inv_freq = jnp.asarray(inverse_frequencies(head_dim, theta))                    # [hd/2]
    rows = np.repeat(np.arange(len(mrope_section)) % 3, mrope_section)              # [hd/2]
    pos = jnp.moveaxis(position_ids.astype(jnp.float32)[rows], 0, -1)              # [B, L, hd/2]
    freqs = pos * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def vision_cos_sin(patch_pos: jnp.ndarray, head_dim: int, theta: float) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos/sin tables for the vision tower's 2-D rotary.

    Args:
      patch_pos: [N, 2] int (h, w) patch coordinates.
    Returns:
      cos, sin: [N, head_dim] float32: the first half of each rotary half rotates with h, the second with w.
    """
    inv_freq = jnp.asarray(inverse_frequencies(head_dim // 2, theta))               # [hd/4]
    freqs = patch_pos.astype(jnp.float32)[:, :, None] * inv_freq                    # [N, 2, hd/4]
    freqs = freqs.reshape(freqs.shape[0], -1)                                       # [N, hd/2] = [h..., w...]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)
