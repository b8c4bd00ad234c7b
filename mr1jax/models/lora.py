"""Low-rank adapters (LoRA) on the model's `Dense` layers: apply, merge, split for training, PEFT export / import.

    cfg = LoRAConfig(rank=16, alpha=32, targets="language")
    apply_lora(model, cfg, seed=0)                     # adds lora_a [in, r], lora_b [r, out] (B = 0) to each target
    graphdef, adapters, base = nnx.split(model, LoRAParam, ...)    # trainable / frozen
    save_peft(model, "out/adapter", cfg)               # adapter_config.json + adapter_model.safetensors
    merge_lora(model)                                  # kernel += alpha/r * A @ B, adapters removed

Adapters are attached at the layer level: every `Dense` whose module path (dots, e.g.
``model.layers.self_attn.q_proj`` or ``visual.blocks.attn.qkv``) fully matches the target regex gets two
`LoRAParam` variables. In the scanned decoder layers / vision blocks the kernel is stacked [layers, in, out]
and so are the adapters ([layers, in, r], [layers, r, out]): the scan slices them with the kernel, and the
sampler's per-layer slices (`layers.unstack`) include them, so decode applies the adapters without a merge.
Nothing here names a model family: the paths and presets hold for every family whose decoder is the Qwen2
text decoder (Qwen2-VL, Qwen2.5-VL).

`LoRAParam` is its own `nnx.Variable` type, not an `nnx.Param`: ``nnx.state(model, nnx.Param)`` stays the base
model (what `hf.save_pretrained`, `sharding.shard_model` and checkpoints of full fine-tuning read), and
``nnx.split(model, LoRAParam, ...)`` separates the trainable adapters from the frozen base. Adapters carry
``logical_axes`` like the kernel they adapt (input axis on A, output axis on B, ``lora_rank`` replicated), so
`mr1jax.parallel.sharding.param_shardings` shards them by the same rules.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mr1jax.parallel import distributed
from mr1jax.parallel.storage import local_input_dir, local_output_dir
from mr1jax.parallel import sharding as shd
from mr1jax.models.qwen2_vl.layers import Dense


class LoRAParam(nnx.Variable):
    """A trainable low-rank adapter matrix (A or B of a `Dense`)."""


#: ``lora.targets`` presets (regexes over Dense module paths). Join several with "+", e.g. "language+vision".
PRESETS: dict[str, str] = {
    "attention": r"model\.layers\.self_attn\.\w+",                     # q, k, v, o of every decoder layer
    "mlp": r"model\.layers\.mlp\.\w+",                                 # gate, up, down
    "language": r"model\.layers\.(self_attn|mlp)\.\w+",                # every linear layer of the decoder
    "vision": r"visual\.(blocks|merger)\.(\w+\.)*\w+",                 # vision blocks and patch merger
}
PRESETS["attention_mlp"] = PRESETS["language"]
#: ``lora.base_quant`` values (the frozen base's storage): none (compute dtype), int8, nf4 (QLoRA).
BASE_QUANT = ("none", "int8", "nf4")
#: Dense layers never quantised (they stay in the compute dtype, as QLoRA keeps its output layer).
NOT_QUANTISED = re.compile(r"lm_head|visual\.patch_embed")
#: ``lora.sft_to_rl``: what the SFT phase's adapters become when RL starts.
SFT_TO_RL = ("merge", "keep")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """rank r (0 = no adapters), alpha (output scale alpha / r), dropout (recorded in the PEFT config; training
    applies none), targets (a preset of `PRESETS`, presets joined by "+", or a regex over Dense module paths)."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = "language"

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    @classmethod
    def from_config(cls, c) -> "LoRAConfig":
        """From a training config's ``lora`` group (absent: rank 0)."""
        lc = c.get("lora") if hasattr(c, "get") else None
        if lc is None:
            return cls()
        return cls(rank=int(lc.rank), alpha=float(lc.alpha), dropout=float(lc.dropout), targets=str(lc.targets))


def target_regex(targets: str) -> str:
    """The regex a `targets` string stands for: presets joined by "+" are expanded, anything else is a regex."""
    parts = [p.strip() for p in targets.split("+")]
    if parts and all(p in PRESETS for p in parts):
        return "|".join(f"(?:{PRESETS[p]})" for p in parts)
    return targets


def module_path(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path)


def target_modules(model: nnx.Module, targets: str) -> list[tuple[str, Dense]]:
    """(module path, Dense) of every Dense whose path fully matches `targets` (see `target_regex`).

    Raises ValueError for an invalid regex or one that matches no Dense (naming a few valid paths)."""
    try:
        pattern = re.compile(target_regex(targets))
    except re.error as e:
        raise ValueError(f"lora.targets {targets!r} is not a valid regex: {e}") from None
    dense = [(module_path(p), m) for p, m in nnx.iter_graph(model) if isinstance(m, Dense)]
    hits = [(p, m) for p, m in dense if pattern.fullmatch(p)]
    if not hits:
        raise ValueError(f"lora.targets {targets!r} matches no linear layer; presets: {', '.join(PRESETS)}; "
                         f"paths look like: {', '.join(p for p, _ in dense[:6])}")
    return hits


def _adapter_axes(kernel: nnx.Variable) -> tuple[tuple, tuple]:
    axes = kernel.get_metadata().get("logical_axes") or (None,) * kernel.ndim
    lead = tuple(axes[:-2])
    return lead + (axes[-2], "lora_rank"), lead + ("lora_rank", axes[-1])


def _init_a(key: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
    """PEFT's default A: Kaiming-uniform (a = sqrt(5)) over the input dimension, i.e. U(-1/sqrt(in), 1/sqrt(in))."""
    bound = 1.0 / np.sqrt(shape[-2])
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


def apply_lora(model: nnx.Module, cfg: LoRAConfig, *, seed: int = 0, dtype=None) -> nnx.Module:
    """Attach rank-`cfg.rank` adapters to every target Dense of `model` (in place; returns the model).

    A is drawn per target (and per layer of a stacked kernel) from `seed`; B is zero, so the model's outputs
    are unchanged. `dtype`: the adapters' storage dtype (default: the kernel's)."""
    if cfg.rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {cfg.rank}")
    key = jax.random.key(seed)
    for i, (_, dense) in enumerate(target_modules(model, cfg.targets)):
        kernel = dense.kernel
        *lead, n_in, n_out = kernel.shape
        dt = dtype or kernel.dtype
        a_axes, b_axes = _adapter_axes(kernel)
        dense.lora_a = LoRAParam(_init_a(jax.random.fold_in(key, i), (*lead, n_in, cfg.rank), dt), logical_axes=a_axes)
        dense.lora_b = LoRAParam(jnp.zeros((*lead, cfg.rank, n_out), dt), logical_axes=b_axes)
        dense.lora_scale = cfg.scale
    return model


def adapted(model: nnx.Module) -> list[tuple[str, Dense]]:
    """(module path, Dense) of every Dense carrying adapters."""
    return [(module_path(p), m) for p, m in nnx.iter_graph(model) if isinstance(m, Dense) and m.lora_a is not None]


def remove_lora(model: nnx.Module) -> nnx.Module:
    """Drop every adapter (in place): the base model again."""
    for _, dense in adapted(model):
        del dense.lora_a, dense.lora_b, dense.lora_scale
    return model


# ----------------------------------------------------------------------------------------- quantised base
def quantize_base(model: nnx.Module, fmt: str) -> nnx.Module:
    """QLoRA: store the frozen base's linear kernels quantised (in place; returns the model). `fmt`: "none"
    (nothing changes), "int8" (per output channel) or "nf4" (4-bit NormalFloat, blocks of 64 inputs); see
    `layers.quantize`. Embeddings, norms, biases, the LM head and the patch embedding stay in their dtype;
    adapters (attach them first) are not quantised. Each Dense dequantises its kernel to the compute dtype when
    called (inside the layer scan: one layer's weights at a time)."""
    if fmt == "none":
        return model
    from mr1jax.models.qwen2_vl.layers import quantize

    for p, dense in list(nnx.iter_graph(model)):
        if not isinstance(dense, Dense) or dense.quant is not None or NOT_QUANTISED.search(module_path(p)):
            continue
        k = dense.kernel
        axes = k.get_metadata().get("logical_axes") or (None,) * k.ndim
        codes, scale = quantize(k[...], fmt)
        dense.kernel = k.replace(codes)
        dense.kernel_scale = nnx.Param(scale.astype(dense.dtype), logical_axes=tuple(axes))
        dense.quant = fmt
    return model


def dequantize_base(model: nnx.Module) -> nnx.Module:
    """Undo `quantize_base` (in place): every kernel back in the compute dtype, dequantised."""
    for _, dense in list(nnx.iter_graph(model)):
        if isinstance(dense, Dense) and dense.quant is not None:
            dense.kernel = dense.kernel.replace(dense.weight())
            del dense.kernel_scale, dense.quant
    return model


@jax.jit
def _merged_kernel(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array) -> jax.Array:
    delta = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)
    return (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Fold every adapter into its kernel (kernel += scale * A @ B, in fp32, stored in the kernel's dtype) and
    remove the adapters (in place; returns the model). The kernels become new Variables, so states the model was
    merged from (``nnx.merge`` shares Variables) keep their values."""
    dequantize_base(model)
    for _, dense in adapted(model):
        k = dense.kernel           # a new Variable: merged models share Variables with the states they came from
        dense.kernel = k.replace(_merged_kernel(k[...], dense.lora_a[...], dense.lora_b[...],
                                                jnp.float32(dense.lora_scale)))
    return remove_lora(model)


def shard_adapters(model: nnx.Module, mesh) -> nnx.Module:
    """Place every adapter on its shards (by its logical axes; `mr1jax.parallel.sharding` rules) in place."""
    state = nnx.state(model, LoRAParam)
    sh = shd.param_shardings(state, mesh)
    nnx.update(model, jax.tree.map(lambda x, s: jax.device_put(x, s), state, sh))
    return model


def disabled(adapters: nnx.State) -> nnx.State:
    """The adapters with every value 0: the model with them is exactly the base model (the reference)."""
    return jax.tree.map(jnp.zeros_like, adapters)


def num_params(state: nnx.State) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))


# ----------------------------------------------------------------------------------------- training split


# ----------------------------------------------------------------------------------------- PEFT format
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _runtime_name(hf_name: str) -> str:
    """Hub tensor name -> the module path of `transformers>=5`'s Qwen2-VL / Qwen2.5-VL model (what PEFT wraps)."""
    for old, new in (("model.", "model.language_model."), ("visual.", "model.visual.")):
        if hf_name.startswith(old):
            return new + hf_name[len(old):]
    return hf_name


def _default_hf_key():
    from mr1jax.models.qwen2_vl.hf import hf_key

    return hf_key


def peft_module_names(model: nnx.Module, hf_key: Callable | None = None) -> dict[str, list[str]]:
    """{our Dense path: [the transformers module name per layer]} for every adapted Dense (one name when
    not stacked), e.g. ``model.layers.self_attn.q_proj`` -> ``model.language_model.layers.{i}.self_attn.q_proj``."""
    hf_key = hf_key or _default_hf_key()
    out = {}
    for path, dense in adapted(model):
        name, _ = hf_key(tuple(path.split(".")) + ("kernel",))
        name = _runtime_name(name[:-len(".weight")])
        n = dense.kernel.shape[0] if "{layer}" in name else None
        out[path] = [name] if n is None else [name.replace("{layer}", str(i)) for i in range(n)]
    return out


def peft_tensors(model: nnx.Module, hf_key: Callable | None = None, dtype=None) -> dict[str, np.ndarray]:
    """The adapters as PEFT names them: ``base_model.model.<module>.lora_A.weight`` [r, in] and
    ``.lora_B.weight`` [out, r] (transposed from ours), one per layer of a stacked adapter."""
    names = peft_module_names(model, hf_key)
    out = {}
    for path, dense in adapted(model):
        a, b = distributed.fetch(dense.lora_a[...]), distributed.fetch(dense.lora_b[...])   # all processes gather
        if a.ndim == 2:
            a, b = a[None], b[None]
        for i, mod in enumerate(names[path]):
            for part, arr in (("lora_A", a[i].T), ("lora_B", b[i].T)):
                arr = arr if dtype is None else arr.astype(dtype)
                out[f"base_model.model.{mod}.{part}.weight"] = np.ascontiguousarray(arr)
    return out


def _target_pattern(module_names: list[str]) -> str:
    """A regex (PEFT full-matches a string `target_modules`) covering exactly these module names, layer
    indices generalised."""
    generic = sorted({re.escape(n).replace(r"\{layer\}", "{layer}") for n in module_names})
    generic = sorted({re.sub(r"\.\d+\.", r".\\d+.", g) for g in generic})
    return "^(?:" + "|".join(generic) + ")$"


def save_peft(model: nnx.Module, path: str | os.PathLike, cfg: LoRAConfig, *, base_model: str = "",
              hf_key: Callable | None = None, dtype=None) -> str:
    """Write the adapters of `model` as a PEFT LoRA directory (`adapter_config.json`, `adapter_model.safetensors`)
    that ``peft.PeftModel.from_pretrained(Qwen2VLForConditionalGeneration, path)`` loads. Returns the path. With
    several processes every process calls it (the adapters are gathered) and process 0 writes."""
    from mr1jax.models.qwen2_vl.hf import write_safetensors

    path = os.fspath(path)
    tensors = peft_tensors(model, hf_key, dtype)          # a collective with several processes: all call it
    if not distributed.is_primary():                      # process 0 writes; the others wait until it has
        distributed.sync(f"mr1jax_save_peft_{path}")
        return path
    modules = [n for names in peft_module_names(model, hf_key).values() for n in names]
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model or None,
        "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "bias": "none",
        "target_modules": _target_pattern(modules), "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "init_lora_weights": True, "modules_to_save": None, "inference_mode": True,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
        "revision": None,
    }
    with local_output_dir(path) as out:                   # an object-store path: staged, then copied up
        write_safetensors(os.path.join(out, ADAPTER_WEIGHTS), tensors)
        with open(os.path.join(out, ADAPTER_CONFIG), "w") as f:
            json.dump(config, f, indent=2)
    distributed.sync(f"mr1jax_save_peft_{path}")
    return path


def _ours_of_peft(name: str) -> str:
    """A PEFT tensor name -> the transformers module name it adapts in the runtime layout, ``{i}`` -> index."""
    name = name[len("base_model.model."):] if name.startswith("base_model.model.") else name
    name = re.sub(r"\.lora_[AB](\.[^.]+)?\.weight$", "", name)
    if name.startswith("model.") and not name.startswith(("model.language_model.", "model.visual.")):
        name = "model.language_model." + name[len("model."):]       # transformers 4.x layout
    if name.startswith("visual."):
        name = "model." + name
    return name


def load_peft(model: nnx.Module, path: str | os.PathLike, *, hf_key: Callable | None = None,
              mesh=None, dtype=None) -> LoRAConfig:
    """Attach the PEFT LoRA adapters in directory `path` to `model` (in place) and return their config.
    The adapters are stored in `dtype` (default float32, whatever the base's dtype).

    Accepts the names of transformers 4 (``base_model.model.model.layers.*``) and 5
    (``base_model.model.model.language_model.layers.*``). Raises ValueError naming the PEFT modules that have no
    counterpart in the model (or the model targets without tensors)."""
    from mr1jax.models.qwen2_vl.hf import SafetensorsFile

    path = os.fspath(path)
    with local_input_dir(path, (ADAPTER_CONFIG, ADAPTER_WEIGHTS)) as local:   # an object store: copied down
        with open(os.path.join(local, ADAPTER_CONFIG)) as f:
            pc = json.load(f)
        if pc.get("peft_type", "LORA") != "LORA" or pc.get("use_dora") or pc.get("use_rslora") \
                or pc.get("rank_pattern") or pc.get("alpha_pattern"):
            raise ValueError(f"{path}: only plain LoRA adapters (one rank and alpha, no DoRA / rsLoRA) can be "
                             "loaded")
        f = SafetensorsFile(os.path.join(local, ADAPTER_WEIGHTS))
        arrays = {key: np.array(f[key]) for key in f.keys()}            # copies: the staged files go
    return _attach_peft(model, path, pc, arrays, hf_key=hf_key, mesh=mesh, dtype=dtype)


def _attach_peft(model: nnx.Module, path: str, pc: dict[str, Any], f: dict[str, np.ndarray], *,
                 hf_key: Callable | None, mesh, dtype) -> LoRAConfig:
    """`load_peft` once the files are read: `pc` the adapter config, `f` tensor name -> array."""
    tensors: dict[str, dict[str, str]] = {}
    for key in f.keys():
        part = "A" if ".lora_A" in key else "B" if ".lora_B" in key else None
        if part is None:
            raise ValueError(f"{path}: unexpected tensor {key} (only lora_A / lora_B are supported)")
        tensors.setdefault(_ours_of_peft(key), {})[part] = key
    # every Dense whose (per-layer) module names all have tensors becomes a target
    hf_key = hf_key or _default_hf_key()
    rank, alpha = int(pc["r"]), float(pc["lora_alpha"])
    used, targets = set(), []
    for p, dense in nnx.iter_graph(model):
        if not isinstance(dense, Dense):
            continue
        name, _ = hf_key(tuple(str(x) for x in p) + ("kernel",))
        name = _runtime_name(name[:-len(".weight")])
        names = [name.replace("{layer}", str(i)) for i in range(dense.kernel.shape[0])] if "{layer}" in name \
            else [name]
        if not any(n in tensors for n in names):
            continue
        missing = [n for n in names if n not in tensors]
        if missing:
            raise ValueError(f"{path}: adapters for {module_path(p)} cover only some layers (missing {missing[:3]})")
        used.update(names)
        targets.append(re.escape(module_path(p)))
        a = np.stack([f[tensors[n]["A"]].T for n in names])
        b = np.stack([f[tensors[n]["B"]].T for n in names])
        if "{layer}" not in name:
            a, b = a[0], b[0]
        dt = dtype or jnp.float32                  # the file's values kept exactly (adapters train in fp32)
        a_axes, b_axes = _adapter_axes(dense.kernel)
        dense.lora_a = LoRAParam(jnp.asarray(a.astype(dt)), logical_axes=a_axes)
        dense.lora_b = LoRAParam(jnp.asarray(b.astype(dt)), logical_axes=b_axes)
        dense.lora_scale = alpha / rank
    unknown = sorted(set(tensors) - used)
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} adapted module(s) do not exist in the model: {unknown[:5]}")
    if mesh is not None:
        shard_adapters(model, mesh)
    return LoRAConfig(rank=rank, alpha=alpha, dropout=float(pc.get("lora_dropout", 0.0)),
                      targets="|".join(targets))


def fresh_adapters(adapters: nnx.State, *, seed: int) -> nnx.State:
    """New adapters shaped (and sharded) like `adapters`: A re-drawn from `seed`, B zero."""
    key = jax.random.key(seed)
    flat = list(nnx.to_flat_state(adapters))
    out, i = [], 0
    for path, var in flat:
        x = var[...]
        if path[-1] == "lora_a":
            new = _init_a(jax.random.fold_in(key, i), x.shape, x.dtype)
            i += 1
        else:
            new = jnp.zeros(x.shape, x.dtype)
        out.append((path, var.replace(jax.device_put(new, x.sharding))))
    return nnx.from_flat_state(out)


def fold_adapters(graphdef: nnx.GraphDef, adapters: nnx.State, base: nnx.State, *, seed: int
                  ) -> tuple[nnx.State, nnx.State]:
    """(fresh adapters, base with `adapters` merged into its kernels): the SFT -> RL "merge" boundary. The merged
    kernels keep their shardings; the fresh adapters are `fresh_adapters(adapters, seed=seed)`."""
    model = nnx.merge(graphdef, adapters, base)
    for _, dense in adapted(model):
        if dense.quant is not None:        # QLoRA: merge into the dequantised kernel, quantise the result again
            from mr1jax.models.qwen2_vl.layers import quantize

            codes, scale = quantize(_merged_kernel(dense.weight(), dense.lora_a[...], dense.lora_b[...],
                                                   jnp.float32(dense.lora_scale)), dense.quant)
            dense.kernel = dense.kernel.replace(jax.device_put(codes, dense.kernel[...].sharding))
            dense.kernel_scale = dense.kernel_scale.replace(
                jax.device_put(scale.astype(dense.kernel_scale.dtype), dense.kernel_scale[...].sharding))
            continue
        k = dense.kernel
        merged = _merged_kernel(k[...], dense.lora_a[...], dense.lora_b[...], jnp.float32(dense.lora_scale))
        dense.kernel = k.replace(jax.device_put(merged, k[...].sharding))     # new Variable: `base` is untouched
    _, _, new_base = nnx.split(model, LoRAParam, ...)
    return fresh_adapters(adapters, seed=seed), new_base


def adapters_from_peft(graphdef: nnx.GraphDef, adapters: nnx.State, base: nnx.State, path: str) -> nnx.State:
    """The adapters read from a PEFT directory, shaped and sharded like `adapters` (same targets)."""
    model = nnx.merge(graphdef, adapters, base)
    load_peft(model, path)
    _, loaded, _ = nnx.split(model, LoRAParam, ...)
    return jax.tree.map(lambda new, old: jax.device_put(new.astype(old.dtype), old.sharding), loaded, adapters)


# ----------------------------------------------------------------------------------------- run checkpoints
