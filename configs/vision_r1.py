"""Vision-R1: cold-start chain-of-thought SFT, then GRPO with the hard formatting result reward and PTST.

Paper settings (../shared/docs/papers.md): SFT lr 5e-6 cosine, warmup 5 %; GRPO eps 0.2, beta 0.01 (k3),
group z-score advantages, token-mean loss (verl), lr 1e-6, temperature 1.0, HFRRF reward; PTST stages
4K x 16 then 8K x 8 (100 steps each; optional 16K x 4). Backbone in the paper: Qwen2.5-VL-7B (mr1jax runs the
same recipe on Qwen2-VL until the Qwen2.5-VL port lands).

Data: cold-start rows carry the CoT response in the answer field (`--config.data.fields=...` mapping the
response column to `answer`) for the SFT phase; RL rows are geometry3k style (`images`, `problem`,
`answer`). Hardware: 8 x 80 GB GPUs or a TPU v5p-8 for 7B at 8K-token completions (fsdp over all devices).
"""

from configs import grpo


def get_config():
    c = grpo.get_config()
    c.mode = "sft_then_grpo"
    c.model.hf_path = "/path/to/Qwen2-VL-7B-Instruct"
    c.model.dtype = "bfloat16"
    c.data.fields = "geometry3k"
    c.data.train_files = "vision_r1_rl_10k.parquet"
    c.data.eval_files = "mathvista_testmini.parquet"
    c.data.image_size = 448
    c.data.prompt_bucket = 512
    c.data.batch_size = 16
    c.data.question_template = "{question}"
    c.sft.steps = 12500              # 200K samples x 2 epochs / global batch 32
    c.sft.learning_rate = 5e-6
    c.sft.warmup_fraction = 0.05
    c.sft.annotator_miss_rate = 0.0  # real cold-start data: traces used as they are
    c.rl.beta_schedule = "constant"
    c.rl.beta = 0.01
    c.rl.kl_estimator = "k3"
    c.rl.agg = "token_mean"
    c.rl.reward = "hard"
    c.rl.ptst_stages = "4096x16:100,8192x8:100"
    c.rl.micro_batches = 16
    c.total_steps = 200
    c.optim.learning_rate = 1e-6
    c.mesh.fsdp = -1
    c.checkpoint.every_steps = 25
    c.eval.every_steps = 50
    return c
