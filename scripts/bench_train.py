#!/usr/bin/env python
"""Where a GRPO step's time goes, the GRPO update's MFU, its memory / speed under LM-head chunking and remat,
and SFT forward+backward and the SFT step against `transformers`.

Default mode (CPU; minutes: see BUILD.md for a measured run)::

    python scripts/bench_train.py [--prompts 2] [--num_samples 4] [--prompt_bucket 128] [--max_new_tokens 32]
                                  [--logit_chunk 128] [--remat none] [--repeats 3] [--sft_rows 2] [--sft_len 192]
                                  [--compare_memory [--rows 4] [--completion_len 512] [--compare_iters 3]]
    python scripts/bench_train.py --quick          # smoke test: tiny sizes, every part (~4 minutes)
    python scripts/bench_train.py --lora_rank 16   # part 5 only: LoRA vs full fine-tuning of the GRPO update

builds the benchmarks' ~116M-parameter Qwen2-VL (`mr1jax.testing.bench.bench_config`: real vocabulary 151936,
tied embeddings, text hidden 512 x 4 layers, vision width 512 x 4 blocks) as a randomised
`transformers.Qwen2VLForConditionalGeneration` and loads the same weights into mr1jax in fp32
(`mr1jax.testing.bench.build_reference_pair`). Every mr1jax step is the trainer's own: a `TrainState`
(`mr1jax.trainer.state.init_train_state`, fp32 master weights, reference copy in the compute dtype) on a one-device
(data, fsdp, tensor) mesh, and the explicitly sharded jitted steps of `mr1jax.trainer.state` (``jit_grpo_update``,
``jit_token_logprobs``, ``jit_sft_update``; params and opt_state donated) with the optimizer of
`mr1jax.trainer.config.make_optimizers` (clip + AdamW), configured from ``configs/grpo.py`` with the sizes below
(``--logit_chunk`` 128, ``--remat`` none and ``--attention_chunk`` 1024 are its defaults).
The benchmark owns a copy of the weights (donation consumes the state's buffers; the torch comparison keeps
the originals). It prints four parts:

1. **GRPO step split.** ``--prompts`` prompts, each one ``--image_size`` image (224: 256 patches -> 64 image
   tokens) plus text, left-padded to ``--prompt_bucket``; G = ``--num_samples`` completions of
   ``--max_new_tokens`` tokens each. One RL step is `mr1jax.trainer.step.rl_step`, as the training loop calls
   it, timed by its own phase clocks (median of ``--repeats`` warm steps; first step minus the warm median
   reported as compile):

   * rollout: `mr1jax.trainer.rollout.rollout_batch` -- `generate` at temperature 1, decoding, the reward worker
     processes, the host update batch (M-RoPE over prompt + completion, group advantages). The stop id is an
     embedding row the real tokenizer never emits (``--eos_id``), so every row decodes all new tokens and
     the work is fixed. There is no tokenizer for the 151,936-token vocabulary here, so decoding is a stub
     (`CoinFlipTokenizer`): every completion reads as a well-formed answer, right with probability 1/2, so
     rewards and advantages vary within groups as in training;
   * reference: `put_batch` + the jitted `token_logprobs` on the frozen reference copy;
   * update: the jitted `grpo_update` (``--micro_batches`` micro-batches, LM head ``--logit_chunk``
     positions at a time, remat ``--remat``) and reading its metrics.

   The randomised model's distributions are very peaked (logits of +-50), so sampled tokens have
   log-probabilities near 0 and the GRPO gradient is tiny: the arithmetic is the same as for a real model.

2. **Update MFU.** FLOPs of the update = 3 x forward FLOPs (backward ~ 2x forward), forward as below (XLA's
   own ``cost_analysis`` of the lowered update is printed next to it; it counts a scanned loop's body once, so
   it undercounts the scanned layers). MFU = FLOPs / median
   update seconds / this CPU's fp32 matmul peak, measured in the same run once per timing round (a jitted
   2048x2048 ``jnp.dot``, median of 10 calls), so the peak sees the same machine load as the update. Target
   (the issue): update MFU >= 40% of the measured matmul peak -> PASS / MISS. Unless ``--no_diagnose``, the
   update is then taken apart, each piece jitted and timed alone (median of ``--diag_iters``) with its CPU
   time, kernel time and minor page faults per call (``getrusage``): the donating update (chained calls, as
   the loop runs it), the loss forward, forward + backward without the optimizer, the optimizer alone
   (against a memory-bandwidth roofline), the LM head + log-softmax forward + backward, the three LM-head
   matmuls of that backward at their real shapes, and the embedding gather's backward (a scatter-add into a
   dense [vocab, hidden] gradient).

3. **Memory and speed of the update: LM-head chunking and remat** (``--compare_memory``). One GRPO update
   (KL on, one micro-batch) on ``--rows`` rows of ``--prompt_bucket`` prompt + ``--completion_len``
   completion tokens (synthetic completions of random tokens; G = ``--num_samples``), where the
   [rows, completion_len, vocab] fp32 logits matter (4 x 512 x 151,936 x 4 B = 1.24 GB). For each variant
   -- baseline (``logit_chunk`` 0, remat none), ``logit_chunk`` ``--compare_chunk``, remat full, remat dots,
   chunk + full -- the jitted `jit_grpo_update` is compiled and its per-device ``memory_analysis`` read
   (argument, output, aliased = donated, temporary bytes; total = args + out - alias + temp), then timed:
   median of ``--compare_iters`` warm calls in rounds over the variants (so a shared machine's load hits them
   alike), every call chained on the same state. Same run, same baseline.

4. **SFT vs torch**, same weights, same run: ``--sft_rows`` rows of ``--sft_len`` tokens (one image each;
   later rows up to 24 tokens shorter, left-padded, unless ``--no_ragged``). The loss is the mean next-token
   cross-entropy over every token whose predecessor is a real token (padding excluded). Two comparisons:

   * forward + backward: mr1jax ``jax.jit(jax.value_and_grad(sum / count of sft_loss_terms))`` (LM head
     ``--logit_chunk`` positions at a time) vs torch ``model(**inputs, labels=labels,
     use_cache=False).loss.backward()`` (gradients reset with ``zero_grad(set_to_none=True)`` inside the
     timing); both losses and global gradient norms are compared;
   * the optimizer step: mr1jax's `jit_sft_update` (forward + backward + clip + AdamW, donated) vs torch
     forward + backward + ``clip_grad_norm_`` + ``torch.optim.AdamW`` (same hyper-parameters).

   torch runs fp32 eager with ``torch.set_num_threads(os.cpu_count())``. Median ms of each (``--sft_iters``
   runs in ``--rounds`` alternating blocks after 2 warm-ups) and the speed-up torch/mr1jax (target for
   forward + backward: >= 1.5x).

Every part prints the CPU time other processes used while timing (this machine is shared); runs where
they used more than 10% of the cores are flagged. Before each timing round the script waits up to
``--wait_idle`` seconds (default 3) for a half-second window in which other processes use at most 10% of
the cores; the total waited is printed at the end.

FLOPs of one forward (a matmul [m, k] x [k, n] = 2*m*k*n; norms, rotary, softmax, activations, the
embedding gather and the optimizer are not counted; remat's recomputation is not counted either):

    text   = 2 * P_layers * R * S                   P_layers: all decoder-layer parameters; R rows of S tokens
           + 4 * n_layers * R * S^2 * n_heads * head_dim   QK^T and PV, full square (causal not discounted)
    head   = 2 * vocab * hidden * R * H             LM head (the tied embedding) on the H positions scored:
                                                    GRPO H = max_new_tokens, SFT H = S - 1
    vision = 2 * (P_patch_embed + P_blocks) * N     N patches: the vision tower runs once per *prompt*
           + 4 * depth * n_images * (N / n_images)^2 * embed_dim   per-image full attention
           + 2 * P_merger * N / merge^2             patch merger on merged tokens

    update (and SFT forward+backward) = 3 * forward

Measured tables: BUILD.md, "GRPO step and SFT".

Device mode (accelerator; random weights, no torch; not run on the CPU machine)::

    python scripts/bench_train.py --gpu_2b [--prompts 4] [--num_samples 8] [--prompt_bucket 512]
                                  [--max_new_tokens 256] [--image_size 448] [--micro_batches 4] [--peak_tflops 989]
                                  [--compare_memory]

builds the real Qwen2-VL-2B shape (`Qwen2VLConfig.qwen2_vl_2b_instruct()`, bf16 parameters and compute, random
weights) and runs parts 1-3 on it: the step split and the update MFU against ``--peak_tflops`` (989: H100
SXM dense bf16), next to the bf16 matmul throughput measured on the device (8192x8192 ``jnp.dot``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from configs.grpo import get_config  # noqa: E402
from mr1jax.parallel import sharding as shd  # noqa: E402
from mr1jax.trainer import state as st  # noqa: E402
from mr1jax.trainer.config import make_optimizer  # noqa: E402
from mr1jax.models.qwen2_vl.config import Qwen2VLConfig  # noqa: E402
from mr1jax.models.qwen2_vl.model import Qwen2VL, prepare_inputs, set_attention_chunk  # noqa: E402
from mr1jax.rl import group_advantages  # noqa: E402
from mr1jax.rl.losses import grpo_loss_terms, sequence_logprobs  # noqa: E402
from mr1jax.rl.ptst import Stage  # noqa: E402
from mr1jax.rl.update import GRPOConfig, SFTConfig, completion_logprobs, sft_loss_terms  # noqa: E402
from mr1jax.trainer.rollout import rollout_batch  # noqa: E402
from mr1jax.generate.sampler import pad_to_bucket  # noqa: E402
from mr1jax.testing.bench import (OtherLoad, bench_config, build_random_model, build_reference_pair,  # noqa: E402
                                  image_grid, machine_busy, measure_bandwidth, measure_matmul,
                                  param_counts, summarize_params, timed, torch_inputs)
from mr1jax.testing.hf_reference import make_batch  # noqa: E402
from mr1jax.trainer.config import make_optimizers  # noqa: E402
from mr1jax.trainer.step import StepFunctions, grpo_config, rl_step  # noqa: E402

TARGET_MFU = 0.40          # the issue: update MFU >= 40% of the measured matmul peak
TARGET_SFT_SPEEDUP = 1.5   # the issue: SFT forward+backward >= 1.5x torch eager
UNUSED_EOS_ID = 151935     # last embedding row: padding beyond the real tokenizer's 151,665 tokens
BETA = 0.04                # KL coefficient passed to the update (OThink-MR1's beta_min)
LR = 1e-6                  # learning rate of the benchmarked optimizers (constant; its value does not matter)
T_START = time.perf_counter()


# ------------------------------------------------------------------------------------------ helpers
def split_iters(iters: int, rounds: int) -> list[int]:
    rounds = max(1, min(rounds, iters))
    return [iters // rounds + (1 if r < iters % rounds else 0) for r in range(rounds)]


def wait_for_idle(max_s: float, n_cores: int, window_s: float = 0.5) -> float:
    """Sleep in `window_s` windows until one where other processes used at most `BUSY_FRACTION` of the cores
    (`OtherLoad`), for at most `max_s` seconds; returns the seconds waited. A shared machine's load comes in
    bursts: timing in its quiet windows keeps the numbers closer to an idle machine's."""
    t0 = time.perf_counter()
    if max_s <= 0 or not os.path.exists("/proc/stat"):
        return 0.0
    while time.perf_counter() - t0 < max_s:
        load = OtherLoad()
        load.start()
        time.sleep(window_s)
        load.stop()
        if load.cores is not None and not machine_busy(load.cores, n_cores):
            break
    return time.perf_counter() - t0


WAITED = [0.0]  # seconds spent in wait_for_idle, for the report


def settle(args, n_cores: int) -> None:
    WAITED[0] += wait_for_idle(args.wait_idle, n_cores)


def cpu_seconds() -> float:
    """CPU time (user + system, all threads) this process has used."""
    t = os.times()
    return t.user + t.system


_MATMUL: dict[tuple, Any] = {}


def matmul_peak(n: int = 2048, dtype: Any = jnp.float32, iters: int = 5) -> tuple[float, float]:
    """(FLOP/s by the wall clock, FLOP per process CPU-second) of a jitted n x n by n x n `jnp.dot`
    (2 * n^3 per call): median wall time of `iters` calls after one warm-up, and their total CPU time.
    Like `mr1jax.testing.bench.measure_matmul`, but keeps its inputs between calls and also reports CPU time
    (the second number is what a shared machine's load affects least)."""
    key = (n, jnp.dtype(dtype).name)
    if key not in _MATMUL:
        k1, k2 = jax.random.split(jax.random.key(0))
        _MATMUL[key] = (jax.jit(jnp.dot), jax.random.normal(k1, (n, n), dtype), jax.random.normal(k2, (n, n), dtype))
    f, a, b = _MATMUL[key]
    f(a, b).block_until_ready()
    c0 = cpu_seconds()
    wall = timed(lambda: f(a, b).block_until_ready(), iters)
    cpu = cpu_seconds() - c0
    return 2 * n**3 / statistics.median(wall), 2 * n**3 * iters / max(cpu, 1e-9)


def xla_flops(compiled) -> float | None:
    """XLA's FLOP estimate of a compiled executable (``cost_analysis``), None where unavailable."""
    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - a backend without cost analysis
        return None
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    flops = (ca or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def load_line(loads: dict[str, OtherLoad], n_cores: int) -> str | None:
    """'CPU used by other processes while timing: ...' for the loads measured, or None. The busy flag uses
    the load over all the timed windows together (a spike during a millisecond phase does not flag a run)."""
    have = {k: v.cores for k, v in loads.items() if v.cores is not None}
    if not have:
        return None
    wall = sum(v.wall_s for v in loads.values() if v.cores is not None)
    busy = machine_busy(sum(v.other_s for v in loads.values() if v.cores is not None) / wall, n_cores)
    return ("CPU used by other processes while timing: " + ", ".join(f"{c:.2f} ({k})" for k, c in have.items())
            + f" cores of {n_cores}" + ("  ** machine busy: timings are inflated; re-run when idle **" if busy else ""))


def forward_flops(cfg: Qwen2VLConfig, counts: dict[str, int], rows: int, seq_len: int, head_positions: int,
                  n_patches: int, n_images: int) -> dict[str, float]:
    """Forward FLOPs (module docstring): `rows` rows of `seq_len` tokens, the LM head on `head_positions` per
    row, the vision tower over `n_patches` patches of `n_images` equal images."""
    t, v = cfg.text, cfg.vision
    layers = 2 * counts["model.layers"] * rows * seq_len
    attn = 4 * t.num_layers * rows * seq_len**2 * t.num_heads * t.head_dim
    head = 2 * t.vocab_size * t.hidden_size * rows * head_positions
    vision = 0
    if n_patches:
        per_image = n_patches // n_images
        vision = 2 * (counts["visual.patch_embed"] + counts["visual.blocks"]) * n_patches
        vision += 4 * v.depth * n_images * per_image**2 * v.embed_dim
        vision += 2 * counts["visual.merger"] * n_patches // v.spatial_merge_size**2
    out = dict(layers=layers, attention=attn, head=head, vision=vision)
    out = {k: float(x) for k, x in out.items()}
    out["total"] = sum(out.values())
    return out


def flops_breakdown(f: dict[str, float]) -> str:
    return (f"text layers {f['layers'] / 1e9:.1f} + attention {f['attention'] / 1e9:.1f} + LM head "
            f"{f['head'] / 1e9:.1f} + vision {f['vision'] / 1e9:.1f} = {f['total'] / 1e9:.1f} GFLOP")


# ------------------------------------------------------------------------------------------ GRPO inputs
def build_prompts(cfg: Qwen2VLConfig, n_prompts: int, bucket: int, image_size: int, seed: int = 0):
    """`n_prompts` prompts with one square image each, left-padded to `bucket` tokens; prompt 0 fills the
    bucket, prompt i has 4 * (i % 4) fewer text tokens. Returns (ids, mask, pixel_values, image_grid_thw)."""
    grid = image_grid(cfg, image_size)
    n_image = grid[0] * grid[1] * grid[2] // cfg.vision.spatial_merge_size**2
    n_text = bucket - n_image - 2
    if n_text < 13:
        raise SystemExit(f"--prompt_bucket {bucket} is too short for an image of {n_image} tokens plus text")
    rows = [{"text": n_text - 4 * (i % 4), "images": [grid]} for i in range(n_prompts)]
    ids, mask, pv, grids = make_batch(cfg, rows, seed=seed)
    ids, mask = pad_to_bucket(ids, mask, (bucket,), cfg.pad_token_id)
    return ids, mask, pv, grids


class CoinFlipTokenizer:
    """Stands in for a tokenizer in `rollout_batch` (none exists for the 151,936-token vocabulary here): every
    completion decodes to a well-formed ``<think>..</think><answer>k</answer>``, k a fair coin flip, so the
    reward workers score it and accuracy (hence advantages) varies within each group."""

    def __init__(self, pad_token_id: int, seed: int = 0):
        self.pad_token_id = pad_token_id
        self._rng = np.random.default_rng(seed)

    def batch_decode(self, tokens, skip_special_tokens: bool = True) -> list[str]:
        return [f"<think>stub</think><answer>{int(k)}</answer>" for k in self._rng.integers(0, 2, len(tokens))]


def run_config(args) -> ml_collections.ConfigDict:
    """``configs/grpo.py`` with the benchmark's sizes: pure GRPO, one optimizer step per rollout batch."""
    c = get_config()
    c.mode = "grpo"
    c.data.batch_size, c.data.prompt_bucket, c.data.image_size = args.prompts, args.prompt_bucket, args.image_size
    c.rollout.num_samples, c.rollout.max_new_tokens = args.num_samples, args.max_new_tokens
    c.rl.micro_batches = args.micro_batches
    c.model.logit_chunk, c.model.remat = args.logit_chunk, args.remat
    c.optim.learning_rate, c.optim.warmup_steps = LR, 0
    return c


def new_state(model: Qwen2VL, tx: optax.GradientTransformation, mesh, *, keep_ref: bool) -> st.TrainState:
    """A TrainState on `mesh` over a *copy* of `model`'s weights (the donating steps consume the state's
    buffers; `model` keeps its own), the reference (if kept) in the parameters' dtype."""
    params = st.make_reference(nnx.state(model), mesh)
    dtype = jax.tree.leaves(params)[0].dtype
    return st.init_train_state(params, tx, mesh, ref_dtype=dtype, keep_ref=keep_ref, seed=0)


def synthetic_rollout(cfg: Qwen2VLConfig, prompts, g: int, t_new: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A host update batch shaped as `rollout_batch` returns it (less ``sampler_logps``), with G completions of
    `t_new` random (non-special) tokens per prompt, no stop, and random group-normalised advantages."""
    ids, mask, pv, grids = prompts
    rows = ids.shape[0] * g
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.pad_token_id, (rows, t_new)).astype(np.int32)   # below every special id
    cmask = np.ones((rows, t_new), np.int32)
    full_ids = np.concatenate([np.repeat(ids, g, 0), tokens], 1)
    full_mask = np.concatenate([np.repeat(mask, g, 0), cmask], 1)
    positions = prepare_inputs(cfg, full_ids, full_mask, np.repeat(grids, g, 0)).position_ids
    patch_pos = prepare_inputs(cfg, ids, mask, grids).patch_pos
    adv = np.asarray(group_advantages(jnp.asarray(rng.normal(size=rows), jnp.float32), g, scale="group"))
    return dict(input_ids=full_ids.astype(np.int32), attention_mask=full_mask.astype(np.int32),
                position_ids=np.asarray(positions, np.int32), pixel_values=np.asarray(pv, np.float32),
                patch_pos=np.asarray(patch_pos, np.int32), completion_mask=cmask, advantages=adv.astype(np.float32))


def memory_bytes(compiled) -> dict[str, int] | None:
    """Per-device argument / output / aliased (donated) / temporary bytes of a compiled executable, and total =
    arguments + outputs - aliased + temporaries; None where the backend has no memory analysis."""
    try:
        ma = compiled.memory_analysis()
        out = dict(args=ma.argument_size_in_bytes, out=ma.output_size_in_bytes, alias=ma.alias_size_in_bytes,
                   temp=ma.temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - a backend without memory analysis
        return None
    out["total"] = out["args"] + out["out"] - out["alias"] + out["temp"]
    return out


# ------------------------------------------------------------------------------------------ parts 1 + 2
def run_grpo(model: Qwen2VL, args, *, peak_label: str, n_cores: int,
             peak_fn: Callable[[], tuple[float, float]] | None = None, peak: float | None = None,
             extra_peak: tuple[float, str] | None = None) -> None:
    """Part 1 (step split) and part 2 (update MFU, diagnostics) for `model`.

    The MFU denominator is `peak` when given, else the median of `peak_fn()` (`matmul_peak`) measured once
    per timing round (so a shared machine's load hits the peak measurement and the step alike).
    """
    cfg = model.config
    p, g, t_new, bucket = args.prompts, args.num_samples, args.max_new_tokens, args.prompt_bucket
    rows, seq = p * g, bucket + t_new
    if p % args.micro_batches:
        raise SystemExit(f"--micro_batches {args.micro_batches} must divide --prompts {p}")
    c = run_config(args)
    stage = Stage(max_new_tokens=t_new, num_samples=g, steps=1)
    mesh = shd.make_mesh(dict(c.mesh))
    counts = param_counts(model)
    ids, mask, pv, grids = build_prompts(cfg, p, bucket, args.image_size)
    n_patches = pv.shape[0]
    print(f"GRPO workload: {p} prompts (bucket {bucket}, {int(mask.sum(1).min())}-{int(mask.sum(1).max())} valid "
          f"tokens, one {args.image_size}x{args.image_size} image each: {n_patches // p} patches -> "
          f"{int((ids[0] == cfg.image_token_id).sum())} image tokens), G={g}, {t_new} new tokens -> {rows} rows "
          f"x {seq} tokens; {args.micro_batches} micro-batch(es), logit_chunk {args.logit_chunk}, remat "
          f"{args.remat}, attention_chunk {args.attention_chunk}; stop id {args.eos_id}; mesh {dict(mesh.shape)}")

    # the trainer's pieces: optimizer, state, jitted steps (StepFunctions), one RL step = rl_step
    model.set_remat(args.remat)
    _, rl_tx = make_optimizers(c)
    state = new_state(model, rl_tx, mesh, keep_ref=True)
    graphdef = nnx.graphdef(model)
    fns = StepFunctions(graphdef, mesh, st.state_shardings(state, mesh), sft_tx=None, rl_tx=rl_tx)
    prompts = SimpleNamespace(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grids,
                              answers=np.array(["1"] * p))
    tok = CoinFlipTokenizer(cfg.pad_token_id)
    gcfg, whole = grpo_config(c, stage), grpo_config(c, stage, whole_batch=True)
    holder = {"state": state, "batch": None, "n": 0}
    del state

    def loop_step() -> dict[str, Any]:           # the training loop's call
        holder["state"], m = rl_step(holder["state"], fns, tok, prompts, stage, BETA, c=c)
        return m

    def phase_step() -> tuple[dict[str, float], dict[str, Any]]:
        """rl_step's work (one update per rollout batch: no pi_old pass, one mini-batch) on the same compiled
        steps, each phase blocked on its results before its clock stops (rl_step's own phase clocks do not
        block: the reference pass's compute lands in its update time)."""
        s = holder["state"]
        holder["n"] += 1
        t0 = time.perf_counter()
        host, info = rollout_batch(nnx.merge(graphdef, s.params), tok, prompts, stage, c,
                                   jax.random.key(holder["n"]), mesh)
        t1 = time.perf_counter()
        batch = st.put_batch(host, mesh)
        batch["advantages"] = fns.advantages(batch.pop("rewards"), stage.num_samples, c.rl.advantage_scale)
        batch["ref_logps"] = fns.logprobs(s.ref_params, batch, whole, "ref")
        jax.block_until_ready(batch)
        t2 = time.perf_counter()
        prm, os_, met = fns.grpo(s.params, s.opt_state, batch, BETA, gcfg)
        met = {k: float(v) for k, v in met.items()}
        t3 = time.perf_counter()
        holder["state"], holder["batch"] = s.replace(params=prm, opt_state=os_, step=s.step + 1), batch
        return dict(rollout=t1 - t0, reference=t2 - t1, update=t3 - t2), dict(info, **met)

    t0 = time.perf_counter()
    loop_step()                              # compiles the sampler, the reference pass and the update
    loop_compile = time.perf_counter() - t0
    loop_step()                              # warm-up (and the reward workers)
    phase_step()
    times: dict[str, list[float]] = {k: [] for k in ("rollout", "reference", "update", "step", "loop")}
    cpu = {k: 0.0 for k in ("step", "loop")}
    loads = {k: OtherLoad() for k in ("phases", "rl_step")}
    peaks, cpu_peaks = [], []
    for _ in range(args.repeats):
        settle(args, n_cores)
        c0 = cpu_seconds()
        loads["phases"].start()
        ph, m = phase_step()
        loads["phases"].stop()
        c1 = cpu_seconds()
        loads["rl_step"].start()
        lm = loop_step()
        loads["rl_step"].stop()
        cpu["step"] += (c1 - c0) / args.repeats
        cpu["loop"] += (cpu_seconds() - c1) / args.repeats
        for k, v in ph.items():
            times[k].append(v)
        times["step"].append(sum(ph.values()))
        times["loop"].append(lm["time_step"])
        if peak_fn is not None:
            wall_peak, cpu_peak = peak_fn()
            peaks.append(wall_peak)
            cpu_peaks.append(cpu_peak)
    med = {k: statistics.median(v) for k, v in times.items()}
    if peak is None:
        peak = statistics.median(peaks)
        peak_label += (f", median of {len(peaks)} measured once per round (range {min(peaks) / 1e9:.1f}-"
                       f"{max(peaks) / 1e9:.1f}))")
    labels = {
        "rollout": f"rollout: rollout_batch (generate {t_new} tokens; rewards)",
        "reference": "reference: put_batch + jitted token_logprobs",
        "update": "update: jitted grpo_update (clip + adamw, donated)",
    }
    print()
    print(f"{'GRPO step phase':<54} {'median s':>9} {'min s':>8} {'% of step':>10}")
    print("-" * 84)
    for k, label in labels.items():
        print(f"{label:<54} {med[k]:>9.3f} {min(times[k]):>8.3f} {med[k] / med['step']:>10.1%}")
    print("-" * 84)
    print(f"{'step (sum of the phases)':<54} {med['step']:>9.3f} {min(times['step']):>8.3f}")
    print(f"{'same step as the loop calls it: rl_step time_step':<54} {med['loop']:>9.3f} {min(times['loop']):>8.3f}")
    print(f"medians of {args.repeats} warm step(s) each, alternating; {cpu['step']:.2f} / {cpu['loop']:.2f} CPU s per "
          f"step; first rl_step (compiling the sampler, reference pass and update; starting the reward workers) "
          f"{loop_compile:.1f}s. Last step: reward {m['reward']:.2f}, completion length {m['completion_len']:.0f} of "
          f"{t_new}, loss {m['loss']:.4f}, kl {m.get('kl', 0.0):.2e}, grad_norm {m['grad_norm']:.2e}, sampler-trainer "
          f"gap mean {m['sampler_gap_mean']:.2e} max {m['sampler_gap_max']:.2e}")
    print(f"rl_step's own phase clocks (last step; they do not block on the reference pass): rollout "
          f"{lm['time_rollout']:.3f}, reference {lm['time_reference']:.3f}, update {lm['time_update']:.3f} s")
    line = load_line(loads, n_cores)
    if line:
        print(line)

    # ---- part 2: MFU
    state = holder["state"]
    spec = st.grpo_batch_spec(cfg, gcfg, p, args.image_size, t_new)
    xla_upd = xla_flops(st.jit_grpo_update(graphdef, mesh, fns.shardings, spec, tx=rl_tx, cfg=gcfg)
                        .lower(state.params, state.opt_state, spec, jnp.float32(BETA)))
    ref_spec = {k: v for k, v in spec.items() if k not in ("ref_logps", "sampler_logps", "completion_mask",
                                                           "advantages")}
    xla_ref = xla_flops(st.jit_token_logprobs(graphdef, mesh, fns.shardings.params, ref_spec, cfg=whole)
                        .lower(state.ref_params, ref_spec))
    fwd = forward_flops(cfg, counts, rows, seq, t_new, n_patches, p)
    upd_flops = 3 * fwd["total"]
    upd_s, ref_s = med["update"], med["reference"]
    mfu = upd_flops / upd_s / peak
    print()
    print(f"forward FLOPs ({rows} rows x {seq} tokens, LM head on the {t_new} completion positions, vision on {p} "
          f"images): {flops_breakdown(fwd)}")
    print(f"update FLOPs = 3 x forward = {upd_flops / 1e9:.1f} GFLOP"
          + (f"; XLA cost_analysis of the lowered update {xla_upd / 1e9:.1f} GFLOP" if xla_upd else "")
          + (f", of the reference forward {xla_ref / 1e9:.1f} GFLOP" if xla_ref else "")
          + (" (it counts a loop body once: the scanned decoder layers and vision blocks, LM-head chunks)"
             if xla_upd or xla_ref else ""))
    print(f"{peak_label}: {peak / 1e9:,.1f} GFLOP/s")
    if extra_peak:
        print(f"{extra_peak[1]}: {extra_peak[0] / 1e9:,.1f} GFLOP/s (update at {upd_flops / upd_s / extra_peak[0]:.1%})")
    print(f"update:    {upd_s:.3f}s -> {upd_flops / upd_s / 1e9:,.1f} GFLOP/s = MFU {mfu:.1%}")
    print(f"reference: {ref_s:.3f}s -> {fwd['total'] / ref_s / 1e9:,.1f} GFLOP/s = MFU "
          f"{fwd['total'] / ref_s / peak:.1%} (forward only, incl. put_batch); update / reference time = "
          f"{upd_s / ref_s:.2f} (FLOP ratio 3)")
    if peaks:
        print(f"best observed (fastest update / highest peak measured): {upd_flops / min(times['update']) / 1e9:,.1f}"
              f" GFLOP/s = MFU {upd_flops / min(times['update']) / max(peaks):.1%}")
    print(f"target update MFU >= {TARGET_MFU:.0%} of the "
          f"{'measured matmul peak' if peak_fn is not None else '--peak_tflops peak'}: {mfu:.1%} -> "
          f"{'PASS' if mfu >= TARGET_MFU else 'MISS'}")

    if not args.no_diagnose:
        del state
        diagnose_update(model, graphdef, holder, fns, holder["batch"], gcfg, fwd, peak,
                        statistics.median(cpu_peaks) if cpu_peaks else None, args, n_cores)


def cpu_costs(fn: Callable[[], Any], iters: int) -> tuple[float, float, float, float]:
    """(median wall s, CPU s, kernel CPU s, minor page faults) per call of `iters` blocking calls of `fn` after
    one warm-up. CPU time and faults come from ``getrusage`` (the whole process, all threads); kernel time
    and faults are mostly first touches of freshly mapped buffers (outputs and XLA temporaries)."""
    fn()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    wall = timed(fn, iters)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    sys_s = r1.ru_stime - r0.ru_stime
    return (statistics.median(wall), (r1.ru_utime - r0.ru_utime + sys_s) / iters, sys_s / iters,
            (r1.ru_minflt - r0.ru_minflt) / iters)


def memory_line(compiled) -> str:
    """Argument / output / aliased / temporary bytes of a compiled executable (``memory_analysis``)."""
    try:
        ma = compiled.memory_analysis()
        return (f"arguments {ma.argument_size_in_bytes / 1e9:.2f} GB, outputs {ma.output_size_in_bytes / 1e9:.2f} GB"
                f" (aliased to arguments {ma.alias_size_in_bytes / 1e9:.2f} GB), temporaries "
                f"{ma.temp_size_in_bytes / 1e9:.2f} GB")
    except Exception:  # noqa: BLE001 - a backend without memory analysis
        return "memory analysis unavailable"


def diagnose_update(model, graphdef, holder, fns: StepFunctions, batch, gcfg: GRPOConfig, fwd, peak: float,
                    cpu_peak: float | None, args, n_cores: int) -> None:
    """Pieces of the update, each jitted and timed alone (see the module docstring); 'of peak' is against
    the peak part 2 used. `holder["state"]` is the run's TrainState (the update piece advances it)."""
    iters = args.diag_iters
    cfg = model.config
    t = cfg.text
    dtype = jax.tree.leaves(holder["state"].params)[0].dtype
    rows, t_new = batch["completion_mask"].shape
    # the loss pieces run on one micro-batch (all of the batch when micro_batches == 1), as each scan step does
    m = gcfg.micro_batches
    mb_rows, mb_prompts = rows // m, gcfg.patch_segments
    mb_patches = batch["pixel_values"].shape[0] // m
    mb = {k: batch[k][:mb_rows] for k in ("input_ids", "attention_mask", "completion_mask", "ref_logps",
                                           "advantages")}
    mb["position_ids"] = batch["position_ids"][:, :mb_rows]
    mb["pixel_values"], mb["patch_pos"] = batch["pixel_values"][:mb_patches], batch["patch_pos"][:mb_patches]
    fwd_mb = forward_flops(cfg, param_counts(model), mb_rows, batch["input_ids"].shape[1], t_new, mb_patches,
                           mb_prompts)
    tag = "" if m == 1 else f" [1 of {m} micro-batches]"

    def loss(prm):
        mdl = nnx.merge(graphdef, prm)
        lp = completion_logprobs(mdl, mb["input_ids"], mb["attention_mask"], mb["position_ids"],
                                 mb["pixel_values"], mb["patch_pos"], prompt_len=gcfg.prompt_len,
                                 num_samples=gcfg.num_samples, patch_segments=mb_prompts,
                                 logit_chunk=gcfg.logit_chunk)
        s, n, _ = grpo_loss_terms(lp, None, mb["ref_logps"], mb["advantages"], mb["completion_mask"], beta=BETA,
                                  max_length=t_new)
        return s / jnp.maximum(n, 1)

    def params():
        return holder["state"].params

    fwd_fn = jax.jit(loss)
    grad_fn = jax.jit(jax.grad(loss))
    grads = jax.block_until_ready(grad_fn(params()))

    def opt(prm, os_, gr):
        upd, os_ = fns.rl_tx.update(gr, os_, prm)
        return optax.apply_updates(prm, upd), os_

    opt_fn = jax.jit(opt)

    def update_step():                       # the loop's call: donated buffers, outputs feed the next call
        s = holder["state"]
        prm, os_, met = fns.grpo(s.params, s.opt_state, batch, BETA, gcfg)
        holder["state"] = s.replace(params=prm, opt_state=os_)
        return jax.block_until_ready((prm, os_, met))

    # LM head + log-softmax gather, forward + backward (gradients to the hidden states and the head weight)
    p0 = params()
    w_vh = (p0["model"]["embed_tokens"]["embedding"][...] if cfg.tie_word_embeddings
            else p0["lm_head"]["kernel"][...].T)                                     # [V, H]
    w_vh = jnp.copy(w_vh)                    # its own buffer: the update piece donates the state's
    n_pos = mb_rows * t_new
    hidden = jax.random.normal(jax.random.key(3), (mb_rows, t_new, t.hidden_size), dtype)
    tokens = mb["input_ids"][:, -t_new:]

    def head_loss(w, h):
        return sequence_logprobs(jnp.dot(h, w.T).astype(jnp.float32), tokens).sum()

    head_fn = jax.jit(jax.grad(head_loss, argnums=(0, 1)))
    h2 = hidden.reshape(n_pos, t.hidden_size)
    dlog = jax.random.normal(jax.random.key(4), (n_pos, t.vocab_size), dtype)
    mm_flops = 2 * n_pos * t.hidden_size * t.vocab_size
    ids_all = mb["input_ids"]
    cot = jax.random.normal(jax.random.key(5), (*ids_all.shape, t.hidden_size), dtype)
    gather_bwd = jax.jit(jax.grad(lambda w: jnp.sum(jnp.take(w, ids_all, axis=0) * cot)))
    mm = [jax.jit(lambda a, b: jnp.dot(a, b.T)), jax.jit(lambda a, b: jnp.dot(a, b)),
          jax.jit(lambda a, b: jnp.dot(a.T, b))]

    pieces: list[tuple[str, Callable[[], Any], float | None]] = [
        ("update: jitted grpo_update (donated, chained calls)", update_step, 3 * fwd["total"]),
        ("forward: completion_logprobs + GRPO loss" + tag, lambda: jax.block_until_ready(fwd_fn(params())),
         fwd_mb["total"]),
        ("forward + backward: jax.grad of the loss" + tag, lambda: jax.block_until_ready(grad_fn(params())),
         3 * fwd_mb["total"]),
        ("optimizer: clip + adamw + apply_updates",
         lambda: jax.block_until_ready(opt_fn(params(), holder["state"].opt_state, grads)), None),
        ("LM head + log-softmax gather, fwd + bwd" + tag, lambda: jax.block_until_ready(head_fn(w_vh, hidden)),
         3 * fwd_mb["head"]),
        (f"  logits = h @ E^T    [{n_pos},{t.hidden_size}]x[{t.hidden_size},{t.vocab_size}]",
         lambda: jax.block_until_ready(mm[0](h2, w_vh)), mm_flops),
        (f"  dh = dlogits @ E    [{n_pos},{t.vocab_size}]x[{t.vocab_size},{t.hidden_size}]",
         lambda: jax.block_until_ready(mm[1](dlog, w_vh)), mm_flops),
        (f"  dE = dlogits^T @ h  [{t.vocab_size},{n_pos}]x[{n_pos},{t.hidden_size}]",
         lambda: jax.block_until_ready(mm[2](dlog, h2)), mm_flops),
        (f"embedding gather backward (scatter-add, [{t.vocab_size},{t.hidden_size}])",
         lambda: jax.block_until_ready(gather_bwd(w_vh)), None),
    ]
    n_params = sum(x.size for x in jax.tree.leaves(p0))
    itemsize = jnp.dtype(dtype).itemsize
    del p0
    # clip (read g for the norm; read g, write scaled g) + adamw (read g, mu, nu, p; write mu, nu, p) ~ 10 passes
    opt_bytes = n_params * itemsize * 10
    bandwidth = max(measure_bandwidth(256 << 20).values())

    load = OtherLoad()
    res = {}
    for name, fn, fl in pieces:
        if name.startswith(("update", "forward", "optimizer", "LM head")):
            settle(args, n_cores)
        load.start()
        res[name] = (*cpu_costs(fn, iters), fl, peak)
        load.stop()
    upd = res[pieces[0][0]]
    upd_s = upd[0]
    fb = res["forward + backward: jax.grad of the loss" + tag]
    hd = res["LM head + log-softmax gather, fwd + bwd" + tag]
    res["rest of fwd + bwd (decoder, vision; derived)" + tag] = (fb[0] - hd[0], fb[1] - hd[1], None, None,
                                                                 3 * (fwd_mb["total"] - fwd_mb["head"]), fb[5])

    print()
    print(f"diagnostics: where the update goes (each piece jitted alone, median of {iters} after a warm-up; kernel "
          "CPU s and minor page faults per call from getrusage; 'of peak' against the peak above)")
    w = max(len(k) for k in res)
    print(f"  {'piece':<{w}} {'ms':>7} {'% upd':>6} {'CPU s':>6} {'sys s':>6} {'faults':>7} {'GFLOP':>6} "
          f"{'GFLOP/s':>8} {'of peak':>8}")
    for name, (wall, cpu_s, sys_s, faults, fl, pk) in res.items():
        cpu = (f"{cpu_s:>6.2f} " + (f"{sys_s:>6.2f} {faults / 1e3:>6.0f}k" if sys_s is not None else f"{'':>6} {'':>7}"))
        fls = (f"{fl / 1e9:>6.1f} {fl / wall / 1e9:>8.1f} {fl / wall / pk:>8.1%}" if fl and wall > 0
               else f"{'':>6} {'':>8} {'':>8}")
        print(f"  {name:<{w}} {1e3 * wall:>7.0f} {wall / upd_s:>6.0%} {cpu} {fls}")
    opt_s = res["optimizer: clip + adamw + apply_updates"][0]
    print(f"  optimizer roofline: ~{opt_bytes / 1e9:.2f} GB moved ({n_params:,} params x {itemsize} B x ~10 passes) at "
          f"{bandwidth / 1e9:.1f} GB/s (best of a jitted sum / copy over 256 MiB) = {1e3 * opt_bytes / bandwidth:.0f} ms; "
          f"measured {1e3 * opt_s:.0f} ms")
    print(f"  fwd+bwd {1e3 * fb[0]:.0f} ms{f' x {m}' if m > 1 else ''} + optimizer {1e3 * opt_s:.0f} ms = "
          f"{1e3 * (m * fb[0] + opt_s):.0f} ms vs the "
          f"update's {1e3 * upd_s:.0f} ms; update CPU time {upd[1]:.2f} s per call, {upd[2]:.2f} s of it in the kernel")
    if cpu_peak:
        print(f"  per CPU-second of this process (load-robust cross-check): update {3 * fwd['total'] / upd[1] / 1e9:.1f}"
              f" GFLOP, matmul {cpu_peak / 1e9:.1f} -> {3 * fwd['total'] / upd[1] / cpu_peak:.1%} of the matmul's")
    if jax.devices()[0].platform == "cpu":
        print(f"  the update's {upd[3] / 1e3:.0f}k minor page faults per call = ~{upd[3] * 4096 / 1e9:.2f} GB of freshly"
              " mapped 4 KiB pages first touched per call (new output + temporary buffers every call)")
    line = load_line({"diagnostics": load}, n_cores)
    if line:
        print("  " + line)


# ------------------------------------------------------------------------------------------ part 3: memory
COMPARE_VARIANTS = (  # (label, logit_chunk or None for --compare_chunk, remat)
    ("baseline: logit_chunk 0, remat none", 0, "none"),
    ("logit_chunk {chunk}", None, "none"),
    ("remat full", 0, "full"),
    ("remat dots", 0, "dots"),
    ("logit_chunk {chunk} + remat full", None, "full"),
)


def compare_memory(model: Qwen2VL, args, n_cores: int) -> None:
    """Part 3: the GRPO update's per-device memory (``memory_analysis``) and warm time under LM-head chunking
    and remat policies, against the unchunked, non-rematerialised baseline (module docstring)."""
    cfg = model.config
    g, t_new, bucket = args.num_samples, args.completion_len, args.prompt_bucket
    if args.rows % g:
        raise SystemExit(f"--rows {args.rows} must be a multiple of --num_samples {g}")
    n_prompts = args.rows // g
    mesh = shd.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    prompts = build_prompts(cfg, n_prompts, bucket, args.image_size, seed=1)
    batch = st.put_batch(synthetic_rollout(cfg, prompts, g, t_new), mesh)
    c = get_config()
    tx = make_optimizer(LR, c)
    remat0 = model.remat
    state = new_state(model, tx, mesh, keep_ref=False)
    shardings = st.state_shardings(state, mesh)
    beta = jax.device_put(jnp.float32(BETA), st.replicated(mesh))
    # reference and sampler log-probs = the model's own (KL ~ 0, ratio 1, finite loss: random tokens sit ~100
    # nats below a random model's peaked distributions, so made-up log-probs would overflow k3's exp)
    lp_cfg = GRPOConfig(num_samples=g, prompt_len=bucket, patch_segments=n_prompts, logit_chunk=args.compare_chunk)
    logps = st.jit_token_logprobs(nnx.split(model)[0], mesh, shardings.params, batch, cfg=lp_cfg)(state.params, batch)
    batch = dict(batch, ref_logps=logps, sampler_logps=logps)
    holder = {"p": state.params, "s": state.opt_state}
    del state
    vocab = cfg.text.vocab_size
    logits_gb = args.rows * t_new * vocab * 4 / 1e9
    print(f"GRPO update memory / speed: {args.rows} rows ({n_prompts} prompt(s) x G={g}) x ({bucket} prompt + {t_new} "
          f"completion tokens), one {args.image_size}x{args.image_size} image per prompt, KL on, 1 micro-batch, "
          f"attention_chunk {model.model.attention_chunk}; "
          f"fp32 logits of all completion positions = {args.rows} x {t_new} x {vocab:,} x 4 B = {logits_gb:.2f} GB")
    variants = []                            # (label, compiled, memory, compile s, warm-up loss)
    for label, chunk, remat in COMPARE_VARIANTS:
        chunk = args.compare_chunk if chunk is None else chunk
        model.set_remat(remat)
        gcfg = GRPOConfig(num_samples=g, prompt_len=bucket, patch_segments=n_prompts, logit_chunk=chunk)
        jitted = st.jit_grpo_update(nnx.split(model)[0], mesh, shardings, batch, tx=tx, cfg=gcfg)
        t0 = time.perf_counter()
        compiled = jitted.lower(holder["p"], holder["s"], batch, beta).compile()
        compile_s = time.perf_counter() - t0
        holder["p"], holder["s"], met = compiled(holder["p"], holder["s"], batch, beta)   # warm-up
        variants.append((label.format(chunk=chunk), compiled, memory_bytes(compiled), compile_s,
                         float(jax.block_until_ready(met)["loss"])))
        print(f"  {variants[-1][0]}: compiled in {compile_s:.1f}s", flush=True)

    times: list[list[float]] = [[] for _ in variants]
    loads = [OtherLoad() for _ in variants]
    for _ in range(args.compare_iters):      # rounds over all variants: a shared machine's load hits them alike
        settle(args, n_cores)
        for i, (_, compiled, *_rest) in enumerate(variants):
            def call(compiled=compiled):
                holder["p"], holder["s"], met = compiled(holder["p"], holder["s"], batch, beta)
                return jax.block_until_ready(met)

            times[i] += timed(call, 1, loads[i])
    results = [(label, statistics.median(t), min(t), mem, comp, loss, load)
               for (label, _, mem, comp, loss), t, load in zip(variants, times, loads)]
    model.set_remat(remat0)

    base_s, base_mem = results[0][1], results[0][3]
    gb = 1e9
    print()
    print(f"{'GRPO update variant':<36} {'median s':>9} {'min s':>7} {'vs base':>8} {'args GB':>8} {'out GB':>7} "
          f"{'alias GB':>9} {'temp GB':>8} {'total GB':>9} {'temp vs base':>13} {'compile s':>10}")
    print("-" * 131)
    for label, med, mn, mem, comp, _, _ in results:
        if mem:
            m = (f"{mem['args'] / gb:>8.2f} {mem['out'] / gb:>7.2f} {mem['alias'] / gb:>9.2f} {mem['temp'] / gb:>8.2f} "
                 f"{mem['total'] / gb:>9.2f} {mem['temp'] / base_mem['temp'] - 1 if base_mem else 0:>+13.0%}")
        else:
            m = f"{'memory analysis unavailable':>58}"
        print(f"{label:<36} {med:>9.2f} {mn:>7.2f} {med / base_s - 1:>+8.0%} {m} {comp:>10.1f}")
    print("-" * 131)
    print(f"median of {args.compare_iters} warm call(s) after one warm-up, in rounds over the variants, all chained on "
          f"one state (params + opt_state donated: 'alias'); per-device memory_analysis of the compiled update; total = args + "
          f"out - alias + temp. Warm-up losses (beta x KL to the starting weights, growing as the chained updates move "
          f"away from them): " + ", ".join(f"{r[5]:.4f}" for r in results))
    line = load_line({r[0].split(':')[0]: r[6] for r in results}, n_cores)
    if line:
        print(line)


# ------------------------------------------------------------------------------------------ part 5: LoRA
def compare_lora(model: Qwen2VL, args, n_cores: int) -> None:
    """Part 5 (``--lora_rank R``): the GRPO update with LoRA adapters of rank R on ``--lora_targets`` (only the
    adapters trained, the frozen base an argument) against full fine-tuning, same batch, same jitted
    `jit_grpo_update`: per-device memory_analysis and median warm time in rounds over the two."""
    from mr1jax.models import lora

    cfg = model.config
    g, bucket, t_new, n_prompts = args.num_samples, args.prompt_bucket, args.max_new_tokens, args.prompts
    mesh = shd.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    prompts = build_prompts(cfg, n_prompts, bucket, args.image_size, seed=1)
    batch = st.put_batch(synthetic_rollout(cfg, prompts, g, t_new), mesh)
    tx = make_optimizer(LR, get_config())
    beta = jax.device_put(jnp.float32(BETA), st.replicated(mesh))
    gcfg = GRPOConfig(num_samples=g, prompt_len=bucket, patch_segments=n_prompts // args.micro_batches,
                      logit_chunk=args.logit_chunk, micro_batches=args.micro_batches)
    graphdef, state = nnx.split(model)
    compute_dtype = model.dtype
    variants = []                             # (label, trainable params, state bytes, compiled, holder, extra)
    # full fine-tuning: fp32 (param-dtype) master weights + Adam, reference = the model's own log-probs
    full = new_state(model, tx, mesh, keep_ref=False)
    sh = st.state_shardings(full, mesh)
    ref = st.jit_token_logprobs(graphdef, mesh, sh.params, batch, cfg=gcfg)(full.params, batch)
    batch = dict(batch, ref_logps=ref)
    jitted = st.jit_grpo_update(graphdef, mesh, sh, batch, tx=tx, cfg=gcfg)
    nbytes = lambda t: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(t))  # noqa: E731
    variants.append(("full fine-tuning", lora.num_params(full.params), nbytes((full.params, full.opt_state)),
                     jitted.lower(full.params, full.opt_state, batch, beta).compile(),
                     {"p": full.params, "s": full.opt_state}, ()))
    # LoRA: a copy of the model with adapters; the frozen base in the compute dtype
    lmodel = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
    lcfg = lora.LoRAConfig(rank=args.lora_rank, alpha=2.0 * args.lora_rank, targets=args.lora_targets)
    lora.apply_lora(lmodel, lcfg, seed=0, dtype=jnp.float32)
    lgraphdef, adapters, base = nnx.split(lmodel, lora.LoRAParam, ...)
    base = st.cast_floating(base, compute_dtype)
    base = jax.device_put(base, shd.param_shardings(base, mesh))
    lstate = st.init_train_state(adapters, tx, mesh, keep_ref=False, seed=0)
    lsh = st.state_shardings(lstate, mesh)
    fsh = shd.param_shardings(base, mesh)
    ljitted = st.jit_grpo_update(lgraphdef, mesh, lsh, batch, tx=tx, cfg=gcfg, frozen_shardings=fsh)
    variants.append((f"LoRA r={args.lora_rank} ({args.lora_targets})", lora.num_params(adapters),
                     nbytes((lstate.params, lstate.opt_state)),
                     ljitted.lower(lstate.params, lstate.opt_state, batch, beta, base).compile(),
                     {"p": lstate.params, "s": lstate.opt_state}, (base,)))
    print(f"LoRA vs full fine-tuning, GRPO update: {n_prompts} prompt(s) x G={g} rows of {bucket} + {t_new} tokens, "
          f"one {args.image_size}px image per prompt, KL on, {args.micro_batches} micro-batch(es), logit_chunk "
          f"{args.logit_chunk}, remat {model.remat}, compute {jnp.dtype(compute_dtype).name}")
    times: list[list[float]] = [[] for _ in variants]
    for _ in range(args.repeats + 1):
        settle(args, n_cores)
        for i, (_, _, _, compiled, holder, extra) in enumerate(variants):
            def call(compiled=compiled, holder=holder, extra=extra):
                holder["p"], holder["s"], met = compiled(holder["p"], holder["s"], batch, beta, *extra)
                return jax.block_until_ready(met)

            times[i] += timed(call, 1)
    gb = 1e9
    print(f"{'variant':<34} {'trainable':>12} {'params+Adam GB':>15} {'median s':>9} {'min s':>7} {'args GB':>8} "
          f"{'temp GB':>8} {'total GB':>9}")
    for (label, n, state_b, compiled, _, _), t in zip(variants, times):
        warm = t[1:] or t
        mem = memory_bytes(compiled) or {}
        print(f"{label:<34} {n:>12,} {state_b / gb:>15.3f} {statistics.median(warm):>9.3f} {min(warm):>7.3f} "
              f"{mem.get('args', 0) / gb:>8.3f} {mem.get('temp', 0) / gb:>8.3f} {mem.get('total', 0) / gb:>9.3f}")
    print(f"median / min of {args.repeats} warm call(s) after one warm-up, in rounds over the variants; args include "
          "the frozen base for LoRA; total = args + out - alias + temp (per-device memory_analysis)")


# ------------------------------------------------------------------------------------------ part 4: SFT
def build_sft_rows(cfg: Qwen2VLConfig, n_rows: int, seq_len: int, grid, ragged: bool):
    t, h, w = grid
    n_image = t * h * w // cfg.vision.spatial_merge_size**2
    n_text = seq_len - n_image - 2
    if n_text < 1 + (24 if ragged and n_rows > 1 else 0):
        raise SystemExit(f"--sft_len {seq_len} is too short for an image of {n_image} tokens")
    return [{"text": n_text - (8 * (i % 4) if ragged else 0), "images": [grid]} for i in range(n_rows)]


def run_sft(hf_model, model: Qwen2VL, args, n_cores: int) -> None:
    import torch

    cfg = model.config
    grid = image_grid(cfg, args.image_size)
    rows = build_sft_rows(cfg, args.sft_rows, args.sft_len, grid, ragged=not args.no_ragged)
    ids, mask, pv, grids = make_batch(cfg, rows, seed=1)
    # token s is a target when it and its predecessor are real tokens (no prediction from padding)
    loss_mask = np.zeros_like(mask)
    loss_mask[:, 1:] = mask[:, 1:] * mask[:, :-1]
    n_targets = int(loss_mask.sum())
    extra = prepare_inputs(cfg, ids, mask, grids)
    segments = extra.patch_segments
    if not isinstance(segments, int):
        raise SystemExit("expected equal-size images (static patch_segments)")
    chunk = args.logit_chunk
    print(f"SFT workload: {len(rows)} rows x {ids.shape[1]} tokens ({int(mask.sum())} real, {n_targets} targets), one "
          f"{args.image_size}x{args.image_size} image each ({pv.shape[0]} patches); mr1jax logit_chunk {chunk}, remat "
          f"{model.remat}")

    # ---- forward + backward
    graphdef, params = nnx.split(model)

    def mean_ce(prm, ids, mask, pos, lmask, pv, pp):
        s, n = sft_loss_terms(nnx.merge(graphdef, prm), ids, mask, pos, lmask, pv, pp, segments, chunk)
        return s / jnp.maximum(n, 1)

    jargs = [jax.device_put(x) for x in (ids, mask, extra.position_ids, loss_mask, pv, extra.patch_pos)]
    t0 = time.perf_counter()
    compiled = jax.jit(jax.value_and_grad(mean_ce)).lower(params, *jargs).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax_loss, jax_grads = jax.block_until_ready(compiled(params, *jargs))
    first_s = time.perf_counter() - t0
    jax_loss = float(jax_loss)
    jax_gnorm = float(optax.tree.norm(jax_grads))
    del jax_grads

    def run_jax():
        return jax.block_until_ready(compiled(params, *jargs))

    run_jax()

    tkw = dict(torch_inputs(cfg, ids, mask, pv, grids), use_cache=False)
    labels = torch.as_tensor(np.where(loss_mask > 0, ids, -100), dtype=torch.long)
    torch_params = list(hf_model.parameters())  # tied weights once

    def run_torch():
        hf_model.zero_grad(set_to_none=True)
        loss = hf_model(**tkw, labels=labels).loss
        loss.backward()
        return loss

    torch_loss = float(run_torch().detach())          # warm-up 1 (and the parity reference)
    with torch.no_grad():
        torch_gnorm = float(torch.sqrt(sum((q.grad.double() ** 2).sum() for q in torch_params if q.grad is not None)))
    run_torch()                                        # warm-up 2

    # ---- the optimizer step: mr1jax's jitted, donating SFT step vs torch + clip + AdamW (same hyper-parameters)
    c = get_config()
    tx = make_optimizer(LR, c)
    mesh = shd.make_mesh(dict(c.mesh))
    state = new_state(model, tx, mesh, keep_ref=False)
    sbatch = st.put_batch(dict(input_ids=ids.astype(np.int32), attention_mask=mask.astype(np.int32),
                               loss_mask=loss_mask.astype(np.int32), position_ids=np.asarray(extra.position_ids, np.int32),
                               pixel_values=np.asarray(pv, np.float32),
                               patch_pos=np.asarray(extra.patch_pos, np.int32)), mesh)
    scfg = SFTConfig(micro_batches=1, patch_segments=segments, logit_chunk=chunk)
    t0 = time.perf_counter()
    sft_c = st.jit_sft_update(graphdef, mesh, st.state_shardings(state, mesh), sbatch, tx=tx, cfg=scfg).lower(
        state.params, state.opt_state, sbatch).compile()
    step_compile_s = time.perf_counter() - t0
    holder = {"p": state.params, "s": state.opt_state}
    del state

    def jax_step():
        holder["p"], holder["s"], met = sft_c(holder["p"], holder["s"], sbatch)
        return jax.block_until_ready(met)

    jax_step_loss = float(jax_step()["loss"])
    jax_step()
    hf_step_model = hf_model                            # the torch side steps its own weights after the fwd+bwd runs
    opt = torch.optim.AdamW(hf_step_model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    def torch_step():
        opt.zero_grad(set_to_none=True)
        loss = hf_step_model(**tkw, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf_step_model.parameters(), c.optim.grad_clip)
        opt.step()
        return loss

    jt, tt, js, ts = [], [], [], []
    jl, tl, jsl, tsl = OtherLoad(), OtherLoad(), OtherLoad(), OtherLoad()
    for n in split_iters(args.sft_iters, args.rounds):   # fwd + bwd first: the torch steps change its weights
        settle(args, n_cores)
        jt += timed(run_jax, n, jl)
        tt += timed(run_torch, n, tl)
    torch_step_loss = float(torch_step().detach())      # warm-ups of the torch step (first: same weights)
    torch_step()
    for n in split_iters(args.sft_iters, args.rounds):
        settle(args, n_cores)
        js += timed(jax_step, n, jsl)
        ts += timed(torch_step, n, tsl)
    hf_model.zero_grad(set_to_none=True)

    fl = 3 * forward_flops(cfg, param_counts(model), len(rows), ids.shape[1], ids.shape[1] - 1, pv.shape[0],
                           len(rows))["total"]
    med = {k: 1e3 * statistics.median(v) for k, v in (("jt", jt), ("tt", tt), ("js", js), ("ts", ts))}
    speedup, step_speedup = med["tt"] / med["jt"], med["ts"] / med["js"]
    print()
    print(f"{'SFT (fp32)':<52} {'median ms':>10} {'min ms':>9} {'GFLOP/s':>9} {'loss':>12}")
    print("-" * 96)
    for label, k, v, loss in (("fwd+bwd  mr1jax jit value_and_grad(sft_loss_terms)", "jt", jt, jax_loss),
                              ("fwd+bwd  torch eager loss.backward()", "tt", tt, torch_loss),
                              ("step     mr1jax steps.jit_sft_update (donated)", "js", js, jax_step_loss),
                              ("step     torch backward + clip_grad_norm_ + AdamW", "ts", ts, torch_step_loss)):
        print(f"{label:<52} {med[k]:>10.1f} {min(v) * 1e3:>9.1f} {fl / med[k] / 1e6:>9.1f} {loss:>12.6f}")
    print("-" * 96)
    print(f"speed-up torch/mr1jax: forward + backward {speedup:.2f}x (target >= {TARGET_SFT_SPEEDUP}x: "
          f"{'PASS' if speedup >= TARGET_SFT_SPEEDUP else 'MISS'}); optimizer step {step_speedup:.2f}x")
    print(f"loss parity: |mr1jax - torch| = {abs(jax_loss - torch_loss):.3e} (relative "
          f"{abs(jax_loss - torch_loss) / abs(torch_loss):.1e}), first step's loss {abs(jax_step_loss - torch_step_loss):.1e};"
          f" global grad norm mr1jax {jax_gnorm:.6g} vs torch {torch_gnorm:.6g} (relative difference "
          f"{abs(jax_gnorm - torch_gnorm) / torch_gnorm:.1e})")
    print(f"FLOPs per step = 3 x forward = {fl / 1e9:.1f} GFLOP (LM head on all {ids.shape[1] - 1} positions); "
          f"mr1jax compile (lower + compile) {compile_s:.1f}s fwd+bwd, {step_compile_s:.1f}s step; first call "
          f"{first_s * 1e3:.0f} ms; {args.sft_iters} timed runs each in {len(split_iters(args.sft_iters, args.rounds))} "
          "alternating round(s)")
    line = load_line({"mr1jax": jl, "torch": tl, "mr1jax step": jsl, "torch step": tsl}, n_cores)
    if line:
        print(line)


# ------------------------------------------------------------------------------------------ modes
def as_trained(model: Qwen2VL, args) -> Qwen2VL:
    """`model` on a one-device mesh as `mr1jax.trainer.build` sets it up (attention blocks of ``--attention_chunk``
    queries), with sampling's default stop ids set to (``--eos_id``,) (`rollout_batch` uses the config's)."""
    model = shd.shard_model(model, shd.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}))
    model = set_attention_chunk(model, args.attention_chunk)
    model.config = dataclasses.replace(model.config, eos_token_ids=(args.eos_id,))
    return model


def run_cpu(args) -> None:
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    n_cores = os.cpu_count() or 1
    torch.set_num_threads(n_cores)
    cfg = bench_config()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; torch {torch.__version__} with {n_cores} threads; "
          f"transformers {transformers.__version__}; cpu_count {n_cores}; load average "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    t0 = time.perf_counter()
    hf_model, model = build_reference_pair(cfg, seed=0)
    model = as_trained(model, args)
    text_p, vision_p, total_p = summarize_params(param_counts(model))
    print(f"built the torch model and loaded the same weights into mr1jax (fp32) in {time.perf_counter() - t0:.1f}s: "
          f"{total_p:,} parameters (text {text_p:,} incl. tied embedding {cfg.text.vocab_size * cfg.text.hidden_size:,};"
          f" vision {vision_p:,})")
    if args.lora_rank:
        print()
        compare_lora(model, args, n_cores)
        return
    if not args.skip_grpo:
        print()
        run_grpo(model, args, n_cores=n_cores, peak_fn=lambda: matmul_peak(2048, jnp.float32, iters=10),
                 peak_label="fp32 matmul peak (jitted 2048x2048 jnp.dot, median of 10 runs")
    if args.compare_memory:
        print()
        compare_memory(model, args, n_cores)
    if not args.skip_sft:
        print()
        model.set_remat(args.remat)
        run_sft(hf_model, model, args, n_cores)
    print()
    print(f"waited {WAITED[0]:.0f}s in all for quiet windows (--wait_idle {args.wait_idle:g}s per timing block); "
          f"total run {time.perf_counter() - T_START:.0f}s; load average at the end "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")


def run_gpu_2b(args, cfg: Qwen2VLConfig | None = None) -> None:
    cfg = cfg or Qwen2VLConfig.qwen2_vl_2b_instruct()
    dev = jax.devices()[0]
    print(f"jax {jax.__version__} on {dev.platform} ({getattr(dev, 'device_kind', '?')}); peak {args.peak_tflops} "
          "TFLOP/s")
    t0 = time.perf_counter()
    model = build_random_model(cfg, jnp.bfloat16)
    model = as_trained(model, args)
    text_p, vision_p, total_p = summarize_params(param_counts(model))
    print(f"built random bf16 model in {time.perf_counter() - t0:.1f}s: {total_p:,} parameters (text {text_p:,}, "
          f"vision {vision_p:,})")
    measured = measure_matmul(8192 if dev.platform != "cpu" else 1024, jnp.bfloat16)
    n_cores = os.cpu_count() or 1
    if args.lora_rank:
        print()
        compare_lora(model, args, n_cores)
        return
    if not args.skip_grpo:
        print()
        run_grpo(model, args, peak=args.peak_tflops * 1e12, peak_label="--peak_tflops (dense bf16)", n_cores=n_cores,
                 extra_peak=(measured, "bf16 matmul measured on the device (jitted 8192x8192 jnp.dot)"))
    if args.compare_memory:
        print()
        compare_memory(model, args, n_cores)


# ------------------------------------------------------------------------------------------ main
QUICK = dict(prompts=1, num_samples=2, prompt_bucket=96, max_new_tokens=8, image_size=56, repeats=1, diag_iters=1,
             sft_rows=1, sft_len=64, sft_iters=1, rounds=1, rows=2, completion_len=64, compare_chunk=16,
             compare_iters=1, wait_idle=0.0, logit_chunk=4)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=None, help="prompts per GRPO step (default 2; 4 with --gpu_2b)")
    p.add_argument("--num_samples", type=int, default=None, help="G: completions per prompt (default 4; 8 with "
                   "--gpu_2b)")
    p.add_argument("--prompt_bucket", type=int, default=None, help="prompt length incl. image tokens (default 128; "
                   "512 with --gpu_2b)")
    p.add_argument("--max_new_tokens", type=int, default=None, help="new tokens per completion (default 32; 256 "
                   "with --gpu_2b)")
    p.add_argument("--image_size", type=int, default=None, help="square image side, one image per prompt / SFT row "
                   "(default 224; 448 with --gpu_2b)")
    p.add_argument("--micro_batches", type=int, default=None, help="GRPO gradient-accumulation micro-batches "
                   "(default 1; 4 with --gpu_2b)")
    p.add_argument("--logit_chunk", type=int, default=128, help="LM-head chunk of the GRPO update, reference pass and "
                   "SFT (config.model.logit_chunk; 0 = all positions at once)")
    p.add_argument("--remat", default="none", choices=("none", "full", "dots"), help="remat policy of parts 1, 2, 4 "
                   "(config.model.remat)")
    p.add_argument("--attention_chunk", type=int, default=get_config().model.attention_chunk,
                   help="queries per attention block in full-sequence passes (config.model.attention_chunk; 0 = all)")
    p.add_argument("--repeats", type=int, default=3, help="timed warm GRPO steps")
    p.add_argument("--eos_id", type=int, default=UNUSED_EOS_ID, help="rollout stop id (default: one never drawn)")
    p.add_argument("--no_diagnose", action="store_true", help="skip the update diagnostics")
    p.add_argument("--wait_idle", type=float, default=3.0, help="before each timing round, wait up to this many "
                   "seconds for a window where other processes use <= 10%% of the cores (0: never wait)")
    p.add_argument("--diag_iters", type=int, default=3, help="timed calls per diagnostic piece")
    p.add_argument("--skip_grpo", action="store_true", help="skip parts 1-2 (GRPO step split, MFU)")
    p.add_argument("--compare_memory", action="store_true", help="part 3: update memory / time under logit_chunk "
                   "and remat against the baseline")
    p.add_argument("--rows", type=int, default=4, help="part 3: update rows (a multiple of --num_samples)")
    p.add_argument("--completion_len", type=int, default=512, help="part 3: completion tokens per row")
    p.add_argument("--compare_chunk", type=int, default=128, help="part 3: the chunked variants' logit_chunk")
    p.add_argument("--compare_iters", type=int, default=3, help="part 3: timed warm updates per variant")
    p.add_argument("--skip_sft", action="store_true", help="skip part 4 (SFT vs torch)")
    p.add_argument("--sft_rows", type=int, default=2, help="SFT batch rows")
    p.add_argument("--sft_len", type=int, default=192, help="SFT row length incl. the image's tokens")
    p.add_argument("--sft_iters", type=int, default=6, help="timed SFT runs per implementation and comparison")
    p.add_argument("--rounds", type=int, default=3, help="alternating timing blocks for the SFT comparisons")
    p.add_argument("--no_ragged", action="store_true", help="all SFT rows the same length (no padding)")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny sizes for every part (overrides the sizes; "
                   "implies --compare_memory)")
    p.add_argument("--gpu_2b", action="store_true", help="2B-shaped model in bf16 on an accelerator (parts 1-3)")
    p.add_argument("--lora_rank", type=int, default=0, help="part 5 only: the GRPO update with LoRA adapters of this "
                   "rank vs full fine-tuning (time, memory); 0 = off")
    p.add_argument("--lora_targets", default="language", help="part 5: lora.targets (preset or regex)")
    p.add_argument("--peak_tflops", type=float, default=989.0, help="device peak for --gpu_2b MFU (H100 dense bf16)")
    args = p.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
        args.compare_memory = True
    gpu = args.gpu_2b
    for name, cpu_default, gpu_default in (("prompts", 2, 4), ("num_samples", 4, 8), ("prompt_bucket", 128, 512),
                                           ("max_new_tokens", 32, 256), ("image_size", 224, 448),
                                           ("micro_batches", 1, 4)):
        if getattr(args, name) is None:
            setattr(args, name, gpu_default if gpu else cpu_default)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.gpu_2b:
        run_gpu_2b(args)
    else:
        run_cpu(args)


if __name__ == "__main__":
    main()
