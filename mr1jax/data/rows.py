"""Reading user datasets (JSONL / JSON / Parquet) into a random-access source of RL examples.

Every example is a plain dict::

    {"image": bytes | str (absolute file path),   # encoded image, decoded later (the first one)
     "images": [bytes | str, ...],                # every image the row uses, in order (FieldMap.image_index)
     "question": str, "answer": str, "id": str,
     "file": str, "row": int}                     # provenance, for error messages

``file``/``row`` say where the example came from (``row`` is the 1-based line number in a
JSONL file, the 1-based element number in a JSON array, the 1-based row number in a Parquet
file); :func:`describe_row` turns them into ``"data.jsonl line 7"``-style text.

Over 500 lines: three file formats, their field mapping and per-row error reporting are one reader; most of the
length is the documented decoding rules of image fields.

Field mapping (:class:`FieldMap`) and presets (:data:`PRESETS`):

==============  =========================  =======================  =====================================
preset          image                      question                 answer
==============  =========================  =======================  =====================================
``generic``     ``image``                  ``question``             ``answer``
``geometry3k``  ``images`` (list: first)   ``problem``              ``answer``
``easyr1``      ``images`` (list: all)     ``problem``              ``answer``
``r1v``         ``image``                  ``problem``/``question``  ``solution``; ``<answer>X</answer>``
(``superclevr``)                                                    -> ``X`` (R1-V's rule)
==============  =========================  =======================  =====================================

Image field values that are understood:

* ``bytes`` -- an encoded image (PNG, JPEG, ...);
* ``{"bytes": ..., "path": ...}`` -- Hugging Face ``datasets`` Image feature as stored in
  Parquet: ``bytes`` wins when present, else ``path``;
* ``str`` -- a file path, relative paths resolved against ``image_root`` (default: the data
  file's directory); a ``data:image/...;base64,...`` URI is decoded to bytes; with
  ``FieldMap(image_base64=True)`` every string is taken as base64;
* a list/tuple of any of these -- element ``FieldMap.image_index`` (default the first) is used, or, with
  ``image_index=None``, every element in order (several images per prompt: the chat template gets one
  placeholder per image, in the order given).

Validation. What is cheap is checked when the file is loaded: a missing/empty question or
answer, a missing/empty/unsupported image value, a non-existent image file, bad base64. Image
*decoding* is lazy by default (``validate_images=False``): the pipeline decodes when it reads
the row and turns a decode failure into a :class:`DataError` naming file and row (see
``mr1jax.data.pipeline``). Pass ``validate_images=True`` to decode every image at load time
(exact skip counts up front, at the cost of one full decode pass).

By default a bad row raises :class:`DataError` (message names file, row and field). With
``skip_bad_rows=True`` it is dropped instead, counted in ``source.skipped`` and its error kept
in ``source.skip_reasons``; ``source.summary()`` gives counts by field.
"""

from __future__ import annotations

import base64
import binascii
import collections
import dataclasses
import io
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import PIL.Image

__all__ = [
    "DataError",
    "FieldMap",
    "PRESETS",
    "RowSource",
    "check_image_decodes",
    "describe_row",
    "extract_answer_tag",
    "get_field_map",
    "load_rows",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_JSON_SUFFIXES = (".json",)
_PARQUET_SUFFIXES = (".parquet", ".pq")


class DataError(ValueError):
    """A bad dataset row. ``file``, ``row`` (1-based), ``field`` and ``reason`` are attributes."""

    def __init__(self, file: str, row: int | None, field: str | None, reason: str):
        self.file = str(file)
        self.row = row
        self.field = field
        self.reason = reason
        where = describe_row(self.file, row)
        what = f": field {field!r}" if field else ""
        super().__init__(f"{where}{what}: {reason}")

    def __reduce__(self):  # keep attributes through pickling (grain worker processes)
        return (DataError, (self.file, self.row, self.field, self.reason))


def describe_row(file: str, row: int | None) -> str:
    """``"path/data.jsonl line 7"`` (JSONL), ``"path/x.parquet row 7"`` (others), ``"path"`` if no row."""
    if row is None:
        return str(file)
    unit = "line" if str(file).lower().endswith(_JSONL_SUFFIXES) else "row"
    return f"{file} {unit} {row}"


_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_answer_tag(text: str) -> str:
    """R1-V's ground-truth rule: the stripped content of the first ``<answer>...</answer>``,
    or the whole stripped text when there is no such tag."""
    match = _ANSWER_TAG.search(text)
    return (match.group(1) if match else text).strip()


FieldNames = Union[str, tuple[str, ...]]


@dataclasses.dataclass(frozen=True)
class FieldMap:
    """Which columns/keys hold what. A tuple of names means "the first one present (non-null)".

    Attributes:
      image: image field name(s).
      question: question field name(s).
      answer: answer field name(s).
      id: id field name(s); rows without one get ``"<file name>:<row>"``.
      extract_answer: apply :func:`extract_answer_tag` to the answer (R1-V ``solution``).
      image_index: which element to use when the image field holds a list; None = all of them, in order.
      image_base64: treat every string image value as base64 (not a path).
    """

    image: FieldNames = "image"
    question: FieldNames = "problem"
    answer: FieldNames = "answer"
    id: FieldNames = "id"
    extract_answer: bool = False
    image_index: int | None = 0
    image_base64: bool = False

    def columns(self) -> list[str]:
        """All field names this map may read (for column projection)."""
        out: list[str] = []
        for names in (self.image, self.question, self.answer, self.id):
            out.extend(_names(names))
        return list(dict.fromkeys(out))


PRESETS: dict[str, FieldMap] = {
    "generic": FieldMap(image="image", question="question", answer="answer"),
    "geometry3k": FieldMap(image="images", question="problem", answer="answer"),
    "r1v": FieldMap(image="image", question=("problem", "question"), answer="solution", extract_answer=True),
}
PRESETS["easyr1"] = FieldMap(image="images", question="problem", answer="answer", image_index=None)
PRESETS["superclevr"] = PRESETS["r1v"]


def get_field_map(fields: str | FieldMap | Mapping[str, Any]) -> FieldMap:
    """A :class:`FieldMap` from a preset name, a FieldMap, or a dict of FieldMap keyword arguments."""
    if isinstance(fields, FieldMap):
        return fields
    if isinstance(fields, str):
        try:
            return PRESETS[fields.lower()]
        except KeyError:
            raise ValueError(f"unknown field preset {fields!r}; known: {sorted(PRESETS)}") from None
    if isinstance(fields, Mapping):
        return FieldMap(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    raise TypeError(f"fields must be a preset name, FieldMap or dict, got {type(fields).__name__}")


def _names(names: FieldNames) -> tuple[str, ...]:
    return (names,) if isinstance(names, str) else tuple(names)


def _lookup(record: Mapping[str, Any], names: FieldNames) -> tuple[str, Any]:
    """``(name, value)`` of the first present, non-None field; ``(first name, None)`` if none."""
    names = _names(names)
    for name in names:
        value = record.get(name)
        if value is not None:
            return name, value
    return names[0], None


def _field_label(names: FieldNames) -> str:
    names = _names(names)
    return names[0] if len(names) == 1 else "/".join(names)


def _text(record: Mapping[str, Any], names: FieldNames, file: str, row: int, what: str) -> str:
    name, value = _lookup(record, names)
    if value is None:
        raise DataError(file, row, _field_label(names), f"missing {what}")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(file, row, name, f"{what} must be a string, got {type(value).__name__}")
    text = value if isinstance(value, str) else str(value)
    if not text.strip():
        raise DataError(file, row, name, f"empty {what}")
    return text


_DATA_URI = re.compile(r"^data:image/[\w.+-]+;base64,", re.IGNORECASE)


def _b64(text: str, file: str, row: int, name: str) -> bytes:
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise DataError(file, row, name, f"invalid base64 image: {e}") from None
    if not data:
        raise DataError(file, row, name, "empty image (base64 decodes to no bytes)")
    return data


def _resolve_images(value: Any, fields: FieldMap, name: str, file: str, row: int, root: Path) -> list[bytes | str]:
    """The row's images (`_resolve_image` each): every element of a list when ``fields.image_index`` is None."""
    if fields.image_index is None and isinstance(value, (list, tuple)):
        if not value:
            raise DataError(file, row, name, "image list is empty")
        return [_resolve_image(v, fields, f"{name}[{i}]", file, row, root) for i, v in enumerate(value)]
    return [_resolve_image(value, fields, name, file, row, root)]


def _resolve_image(value: Any, fields: FieldMap, name: str, file: str, row: int, root: Path) -> bytes | str:
    """Raw image value -> encoded ``bytes`` or an absolute, existing file path (cheap checks only)."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise DataError(file, row, name, "image list is empty")
        if fields.image_index is None:
            raise DataError(file, row, name, "nested image list")
        if not -len(value) <= fields.image_index < len(value):
            raise DataError(file, row, name, f"image list has {len(value)} item(s), no index {fields.image_index}")
        value = value[fields.image_index]
    if isinstance(value, Mapping):
        if value.get("bytes") is not None:
            value = value["bytes"]
        elif value.get("path") is not None:
            value = value["path"]
        else:
            raise DataError(file, row, name, "image dict has neither 'bytes' nor 'path'")
    if isinstance(value, (bytes, bytearray, memoryview)):
        if len(value) == 0:
            raise DataError(file, row, name, "empty image bytes")
        return bytes(value)
    if isinstance(value, str):
        if fields.image_base64:
            return _b64(value, file, row, name)
        if _DATA_URI.match(value):
            return _b64(value[value.index(",") + 1 :], file, row, name)
        if not value.strip():
            raise DataError(file, row, name, "empty image path")
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = root / path
        if not path.is_file():
            raise DataError(file, row, name, f"image file not found: {path}")
        return str(path)
    if value is None:
        raise DataError(file, row, name, "missing image")
    raise DataError(file, row, name, f"unsupported image value of type {type(value).__name__}")


def check_image_decodes(image: bytes | str, file: str, row: int, field: str = "image") -> None:
    """Fully decode ``image`` (bytes or path); raise :class:`DataError` if PIL cannot."""
    try:
        with PIL.Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as im:
            im.load()
            if im.width == 0 or im.height == 0:
                raise ValueError(f"image is empty (size {im.size})")
    except Exception as e:  # PIL raises OSError, SyntaxError, DecompressionBombError, ...
        raise DataError(file, row, field, f"cannot decode image: {type(e).__name__}: {e}") from e


# --------------------------------------------------------------------------- file readers


def _read_jsonl(path: Path) -> Iterable[tuple[int, Any]]:
    """``(line number, parsed JSON | DataError)`` for each non-blank line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, DataError(str(path), lineno, None, f"invalid JSON: {e}")


def _read_json(path: Path) -> Iterable[tuple[int, Any]]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(str(path), None, None, f"invalid JSON: {e}") from None
        yield from enumerate(data, start=1)
    else:  # JSON Lines stored with a .json suffix
        yield from _read_jsonl(path)


class _ParquetColumns:
    """Lazy row access to a pyarrow table (keeps image bytes in Arrow memory, not Python objects)."""

    def __init__(self, path: Path, columns: Sequence[str]):
        try:
            import pyarrow.parquet as pq
        except ImportError as e:  # pragma: no cover - pyarrow ships with tensorflow-datasets
            raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from e
        schema_names = set(pq.read_schema(path).names)
        wanted = [c for c in columns if c in schema_names]
        self.table = pq.read_table(path, columns=wanted)
        self.num_rows = self.table.num_rows

    def row(self, i: int) -> dict[str, Any]:
        return {name: self.table.column(name)[i].as_py() for name in self.table.column_names}


def _read_parquet(path: Path, columns: Sequence[str]) -> tuple[_ParquetColumns, Iterable[tuple[int, Any]]]:
    cols = _ParquetColumns(path, columns)
    return cols, ((i + 1, cols.row(i)) for i in range(cols.num_rows))


# --------------------------------------------------------------------------- the source


@dataclasses.dataclass
class _Entry:
    file_index: int
    row: int
    question: str
    answer: str
    id: str
    images: list[bytes | str] | None  # resolved (JSON files); None = read lazily from the Parquet table
    num_images: int = 1
    table_index: int = -1


class RowSource(Sequence):
    """Random-access, list-like source of examples (a grain ``RandomAccessDataSource``).

    Args:
      paths: one data file or a list of them (``.jsonl``/``.ndjson``, ``.json`` (array or
        lines), ``.parquet``/``.pq``); rows are concatenated in the given order.
      fields: a preset name (:data:`PRESETS`), a :class:`FieldMap`, or a dict of FieldMap args.
      skip_bad_rows: drop bad rows (counted in ``skipped``) instead of raising :class:`DataError`.
      validate_images: decode every image at load time (default: only cheap checks; decoding
        errors surface when the pipeline reads the row).
      image_root: directory for relative image paths (default: each data file's directory).

    Attributes:
      skipped: number of rows dropped (``skip_bad_rows=True`` only).
      skip_reasons: the :class:`DataError` of each dropped row.
      skip_bad_rows: as given (the pipeline uses it as its default for lazy decode errors).

    ``source[i]`` returns a fresh dict ``{"image", "question", "answer", "id", "file", "row"}``.
    """

    def __init__(
        self,
        paths: PathLike | Sequence[PathLike],
        fields: str | FieldMap | Mapping[str, Any] = "generic",
        *,
        skip_bad_rows: bool = False,
        validate_images: bool = False,
        image_root: PathLike | None = None,
    ):
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise ValueError("RowSource needs at least one data file")
        self.fields = get_field_map(fields)
        self.skip_bad_rows = bool(skip_bad_rows)
        self.validate_images = bool(validate_images)
        self.image_root = None if image_root is None else Path(image_root)
        self.skipped = 0
        self.skip_reasons: list[DataError] = []
        self.total_rows = 0
        self._tables: list[_ParquetColumns | None] = []
        self._entries: list[_Entry] = []
        for file_index, path in enumerate(self.paths):
            self._load(file_index, path)
        if self.skipped:
            logger.warning("%s", self.summary_text())

    # -- loading ---------------------------------------------------------------------------

    def _load(self, file_index: int, path: Path) -> None:
        if not path.is_file():
            raise FileNotFoundError(f"data file not found: {path}")
        suffix = path.suffix.lower()
        table: _ParquetColumns | None = None
        if suffix in _JSONL_SUFFIXES:
            rows = _read_jsonl(path)
        elif suffix in _JSON_SUFFIXES:
            rows = _read_json(path)
        elif suffix in _PARQUET_SUFFIXES:
            table, rows = _read_parquet(path, self.fields.columns())
        else:
            raise ValueError(
                f"{path}: unsupported data file type {suffix!r}; expected one of "
                f"{_JSONL_SUFFIXES + _JSON_SUFFIXES + _PARQUET_SUFFIXES}"
            )
        self._tables.append(table)
        root = self.image_root if self.image_root is not None else path.parent
        file = str(path)
        for row, record in rows:
            self.total_rows += 1
            try:
                entry = self._parse(file_index, file, row, record, root)
            except DataError as e:
                if not self.skip_bad_rows:
                    raise
                self.skipped += 1
                self.skip_reasons.append(e)
                continue
            if table is not None:
                entry.images = None  # re-read lazily from the table: no Python copy of the bytes
                entry.table_index = row - 1
            self._entries.append(entry)

    def _parse(self, file_index: int, file: str, row: int, record: Any, root: Path) -> _Entry:
        if isinstance(record, DataError):
            raise record
        if not isinstance(record, Mapping):
            raise DataError(file, row, None, f"expected a JSON object, got {type(record).__name__}")
        f = self.fields
        question = _text(record, f.question, file, row, "question")
        answer = _text(record, f.answer, file, row, "answer")
        if f.extract_answer:
            answer = extract_answer_tag(answer)
            if not answer:
                raise DataError(file, row, _lookup(record, f.answer)[0], "empty answer inside <answer></answer>")
        image_name, image_value = _lookup(record, f.image)
        if image_value is None:
            raise DataError(file, row, _field_label(f.image), "missing image")
        images = _resolve_images(image_value, f, image_name, file, row, root)
        if self.validate_images:
            for image in images:
                check_image_decodes(image, file, row, image_name)
        _, id_value = _lookup(record, f.id)
        ex_id = str(id_value) if id_value is not None else f"{Path(file).name}:{row}"
        return _Entry(file_index, row, question, answer, ex_id, images, len(images))

    # -- access ----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    def _images(self, entry: _Entry) -> list[bytes | str]:
        if entry.images is not None:
            return entry.images
        table = self._tables[entry.file_index]
        assert table is not None
        file = str(self.paths[entry.file_index])
        name, value = _lookup(table.row(entry.table_index), self.fields.image)
        return _resolve_images(value, self.fields, name, file, entry.row,
                               self.image_root if self.image_root is not None else Path(file).parent)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        entry = self._entries[index]
        images = self._images(entry)
        return {
            "image": images[0],
            "images": list(images),
            "question": entry.question,
            "answer": entry.answer,
            "id": entry.id,
            "file": str(self.paths[entry.file_index]),
            "row": entry.row,
        }

    def text_fields(self, index: int) -> dict[str, Any]:
        """Like ``source[index]`` without the images (no Parquet image read); ``num_images`` counts them."""
        entry = self._entries[index]
        return {"question": entry.question, "answer": entry.answer, "id": entry.id, "num_images": entry.num_images,
                "file": str(self.paths[entry.file_index]), "row": entry.row}

    # -- reporting -------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """``{"files", "rows", "kept", "skipped", "skipped_by_field": {field: count}}``."""
        by_field = collections.Counter(e.field or "<row>" for e in self.skip_reasons)
        return {
            "files": [str(p) for p in self.paths],
            "rows": self.total_rows,
            "kept": len(self),
            "skipped": self.skipped,
            "skipped_by_field": dict(by_field),
        }

    def summary_text(self, max_examples: int = 5) -> str:
        """Human-readable summary with the first ``max_examples`` skip reasons."""
        s = self.summary()
        text = f"{len(s['files'])} file(s): {s['rows']} rows, kept {s['kept']}, skipped {s['skipped']}"
        if s["skipped"]:
            text += f" (by field: {s['skipped_by_field']})"
            text += "".join(f"\n  {e}" for e in self.skip_reasons[:max_examples])
            if s["skipped"] > max_examples:
                text += f"\n  ... and {s['skipped'] - max_examples} more"
        return text

    def __repr__(self) -> str:
        return f"RowSource({[str(p) for p in self.paths]}, rows={len(self)}, skipped={self.skipped})"


def load_rows(paths: PathLike | Sequence[PathLike], fields: str | FieldMap | Mapping[str, Any] = "generic",
              **kwargs: Any) -> RowSource:
    """``RowSource(paths, fields, **kwargs)``."""
    return RowSource(paths, fields, **kwargs)
