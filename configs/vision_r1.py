"""Vision-R1: cold-start chain-of-thought SFT, then GRPO with the hard formatting result reward and PTST.

Paper settings (docs/recipes.md): SFT lr 5e-6 cosine, warmup 5 %; GRPO eps 0.2, beta 0.01 (k3),
group z-score advantages, token-mean loss (verl), lr 1e-6, temperature 1.0, HFRRF reward; PTST stages
4K x 16 then 8K x 8 (100 steps each; optional 16K x 4). Backbone: Qwen2.5-VL-7B-Instruct, as in the paper
(`hf_path`'s config.json says model_type qwen2_5_vl; `mr1jax.models.load_pretrained` builds the windowed
vision tower from it).

Data: cold-start rows carry the CoT response in the answer field (`--config.data.fields=...` mapping the
response column to `answer`) for the SFT phase; RL rows are geometry3k style (`images`, `problem`,
`answer`).

Hardware (`python -m mr1jax.plan`, 2026-12-01, planned on Qwen2-VL-7B before this config moved to Qwen2.5-VL-7B:
same text decoder, 8,292,166,656 vs 8,291,375,616 parameters, and a vision tower whose windowed attention
needs less memory; BUILD.md "Memory plan for the paper-scale configs"): a TPU v5p-8
(fsdp over the 8 chips) or 8 x 80 GB H100s with the settings below (fp32 master weights + Adam, bf16 compute and
reference). Per device, GRPO update incl. the resident reference: v5p-8 64.6 / 62.5 GiB of 95.7 (stage 1 / 2, at
4 micro-batches: 8 uses less); 8 x H100 58.8 / 57.2 GiB of 79.6 (74 % / 72 %); SFT 37.1 GiB (v5p) / 49.9 GiB
(H100); rollout and reference pass under 46 GiB. Rows are replicated across the fsdp devices inside the
decoder at present (see BUILD.md): a fix would lower these figures.
"""

from configs import grpo


def get_config():
    c = grpo.get_config()
    c.mode = "sft_then_grpo"
    c.model.hf_path = "/path/to/Qwen2.5-VL-7B-Instruct"
    c.model.family = "qwen2_5_vl"    # the tiny stand-in when hf_path is "" (config.json decides otherwise)
    c.model.dtype = "bfloat16"       # compute; master weights and Adam stay float32 (model.param_dtype)
    # Recompute each layer in the backward pass: the 7B update at 4K-8K tokens fits only with "full" (plan,
    # 2026-12-01; figures at rl.micro_batches).
    c.model.remat = "full"
    # Attention blocks of 256 queries (default 1024): one block's fp32 scores are rows x 28 heads x 256 x S.
    # The plans below were made with 256; 1024 was not compiled at 4 / 8 micro-batches (2026-12-01).
    c.model.attention_chunk = 256
    c.data.fields = "geometry3k"
    c.data.train_files = "vision_r1_rl_10k.parquet"
    c.data.eval_files = "mathvista_testmini.parquet"
    c.data.image_size = 0            # native resolution; max_pixels = 448 x 448 (<= 256 image tokens per image: the
    c.data.max_pixels = 448 * 448    # paper gives no limit, this keeps the earlier fixed 448 px token budget)
    c.data.prompt_bucket = 512
    c.data.batch_size = 16
    c.data.question_template = "{question}"
    c.sft.steps = 12500              # 200K samples x 2 epochs / global batch 32
    c.sft.learning_rate = 5e-6
    c.sft.warmup_fraction = 0.05
    # Cold-start SFT, 16 rows x 8704 tokens in one micro-batch: 37.1 GiB peak per v5p chip (39 %), 49.9 GiB per
    # H100 (63 %) (plan, remat full, 2026-12-01; target <= 85 % of HBM).
    c.sft.micro_batches = 1
    c.sft.annotator_miss_rate = 0.0  # real cold-start data: traces used as they are
    c.rl.beta_schedule = "constant"
    c.rl.beta = 0.01
    c.rl.kl_estimator = "k3"
    c.rl.agg = "token_mean"
    c.rl.reward = "hard"
    c.rl.ptst_stages = "4096x16:100,8192x8:100"
    # 8 micro-batches of 2 prompts (stage 1: 32 rows x 4608 tokens; stage 2: 16 rows x 8704). GRPO update per
    # device incl. the 1.9 GiB reference (plan, 2026-12-01; target <= 85 % of HBM): 8 x H100 58.8 / 57.2 GiB
    # (74 / 72 %) at 8, 94.4 / 90.9 GiB (does not fit) at 4; v5p-8 64.6 / 62.5 GiB (67 / 65 %) at 4, not
    # compiled at 8 (smaller micro-batches); 2 does not fit (v5p-8: 110.7 / 105.7 GiB of temporaries). 2
    # prompts do not split over 8 devices: rows move between devices in each micro-batch (the plan warns);
    # on a v5p-8, --config.rl.micro_batches=4 halves the number of micro-batches and still fits.
    c.rl.micro_batches = 8
    c.total_steps = 200
    c.optim.learning_rate = 1e-6
    c.mesh.fsdp = -1
    c.checkpoint.every_steps = 25
    c.eval.every_steps = 50
    return c
