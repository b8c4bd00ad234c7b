"""OThink-MR1 GRPO-D on visual counting (CLEVR train -> SuperCLEVR test) with Qwen2-VL-2B-Instruct.

Paper settings (../shared/docs/papers.md): G = 8, lr 1e-6 constant, temperature 1.0, 16 prompts per step,
max completion 512 tokens, one update per batch, dynamic KL with beta_min 0.04, beta_max 0.1, w/t = 0.3,
reward = accuracy + format. Tuned constant-beta baseline: `--config.rl.beta_schedule=constant
--config.rl.beta=0.04`.

Data: JSONL/Parquet rows in R1-V / SuperCLEVR style (`image` path or bytes, `problem`, `solution` with
`<answer>N</answer>`): `--config.data.train_files=clevr_counting.jsonl --config.data.eval_files=superclevr200.jsonl`.
Model: `--config.model.hf_path=/path/to/Qwen2-VL-2B-Instruct` (or 7B).
Hardware: one 80 GB GPU for 2B (bf16; the reference model is a second copy of the weights); 7B wants a
TPU v5e-8 / 8 GPUs with fsdp (`--config.mesh.fsdp=8`).
"""

from configs import grpo


def get_config():
    c = grpo.get_config()
    c.mode = "grpo"                  # OThink-MR1 is RL only
    c.model.hf_path = "/path/to/Qwen2-VL-2B-Instruct"
    c.model.dtype = "bfloat16"
    c.data.fields = "r1v"
    c.sft.annotator_miss_rate = 0.0  # (mode sft_then_grpo) use your SFT rows as they are
    c.data.train_files = "clevr_counting.jsonl"
    c.data.eval_files = "superclevr200.jsonl"
    c.data.image_size = 392          # fixed bucket; max_pixels 401408 in the paper (~ 633 x 633)
    c.data.prompt_bucket = 384
    c.data.batch_size = 16
    c.data.question_template = (
        "{question} Output the thinking process in <think> </think> and final answer (number) in "
        "<answer> </answer> tags.")
    c.rollout.num_samples = 8
    c.rollout.max_new_tokens = 512
    c.rollout.temperature = 1.0
    c.rl.beta_schedule = "othink_dynamic"
    c.rl.beta_min, c.rl.beta_max, c.rl.warmup_fraction = 0.04, 0.1, 0.3
    c.rl.reward = "othink"
    c.rl.micro_batches = 8
    c.total_steps = 200              # 2 epochs over the few-shot training set at 16 prompts per step
    c.optim.learning_rate = 1e-6
    c.optim.warmup_steps = 0
    c.optim.grad_clip = 1.0
    c.checkpoint.every_steps = 50
    c.eval.every_steps = 50
    c.eval.num_batches = 13          # 200 SuperCLEVR items at 16 per batch
    return c
