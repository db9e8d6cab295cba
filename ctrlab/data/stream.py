"""Encoded splits that stay on disk: written and read one parquet row group at a time (the out-of-core data path).

:class:`SplitWriter` writes a split as the streamed pipeline encodes it, chunk by chunk, one row group of exactly
``chunk_rows`` rows per chunk (the last one holds the rest). :class:`StreamedSplit` reads such a file back as
:class:`~ctrlab.data.batches.FeatureBatch` mini-batches: shuffled for training (row groups in a per-epoch order,
rows mixed through a bounded shuffle buffer) or in file order for evaluation, for one rank of several.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from ctrlab.data.batches import FeatureBatch
from ctrlab.data.encoded import EncodedSplit
from ctrlab.data.layout import FeatureLayout
from ctrlab.errors import RecipeError

DEFAULT_CHUNK_ROWS = 262_144
"""Rows per chunk of the streamed pipeline, and so per row group of an encoded split (``dataset.chunk_rows``)."""
DEFAULT_SHUFFLE_BUFFER_ROWS = 1_048_576
"""Rows a training epoch keeps back for mixing (``dataset.shuffle_buffer_rows``)."""


class SplitWriter:
    """Writes one encoded split to a parquet file in row groups of exactly ``chunk_rows`` rows (the last one the
    rest), whatever the sizes of the pieces :meth:`write` receives. Columns as :meth:`EncodedSplit.to_frame` names
    them, so :meth:`EncodedSplit.from_parquet` reads the file too. Holds at most one row group's rows plus the
    piece being added."""

    def __init__(self, path: Path, layout: FeatureLayout, chunk_rows: int) -> None:
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
        self.path = path
        self.layout = layout
        self.chunk_rows = chunk_rows
        self.rows = 0
        self.row_groups = 0
        self._pending: list[EncodedSplit] = []
        self._pending_rows = 0
        self._writer: pq.ParquetWriter | None = None

    def write(self, encoded: EncodedSplit) -> None:
        """Add rows; every full ``chunk_rows`` goes to the file as one row group."""
        if len(encoded) == 0:
            return
        self._pending.append(encoded)
        self._pending_rows += len(encoded)
        if self._pending_rows < self.chunk_rows:
            return
        buffered = EncodedSplit.concat(self._pending)
        start = 0
        while len(buffered) - start >= self.chunk_rows:
            self._write_group(buffered.select(slice(start, start + self.chunk_rows)))
            start += self.chunk_rows
        rest = buffered.select(slice(start, len(buffered)))
        self._pending = [rest] if len(rest) else []
        self._pending_rows = len(rest)

    def _write_group(self, rows: EncodedSplit) -> None:
        table = rows.to_frame(self.layout).to_arrow()
        if self._writer is None:
            # zstd: encoded ids compress 3-5x, and reading a row group back costs less than the batches it feeds
            self._writer = pq.ParquetWriter(self.path, table.schema, compression="zstd")
        self._writer.write_table(table, row_group_size=len(rows))
        self.rows += len(rows)
        self.row_groups += 1

    def close(self) -> int:
        """Write the last (partial) row group and close the file; returns the rows written. A split with no row at
        all is a ``ValueError`` (the pipeline refuses empty splits before encoding)."""
        if self._pending_rows:
            self._write_group(EncodedSplit.concat(self._pending))
            self._pending, self._pending_rows = [], 0
        if self._writer is None:
            raise ValueError(f"{self.path}: no rows were written")
        self._writer.close()
        self._writer = None
        return self.rows

    def abort(self) -> None:
        """Close the file without finishing it (after an error; the caller removes it)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _encoded(frame: pl.DataFrame) -> EncodedSplit:
    """An encoded split's columns (as :meth:`EncodedSplit.to_frame` names them, in file order) as arrays."""
    n = frame.height

    def matrix(prefix: str, dtype: type) -> np.ndarray:
        names = [c for c in frame.columns if c.startswith(prefix)]
        if not names:
            return np.zeros((n, 0), dtype=dtype)
        return np.ascontiguousarray(np.stack([frame[c].to_numpy() for c in names], axis=1).astype(dtype, copy=False))

    crosses = [c for c in frame.columns if c.startswith("cross:")]
    return EncodedSplit(
        categorical=matrix("cat:", np.int32),
        numeric=matrix("num:", np.float32),
        sequences={c[len("seq:"):]: np.ascontiguousarray(frame[c].to_numpy().astype(np.int32, copy=False))
                   for c in frame.columns if c.startswith("seq:")},
        label=frame["label"].to_numpy().astype(np.float32, copy=False) if "label" in frame.columns else None,
        group=frame["group"].to_numpy().astype(np.int64, copy=False) if "group" in frame.columns else None,
        crosses=matrix("cross:", np.int32) if crosses else None,
    )


class _RowBuffer:
    """The shuffle buffer: preallocated arrays of ``capacity`` rows. Emitting ``k`` random rows moves the last
    rows into their places, so the buffer is never copied as a whole (its memory is the arrays, once)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.rows = 0
        self.data: EncodedSplit | None = None

    def _arrays(self) -> list[np.ndarray]:
        assert self.data is not None
        data = self.data
        return [a for a in (data.categorical, data.numeric, *data.sequences.values(), data.label, data.group,
                            data.crosses) if a is not None]

    def add(self, part: EncodedSplit) -> None:
        if self.data is None:
            def empty(array: np.ndarray | None) -> np.ndarray | None:
                return None if array is None else np.empty((self.capacity, *array.shape[1:]), dtype=array.dtype)

            self.data = EncodedSplit(empty(part.categorical), empty(part.numeric),  # type: ignore[arg-type]
                                     {k: empty(v) for k, v in part.sequences.items()},  # type: ignore[misc]
                                     empty(part.label), empty(part.group), empty(part.crosses))
        assert self.rows + len(part) <= self.capacity
        incoming = [a for a in (part.categorical, part.numeric, *part.sequences.values(), part.label, part.group,
                                part.crosses) if a is not None]
        for target, source in zip(self._arrays(), incoming):
            target[self.rows:self.rows + len(part)] = source
        self.rows += len(part)

    def take(self, count: int, rng: np.random.Generator) -> EncodedSplit:
        """``count`` rows drawn at random without replacement, in random order, removed from the buffer."""
        assert self.data is not None and count <= self.rows
        chosen = rng.choice(self.rows, size=count, replace=False) if count < self.rows else rng.permutation(self.rows)
        out = self.data.select(chosen)
        keep = self.rows - count
        taken = np.zeros(self.rows - keep, dtype=bool)
        taken[chosen[chosen >= keep] - keep] = True
        holes = chosen[chosen < keep]
        fillers = keep + np.flatnonzero(~taken)
        for array in self._arrays():
            array[holes] = array[fillers]
        self.rows = keep
        return out


class StreamedSplit:
    """An encoded split in a parquet file (as :class:`SplitWriter` writes it), served a row group at a time.

    * :meth:`batches` (training): rank ``r`` of ``world_size`` reads row groups ``r, r + W, r + 2W, ...`` in a
      permuted order and mixes their rows through a shuffle buffer: after each row group, rows beyond
      ``shuffle_buffer_rows`` are drawn from the buffer at random and yielded as batches; at the end the rest is
      yielded in random order. Every row of the rank's row groups comes exactly once per epoch, and the order is a
      function of ``(seed, epoch, rank)`` alone. Resident: the buffer plus one row group (and the batch in hand).
    * :meth:`ordered_batches` (evaluation): rank ``r`` reads a contiguous block of row groups
      (:meth:`ordered_rows`) in file order, so the ranks' outputs concatenated in rank order are in file order and
      line up with :meth:`labels`.
    * :meth:`labels` / :meth:`groups` read just that column of the whole split.
    """

    def __init__(self, path: str | Path, *, seed: int = 0,
                 shuffle_buffer_rows: int = DEFAULT_SHUFFLE_BUFFER_ROWS, name: str = "split",
                 keep_alive: object | None = None) -> None:
        self.path = Path(path)
        # e.g. the temporary folder holding the file: removed only once no split reading it is left
        self._keep_alive = keep_alive
        self.seed = seed
        self.shuffle_buffer_rows = shuffle_buffer_rows
        self.name = name
        metadata = pq.ParquetFile(self.path).metadata
        self.row_group_rows = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
        self.columns = list(metadata.schema.to_arrow_schema().names)
        self._columns: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return sum(self.row_group_rows)

    def __repr__(self) -> str:
        return f"StreamedSplit({str(self.path)!r}, rows={len(self):,}, row_groups={self.num_row_groups})"

    @property
    def num_row_groups(self) -> int:
        return len(self.row_group_rows)

    # ------------------------------------------------------------------------------------------- sharing
    def _check_ranks(self, rank: int, world_size: int) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not one of world size {world_size}")
        if self.num_row_groups < world_size:
            raise RecipeError(
                f"dataset.chunk_rows: the {self.name} split has {self.num_row_groups} row group(s), fewer than the "
                f"{world_size} ranks that share it (each rank reads whole row groups); lower dataset.chunk_rows")

    def row_groups_of(self, rank: int = 0, world_size: int = 1) -> list[int]:
        """The row groups rank ``rank`` trains on: ``rank, rank + world_size, ...``."""
        self._check_ranks(rank, world_size)
        return list(range(rank, self.num_row_groups, world_size))

    def rows_of(self, rank: int = 0, world_size: int = 1) -> int:
        """Rows rank ``rank`` trains on per epoch (ranks differ by at most one row group)."""
        return sum(self.row_group_rows[g] for g in self.row_groups_of(rank, world_size))

    def num_batches(self, batch_size: int, rank: int = 0, world_size: int = 1, drop_last: bool = False) -> int:
        """Batches :meth:`batches` yields for ``rank`` per epoch."""
        rows = self.rows_of(rank, world_size)
        return rows // batch_size if drop_last else -(-rows // batch_size)

    def ordered_groups(self, rank: int = 0, world_size: int = 1) -> list[int]:
        """The contiguous block of row groups rank ``rank`` evaluates (blocks differ by at most one group)."""
        self._check_ranks(rank, world_size)
        bounds = np.linspace(0, self.num_row_groups, world_size + 1).round().astype(int)
        return list(range(int(bounds[rank]), int(bounds[rank + 1])))

    def shares(self, world_size: int, ordered: bool = False) -> list[int]:
        """Rows each rank reads: its training row groups (:meth:`rows_of`), or with ``ordered`` its evaluation block
        (:meth:`ordered_rows`). Refuses fewer row groups than ranks."""
        if ordered:
            return [stop - start for start, stop in (self.ordered_rows(r, world_size) for r in range(world_size))]
        return [self.rows_of(r, world_size) for r in range(world_size)]

    def ordered_rows(self, rank: int = 0, world_size: int = 1) -> tuple[int, int]:
        """``(start, stop)``: the rows of the split (file order) that :meth:`ordered_batches` yields for ``rank``."""
        groups = self.ordered_groups(rank, world_size)
        start = sum(self.row_group_rows[:groups[0]]) if groups else 0
        return start, start + sum(self.row_group_rows[g] for g in groups)

    # ------------------------------------------------------------------------------------------- reading
    def read_row_group(self, index: int) -> EncodedSplit:
        """One row group as arrays."""
        table = pq.ParquetFile(self.path).read_row_group(index)
        return _encoded(pl.DataFrame(pl.from_arrow(table)))

    def read_all(self) -> EncodedSplit:
        """The whole split in memory (for splits known to be small, and for tests)."""
        return _encoded(pl.read_parquet(self.path))

    def _column(self, name: str) -> np.ndarray | None:
        # Read once: evaluation asks for a split's labels every epoch, and they never change.
        if name not in self.columns:
            return None
        if name not in self._columns:
            self._columns[name] = pl.read_parquet(self.path, columns=[name]).to_series().to_numpy()
        return self._columns[name]

    def labels(self) -> np.ndarray | None:
        """The labels ``[N]`` (float32) in file order, None for a split without labels."""
        labels = self._column("label")
        return None if labels is None else labels.astype(np.float32, copy=False)

    def groups(self) -> np.ndarray | None:
        """The group ids ``[N]`` (int64) in file order, None without ``dataset.group_by``."""
        groups = self._column("group")
        return None if groups is None else groups.astype(np.int64, copy=False)

    # ------------------------------------------------------------------------------------------- batches
    def batches(self, epoch: int, batch_size: int, rank: int = 0, world_size: int = 1,
                drop_last: bool = False) -> Iterator[FeatureBatch]:
        """One training epoch of rank ``rank``'s rows as shuffled mini-batches (see the class docstring)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        groups = self.row_groups_of(rank, world_size)
        rng = np.random.default_rng([self.seed, epoch, rank])
        order = rng.permutation(np.asarray(groups, dtype=np.int64))
        largest = max(self.row_group_rows[g] for g in groups)
        buffer = _RowBuffer(self.shuffle_buffer_rows + largest + batch_size)
        handle = pq.ParquetFile(self.path)
        for group in order:
            buffer.add(_encoded(pl.DataFrame(pl.from_arrow(handle.read_row_group(int(group))))))
            ready = (buffer.rows - self.shuffle_buffer_rows) // batch_size
            if ready > 0:
                yield from self._split(buffer.take(ready * batch_size, rng), batch_size, drop_last)
        if buffer.rows:
            yield from self._split(buffer.take(buffer.rows, rng), batch_size, drop_last)

    def ordered_batches(self, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[FeatureBatch]:
        """Rank ``rank``'s block of rows (:meth:`ordered_rows`) in file order, as mini-batches (the last one may be
        short); for evaluation, so predictions line up with :meth:`labels`."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        handle = pq.ParquetFile(self.path)
        carry: EncodedSplit | None = None
        for group in self.ordered_groups(rank, world_size):
            part = _encoded(pl.DataFrame(pl.from_arrow(handle.read_row_group(group))))
            rows = part if carry is None else EncodedSplit.concat([carry, part])
            full = len(rows) // batch_size * batch_size
            yield from self._split(rows.select(slice(0, full)), batch_size, drop_last=False)
            carry = rows.select(slice(full, len(rows))) if full < len(rows) else None
        if carry is not None:
            yield FeatureBatch.from_encoded(carry)

    @staticmethod
    def _split(rows: EncodedSplit, batch_size: int, drop_last: bool) -> Iterator[FeatureBatch]:
        for start in range(0, len(rows), batch_size):
            if drop_last and start + batch_size > len(rows):
                return
            yield FeatureBatch.from_encoded(rows.select(slice(start, start + batch_size)))
