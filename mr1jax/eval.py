"""Evaluate a checkpoint or a Hugging Face Qwen2-VL directory: `python -m mr1jax.eval`.

    python -m mr1jax.eval --workdir=DIR                          # latest checkpoint, the run's own eval data
    python -m mr1jax.eval --workdir=DIR --step=200 --task=counting --num_examples=500
    python -m mr1jax.eval --checkpoint=DIR/checkpoints/200 --data_files=superclevr200.jsonl --fields=r1v
    python -m mr1jax.eval --hf_path=/models/Qwen2-VL-2B-Instruct --data_files=mathvista.parquet \\
        --fields=geometry3k --image_size=448 --prompt_bucket=512 --max_new_tokens=512
    python -m mr1jax.eval --workdir=DIR --tfds=/data/tfds/geometry3k/1.0.0         # a prepared dataset's test split
    python -m mr1jax.eval --workdir=DIR --temperature=1.0 --num_samples=8 --seed=0   # sampled pass@8
    python -m mr1jax.eval --hf_path=/models/Qwen2-VL-2B-Instruct --peft_adapter=DIR/hf_adapter --task=counting

Model source (exactly one): a training run's latest checkpoint (`--workdir`), one of its checkpoints
(`--workdir --step` or `--checkpoint=DIR/checkpoints/N`), or a Hugging Face directory (`--hf_path`, tokenizer
from it or `--tokenizer_path`). A checkpoint restores onto the model built from the run's `DIR/config.json`
(only the parameters are read). An `--hf_path` inside a run directory (`DIR/hf`, `DIR/hf-N`) picks up that
run's data defaults.

Data: a registered synthetic task (`--task`, its held-out `test` split, `--num_examples` of them), JSONL /
JSON / Parquet rows (`--data_files`, `--fields` preset as in training), or a prepared TFDS dataset (`--tfds`,
a registered name or a directory from `python -m mr1jax.data.prepare`: its test, else validation split). Without
any, a run is evaluated on its own eval data (`data.eval_files`, its TFDS dataset's held-out split, else its
synthetic task). Image size, prompt bucket,
question template, batch size and max_new_tokens default to the run's config, else to the flags' defaults.

Decoding: greedy by default; `--temperature > 0` samples (`--top_p`, `--top_k`), `--num_samples=k` draws k
completions per prompt: `accuracy` is the mean over all completions (the pass@1 estimate), `pass_at_k` the
fraction of prompts with at least one correct completion. Scoring is the trainer's: accuracy and format
rewards of `mr1jax.rl.rewards`, accuracy in worker processes with a per-sample deadline.

Output: one JSON object on stdout and in `--output` (default `DIR/eval_<task-or-data>.json` for a run,
`DIR/eval_<task-or-data>_step<N>.json` for an explicit step, `./eval.json` for `--hf_path`); progress
lines on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from typing import Any

os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # "PyTorch was not found": torch is not used

from mr1jax.trainer.eval_inputs import DEFAULT_TASK_EXAMPLES, DEFAULTS, FIELD_PRESETS, NUM_SHOWN, EvalError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mr1jax.eval", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:8]))
    src = p.add_argument_group("model source (exactly one)")
    src.add_argument("--workdir", help="training run directory: latest checkpoint (or --step), DIR/config.json")
    src.add_argument("--step", type=int, help="checkpoint step of --workdir (default: the latest)")
    src.add_argument("--checkpoint", help="one checkpoint directory, DIR/checkpoints/N")
    src.add_argument("--hf_path", help="Hugging Face Qwen2-VL directory (config.json + safetensors)")
    src.add_argument("--tokenizer_path", help="tokenizer directory for --hf_path (default: --hf_path)")
    src.add_argument("--peft_adapter", help="with --hf_path: a PEFT LoRA adapter directory (adapter_config.json + "
                                            "adapter_model.safetensors) applied to the model")
    src.add_argument("--dtype", choices=("float32", "bfloat16"),
                     help="compute dtype (default: the run's, or the HF config's dtype)")
    data = p.add_argument_group("data (default: the run's eval data)")
    data.add_argument("--task", help="registered synthetic task (held-out test split)")
    data.add_argument("--data_files", help="comma-separated JSONL / JSON / Parquet files")
    data.add_argument("--tfds", help="prepared TFDS dataset, registered name or directory (its test / validation "
                                     "split)")
    data.add_argument("--tfds_data_dir", help="where TFDS looks for a registered --tfds name (default: TFDS's)")
    data.add_argument("--fields", help=f"field preset of --data_files: {' | '.join(FIELD_PRESETS)} "
                                       "(default: the run's, else generic)")
    data.add_argument("--num_examples", type=int,
                      help=f"prompts to evaluate (default: all rows; {DEFAULT_TASK_EXAMPLES} for a task)")
    data.add_argument("--data_seed", type=int, help="seed of a synthetic task (default: the run's seed, else 0)")
    data.add_argument("--skip_bad_rows", action="store_true",
                      help="skip rows that fail to load or do not fit the prompt bucket (counted in num_skipped)")
    data.add_argument("--image_size", type=int, help="images resized to N x N (multiple of 28); 0 = native "
                                                     "resolution (each image its own grid)")
    data.add_argument("--min_pixels", type=int, help="native resolution: least resized area per image (default: "
                                                     "the run's, else the Qwen processor's)")
    data.add_argument("--max_pixels", type=int, help="native resolution: largest resized area per image")
    data.add_argument("--prompt_bucket", type=int, help="prompts left-padded to this many tokens")
    data.add_argument("--question_template", help="user text; {question} is replaced by the row's question")
    dec = p.add_argument_group("decoding")
    dec.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    dec.add_argument("--top_p", type=float, default=1.0)
    dec.add_argument("--top_k", type=int, default=0, help="0 = off")
    dec.add_argument("--num_samples", type=int, default=1, help="k completions per prompt (pass@k)")
    dec.add_argument("--max_new_tokens", type=int, help="default: the run's (last PTST stage), else "
                                                        f"{DEFAULTS['max_new_tokens']}")
    dec.add_argument("--batch_size", type=int, help="prompts per generate call (default: the run's)")
    dec.add_argument("--seed", type=int, default=0, help="sampling seed")
    dec.add_argument("--reward_timeout_s", type=float, help="per-sample deadline of the accuracy reward")
    out = p.add_argument_group("output")
    out.add_argument("--output", help="JSON file (default: DIR/eval_<task-or-data>.json, else ./eval.json)")
    out.add_argument("--num_shown", type=int, default=NUM_SHOWN, help="prompts whose completions are shown")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI entry: parse `argv` (default sys.argv[1:]), evaluate, print the JSON to stdout; returns it.

    Usage errors and missing checkpoints / data exit with status 2 and one `error:` line on stderr.
    """
    from absl import logging as absl_logging

    from mr1jax.trainer.checkpoint import CheckpointCorruptError
    from mr1jax.trainer.checkpoint import CheckpointMismatchError as StateMismatch
    from mr1jax.data.rows import DataError
    from mr1jax.models.qwen2_vl.hf import CheckpointMismatchError as HFMismatch
    from mr1jax.trainer.evaluation import run_eval

    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every restore at INFO
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = run_eval(args)
    except (EvalError, DataError, StateMismatch, HFMismatch, CheckpointCorruptError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    except FileNotFoundError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    print(json.dumps(result, indent=2), flush=True)
    return result


if __name__ == "__main__":
    main()
