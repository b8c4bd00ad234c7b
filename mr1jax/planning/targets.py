"""The devices a plan compiles for (the default backend's, or compile-only TPU / GPU topologies) and the
mesh over them."""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh

from mr1jax.parallel import sharding
from mr1jax.parallel.accelerators import gpu_target_config
from mr1jax.planning.environment import GPU_TOPOLOGY
from mr1jax.planning.programs import PlanError


def target_devices(topology: str | None) -> tuple[list, str]:
    """(devices to compile for, description)."""
    if not topology:
        devs = jax.devices()
        return devs, f"{len(devs)} x {devs[0].platform.upper()} ({devs[0].device_kind})"
    from jax.experimental.topologies import get_topology_desc

    name = topology.lower()
    gpu = GPU_TOPOLOGY.match(name)
    if gpu:
        count = int(gpu.group(2) or 1)
        try:
            topo = get_topology_desc(platform="cuda", topology=f"1x1x{count}",
                                     target_config=gpu_target_config(gpu.group(1).upper()))
        except Exception as e:  # noqa: BLE001
            raise PlanError(f"--topology={topology}: cannot build the GPU topology ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:300] if str(e) else ''}). It needs the CUDA PJRT plugin: "
                            "pip install --no-deps jax-cuda12-plugin==<jax version> jax-cuda12-pjrt==<jax "
                            "version> (no CUDA libraries or GPU needed)") from None
        devs = list(topo.devices)
        return devs, f"{len(devs)} x {devs[0].device_kind} (compile-only, topology {topology})"

    kwargs = {"chip_config_name": "megacore"} if name.split(":")[0] in ("v4", "v5") else {}
    try:
        topo = get_topology_desc(topology_name=topology, platform="tpu", **kwargs)
    except Exception as e:  # noqa: BLE001
        raise PlanError(f"--topology={topology}: cannot build the TPU topology ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:300] if str(e) else ''}). It needs libtpu "
                        "(pip install 'jax[tpu]') and a name such as v5e:2x4, v5p:2x2x2, v6e:2x2") from None
    devs = list(topo.devices)
    return devs, f"{len(devs)} x {devs[0].device_kind} (compile-only, topology {topology})"


def make_plan_mesh(mesh_cfg: dict, devices: list) -> Mesh:
    try:
        return sharding.make_mesh(mesh_cfg, devices)
    except ValueError:
        raise
    except Exception:  # noqa: BLE001 - device-layout helpers may not know compile-only devices
        sizes = dict(mesh_cfg)
        known = math.prod(v for v in sizes.values() if v != -1)
        sizes = {k: (len(devices) // known if v == -1 else v) for k, v in sizes.items()}
        shape = tuple(sizes.get(a, 1) for a in sharding.MESH_AXES)
        return Mesh(np.asarray(devices).reshape(shape), sharding.MESH_AXES)
