"""One process of a 2-process load / export check (tests/test_multiprocess.py): `load_pretrained` onto a mesh that
spans both processes (each reads only its devices' slices), then `save_pretrained` (every process gathers, process
0 writes); and the row helpers across the processes (`to_global` / `local_rows` / `fetch` / `gather` /
`any_process`) on rows that differ per process. Prints `RESULT <json>`.

    python tests/multiprocess_load.py SRC_HF_DIR OUT_DIR PROCESS_ID PORT
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from mr1jax.parallel import distributed, sharding  # noqa: E402
from mr1jax.models.qwen2_vl.hf import load_pretrained, save_pretrained  # noqa: E402

src, out, pid, port = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
distributed.initialize(dict(coordinator=f"localhost:{port}", num_processes=2, process_id=pid))
mesh = sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
model = load_pretrained(src, dtype=jnp.float32, mesh=mesh)
params = nnx.state(model, nnx.Param)
leaves = jax.tree.leaves(params)
spanning = sum(not x.is_fully_addressable for x in leaves)
local_bytes = sum(s.data.nbytes for x in leaves for s in x.addressable_shards)
total_bytes = sum(x.nbytes for x in leaves)
sums = [float(np.asarray(distributed.fetch(x), np.float64).sum()) for x in leaves]
save_pretrained(model, out)
mine = np.arange(8, dtype=np.float32).reshape(4, 2) + 100 * pid          # this process's 4 rows
rows = distributed.to_global(mine, NamedSharding(mesh, P(sharding.BATCH_AXES)))
rows_info = dict(shape=list(rows.shape), spans=not rows.is_fully_addressable,
                 back=distributed.local_rows(rows).tolist(), whole=distributed.fetch(rows).tolist(),
                 gathered=distributed.gather(mine).tolist(), any_p1=distributed.any_process(pid == 1),
                 any_none=distributed.any_process(False))
print("RESULT " + json.dumps(dict(process=jax.process_index(), spanning=spanning, local_bytes=local_bytes,
                                  total_bytes=total_bytes, sums=sums, rows=rows_info)), flush=True)
