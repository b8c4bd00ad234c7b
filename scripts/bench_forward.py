#!/usr/bin/env python
"""Forward-pass latency of mr1jax's Qwen2-VL against `transformers` (torch eager), and 2B prefill MFU.

Default mode (CPU; about 30 s on an idle 2-core machine, 11 of them building the models)::

    python scripts/bench_forward.py [--batch_size 1] [--seq_len 128] [--iters 20] [--rounds 4]

builds the benchmarks' ~100M-parameter Qwen2-VL (`mr1jax.testing.bench.bench_config`): the real vocabulary
151936 and Qwen2-VL special ids, tied embeddings, and a shallow, narrow text decoder and vision tower -- text
hidden 512, 4 layers, 8 heads / 2 kv heads (head_dim 64, mrope_section (8, 12, 12)), intermediate 2816;
vision depth 4, embed_dim 512, 8 heads (head_dim 64), out_hidden_size 512. That is 116.2M parameters: 77.8M
embedding/head + 19.9M decoder layers + 18.5M vision (each 512-wide vision block 3.2M, the 2048-wide patch
merger 5.2M, the patch embedding 0.6M). It is built as a randomised
`transformers.Qwen2VLForConditionalGeneration` (`mr1jax.testing.hf_reference.build_hf_model`), saved with
``save_pretrained`` and loaded into mr1jax (`load_pretrained`, fp32), so both hold the same weights
(`mr1jax.testing.bench.build_reference_pair`). Each prompt holds one 224x224 image (grid (1, 16, 16): 256
patches -> 64 image tokens) and ``--seq_len`` tokens in all (left-padded rows; with ``--batch_size`` > 1
later rows are up to 24 tokens shorter so the padding path runs). It prints:

* the parameter count (text / vision / total);
* a table -- implementation, median ms, min ms, tokens/s -- for the jitted mr1jax ``Qwen2VL.forward``
  (full [B, L, vocab] fp32 logits; median of ``--iters`` runs after 2 warm-ups, each run ended with
  ``block_until_ready``) and the torch eager fp32 forward under ``torch.inference_mode()``
  (``use_cache=False``, full logits, median of ``--iters`` runs after 2 warm-ups,
  ``torch.set_num_threads(os.cpu_count())``); tokens/s counts valid (non-pad) prompt tokens per second;
* the speed-up torch/mr1jax against the issue's target "mr1jax at least 1.5x faster than torch eager";
* the jit compile time (lower + compile, separate from the timed runs), the first call, and the host-side
  `prepare_inputs` time (M-RoPE positions; not in mr1jax's timed forward, whereas torch computes its
  rope index inside its forward);
* the CPU time other processes used while timing (a busy shared machine inflates torch's OpenMP
  timings far more than XLA's; the script flags runs where others used > 10% of the cores);
* FLOPs per forward (the formula below, LM head on every position) and each side's achieved GFLOP/s;
* the max abs logit difference between the two on valid positions, with the logit scale.

Example (idle 2-core AMD EPYC, jax 0.10.2, torch 2.13.0)::

    implementation                      median ms    min ms   tokens/s
    ------------------------------------------------------------------
    mr1jax jit forward (fp32)               143.3     132.6      893.5
    torch eager forward (fp32)              311.3     290.6      411.2
    ------------------------------------------------------------------
    speed-up torch/mr1jax: 2.17x  (target >= 1.5x: MET)

Timing is done in ``--rounds`` alternating blocks (mr1jax, then torch, ...) so slow drift in a shared
machine's load hits both implementations alike; the reported median is over all timed runs of each.

Device mode (accelerator; random weights, no torch)::

    python scripts/bench_forward.py --device_2b [--batch_size 8] [--seq_len 1024] [--image_size 448] \
        [--peak_tflops 989]

times a prefill of the real Qwen2-VL-2B shape (`Qwen2VLConfig.qwen2_vl_2b_instruct()`, bf16 parameters and
compute, random weights) on a batch of equal-length prompts, one ``--image_size`` image each. The prefill
runs the vision tower, the decoder over all L positions and the LM head on the last position only (what a
sampler needs; full [B, L, 151936] logits would dominate memory). It prints compile time, median latency,
prefill tokens/s (B * L / median seconds) and MFU = achieved FLOP/s / (``--peak_tflops`` * 1e12); 989 is
the H100 SXM dense bf16 peak.

FLOP count used for MFU (forward only, a matmul of an [m, k] by a [k, n] matrix = 2*m*k*n FLOPs; norms,
rotary, softmax and activations are not counted):

    text   = 2 * P_layers * B * L                       P_layers: all decoder-layer parameters
           + 4 * n_layers * B * L^2 * hidden           QK^T and PV, full square (causal masking not discounted)
           + 2 * vocab * hidden * B                     LM head on the last position of each row
    vision = 2 * (P_patch_embed + P_blocks) * N         N = patches in the batch
           + 4 * depth * n_images * (N / n_images)^2 * embed_dim   per-image full attention
           + 2 * P_merger * N / merge^2                 patch merger on merged tokens
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mr1jax.models.qwen2_vl.config import Qwen2VLConfig  # noqa: E402
from mr1jax.models.qwen2_vl.model import attention_mask_4d, prepare_inputs  # noqa: E402
from mr1jax.testing.bench import (OtherLoad, bench_config, build_random_model, build_reference_pair,  # noqa: E402
                                  image_grid, machine_busy, param_counts, summarize_params, timed,
                                  torch_inputs)
from mr1jax.testing.hf_reference import make_batch  # noqa: E402

TARGET_SPEEDUP = 1.5  # the target: mr1jax at least 1.5x faster than torch eager


# ------------------------------------------------------------------------------------------ helpers
def build_rows(cfg: Qwen2VLConfig, batch: int, seq_len: int, grid: tuple[int, int, int], ragged: bool):
    """One image per row; row 0 has `seq_len` tokens, later rows (if `ragged`) up to 24 fewer."""
    t, h, w = grid
    n_image_tokens = t * h * w // cfg.vision.spatial_merge_size**2
    n_text = seq_len - n_image_tokens - 2  # <vision_start> + pads + <vision_end>
    if n_text < 1 + (24 if ragged and batch > 1 else 0):
        raise SystemExit(f"--seq_len {seq_len} is too short for an image of {n_image_tokens} tokens")
    return [{"text": n_text - (8 * (i % 4) if ragged else 0), "images": [grid]} for i in range(batch)]


def split_iters(iters: int, rounds: int) -> list[int]:
    rounds = max(1, min(rounds, iters))
    return [iters // rounds + (1 if r < iters % rounds else 0) for r in range(rounds)]


# ------------------------------------------------------------------------------------------ CPU comparison
def run_compare(args) -> None:
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    n_threads = os.cpu_count() or 1
    torch.set_num_threads(n_threads)
    cfg = bench_config(args.family)
    batch = args.batch_size or 1
    image_size = args.image_size or (448 if args.family == "qwen2_5_vl" else 224)
    grid = image_grid(cfg, image_size)
    seq_len = args.seq_len or max(128, grid[0] * grid[1] * grid[2] // 4 + 64)

    print(f"family {args.family} ({type(cfg).__name__}); image {image_size} px")
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.device_count()} device(s)); "
          f"torch {torch.__version__} with {n_threads} threads; cpu_count {n_threads}")
    t0 = time.perf_counter()
    hf_model, model = build_reference_pair(cfg, seed=0)
    attn_impl = getattr(hf_model.config, "_attn_implementation", "?")
    print(f"built torch reference ({attn_impl} attention) and loaded it into mr1jax in "
          f"{time.perf_counter() - t0:.1f}s")

    text_p, vision_p, total_p = summarize_params(param_counts(model))
    hf_total = sum(p.numel() for p in hf_model.parameters())  # tied weights are counted once by torch
    print(f"parameters: {total_p:,} total = text {text_p:,} (embedding {cfg.text.vocab_size * cfg.text.hidden_size:,},"
          f" tied head) + vision {vision_p:,}; torch reference {hf_total:,}")

    rows = build_rows(cfg, batch, seq_len, grid, ragged=not args.no_ragged)
    input_ids, attention_mask, pixel_values, image_grid_thw = make_batch(cfg, rows, seed=0)
    n_valid = int(attention_mask.sum())
    print(f"inputs: batch {batch}, length {input_ids.shape[1]}, {n_valid} valid tokens, "
          f"{len(image_grid_thw)} image(s) of grid {tuple(int(x) for x in grid)} -> "
          f"{pixel_values.shape[0]} patches")

    # ---- mr1jax: jit the pure function of the parameter state; patch_segments is a static int.
    t0 = time.perf_counter()
    extra = prepare_inputs(cfg, input_ids, attention_mask, image_grid_thw)
    prep_s = time.perf_counter() - t0
    if not isinstance(extra.patch_segments, int):
        raise SystemExit("expected equal-size images (static patch_segments)")
    segments = extra.patch_segments
    graphdef, state = nnx.split(model)

    def fwd(state, input_ids, attention_mask, position_ids, pixel_values, patch_pos):
        m = nnx.merge(graphdef, state)
        return m.forward(input_ids, attention_mask, position_ids, pixel_values, patch_pos, segments)

    jargs = [jax.device_put(x) for x in (input_ids, attention_mask, extra.position_ids, pixel_values,
                                         extra.patch_pos)]
    t0 = time.perf_counter()
    compiled = jax.jit(fwd).lower(state, *jargs).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax_logits = compiled(state, *jargs).block_until_ready()
    first_s = time.perf_counter() - t0

    def run_jax():
        compiled(state, *jargs).block_until_ready()

    run_jax()  # second warm-up, as for torch (the first call above also allocates XLA's buffers)

    # ---- torch eager.
    tkw = dict(torch_inputs(cfg, input_ids, attention_mask, pixel_values, image_grid_thw), use_cache=False)

    def run_torch():
        with torch.inference_mode():
            return hf_model(**tkw).logits

    torch_logits = run_torch().float().numpy()  # warm-up 1 (also the parity reference)
    run_torch()                                 # warm-up 2

    # ---- the vision tower alone (jitted image_features vs torch's visual module, eager).
    def vis(state, pixel_values, patch_pos):
        return nnx.merge(graphdef, state).image_features(pixel_values, patch_pos, segments)

    vis_compiled = jax.jit(vis).lower(state, jargs[3], jargs[4]).compile()
    tpv, tgrid = tkw["pixel_values"], tkw["image_grid_thw"]

    def run_jax_vision():
        vis_compiled(state, jargs[3], jargs[4]).block_until_ready()

    def run_torch_vision():
        with torch.inference_mode():
            return hf_model.model.visual(tpv, grid_thw=tgrid).pooler_output

    run_jax_vision()
    vis_ref = run_torch_vision().float().numpy()
    vis_diff = float(np.abs(np.asarray(vis_compiled(state, jargs[3], jargs[4])) - vis_ref).max())

    jax_times, torch_times, jax_vis, torch_vis = [], [], [], []
    jax_load, torch_load = OtherLoad(), OtherLoad()
    for n in split_iters(args.iters, args.rounds):
        jax_times += timed(run_jax, n, jax_load)
        torch_times += timed(run_torch, n, torch_load)
        jax_vis += timed(run_jax_vision, n)
        torch_vis += timed(run_torch_vision, n)

    valid = attention_mask.astype(bool)
    jl = np.asarray(jax_logits, dtype=np.float32)[valid]
    tl = torch_logits[valid]
    max_diff = float(np.max(np.abs(jl - tl)))
    scale = float(np.max(np.abs(tl)))
    del jax_logits, torch_logits, jl, tl

    jax_ms = 1e3 * statistics.median(jax_times)
    torch_ms = 1e3 * statistics.median(torch_times)
    speedup = torch_ms / jax_ms
    print()
    print(f"{'implementation':<34} {'median ms':>10} {'min ms':>9} {'tokens/s':>10}")
    print("-" * 66)
    for name, ms, times in (("mr1jax jit forward (fp32)", jax_ms, jax_times),
                            ("torch eager forward (fp32)", torch_ms, torch_times)):
        print(f"{name:<34} {ms:>10.1f} {1e3 * min(times):>9.1f} {n_valid / (ms / 1e3):>10.1f}")
    jv, tv = 1e3 * statistics.median(jax_vis), 1e3 * statistics.median(torch_vis)
    print(f"{'mr1jax jit vision tower':<34} {jv:>10.1f} {1e3 * min(jax_vis):>9.1f} {'':>10}")
    print(f"{'torch eager vision tower':<34} {tv:>10.1f} {1e3 * min(torch_vis):>9.1f} {'':>10}")
    print("-" * 66)
    print(f"speed-up torch/mr1jax: {speedup:.2f}x  (target >= {TARGET_SPEEDUP}x: "
          f"{'MET' if speedup >= TARGET_SPEEDUP else 'NOT MET'}); vision tower alone {tv / jv:.2f}x "
          f"(max |diff| {vis_diff:.1e})")
    print(f"mr1jax compile (lower + compile): {compile_s:.1f}s; first call {1e3 * first_s:.0f} ms; "
          f"host prepare_inputs {1e3 * prep_s:.2f} ms (not in the timed forward)")
    print(f"timed runs: {args.iters} each in {len(split_iters(args.iters, args.rounds))} alternating round(s)")
    if jax_load.cores is not None:
        busy = max(jax_load.cores, torch_load.cores)
        print(f"CPU used by other processes while timing: {jax_load.cores:.2f} cores (mr1jax), "
              f"{torch_load.cores:.2f} cores (torch) of {n_threads}"
              + ("  ** machine busy: timings are inflated, torch's OpenMP most; re-run when idle **"
                 if machine_busy(busy, n_threads) else ""))
    flops = prefill_flops(cfg, param_counts(model), batch, input_ids.shape[1], pixel_values.shape[0],
                          len(image_grid_thw), head_positions=input_ids.shape[1])["total"]
    print(f"FLOPs per forward (module docstring's formula, LM head on all {input_ids.shape[1]} positions): "
          f"{flops / 1e9:.1f} G -> mr1jax {flops / jax_ms / 1e6:.0f} GFLOP/s, torch {flops / torch_ms / 1e6:.0f} GFLOP/s")
    print(f"logits parity on {int(valid.sum())} valid positions: max |mr1jax - torch| = {max_diff:.3e} "
          f"(max |logit| {scale:.1f}, relative {max_diff / scale:.1e})")


# ------------------------------------------------------------------------------------------ 2B prefill MFU
def prefill_flops(cfg: Qwen2VLConfig, counts: dict[str, int], batch: int, seq_len: int, n_patches: int,
                  n_images: int, head_positions: int = 1) -> dict[str, float]:
    """Forward FLOPs of one prefill (see the module docstring); the LM head runs on `head_positions` per row."""
    t, v = cfg.text, cfg.vision
    text = 2 * counts["model.layers"] * batch * seq_len
    text += 4 * t.num_layers * batch * seq_len**2 * t.hidden_size
    head = 2 * t.vocab_size * t.hidden_size * batch * head_positions
    per_image = n_patches // n_images
    vision = 2 * (counts["visual.patch_embed"] + counts["visual.blocks"]) * n_patches
    vision += 4 * v.depth * n_images * per_image**2 * v.embed_dim
    vision += 2 * counts["visual.merger"] * n_patches // v.spatial_merge_size**2
    return {"text": float(text), "head": float(head), "vision": float(vision),
            "total": float(text + head + vision)}


def run_device_2b(args, cfg: Qwen2VLConfig | None = None) -> None:
    cfg = cfg or Qwen2VLConfig.qwen2_vl_2b_instruct()
    batch = args.batch_size or 8
    seq_len = args.seq_len or 1024
    grid = image_grid(cfg, args.image_size or 448)
    dev = jax.devices()[0]
    print(f"jax {jax.__version__} on {dev.platform} ({getattr(dev, 'device_kind', '?')}); "
          f"peak {args.peak_tflops} TFLOP/s")

    t0 = time.perf_counter()
    model = build_random_model(cfg, jnp.bfloat16)
    counts = param_counts(model)
    text_p, vision_p, total_p = summarize_params(counts)
    print(f"built random bf16 model in {time.perf_counter() - t0:.1f}s: {total_p:,} parameters "
          f"(text {text_p:,}, vision {vision_p:,})")

    rows = build_rows(cfg, batch, seq_len, grid, ragged=False)
    input_ids, attention_mask, pixel_values, image_grid_thw = make_batch(cfg, rows, seed=0)
    extra = prepare_inputs(cfg, input_ids, attention_mask, image_grid_thw)
    segments = extra.patch_segments
    if not isinstance(segments, int):
        raise SystemExit("expected equal-size images (static patch_segments)")
    n_patches = pixel_values.shape[0]
    print(f"inputs: batch {batch} x length {seq_len} ({batch * seq_len} tokens), one image of grid "
          f"{tuple(int(x) for x in grid)} per row ({n_patches} patches in all)")
    graphdef, state = nnx.split(model)

    def prefill(state, input_ids, attention_mask, position_ids, pixel_values, patch_pos):
        m = nnx.merge(graphdef, state)
        feats = m.image_features(pixel_values, patch_pos, segments)
        x = m.embed(input_ids, feats)
        valid = attention_mask.astype(bool)
        slots = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        hidden, _ = m.decode_hidden(x, position_ids, attention_mask_4d(valid, valid, slots, slots))
        return m.logits(hidden[:, -1]).astype(jnp.float32)  # next-token logits [B, vocab]

    jargs = [jax.device_put(x) for x in (input_ids, attention_mask, extra.position_ids,
                                         pixel_values.astype(jnp.bfloat16), extra.patch_pos)]
    t0 = time.perf_counter()
    compiled = jax.jit(prefill).lower(state, *jargs).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        compiled(state, *jargs).block_until_ready()
    times = timed(lambda: compiled(state, *jargs).block_until_ready(), args.iters)
    med = statistics.median(times)

    flops = prefill_flops(cfg, counts, batch, seq_len, n_patches, len(image_grid_thw))
    achieved = flops["total"] / med
    print()
    print(f"{'prefill (bf16)':<26} {'median ms':>10} {'min ms':>9} {'tokens/s':>12} {'TFLOP/s':>9} {'MFU':>7}")
    print("-" * 78)
    print(f"{'mr1jax jit prefill':<26} {1e3 * med:>10.2f} {1e3 * min(times):>9.2f} "
          f"{batch * seq_len / med:>12.0f} {achieved / 1e12:>9.1f} {achieved / (args.peak_tflops * 1e12):>7.1%}")
    print("-" * 78)
    print(f"compile {compile_s:.1f}s; {args.iters} timed runs after {args.warmup} warm-up(s); FLOPs per prefill "
          f"{flops['total'] / 1e12:.2f} T (text {flops['text'] / 1e12:.2f}, head {flops['head'] / 1e12:.3f}, "
          f"vision {flops['vision'] / 1e12:.2f})")


# ------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch_size", type=int, default=None, help="prompts per batch (default 1; 8 with --device_2b)")
    p.add_argument("--seq_len", type=int, default=None, help="prompt length incl. image tokens (default 128; "
                   "1024 with --device_2b)")
    p.add_argument("--image_size", type=int, default=None, help="square image side in pixels, one image per "
                   "prompt (default 224; 448 with --family=qwen2_5_vl or --device_2b)")
    p.add_argument("--family", default="qwen2_vl", choices=["qwen2_vl", "qwen2_5_vl"],
                   help="model family of the ~100M CPU comparison (qwen2_5_vl: windowed vision tower)")
    p.add_argument("--iters", type=int, default=20, help="timed runs per implementation")
    p.add_argument("--rounds", type=int, default=4, help="alternating timing blocks (CPU comparison)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up runs before timing (--device_2b)")
    p.add_argument("--no_ragged", action="store_true", help="all rows the same length (no padding)")
    p.add_argument("--device_2b", action="store_true", help="time the real 2B shape in bf16 (accelerator)")
    p.add_argument("--peak_tflops", type=float, default=989.0, help="device peak for MFU (H100 dense bf16: 989)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.device_2b:
        run_device_2b(args)
    else:
        run_compare(args)


if __name__ == "__main__":
    main()
