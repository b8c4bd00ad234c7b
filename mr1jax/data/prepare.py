"""`python -m mr1jax.data.prepare`: user rows or a synthetic task -> a TFDS dataset in array_record format.

    python -m mr1jax.data.prepare --files=train.jsonl,more.parquet --fields=geometry3k --out=/data/tfds \\
        [--name=geo3k] [--split=train] [--eval_files=test.jsonl] [--skip_bad_rows]
    python -m mr1jax.data.prepare --task=counting --num=4096 --seed=0 --image_size=56 --out=/data/tfds

writes ``OUT/NAME/1.0.0/`` (synthetic tasks: ``OUT/mr1jax_<task>/<config>/1.0.0/``): array_record shards and
``dataset_info.json``, each record the row's encoded image, question, answer, id and its source file and line
(`mr1jax.data.tfds_builders`). Train on it with ``--config.data.tfds=OUT/NAME`` (every host reads its own
share by random access; no tensorflow needed anywhere).

Every row is checked as the trainer would (question, answer, image present; every image decoded once): a bad
row stops the prepare with its file and line, or with ``--skip_bad_rows`` is dropped and counted. A progress
line (rows, rows/s) is printed every ``--progress_every`` rows. Prints a JSON summary on stdout; exit status 2
on a bad row or bad arguments.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mr1jax.data.rows import PRESETS, DataError
from mr1jax.data.tfds_builders import TASK_BUILDERS, RowsBuilder, load_rows_for_prepare, task_config

__all__ = ["PrepareError", "dataset_name", "main", "prepare_files", "prepare_task"]


class PrepareError(ValueError):
    """Bad arguments, or a dataset that is already there."""


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def dataset_name(path: str) -> str:
    """A TFDS dataset name from a file name: lower case, ``[a-z0-9_]``, starting with a letter."""
    name = re.sub(r"[^a-z0-9_]+", "_", Path(path).stem.lower()).strip("_")
    return name if name[:1].isalpha() else f"rows_{name}"


def _quiet_tfds() -> None:
    import tensorflow_datasets as tfds
    from absl import logging as absl_logging

    tfds.disable_progress_bar()  # tqdm bars per split; this module prints its own progress lines
    absl_logging.set_verbosity(absl_logging.WARNING)


def _clear(version_dir: Path, overwrite: bool) -> None:
    if (version_dir / "dataset_info.json").exists():
        if not overwrite:
            raise PrepareError(f"{version_dir} is already prepared: remove it, pass --overwrite, or choose another "
                               "--name / --out")
        shutil.rmtree(version_dir)


def _summary(builder, skipped: int, seconds: float, rows_read: int) -> dict[str, Any]:
    splits = {name: int(info.num_examples) for name, info in builder.info.splits.items()}
    written = sum(splits.values())
    return {"dir": str(builder.data_dir), "name": builder.name, "splits": splits, "rows_read": rows_read,
            "skipped": skipped, "seconds": round(seconds, 2), "rows_per_s": round(written / max(seconds, 1e-9), 1),
            "bytes": int(sum(f.stat().st_size for f in Path(builder.data_dir).iterdir() if f.is_file()))}


def prepare_files(files: Sequence[str], *, out: str, fields: str = "generic", name: str | None = None,
                  split: str = "train", eval_files: Sequence[str] = (), skip_bad_rows: bool = False,
                  validate_images: bool = True, overwrite: bool = False, progress_every: int = 10_000,
                  log: Callable[[str], None] = _say) -> dict[str, Any]:
    """Write the rows of ``files`` (split ``split``) and ``eval_files`` (split ``test``) as the TFDS dataset
    ``out/name/1.0.0``; returns the summary (dir, rows per split, skipped, seconds, rows/s, bytes).

    Raises DataError naming file and line for a bad row (unless ``skip_bad_rows``), PrepareError for bad
    arguments or an existing dataset (unless ``overwrite``)."""
    files = [f for f in files if f]
    if not files:
        raise PrepareError("--files is empty")
    if split == "test" and eval_files:
        raise PrepareError("--split=test and --eval_files both name the test split")
    name = name or dataset_name(files[0])
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise PrepareError(f"--name={name!r}: use lower-case letters, digits and '_', starting with a letter")
    _quiet_tfds()
    t0 = time.perf_counter()
    sources = {split: files, **({"test": list(eval_files)} if eval_files else {})}
    rows, skipped, read = {}, 0, 0
    for s, paths in sources.items():
        src = load_rows_for_prepare(paths, fields, skip_bad_rows=skip_bad_rows, validate_images=validate_images)
        log(f"{s}: read {src.total_rows} rows from {len(paths)} file(s), kept {len(src)}, skipped {src.skipped} "
            f"({time.perf_counter() - t0:.1f} s)")
        if src.skipped:
            log(src.summary_text())
        rows[s], skipped, read = src, skipped + src.skipped, read + src.total_rows
    builder = RowsBuilder(name=name, splits=rows, data_dir=out, progress_every=progress_every, log=log,
                          description=f"mr1jax rows from {', '.join(files)} (fields {fields!r})")
    _clear(Path(builder.data_dir), overwrite)
    builder.download_and_prepare()
    summary = _summary(builder, skipped, time.perf_counter() - t0, read)
    log(f"wrote {summary['dir']}: {summary['splits']} in {summary['seconds']} s ({summary['rows_per_s']} rows/s); "
        f"train on it with --config.data.tfds={summary['dir']}")
    return summary


def prepare_task(task: str, *, out: str, num: int = 4096, num_test: int = 256, seed: int = 0, image_size: int = 56,
                 overwrite: bool = False, progress_every: int = 10_000,
                 log: Callable[[str], None] = _say) -> dict[str, Any]:
    """Generate synthetic task ``task`` (``num`` train, ``num_test`` test rows) as the registered TFDS dataset
    ``mr1jax_<task>`` under ``out``; returns the summary."""
    if task not in TASK_BUILDERS:
        raise PrepareError(f"--task={task!r}; known: {', '.join(TASK_BUILDERS)}")
    if image_size % 28 or image_size <= 0 or num <= 0 or num_test < 0:
        raise PrepareError(f"need --num > 0, --num_test >= 0 and --image_size a positive multiple of 28, got "
                           f"{num}, {num_test}, {image_size}")
    _quiet_tfds()
    t0 = time.perf_counter()
    builder = TASK_BUILDERS[task](config=task_config(num, num_test, seed, image_size), data_dir=out,
                                  progress_every=progress_every, log=log)
    _clear(Path(builder.data_dir), overwrite)
    builder.download_and_prepare()
    summary = _summary(builder, 0, time.perf_counter() - t0, num + num_test)
    log(f"wrote {summary['dir']}: {summary['splits']} in {summary['seconds']} s ({summary['rows_per_s']} rows/s); "
        f"train on it with --config.data.tfds={summary['dir']}")
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mr1jax.data.prepare", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="TFDS data dir to write into")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--files", help="comma-separated JSONL / JSON / Parquet files")
    src.add_argument("--task", help=f"a synthetic task: {', '.join(TASK_BUILDERS)}")
    p.add_argument("--fields", default="generic", help=f"field preset: {', '.join(PRESETS)}")
    p.add_argument("--name", default=None, help="dataset name (default: from the first file's name)")
    p.add_argument("--split", default="train", help="split the --files rows go to")
    p.add_argument("--eval_files", default="", help="comma-separated files for the 'test' split")
    p.add_argument("--skip_bad_rows", action="store_true", help="drop and count bad rows instead of stopping")
    p.add_argument("--no_validate_images", action="store_true", help="do not decode every image now")
    p.add_argument("--num", type=int, default=4096, help="--task: train rows")
    p.add_argument("--num_test", type=int, default=256, help="--task: test rows")
    p.add_argument("--seed", type=int, default=0, help="--task: seed")
    p.add_argument("--image_size", type=int, default=56, help="--task: image side in pixels (multiple of 28)")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already prepared there")
    p.add_argument("--progress_every", type=int, default=10_000, help="a progress line every N rows")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    split_list = lambda s: [f.strip() for f in (s or "").split(",") if f.strip()]  # noqa: E731
    try:
        if args.task:
            summary = prepare_task(args.task, out=args.out, num=args.num, num_test=args.num_test, seed=args.seed,
                                   image_size=args.image_size, overwrite=args.overwrite,
                                   progress_every=args.progress_every)
        else:
            summary = prepare_files(split_list(args.files), out=args.out, fields=args.fields, name=args.name,
                                    split=args.split, eval_files=split_list(args.eval_files),
                                    skip_bad_rows=args.skip_bad_rows, validate_images=not args.no_validate_images,
                                    overwrite=args.overwrite, progress_every=args.progress_every)
    except (DataError, PrepareError, FileNotFoundError, ValueError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    print(json.dumps(summary, indent=2), flush=True)
    return summary


if __name__ == "__main__":
    main()
