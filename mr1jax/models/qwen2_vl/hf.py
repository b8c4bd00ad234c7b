"""Hugging Face checkpoint import/export for Qwen2-VL.

`load_pretrained` reads ``config.json`` and ``model.safetensors`` (or a sharded
``model.safetensors.index.json``) and places every tensor directly on its shards: each device reads only its
own slice from a memory-mapped file, so a 7B checkpoint is never gathered whole on one device.
`save_pretrained` writes ``config.json`` and safetensors in the hub's key layout, which
``transformers.Qwen2VLForConditionalGeneration.from_pretrained`` loads with no missing or unexpected keys.

Both the hub key layout (``model.layers.*``, ``visual.*``) and the runtime layout of `transformers>=5`
(``model.language_model.*``, ``model.visual.*``) are accepted on load.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from mr1jax.parallel import distributed
from mr1jax.parallel import sharding as shd
from mr1jax.models.qwen2_vl.config import Qwen2VLConfig
from mr1jax.models.qwen2_vl.model import Qwen2VL

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
              "I64": np.int64, "I32": np.int32}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not fit the model built from its config."""


# ------------------------------------------------------------------------------------------ safetensors I/O
class SafetensorsFile:
    """Memory-mapped safetensors file: ``f[name]`` is a lazily read numpy view (slicing reads only that part)."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path} is not a valid safetensors file: {e}") from e
        self.metadata = header.pop("__metadata__", {})
        self.header = header
        self._data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def __getitem__(self, name: str) -> np.ndarray:
        info = self.header[name]
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        return self._data[start:end].view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` to `path` atomically (temp file + rename). Supports float32/float16/bfloat16/int."""
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, arr in tensors.items():
        header[name] = {"dtype": _ST_NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for arr in tensors.values():
                f.write(np.ascontiguousarray(arr).tobytes())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def open_checkpoint(path: str) -> dict[str, SafetensorsFile]:
    """Map every tensor name in a HF directory to the file holding it (single file or sharded index)."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = {fname: SafetensorsFile(os.path.join(path, fname)) for fname in sorted(set(weight_map.values()))}
        return {name: files[fname] for name, fname in weight_map.items()}
    if os.path.isfile(single):
        f = SafetensorsFile(single)
        return {name: f for name in f.keys()}
    raise FileNotFoundError(f"{path} holds neither model.safetensors nor model.safetensors.index.json")


# ------------------------------------------------------------------------------------------ name mapping
_LAYER = "{layer}"  # placeholder for the layer index in the HF name of a stacked (scanned) parameter
_RENAMES = [  # (our path regex, HF name) applied in order
    (r"^model\.layers\.", "model.layers.{layer}."),
    (r"^visual\.blocks\.", "visual.blocks.{layer}."),
    (r"^visual\.patch_embed\.kernel$", "visual.patch_embed.proj.weight"),
    (r"^visual\.blocks\.\{layer\}\.fc(\d)\.", r"visual.blocks.{layer}.mlp.fc\1."),
    (r"^visual\.merger\.fc1\.", "visual.merger.mlp.0."),
    (r"^visual\.merger\.fc2\.", "visual.merger.mlp.2."),
    (r"\.embedding$", ".weight"),
    (r"\.kernel$", ".weight"),
]


def hf_key(path: tuple[Any, ...]) -> tuple[str, str]:
    """Our parameter path -> (HF tensor name, transform) with transform in {'copy', 'linear', 'patch'}.

    'linear': HF stores [out, in], we store [in, out]. 'patch': the Conv3d kernel [E, C, T, P, P] is
    flattened to [E, C*T*P*P] and transposed. Parameters of the scanned decoder layers / vision blocks are
    stacked along a leading layer axis; their HF name holds a ``{layer}`` placeholder (`hf_layer_names`), and
    the transform applies to each layer's slice.
    """
    name = ".".join(str(p) for p in path)
    kind = "patch" if name == "visual.patch_embed.kernel" else "linear" if name.endswith(".kernel") else "copy"
    for pattern, repl in _RENAMES:
        name = re.sub(pattern, repl, name)
    return name, kind


def hf_layer_names(name: str, shape: tuple[int, ...]) -> list[str] | None:
    """The per-layer HF names of a stacked parameter (`hf_key` name with ``{layer}``), or None if unstacked."""
    if _LAYER not in name:
        return None
    return [name.replace(_LAYER, str(i)) for i in range(shape[0])]


def normalize_hf_key(name: str) -> str:
    """Map `transformers>=5` runtime names onto the hub layout."""
    for old, new in (("model.language_model.", "model."), ("model.visual.", "visual."),
                     ("language_model.model.", "model."), ("language_model.lm_head.", "lm_head.")):
        if name.startswith(old):
            return new + name[len(old):]
    return name


def to_hf_layout(arr: np.ndarray, kind: str, hf_shape: tuple[int, ...] | None = None) -> np.ndarray:
    if kind == "linear":
        return arr.T
    if kind == "patch":
        return arr.T.reshape(hf_shape)
    return arr


def _hf_shape(shape: tuple[int, ...], kind: str, cfg: Qwen2VLConfig) -> tuple[int, ...]:
    if kind == "linear":
        return shape[::-1]
    if kind == "patch":
        v = cfg.vision
        return (shape[1], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    return tuple(shape)


def _read_stacked(sources: list[tuple[SafetensorsFile, str]], kind: str, index: tuple[slice, ...] | None,
                  dtype) -> np.ndarray:
    """Read (a slice of) a stacked parameter from its per-layer tensors: index[0] selects the layers."""
    layers = range(len(sources)) if index is None else range(len(sources))[index[0]]
    rest = None if index is None else index[1:]
    return np.stack([_read(*sources[i], kind, rest, dtype) for i in layers])


def _read(src: SafetensorsFile, name: str, kind: str, index: tuple[slice, ...] | None, dtype) -> np.ndarray:
    """Read (a slice of) tensor `name` in our layout, cast to `dtype`."""
    t = src[name]
    if kind == "patch":
        t = t.reshape(t.shape[0], -1).T
        out = t if index is None else t[index]
    elif kind == "linear":
        out = (t if index is None else t[index[::-1]]).T
    else:
        out = t if index is None else t[index]
    return np.asarray(out).astype(dtype)


# ------------------------------------------------------------------------------------------ load / save
def load_pretrained(path: str | os.PathLike, *, dtype=jnp.bfloat16, param_dtype=None, mesh: Mesh | None = None,
                    config: Qwen2VLConfig | None = None, remat: str = "none") -> Qwen2VL:
    """Load a Hugging Face Qwen2-VL or Qwen2.5-VL directory into a (sharded) `Qwen2VL` / `Qwen25VL`
    (chosen by config.json's model_type).

    Args:
      path: directory with config.json and model.safetensors or model.safetensors.index.json.
      dtype: compute dtype; param_dtype: storage dtype (defaults to `dtype`).
      mesh: when given, each parameter is created directly on its shards (`mr1jax.parallel.sharding` rules).
      config: override the config read from `path`.
      remat: rematerialisation policy of the scanned layers (`Qwen2VL`, one of `REMAT_POLICIES`).
    Raises:
      CheckpointMismatchError naming every missing, unexpected and misshaped tensor.
    """
    from mr1jax.models.families import config_from_hf, model_class  # the families import this module's users

    path = os.fspath(path)
    cfg = config or config_from_hf(path)
    param_dtype = param_dtype or dtype
    model_cls = model_class(cfg)
    abstract = nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype,
                                              remat=remat))
    graphdef, state = nnx.split(abstract)
    # normalized name -> (file, name inside the file)
    tensors = {normalize_hf_key(k): (f, k) for k, f in open_checkpoint(path).items()}

    flat = list(nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
    missing, misshaped, used = [], [], set()
    plan = []
    for p, var in flat:
        name, kind = hf_key(p)
        names = hf_layer_names(name, var.shape)
        expected = _hf_shape(var.shape if names is None else var.shape[1:], kind, cfg)
        sources, ok = [], True
        for one in names or [name]:
            if one not in tensors:
                missing.append(f"{one} {list(expected)}")
                ok = False
                continue
            used.add(one)
            src, stored = tensors[one]
            got = src.shape(stored)
            if tuple(got) != expected:
                misshaped.append(f"{one}: checkpoint {list(got)} vs model {list(expected)}")
                ok = False
                continue
            sources.append((src, stored))
        if ok:
            plan.append((p, var, sources if names is not None else sources[0], kind))
    unexpected = sorted(set(tensors) - used - ({"lm_head.weight"} if cfg.tie_word_embeddings else set()))
    if missing or misshaped or unexpected:
        lines = [f"checkpoint {path} does not match the {model_cls.__name__} model built from its config:"]
        for title, items in (("missing", missing), ("misshaped", misshaped), ("unexpected", unexpected)):
            if items:
                lines.append(f"  {len(items)} {title}: " + "; ".join(items))
        raise CheckpointMismatchError("\n".join(lines))

    values = {}
    for p, var, source, kind in plan:
        np_dtype = np.dtype(var.dtype)
        if isinstance(source, list):   # stacked: one HF tensor per layer
            read = lambda idx, source=source, kind=kind, dt=np_dtype: _read_stacked(source, kind, idx, dt)  # noqa: E731
        else:
            read = lambda idx, source=source, kind=kind, dt=np_dtype: _read(*source, kind, idx, dt)  # noqa: E731
        if mesh is None:
            values[p] = jnp.asarray(read(None))
        else:
            spec = shd.logical_to_spec(var.get_metadata().get("logical_axes"), var.shape, mesh)
            values[p] = jax.make_array_from_callback(var.shape, NamedSharding(mesh, spec), read)
    params = nnx.from_flat_state([(p, var.replace(values[p])) for p, var, *_ in plan])
    model = nnx.merge(graphdef, params, nnx.state(abstract, nnx.Not(nnx.Param)))
    return model


def iter_hf_tensors(model: Qwen2VL, save_dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF name, host array in HF layout) for every parameter, one tensor gathered at a time (a parameter
    spread over several processes' devices is gathered by all of them: every process must iterate).

    Stacked (scanned) layer parameters are unstacked into one tensor per layer, in layer order.
    """
    cfg = model.config
    for p, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, kind = hf_key(p)
        names = hf_layer_names(name, var.shape)
        value = var[...]
        slices = [(name, value)] if names is None else [(n, value[i]) for i, n in enumerate(names)]
        for one, part in slices:
            arr = distributed.fetch(part)
            if save_dtype is not None:
                arr = arr.astype(save_dtype)
            yield one, np.ascontiguousarray(to_hf_layout(arr, kind, _hf_shape(arr.shape, kind, cfg)))


def save_pretrained(model: Qwen2VL, path: str | os.PathLike, *, max_shard_bytes: int = 5 * 1024**3,
                    save_dtype=None) -> None:
    """Write `model` as a Hugging Face directory (config.json, generation_config.json, safetensors).

    With several processes, every process calls it (parameters are gathered tensor by tensor into host memory,
    never onto one host's devices) and process 0 writes.
    Files above `max_shard_bytes` are split into ``model-0000k-of-0000n.safetensors`` with an index.
    `save_dtype` (e.g. jnp.bfloat16) casts on write; default keeps the parameter dtype.
    """
    path = os.fspath(path)
    if not distributed.is_primary():                  # every process gathers (collectives), process 0 writes
        for _ in iter_hf_tensors(model, save_dtype):
            pass
        return
    os.makedirs(path, exist_ok=True)
    cfg = model.config
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, arr in iter_hf_tensors(model, save_dtype):
        if shards[-1] and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
    for stale in os.listdir(path):
        if re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?", stale):
            os.remove(os.path.join(path, stale))
    if len(shards) == 1:
        write_safetensors(os.path.join(path, "model.safetensors"), shards[0])
    else:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(os.path.join(path, fname), shard)
            weight_map.update({k: fname for k in shard})
            total += sum(a.nbytes for a in shard.values())
        _write_json(os.path.join(path, "model.safetensors.index.json"),
                    {"metadata": {"total_size": total}, "weight_map": weight_map})
    hf_cfg = cfg.to_hf_dict()
    hf_cfg["dtype"] = {"bfloat16": "bfloat16", "float16": "float16"}.get(
        np.dtype(save_dtype or next(iter(jax.tree.leaves(nnx.state(model, nnx.Param)))).dtype).name, "float32")
    _write_json(os.path.join(path, "config.json"), hf_cfg)
    _write_json(os.path.join(path, "generation_config.json"),
                {"bos_token_id": cfg.bos_token_id, "eos_token_id": list(cfg.eos_token_ids),
                 "pad_token_id": cfg.pad_token_id})


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)
