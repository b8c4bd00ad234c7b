#!/usr/bin/env python
"""Rollout throughput of mr1jax's jitted sampler against `transformers.generate`, and decode vs its roofline.

Default mode (CPU, about 2.5 minutes on 2 cores)::

    python scripts/bench_sampler.py [--repeats 3] [--prompts 4] [--num_samples 8] [--max_new_tokens 64]

builds the forward benchmark's ~100M-parameter Qwen2-VL (`mr1jax.testing.bench.bench_config`: real vocabulary
151936 and special ids, tied embeddings; text hidden 512, 4 layers, 8 heads / 2 kv heads, mrope_section
(8, 12, 12), intermediate 2816; vision depth 4, embed_dim 512, 8 heads, out_hidden_size 512; 116.2M
parameters, 97.7M of them text -- 77.8M the tied embedding -- and 18.5M vision) as a randomised
`transformers.Qwen2VLForConditionalGeneration` (`mr1jax.testing.hf_reference.build_hf_model`), saves it with
``save_pretrained`` and loads the same weights into mr1jax (`load_pretrained`, fp32;
`mr1jax.testing.bench.build_reference_pair`). The workload is ``--prompts`` left-padded prompts, each one 224x224
image (grid (1, 16, 16): 256 patches -> 64 image tokens) plus some text, G = ``--num_samples`` samples per
prompt and ``--max_new_tokens`` new tokens, at temperature 1 with top-k and top-p off. The stop id passed to
both implementations is ``--eos_id`` (default 151935, a padding row of the embedding that the real tokenizer
never produces; random weights essentially never draw it), so every row generates all new tokens and both
sides do the same work (checked and printed). It prints:

* a table -- implementation, median seconds, generated tokens/s (prompts * G * new tokens / seconds) and the
  speed-up over transformers -- for
  1. ``transformers`` ``generate(do_sample=True, num_return_sequences=G, top_k=0, top_p=1.0)`` (torch eager
     fp32, ``torch.inference_mode()``, ``torch.set_num_threads(os.cpu_count())``);
  2. mr1jax ``generate(..., num_samples=G)``: one vision + prefill pass per prompt shared by its G rows;
  3. mr1jax without prefill sharing: every prompt and its image repeated G times, ``num_samples=1``;
  4. mr1jax with ``max_new_tokens=1`` (prefill + one step), used for the decode time below;
  all timed in ``--repeats`` alternating rounds after one warm-up call each (every call ends with
  ``block_until_ready``); mr1jax compile time (first call minus the warm median) is printed separately;
* the decode phase: (median T(max_new_tokens) - median T(1)) / (max_new_tokens - 1) seconds per step, against
  the roofline per step = max(bytes / bandwidth, FLOPs / matmul peak), where bytes = all text-decoder
  parameters (embedding / tied head once) in fp32 + rows * average context * `kv_cache_bytes_per_token`, and
  FLOPs = 2 * text parameters * rows + 4 * layers * rows * context * heads * head_dim (QK^T and PV);
  bandwidth (a jitted sum and a jitted copy over a 1 GiB fp32 array, the faster of the two) and matmul peak
  (a jitted fp32 2048x2048 `jnp.dot`) are measured in the same run;
* `compile_count()` after the first calls and after all warm repeats (must not grow);
* the issue's targets ">= 4x transformers throughput" and "decode within 2x of the roofline", PASS / MISS;
* diagnostics (``--no_diagnose`` skips them): one shared rollout at temperature 0 (greedy) and one at top_p
  0.999 (which turns on the top-k/top-p filter branch of `mr1jax.generate.sampler.filter_logits`), neither recompiling;
  then the pieces of one decode step for the same rows, each jitted alone: the decoder layers (with a KV
  cache of the benchmark's size), the LM head, `sample_tokens` as benchmarked and with the sort on, the sort,
  the Gumbel draw of `jax.random.categorical`, argmax and log_softmax over [rows, vocab], next to their
  share of the measured step and the roofline of the decoder layers and of the LM head.

The CPU time other processes used while timing is printed: a shared machine inflates all timings
(torch's OpenMP most).

Device mode (accelerator; random weights, no torch)::

    python scripts/bench_sampler.py --gpu_2b [--gpu_prompts 32] [--num_samples 8] [--max_new_tokens 64]

builds the real Qwen2-VL-2B shape (`Qwen2VLConfig.qwen2_vl_2b_instruct()`, bf16, random weights) and samples
G=8 completions for 32 prompts (256 sequences, one 224x224 image each); prints compile time, the rollout
median, generated tokens/s, decode tokens/s (rows / decode step time) and the decode step against the
device roofline computed as above in bf16 (bandwidth from a jitted copy on the device, peak from a jitted
bf16 8192x8192 `jnp.dot`).
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

from mr1jax.generate import sampler  # noqa: E402
from mr1jax.models.qwen2_vl.config import Qwen2VLConfig  # noqa: E402
from mr1jax.models.qwen2_vl.model import Qwen2VL, init_cache  # noqa: E402
from mr1jax.testing.bench import (OtherLoad, bench_config, build_random_model, build_reference_pair,  # noqa: E402
                                  image_grid, machine_busy, measure_bandwidth, measure_matmul,
                                  median_seconds, param_counts, summarize_params, text_params, timed_once,
                                  torch_inputs)
from mr1jax.testing.hf_reference import make_batch  # noqa: E402

TARGET_SPEEDUP = 4.0    # the issue: mr1jax rollouts >= 4x transformers' generated tokens/s
TARGET_ROOFLINE = 2.0   # the issue: decode step within 2x of the roofline
UNUSED_EOS_ID = 151935  # last embedding row: padding beyond the real tokenizer's 151,665 tokens


def build_prompts(cfg: Qwen2VLConfig, n_prompts: int, n_text: int, image_size: int, seed: int = 0):
    """`n_prompts` left-padded prompts, one square image each; row i has 4 * (i % 4) fewer text tokens."""
    grid = image_grid(cfg, image_size)
    rows = [{"text": max(1, n_text - 4 * (i % 4)), "images": [grid]} for i in range(n_prompts)]
    return make_batch(cfg, rows, seed=seed)


def repeat_prompts(cfg: Qwen2VLConfig, input_ids, attention_mask, pixel_values, image_grid_thw, g: int):
    """Each prompt (and its images, in row-major order) repeated g times in a row: [A, B] -> [A x g, B x g]."""
    n_img = (np.asarray(input_ids) == cfg.vision_start_token_id).sum(-1)
    patches = np.asarray(image_grid_thw).prod(-1)
    img_bounds = np.concatenate([[0], np.cumsum(n_img)])
    patch_bounds = np.concatenate([[0], np.cumsum(patches)])
    pv, grids = [], []
    for r in range(len(input_ids)):
        i0, i1 = img_bounds[r], img_bounds[r + 1]
        block = pixel_values[patch_bounds[i0]:patch_bounds[i1]]
        pv += [block] * g
        grids += [image_grid_thw[i0:i1]] * g
    return (np.repeat(input_ids, g, axis=0), np.repeat(attention_mask, g, axis=0),
            np.concatenate(pv), np.concatenate(grids))


def decode_roofline(cfg: Qwen2VLConfig, counts: dict[str, int], rows: int, avg_context: float, itemsize: int,
                    kv_bytes_per_token: int, bandwidth: float, peak: float) -> dict[str, float]:
    """Ideal seconds for one decode step of `rows` rows at `avg_context` keys (see the module docstring)."""
    t = cfg.text
    p = text_params(counts)
    weight_bytes = p * itemsize
    kv_bytes = rows * avg_context * kv_bytes_per_token
    flops = 2 * p * rows + 4 * t.num_layers * rows * avg_context * t.num_heads * t.head_dim
    mem_s = (weight_bytes + kv_bytes) / bandwidth
    flop_s = flops / peak
    return dict(weight_bytes=weight_bytes, kv_bytes=kv_bytes, flops=flops, mem_s=mem_s, flop_s=flop_s,
                step_s=max(mem_s, flop_s), bound="memory" if mem_s >= flop_s else "compute")


def jax_generate(model, batch, *, num_samples, max_new_tokens, eos, seed, temperature=1.0, top_p=1.0,
                 key_impl=None):
    """One mr1jax rollout (top_k off), blocked until ready; returns the Rollouts."""
    input_ids, attention_mask, pixel_values, image_grid_thw = batch
    out = sampler.generate(model, input_ids, attention_mask, pixel_values, image_grid_thw,
                            num_samples=num_samples, max_new_tokens=max_new_tokens, temperature=temperature,
                            top_p=top_p, top_k=0, eos_token_ids=(eos,), rng=jax.random.key(seed, impl=key_impl))
    jax.block_until_ready(out.tokens)
    return out


def _inverse_cdf_sample(logits, rng):
    """Reference only (not mr1jax's method): one uniform per row against the softmax CDF."""
    cdf = jnp.cumsum(jax.nn.softmax(logits, -1), -1)
    u = jax.random.uniform(rng, (logits.shape[0], 1)) * cdf[:, -1:]
    return jnp.sum(cdf < u, -1)


def sampling_step_costs(rows: int, vocab: int, iters: int) -> dict[str, float]:
    """Seconds per call of the per-step pieces of the sampler that touch the whole [rows, vocab] fp32 logits.

    Sampling parameters and the key are passed as arguments (traced, as inside the rollout).
    """
    logits = 8.0 * jax.random.normal(jax.random.key(1), (rows, vocab), jnp.float32)
    rng = jax.random.key(2)
    t, k, p_off, p_on = jnp.float32(1.0), jnp.int32(0), jnp.float32(1.0), jnp.float32(0.999)
    cases = {
        "sample_tokens, top_p=1 (as benchmarked)": (lambda x, r, p: sampler.sample_tokens(x, r, t, k, p), p_off),
        "sample_tokens, top_p=0.999 (top-p filter)": (lambda x, r, p: sampler.sample_tokens(x, r, t, k, p), p_on),
        "  jnp.sort alone": (lambda x, r, p: jnp.sort(x, axis=-1), p_off),
        "  jax.random.categorical alone (Gumbel)": (lambda x, r, p: jax.random.categorical(r, x, axis=-1), p_off),
        "  jax.random.uniform over [rows, vocab]": (lambda x, r, p: jax.random.uniform(r, x.shape), p_off),
        "  argmax (greedy branch)": (lambda x, r, p: jnp.argmax(x, -1), p_off),
        "log_softmax + gather (logprobs)": (
            lambda x, r, p: jnp.take_along_axis(jax.nn.log_softmax(x, -1), jnp.argmax(x, -1)[:, None], -1), p_off),
        "ref: inverse-CDF draw (1 uniform/row)": (lambda x, r, p: _inverse_cdf_sample(x, r), p_off),
    }
    out = {}
    for name, (fn, p) in cases.items():
        f = jax.jit(fn)
        out[name] = median_seconds(lambda f=f, p=p: f(logits, rng, p).block_until_ready(), iters)
    return out


def decode_model_costs(model: Qwen2VL, rows: int, cache_size: int, context: int, iters: int) -> dict[str, float]:
    """Seconds per call of one decode step's model work for `rows` rows (KV cache of `cache_size` slots, the
    first `context` valid): the decoder layers (embedding lookup, rotary, attention over the cache, MLPs, norm)
    and the LM head [rows, hidden] x [hidden, vocab], each jitted alone."""
    graphdef, state = nnx.split(model)
    t = model.config.text
    cache = init_cache(t, rows, cache_size, model.dtype)
    # as the sampler's decode loop: per-layer weight slices taken once, outside the timed step
    layers_graphdef, layers_state = nnx.split(nnx.List(model.decode_layers()))
    key_valid = jnp.broadcast_to(jnp.arange(cache_size) < context, (rows, cache_size))
    tok = jnp.zeros((rows,), jnp.int32)

    def layers(state, layers_state, cache, tok, key_valid):
        m = nnx.merge(graphdef, state)
        unstacked = list(nnx.merge(layers_graphdef, layers_state))
        pos = jnp.full((3, rows, 1), context, jnp.int32)
        return m.decode_hidden(m.embed(tok[:, None]), pos, key_valid[:, None, None, :], cache, context - 1,
                               unstacked)

    def head(state, hidden):
        return nnx.merge(graphdef, state).logits(hidden).astype(jnp.float32)

    cases = {"decoder layers (4 layers, KV cache)": (jax.jit(layers), (state, layers_state, cache, tok, key_valid)),
             "LM head (tied embedding matmul)": (jax.jit(head), (state, jnp.ones((rows, t.hidden_size),
                                                                              model.dtype)))}
    return {name: median_seconds(lambda f=f, fargs=fargs: jax.block_until_ready(f(*fargs)), iters)
            for name, (f, fargs) in cases.items()}


# ------------------------------------------------------------------------------------------ CPU comparison
def run_compare(args) -> None:
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    n_threads = os.cpu_count() or 1
    torch.set_num_threads(n_threads)
    cfg = bench_config()
    g, t_new, eos = args.num_samples, args.max_new_tokens, args.eos_id
    if t_new < 2:
        raise SystemExit("--max_new_tokens must be >= 2 (the decode time is T(max_new_tokens) - T(1))")
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; torch {torch.__version__} with {n_threads} "
          f"threads; transformers {transformers.__version__}; cpu_count {n_threads}")

    t0 = time.perf_counter()
    hf_model, model = build_reference_pair(cfg, seed=0)
    counts = param_counts(model)
    p_text = text_params(counts)
    p_vision = summarize_params(counts)[1]
    print(f"built the torch model and loaded the same weights into mr1jax in {time.perf_counter() - t0:.1f}s: "
          f"{p_text + p_vision:,} parameters (text {p_text:,} incl. tied embedding "
          f"{counts['model.embed_tokens']:,}; vision {p_vision:,})")

    batch = build_prompts(cfg, args.prompts, args.text_tokens, args.image_size)
    input_ids, attention_mask, pixel_values, image_grid_thw = batch
    n_valid = attention_mask.sum(-1)
    rows = args.prompts * g
    n_gen = rows * t_new
    print(f"workload: {args.prompts} prompts (length {input_ids.shape[1]}, {n_valid.min()}-{n_valid.max()} valid "
          f"tokens, one image of grid {tuple(int(x) for x in image_grid_thw[0])} each -> "
          f"{int((input_ids[0] == cfg.image_token_id).sum())} image tokens), G={g}, {t_new} new tokens: "
          f"{rows} rows, {n_gen} generated tokens per call; temperature 1, top_k 0, top_p 1; stop id {eos}")
    rep_batch = repeat_prompts(cfg, *batch, g)

    # ---- transformers
    tkw = torch_inputs(cfg, input_ids, attention_mask, pixel_values, image_grid_thw)
    hf_calls = [0]

    def run_hf():
        torch.manual_seed(hf_calls[0])
        hf_calls[0] += 1
        with torch.inference_mode():
            return hf_model.generate(**tkw, do_sample=True, num_return_sequences=g, max_new_tokens=t_new,
                                     temperature=1.0, top_k=0, top_p=1.0, eos_token_id=eos,
                                     pad_token_id=cfg.pad_token_id)

    # ---- mr1jax variants: name -> (batch, num_samples, max_new_tokens)
    variants = {
        "shared": (batch, g, t_new),
        "unshared": (rep_batch, 1, t_new),
        "one_token": (batch, g, 1),
    }
    calls = {k: 0 for k in variants}

    def run_jax(name, **kw):
        b, ns, tn = variants[name]
        calls[name] += 1
        return jax_generate(model, b, num_samples=ns, max_new_tokens=tn, eos=eos, seed=calls[name], **kw)

    # ---- first calls (compile), then warm-ups and the work check
    print()
    first = {}
    for name in variants:
        first[name] = timed_once(lambda: run_jax(name))
    count_after_compile = sampler.compile_count()
    t0 = time.perf_counter()
    hf_out = run_hf()  # warm-up
    hf_first = time.perf_counter() - t0
    hf_new = hf_out[:, input_ids.shape[1]:].numpy()
    jx = run_jax("shared")
    jx_un = run_jax("unshared")
    hf_eos = int((hf_new == eos).sum())
    print(f"work check: transformers returned {hf_new.shape[0]} x {hf_new.shape[1]} new tokens, "
          f"{hf_eos} stop id(s); mr1jax shared: lengths {int(jx.lengths.min())}-{int(jx.lengths.max())}, "
          f"{int(jx.truncated.sum())}/{rows} truncated; unshared: lengths {int(jx_un.lengths.min())}-"
          f"{int(jx_un.lengths.max())}" + ("" if hf_eos == 0 and int(jx.lengths.min()) == t_new
                                             else "  ** rows stopped early: pick another --eos_id **"))

    # ---- timing: alternating rounds
    order = ["transformers", "shared", "unshared", "one_token"]
    times = {k: [] for k in order}
    loads = {k: OtherLoad() for k in order}
    for _ in range(args.repeats):
        for name in order:
            fn = run_hf if name == "transformers" else (lambda n=name: run_jax(n))
            times[name].append(timed_once(fn, loads[name]))
    count_after_warm = sampler.compile_count()
    med = {k: statistics.median(v) for k, v in times.items()}

    # ---- machine: bandwidth and matmul peak (same run)
    bw = measure_bandwidth(args.bandwidth_mib << 20)
    bandwidth = max(bw.values())
    peak = measure_matmul(2048, jnp.float32)

    # ---- table
    labels = {
        "transformers": f"transformers generate (G={g} via num_return_sequences)",
        "shared": f"mr1jax generate num_samples={g} (shared prefill)",
        "unshared": f"mr1jax, {rows} repeated prompts, num_samples=1",
    }
    print()
    print(f"{'implementation':<52} {'seconds':>8} {'min s':>7} {'gen tokens/s':>13} {'vs transformers':>16}")
    print("-" * 100)
    for name, label in labels.items():
        s = med[name]
        print(f"{label:<52} {s:>8.2f} {min(times[name]):>7.2f} {n_gen / s:>13.1f} "
              f"{med['transformers'] / s:>15.2f}x")
    print("-" * 100)
    print(f"medians of {args.repeats} warm call(s) each, alternating; {n_gen} generated tokens per call "
          f"({args.prompts} prompts x G={g} x {t_new})")
    print(f"mr1jax first call (trace + compile + run): shared {first['shared']:.1f}s -> compile ~"
          f"{first['shared'] - med['shared']:.1f}s; unshared {first['unshared']:.1f}s -> compile ~"
          f"{first['unshared'] - med['unshared']:.1f}s; max_new_tokens=1 {first['one_token']:.1f}s -> compile ~"
          f"{first['one_token'] - med['one_token']:.1f}s; transformers first call {hf_first:.1f}s")
    print(f"compile_count: {count_after_compile} after the first calls, {count_after_warm} after all warm calls "
          f"({'no recompiles' if count_after_warm == count_after_compile else 'RECOMPILED'})")
    if loads["shared"].cores is not None:
        busy = max(ld.cores for ld in loads.values())
        print("CPU used by other processes while timing: " +
              ", ".join(f"{ld.cores:.2f} ({k})" for k, ld in loads.items()) + f" cores of {n_threads}" +
              ("  ** machine busy: timings are inflated **" if machine_busy(busy, n_threads) else ""))

    # ---- decode vs roofline
    step_s = (med["shared"] - med["one_token"]) / (t_new - 1)
    avg_ctx = float(n_valid.mean()) + t_new / 2 + 1  # steps 1..T-1 see n_valid + k + 1 keys
    kvb = sampler.kv_cache_bytes_per_token(model, jnp.float32)
    roof = decode_roofline(cfg, counts, rows, avg_ctx, 4, kvb, bandwidth, peak)
    ratio = step_s / roof["step_s"]
    speedup = med["transformers"] / med["shared"]
    print()
    print(f"machine: memory bandwidth {bw['read'] / 1e9:.1f} GB/s (jitted sum) / {bw['copy'] / 1e9:.1f} GB/s "
          f"(jitted copy, read + write) over {args.bandwidth_mib} MiB -> using {bandwidth / 1e9:.1f} GB/s; "
          f"fp32 matmul peak {peak / 1e9:.1f} GFLOP/s (jitted 2048x2048 jnp.dot)")
    print(f"decode step: ({med['shared']:.3f}s - {med['one_token']:.3f}s) / {t_new - 1} = "
          f"{1e3 * step_s:.1f} ms for {rows} rows ({rows / step_s:.0f} decode tokens/s)")
    print(f"roofline per step: bytes {roof['weight_bytes'] / 1e6:.0f} MB weights ({p_text:,} fp32 text params) + "
          f"{roof['kv_bytes'] / 1e6:.1f} MB KV ({rows} rows x {avg_ctx:.1f} avg context x {kvb} B/token) -> "
          f"{1e3 * roof['mem_s']:.1f} ms; FLOPs {roof['flops'] / 1e9:.2f} G -> {1e3 * roof['flop_s']:.1f} ms; "
          f"roofline {1e3 * roof['step_s']:.1f} ms ({roof['bound']}-bound)")
    print(f"decode measured / roofline = {1e3 * step_s:.1f} / {1e3 * roof['step_s']:.1f} ms = {ratio:.2f}x")
    print()
    print(f"target >= {TARGET_SPEEDUP:.0f}x transformers throughput: {speedup:.2f}x -> "
          f"{'PASS' if speedup >= TARGET_SPEEDUP else 'MISS'}")
    print(f"target decode within {TARGET_ROOFLINE:.0f}x of the roofline: {ratio:.2f}x -> "
          f"{'PASS' if ratio <= TARGET_ROOFLINE else 'MISS'}")

    if args.no_diagnose:
        return
    # ---- diagnostics: where a decode step goes
    print()
    print("diagnostics: where a decode step goes")
    count0 = sampler.compile_count()
    diag = {"temperature 0 (greedy)": dict(temperature=0.0),
            "top_p 0.999 (top-p filter branch on)": dict(top_p=0.999)}
    for label, kw in diag.items():
        s = timed_once(lambda: run_jax("shared", **kw))
        print(f"  shared rollout at {label:<36} {s:7.2f}s  ({s - med['shared']:+.2f}s vs temperature 1 / top_p 1 "
              f"= {(s - med['shared']) / t_new * 1e3:+.1f} ms per step)")
    print(f"  (one call each, sampling parameters traced: compile_count {count0} -> {sampler.compile_count()})")
    model_costs = decode_model_costs(model, rows, input_ids.shape[1] + t_new, int(avg_ctx), args.diag_iters)
    costs = sampling_step_costs(rows, cfg.text.vocab_size, iters=args.diag_iters)
    print(f"  pieces of one decode step for {rows} rows, each jitted alone (median of {args.diag_iters}); the "
          f"measured step is {1e3 * step_s:.1f} ms, its roofline {1e3 * roof['step_s']:.1f} ms:")
    for name, s in {**model_costs, **costs}.items():
        print(f"    {name:<42} {1e3 * s:8.1f} ms  {s / step_s:6.1%} of the step")
    model_s = sum(model_costs.values())
    vocab_s = costs["sample_tokens, top_p=1 (as benchmarked)"] + costs["log_softmax + gather (logprobs)"]
    layer_roof = decode_roofline(cfg, {"model.layers": counts["model.layers"]}, rows, avg_ctx, 4, kvb,
                                 bandwidth, peak)["step_s"]
    head_p = counts.get("lm_head", counts["model.embed_tokens"])
    head_roof = max(head_p * 4 / bandwidth, 2 * head_p * rows / peak)
    print(f"  model work {1e3 * model_s:.1f} ms (decoder layers roofline {1e3 * layer_roof:.1f} ms, LM head "
          f"roofline {1e3 * head_roof:.1f} ms) + sampling and logprobs {1e3 * vocab_s:.1f} ms = "
          f"{1e3 * (model_s + vocab_s):.1f} ms (measured step {1e3 * step_s:.1f} ms)")


# ------------------------------------------------------------------------------------------ 2B on a device
def run_gpu_2b(args, cfg: Qwen2VLConfig | None = None) -> None:
    cfg = cfg or Qwen2VLConfig.qwen2_vl_2b_instruct()
    g, t_new, eos = args.num_samples, args.max_new_tokens, args.eos_id
    if t_new < 2:
        raise SystemExit("--max_new_tokens must be >= 2 (the decode time is T(max_new_tokens) - T(1))")
    dev = jax.devices()[0]
    print(f"jax {jax.__version__} on {dev.platform} ({getattr(dev, 'device_kind', '?')})")
    t0 = time.perf_counter()
    model = build_random_model(cfg, jnp.bfloat16)
    counts = param_counts(model)
    p_text = text_params(counts)
    print(f"built random bf16 model in {time.perf_counter() - t0:.1f}s: text {p_text:,} parameters, vision "
          f"{summarize_params(counts)[1]:,}")
    batch = build_prompts(cfg, args.gpu_prompts, args.text_tokens, args.image_size)
    input_ids, attention_mask, pixel_values, image_grid_thw = batch
    batch = (input_ids, attention_mask, pixel_values.astype(jnp.bfloat16), image_grid_thw)
    n_valid = attention_mask.sum(-1)
    rows = args.gpu_prompts * g
    n_gen = rows * t_new
    print(f"workload: {args.gpu_prompts} prompts of length {input_ids.shape[1]}, G={g} -> {rows} rows, "
          f"{t_new} new tokens ({n_gen} generated tokens per call); stop id {eos}")

    def run(tn, seed):
        return jax_generate(model, batch, num_samples=g, max_new_tokens=tn, temperature=1.0, eos=eos, seed=seed)

    first = {tn: timed_once(lambda: run(tn, 0)) for tn in (t_new, 1)}
    c0 = sampler.compile_count()
    out = run(t_new, 1)
    times = {t_new: [], 1: []}
    for r in range(args.repeats):
        for tn in (t_new, 1):
            times[tn].append(timed_once(lambda: run(tn, 2 + r)))
    med = {tn: statistics.median(v) for tn, v in times.items()}
    bw = measure_bandwidth(args.bandwidth_mib << 20, jnp.bfloat16)["copy"]
    peak = measure_matmul(8192, jnp.bfloat16)
    step_s = (med[t_new] - med[1]) / (t_new - 1)
    avg_ctx = float(n_valid.mean()) + t_new / 2 + 1
    kvb = sampler.kv_cache_bytes_per_token(model, jnp.bfloat16)
    roof = decode_roofline(cfg, counts, rows, avg_ctx, 2, kvb, bw, peak)
    print()
    print(f"rollout: median {med[t_new]:.3f}s (min {min(times[t_new]):.3f}s) -> {n_gen / med[t_new]:.0f} generated "
          f"tokens/s; max_new_tokens=1: {med[1]:.3f}s; lengths {int(out.lengths.min())}-{int(out.lengths.max())}")
    print(f"compile ~{first[t_new] - med[t_new]:.1f}s ({t_new} tokens), ~{first[1] - med[1]:.1f}s (1 token); "
          f"compile_count {c0} -> {sampler.compile_count()} over the warm calls")
    print(f"device: copy bandwidth {bw / 1e9:.0f} GB/s over {args.bandwidth_mib} MiB (jitted copy); bf16 matmul "
          f"{peak / 1e12:.0f} TFLOP/s (jitted 8192x8192 jnp.dot)")
    print(f"decode step {1e3 * step_s:.2f} ms for {rows} rows -> {rows / step_s:.0f} decode tokens/s; roofline "
          f"{1e3 * roof['step_s']:.2f} ms ({roof['bound']}-bound: {roof['weight_bytes'] / 1e9:.2f} GB weights + "
          f"{roof['kv_bytes'] / 1e9:.2f} GB KV; {roof['flops'] / 1e12:.2f} TFLOP) -> {rows / roof['step_s']:.0f} "
          f"decode tokens/s")
    ratio = step_s / roof["step_s"]
    print(f"decode measured / roofline = {ratio:.2f}x (target <= {TARGET_ROOFLINE:.0f}x: "
          f"{'PASS' if ratio <= TARGET_ROOFLINE else 'MISS'})")


# ------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=4, help="prompts per batch (CPU comparison)")
    p.add_argument("--num_samples", type=int, default=8, help="G: samples per prompt")
    p.add_argument("--max_new_tokens", type=int, default=64, help="new tokens per sample (>= 2)")
    p.add_argument("--text_tokens", type=int, default=32, help="text tokens of the longest prompt (besides the "
                   "image's 64 + 2)")
    p.add_argument("--image_size", type=int, default=224, help="square image side in pixels, one per prompt")
    p.add_argument("--repeats", type=int, default=3, help="timed warm calls per implementation")
    p.add_argument("--eos_id", type=int, default=UNUSED_EOS_ID, help="stop id passed to both implementations")
    p.add_argument("--bandwidth_mib", type=int, default=1024, help="array size for the bandwidth measurement")
    p.add_argument("--no_diagnose", action="store_true", help="skip the sampler diagnostics")
    p.add_argument("--diag_iters", type=int, default=5, help="timed calls per per-step diagnostic")
    p.add_argument("--gpu_2b", action="store_true", help="time the real 2B shape in bf16 on an accelerator")
    p.add_argument("--gpu_prompts", type=int, default=32, help="prompts with --gpu_2b (x G rows)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.gpu_2b:
        run_gpu_2b(args)
    else:
        run_compare(args)


if __name__ == "__main__":
    main()
