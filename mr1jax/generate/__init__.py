"""Generation: the jitted grouped sampler (`generate`: vision + prefill once per prompt, KV cache shared by its G
samples, `while_loop` decode) and its helpers (`pad_to_bucket`, `Rollouts`, `compile_count`)."""

from mr1jax.generate.sampler import Rollouts, compile_count, filter_logits, generate, kv_cache_bytes_per_token, \
    pad_to_bucket

__all__ = ["Rollouts", "compile_count", "filter_logits", "generate", "kv_cache_bytes_per_token", "pad_to_bucket"]
