"""Native resolution vs fixed-size images on a realistic size mix (CPU, one run, ratios).

    python scripts/bench_native.py                       # Geometry3K-like mix, OThink-MR1's max_pixels
    python scripts/bench_native.py --rows=128 --max_pixels=1003520

The mix: widths 150-1,000 px, aspect ratios (width / height) 0.3-3, drawn per image (a diagram-like picture:
a light background with a few dark shapes, PNG-encoded, as datasets store them). Printed:

1. padding: the share of padding patches when each batch's prompts are padded to the smallest patch bucket that
   holds its largest prompt (what the pipeline does), vs padding every prompt to the largest bucket, and the
   buckets hit (= compiled programs per step function at most);
2. visual tokens per image: native vs the fixed square of the same max_pixels budget;
3. data pipeline rows/s (decode + resize + patchify + tokenize + batch): native vs fixed;
4. vision tower time per image (a 4-block, 256-wide tower, fp32): native padded blocks vs fixed squares.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from mr1jax.data.pipeline import make_rl_dataset  # noqa: E402
from mr1jax.data.tokenizer import load_tokenizer  # noqa: E402
from mr1jax.data.sizing import ImageSizing  # noqa: E402
from mr1jax.data.vision import smart_resize  # noqa: E402
from mr1jax.models.qwen2_vl import rope  # noqa: E402
from mr1jax.models.qwen2_vl.config import VisionConfig  # noqa: E402
from mr1jax.models.qwen2_vl.vision import VisionTower  # noqa: E402


def diagram(rng: np.random.Generator, width: int, height: int) -> bytes:
    img = Image.new("RGB", (width, height), (245, 245, 240))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 8))):
        x0, y0 = int(rng.integers(0, width - 10)), int(rng.integers(0, height - 10))
        x1, y1 = x0 + int(rng.integers(5, width // 2 + 6)), y0 + int(rng.integers(5, height // 2 + 6))
        draw.rectangle([x0, y0, x1, y1], outline=(30, 30, 30), width=2)
        draw.line([x0, y1, x1, y0], fill=(20, 20, 120), width=2)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def size_mix(n: int, seed: int) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    widths = rng.integers(150, 1001, n)
    aspects = np.exp(rng.uniform(np.log(0.3), np.log(3.0), n))
    return [(int(w), max(28, int(round(w / a)))) for w, a in zip(widths, aspects)]


def timed_rows_per_s(rows, tokenizer, batch: int, **image) -> float:
    ds = make_rl_dataset(rows, tokenizer=tokenizer, batch_size=batch, prompt_buckets=(8192,), seed=0, shuffle=False,
                         num_epochs=1, read_threads=1, **image)
    t0 = time.perf_counter()
    n = sum(b.batch_size for b in ds)
    return n / (time.perf_counter() - t0)


def vision_seconds_per_image(tower, grids: list[tuple[int, int]], block: int | None, batch: int, repeats: int
                             ) -> float:
    """Median time of the tower over `batch` images (native: per-prompt padded blocks; fixed: equal grids)."""
    grid = np.array([[1, h, w] for h, w in grids[:batch]])
    if block is None:
        n, segments, pos = int(grid.prod(-1).sum()), batch, rope.vision_position_ids(grid, 2)
    else:
        pos, segments = rope.padded_patch_layout(grid, np.ones(batch, np.int64), block, 2)
        n, segments = batch * block, jnp.asarray(segments)
    pixels = jnp.asarray(np.random.default_rng(0).normal(size=(n, 1176)).astype(np.float32))
    fn = jax.jit(lambda p, q, s: tower(p, q, s, block) if block else tower(p, q, segments))
    args = (pixels, jnp.asarray(pos), segments if block else 0)
    fn(*args).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args).block_until_ready()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) / batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16, help="prompts per batch (the recipes' 16)")
    ap.add_argument("--max_pixels", type=int, default=401408, help="OThink-MR1's limit")
    ap.add_argument("--min_pixels", type=int, default=56 * 56)
    ap.add_argument("--pipeline_rows", type=int, default=64)
    ap.add_argument("--tower_batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    sizes = size_mix(args.rows, 0)
    sizing = ImageSizing(0, args.min_pixels, args.max_pixels)
    buckets = sizing.patch_buckets()
    grids = []
    for w, h in sizes:
        rh, rw = smart_resize(h, w, min_pixels=args.min_pixels, max_pixels=args.max_pixels)
        grids.append((rh // 14, rw // 14))
    patches = np.array([h * w for h, w in grids])
    side = int(math.sqrt(args.max_pixels) // 28 * 28)          # the fixed square with the same pixel budget
    fixed_patches = (side // 14) ** 2

    # 1. padding per batch (consecutive rows, as an unshuffled pipeline batches them)
    used, real, worst, hit = 0, 0, 0, set()
    for b in range(0, len(patches) - args.batch + 1, args.batch):
        chunk = patches[b:b + args.batch]
        bucket = buckets(int(chunk.max()))
        hit.add(bucket)
        used += bucket * len(chunk)
        worst += buckets.sizes[-1] * len(chunk)
        real += int(chunk.sum())
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; {args.rows} images, widths 150-1000 px, aspect "
          f"0.3-3; min_pixels {args.min_pixels}, max_pixels {args.max_pixels}; batches of {args.batch}")
    print(f"patch buckets {list(buckets.sizes)}")
    print()
    print(f"{'padding':44s} {'share of patch slots':>22s}")
    print(f"{'  batch padded to its bucket (the pipeline)':44s} {1 - real / used:>21.1%}")
    print(f"{'  every prompt padded to the largest bucket':44s} {1 - real / worst:>21.1%}")
    print(f"  buckets hit: {len(hit)} of {len(buckets.sizes)} ({sorted(hit)}): at most {len(hit)} compiled "
          "programs per step function")
    print()
    print(f"visual tokens per image: native mean {patches.mean() / 4:.0f} (min {patches.min() // 4}, max "
          f"{patches.max() // 4}); fixed {side} x {side} square: {fixed_patches // 4} for every image")

    # 3. pipeline throughput
    rng = np.random.default_rng(1)
    rows = [{"image": diagram(rng, w, h), "question": "Find the angle x.", "answer": "30"}
            for w, h in sizes[:args.pipeline_rows]]
    tok = load_tokenizer()
    native = timed_rows_per_s(rows, tok, 8, image_size=0, min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    fixed = timed_rows_per_s(rows, tok, 8, image_size=side)
    print()
    print(f"{'data pipeline':30s} {'rows/s':>10s}")
    print(f"{'  native resolution':30s} {native:>10.1f}")
    print(f"{'  fixed ' + str(side) + ' px':30s} {fixed:>10.1f}")
    print(f"  native / fixed = {native / fixed:.2f}")

    # 4. vision tower per image
    cfg = VisionConfig(depth=4, embed_dim=256, num_heads=4, mlp_ratio=4, out_hidden_size=256)
    tower = VisionTower(cfg, rngs=nnx.Rngs(0))
    k = args.tower_batch
    block = buckets(int(patches[:k].max()))
    t_native = vision_seconds_per_image(tower, grids, block, k, args.repeats)
    t_fixed = vision_seconds_per_image(tower, [(side // 14, side // 14)] * k, None, k, args.repeats)
    print()
    print(f"{'vision tower (4 x 256, fp32), per image':44s} {'ms':>8s} {'patches':>9s}")
    print(f"{'  native, padded to bucket ' + str(block):44s} {1e3 * t_native:>8.1f} {block:>9d}")
    print(f"{'  fixed ' + str(side) + ' px':44s} {1e3 * t_fixed:>8.1f} {fixed_patches:>9d}")
    print(f"  native / fixed = {t_native / t_fixed:.2f}")


if __name__ == "__main__":
    main()
