"""Reading a prepared TFDS dataset (array_record) as the same row dicts :class:`mr1jax.data.rows.RowSource` gives.

``open_tfds(spec, split)`` takes

* a directory: a prepared dataset version (``.../name/1.0.0``, the folder holding ``dataset_info.json``),
  or a folder above exactly one (``--out`` of ``python -m mr1jax.data.prepare``, or ``--out/name``);
* a name: ``mr1jax_counting`` / ``mr1jax_geometry`` (generated on first use, offline) or any dataset
  prepared under ``data_dir`` (default: TFDS's, ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``);
  ``name/config`` and ``name:version`` as in ``tfds.builder``.

and returns a :class:`TfdsSource`: random access through ``tfds`` data sources (array_record, no tensorflow),
``source[i]`` = ``{"image": bytes, "question", "answer", "id", "file", "row"}`` with ``file`` / ``row`` the
*original* source file and line stored at prepare time, so the pipeline's errors name them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

from mr1jax.data.tfds_builders import FILE_FORMAT, TASK_BUILDERS

__all__ = ["TfdsError", "TfdsSource", "eval_split", "open_builder", "open_tfds"]

logger = logging.getLogger(__name__)

#: Split names tried, in order, for held-out rows.
EVAL_SPLITS = ("test", "validation")


class TfdsError(ValueError):
    """A TFDS dataset that cannot be used: not found, not prepared, no such split, not array_record."""


def _find_version_dirs(path: Path) -> list[Path]:
    return sorted(p.parent for p in path.rglob("dataset_info.json") if "incomplete" not in str(p.parent.name))


def open_builder(spec: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """The prepared builder ``spec`` names (a directory or a dataset name, see the module docstring); mr1jax's
    synthetic-task builders are generated here when not yet prepared. Raises :class:`TfdsError`."""
    spec = str(spec).strip()
    if not spec:
        raise TfdsError("empty TFDS dataset name / directory")
    path = Path(spec).expanduser()
    if path.is_dir():
        found = _find_version_dirs(path)
        if not found:
            raise TfdsError(f"{path}: no prepared TFDS dataset here (no dataset_info.json below it)")
        datasets = {p.parent for p in found}
        if len(datasets) > 1:
            raise TfdsError(f"{path}: holds {len(found)} prepared datasets ({', '.join(str(p) for p in found[:4])}"
                            f"{', ...' if len(found) > 4 else ''}); name one of their directories")
        version_dir = max(found, key=lambda p: tfds.core.Version(p.name) if _is_version(p.name) else p.name)
        try:
            builder = tfds.builder_from_directory(version_dir)
        except Exception as e:  # noqa: BLE001  (tfds raises many kinds)
            raise TfdsError(f"{version_dir}: cannot read the TFDS dataset: {type(e).__name__}: {e}") from e
    elif spec.startswith(("/", ".", "~")) or spec.count("/") > 1:
        raise TfdsError(f"{spec}: no such directory")
    else:
        builder = _builder_by_name(spec, data_dir)
    fmt = builder.info.file_format
    if fmt is not None and str(getattr(fmt, "value", fmt)) != FILE_FORMAT:
        raise TfdsError(f"{spec}: stored as {getattr(fmt, 'value', fmt)}; mr1jax reads {FILE_FORMAT} (random access "
                        "over many hosts): re-prepare it with file_format='array_record'")
    return builder


def _is_version(name: str) -> bool:
    try:
        tfds.core.Version(name)
        return True
    except ValueError:
        return False


def _builder_by_name(spec: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    name = spec.split("/")[0].split(":")[0]
    ours = name in {b.name for b in TASK_BUILDERS.values()}
    try:
        builder = tfds.builder(spec, data_dir=data_dir or None, file_format=FILE_FORMAT) if ours else \
            tfds.builder(spec, data_dir=data_dir or None)
    except Exception as e:  # noqa: BLE001  (DatasetNotFoundError, config / version errors, ...)
        where = f" under {data_dir}" if data_dir else " in TFDS's data dir"
        raise TfdsError(f"{spec}: no such TFDS dataset{where} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                        "pass a directory, or prepare it with `python -m mr1jax.data.prepare`") from e
    if not builder.is_prepared():
        if not ours:
            raise TfdsError(f"{spec}: not prepared in {builder.data_dir}; prepare it first "
                            "(`python -m mr1jax.data.prepare`)")
        logger.info("generating %s in %s (first use)", spec, builder.data_dir)
        builder.download_and_prepare(file_format=FILE_FORMAT)
    return builder


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class TfdsSource(Sequence):
    """One split of a prepared dataset as RowSource-like dicts (a grain ``RandomAccessDataSource``).

    ``source[i]`` = ``{"image": encoded bytes, "question", "answer", "id", "file", "row"}``; images are decoded
    by the pipeline, which names ``file`` and ``row`` when one does not decode. Attributes ``skip_bad_rows`` (as
    given; the pipeline's default), ``skipped`` (0: bad rows were dropped, and counted, at prepare time),
    ``spec``, ``split``, ``builder_dir``.
    """

    def __init__(self, spec: str, split: str = "train", *, data_dir: str | None = None, skip_bad_rows: bool = False):
        builder = open_builder(spec, data_dir)
        if split not in builder.info.splits:
            raise TfdsError(f"{spec}: no split {split!r}; it has {', '.join(sorted(builder.info.splits))}")
        self.spec, self.split = str(spec), split
        self.builder_dir = str(builder.data_dir)
        self.skip_bad_rows = bool(skip_bad_rows)
        self.skipped = 0
        self._source = builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})

    def __len__(self) -> int:
        return len(self._source)

    @staticmethod
    def _row(record: dict[str, Any], with_image: bool = True) -> dict[str, Any]:
        out = {"question": _text(record["question"]), "answer": _text(record["answer"]), "id": _text(record["id"]),
               "file": _text(record["file"]), "row": int(record["row"])}
        if with_image:
            out["image"] = bytes(record["image"])
        return out

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"row {index} out of range for {len(self)} rows")
        return self._row(self._source[index % len(self)])

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        return [self._row(r) for r in self._source.__getitems__([int(i) for i in indices])]

    def text_fields(self, index: int) -> dict[str, Any]:
        """``source[index]`` without the image (the record is still read whole: array_record has no columns)."""
        return self._row(self._source[int(index)], with_image=False)

    def __repr__(self) -> str:
        return f"TfdsSource({self.spec!r}, split={self.split!r}, rows={len(self)})"


def open_tfds(spec: str, split: str = "train", *, data_dir: str | None = None,
              skip_bad_rows: bool = False) -> TfdsSource:
    """``TfdsSource(spec, split, ...)``."""
    return TfdsSource(spec, split, data_dir=data_dir, skip_bad_rows=skip_bad_rows)


def eval_split(spec: str, data_dir: str | None = None) -> str | None:
    """The held-out split of a prepared dataset (the first of ``EVAL_SPLITS`` it has), or None."""
    splits = open_builder(spec, data_dir).info.splits
    return next((s for s in EVAL_SPLITS if s in splits), None)
