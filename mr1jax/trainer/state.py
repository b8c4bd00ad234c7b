"""The training state and the explicitly sharded, donating jitted steps that act on it.

Every step of the trainer (and of `python -m mr1jax.plan`, which compiles the same functions for a target
without running them) is built here:

    state = init_train_state(model, tx, mesh, ...)          # TrainState on the mesh
    update = jit_grpo_update(graphdef, mesh, state_shardings(state), batch_keys, tx=tx, cfg=gcfg)
    params, opt_state, metrics = update(state.params, state.opt_state, batch, beta)

Shardings are explicit on the way in and out: parameters and optimizer state by the parameters' logical axes
(`mr1jax.parallel.sharding`: FSDP over ``fsdp``, tensor parallel over ``tensor``), batch rows over (``data``,
``fsdp``), metrics replicated. Outputs are pinned to the input shardings so nothing drifts between steps
and each step compiles once per static configuration (prompt bucket, PTST stage). Parameters and optimizer
state are donated: the caller must not touch the old buffers after a call (an Orbax save copies arrays to
host memory before `save` returns, so saving and then donating is safe).
"""

from __future__ import annotations

import functools
from typing import Any, Iterable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mr1jax.parallel import distributed
from mr1jax.parallel import sharding as shd
from mr1jax.models.qwen2_vl.config import Qwen2VLConfig
from mr1jax.trainer.config import ConfigError, phase_steps
from mr1jax.rl.update import GRPOConfig, SFTConfig, grpo_update, sft_update, token_logprobs


@flax.struct.dataclass
class TrainState:
    """Everything a training step changes, as one pytree.

    params:     nnx.State of the policy (fp32 master weights); with LoRA only the adapters (the frozen base
                lives outside the state, `mr1jax.trainer.build.split_for_training`).
    opt_state:  optax state (moments in the parameter dtype).
    ref_params: frozen reference policy in the compute dtype, or None (beta == 0 throughout); with LoRA the
                reference adapters (zeros = adapters disabled, or the SFT phase's adapters).
    rng:        uint32[2] raw key data (`jax.random.key_data`), split once per RL step.
    step:       global step, a host int (SFT steps first, then RL steps; static, not traced).
    """

    params: Any
    opt_state: Any
    ref_params: Any
    rng: jax.Array
    step: int = flax.struct.field(pytree_node=False, default=0)


def cast_floating(tree: Any, dtype) -> Any:
    """Every floating-point leaf of `tree` cast to `dtype` (the reference copy in the compute dtype)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def opt_state_shardings(opt_state: Any, params_shardings: Any, mesh: Mesh) -> Any:
    """Shardings of an optax state: every sub-tree shaped like the parameters (Adam's mu / nu, ...) follows the
    parameter shardings; everything else (counts, scalars) is replicated."""
    params_struct = jax.tree.structure(params_shardings)

    def one(sub):
        if isinstance(sub, nnx.State) and jax.tree.structure(sub) == params_struct:
            return params_shardings
        return jax.tree.map(lambda _: replicated(mesh), sub)

    return jax.tree.map(one, opt_state, is_leaf=lambda x: isinstance(x, nnx.State))


def state_shardings(state: TrainState, mesh: Mesh) -> TrainState:
    """A TrainState of NamedShardings for `state` (arrays or ShapeDtypeStructs)."""
    params_sh = shd.param_shardings(state.params, mesh)
    ref_sh = None if state.ref_params is None else shd.param_shardings(state.ref_params, mesh)
    return TrainState(params=params_sh, opt_state=opt_state_shardings(state.opt_state, params_sh, mesh),
                      ref_params=ref_sh, rng=replicated(mesh), step=state.step)


def init_train_state(params: nnx.State, tx: optax.GradientTransformation, mesh: Mesh, *, ref_dtype=None,
                     keep_ref: bool, seed: int) -> TrainState:
    """A fresh TrainState on `mesh`: params as given (already sharded), optimizer state created directly in
    its shardings, the reference a copy of the params in `ref_dtype` (or None when `keep_ref` is False)."""
    params_sh = shd.param_shardings(params, mesh)
    opt_sh = opt_state_shardings(jax.eval_shape(tx.init, params), params_sh, mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
    return TrainState(params=params, opt_state=opt_state, ref_params=make_reference(params, mesh, ref_dtype)
                      if keep_ref else None,
                      rng=jax.device_put(jax.random.key_data(jax.random.key(seed)), replicated(mesh)), step=0)


def make_reference(params: nnx.State, mesh: Mesh, dtype=None) -> nnx.State:
    """A frozen copy of `params` (new buffers, same shardings), cast to `dtype` when given."""
    sh = shd.param_shardings(params, mesh)
    return jax.jit(lambda p: cast_floating(p, dtype) if dtype is not None else jax.tree.map(jnp.copy, p),
                   out_shardings=sh)(params)


# --------------------------------------------------------------------------------------------- batches
def batch_shardings(keys: Iterable[str], mesh: Mesh) -> dict[str, NamedSharding]:
    """Shardings of a rollout / SFT batch dict: rows over (data, fsdp); position_ids [3, R, S] on axis 1."""
    rows, pos = NamedSharding(mesh, P(shd.BATCH_AXES)), NamedSharding(mesh, P(None, shd.BATCH_AXES))
    return {k: pos if k == "position_ids" else rows for k in sorted(keys)}


def put_batch(batch: dict[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Place a host (numpy) or device batch on the mesh with `batch_shardings`. With several processes a host
    batch holds this process's rows, which become its part of the global batch (`distributed.to_global`)."""
    sh = batch_shardings(batch, mesh)
    return {k: distributed.to_global(v, sh[k], 1 if k == "position_ids" else 0) for k, v in batch.items()}


def jit_advantages(mesh: Mesh, num_samples: int, scale: str):
    """rewards [R] (rows over the batch axes) -> advantages [R], on device from the global rewards, so every
    process uses the same values (`mr1jax.rl.group_advantages`)."""
    from mr1jax.rl import group_advantages

    rows = NamedSharding(mesh, P(shd.BATCH_AXES))
    return jax.jit(lambda r: group_advantages(r, num_samples, scale=scale), in_shardings=rows, out_shardings=rows)


def _patches_per_image(config: Qwen2VLConfig, image_size: int) -> int:
    return (image_size // config.vision.patch_size) ** 2


def grpo_batch_spec(config: Qwen2VLConfig, cfg: GRPOConfig, prompts: int, image_size: int, max_new_tokens: int,
                    *, with_ref: bool = True, with_old: bool = False, with_sampler: bool = True,
                    images_per_prompt: int = 1, patches_per_prompt: int | None = None
                    ) -> dict[str, jax.ShapeDtypeStruct]:
    """Abstract rollout batch as the loop builds it: `prompts` x G rows of prompt_len + max_new_tokens tokens,
    `images_per_prompt` image_size x image_size images per prompt (native resolution: `patches_per_prompt` P
    patches per prompt, with their segment ids)."""
    rows, seq, t = prompts * cfg.num_samples, cfg.prompt_len + max_new_tokens, max_new_tokens
    n = prompts * (patches_per_prompt or images_per_prompt * _patches_per_image(config, image_size))
    s = jax.ShapeDtypeStruct
    spec = dict(input_ids=s((rows, seq), jnp.int32), attention_mask=s((rows, seq), jnp.int32),
                position_ids=s((3, rows, seq), jnp.int32), pixel_values=s((n, config.vision.patch_dim), jnp.float32),
                patch_pos=s((n, 2), jnp.int32), completion_mask=s((rows, t), jnp.int32),
                advantages=s((rows,), jnp.float32))
    for flag, key in ((with_ref, "ref_logps"), (with_old, "old_logps"), (with_sampler, "sampler_logps")):
        if flag:
            spec[key] = s((rows, t), jnp.float32)
    if patches_per_prompt:
        spec["patch_segments"] = s((n,), jnp.int32)
    return spec


def sft_batch_spec(config: Qwen2VLConfig, examples: int, seq_len: int, image_size: int, images_per_prompt: int = 1,
                   patches_per_prompt: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """Abstract SFT batch: `examples` sequences of seq_len tokens, `images_per_prompt` images each (native
    resolution: `patches_per_prompt` patches each, with their segment ids)."""
    n = examples * (patches_per_prompt or images_per_prompt * _patches_per_image(config, image_size))
    s = jax.ShapeDtypeStruct
    spec = dict(input_ids=s((examples, seq_len), jnp.int32), attention_mask=s((examples, seq_len), jnp.int32),
                loss_mask=s((examples, seq_len), jnp.int32), position_ids=s((3, examples, seq_len), jnp.int32),
                pixel_values=s((n, config.vision.patch_dim), jnp.float32), patch_pos=s((n, 2), jnp.int32))
    if patches_per_prompt:
        spec["patch_segments"] = s((n,), jnp.int32)
    return spec


# --------------------------------------------------------------------------------------------- jitted steps
def _frozen(frozen_shardings: Any) -> tuple:
    return () if frozen_shardings is None else (frozen_shardings,)


def jit_grpo_update(graphdef: nnx.GraphDef, mesh: Mesh, shardings: TrainState, batch_keys: Iterable[str], *,
                    tx: optax.GradientTransformation, cfg: GRPOConfig, frozen_shardings: Any = None):
    """`update(params, opt_state, batch, beta) -> (params, opt_state, metrics)`, params / opt_state donated.

    frozen_shardings: with LoRA, the shardings of the frozen base; the function then takes it as a last,
    non-donated argument: `update(adapters, opt_state, batch, beta, base)`."""
    fn = functools.partial(grpo_update, graphdef, tx=tx, cfg=cfg, grad_shardings=shardings.params)
    return jax.jit(fn, in_shardings=(shardings.params, shardings.opt_state, batch_shardings(batch_keys, mesh),
                                     replicated(mesh), *_frozen(frozen_shardings)),
                   out_shardings=(shardings.params, shardings.opt_state, replicated(mesh)), donate_argnums=(0, 1))


def jit_sft_update(graphdef: nnx.GraphDef, mesh: Mesh, shardings: TrainState, batch_keys: Iterable[str], *,
                   tx: optax.GradientTransformation, cfg: SFTConfig, frozen_shardings: Any = None):
    """`update(params, opt_state, batch[, base]) -> (params, opt_state, metrics)`, params / opt_state donated
    (the frozen LoRA base, when `frozen_shardings` is given, is not)."""
    fn = functools.partial(sft_update, graphdef, tx=tx, cfg=cfg, grad_shardings=shardings.params)
    return jax.jit(fn, in_shardings=(shardings.params, shardings.opt_state, batch_shardings(batch_keys, mesh),
                                     *_frozen(frozen_shardings)),
                   out_shardings=(shardings.params, shardings.opt_state, replicated(mesh)), donate_argnums=(0, 1))


def jit_token_logprobs(graphdef: nnx.GraphDef, mesh: Mesh, params_shardings: Any, batch_keys: Iterable[str], *,
                       cfg: GRPOConfig, frozen_shardings: Any = None):
    """`logps(params, batch[, base]) -> [R, T]` fp32, rows sharded like the batch (reference or pi_old pass)."""
    fn = functools.partial(token_logprobs, graphdef, cfg=cfg)
    return jax.jit(fn, in_shardings=(params_shardings, batch_shardings(batch_keys, mesh), *_frozen(frozen_shardings)),
                   out_shardings=NamedSharding(mesh, P(shd.BATCH_AXES)))


def compile_counts(*jitted) -> list[int]:
    """How many executables each jitted function holds (1 = compiled once)."""
    return [f._cache_size() for f in jitted]


def batch_split_problems(mesh: Mesh, prompts: int, micro_batches: int, what: str) -> tuple[str | None, str | None]:
    """(error, warning) for splitting `prompts` prompts in `micro_batches` micro-batches over the (data, fsdp)
    devices: the batch must divide over them (error); each micro-batch should too (warning: otherwise rows
    move between devices inside the step)."""
    n = int(np.prod([mesh.shape[a] for a in shd.BATCH_AXES]))
    if prompts % n:
        return (f"{what}: {prompts} prompts do not split over the data x fsdp = {n} devices of the mesh "
                f"{dict(mesh.shape)}", None)
    if (prompts // micro_batches) % n:
        return None, (f"{what}: micro-batches of {prompts // micro_batches} prompts do not split evenly over "
                      f"the {n} data x fsdp devices; rows will be moved between devices in each step")
    return None, None


def check_mesh_fits(c: ml_collections.ConfigDict, mesh) -> list[str]:
    """ConfigError unless every batch splits over the mesh's (data, fsdp) devices; returns warnings for
    micro-batches that do not split evenly. With several processes, the prompts of a step and the batch devices
    must split evenly over the processes (each owns whole prompt groups on its own devices)."""
    n, batch_devices = jax.process_count(), mesh.shape["data"] * mesh.shape["fsdp"]
    if n > 1 and (c.data.batch_size % n or batch_devices % n):
        raise ConfigError(f"config.data.batch_size = {c.data.batch_size} and the mesh's data x fsdp = {batch_devices} "
                          f"devices must both divide by the {n} processes")
    checks = [(c.data.batch_size // c.rl.minibatches, c.rl.micro_batches,
               "config.data.batch_size / rl.minibatches / rl.micro_batches")]
    if phase_steps(c)[0]:
        checks.append((c.data.batch_size, c.sft.micro_batches, "config.data.batch_size / sft.micro_batches"))
    warnings = []
    for prompts, micro, what in checks:
        error, warning = batch_split_problems(mesh, prompts, micro, what)
        if error:
            raise ConfigError(error)
        warnings += [warning] if warning else []
    return warnings
