#!/usr/bin/env python
"""Where a GRPO step's time goes, the GRPO update's MFU, and SFT forward+backward against `transformers`.

Default mode (CPU; about 2.5 minutes on an idle 2-core machine, about 4 on a busy one)::

    python scripts/bench_train.py [--prompts 2] [--num_samples 4] [--prompt_bucket 128] [--max_new_tokens 32]
                                  [--repeats 3] [--sft_rows 2] [--sft_len 192] [--sft_iters 6]

builds the benchmarks' ~116M-parameter Qwen2-VL (`mr1jax.testing.bench.bench_config`: real vocabulary 151936,
tied embeddings, text hidden 512 x 4 layers, vision width 512 x 4 blocks) as a randomised
`transformers.Qwen2VLForConditionalGeneration` and loads the same weights into mr1jax in fp32
(`mr1jax.testing.bench.build_reference_pair`). It prints three parts:

1. **GRPO step split.** ``--prompts`` prompts, each one ``--image_size`` image (224: 256 patches -> 64 image
   tokens) plus text, left-padded to ``--prompt_bucket``; G = ``--num_samples`` completions of
   ``--max_new_tokens`` tokens each. The phases of one `mr1jax.train` step, built as `mr1jax.train` builds
   them, each timed warm (median of ``--repeats`` alternating rounds; compile reported separately):

   * rollout: `mr1jax.sampling.generate` at temperature 1 (stop id ``--eos_id``, an embedding row the real
     tokenizer never emits, so every row decodes all new tokens and the work is fixed);
   * host: assembling the update batch as `mr1jax.train.rollout_batch` does (prompt + completion ids and
     masks, M-RoPE `prepare_inputs` over the full sequences, group advantages). Rewards are synthetic
     (normal draws): decoding text and the reward worker processes are not timed;
   * reference log-probs: the jitted `completion_logprobs` on a frozen copy of the parameters (as `ref_fn`
     in `mr1jax.train`);
   * update: the jitted `grpo_update` (``jax.jit(grpo_update, static_argnames=("graphdef", "tx", "cfg"))``)
     with ``optax.chain(clip_by_global_norm(1.0), adamw(...))``, ``--micro_batches`` micro-batches.

   A table gives median and min seconds, each phase's share of the step (sum of the medians) and its
   compile time (rollout: first call minus the warm median; the jitted functions: ``lower`` + ``compile``).
   The randomised model's distributions are very peaked (logits of +-50), so sampled tokens have
   log-probabilities near 0 and the GRPO gradient is tiny (grad_norm ~1e-6): the arithmetic is the same
   as for a real model (completions of random tokens, grad_norm ~1e-4, update in the same time).

2. **Update MFU.** FLOPs of the update = 3 x forward FLOPs (backward ~ 2x forward), forward as below (XLA's
   own ``cost_analysis`` count of the compiled update is printed next to it as a check). MFU = FLOPs / median
   update seconds / this CPU's fp32 matmul peak, measured in the same run once per timing round (a jitted
   2048x2048 ``jnp.dot``, median of 10 calls, as `measure_matmul` does; `matmul_peak` here also returns its
   CPU time), so the peak sees the same machine load as the update. Target (the issue): update MFU >= 40% of
   the measured matmul peak -> PASS / MISS. Also printed: the reference forward's MFU, the best observed
   ratio (fastest update / highest peak) and a load-robust cross-check from this process's CPU time (FLOPs
   per CPU-second of the update / of the matmul). Unless ``--no_diagnose``, the update is then taken apart,
   each piece jitted and timed alone (median of ``--diag_iters``) with its CPU time, kernel time and minor
   page faults per call (``getrusage``): the update again, the update with ``params`` / ``opt_state`` donated
   (chained calls, as a training loop that donates would run), the loss forward, forward + backward without
   the optimizer, the optimizer alone (against a memory-bandwidth roofline), the LM head + log-softmax
   forward + backward, the three LM-head matmuls of that backward at their real shapes, and the embedding
   gather's backward (a scatter-add into a dense [vocab, hidden] gradient); then the compiled update's
   ``memory_analysis`` (argument / output / temporary bytes) with and without donation.

3. **SFT forward + backward vs torch**, same weights, same run: ``--sft_rows`` rows of ``--sft_len`` tokens
   (one image each; later rows up to 24 tokens shorter, left-padded, unless ``--no_ragged``). The loss is
   the mean next-token cross-entropy over every token whose predecessor is a real token (padding excluded).
   mr1jax: ``jax.jit(jax.value_and_grad(sum / count of sft_loss_terms))`` over the parameter state;
   torch: ``model(**inputs, labels=labels, use_cache=False).loss.backward()`` in fp32 eager with
   ``torch.set_num_threads(os.cpu_count())`` (gradients reset with ``zero_grad(set_to_none=True)`` before each
   step, inside the timing). Median ms of each (``--sft_iters`` runs in ``--rounds`` alternating blocks after
   2 warm-ups), the speed-up torch/mr1jax against the target >= 1.5x, both losses and their difference, and
   both global gradient norms.

Example (idle 2-core AMD EPYC, jax 0.10.2, torch 2.13.0; the matmul peak itself varied 327-424 GFLOP/s and
the update 1.76-2.34 s between idle runs, so the MFU landed at 39.6%, 42.5% and 50.8% in three of them)::

    GRPO step phase                                         median s    min s  % of step  compile s
    -----------------------------------------------------------------------------------------------
    rollout: generate (vision + prefill + 32 decode steps)     0.803    0.786      26.9%        3.4
    host: update batch (M-RoPE over prompt+completion)         0.003    0.003       0.1%          -
    reference log-probs: jitted completion_logprobs            0.419    0.410      14.0%        1.1
    update: jitted grpo_update (clip + adamw)                  1.762    1.688      59.0%        5.1
    -----------------------------------------------------------------------------------------------
    step (sum of medians; rewards not timed)                   2.987
    ...
    update FLOPs = 3 x forward = 325.4 GFLOP; XLA cost_analysis of the compiled update 327.9 GFLOP, ...
    update:    1.762s -> 184.7 GFLOP/s = MFU 50.8%
    target update MFU >= 40% of the measured matmul peak: 50.8% -> PASS
    ...
    mr1jax jit value_and_grad(sft_loss_terms)          1279.5    1243.0     214.0    72.124939
    torch eager loss.backward()                        2570.5    2410.1     106.5    72.124947
    speed-up torch/mr1jax: 2.01x  (target >= 1.5x: PASS)

Every part prints the CPU time other processes used while timing (this machine is shared); runs where
they used more than 10% of the cores are flagged. Before each timing round the script waits up to
``--wait_idle`` seconds (default 3) for a half-second window in which other processes use at most 10% of
the cores; the total waited is printed at the end.

FLOPs of one forward (a matmul [m, k] x [k, n] = 2*m*k*n; norms, rotary, softmax, activations, the
embedding gather and the optimizer are not counted):

    text   = 2 * P_layers * R * S                   P_layers: all decoder-layer parameters; R rows of S tokens
           + 4 * n_layers * R * S^2 * n_heads * head_dim   QK^T and PV, full square (causal not discounted)
    head   = 2 * vocab * hidden * R * H             LM head (the tied embedding) on the H positions scored:
                                                    GRPO H = max_new_tokens, SFT H = S - 1
    vision = 2 * (P_patch_embed + P_blocks) * N     N patches: the vision tower runs once per *prompt*
           + 4 * depth * n_images * (N / n_images)^2 * embed_dim   per-image full attention
           + 2 * P_merger * N / merge^2             patch merger on merged tokens

    update (and SFT forward+backward) = 3 * forward

Device mode (accelerator; random weights, no torch; not run on the CPU machine)::

    python scripts/bench_train.py --gpu_2b [--prompts 4] [--num_samples 8] [--prompt_bucket 512]
                                  [--max_new_tokens 256] [--image_size 448] [--micro_batches 4] [--peak_tflops 989]

builds the real Qwen2-VL-2B shape (`Qwen2VLConfig.qwen2_vl_2b_instruct()`, bf16 parameters and compute, random
weights) and runs parts 1 and 2 on it: the step split and the update MFU against ``--peak_tflops`` (989: H100
SXM dense bf16), next to the bf16 matmul throughput measured on the device (8192x8192 ``jnp.dot``).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mr1jax.models.qwen2_vl.config import Qwen2VLConfig  # noqa: E402
from mr1jax.models.qwen2_vl.model import Qwen2VL, prepare_inputs  # noqa: E402
from mr1jax.rl import group_advantages  # noqa: E402
from mr1jax.rl.losses import grpo_loss_terms, sequence_logprobs  # noqa: E402
from mr1jax.rl.update import GRPOConfig, completion_logprobs, grpo_update, sft_loss_terms  # noqa: E402
from mr1jax.sampling import generate, pad_to_bucket  # noqa: E402
from mr1jax.testing.bench import (OtherLoad, bench_config, build_random_model, build_reference_pair,  # noqa: E402
                                  image_grid, machine_busy, measure_bandwidth, measure_matmul,
                                  param_counts, summarize_params, timed, timed_once,
                                  torch_inputs)
from mr1jax.testing.hf_reference import make_batch  # noqa: E402

TARGET_MFU = 0.40          # the issue: update MFU >= 40% of the measured matmul peak
TARGET_SFT_SPEEDUP = 1.5   # the issue: SFT forward+backward >= 1.5x torch eager
UNUSED_EOS_ID = 151935     # last embedding row: padding beyond the real tokenizer's 151,665 tokens
BETA = 0.04                # KL coefficient passed to the update (OThink-MR1's beta_min)
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


def update_batch(cfg: Qwen2VLConfig, prompts, ro, g: int, rewards: np.ndarray, pixel_dtype) -> dict[str, Any]:
    """The device update batch, assembled as `mr1jax.train.rollout_batch` does (rewards given)."""
    ids, mask, pv, grids = prompts
    tokens, cmask = np.asarray(ro.tokens), np.asarray(ro.mask)
    adv = group_advantages(jnp.asarray(rewards), g, scale="group")
    full_ids = np.concatenate([np.repeat(ids, g, 0), tokens], 1)
    full_mask = np.concatenate([np.repeat(mask, g, 0), cmask], 1)
    positions = prepare_inputs(cfg, full_ids, full_mask, np.repeat(grids, g, 0)).position_ids
    prompt_extra = prepare_inputs(cfg, ids, mask, grids)
    batch = dict(input_ids=jnp.asarray(full_ids), attention_mask=jnp.asarray(full_mask),
                 position_ids=jnp.asarray(positions), pixel_values=jnp.asarray(pv, pixel_dtype),
                 patch_pos=jnp.asarray(prompt_extra.patch_pos), completion_mask=ro.mask,
                 old_logps=ro.logprobs, advantages=adv)
    jax.block_until_ready(batch)
    return batch


# ------------------------------------------------------------------------------------------ parts 1 + 2
def run_grpo(model: Qwen2VL, args, *, pixel_dtype, peak_label: str, n_cores: int,
             peak_fn: Callable[[], tuple[float, float]] | None = None, peak: float | None = None,
             extra_peak: tuple[float, str] | None = None) -> None:
    """Part 1 (step split) and part 2 (update MFU, diagnostics) for `model`.

    The MFU denominator is `peak` when given, else the median of `peak_fn()` (`matmul_peak`) measured once
    per timing round (so a shared machine's load hits the peak measurement and the phases alike); with
    `peak_fn` a process-CPU-time MFU is printed as well.
    """
    cfg = model.config
    p, g, t_new, bucket = args.prompts, args.num_samples, args.max_new_tokens, args.prompt_bucket
    rows, seq = p * g, bucket + t_new
    if p % args.micro_batches:
        raise SystemExit(f"--micro_batches {args.micro_batches} must divide --prompts {p}")
    counts = param_counts(model)
    prompts = build_prompts(cfg, p, bucket, args.image_size)
    ids, mask, pv, grids = prompts
    n_patches = pv.shape[0]
    print(f"GRPO workload: {p} prompts (bucket {bucket}, {int(mask.sum(1).min())}-{int(mask.sum(1).max())} valid "
          f"tokens, one {args.image_size}x{args.image_size} image each: {n_patches // p} patches -> "
          f"{int((ids[0] == cfg.image_token_id).sum())} image tokens), G={g}, {t_new} new tokens -> {rows} rows "
          f"x {seq} tokens; {args.micro_batches} micro-batch(es); stop id {args.eos_id}")

    # ---- rollout
    roll_calls = [0]

    def rollout():
        roll_calls[0] += 1
        ro = generate(model, ids, mask, pv if pixel_dtype == jnp.float32 else pv.astype(pixel_dtype), grids,
                      num_samples=g, max_new_tokens=t_new, temperature=1.0, top_p=1.0, top_k=0,
                      eos_token_ids=(args.eos_id,), rng=jax.random.key(roll_calls[0]))
        jax.block_until_ready((ro.tokens, ro.logprobs, ro.mask))
        return ro

    t0 = time.perf_counter()
    ro = rollout()
    roll_first = time.perf_counter() - t0
    lengths = np.asarray(ro.lengths)
    rewards = np.random.default_rng(0).normal(size=rows).astype(np.float32)

    def host():
        return update_batch(cfg, prompts, ro, g, rewards, pixel_dtype)

    batch = host()

    # ---- reference and update, jitted as mr1jax.train jits them
    graphdef, params = nnx.split(model)
    ref_params = jax.tree.map(jnp.copy, params)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-6, weight_decay=0.0))
    opt_state = tx.init(params)
    gcfg = GRPOConfig(num_samples=g, prompt_len=bucket, micro_batches=args.micro_batches,
                      patch_segments=p // args.micro_batches)
    ref_fn = jax.jit(lambda prm, b, **kw: completion_logprobs(nnx.merge(graphdef, prm), b["input_ids"],
                                                               b["attention_mask"], b["position_ids"],
                                                               b["pixel_values"], b["patch_pos"], **kw),
                     static_argnames=("prompt_len", "num_samples", "patch_segments"))
    update_fn = jax.jit(grpo_update, static_argnames=("graphdef", "tx", "cfg"))
    ref_kw = dict(prompt_len=bucket, num_samples=g, patch_segments=p)
    beta = jnp.float32(BETA)

    ref_batch = dict(batch)                  # the reference's inputs (no ref_logps key)
    t0 = time.perf_counter()
    ref_c = ref_fn.lower(ref_params, ref_batch, **ref_kw).compile()
    ref_compile = time.perf_counter() - t0
    batch["ref_logps"] = jax.block_until_ready(ref_c(ref_params, ref_batch))
    t0 = time.perf_counter()
    upd_c = update_fn.lower(graphdef, params, opt_state, batch, beta, tx=tx, cfg=gcfg).compile()
    upd_compile = time.perf_counter() - t0

    def ref():
        return jax.block_until_ready(ref_c(ref_params, ref_batch))

    def update():
        return jax.block_until_ready(upd_c(params, opt_state, batch, beta))

    _, _, m = update()                       # first call (buffers), then one more warm-up each
    ref()
    update()
    host()
    metrics = {k: float(v) for k, v in m.items()}

    phases: dict[str, Callable[[], Any]] = {"rollout": rollout, "host": host, "reference": ref, "update": update}
    times = {k: [] for k in phases}
    cpu = {k: 0.0 for k in phases}
    loads = {k: OtherLoad() for k in phases}
    rollout()                                # warm-up of the rollout
    peaks, cpu_peaks = [], []
    for _ in range(args.repeats):
        settle(args, n_cores)
        for name, fn in phases.items():
            c0 = cpu_seconds()
            times[name].append(timed_once(fn, loads[name]))
            cpu[name] += (cpu_seconds() - c0) / args.repeats
        if peak_fn is not None:
            wall_peak, cpu_peak = peak_fn()
            peaks.append(wall_peak)
            cpu_peaks.append(cpu_peak)
    med = {k: statistics.median(v) for k, v in times.items()}
    if peak is None:
        peak = statistics.median(peaks)
        peak_label += (f", median of {len(peaks)} measured once per round (range {min(peaks) / 1e9:.1f}-"
                       f"{max(peaks) / 1e9:.1f}))")
    step = sum(med.values())
    compile_s = {"rollout": roll_first - med["rollout"], "host": None, "reference": ref_compile,
                 "update": upd_compile}
    labels = {
        "rollout": f"rollout: generate (vision + prefill + {t_new} decode steps)",
        "host": "host: update batch (M-RoPE over prompt+completion)",
        "reference": "reference log-probs: jitted completion_logprobs",
        "update": "update: jitted grpo_update (clip + adamw)",
    }
    print()
    print(f"{'GRPO step phase':<54} {'median s':>9} {'min s':>8} {'% of step':>10} {'compile s':>10}")
    print("-" * 95)
    for name, label in labels.items():
        c = compile_s[name]
        print(f"{label:<54} {med[name]:>9.3f} {min(times[name]):>8.3f} {med[name] / step:>10.1%} "
              f"{'-' if c is None else f'{c:.1f}':>10}")
    print("-" * 95)
    print(f"{'step (sum of medians; rewards not timed)':<54} {step:>9.3f}")
    print(f"medians of {args.repeats} warm call(s) per phase in alternating rounds; rollout lengths "
          f"{int(lengths.min())}-{int(lengths.max())} of {t_new} ({int(np.asarray(ro.truncated).sum())}/{rows} "
          f"truncated); update metrics: loss {metrics['loss']:.4f}, kl {metrics.get('kl', 0.0):.2e}, ratio "
          f"{metrics['ratio_min']:.4f}-{metrics['ratio_max']:.4f}, grad_norm {metrics['grad_norm']:.2e}")
    line = load_line(loads, n_cores)
    if line:
        print(line)

    # ---- part 2: MFU
    fwd = forward_flops(cfg, counts, rows, seq, t_new, n_patches, p)
    upd_flops = 3 * fwd["total"]
    xla_upd, xla_ref = xla_flops(upd_c), xla_flops(ref_c)
    mfu = upd_flops / med["update"] / peak
    ref_mfu = fwd["total"] / med["reference"] / peak
    print()
    print(f"forward FLOPs ({rows} rows x {seq} tokens, LM head on the {t_new} completion positions, vision on {p} "
          f"images): {flops_breakdown(fwd)}")
    print(f"update FLOPs = 3 x forward = {upd_flops / 1e9:.1f} GFLOP"
          + (f"; XLA cost_analysis of the compiled update {xla_upd / 1e9:.1f} GFLOP" if xla_upd else "")
          + (f", of the reference forward {xla_ref / 1e9:.1f} GFLOP" if xla_ref else ""))
    print(f"{peak_label}: {peak / 1e9:,.1f} GFLOP/s")
    if extra_peak:
        print(f"{extra_peak[1]}: {extra_peak[0] / 1e9:,.1f} GFLOP/s (update at {upd_flops / med['update'] / extra_peak[0]:.1%})")
    print(f"update:    {med['update']:.3f}s -> {upd_flops / med['update'] / 1e9:,.1f} GFLOP/s = MFU {mfu:.1%}")
    print(f"reference: {med['reference']:.3f}s -> {fwd['total'] / med['reference'] / 1e9:,.1f} GFLOP/s = MFU "
          f"{ref_mfu:.1%} (forward only); update / reference time = {med['update'] / med['reference']:.2f} "
          "(FLOP ratio 3)")
    if peaks:
        print(f"best observed (fastest update / highest peak measured): {upd_flops / min(times['update']) / 1e9:,.1f} "
              f"GFLOP/s = MFU {upd_flops / min(times['update']) / max(peaks):.1%}")
        cpu_peak = statistics.median(cpu_peaks)
        print(f"per CPU-second of this process (load-robust cross-check): update {upd_flops / cpu['update'] / 1e9:.1f} "
              f"GFLOP ({cpu['update']:.2f} CPU s per call), reference {fwd['total'] / cpu['reference'] / 1e9:.1f}, "
              f"matmul {cpu_peak / 1e9:.1f} -> update {upd_flops / cpu['update'] / cpu_peak:.1%}, reference "
              f"{fwd['total'] / cpu['reference'] / cpu_peak:.1%} of the matmul's")
    print(f"target update MFU >= {TARGET_MFU:.0%} of the "
          f"{'measured matmul peak' if peak_fn is not None else '--peak_tflops peak'}: {mfu:.1%} -> "
          f"{'PASS' if mfu >= TARGET_MFU else 'MISS'}")

    if not args.no_diagnose:
        diagnose_update(model, graphdef, params, opt_state, tx, batch, gcfg, beta, fwd, update, upd_c, peak,
                        args, n_cores, pixel_dtype)


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


def diagnose_update(model, graphdef, params, opt_state, tx, batch, gcfg: GRPOConfig, beta, fwd, update_fn, upd_c,
                    peak: float, args, n_cores: int, dtype) -> None:
    """Pieces of the update, each jitted and timed alone (see the module docstring); 'of peak' is against
    the peak part 2 used."""
    iters = args.diag_iters
    cfg = model.config
    t = cfg.text
    rows, t_new = batch["completion_mask"].shape
    # the loss pieces run on one micro-batch (all of the batch when micro_batches == 1), as each scan step does
    m = gcfg.micro_batches
    mb_rows, mb_prompts = rows // m, gcfg.patch_segments
    mb_patches = batch["pixel_values"].shape[0] // m
    mb = {k: batch[k][:mb_rows] for k in ("input_ids", "attention_mask", "completion_mask", "old_logps",
                                           "ref_logps", "advantages")}
    mb["position_ids"] = batch["position_ids"][:, :mb_rows]
    mb["pixel_values"], mb["patch_pos"] = batch["pixel_values"][:mb_patches], batch["patch_pos"][:mb_patches]
    fwd_mb = forward_flops(cfg, param_counts(model), mb_rows, batch["input_ids"].shape[1], t_new, mb_patches,
                           mb_prompts)
    tag = "" if m == 1 else f" [1 of {m} micro-batches]"

    def loss(prm):
        mdl = nnx.merge(graphdef, prm)
        lp = completion_logprobs(mdl, mb["input_ids"], mb["attention_mask"], mb["position_ids"],
                                 mb["pixel_values"], mb["patch_pos"], prompt_len=gcfg.prompt_len,
                                 num_samples=gcfg.num_samples, patch_segments=mb_prompts)
        s, n, _ = grpo_loss_terms(lp, mb["old_logps"], mb["ref_logps"], mb["advantages"],
                                  mb["completion_mask"], beta=beta, max_length=t_new)
        return s / jnp.maximum(n, 1)

    fwd_fn = jax.jit(loss)
    grad_fn = jax.jit(jax.grad(loss))
    grads = jax.block_until_ready(grad_fn(params))

    def opt(prm, st, gr):
        upd, st = tx.update(gr, st, prm)
        return optax.apply_updates(prm, upd), st

    opt_fn = jax.jit(opt)
    chain = {"p": jax.tree.map(jnp.copy, params), "s": jax.tree.map(jnp.copy, opt_state)}
    donated = jax.jit(grpo_update, static_argnames=("graphdef", "tx", "cfg"), donate_argnames=("params", "opt_state")
                      ).lower(graphdef, chain["p"], chain["s"], batch, beta, tx=tx, cfg=gcfg).compile()

    def donated_step():                      # what a training loop that donates would do: outputs feed the next call
        chain["p"], chain["s"], m = donated(chain["p"], chain["s"], batch, beta)
        return jax.block_until_ready((chain["p"], chain["s"], m))

    # LM head + log-softmax gather, forward + backward (gradients to the hidden states and the head weight)
    w_vh = (params["model"]["embed_tokens"]["embedding"][...] if cfg.tie_word_embeddings
            else params["lm_head"]["kernel"][...].T)                                     # [V, H]
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
        ("update: jitted grpo_update, as timed above", lambda: jax.block_until_ready(update_fn()), 3 * fwd["total"]),
        ("  same, params + opt_state donated (chained calls)", donated_step, 3 * fwd["total"]),
        ("forward: completion_logprobs + GRPO loss" + tag, lambda: jax.block_until_ready(fwd_fn(params)),
         fwd_mb["total"]),
        ("forward + backward: jax.grad of the loss" + tag, lambda: jax.block_until_ready(grad_fn(params)),
         3 * fwd_mb["total"]),
        ("optimizer: clip + adamw + apply_updates", lambda: jax.block_until_ready(opt_fn(params, opt_state, grads)),
         None),
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
    n_params = sum(x.size for x in jax.tree.leaves(params))
    itemsize = jnp.dtype(jax.tree.leaves(params)[0].dtype).itemsize
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
    print(f"  update executable: {memory_line(upd_c)}; donated: {memory_line(donated)}")
    if jax.devices()[0].platform == "cpu":
        print(f"  the update's {upd[3] / 1e3:.0f}k minor page faults per call = ~{upd[3] * 4096 / 1e9:.2f} GB of freshly"
              " mapped 4 KiB pages first touched per call (new output + temporary buffers every call)")
    line = load_line({"diagnostics": load}, n_cores)
    if line:
        print("  " + line)


# ------------------------------------------------------------------------------------------ part 3: SFT
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
    print(f"SFT workload: {len(rows)} rows x {ids.shape[1]} tokens ({int(mask.sum())} real, {n_targets} targets), one "
          f"{args.image_size}x{args.image_size} image each ({pv.shape[0]} patches)")

    graphdef, params = nnx.split(model)

    def mean_ce(prm, ids, mask, pos, lmask, pv, pp):
        s, n = sft_loss_terms(nnx.merge(graphdef, prm), ids, mask, pos, lmask, pv, pp, segments)
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

    jt, tt = [], []
    jl, tl = OtherLoad(), OtherLoad()
    for n in split_iters(args.sft_iters, args.rounds):
        settle(args, n_cores)
        jt += timed(run_jax, n, jl)
        tt += timed(run_torch, n, tl)
    hf_model.zero_grad(set_to_none=True)
    jax_ms, torch_ms = 1e3 * statistics.median(jt), 1e3 * statistics.median(tt)
    speedup = torch_ms / jax_ms
    fl = 3 * forward_flops(cfg, param_counts(model), len(rows), ids.shape[1], ids.shape[1] - 1, pv.shape[0],
                           len(rows))["total"]
    print()
    print(f"{'SFT forward + backward (fp32)':<46} {'median ms':>10} {'min ms':>9} {'GFLOP/s':>9} {'loss':>12}")
    print("-" * 90)
    print(f"{'mr1jax jit value_and_grad(sft_loss_terms)':<46} {jax_ms:>10.1f} {min(jt) * 1e3:>9.1f} "
          f"{fl / jax_ms / 1e6:>9.1f} {jax_loss:>12.6f}")
    print(f"{'torch eager loss.backward()':<46} {torch_ms:>10.1f} {min(tt) * 1e3:>9.1f} "
          f"{fl / torch_ms / 1e6:>9.1f} {torch_loss:>12.6f}")
    print("-" * 90)
    print(f"speed-up torch/mr1jax: {speedup:.2f}x  (target >= {TARGET_SFT_SPEEDUP}x: "
          f"{'PASS' if speedup >= TARGET_SFT_SPEEDUP else 'MISS'})")
    print(f"loss parity: |mr1jax - torch| = {abs(jax_loss - torch_loss):.3e} (relative "
          f"{abs(jax_loss - torch_loss) / abs(torch_loss):.1e}); global grad norm mr1jax {jax_gnorm:.6g} vs torch "
          f"{torch_gnorm:.6g} (relative difference {abs(jax_gnorm - torch_gnorm) / torch_gnorm:.1e})")
    print(f"FLOPs per step = 3 x forward = {fl / 1e9:.1f} GFLOP (LM head on all {ids.shape[1] - 1} positions); "
          f"mr1jax compile (lower + compile) {compile_s:.1f}s, first call {first_s * 1e3:.0f} ms; "
          f"{args.sft_iters} timed runs each in {len(split_iters(args.sft_iters, args.rounds))} alternating round(s)")
    line = load_line({"mr1jax": jl, "torch": tl}, n_cores)
    if line:
        print(line)


# ------------------------------------------------------------------------------------------ modes
def run_cpu(args) -> None:
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    n_cores = os.cpu_count() or 1
    torch.set_num_threads(n_cores)
    cfg = bench_config()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; torch {torch.__version__} with {n_cores} threads; "
          f"transformers {transformers.__version__}; cpu_count {n_cores}")
    t0 = time.perf_counter()
    hf_model, model = build_reference_pair(cfg, seed=0)
    text_p, vision_p, total_p = summarize_params(param_counts(model))
    print(f"built the torch model and loaded the same weights into mr1jax (fp32) in {time.perf_counter() - t0:.1f}s: "
          f"{total_p:,} parameters (text {text_p:,} incl. tied embedding {cfg.text.vocab_size * cfg.text.hidden_size:,};"
          f" vision {vision_p:,})")
    print()
    run_grpo(model, args, pixel_dtype=jnp.float32, n_cores=n_cores,
             peak_fn=lambda: matmul_peak(2048, jnp.float32, iters=10),
             peak_label="fp32 matmul peak (jitted 2048x2048 jnp.dot, median of 10 runs")
    if not args.skip_sft:
        print()
        run_sft(hf_model, model, args, n_cores)
    print()
    print(f"waited {WAITED[0]:.0f}s in all for quiet windows (--wait_idle {args.wait_idle:g}s per timing block); "
          f"total run {time.perf_counter() - T_START:.0f}s")


def run_gpu_2b(args, cfg: Qwen2VLConfig | None = None) -> None:
    cfg = cfg or Qwen2VLConfig.qwen2_vl_2b_instruct()
    dev = jax.devices()[0]
    print(f"jax {jax.__version__} on {dev.platform} ({getattr(dev, 'device_kind', '?')}); peak {args.peak_tflops} "
          "TFLOP/s")
    t0 = time.perf_counter()
    model = build_random_model(cfg, jnp.bfloat16)
    text_p, vision_p, total_p = summarize_params(param_counts(model))
    print(f"built random bf16 model in {time.perf_counter() - t0:.1f}s: {total_p:,} parameters (text {text_p:,}, "
          f"vision {vision_p:,})")
    measured = measure_matmul(8192 if dev.platform != "cpu" else 1024, jnp.bfloat16)
    print()
    run_grpo(model, args, pixel_dtype=jnp.bfloat16, peak=args.peak_tflops * 1e12,
             peak_label="--peak_tflops (dense bf16)", n_cores=os.cpu_count() or 1,
             extra_peak=(measured, "bf16 matmul measured on the device (jitted 8192x8192 jnp.dot)"))


# ------------------------------------------------------------------------------------------ main
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
    p.add_argument("--repeats", type=int, default=3, help="timed warm calls per GRPO phase (alternating rounds)")
    p.add_argument("--eos_id", type=int, default=UNUSED_EOS_ID, help="rollout stop id (default: one never drawn)")
    p.add_argument("--no_diagnose", action="store_true", help="skip the update diagnostics")
    p.add_argument("--wait_idle", type=float, default=3.0, help="before each timing round, wait up to this many "
                   "seconds for a window where other processes use <= 10%% of the cores (0: never wait)")
    p.add_argument("--diag_iters", type=int, default=3, help="timed calls per diagnostic piece")
    p.add_argument("--skip_sft", action="store_true", help="skip part 3 (SFT vs torch)")
    p.add_argument("--sft_rows", type=int, default=2, help="SFT batch rows")
    p.add_argument("--sft_len", type=int, default=192, help="SFT row length incl. the image's tokens")
    p.add_argument("--sft_iters", type=int, default=6, help="timed SFT steps per implementation")
    p.add_argument("--rounds", type=int, default=3, help="alternating timing blocks for the SFT comparison")
    p.add_argument("--no_ragged", action="store_true", help="all SFT rows the same length (no padding)")
    p.add_argument("--gpu_2b", action="store_true", help="2B-shaped model in bf16 on an accelerator (parts 1-2)")
    p.add_argument("--peak_tflops", type=float, default=989.0, help="device peak for --gpu_2b MFU (H100 dense bf16)")
    args = p.parse_args(argv)
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
