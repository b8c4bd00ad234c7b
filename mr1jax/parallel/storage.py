"""Directories on local disk or on an object store (``gs://...``, any `etils.epath` file system).

Libraries that write or memory-map plain files (safetensors, transformers' tokenizer, PEFT's layout) get a local
directory: `local_output_dir` stages what they write and copies it up file by file, `local_input_dir` copies the
named files down first. Local paths pass straight through, with nothing copied.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence

from etils import epath


def is_url(path: str | os.PathLike) -> bool:
    """A path on an object store or other `etils.epath` file system (``gs://...``), not a local path."""
    return "://" in os.fspath(path)


@contextlib.contextmanager
def local_output_dir(path: str | os.PathLike, *, upload: bool = True) -> Iterator[str]:
    """A local directory to write `path`'s files into: `path` itself when local (created), else a temporary
    directory whose files are copied to `path` when the block ends without an error (only when `upload`: with
    several processes, the writer's)."""
    path = os.fspath(path)
    if not is_url(path):
        os.makedirs(path, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="mr1jax_stage_") as local:
        yield local
        if upload:
            dest = epath.Path(path)
            dest.mkdir(parents=True, exist_ok=True)
            for name in sorted(os.listdir(local)):
                epath.Path(local, name).copy(dest / name, overwrite=True)


@contextlib.contextmanager
def local_input_dir(path: str | os.PathLike, names: Sequence[str]) -> Iterator[str]:
    """A local directory holding the files `names` of directory `path`: `path` itself when local, else a
    temporary copy (FileNotFoundError naming the missing file)."""
    path = os.fspath(path)
    if not is_url(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="mr1jax_stage_") as local:
        for name in names:
            src = epath.Path(path) / name
            if not src.exists():
                raise FileNotFoundError(f"{src} does not exist")
            src.copy(epath.Path(local, name))
        yield local
