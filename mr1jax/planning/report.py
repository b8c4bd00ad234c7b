"""The plan as the tables `python -m mr1jax.plan` prints: memory per step and device, FLOPs, fit verdicts."""

from __future__ import annotations

from mr1jax.parallel.accelerators import GiB


def _unit(values: list[float | None], units: list[tuple[str, float]]) -> tuple[str, float]:
    """The largest unit that the biggest value reaches (the smallest unit when none does)."""
    top = max([v for v in values if v] or [0.0])
    return next(((n, f) for n, f in units if top >= f), units[-1])


def _seconds(x: float) -> str:
    return f"{x:.3g}s" if x >= 1 else f"{x * 1e3:.3g}ms" if x >= 1e-3 else f"{x * 1e6:.3g}us"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def line(r):
        return "  ".join(str(v).rjust(w) if i else str(v).ljust(w) for i, (v, w) in enumerate(zip(r, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _memory_table(results: list[dict]) -> str:
    sizes = [r["memory"]["total"] if "memory" in r else r.get("oom", {}).get("needed_bytes") for r in results]
    mem_unit, mem_f = _unit(sizes, [("GiB", GiB), ("MiB", 1 << 20)])
    flop_unit, flop_f = _unit([r.get("analytic_flops_per_device") for r in results],
                              [("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)])
    fmt_m = lambda x: "-" if x is None else f"{x / mem_f:.2f}"      # noqa: E731
    fmt_f = lambda x: "-" if x is None else f"{x / flop_f:.3g}"     # noqa: E731
    rows = []
    for r in results:
        mem = r.get("memory")
        if mem is None:
            needed = r.get("oom", {}).get("needed_bytes")
            cells = ["-"] * 6 + [f">{fmt_m(needed)}" if needed else "-", "-", "-"]
        else:
            cells = [fmt_m(mem[k]) for k in ("argument", "output", "alias", "temp", "generated_code", "sum")]
            cells += [fmt_m(mem.get("peak")), fmt_m(mem.get("resident", 0)), fmt_m(mem["total"])]
        rows.append([r["step"], r["shapes"], *cells, fmt_f(r.get("xla_flops_per_device")),
                     fmt_f(r.get("analytic_flops_per_device")), f"{r['compile_s']:.1f}"])
    return _table(["step", "shapes", f"args {mem_unit}", "out", "alias", "temp", "code", "sum", f"peak {mem_unit}",
                   "+state", f"total {mem_unit}", f"XLA {flop_unit}", f"analytic {flop_unit}", "compile s"], rows)


def verdict_text(v: dict) -> str:
    """'fits 23% 0.41s' / 'NO* 130%' / '?': the fit table's cell for one accelerator."""
    verdict = "?" if v.get("fits") is None else "fits" if v["fits"] else "NO"
    mark = "*" if v.get("source") == "compiler" else ""
    frac = f" {100 * v['fraction']:.0f}%" if "fraction" in v else ""
    secs = f" {_seconds(v['seconds_at_peak'])}" if "seconds_at_peak" in v else ""
    return f"{verdict}{mark}{frac}{secs}"


def format_plan(plan: dict) -> str:
    m, t = plan["model"], plan["target"]
    out = [f"mr1jax plan {plan.get('config', '')}".rstrip(),
           f"  model   {m['name']} ({m['source']}): {m['params']:,} parameters "
           f"({m.get('param_dtype', m['dtype'])} storage, {m['dtype']} compute, remat {m['remat']}; "
           f"vision {m['params_vision']:,}, decoder {m['params_decoder']:,}, embedding {m['params_embedding']:,}, "
           f"lm_head {m['params_lm_head']:,})",
           *([f"  LoRA    rank {plan['lora']['rank']} on {plan['lora']['targets']}: "
              f"{plan['lora']['trainable_params']:,} trainable parameters (fp32, Adam); frozen base "
              f"{plan['lora']['frozen_base_bytes_per_device'] / GiB:.2f} GiB per device in {m['dtype']}, "
              "an argument of every step"] if plan.get("lora") else []),
           f"  target  {t['description']}; mesh " + " ".join(f"{k}={v}" for k, v in plan["mesh"].items()),
           f"  memory  per device, XLA:{t['platform'].upper()} memory analysis; sum = args + out - alias + temp + code; "
           "peak = the compiler's peak (XLA:TPU only); +state = train state resident on the device but not an "
           "argument of the step (optimizer state, reference); total = (peak where reported, else sum) + state: "
           "the verdicts' figure",
           "  FLOPs   per device; XLA = compiler cost analysis (counts loop bodies once: a lower bound), "
           "analytic = formulas in the mr1jax.plan docstring",
           ""]
    blocks = [(f"stage {st['index']}: {st['max_new_tokens']} new tokens x G={st['num_samples']} "
               f"({st['steps']} steps): {st['prompts']} prompts -> {st['rows']} rows of {st['prompt_len']} + "
               f"{st['max_new_tokens']} tokens; {st['minibatch_prompts']} prompts per optimizer step in "
               f"{st['micro_batches']} micro-batch(es); "
               + (f"image {st['image_size']} px = {st['patches_per_image']} patches / {st['image_tokens']} tokens"
                  if st['image_size'] else f"native resolution: largest patch bucket {st['patches_per_image']} "
                  f"patches / {st['image_tokens']} tokens per prompt"), st["results"]) for st in plan["stages"]]
    if "sft" in plan:
        blocks.append((f"cold-start SFT: {plan['sft']['rows']} rows x {plan['sft']['seq']} tokens",
                       plan["sft"]["results"]))
    accs = plan["accelerators"]
    for title, results in blocks:
        out += [title, _memory_table(results)]
        out.append(_table(["fits / used / time at peak"] + [f"{a} {info['nominal']}" for a, info in accs.items()],
                          [[r["step"]] + [verdict_text(r["fits"][a]) for a in accs] for r in results]))
        for r in results:
            if "oom" in r:
                out.append(f"  {r['step']}: does not fit: {r['oom']['message']}")
            elif "error" in r:
                out.append(f"  {r['step']}: not compiled: {r['error']}")
            if "warning" in r:
                out.append(f"  {r['step']}: warning: {r['warning']}")
        out.append("")
    out.append("fits* / NO* = from the program compiled for that accelerator (on TPU, XLA refuses a program that "
               "does not fit); the others compare the total with each device's memory. used = total / device memory. time at peak = analytic FLOPs per device / peak bf16 FLOP/s "
               "(a lower bound on the step time).")
    return "\n".join(out)
