"""Compiling one step program for a mesh: memory analysis, cost analysis, compile time, and an
out-of-memory failure read into numbers."""

from __future__ import annotations

import re
import time
from typing import Any

import jax
from jax.sharding import Mesh

from mr1jax.planning.programs import StepProgram


_OOM_NUMBERS = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT])(?:i?B)?\b")


def _oom_summary(message: str) -> dict:
    """The compiler's out-of-memory line and the byte counts it names (first = needed, last = available)."""
    line = next((ln.strip() for ln in message.splitlines() if "RESOURCE_EXHAUSTED" in ln), message.strip())
    line = line[line.index("RESOURCE_EXHAUSTED"):] if "RESOURCE_EXHAUSTED" in line else line
    scale = dict(K=1 << 10, M=1 << 20, G=1 << 30, T=1 << 40)
    numbers = [float(v) * scale[u] for v, u in _OOM_NUMBERS.findall(line)]
    out = {"message": line[:400]}
    if len(numbers) >= 2:
        out["needed_bytes"], out["available_bytes"] = numbers[0], numbers[-1]
    return out


def compile_program(prog: StepProgram, mesh: Mesh) -> dict:
    """Lower + compile; memory and cost analyses, timings, or the compiler's out-of-memory verdict."""
    res: dict[str, Any] = {"step": prog.name, "shapes": prog.shapes}
    t0 = time.perf_counter()
    try:
        with jax.sharding.use_mesh(mesh) if hasattr(jax.sharding, "use_mesh") else jax.set_mesh(mesh):
            lowered = prog.jitted.lower(*prog.args)
        t1 = time.perf_counter()
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - one step failing must not hide the others
        res["compile_s"] = time.perf_counter() - t0
        msg = str(e)
        if "RESOURCE_EXHAUSTED" in msg:
            res["error"] = "RESOURCE_EXHAUSTED"
            res["oom"] = _oom_summary(msg)
        else:
            res["error"] = f"{type(e).__name__}: {msg.splitlines()[0][:400] if msg else ''}"
        return res
    t2 = time.perf_counter()
    res["lower_s"], res["compile_s"] = t1 - t0, t2 - t1
    ma = compiled.memory_analysis()
    mem = {k: int(getattr(ma, f"{k}_size_in_bytes", 0) or 0)
           for k in ("argument", "output", "alias", "temp", "generated_code")}
    mem["sum"] = mem["argument"] + mem["output"] - mem["alias"] + mem["temp"] + mem["generated_code"]
    peak = int(getattr(ma, "peak_memory_in_bytes", 0) or 0)   # XLA:TPU reports it (what it checks); CPU/GPU: 0
    if peak:
        mem["peak"] = peak
    mem["resident"] = prog.resident                           # train state on the device, not an argument
    mem["total"] = (peak or mem["sum"]) + prog.resident       # the figure the fit verdicts use
    res["memory"] = mem
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    res["xla_flops_per_device"] = float(cost["flops"]) if cost and "flops" in cost else None
    return res
