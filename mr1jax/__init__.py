"""mr1jax: a JAX / Flax NNX trainer that teaches Qwen2-VL / Qwen2.5-VL to reason with RL (OThink-MR1, Vision-R1).

The folder a module sits in says its job; data flows down the list and no layer imports one above it:
`parallel` (mesh, sharding rules, processes), `models` (Qwen2-VL / Qwen2.5-VL, HF in / out, LoRA), `data`
(preprocessing, rows, grain pipeline, TFDS, tasks), `generate` (the sampler), `rl` (losses, KL, advantages,
rewards, updates), `trainer` (config, state, steps, loop, checkpoints, evaluation), `planning` (compile-only
memory / FLOPs plans). The commands sit on top: `python -m mr1jax.train | eval | export | plan | demo`.
"""
