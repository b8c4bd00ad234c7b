"""OThink-MR1 GRPO-D on geometry (GeoQA train 8k -> GeoQA test 754) with Qwen2-VL-2B/7B-Instruct.

Differences from counting (docs/recipes.md): beta_min 0.0, beta_max 0.02 (tuned constant-beta
baseline 0.01), symbolic answers scored with math_verify. Data: geometry3k / EasyR1 style rows (`images`,
`problem`, `answer`): `--config.data.train_files=geoqa_train.parquet --config.data.eval_files=geoqa_test.parquet`.
Hardware: as configs/othink_counting.py.
"""

from configs import othink_counting


def get_config():
    c = othink_counting.get_config()
    c.data.fields = "geometry3k"
    c.data.train_files = "geoqa_train.parquet"
    c.data.eval_files = "geoqa_test.parquet"
    c.data.question_template = (
        "{question} Output the thinking process in <think> </think> and the final answer in "
        "<answer> </answer> tags.")
    c.rl.beta_min, c.rl.beta_max = 0.0, 0.02
    c.total_steps = 1000             # 2 epochs of 8k prompts at 16 per step
    c.eval.num_batches = 48          # the 754-item test split (last partial batch dropped)
    return c
