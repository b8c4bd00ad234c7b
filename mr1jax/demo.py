"""Forward-pass demo on an embedded tiny Qwen2-VL (no downloads): `python -m mr1jax.demo`.

Walks the whole input path the trainer uses: draws a picture with PIL, preprocesses it exactly as
`Qwen2VLImageProcessorPil`, formats a chat prompt with the packaged tokenizer (image placeholders expanded to
their feature count, left-padded to a length bucket), runs the jitted forward pass of a randomly initialised
Qwen2-VL-architecture model, samples grouped rollouts with the KV-cache sampler, then writes the model as a Hugging Face directory
and reads it back, checking the logits are bit-identical.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image, ImageDraw

from mr1jax.data.chat import build_messages, format_prompts
from mr1jax.data.tokenizer import load_tokenizer, model_token_ids
from mr1jax.data.vision import num_image_tokens, preprocess_images
from mr1jax.models.qwen2_vl import Qwen2VL, Qwen2VLConfig, prepare_inputs
from mr1jax.models.qwen2_vl.hf import load_pretrained, save_pretrained
from mr1jax.generate.sampler import generate


def demo_image(seed: int = 0, size: int = 112) -> Image.Image:
    """A few coloured shapes on grey, drawn with PIL."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (size, size), (128, 128, 128))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x, y = rng.integers(8, size - 24, size=2)
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        draw.ellipse([x, y, x + 16, y + 16], fill=colour)
    return img


def tiny_config_for(tokenizer) -> Qwen2VLConfig:
    return Qwen2VLConfig.tiny(vocab_size=len(tokenizer), hidden_size=128, num_layers=2, vision_depth=2,
                              **model_token_ids(tokenizer))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new_tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)

    log(f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.device_count()} device(s))")
    tok = load_tokenizer()
    cfg = tiny_config_for(tok)
    model = Qwen2VL(cfg, rngs=nnx.Rngs(args.seed))
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    log(f"tiny Qwen2-VL: {n_params:,} parameters, vocab {cfg.text.vocab_size} (packaged tokenizer)")

    images = [demo_image(args.seed), demo_image(args.seed + 1, size=84)]
    pixel_values, grid = preprocess_images(images, fixed_size=(112, 112))
    counts = num_image_tokens(grid)
    log(f"2 images -> pixel_values {pixel_values.shape}, grid {grid.tolist()}, {counts.tolist()} tokens each")
    questions = ["How many objects are there?", "What colour is the largest circle?"]
    batch = format_prompts(tok, [build_messages(q) for q in questions], [[int(c)] for c in counts],
                           buckets=(64, 128, 256))
    log(f"prompts -> input_ids {batch.input_ids.shape} (bucket), lengths {batch.lengths.tolist()}")

    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, ids, mask, pos, pv, patch_pos):
        return nnx.merge(graphdef, state).forward(ids, mask, pos, pv, patch_pos, len(grid))

    def logits_for(state, ids, mask):
        extra = prepare_inputs(cfg, ids, mask, grid)
        return forward(state, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(extra.position_ids),
                       jnp.asarray(pixel_values), jnp.asarray(extra.patch_pos))

    t = time.perf_counter()
    logits = logits_for(state, batch.input_ids, batch.attention_mask).block_until_ready()
    log(f"jitted forward: logits {logits.shape}, compile+run {time.perf_counter() - t:.2f}s")
    t = time.perf_counter()
    logits_for(state, batch.input_ids, batch.attention_mask).block_until_ready()
    log(f"warm forward: {1e3 * (time.perf_counter() - t):.1f} ms")

    # Grouped rollouts with the KV-cache sampler: greedy, then G=4 sampled completions per prompt.
    t = time.perf_counter()
    greedy = generate(model, batch.input_ids, batch.attention_mask, pixel_values, grid,
                      max_new_tokens=args.new_tokens, temperature=0.0)
    log(f"greedy rollout (compile + run): {time.perf_counter() - t:.2f}s")
    t = time.perf_counter()
    sampled = generate(model, batch.input_ids, batch.attention_mask, pixel_values, grid, num_samples=4,
                       max_new_tokens=args.new_tokens, temperature=1.0, top_p=0.95,
                       rng=jax.random.key(args.seed))
    jax.block_until_ready(sampled.tokens)
    log(f"sampled rollout, G=4: tokens {sampled.tokens.shape}, mean logprob "
        f"{float((sampled.logprobs.sum() / sampled.mask.sum())):.2f}, {time.perf_counter() - t:.2f}s")
    for q, row in zip(questions, np.asarray(greedy.tokens)):
        log(f"greedy {args.new_tokens} tokens for {q!r}: {tok.decode(row.tolist())!r} (random weights)")

    with tempfile.TemporaryDirectory() as d:
        save_pretrained(model, d)
        reloaded = load_pretrained(d, dtype=jnp.float32)
        same = np.array_equal(np.asarray(logits_for(nnx.split(reloaded)[1], batch.input_ids,
                                                    batch.attention_mask)),
                              np.asarray(logits_for(state, batch.input_ids, batch.attention_mask)))
    log(f"save_pretrained -> load_pretrained round trip: logits identical = {same}")
    if not same:
        raise SystemExit("round trip changed the logits")
    log("done")


if __name__ == "__main__":
    main()
