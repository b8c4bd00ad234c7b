"""The process environment a plan needs before jax is imported: fake CPU devices, or CPU as the platform for
compile-only TPU / GPU targets. Imports nothing heavy (it runs first in `python -m mr1jax.plan`)."""

from __future__ import annotations

import os
import re

#: ``--topology`` names of compile-only GPU targets: h100, h100x8, h200x4, ...
GPU_TOPOLOGY = re.compile(r"^(h100|h200)(?:x(\d+))?$")


def argv_value(argv: list[str], name: str) -> str | None:
    """Value of --name=V or --name V in argv (last one wins), without absl (jax is not imported yet)."""
    value = None
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
        elif arg == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def early_environment(argv: list[str]) -> None:
    """Set the environment that must exist before jax is imported: fake CPU devices, or CPU as the default
    platform when compiling for a TPU / GPU topology (compile-only devices need no accelerator backend)."""
    devices = argv_value(argv, "devices")
    if devices and int(devices) > 1:
        flags = os.environ.get("XLA_FLAGS", "")
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags)
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={int(devices)}".strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    topology = argv_value(argv, "topology")
    if topology:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        if GPU_TOPOLOGY.match(topology.lower()):
            os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")   # compile for the description, not a device

