"""TFDS builders that write mr1jax rows as an indexed (array_record) TFDS dataset, without tensorflow.

One record layout for every dataset (:func:`row_features`)::

    image     encoded image bytes as given (PNG, JPEG, ...; tfds.features.Image, not re-encoded)
    question  str
    answer    str
    id        str    the row's id (the source's id field, else "<file name>:<row>")
    file      str    source file the row came from
    row       int64  1-based line (JSONL) / row (Parquet) in that file

``file`` and ``row`` travel with the record, so an error found when the row is read on any host (an image
that does not decode) names the original file and line (:class:`mr1jax.data.rows.DataError`).

Builders:

* :class:`RowsBuilder` -- the user's JSONL / JSON / Parquet files through :class:`mr1jax.data.rows.RowSource`
  (any field preset); the dataset name is chosen by the caller (not registered). Used by
  ``python -m mr1jax.data.prepare --files=...``.
* :class:`Mr1jaxCounting` / :class:`Mr1jaxGeometry` -- the synthetic tasks of ``mr1jax.data.tasks``,
  registered as ``mr1jax_counting`` / ``mr1jax_geometry`` when this module is imported. Generated in-process
  (no download), so ``tfds.data_source("mr1jax_counting", data_dir=...)`` works offline. Splits ``train`` and
  ``test`` (disjoint scenes, as the tasks guarantee); sizes, seed and image size come from the builder config
  (:class:`TaskConfig`; :func:`task_config` makes one for other values).

Records are written in source order (``disable_shuffling``): record ``i`` of a split is the ``i``-th kept row,
so a prepared dataset is deterministic and its order easy to check; the training pipeline shuffles.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core.utils import py_utils

from mr1jax.data.rows import DataError, RowSource

__all__ = [
    "FILE_FORMAT", "Mr1jaxCounting", "Mr1jaxGeometry", "Progress", "RowsBuilder", "TASK_BUILDERS", "TaskConfig",
    "encode_image", "row_features", "task_config",
]

logger = logging.getLogger(__name__)

#: The only format mr1jax writes and reads: random access over many hosts needs an index.
FILE_FORMAT = "array_record"
#: Version of the record layout above.
VERSION = tfds.core.Version("1.0.0")


def row_features() -> tfds.features.FeaturesDict:
    """The record layout of every mr1jax TFDS dataset (see the module docstring)."""
    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(),
        "question": tfds.features.Text(),
        "answer": tfds.features.Text(),
        "id": tfds.features.Text(),
        "file": tfds.features.Text(),
        "row": np.int64,
    })


def encode_image(image: Any) -> bytes:
    """Encoded bytes of ``image``: bytes as they are, a file path read, a PIL image saved as PNG."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, Path)):
        return Path(image).read_bytes()
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class Progress:
    """Logs ``"<what>: N rows, R rows/s"`` every ``every`` rows and a final line (long prepares)."""

    def __init__(self, what: str, every: int = 10_000, log: Callable[[str], None] | None = None):
        self.what, self.every, self.count = what, max(1, int(every)), 0
        self.log = log or logger.info
        self.t0 = time.perf_counter()

    def start(self) -> None:
        """Restart the clock (when the first row is about to be written)."""
        self.t0 = time.perf_counter()

    def tick(self) -> None:
        self.count += 1
        if self.count % self.every == 0:
            self.log(f"{self.what}: {self.count} rows, {self.rate():.0f} rows/s")

    def rate(self) -> float:
        return self.count / max(time.perf_counter() - self.t0, 1e-9)

    def done(self) -> None:
        self.log(f"{self.what}: {self.count} rows in {time.perf_counter() - self.t0:.1f} s "
                 f"({self.rate():.0f} rows/s)")


def _records(rows: Sequence[Mapping[str, Any]] | Callable[[], Sequence[Mapping[str, Any]]],
             progress: Progress | None) -> Iterable[tuple[int, dict]]:
    """``(key, record)`` for every row, in order; the key is the row's index (written in key order). ``rows``
    may be a function returning them, called when the split is written."""
    rows = rows() if callable(rows) else rows
    if progress is not None:
        progress.start()
    for i in range(len(rows)):
        example = rows[i]
        file, row = str(example.get("file", "<in-memory rows>")), example.get("row", i + 1)
        try:
            image = encode_image(example["image"])
        except OSError as e:
            raise DataError(file, row, "image", f"cannot read image: {e}") from e
        yield i, {"image": image, "question": example["question"], "answer": str(example["answer"]),
                  "id": str(example.get("id", i)), "file": file, "row": int(row)}
        if progress is not None:
            progress.tick()
    if progress is not None:
        progress.done()


class _Mr1jaxBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Common parts: the record layout, array_record, records in key order."""

    VERSION = VERSION
    RELEASE_NOTES = {"1.0.0": "image bytes, question, answer, id, source file and row."}

    @py_utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # tfds' own lookup needs the `importlib_resources` backport for an installed package on Python >= 3.9
        return epath.Path(inspect.getfile(cls))

    def __init__(self, *, progress_every: int = 10_000, log: Callable[[str], None] | None = None, **kwargs: Any):
        self._progress_every, self._log = progress_every, log
        kwargs.setdefault("file_format", FILE_FORMAT)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=self._description(), features=row_features(),
                                     disable_shuffling=True)

    def _description(self) -> str:
        return "mr1jax rows: image, question, answer, id, source file and row."

    def _progress(self, split: str) -> Progress:
        return Progress(f"{self.name} {split}", self._progress_every, self._log)

    def _generate_examples(self, **kwargs: Any):  # the split generators below are used instead
        raise NotImplementedError


class RowsBuilder(_Mr1jaxBuilder, skip_registration=True):
    """A TFDS dataset named ``name`` from rows per split: ``{"train": RowSource | list of row dicts, ...}``.

    ``builder.download_and_prepare()`` writes ``data_dir/name/1.0.0/`` (array_record shards and
    dataset_info.json); ``tfds.builder_from_directory`` / :func:`mr1jax.data.tfds_source.open_tfds` read it.
    """

    def __init__(self, *, name: str, splits: Mapping[str, Sequence[Mapping[str, Any]]], description: str = "",
                 **kwargs: Any):
        self.name = name
        self._splits, self._text = dict(splits), description
        super().__init__(**kwargs)

    def _description(self) -> str:
        return self._text or super()._description()

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: _records(rows, self._progress(split)) for split, rows in self._splits.items()}


# ----------------------------------------------------------------------------------------- synthetic tasks


@dataclasses.dataclass(eq=False)
class TaskConfig(tfds.core.BuilderConfig):
    """A synthetic task's sizes: ``num_train`` / ``num_test`` rows, ``seed``, ``image_size`` (square)."""

    num_train: int = 4096
    num_test: int = 256
    seed: int = 0
    image_size: int = 56


def task_config(num_train: int, num_test: int = 256, seed: int = 0, image_size: int = 56) -> TaskConfig:
    """A :class:`TaskConfig` named ``n{num_train}_t{num_test}_seed{seed}_px{image_size}``."""
    return TaskConfig(name=f"n{num_train}_t{num_test}_seed{seed}_px{image_size}", version=VERSION,
                      num_train=int(num_train), num_test=int(num_test), seed=int(seed), image_size=int(image_size))


#: ``default`` = the embedded config's sizes (``configs/grpo.py``: 4096 train, 256 eval, seed 0, 56 px).
_DEFAULT_CONFIGS = [
    dataclasses.replace(task_config(4096, 256, 0, 56), name="default",
                        description="4096 train / 256 test rows, seed 0, 56x56 images (the embedded config)"),
    task_config(65536, 1024, 0, 56),
]


class _TaskBuilder(_Mr1jaxBuilder, skip_registration=True):
    TASK = ""
    BUILDER_CONFIGS = _DEFAULT_CONFIGS

    def _description(self) -> str:
        return f"mr1jax synthetic task {self.TASK!r} (mr1jax.data.tasks), generated from a seed."

    def _split_generators(self, dl_manager):
        del dl_manager
        cfg: TaskConfig = self.builder_config
        return {split: _records(functools.partial(self._rows, split, num), self._progress(split))
                for split, num in (("train", cfg.num_train), ("test", cfg.num_test))}

    def _rows(self, split: str, num: int) -> _TaskRows:
        """The split's rows, generated when the split is written (one split in memory at a time)."""
        from mr1jax.data.tasks import TASKS

        cfg: TaskConfig = self.builder_config
        t0 = time.perf_counter()
        rows = TASKS[self.TASK](num, seed=cfg.seed, split=split, image_size=cfg.image_size)
        (self._log or logger.info)(f"{self.name} {split}: generated {num} rows in {time.perf_counter() - t0:.1f} s")
        return _TaskRows(rows, f"{self.TASK}:{split}:seed{cfg.seed}")


class _TaskRows(Sequence):
    """Task examples with provenance ``file = "<task>:<split>:seed<seed>"``, ``row`` = 1-based index."""

    def __init__(self, rows: list[dict], where: str):
        self.rows, self.where = rows, where

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):  # type: ignore[override]
        return {**self.rows[i], "file": self.where, "row": i + 1}


class Mr1jaxCounting(_TaskBuilder):
    """Registered as ``mr1jax_counting``: ``mr1jax.data.tasks.counting_examples``."""

    TASK = "counting"


class Mr1jaxGeometry(_TaskBuilder):
    """Registered as ``mr1jax_geometry``: ``mr1jax.data.tasks.geometry_examples``."""

    TASK = "geometry"


#: synthetic task name -> its registered builder class.
TASK_BUILDERS: dict[str, type[_TaskBuilder]] = {"counting": Mr1jaxCounting, "geometry": Mr1jaxGeometry}


def load_rows_for_prepare(files: Sequence[str], fields: str, *, skip_bad_rows: bool,
                          validate_images: bool = True) -> RowSource:
    """The user's rows, every image decoded once (``validate_images``) so a corrupt one is named by file and line
    now rather than on a training host."""
    return RowSource(list(files), fields, skip_bad_rows=skip_bad_rows, validate_images=validate_images)
