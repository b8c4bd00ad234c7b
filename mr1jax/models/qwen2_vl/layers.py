"""Small NNX building blocks whose parameters carry logical sharding axes.

Every `nnx.Param` here has a ``logical_axes`` metadata tuple (one name per array dimension, or None);
`mr1jax.sharding` maps those names to mesh axes. Parameters are stored in `param_dtype` and cast to
`dtype` for compute.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def _init(rngs: nnx.Rngs, shape: tuple[int, ...], dtype, std: float = 0.02) -> jax.Array:
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class Dense(nnx.Module):
    """y = x @ kernel (+ bias). kernel [in, out] with logical axes `axes`; bias [out]."""

    def __init__(self, in_features: int, out_features: int, *, axes: tuple[str | None, str | None],
                 use_bias: bool, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.kernel = nnx.Param(_init(rngs, (in_features, out_features), param_dtype), logical_axes=axes)
        self.bias = (nnx.Param(jnp.zeros((out_features,), param_dtype), logical_axes=(axes[1],))
                     if use_bias else None)
        self.dtype = dtype

    def __call__(self, x: jax.Array, out_dtype=None) -> jax.Array:
        """x [..., in] -> [..., out] in the compute dtype, or accumulated and returned in `out_dtype`."""
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype), preferred_element_type=out_dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y


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
