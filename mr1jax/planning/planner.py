"""`make_plan`: every step a config's run uses, compiled for a target, with fit verdicts per accelerator."""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import ml_collections

from mr1jax.parallel.accelerators import ACCELERATORS, for_topology
from mr1jax.planning.compile import compile_program
from mr1jax.planning.cost import analytic_flops
from mr1jax.planning.programs import PlanError, Programs, _opt, resolve_model_config, stage_shapes
from mr1jax.planning.targets import make_plan_mesh, target_devices
from mr1jax.trainer.config import phase_steps, uses_kl, validate_config


def fit_verdicts(total: float | None, oom: dict | None, compiled_for: str | None, n_devices: int,
                 flops: float | None) -> dict:
    """Per accelerator: fits (bool or None = unknown), used fraction, ideal seconds at peak."""
    out = {}
    for name, acc in ACCELERATORS.items():
        v: dict[str, Any] = {"hbm_bytes": acc.hbm_bytes}
        if total is not None:
            v["fits"] = acc.fits(total)
            v["fraction"] = total / acc.hbm_bytes
            v["source"] = "compiler" if name == compiled_for else "estimate"
        elif oom is not None and name == compiled_for:
            v["fits"], v["source"] = False, "compiler"
        elif oom is not None and "needed_bytes" in oom:
            # the compiler's figure is a lower bound of what the step needs
            v["fits"] = False if oom["needed_bytes"] > acc.hbm_bytes else None
            v["source"] = "estimate"
        else:
            v["fits"] = None
        if flops is not None:
            v["seconds_at_peak"] = flops / n_devices / acc.bf16_flops
        out[name] = v
    return out


STEPS = ("rollout", "token_logprobs", "grpo_update", "sft_update")


def make_plan(c: ml_collections.ConfigDict, *, topology: str | None = None, preset: str | None = None,
              only_steps: tuple[str, ...] | None = None, remat: str | None = None,
              log: Callable[[str], None] = lambda s: None) -> dict:
    """Compile every step the config's run uses for the target; returns the plan as a JSON-able dict."""
    unknown = set(only_steps or ()) - set(STEPS)
    if unknown:
        raise PlanError(f"--steps: unknown {sorted(unknown)}; choose from {', '.join(STEPS)}")
    stages = validate_config(c)
    remat = remat or _opt(c, "model.remat", "none")
    model_cfg, model_name, how = resolve_model_config(c, preset)
    devices, described = target_devices(topology)
    mesh = make_plan_mesh(dict(c.mesh), devices)
    compiled_for = getattr(for_topology(topology), "name", None)
    log(f"model {model_name} ({how}); {described}; mesh {dict(mesh.shape)}")
    sft_steps, rl_steps = phase_steps(c)
    kl = uses_kl(c) and rl_steps > 0
    progs = Programs(c, model_cfg, mesh, kl=kl, remat=remat)
    sft_seq = c.data.prompt_bucket + max(s.max_new_tokens for s in stages)
    wanted = set(only_steps or STEPS)
    n = progs.counts
    plan: dict[str, Any] = {
        "model": {"name": model_name, "source": how, "dtype": c.model.dtype,
                  "param_dtype": (c.model.dtype if not progs.lora.rank else f"{c.model.dtype} base"
                                  + (f" ({progs.base_quant})" if progs.base_quant != "none" else "")
                                  + f" + {_opt(c, 'model.param_dtype', c.model.dtype)} adapters")
                  if progs.lora.rank else _opt(c, "model.param_dtype", c.model.dtype),
                  "remat": remat, "params": n.total,
                  "params_vision": n.vision, "params_embedding": n.embedding, "params_lm_head": n.lm_head,
                  "params_decoder": n.decoder},
        "target": {"topology": topology, "devices": len(devices), "description": described,
                   "platform": devices[0].platform, "compiled_for": compiled_for},
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "lora": None if not progs.lora.rank else {
            "rank": progs.lora.rank, "alpha": progs.lora.alpha, "targets": progs.lora.targets,
            "trainable_params": int(sum(math.prod(a.shape) for a in jax.tree.leaves(progs.params))),
            "frozen_base_bytes_per_device": progs.state_bytes["frozen"]},
        "accelerators": {k: {"hbm_bytes": a.hbm_bytes, "bf16_flops": a.bf16_flops, "nominal": a.nominal}
                         for k, a in ACCELERATORS.items()},
        "kl": kl, "stages": []}

    def run(prog_fn, name, shapes, **kw) -> dict:
        log(f"compiling {name} ...")
        try:
            res = compile_program(prog_fn(shapes, **kw), mesh)
        except ValueError as e:   # e.g. prompts that do not split over the mesh
            res = {"step": name, "shapes": "-", "error": str(e).removeprefix(f"{name}: "), "compile_s": 0.0}
        if name in progs.warnings:
            res["warning"] = progs.warnings[name].removeprefix(f"{name}: ")
        flops = analytic_flops(name, model_cfg, n, shapes, sft_seq)
        res["analytic_flops"] = flops
        res["analytic_flops_per_device"] = flops / len(devices)
        total = res.get("memory", {}).get("total")
        res["fits"] = fit_verdicts(total, res.get("oom"), compiled_for, len(devices), flops)
        log(f"  {name}: " + (f"{total / (1 << 20):,.1f} MiB per device" if total is not None else res["error"])
            + f", {res['compile_s']:.1f} s")
        return res

    for i, stage in enumerate(stages if rl_steps else []):
        s = stage_shapes(c, model_cfg, stage)
        entry = {"index": i, "max_new_tokens": s.max_new_tokens, "num_samples": s.num_samples,
                 "steps": stage.steps, "prompts": s.prompts, "rows": s.rows, "prompt_len": s.prompt_len,
                 "seq": s.seq, "image_size": s.image_size, "patches_per_image": s.patches,
                 "image_tokens": s.image_tokens, "minibatch_prompts": s.minibatch_prompts,
                 "micro_batches": s.micro_batches, "results": []}
        if "rollout" in wanted:
            entry["results"].append(run(progs.rollout, "rollout", s))
        if (kl or progs._several_updates()) and "token_logprobs" in wanted:
            entry["results"].append(run(lambda sh: progs.token_logprobs(sh, stage), "token_logprobs", s))
        if "grpo_update" in wanted:
            entry["results"].append(run(lambda sh: progs.grpo_update(sh, stage), "grpo_update", s))
        plan["stages"].append(entry)
    if sft_steps and "sft_update" in wanted:
        s = stage_shapes(c, model_cfg, stages[0])
        res = run(lambda sh: progs.sft_update(sh, sft_seq), "sft_update", s)
        plan["sft"] = {"rows": s.prompts, "seq": sft_seq, "results": [res]}
    return plan
