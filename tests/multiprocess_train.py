"""One process of a multi-process training run on this machine (tests/test_multiprocess.py launches them).

    python tests/multiprocess_train.py --workdir=DIR --processes=2 --process_id=i --port=P [--devices=4]
    python tests/multiprocess_train.py --workdir=DIR --processes=1 --devices=8          # the 1-process reference

Each process gets `--devices` fake CPU devices; the processes join through `config.distributed` (gloo
collectives). The run is the tiny default shortened to a few SFT + GRPO steps, with a deterministic stand-in
reward (a random model never earns the real one, and zero advantages would test nothing). `--slow_reward_on=i`
makes process i's reward time out on some rows. `--max_steps=N` stops after N steps (a later run resumes);
`--sleep_per_step=s` slows each step (for signal tests); `--family=qwen2_5_vl`, `--lora_rank=r` train the
other model family / LoRA adapters. Prints `RESULT <json>` at the end.
"""

import argparse
import os
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("--workdir", required=True)
parser.add_argument("--processes", type=int, default=1)
parser.add_argument("--process_id", type=int, default=0)
parser.add_argument("--port", type=int, default=0)
parser.add_argument("--devices", type=int, default=4)
parser.add_argument("--max_steps", type=int, default=-1)
parser.add_argument("--slow_reward_on", type=int, default=-1)
parser.add_argument("--sleep_per_step", type=float, default=0.0)
parser.add_argument("--family", default="qwen2_vl")
parser.add_argument("--lora_rank", type=int, default=0)
parser.add_argument("--native", type=int, default=0, help="1: native resolution on mixed image sizes")
parser.add_argument("--lr", type=float, default=3e-4, help="the RL learning rate (differs per process in a test)")
parser.add_argument("--timeout_s", type=int, default=300, help="config.distributed.timeout_s")
parser.add_argument("--peer_timeout_s", type=float, default=30, help="config.distributed.peer_timeout_s")
args = parser.parse_args()
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import grpo  # noqa: E402
from mr1jax.trainer import rollout, step as train_steps  # noqa: E402
from mr1jax.trainer.loop import EXIT_PREEMPTED, train_and_evaluate  # noqa: E402


def fake_reward_parts(texts, answers, timeout_s):
    """Deterministic stand-in accuracy (differs between a prompt's samples, so advantages are non-zero). With
    `--slow_reward_on` = this process: its scoring takes 2 s longer and half its rows "time out" (score 0 and
    are counted), as a reward worker stuck on one host would."""
    acc = np.array([float(len(t) % 3 == 0) for t in texts], np.float32)
    stats = {}
    if args.slow_reward_on == jax.process_index():
        time.sleep(2.0)
        slow = np.array([len(t) % 2 == 1 for t in texts])
        acc[slow] = 0.0
        stats = {"n_timeouts": int(slow.sum())}
    fmt = np.array([float(sum(map(ord, t)) % 2) for t in texts], np.float32)
    return acc, fmt, stats


rollout.reward_parts = fake_reward_parts
if args.sleep_per_step:
    _rl_step = train_steps.rl_step

    def slow_rl_step(*a, **k):
        time.sleep(args.sleep_per_step)
        return _rl_step(*a, **k)

    import mr1jax.trainer.loop as loop_module
    loop_module.rl_step = slow_rl_step


def config():
    c = grpo.get_config()
    c.sft.steps, c.total_steps, c.max_steps = 2, 4, args.max_steps
    c.data.batch_size, c.rollout.num_samples, c.rollout.max_new_tokens = 8, 2, 8
    c.data.num_train, c.data.num_eval, c.eval.num_batches, c.eval.every_steps = 64, 16, 1, 0
    c.model.tiny.hidden_size = 64
    c.sft.learning_rate, c.optim.learning_rate, c.optim.warmup_steps = 3e-4, args.lr, 0
    c.rl.micro_batches = 2
    c.model.logit_chunk = 4
    c.checkpoint.every_steps = 1
    c.model.family = args.family
    if args.native:                  # images of several sizes, each at its own grid, padded per prompt
        c.data.image_size, c.data.mixed_sizes, c.data.scene_size = 0, True, 56
        c.data.min_pixels, c.data.max_pixels, c.data.prompt_bucket = 28 * 28, 112 * 112, 96
    if args.lora_rank:
        c.lora.rank, c.lora.alpha = args.lora_rank, 2.0 * args.lora_rank
    if args.processes > 1:
        c.distributed.coordinator = f"localhost:{args.port}"
        c.distributed.num_processes, c.distributed.process_id = args.processes, args.process_id
        c.distributed.timeout_s, c.distributed.peer_timeout_s = args.timeout_s, args.peer_timeout_s
    return c


if __name__ == "__main__":
    from mr1jax.parallel.distributed import PeerError
    from mr1jax.trainer.config import ConfigError
    from mr1jax.trainer.loop import EXIT_CONFIG, EXIT_PEER

    try:
        out = train_and_evaluate(config(), args.workdir)
    except ConfigError as e:                      # as `python -m mr1jax.train` does
        print(f"error: {e}", flush=True)
        sys.exit(EXIT_CONFIG)
    except PeerError as e:
        print(f"error: {e}", flush=True)
        os._exit(EXIT_PEER)
    print("RESULT " + json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                                  "devices": jax.device_count(), "preempted": bool(out.get("preempted")),
                                  "compile_counts": out.get("compile_counts")}), flush=True)
    sys.exit(EXIT_PREEMPTED if out.get("preempted") else 0)
