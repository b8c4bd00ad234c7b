"""Small NNX building blocks whose parameters carry logical sharding axes.

Every `nnx.Param` here has a ``logical_axes`` metadata tuple (one name per array dimension, or None);
`mr1jax.parallel.sharding` maps those names to mesh axes. Parameters are stored in `param_dtype` and cast to
`dtype` for compute.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx


def _init(rngs: nnx.Rngs, shape: tuple[int, ...], dtype, std: float = 0.02) -> jax.Array:
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class Dense(nnx.Module):
    """y = x @ kernel (+ bias). kernel [in, out] with logical axes `axes`; bias [out].

    Low-rank adapters (`mr1jax.models.lora.apply_lora`) set ``lora_a`` [in, r] and ``lora_b`` [r, out] (`LoRAParam`
    variables, stacked like the kernel in scanned layers) and ``lora_scale`` (alpha / r): the output then gains
    ``lora_scale * (x @ lora_a) @ lora_b``. Without adapters (the class defaults below) nothing changes.
    """

    lora_a = None
    lora_b = None
    lora_scale = 1.0
    # a quantised frozen base (`mr1jax.models.lora.quantize_base`): kernel holds int8 values or packed NF4 codes,
    # kernel_scale their scales, quant the format ("int8" / "nf4"); dequantised to the compute dtype per call
    kernel_scale = None
    quant = None

    def weight(self) -> jax.Array:
        """The kernel [..., in, out] in the compute dtype (dequantised when the base is quantised)."""
        if self.quant is None:
            return self.kernel[...].astype(self.dtype)
        return dequantize(self.kernel[...], self.kernel_scale[...], self.quant, self.dtype)

    def __init__(self, in_features: int, out_features: int, *, axes: tuple[str | None, str | None],
                 use_bias: bool, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.kernel = nnx.Param(_init(rngs, (in_features, out_features), param_dtype), logical_axes=axes)
        self.bias = (nnx.Param(jnp.zeros((out_features,), param_dtype), logical_axes=(axes[1],))
                     if use_bias else None)
        self.dtype = dtype

    def __call__(self, x: jax.Array, out_dtype=None) -> jax.Array:
        """x [..., in] -> [..., out] in the compute dtype, or accumulated and returned in `out_dtype`."""
        x = x.astype(self.dtype)
        y = jnp.dot(x, self.weight(), preferred_element_type=out_dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        if self.lora_a is not None:
            h = jnp.dot(x, self.lora_a[...].astype(self.dtype))
            d = jnp.dot(h, self.lora_b[...].astype(self.dtype), preferred_element_type=out_dtype)
            y = y + (self.lora_scale * d).astype(y.dtype)
        return y


# NF4 code book (QLoRA's 4-bit NormalFloat: quantiles of N(0, 1) scaled to [-1, 1], with an exact 0).
NF4_VALUES = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)
NF4_BLOCK = 64


def nf4_block(n_in: int) -> int:
    """Values per NF4 scale along the input axis: 64, or the whole axis when 64 does not divide it."""
    return NF4_BLOCK if n_in % NF4_BLOCK == 0 else n_in


def quantize(w: jax.Array, fmt: str) -> tuple[jax.Array, jax.Array]:
    """(codes, scales) of a kernel [..., in, out].

    int8: symmetric per output channel, scales [..., 1, out] = max |w| / 127 over the input axis.
    nf4:  per block of `nf4_block(in)` inputs and output channel, scales [..., in / block, out] = block absmax;
          codes = nearest NF4 value index, two per byte along the input axis ([..., in / 2, out] uint8).
    """
    w = w.astype(jnp.float32)
    if fmt == "int8":
        scale = jnp.maximum(jnp.max(jnp.abs(w), axis=-2, keepdims=True), 1e-12) / 127.0
        return jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8), scale
    if fmt == "nf4":
        *lead, n_in, n_out = w.shape
        if n_in % 2:
            raise ValueError(f"nf4 needs an even input dimension, got {n_in}")
        block = nf4_block(n_in)
        blocks = w.reshape(*lead, n_in // block, block, n_out)
        scale = jnp.maximum(jnp.max(jnp.abs(blocks), axis=-2), 1e-12)                   # [..., nb, out]
        normed = (blocks / scale[..., None, :]).reshape(w.shape)
        codes = jnp.argmin(jnp.abs(normed[..., None] - jnp.asarray(NF4_VALUES)), axis=-1).astype(jnp.uint8)
        packed = (codes[..., 0::2, :] << 4) | codes[..., 1::2, :]
        return packed, scale
    raise ValueError(f"unknown quantisation {fmt!r}; allowed: int8, nf4")


def dequantize(codes: jax.Array, scale: jax.Array, fmt: str, dtype) -> jax.Array:
    """The kernel [..., in, out] in `dtype` from `quantize`'s (codes, scales)."""
    if fmt == "int8":
        return codes.astype(dtype) * scale.astype(dtype)
    hi, lo = codes >> 4, codes & 15
    idx = jnp.stack([hi, lo], axis=-2)                                                  # [..., in/2, 2, out]
    *lead, half, _, n_out = idx.shape
    n_in = 2 * half
    values = jnp.asarray(NF4_VALUES, dtype)[idx.reshape(*lead, n_in, n_out).astype(jnp.int32)]
    block = nf4_block(n_in)
    values = values.reshape(*lead, n_in // block, block, n_out) * scale.astype(dtype)[..., None, :]
    return values.reshape(*lead, n_in, n_out)


class Embed(nnx.Module):
    """Token embedding table [vocab, hidden]; `attend` gives logits for a tied head."""

    def __init__(self, vocab: int, hidden: int, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.embedding = nnx.Param(_init(rngs, (vocab, hidden), param_dtype), logical_axes=("vocab", "embed"))
        self.dtype = dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array, out_dtype=None) -> jax.Array:
        """x [..., hidden] -> logits [..., vocab]; `out_dtype` (e.g. float32) accumulates the matmul in it."""
        return jnp.dot(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T, preferred_element_type=out_dtype)


class RMSNorm(nnx.Module):
    """RMSNorm as Qwen2: statistics in fp32, cast back to the input dtype, then scale by the weight."""

    def __init__(self, dim: int, *, eps: float, param_dtype=jnp.float32, axis_name: str = "norm"):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=(axis_name,))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(dtype) * xf.astype(dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with fp32 statistics (vision tower, patch merger)."""

    def __init__(self, dim: int, *, eps: float, param_dtype=jnp.float32, axis_name: str = "norm"):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=(axis_name,))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), logical_axes=(axis_name,))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(dtype)


# ------------------------------------------------------------------------------------------ stacked layers
REMAT_POLICIES = ("none", "full", "dots")


def check_remat(policy: str) -> str:
    """Return `policy` if it is one of `REMAT_POLICIES`, else raise ValueError naming the allowed values."""
    if policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {policy!r}; allowed: {', '.join(map(repr, REMAT_POLICIES))}")
    return policy


def stacked(make: Callable[[nnx.Rngs], nnx.Module], num: int, rngs: nnx.Rngs) -> nnx.Module:
    """`num` independently initialised copies of ``make(rngs)`` as ONE module whose every variable has a
    leading layer axis of size `num` (logical name ``"layers"`` prepended to each Param's ``logical_axes``).

    Each copy draws its parameters from its own key (one split of ``rngs.params()``). Run it with `scan`.
    """
    keys = jax.random.split(rngs.params(), num)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: make(nnx.Rngs(0))))
    state = jax.vmap(lambda key: nnx.state(make(nnx.Rngs(params=key))))(keys)
    module = nnx.merge(graphdef, state)
    for _, node in nnx.iter_graph(module):
        if isinstance(node, nnx.Param):
            axes = node.get_metadata().get("logical_axes")
            node.set_metadata(logical_axes=("layers",) + tuple(axes if axes is not None else (None,) * (node.ndim - 1)))
    return module


def unstack(layers: nnx.Module) -> list[nnx.Module]:
    """The per-layer modules of a stacked module (static slices of every variable; a copy under jit).

    For decode loops: slice once outside the loop and run the layers as a Python loop. A scan reads each
    layer's weights with a dynamic slice, which XLA:CPU materialises (a copy of all layer weights per
    decode step); per-layer arrays sliced once avoid that.
    """
    graphdef, state = nnx.split(layers)
    num = jax.tree.leaves(state)[0].shape[0]
    return [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state)) for i in range(num)]


def _remat(fn: Callable, policy: str) -> Callable:
    check_remat(policy)
    if policy == "full":
        return jax.checkpoint(fn, prevent_cse=False, policy=jax.checkpoint_policies.nothing_saveable)
    if policy == "dots":
        return jax.checkpoint(fn, prevent_cse=False,
                              policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    return fn


def scan(layers: nnx.Module, body: Callable[[nnx.Module, Any, jax.Array], Any], carry: Any, *,
         remat: str = "none") -> Any:
    """Run ``carry = body(layer_i, carry, i)`` for i = 0..L-1 with `jax.lax.scan` over the stacked
    parameters of `layers` (built by `stacked`); one layer body is traced and compiled whatever L is.

    `remat`: "none", "full" (`jax.checkpoint` of the whole layer body, nothing saved) or "dots" (matmul
    outputs without batch dimensions saved, the rest recomputed in the backward pass). The layers must not
    mutate their state (no batch statistics, no rng streams).
    """
    graphdef, state = nnx.split(layers)
    num = jax.tree.leaves(state)[0].shape[0]

    def step(carry, xs):
        layer_state, i = xs
        return body(nnx.merge(graphdef, layer_state), carry, i), None

    carry, _ = jax.lax.scan(_remat(step, remat), carry, (state, jnp.arange(num, dtype=jnp.int32)))
    return carry
