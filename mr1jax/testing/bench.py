"""Pieces shared by the benchmarks in ``scripts/`` (`bench_forward.py`, `bench_sampler.py`).

* `bench_config`: the ~100M-parameter Qwen2-VL both CPU benchmarks time (116,179,968 parameters: 97.7M text,
  18.5M vision; see its docstring for the breakdown).
* `build_reference_pair` / `torch_inputs`: the randomised `transformers` model and the same weights loaded
  into mr1jax, and the torch keyword arguments for a batch (torch is imported lazily, only by these two).
* `build_random_model`: a randomly initialised mr1jax model built on the device (the 2B device modes).
* `param_counts` / `summarize_params` / `text_params`: parameter counts by component.
* `image_grid`: the (t, h, w) patch grid of one square image.
* `OtherLoad`, `machine_busy`: CPU time other processes used while timing (a shared machine's load).
* `timed`, `timed_once`, `median_seconds`: wall-clock timing of blocking calls.
* `measure_bandwidth`, `measure_matmul`: the machine's memory bandwidth and matmul peak as JAX sees them.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mr1jax.models.qwen2_vl.config import Qwen2VLConfig, TextConfig, VisionConfig
from mr1jax.models.qwen2_vl.model import Qwen2VL

BUSY_FRACTION = 0.1  # flag a run where other processes used more than this share of the cores while timing


# ------------------------------------------------------------------------------------------ model
def bench_config(family: str = "qwen2_vl") -> Qwen2VLConfig:
    """The CPU benchmarks' ~100M-parameter Qwen2-VL (116,179,968 parameters), or its Qwen2.5-VL twin
    (`family="qwen2_5_vl"`, see below).

    Real vocabulary (151936) and special ids, tied embeddings; a shallow, narrow text decoder -- hidden 512,
    4 layers, 8 heads / 2 kv heads (head_dim 64, mrope_section (8, 12, 12)), intermediate 2816 -- and a
    shallow, narrow vision tower -- depth 4, embed_dim 512, 8 heads (head_dim 64), MLP 2048,
    out_hidden_size 512. Parameters: text 97,721,856 = tied embedding / LM head 77,791,232 + decoder layers
    19,930,112 (4.98M each) + final norm 512; vision 18,458,112 = patch embed 602,112 + blocks 12,609,536
    (3.15M each) + patch merger 5,246,464. Most of the total is the vocabulary-sized embedding.

    The Qwen2.5-VL twin has the same text decoder and a vision tower of the same width and depth in
    Qwen2.5-VL's form: RMSNorm, SwiGLU MLP of 1368 (512 x 3420 / 1280, the real models' ratio), windows of
    112 px (8 x 8 patches) and full attention in the last of the 4 blocks (the real models: every 8th).
    """
    text = TextConfig(hidden_size=512, intermediate_size=2816, num_layers=4, num_heads=8, num_kv_heads=2,
                      mrope_section=(8, 12, 12))
    if family == "qwen2_5_vl":
        from mr1jax.models.qwen2_5_vl.config import Qwen25VisionConfig, Qwen25VLConfig

        vision = Qwen25VisionConfig(depth=4, embed_dim=512, num_heads=8, intermediate_size=1368,
                                    out_hidden_size=512, window_size=112, fullatt_block_indexes=(3,))
        return Qwen25VLConfig(text=text, vision=vision, tie_word_embeddings=True)
    vision = VisionConfig(depth=4, embed_dim=512, num_heads=8, out_hidden_size=512)
    return Qwen2VLConfig(text=text, vision=vision, tie_word_embeddings=True)


def build_reference_pair(cfg: Qwen2VLConfig, seed: int = 0) -> tuple[Any, Qwen2VL]:
    """A randomised fp32 `transformers.Qwen2VLForConditionalGeneration` for `cfg`
    (`mr1jax.testing.hf_reference.build_hf_model`) and the same weights in mr1jax (fp32).

    The torch model is saved with ``save_pretrained`` to a temporary directory and read back with
    `mr1jax.models.qwen2_vl.hf.load_pretrained`, so the pair also exercises the checkpoint loader.
    Returns ``(hf_model, model)``. Requires torch.
    """
    from mr1jax.models.qwen2_vl.hf import load_pretrained
    from mr1jax.testing.hf_reference import build_hf_model

    hf_model = build_hf_model(cfg, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        hf_model.save_pretrained(tmp)
        model = load_pretrained(tmp, dtype=jnp.float32)
    return hf_model, model


def torch_inputs(cfg: Qwen2VLConfig, input_ids: np.ndarray, attention_mask: np.ndarray,
                 pixel_values: np.ndarray, image_grid_thw: np.ndarray) -> dict[str, Any]:
    """The keyword arguments a `transformers` Qwen2-VL forward / ``generate`` takes for a batch from
    `mr1jax.testing.hf_reference.make_batch`: long ids / mask / grids, fp32 pixels and ``mm_token_type_ids``
    (1 on image tokens). Requires torch."""
    import torch

    ids = torch.as_tensor(input_ids, dtype=torch.long)
    return dict(input_ids=ids,
                attention_mask=torch.as_tensor(attention_mask, dtype=torch.long),
                pixel_values=torch.as_tensor(pixel_values, dtype=torch.float32),
                image_grid_thw=torch.as_tensor(image_grid_thw, dtype=torch.long),
                mm_token_type_ids=(ids == cfg.image_token_id).int())


def build_random_model(cfg: Qwen2VLConfig, dtype: Any = jnp.bfloat16, seed: int = 0) -> Qwen2VL:
    """A randomly initialised mr1jax Qwen2-VL with parameters and compute in `dtype`, initialised inside
    ``nnx.jit`` (directly on the default device) and blocked until ready."""
    model = nnx.jit(lambda: Qwen2VL(cfg, rngs=nnx.Rngs(seed), dtype=dtype, param_dtype=dtype))()
    jax.block_until_ready(nnx.state(model))
    return model


def param_counts(model: Qwen2VL) -> dict[str, int]:
    """Parameter counts by component, keyed by the first two path entries: ``model.embed_tokens``,
    ``model.layers``, ``model.norm``, ``lm_head`` (untied only), ``visual.patch_embed``, ``visual.blocks``,
    ``visual.merger``. A tied head is counted once, in the embedding."""
    out: dict[str, int] = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key = ".".join(str(p) for p in path[:2])
        out[key] = out.get(key, 0) + int(np.prod(var.shape))
    return out


def summarize_params(counts: dict[str, int]) -> tuple[int, int, int]:
    """(text, vision, total) parameters from `param_counts`; text is everything outside ``visual``."""
    vision = sum(v for k, v in counts.items() if k.startswith("visual"))
    total = sum(counts.values())
    return total - vision, vision, total


def text_params(counts: dict[str, int]) -> int:
    """Everything a decode step reads: decoder layers, final norm, embedding (= tied head) or untied head."""
    return sum(v for k, v in counts.items() if k.startswith("model.") or k.startswith("lm_head"))


def image_grid(cfg: Qwen2VLConfig, image_size: int) -> tuple[int, int, int]:
    """The (t, h, w) patch grid of one square `image_size` image; exits if it does not tile into merged
    patches (a multiple of patch_size * spatial_merge_size = 28 pixels for Qwen2-VL)."""
    v = cfg.vision
    unit = v.patch_size * v.spatial_merge_size
    if image_size % unit:
        raise SystemExit(f"--image_size must be a multiple of {unit} (patch {v.patch_size} x merge "
                         f"{v.spatial_merge_size}), got {image_size}")
    side = image_size // v.patch_size
    return (1, side, side)


# ------------------------------------------------------------------------------------------ machine load
class OtherLoad:
    """CPU time that *other* processes (and the hypervisor: steal) used while timing, in cores.

    Busy time from /proc/stat minus this process's own CPU time, summed over the windows between `start`
    and `stop`, divided by their wall time. A shared machine's load slows every implementation (OpenMP torch
    much more than XLA), so the benchmarks report it next to the medians. `cores` is None where /proc/stat
    is unavailable or nothing was timed.
    """

    def __init__(self) -> None:
        self.other_s = 0.0
        self.wall_s = 0.0
        self.ok = os.path.exists("/proc/stat")

    @staticmethod
    def _busy_s() -> float:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal ...: everything but idle and iowait
        return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own_s() -> float:
        t = os.times()
        return t.user + t.system

    def start(self) -> None:
        if self.ok:
            self._b0, self._o0, self._w0 = self._busy_s(), self._own_s(), time.perf_counter()

    def stop(self) -> None:
        if self.ok:
            self.other_s += max(0.0, (self._busy_s() - self._b0) - (self._own_s() - self._o0))
            self.wall_s += time.perf_counter() - self._w0

    @property
    def cores(self) -> float | None:
        return self.other_s / self.wall_s if self.ok and self.wall_s else None


def machine_busy(other_cores: float, n_cores: int) -> bool:
    """Whether other processes' load (`OtherLoad.cores`) exceeds `BUSY_FRACTION` of the machine's cores."""
    return other_cores > BUSY_FRACTION * n_cores


# ------------------------------------------------------------------------------------------ timing
def timed(fn: Callable[[], Any], iters: int, load: OtherLoad | None = None) -> list[float]:
    """Wall seconds of each of `iters` back-to-back calls of `fn` (which must block until its result is
    ready); `load`, if given, measures other processes' CPU use over the whole block."""
    out = []
    if load:
        load.start()
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    if load:
        load.stop()
    return out


def timed_once(fn: Callable[[], Any], load: OtherLoad | None = None) -> float:
    """Wall seconds of one blocking call of `fn` (see `timed`)."""
    return timed(fn, 1, load)[0]


def median_seconds(fn: Callable[[], Any], iters: int, warmup: int = 1) -> float:
    """Median wall seconds of `iters` blocking calls of `fn` after `warmup` untimed ones (compile, buffers)."""
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn, iters))


# ------------------------------------------------------------------------------------------ machine peaks
def measure_bandwidth(nbytes: int, dtype: Any = jnp.float32, iters: int = 5) -> dict[str, float]:
    """Memory bandwidth in bytes/s on the default device, median of `iters` runs after one warm-up each:
    ``read``, a jitted full sum over an `nbytes` array (reads nbytes); ``copy``, a jitted elementwise scale
    of it (reads and writes nbytes, counted as 2 * nbytes moved)."""
    n = nbytes // jnp.dtype(dtype).itemsize
    x = jax.jit(lambda: jnp.ones((n,), dtype))()
    x.block_until_ready()
    read = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
    copy = jax.jit(lambda a: a * jnp.asarray(1.0001, dtype))  # not simplified away: one read + one write
    out = {}
    for name, fn, moved in (("read", read, nbytes), ("copy", copy, 2 * nbytes)):
        out[name] = moved / median_seconds(lambda fn=fn: fn(x).block_until_ready(), iters)
    del x
    return out


def measure_matmul(n: int, dtype: Any = jnp.float32, iters: int = 10) -> float:
    """Matmul throughput in FLOP/s (2 * n^3 per call) of a jitted n x n by n x n `jnp.dot` of random
    `dtype` matrices on the default device, median of `iters` runs after one warm-up."""
    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.random.normal(k1, (n, n), dtype)
    b = jax.random.normal(k2, (n, n), dtype)
    f = jax.jit(jnp.dot)
    return 2 * n**3 / median_seconds(lambda: f(a, b).block_until_ready(), iters)
