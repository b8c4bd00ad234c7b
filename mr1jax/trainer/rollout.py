"""One RL step's rollout: sample G completions per prompt, score them, build the update batch."""

from __future__ import annotations

import jax
import numpy as np

from mr1jax.parallel import distributed
from mr1jax.models.qwen2_vl import prepare_inputs
from mr1jax.models.qwen2_vl.model import images_per_row
from mr1jax.rl import reward_runner
from mr1jax.rl import rewards as rw
from mr1jax.rl.ptst import Stage
from mr1jax.generate.sampler import generate


def decode_completions(tokenizer, tokens: np.ndarray, mask: np.ndarray) -> list[str]:
    """Completion texts as they are scored: pad after the stop token, special tokens dropped."""
    return tokenizer.batch_decode(np.where(mask > 0, tokens, tokenizer.pad_token_id), skip_special_tokens=True)


def reward_parts(completions: list[str], answers: list[str], timeout_s: float) -> tuple[np.ndarray, np.ndarray, dict]:
    """(accuracy [N], format [N], runner stats): accuracy in worker processes with a deadline per sample.

    `rw.combine_rewards` (the `rw.REWARD_KINDS` table) turns them into the reward of ``config.rl.reward``.
    """
    acc, stats = reward_runner.score_batch(rw.accuracy_reward, completions, answers, timeout_s=timeout_s)
    fmt = np.array([rw.format_reward(t) for t in completions], np.float32)
    return acc, fmt, stats


def rollout_batch(model, tokenizer, batch, stage: Stage, c, rng, mesh=None) -> tuple[dict[str, np.ndarray], dict]:
    """Sample G completions per prompt (on `mesh`, prompts split over its batch axes), score them, and build
    the update batch (host numpy arrays; `mr1jax.trainer.state.put_batch` places them on the mesh).

    With several processes `batch` holds this process's prompts: the sampler runs over every process's prompts
    at once, and this process decodes and scores the completions of its own prompts only (a prompt's G samples
    stay on the process that owns the prompt). The advantages are computed on device from the global rewards
    (`mr1jax.trainer.state.jit_advantages`), so every process uses the same values; the logged statistics are over the
    global batch.

    Returns ({input_ids, attention_mask [R, L+T], position_ids [3, R, L+T], pixel_values, patch_pos,
    completion_mask [R, T], sampler_logps [R, T], rewards [R]}, info): R = this process's prompts x G with a
    prompt's samples contiguous; `sampler_logps` are the sampler's log-probs, kept to measure the
    sampler-trainer gap.
    """
    g = stage.num_samples
    per_prompt = getattr(batch, "patches_per_prompt", None)        # native resolution: padded per prompt
    ro = generate(model, batch.input_ids, batch.attention_mask, batch.pixel_values, batch.image_grid_thw,
                  num_samples=g, max_new_tokens=stage.max_new_tokens, temperature=c.rollout.temperature,
                  top_p=c.rollout.top_p, top_k=c.rollout.top_k, rng=rng, mesh=mesh, patches_per_prompt=per_prompt)
    tokens, mask = distributed.local_rows(ro.tokens), distributed.local_rows(ro.mask)
    texts = decode_completions(tokenizer, tokens, mask)
    answers = [str(a) for a in np.repeat(batch.answers, g)]
    acc, fmt, stats = reward_parts(texts, answers, c.rl.reward_timeout_s)
    rewards = rw.combine_rewards(c.rl.reward, acc, fmt, c.rl.alpha).astype(np.float32)
    full_ids = np.concatenate([np.repeat(batch.input_ids, g, 0), tokens], 1)
    full_mask = np.concatenate([np.repeat(batch.attention_mask, g, 0), mask], 1)
    cfg = model.config
    grid = np.asarray(batch.image_grid_thw, np.int64).reshape(-1, 3)
    starts = np.cumsum([0, *images_per_row(cfg, batch.input_ids, grid)])
    rows_grids = [grid[starts[i]:starts[i + 1]] for i in range(len(batch.input_ids))]   # a prompt's images
    positions = prepare_inputs(cfg, full_ids, full_mask,
                               np.concatenate([r for r in rows_grids for _ in range(g)] + [np.zeros((0, 3), np.int64)])
                               ).position_ids
    prompt_extra = prepare_inputs(cfg, batch.input_ids, batch.attention_mask, batch.image_grid_thw,
                                  patches_per_row=per_prompt)
    host_batch = dict(input_ids=full_ids.astype(np.int32), attention_mask=full_mask.astype(np.int32),
                      position_ids=positions.astype(np.int32), pixel_values=np.asarray(batch.pixel_values, np.float32),
                      patch_pos=prompt_extra.patch_pos.astype(np.int32), completion_mask=mask.astype(np.int32),
                      sampler_logps=distributed.local_rows(ro.logprobs).astype(np.float32), rewards=rewards)
    if per_prompt is not None:
        host_batch["patch_segments"] = prompt_extra.patch_segments.astype(np.int32)
    # Statistics of the global batch (a collective: every process takes part).
    per_row = distributed.gather(np.stack([rewards, acc, fmt, mask.sum(1),
                                           distributed.local_rows(ro.truncated)], 1).astype(np.float64))
    errors = distributed.gather(np.array([[stats.get("n_errors", 0), stats.get("n_timeouts", 0)]])).sum(0)
    info = dict(reward=float(per_row[:, 0].mean()), accuracy=float(per_row[:, 1].mean()),
                format_rate=float(per_row[:, 2].mean()), completion_len=float(per_row[:, 3].mean()),
                truncated_frac=float(per_row[:, 4].mean()), reward_errors=int(errors[0]),
                reward_timeouts=int(errors[1]), reward_std=float(per_row[:, 0].std()), sample=texts[0][:200])
    return host_batch, info


def select_groups(batch: dict[str, jax.Array], groups: np.ndarray, g: int, prompts: int) -> dict[str, jax.Array]:
    """The rows (and per-prompt images) of prompt groups `groups` from an update batch of `prompts` prompts."""
    rows = (groups[:, None] * g + np.arange(g)).reshape(-1)
    out = {}
    for k, v in batch.items():
        if k == "position_ids":
            out[k] = v[:, rows]
        elif k in ("pixel_values", "patch_pos", "patch_segments"):         # per-prompt blocks of patches
            out[k] = v.reshape(prompts, -1, *v.shape[1:])[groups].reshape(-1, *v.shape[1:])
        else:
            out[k] = v[rows]
    return out

