"""Random-access data sources: build a dataset once, then read records by index.

:func:`load_source` prepares the ``array_record`` files of one of the builders in
:mod:`r1jax.data.builders` (if not already in ``data_dir``) and returns a
:class:`RecordSource`, which decodes TFDS records to plain Python values (``str``,
``int``, ``list[int]``).  :func:`question_and_answer` gives a uniform
``(question, reference answer)`` view of any dataset's record.

TFDS is imported lazily, so ``import r1jax.data`` stays light.
"""
from __future__ import annotations

import pathlib
from collections.abc import Sequence

import numpy as np

QA_FIELDS = {
    "countdown": ("question", "target"),
    "arithmetic": ("question", "answer"),
    "gsm8k": ("question", "answer_number"),
    "math": ("problem", "answer"),
}
"""Field holding the question and the reference final answer for each dataset."""


def _to_python(value):
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_to_python(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_python(v) for k, v in value.items()}
    return value


class RecordSource(Sequence):
    """Random-access view decoding raw TFDS records to plain Python values.

    ``len(source)`` and ``source[i]`` (negative ``i`` allowed) like a list; ``raw`` is the
    underlying ``tfds`` data source.
    """

    def __init__(self, raw, name: str = "", split: str = ""):
        self.raw = raw
        self.name = name
        self.split = split

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self)
        i = int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(
                f"{self.name}[{self.split}]: index {index} out of range for {n} "
                "records")
        return _to_python(self.raw[i])

    def __repr__(self) -> str:
        return f"RecordSource({self.name!r}, split={self.split!r}, len={len(self)})"


def make_builder(name: str, data_dir, **config):
    """The TFDS builder for ``name`` (``countdown``, ``arithmetic``, ``gsm8k``, ``math``)
    in ``data_dir``; ``config`` options go to the procedural builders' config."""
    from r1jax.data import builders

    if name not in builders.BUILDERS:
        raise ValueError(
            f"load_source: unknown dataset {name!r}; expected one of "
            f"{sorted(builders.BUILDERS)}")
    cls = builders.BUILDERS[name]
    if name in builders.CONFIG_FACTORIES:
        cfg = builders.CONFIG_FACTORIES[name](**config)
    elif config:
        raise TypeError(
            f"load_source: dataset {name!r} takes no config options, got "
            f"{sorted(config)}")
    else:
        cfg = None
    return cls(data_dir=str(data_dir), config=cfg, file_format="array_record")


def load_source(name: str, split: str, data_dir, manual_dir=None, **config) -> RecordSource:
    """Build ``name`` into ``data_dir`` if needed and return its ``split`` as a source.

    Args:
      name: ``"countdown"``, ``"arithmetic"``, ``"gsm8k"`` or ``"math"``.
      split: ``"train"`` or ``"test"`` (or any TFDS split expression like ``"train[:10]"``).
      data_dir: where the ``array_record`` files live (created if missing).
      manual_dir: folder with the published files, for ``gsm8k`` and ``math``.
      **config: options of :class:`~r1jax.data.builders.CountdownConfig` or
        :class:`~r1jax.data.builders.ArithmeticConfig` (e.g. ``num_train=50``).

    Returns:
      A :class:`RecordSource` (``len`` and integer indexing, plain-Python records).
    """
    import tensorflow_datasets as tfds

    from r1jax.data import readers

    builder = make_builder(name, data_dir, **config)
    if not (pathlib.Path(builder.data_dir) / "dataset_info.json").exists():
        if name in ("gsm8k", "math"):
            finder = readers.gsm8k_files if name == "gsm8k" else readers.math_files
            finder(manual_dir, split.split("[")[0])  # clear error before TFDS starts
        builder.download_and_prepare(
            file_format="array_record",
            download_config=tfds.download.DownloadConfig(
                manual_dir=None if manual_dir is None else str(manual_dir),
                try_download_gcs=False,
            ),
        )
    available = sorted(builder.info.splits.keys())
    if split.split("[")[0] not in available:
        raise ValueError(
            f"load_source: {name} in {builder.data_dir} has splits {available}, not "
            f"{split!r}")
    return RecordSource(builder.as_data_source(split=split), name=name, split=split)


def question_and_answer(name: str, record: dict) -> tuple[str, str]:
    """``(question, reference final answer as str)`` of a record of dataset ``name``."""
    if name not in QA_FIELDS:
        raise ValueError(
            f"question_and_answer: unknown dataset {name!r}; expected one of "
            f"{sorted(QA_FIELDS)}")
    q_field, a_field = QA_FIELDS[name]
    for field in (q_field, a_field):
        if field not in record:
            raise KeyError(
                f"question_and_answer: {name} record has no field {field!r}; keys "
                f"{sorted(record)}")
    return str(record[q_field]), str(record[a_field])
