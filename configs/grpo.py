"""The embedded default: cold-start SFT, then GRPO with OThink-MR1's dynamic KL, on a tiny Qwen2-VL that
learns to count objects in synthetic images (runs on a CPU, no downloads; about 8 minutes on 2 cores).

    python -m mr1jax.train --config=configs/grpo.py --workdir=/tmp/mr1jax_grpo
    python -m mr1jax.train --config=configs/grpo.py --config.max_steps=3 --workdir=...   # stop early; rerun resumes

The pipeline (Vision-R1's two stages, OThink-MR1's RL):
1. 800 steps of cold-start SFT on `<think>...</think><answer>N</answer>` traces. The traces come from a
   simulated imperfect annotator (`sft.annotator_miss_rate`: scenes of 4+ objects are reported one short
   60% of the time), as real cold-start data is written by a model and carries its errors. The SFT model
   learns the format and to count, and inherits the annotator's undercount: that is the room RL has.
2. 300 steps of GRPO (G = 8 samples per prompt, 16 prompts per step) with the accuracy + format reward
   and beta following OThink-MR1's V-shape (0.07 -> 0.04 at 30% -> 0.1).
`<workdir>/summary.json` reports held-out accuracy / format rate before and after RL on counting and on
geometry (cross-task transfer); `curves.png` plots the run. Measured results: docs/results.md.

Your data instead: `--config.data.train_files=train.jsonl --config.data.fields=geometry3k` (JSONL/Parquet;
see `mr1jax.data.rows.PRESETS`), or at scale the TFDS dataset `python -m mr1jax.data.prepare` writes from them:
`--config.data.tfds=DIR`; a real model: `--config.model.hf_path=/path/to/Qwen2-VL-2B-Instruct`.
Pure GRPO from the random model (no SFT): `--config.mode=grpo`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.mode = "sft_then_grpo"    # grpo | sft | sft_then_grpo (Vision-R1: cold-start SFT, then RL)
    c.max_steps = -1            # stop after this many steps of this run without changing any schedule
    c.total_steps = 300         # RL steps: the schedule length (KL V-shape, learning rate)
    c.log_every = 0             # console line every N steps (0 = about 75 lines per run)

    c.model = ml_collections.ConfigDict()
    c.model.hf_path = ""        # "" = tiny random model built from c.model.tiny
    c.model.family = "qwen2_vl"  # the tiny model's family: qwen2_vl | qwen2_5_vl (hf_path's config.json decides)
    c.model.tokenizer_path = ""  # "" = hf_path, or the packaged tokenizer for the tiny model
    c.model.dtype = "float32"   # compute dtype: float32 | bfloat16 (bf16 on accelerators)
    c.model.param_dtype = "float32"  # master weights and optimizer state: keep float32 (bf16 freezes at lr 1e-6)
    c.model.remat = "none"      # rematerialise decoder / vision layers in the backward pass: none | full | dots
    c.model.logit_chunk = 128   # LM head + log-softmax on this many positions at a time (0 = all at once)
    c.model.attention_chunk = 1024  # training / scoring attention on this many queries at a time (0 = all)
    c.model.tiny = ml_collections.ConfigDict(dict(hidden_size=128, num_layers=2, vision_depth=2))

    c.data = ml_collections.ConfigDict()
    c.data.task = "counting"    # synthetic task used when train_files is empty
    c.data.num_train = 4096
    c.data.num_eval = 256
    c.data.train_files = ""     # comma-separated JSONL / Parquet files
    c.data.eval_files = ""
    c.data.tfds = ""            # a TFDS dataset (python -m mr1jax.data.prepare): its directory or name; splits
                                # train and test (eval). Read by random access, each host its own share
    c.data.tfds_data_dir = ""   # where a TFDS dataset *name* is looked up ("" = TFDS's: $TFDS_DATA_DIR)
    c.data.fields = "generic"   # field preset: generic | geometry3k | easyr1 | r1v | superclevr
    c.data.skip_bad_rows = False
    c.data.image_size = 56      # every image resized to image_size x image_size (multiple of 28); 0 = native
                                # resolution: each image keeps its aspect ratio and gets its own patch grid
    c.data.min_pixels = 56 * 56  # native resolution: least / largest resized area per image (Qwen processor's
    c.data.max_pixels = 28 * 28 * 1280  # defaults); prompts padded to a per-prompt patch bucket:
    c.data.patch_buckets = ""   # comma-separated patch counts ("" = 1/8 ... 1 of images_per_prompt x max_pixels/196)
    c.data.scene_size = 112     # synthetic tasks' square scene side under native resolution
    c.data.mixed_sizes = False  # synthetic tasks: scenes on canvases of varied size / aspect ratio (1/3 to 3)
    c.data.images_per_prompt = 1  # images every row carries (fields "easyr1": the whole `images` list; native
                                  # resolution: the most a row carries, 0 up to it)
    c.data.prompt_bucket = 64   # prompts left-padded to this length
    c.data.batch_size = 16      # prompts per step
    c.data.question_template = (
        "{question} Think first inside <think></think>, then give the final answer inside <answer></answer>.")

    c.rollout = ml_collections.ConfigDict()
    c.rollout.num_samples = 8   # G completions per prompt
    c.rollout.max_new_tokens = 24
    c.rollout.temperature = 1.0
    c.rollout.top_p = 1.0
    c.rollout.top_k = 0

    c.rl = ml_collections.ConfigDict()
    c.rl.beta_schedule = "othink_dynamic"  # constant | othink_dynamic | linear | cosine
    c.rl.beta = 0.04            # for constant
    c.rl.beta_min = 0.04
    c.rl.beta_max = 0.1
    c.rl.warmup_fraction = 0.3  # OThink-MR1's w / t
    c.rl.eps_low = 0.2
    c.rl.eps_high = 0.2
    c.rl.agg = "seq_mean_token_mean"  # seq_mean_token_mean | token_mean | dr_grpo
    c.rl.kl_estimator = "k3"    # k1 | k2 | k3
    c.rl.k3_clamp = 0.0         # clamp |log pi_ref - log pi| before the estimator (0 = no clamp)
    c.rl.advantage_scale = "group"  # group | batch | none
    c.rl.reward = "othink"      # othink (acc + alpha*format) | hard (Vision-R1 HFRRF) | accuracy | format
    c.rl.alpha = 1.0
    c.rl.reward_timeout_s = 5.0
    c.rl.updates_per_batch = 1  # mu: passes over each rollout batch (> 1 makes clipping matter)
    c.rl.minibatches = 1        # optimizer steps per pass, each on a shuffled subset of prompt groups
    c.rl.micro_batches = 1      # gradient accumulation over prompt groups
    c.rl.ptst_stages = ""       # Vision-R1 PTST, e.g. "16x4:10,32x2:10" (max_new_tokens x G : steps)

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 2e-4
    c.optim.warmup_steps = 30   # RL starts with fresh Adam moments: without warmup its first steps undo SFT
    c.optim.weight_decay = 0.0
    c.optim.grad_clip = 1.0
    c.optim.max_consecutive_skips = 3  # non-finite updates are skipped; this many steps in a row stop the run
    c.optim.spike_factor = 10.0  # report a loss (SFT) / grad norm above this x its running median (0 = off)

    c.sft = ml_collections.ConfigDict()
    c.sft.steps = 800           # cold-start SFT steps (modes sft / sft_then_grpo); total = sft.steps + total_steps
    c.sft.learning_rate = 5e-4
    c.sft.micro_batches = 1     # gradient accumulation over examples (memory)
    c.sft.warmup_fraction = 0.05
    # Cold-start traces from a simulated imperfect annotator (mr1jax.data.sft.annotator_trace): answers >=
    # annotator_min_count are reported one too low with this probability. 0 = exact traces.
    c.sft.annotator_miss_rate = 0.6
    c.sft.annotator_min_count = 4

    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0             # LoRA adapters of this rank on lora.targets; 0 = full fine-tuning
    c.lora.alpha = 16.0         # adapter output scale alpha / rank
    c.lora.dropout = 0.0        # written to the PEFT adapter config; training applies no dropout (must be 0)
    c.lora.targets = "language"  # attention | mlp | language (= attention_mlp) | vision, joined by "+", or a regex
    c.lora.sft_to_rl = "merge"  # merge: SFT adapters folded into the base (the reference), fresh RL adapters;
    #                             keep: RL continues the SFT adapters, a copy of them is the reference
    c.lora.base_quant = "none"  # frozen base storage: none (compute dtype) | int8 | nf4 (QLoRA)
    c.lora.init_from = ""       # a PEFT adapter directory to start from (continue training); "" = fresh adapters

    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    # Several processes (hosts): joined automatically on TPU slices, SLURM, Open MPI; elsewhere give the
    # coordinator (process 0's host:port), the process count and this process's id (or JAX_COORDINATOR_ADDRESS,
    # JAX_NUM_PROCESSES, JAX_PROCESS_ID). data.batch_size stays the global number of prompts per step.
    # timeout_s: how long a process waits for the coordinator / the others to join; peer_timeout_s: a process
    # whose heartbeat has not moved for this long is lost (every survivor exits with status 4).
    c.distributed = ml_collections.ConfigDict(dict(mode="auto", coordinator="", num_processes=0, process_id=-1,
                                                   timeout_s=300, peer_timeout_s=30.0))

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 100
    c.checkpoint.max_to_keep = 2
    c.checkpoint.async_save = True

    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 50     # 0 = only at the end (and before RL)
    c.eval.num_batches = 16     # x data.batch_size held-out examples
    c.eval.max_new_tokens = 0   # completion budget of evaluation (0 = the current PTST stage's / rollout's)
    c.export_hf = True          # write <workdir>/hf at the end (transformers-loadable)
    return c
