"""The training command: `python -m mr1jax.train --config=configs/grpo.py --workdir=DIR`.

Parses the flags and runs `mr1jax.trainer.loop.train_and_evaluate`; maps its errors to the exit statuses the
README documents. `train_and_evaluate` stays importable from here.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # "PyTorch was not found": torch is not used

from mr1jax.trainer.config import ConfigError, unknown_override
from mr1jax.parallel.distributed import PeerError
from mr1jax.trainer.loop import (EXIT_CONFIG, EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_PEER, EXIT_PREEMPTED,
                                train_and_evaluate)
from mr1jax.trainer.watch import TrainingDivergedError

__all__ = ["main", "train_and_evaluate"]


def main(argv: list[str]) -> None:
    del argv
    from absl import flags, logging

    from mr1jax.trainer.checkpoint import CheckpointCorruptError, NonFiniteStateError, WorkdirLockedError

    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    try:
        out = train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
    except (ConfigError, WorkdirLockedError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_CONFIG)
    except (TrainingDivergedError, NonFiniteStateError, CheckpointCorruptError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1 if isinstance(e, CheckpointCorruptError) else EXIT_DIVERGED)
    except PeerError as e:                     # one line, and out now: JAX's shutdown would wait for the lost peer
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(EXIT_PEER)
    except KeyboardInterrupt:
        print(f"interrupted: stopped at once (before the first step, or a second Ctrl-C); nothing was saved since "
              f"the last checkpoint; exit status {EXIT_INTERRUPTED}", file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)
    if out.get("preempted"):
        sys.exit(out.get("exit_status", EXIT_PREEMPTED))


def check_overrides(argv: list[str]) -> str | None:
    """An error line for the first `--config.<field>=...` the config file lacks (with the closest valid name),
    before absl parses the flags (where ml_collections would stop with a traceback); None when all exist or the
    config file cannot be loaded here (config_flags then reports it)."""
    import importlib.util

    keys = [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "configs/grpo.py").split(":")[0]
    if not keys:
        return None
    try:
        spec = importlib.util.spec_from_file_location("_mr1jax_config", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        c = module.get_config()
    except Exception:  # noqa: BLE001
        return None
    return next((e for e in (unknown_override(c, k) for k in keys) if e), None)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    if (problem := check_overrides(sys.argv[1:])) is not None:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)

    config_flags.DEFINE_config_file("config", "configs/grpo.py", "training config file", lock_config=True)
    flags.DEFINE_string("workdir", None, "where checkpoints, metrics and exports go (one run per dir; required)")
    flags.mark_flag_as_required("workdir")
    app.run(main)
