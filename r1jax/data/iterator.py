"""Deterministic, resumable batch iteration over a random-access source.

The order of epoch ``e`` is a permutation drawn from a numpy PCG64 stream seeded with
``[seed, e]`` (no JAX involved), computed as ``argsort`` of raw 64-bit draws so it only
depends on the bit stream, not on numpy's shuffling algorithm.  Batches always hold
exactly ``batch_size`` records: a batch that reaches the end of an epoch continues with
the start of the next epoch's order, so no record is dropped and every batch has the
same shape.

The state is a :class:`Position` -- ``(epoch, index)``, two ints -- meaning "the next
record is ``order(epoch)[index]``".  Store ``position.to_dict()`` in a checkpoint and
pass ``Position.from_dict(...)`` back to :func:`iterate` to continue with exactly the
batches an uninterrupted run would have produced.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping

import numpy as np


@dataclasses.dataclass(frozen=True)
class Position:
    """Where iteration stands: next record is ``epoch_order(n, seed, epoch)[index]``."""

    epoch: int = 0
    index: int = 0

    def to_dict(self) -> dict[str, int]:
        """Plain ``{"epoch": int, "index": int}`` for checkpoints."""
        return {"epoch": int(self.epoch), "index": int(self.index)}

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> "Position":
        """Inverse of :meth:`to_dict`; accepts numpy/array scalars as values."""
        try:
            return cls(epoch=int(state["epoch"]), index=int(state["index"]))
        except KeyError as e:
            raise KeyError(
                "Position.from_dict: expected keys 'epoch' and 'index', got "
                f"{sorted(state)}") from e


def epoch_order(num_records: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of ``range(num_records)`` used in ``epoch`` (int64 array)."""
    if num_records < 0 or seed < 0 or epoch < 0:
        raise ValueError(f"epoch_order: expected non-negative num_records, seed, epoch; got "
                         f"{num_records}, {seed}, {epoch}")
    bits = np.random.PCG64(np.random.SeedSequence([int(seed), int(epoch)]))
    keys = bits.random_raw(num_records)
    return np.argsort(keys, kind="stable").astype(np.int64)


def iterate(source, batch_size: int, seed: int, position: Position | Mapping | None = None
            ) -> Iterator[tuple[list, Position]]:
    """Endless ``(batch, next_position)`` pairs over ``source``.

    Args:
      source: anything with ``__len__`` and ``__getitem__(int)``.
      batch_size: records per batch (always exactly this many).
      seed: shuffling seed (non-negative int).
      position: where to start -- a :class:`Position`, its ``to_dict()`` form, or
        ``None`` for the beginning.

    Yields:
      ``batch`` -- a list of ``batch_size`` records -- and the :class:`Position` to
      resume from *after* this batch.
    """
    n = len(source)
    if n == 0:
        raise ValueError("iterate: the source is empty")
    if batch_size < 1:
        raise ValueError(f"iterate: batch_size must be >= 1, got {batch_size}")
    if position is None:
        position = Position()
    elif not isinstance(position, Position):
        position = Position.from_dict(position)
    if position.epoch < 0 or not 0 <= position.index <= n:
        raise ValueError(f"iterate: position {position} is invalid for a source of {n} records")
    epoch, index = position.epoch, position.index
    order = epoch_order(n, seed, epoch)
    while True:
        batch = []
        while len(batch) < batch_size:
            if index == n:
                epoch, index = epoch + 1, 0
                order = epoch_order(n, seed, epoch)
            take = min(batch_size - len(batch), n - index)
            batch.extend(source[int(i)] for i in order[index:index + take])
            index += take
        if index == n:  # normalise so that saved positions never point past an epoch's end
            epoch, index = epoch + 1, 0
            order = epoch_order(n, seed, epoch)
        yield batch, Position(epoch, index)
