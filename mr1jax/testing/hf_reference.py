"""Tiny `transformers` Qwen2-VL / Qwen2.5-VL reference models with every parameter randomised at a realistic scale.

Freshly initialised HF models give logits near +-0.2, which makes parity tests weak; here every matrix is
drawn with std 1/sqrt(fan_in), norm weights around 1, biases around 0.1, embeddings with std 0.5
(logits then span about +-30, as in the real 2B model).
Requires torch (the `test` extra).
"""

from __future__ import annotations

import numpy as np

from mr1jax.models.qwen2_vl.config import Qwen2VLConfig


_HF_CLASSES = {"qwen2_vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration"),
               "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration")}


def build_hf_model(cfg: Qwen2VLConfig, seed: int = 0):
    """A randomised `transformers.Qwen2VLForConditionalGeneration` (or the Qwen2.5-VL class, for a
    `Qwen25VLConfig`) in fp32 eval mode for `cfg`."""
    import torch
    import transformers

    config_cls, model_cls = (getattr(transformers, name) for name in _HF_CLASSES[cfg.model_type])
    hf_cfg = config_cls(**{k: v for k, v in cfg.to_hf_dict().items() if k != "architectures"})
    torch.manual_seed(seed)
    model = model_cls(hf_cfg).float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1:  # norm weights
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = int(np.prod(p.shape[1:]))
                scale = 4.0 if name.startswith("lm_head") else 1.0  # logits of +-20, as real models give
                p.copy_(scale * torch.randn(p.shape, generator=gen) / np.sqrt(fan_in))
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model


def hf_logits(model, input_ids, attention_mask, pixel_values=None, image_grid_thw=None,
              image_token_id: int | None = None) -> np.ndarray:
    """Reference logits [B, L, vocab] as float32 numpy."""
    import torch

    kwargs = dict(input_ids=torch.as_tensor(np.asarray(input_ids), dtype=torch.long),
                  attention_mask=torch.as_tensor(np.asarray(attention_mask), dtype=torch.long))
    if pixel_values is not None:
        kwargs["pixel_values"] = torch.as_tensor(np.asarray(pixel_values), dtype=torch.float32)
        kwargs["image_grid_thw"] = torch.as_tensor(np.asarray(image_grid_thw), dtype=torch.long)
        kwargs["mm_token_type_ids"] = (kwargs["input_ids"] == image_token_id).int()
    with torch.no_grad():
        return model(**kwargs).logits.float().numpy()


def make_batch(cfg: Qwen2VLConfig, rows: list[dict], seed: int = 0):
    """Left-padded multimodal batch.

    Each row dict: {"text": n_text_tokens, "images": [(t, h, w), ...]} (h, w in patches, even).
    Text tokens are random ids below every special id; each image becomes
    <vision_start> + t*h*w/4 pads + <vision_end> placed between text chunks.
    Returns input_ids [B, L], attention_mask [B, L], pixel_values [N, patch_dim] or None, image_grid_thw or None.
    """
    rng = np.random.default_rng(seed)
    low_special = min(cfg.pad_token_id, cfg.image_token_id, cfg.vision_start_token_id, *cfg.eos_token_ids)
    seqs, grids = [], []
    merge = cfg.vision.spatial_merge_size
    for row in rows:
        imgs = row.get("images", [])
        chunks = np.array_split(rng.integers(0, low_special, size=row["text"]), len(imgs) + 1)
        seq = list(chunks[0])
        for (t, h, w), chunk in zip(imgs, chunks[1:]):
            seq += [cfg.vision_start_token_id] + [cfg.image_token_id] * (t * h * w // merge**2)
            seq += [cfg.vision_end_token_id] + list(chunk)
            grids.append((t, h, w))
        seqs.append(seq)
    length = max(len(s) for s in seqs)
    input_ids = np.full((len(seqs), length), cfg.pad_token_id, np.int32)
    mask = np.zeros((len(seqs), length), np.int32)
    for i, s in enumerate(seqs):
        input_ids[i, length - len(s):] = s
        mask[i, length - len(s):] = 1
    if not grids:
        return input_ids, mask, None, None
    grid = np.array(grids, np.int64)
    pixel_values = rng.normal(size=(int(grid.prod(-1).sum()), cfg.vision.patch_dim)).astype(np.float32)
    return input_ids, mask, pixel_values, grid


def valid_max_diff(ours, reference: np.ndarray, attention_mask) -> float:
    """max |ours - reference| over the unpadded positions (attention_mask 1) of [B, L, ...] arrays."""
    return float(np.abs(np.asarray(ours) - reference)[np.asarray(attention_mask).astype(bool)].max())


def hf_rope_index(model, cfg: Qwen2VLConfig, input_ids, attention_mask, image_grid_thw):
    """transformers' (position_ids [3, B, L], rope_deltas [B]) as numpy, for `prepare_inputs` to equal."""
    import torch

    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
    pos, delta = model.model.get_rope_index(
        ids, mm_token_type_ids=(ids == cfg.image_token_id).int(), image_grid_thw=torch.as_tensor(image_grid_thw),
        attention_mask=torch.as_tensor(np.asarray(attention_mask)))
    return pos.numpy(), delta.numpy().reshape(-1)


def hf_greedy(model, cfg: Qwen2VLConfig, input_ids, attention_mask, pixel_values, image_grid_thw,
              max_new_tokens: int, eos_token_id: int) -> np.ndarray:
    """transformers' greedy `generate` continuation [B, <= max_new_tokens] (prompt removed)."""
    import torch

    t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.long)  # noqa: E731
    out = model.generate(input_ids=t(input_ids), attention_mask=t(attention_mask),
                         pixel_values=torch.as_tensor(pixel_values), image_grid_thw=t(image_grid_thw),
                         mm_token_type_ids=(t(input_ids) == cfg.image_token_id).int(), do_sample=False,
                         max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=cfg.pad_token_id)
    return out[:, np.asarray(input_ids).shape[1]:].numpy()
