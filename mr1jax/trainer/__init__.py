"""The trainer, one job a module, read in this order:

- `config`: config checks (allowed values from the owning modules), dtypes, beta schedule, optimizers;
- `build`: the model, tokenizer, training split (LoRA adapters vs frozen base) and rows a config names;
- `state`: `TrainState`, its shardings, and the jitted steps (SFT / GRPO update, log-probs, advantages);
- `rollout`: sample G completions per prompt, score them, build the update batch;
- `step`: one cold-start SFT step and one RL step (rollouts -> rewards -> reference -> updates);
- `loop`: `train_and_evaluate`, the training loop over the state;
- `checkpoint`, `run_dir`, `watch`, `metrics`, `plots`: saving / resuming, the work dir, skipped steps and
  spikes, metrics files, curves;
- `evaluation`, `eval_inputs`: held-out evaluation during training and `python -m mr1jax.eval`.
"""
