"""Mesh construction, logical axis rules, and the 8-device sharded forward (in its own process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from jax.sharding import PartitionSpec as P

from mr1jax.parallel import sharding as shd

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("family", ["qwen2_vl", pytest.param("qwen2_5_vl", marks=pytest.mark.slow)])
def test_sharded_forward_and_rollouts_equal_single_device(family):
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "sharded_forward_check.py"), family], env=env,
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("MAXDIFF")][0]
    print(line)
    assert float(line.split()[1]) <= 1e-5
    greedy = [ln for ln in proc.stdout.splitlines() if ln.startswith("GREEDY_SAME")][0]
    print(greedy)
    assert greedy.split()[1] == "True" and float(greedy.split()[3]) <= 1e-4


def test_make_mesh_fills_minus_one_and_checks_sizes():
    mesh = shd.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    assert mesh.axis_names == ("data", "fsdp", "tensor") and mesh.size == jax.device_count()
    with pytest.raises(ValueError, match=r"mesh \{'data': 2, 'fsdp': 2, 'tensor': 2\} needs 8 devices"):
        shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, devices=jax.devices()[:1])
    with pytest.raises(ValueError, match=r"unknown axes \['model'\]"):
        shd.make_mesh({"model": 2})
    with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
        shd.make_mesh({"data": -1, "fsdp": -1})


def test_logical_rules_skip_axes_that_do_not_divide():
    mesh = jax.make_mesh((1, 1, 1), shd.MESH_AXES)
    assert shd.logical_to_spec(("embed", "mlp"), (8, 16), mesh) == P(None, None)  # size-1 axes: replicate

    class FakeMesh:
        shape = {"data": 1, "fsdp": 2, "tensor": 4}

    assert shd.logical_to_spec(("embed", "mlp"), (8, 16), FakeMesh) == P("fsdp", "tensor")
    assert shd.logical_to_spec(("embed", "kv_heads"), (8, 6), FakeMesh) == P("fsdp", None)
    assert shd.logical_to_spec(("vocab", "embed"), (151936, 7), FakeMesh) == P("tensor", None)
    assert shd.logical_to_spec(None, (3,), FakeMesh) == P()
