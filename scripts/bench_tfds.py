"""Throughput of the TFDS path: prepare (user JSONL with image files -> array_record), random-access reads, and
one process's share of the RL prompt pipeline.

    python scripts/bench_tfds.py --rows=16384 --image_size=56 --out=/tmp/mr1jax_bench_tfds

Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from mr1jax.data.pipeline import make_rl_dataset
from mr1jax.data.prepare import prepare_files
from mr1jax.data.tasks import TASKS
from mr1jax.data.tfds_source import open_tfds
from mr1jax.data.tokenizer import load_tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=16384)
    p.add_argument("--image_size", type=int, default=56)
    p.add_argument("--out", default="/tmp/mr1jax_bench_tfds")
    p.add_argument("--batches", type=int, default=50, help="pipeline batches of 16 to time")
    args = p.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    (out / "src").mkdir(parents=True)

    lines = []
    for i, ex in enumerate(TASKS["counting"](args.rows, seed=0, image_size=args.image_size)):
        ex["image"].save(out / "src" / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "question": ex["question"], "answer": ex["answer"]}))
    (out / "src" / "train.jsonl").write_text("\n".join(lines) + "\n")

    t = time.perf_counter()
    summary = prepare_files([str(out / "src" / "train.jsonl")], out=str(out / "tfds"), name="bench",
                            progress_every=args.rows // 4)
    print(json.dumps({"what": "prepare jsonl+png files", "rows": args.rows,
                      "seconds": round(time.perf_counter() - t, 2), "rows_per_s": summary["rows_per_s"],
                      "bytes": summary["bytes"]}), flush=True)

    src = open_tfds(summary["dir"])
    order = np.random.default_rng(0).permutation(len(src))[:4096]
    t = time.perf_counter()
    for i in order:
        src[int(i)]
    dt = time.perf_counter() - t
    print(json.dumps({"what": "random-access reads (TfdsSource[i])", "rows": len(order),
                      "rows_per_s": round(len(order) / dt, 1)}), flush=True)

    for count in (1, 2):
        t = time.perf_counter()
        ds = make_rl_dataset(open_tfds(summary["dir"]), tokenizer=load_tokenizer(), batch_size=16,
                             image_size=args.image_size, prompt_buckets=(64,), seed=0, shard_index=0,
                             shard_count=count)
        setup = time.perf_counter() - t
        it = iter(ds)
        next(it)
        t = time.perf_counter()
        for _ in range(args.batches):
            next(it)
        dt = time.perf_counter() - t
        print(json.dumps({"what": f"RL pipeline, shard 0 of {count}", "setup_s": round(setup, 2),
                          "prompts_per_s": round(16 * args.batches / dt, 1)}), flush=True)


if __name__ == "__main__":
    main()
