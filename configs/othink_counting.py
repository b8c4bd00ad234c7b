"""OThink-MR1 GRPO-D on visual counting (CLEVR train -> SuperCLEVR test) with Qwen2-VL-2B-Instruct.

Paper settings (docs/recipes.md): G = 8, lr 1e-6 constant, temperature 1.0, 16 prompts per step,
max completion 512 tokens, one update per batch, dynamic KL with beta_min 0.04, beta_max 0.1, w/t = 0.3,
reward = accuracy + format. Tuned constant-beta baseline: `--config.rl.beta_schedule=constant
--config.rl.beta=0.04`.

Data: JSONL/Parquet rows in R1-V / SuperCLEVR style (`image` path or bytes, `problem`, `solution` with
`<answer>N</answer>`): `--config.data.train_files=clevr_counting.jsonl --config.data.eval_files=superclevr200.jsonl`.
Model: `--config.model.hf_path=/path/to/Qwen2-VL-2B-Instruct` (or 7B).
Hardware (`python -m mr1jax.plan`, 2026-12-01; BUILD.md "Memory plan for the paper-scale configs"): 2B with fp32
master weights + Adam (26.5 GB of state) and a bf16 reference (4.4 GB) fits one 80 GB H100: the GRPO update peaks
at 65.9 GiB of 79.6 (83 %) with these settings, more than JAX's default 75 % preallocation, so set
XLA_PYTHON_CLIENT_MEM_FRACTION=.95, or run `--config.rl.micro_batches=4` (49.7 GiB, 62 %). A TPU v5e-8 (fsdp
over the 8 chips): 11.4 GiB of 15.75 per chip (72 %). 7B wants a TPU v5p-8 / 8 GPUs with fsdp
(`--config.mesh.fsdp=8`; see configs/vision_r1.py).
"""

from configs import grpo


def get_config():
    c = grpo.get_config()
    c.mode = "grpo"                  # OThink-MR1 is RL only
    c.model.hf_path = "/path/to/Qwen2-VL-2B-Instruct"
    c.model.dtype = "bfloat16"       # compute; master weights and Adam stay float32 (model.param_dtype)
    # Recompute each decoder / vision layer in the backward pass. GRPO update per v5e chip: no remat 66 GiB of
    # temporaries (earlier plan, 8 micro-batches), "dots" 125 GiB (2 micro-batches): neither fits; "full" 10.9 GiB
    # peak + 0.5 GiB resident reference (plan, v5e-8, 2026-12-01; target <= 85 % of 15.75 GiB).
    c.model.remat = "full"
    c.data.fields = "r1v"
    c.sft.annotator_miss_rate = 0.0  # (mode sft_then_grpo) use your SFT rows as they are
    c.data.train_files = "clevr_counting.jsonl"
    c.data.eval_files = "superclevr200.jsonl"
    c.data.image_size = 0            # native resolution, as the paper: max_pixels 401,408 (<= 512 image tokens)
    c.data.max_pixels = 401408
    c.data.prompt_bucket = 640       # 512 image tokens + the question and template
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
    # 2 micro-batches of 8 prompts (64 rows x 896 tokens): a multiple of the 8 devices of a v5e-8 / 8 GPUs, so no
    # rows move between devices. Update peak (+ resident reference): v5e-8 11.4 GiB / chip (72 %); 1 x H100
    # 65.9 GiB (83 %; needs XLA_PYTHON_CLIENT_MEM_FRACTION=.95); 4 micro-batches: 49.7 GiB (62 %) on one GPU
    # (plan, 2026-12-01; target <= 85 % of HBM).
    c.rl.micro_batches = 2
    c.total_steps = 200              # 2 epochs over the few-shot training set at 16 prompts per step
    c.optim.learning_rate = 1e-6
    c.optim.warmup_steps = 0
    c.optim.grad_clip = 1.0
    c.checkpoint.every_steps = 50
    c.eval.every_steps = 50
    c.eval.num_batches = 13          # 200 SuperCLEVR items at 16 per batch
    return c
