"""Data: image preprocessing as the Qwen processors do it, tokenizer and chat templates, user rows (JSONL / JSON /
Parquet), the grain pipeline to fixed-shape prompt batches, cold-start SFT batches, TFDS prepare / source, and the
synthetic tasks."""
