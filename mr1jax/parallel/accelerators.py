"""Accelerators a run may be planned for: memory per device and peak rates (vendor figures, dense bf16).

`hbm_bytes` is the memory one program can address on one device: for TPUs, what the XLA:TPU compiler
reports as the limit in its out-of-memory message (15.75 GiB on v5e, 95.74 GiB on v5p, 31.25 GiB on v6e);
for GPUs, the device's whole memory as the driver reports it (note that JAX itself takes 75 % of it by
default: set XLA_PYTHON_CLIENT_MEM_FRACTION=.95 or XLA_PYTHON_CLIENT_PREALLOCATE=false for a big run).
"""

from __future__ import annotations

import dataclasses

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Accelerator:
    name: str
    hbm_bytes: int            # addressable memory per device (see module docstring)
    bf16_flops: float         # peak dense bf16 FLOP/s per device
    hbm_bandwidth: float      # bytes/s per device
    nominal: str              # the marketing memory size, for display

    @property
    def hbm_gib(self) -> float:
        return self.hbm_bytes / GiB

    def fits(self, per_device_bytes: int | float) -> bool:
        return per_device_bytes <= self.hbm_bytes


ACCELERATORS: dict[str, Accelerator] = {a.name: a for a in (
    Accelerator("H100", 81559 * (1 << 20), 989e12, 3.35e12, "80 GB"),     # nvidia-smi: 81559 MiB
    Accelerator("H200", 143771 * (1 << 20), 989e12, 4.8e12, "141 GB"),    # nvidia-smi: 143771 MiB
    Accelerator("v5e", int(15.75 * GiB), 197e12, 819e9, "16 GB"),
    Accelerator("v5p", int(95.74 * GiB), 459e12, 2765e9, "95 GB"),
    Accelerator("v6e", int(31.25 * GiB), 918e12, 1638e9, "32 GB"),
)}


# XLA GpuTargetConfigProto (text) for compiling without a GPU (`get_topology_desc(platform="cuda", ...,
# target_config=...)`): SXM parts, 132 SMs of compute capability 9.0, 228 KiB shared memory per SM, 50 MiB L2.
_HOPPER = """gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth}
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: {memory}
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 minor: 0 }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 patch: 0 }}
device_description_str: "{description}"
"""


def gpu_target_config(name: str) -> str:
    """The XLA GPU target description of accelerator `name` (H100 / H200 SXM)."""
    acc = ACCELERATORS[name]
    description = {"H100": "NVIDIA H100 80GB HBM3", "H200": "NVIDIA H200"}[name]
    return _HOPPER.format(bandwidth=int(acc.hbm_bandwidth), memory=acc.hbm_bytes, description=description)


def for_topology(topology: str | None) -> Accelerator | None:
    """The accelerator a `--topology` name compiles for ('v5e:2x4' -> v5e, 'h100x8' -> H100), else None."""
    if not topology:
        return None
    head = topology.split(":")[0].split("x")[0].lower()
    head = {"v5": "v5p", "v5litepod": "v5e", "v6": "v6e"}.get(head, head)   # v5:... = v5p megacore
    for name, acc in ACCELERATORS.items():
        if head == name.lower():
            return acc
    return None
