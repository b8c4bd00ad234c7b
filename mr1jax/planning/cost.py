"""Analytic model FLOPs of each training step (the formulas are in `mr1jax.plan`'s docstring)."""

from __future__ import annotations

from mr1jax.models import Qwen2VLConfig
from mr1jax.planning.programs import ParamCounts, Shapes


def _forward_flops(m: Qwen2VLConfig, n: ParamCounts, rows: int, seq: int, logit_positions: int, images: int,
                   patches: int) -> float:
    t, v = m.text, m.vision
    attn = 4 * t.num_layers * t.num_heads * t.head_dim
    full = len(getattr(v, "fullatt_block_indexes", range(v.depth)))    # Qwen2-VL: every block attends fully
    keys = full * patches + (v.depth - full) * min(patches, 3 * getattr(v, "window_patches", 0) ** 2)
    head = t.vocab_size * t.hidden_size
    return (2 * n.decoder * rows * seq + 2 * head * rows * logit_positions + attn * rows * seq ** 2
            + 2 * n.vision * images * patches + 4 * v.num_heads * v.head_dim * images * patches * keys)


def analytic_flops(step: str, m: Qwen2VLConfig, n: ParamCounts, s: Shapes, sft_seq: int = 0) -> float:
    """Whole-step FLOPs (all devices) by the formulas of the module docstring."""
    k = s.images_per_prompt
    if step == "grpo_update":
        p = s.minibatch_prompts
        return 3 * _forward_flops(m, n, p * s.num_samples, s.seq, s.max_new_tokens, p * k, s.patches)
    if step == "token_logprobs":
        return _forward_flops(m, n, s.rows, s.seq, s.max_new_tokens, s.prompts * k, s.patches)
    if step == "sft_update":
        return 3 * _forward_flops(m, n, s.prompts, sft_seq, sft_seq - 1, s.prompts * k, s.patches)
    if step == "rollout":
        t = m.text
        attn = 4 * t.num_layers * t.num_heads * t.head_dim
        head = t.vocab_size * t.hidden_size
        prefill = _forward_flops(m, n, s.prompts, s.prompt_len, 1, s.prompts * k, s.patches) \
            - attn * s.prompts * s.prompt_len ** 2 + attn * s.prompts * s.prompt_len * s.seq
        decode = s.max_new_tokens * s.rows * (2 * n.decoder + 2 * head + attn * s.seq)
        return prefill + decode
    raise ValueError(step)
