"""`python -m mr1jax.plan`: per-device memory and FLOPs of every jitted training step, before renting hardware.

    python -m mr1jax.plan --config=configs/othink_counting.py --topology=v5e:2x4
    python -m mr1jax.plan --config=configs/vision_r1.py --topology=v5p:2x2x2 --json=/tmp/plan.json
    python -m mr1jax.plan --config=configs/grpo.py --devices=8 --config.mesh.fsdp=4 --config.mesh.tensor=2

The model is built abstractly (`nnx.eval_shape`: no weights are allocated or read). For each rollout stage of
the config (`rl.ptst_stages`, else one stage from `rollout`) the real jitted steps are lowered and compiled
for the config's shapes on the requested mesh, and a table reports per device: argument / output / aliased
(donated) / temporary / generated-code bytes from `compiled.memory_analysis()`, their sum
(args + outputs - aliased + temp + code), XLA:TPU's peak (what its out-of-memory check uses), the train state
that stays on the devices during the step without being one of its arguments (the optimizer state and the
reference during the rollout, the reference during the update: the compiler does not see it) and the total
the verdicts use (peak where the backend reports it, else the sum, plus that resident state), FLOPs from
`compiled.cost_analysis()` and an analytic estimate, compile time, and whether the total fits each accelerator
of `mr1jax.parallel.accelerators`.

Steps: `grpo_update` (one optimizer step on a minibatch of prompt groups, micro-batched as configured),
`token_logprobs` (reference-model pass over the whole rollout batch; only when the KL term is on),
`rollout` (the sampler: prefill + G-way decode to max_new_tokens) and `sft_update` (cold-start SFT on
sequences of prompt_bucket + the longest stage's max_new_tokens; only in modes sft / sft_then_grpo).

Targets:
  --topology=v5e:2x4   compile-only TPU devices (`jax.experimental.topologies`; needs libtpu, i.e.
                       `pip install "jax[tpu]"`, no TPU). The memory numbers are XLA:TPU's own; a program that
                       does not fit fails to compile with RESOURCE_EXHAUSTED, reported as "does not fit"
                       with the compiler's numbers. Names: v5e:2x2, v5e:2x4, v6e:2x2, v5p:2x2x1, v5p:2x2x2,
                       v5p:2x2x4, v4:2x2x1 and v5:2x2x1 (megacore).
  --topology=h100x8    compile-only GPU devices (H100 / H200 SXM, `mr1jax.parallel.accelerators.gpu_target_config`;
                       needs only the CUDA PJRT plugin wheels: `pip install --no-deps jax-cuda12-plugin==0.10.2
                       jax-cuda12-pjrt==0.10.2`, about 180 MB, no CUDA libraries and no GPU). XLA:GPU's memory
                       analysis; no cost analysis (the XLA column is empty) and no out-of-memory check at
                       compile time: the verdict compares the total with the GPU's memory.
  --devices=8          N fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count, set before jax
                       is imported): the same sharded programs, but the memory numbers are XLA:CPU's
                       (different fusion and layouts), so fit verdicts for GPUs / TPUs are estimates.
  (neither)            the default backend's devices.
Other flags: --config.* overrides (mesh, micro-batches, shapes), --remat=none|full|dots (default: the config's
model.remat), --steps=rollout,grpo_update,... (a subset), --preset=... (the model when <hf_path>/config.json is
absent), --json=PATH. The exit status is 1 when a step could not be built or compiled for a reason other than
memory (e.g. prompts that do not split over the mesh); "does not fit" is a result, not an error.

Analytic FLOPs (whole step, all devices; `per device` divides by the device count). With P prompts,
R = P*G rows, prompt bucket L, completion length T, S = L + T, decoder matmul parameters N_d (all decoder
layer weights: embedding table excluded), LM head V*H, vision tower parameters N_v, n_p patches per image,
and A = layers * heads * head_dim (text) / A_v (vision):
  forward  F(R, S, T_logits, P) = 2*N_d*R*S + 2*V*H*R*T_logits + 4*A*R*S^2
                                  + 2*N_v*P*n_p + 4*A_v*P*n_p^2
  grpo_update    = 3 * F(R_mb, S, T, P_mb)      (forward + backward = 3 forwards: "6 x params x tokens"
                                                 plus 12 x A x S^2 x rows for attention)
  token_logprobs = F(R, S, T, P)
  sft_update     = 3 * F(B, S_sft, S_sft - 1, B)
  rollout        = prefill 2*N_d*P*L + 2*V*H*P + 4*A*P*L*S + vision
                   + T decode steps of R rows: T * R * (2*N_d + 2*V*H + 4*A*S)   (every row runs to T)
These are model FLOPs (as MFU counts them): recomputation by rematerialisation (`--remat`, the checkpointed LM-head
chunks) is not included. Attention is counted over full (masked) score matrices, as the model computes them
(Qwen2.5-VL's windowed vision blocks: n_p x min(n_p, 3 W^2) scores per head, W^2 the patches of one window, the
blocks the windowed attention computes). P counts images (prompts x data.images_per_prompt) in the vision
terms. XLA's cost analysis
counts a loop body once (the micro-batch `lax.scan` of the update, the decode `while_loop` of the sampler),
and undercounts collective matmuls on 8+ TPU chips, so its column is a lower bound; trust the analytic one.
"""

from __future__ import annotations

import json
import sys
import time

from mr1jax.planning.environment import argv_value, early_environment

if __name__ == "__main__":
    early_environment(sys.argv)      # before jax is imported

import jax  # noqa: E402

from mr1jax.planning.planner import STEPS, make_plan  # noqa: E402
from mr1jax.planning.programs import PRESETS, PlanError  # noqa: E402
from mr1jax.planning.report import format_plan  # noqa: E402
from mr1jax.trainer.config import ConfigError  # noqa: E402


def main(argv: list[str]) -> None:
    try:
        _plan(argv)
    except (PlanError, ConfigError) as e:     # a bad flag, topology, preset or config field: one line, exit 2
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def _plan(argv: list[str]) -> None:
    from absl import flags

    F = flags.FLAGS
    if F.devices and F.topology:
        raise PlanError("--devices and --topology are exclusive (a topology fixes the device count)")
    if F.devices and jax.device_count() != F.devices:
        raise PlanError(f"--devices={F.devices} but jax has {jax.device_count()} devices: the flag must be "
                        "seen before jax is imported (run as python -m mr1jax.plan)")
    only = tuple(s.strip() for s in F.steps.split(",") if s.strip()) if F.steps else None
    t0 = time.perf_counter()
    plan = make_plan(F.config, topology=F.topology, preset=F.preset, only_steps=only, remat=F.remat,
                     log=lambda s: print(f"[{time.perf_counter() - t0:7.1f}s] {s}", file=sys.stderr, flush=True))
    plan["config"] = argv_value(sys.argv, "config") or "configs/grpo.py"
    print(format_plan(plan))
    if F.json:
        with open(F.json, "w") as f:
            json.dump(plan, f, indent=1)
        print(f"wrote {F.json}")
    errors = [r for st in plan["stages"] for r in st["results"] if "error" in r and "oom" not in r]
    errors += [r for r in plan.get("sft", {}).get("results", []) if "error" in r and "oom" not in r]
    if errors:
        sys.exit(1)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", "configs/grpo.py", "training config file", lock_config=True)
    flags.DEFINE_string("topology", None, "compile for TPU topology NAME (compile-only devices), e.g. v5e:2x4")
    flags.DEFINE_integer("devices", 0, "compile for N fake CPU devices (memory numbers are XLA:CPU's)")
    flags.DEFINE_string("preset", None, f"model when <hf_path>/config.json is absent: {' | '.join(PRESETS)}")
    flags.DEFINE_string("steps", "", f"comma-separated subset of {','.join(STEPS)} (default: all the run uses)")
    flags.DEFINE_string("remat", None, "rematerialisation policy of the scanned layers (none | full | dots); "
                        "default: config.model.remat if the config has it, else none")
    flags.DEFINE_string("json", None, "also write the plan as JSON to this path")
    app.run(main)
