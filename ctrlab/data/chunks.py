"""Read a raw data file in chunks of rows, so that memory is bounded by the chunk size rather than the file size.

The whole-file readers (:mod:`ctrlab.data.readers`) hold a file in memory at once; this module reads the same files
(CSV/TSV with or without header, plain or gzip, and parquet) as a stream of :class:`polars.DataFrame` chunks of at
most ``chunk_rows`` rows, for work that can go chunk by chunk: batch scoring (``ctrlab predict``), streamed
preprocessing. Format inference, the checks on the path and the error messages are those of the whole-file
readers.

Delimited text is streamed by pyarrow's CSV reader with every column read as a string (as ``read_table`` does, so
the feature processor, not a type guess, decides what a column is): an empty field is a missing value, a quoted
empty field ``""`` is the empty string, quoted fields may hold separators and newlines. Parquet is streamed with
:meth:`pyarrow.parquet.ParquetFile.iter_batches` and keeps the file's types. Two differences from ``read_table``:
blank lines are skipped (polars reads them as rows of missing values), and a row with fewer fields than the header
is an error (polars pads it with missing values).

Every chunk but the last has exactly ``chunk_rows`` rows, whatever the file's own blocks or row groups are, and
reading holds at most about two chunks plus one block of the file. ``row_numbers=True`` adds
:data:`~ctrlab.data.processor.ROW_COLUMN`, each row's 1-based data row in the file, which the feature processor
uses in its messages: an error in the tenth chunk names the row of the file, not of the chunk.

::

    chunks = RawChunks("big.csv.gz", chunk_rows=100_000, row_numbers=True)   # checks the path, reads the header
    print(chunks.columns)
    for frame in chunks:          # polars frames of at most 100,000 rows, every column a string
        ...
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ctrlab.data.processor import ROW_COLUMN
from ctrlab.data.readers import Format, check_data_file, infer_format
from ctrlab.errors import DataError

DEFAULT_CHUNK_ROWS = 262_144
"""Rows per chunk unless told otherwise: large enough that per-chunk overheads vanish, small enough to bound memory
(about 0.5 GB at the peak for 30 string columns, read-ahead and the polars copy included)."""
MAX_CHUNK_ROWS = 1 << 24

# pyarrow's CSV reader parses (and, with threads, reads ahead) whole blocks of this many bytes; larger blocks only
# raise the read-ahead's memory (4 MiB: +90 MB peak on a 1M-row file) for no measurable speed.
_BLOCK_BYTES = 1 << 20
# A multi-character separator (MovieLens' '::') is rewritten to this byte on the way in, as read_table does.
_UNIT_SEPARATOR = "\x1f"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def _listed(names: list[str]) -> str:
    return f"{', '.join(names[:30])}{'...' if len(names) > 30 else ''}"


class _SeparatorRewrite(io.RawIOBase):
    """A UTF-8 text stream with a multi-character separator rewritten to one byte, read line by line (a separator
    never spans lines), for pyarrow, whose parser takes one-byte delimiters only."""

    def __init__(self, text: IO[str], separator: str) -> None:
        super().__init__()
        self._text = text
        self._separator = separator
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        while len(self._pending) < len(view):
            lines = self._text.readlines(_BLOCK_BYTES)
            if not lines:
                break
            self._pending += "".join(lines).replace(self._separator, _UNIT_SEPARATOR).encode("utf-8")
        size = min(len(view), len(self._pending))
        view[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size


class RawChunks:
    """The rows of one raw data file as polars frames of at most ``chunk_rows`` rows (all of them but the last
    exactly ``chunk_rows``), read lazily: iterating opens the file, reads one chunk at a time and closes it.

    The path is checked and the column names read when the object is made (:attr:`columns`; a one-line
    :class:`DataError` otherwise), so a caller can check its column choices before any rows are read. Arguments
    as :func:`ctrlab.data.readers.read_table`: ``fmt`` (inferred from the name by default), ``separator`` (``,``
    for csv, tab for tsv), ``header`` and ``columns`` (the names of a header-less file's columns). ``select``
    reads only these columns, in this order (checked here; the attribute may be narrowed later, before iterating,
    once the caller knows what it needs); ``row_numbers`` adds :data:`ROW_COLUMN`. libFM files are read whole
    only. Iterating again reads the file again; a file with no data rows raises when iteration ends empty.
    """

    def __init__(
        self,
        path: str | Path,
        fmt: Format | None = None,
        *,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        separator: str | None = None,
        header: bool = True,
        columns: list[str] | None = None,
        select: list[str] | None = None,
        row_numbers: bool = False,
    ) -> None:
        if not 1 <= chunk_rows <= MAX_CHUNK_ROWS:
            raise DataError(f"chunk size must be between 1 and {MAX_CHUNK_ROWS:,} rows, got {chunk_rows:,}")
        self.path = Path(path)
        check_data_file(self.path)
        self.format: Format = fmt or infer_format(self.path)
        if self.format == "libfm":
            raise DataError(f"{self.path}: libFM files cannot be read in chunks (csv, tsv and parquet can)")
        self.chunk_rows = chunk_rows
        self.header = header
        self.row_numbers = row_numbers
        self.separator = separator or ("," if self.format == "csv" else "\t")
        if self.format != "parquet" and (not self.separator or "\n" in self.separator or "\r" in self.separator):
            raise DataError(f"{self.path}: separator {self.separator!r} cannot separate fields")
        self._size = self.path.stat().st_size
        self._position: Callable[[], int] = lambda: 0
        self.rows: int | None = None
        """The file's row count where the format records it (parquet), else None."""
        if self.format == "parquet":
            self.columns = self._parquet_columns()
        else:
            self.columns = self._delimited_columns(columns)
        duplicated = sorted({name for name in self.columns if self.columns.count(name) > 1})
        if duplicated:
            raise DataError(f"{self.path}: column name '{duplicated[0]}' appears more than once; rename the columns")
        if row_numbers and ROW_COLUMN in self.columns:
            raise DataError(f"{self.path}: column name '{ROW_COLUMN}' is reserved by ctrlab (it numbers the file's "
                            "rows); rename that column")
        if select is not None:
            unknown = [name for name in select if name not in self.columns]
            if unknown:
                raise DataError(f"{self.path}: column '{unknown[0]}' is not in the data (columns: "
                                f"{_listed(self.columns)})")
            select = list(dict.fromkeys(select))
        self.select = select

    # ------------------------------------------------------------------------------------------ opening
    def _parquet_columns(self) -> list[str]:
        try:
            with pq.ParquetFile(self.path) as parquet:
                self.rows = parquet.metadata.num_rows
                names = list(parquet.schema_arrow.names)
        except Exception as exc:  # pyarrow raises several types (OSError, ArrowInvalid) for damaged files
            raise DataError(f"{self.path}: cannot read parquet file ({type(exc).__name__}: {_first_line(exc)})") \
                from None
        if self.rows == 0:
            raise DataError(f"{self.path}: file has no data rows")
        return names

    def _delimited_columns(self, columns: list[str] | None) -> list[str]:
        if not self.header and columns is None:
            raise DataError(f"{self.path}: file has no header; name its columns in dataset.columns")
        # Read the first block once for the header (or the width of a header-less file): the string types every
        # column is read with must be given by name before the stream opens.
        stream, _ = self._open_text_stream()
        try:
            options = pacsv.ReadOptions(block_size=_BLOCK_BYTES, autogenerate_column_names=not self.header)
            reader = pacsv.open_csv(stream, read_options=options, parse_options=self._parse_options())
            found = list(reader.schema.names)
            reader.close()
        except Exception as exc:
            raise self._text_error(exc) from None
        finally:
            stream.close()
        if self.header:
            return found
        assert columns is not None
        if len(columns) != len(found):
            raise DataError(f"{self.path}: file has {len(found)} columns but dataset.columns names {len(columns)}")
        return list(columns)

    def _open_text_stream(self) -> tuple[Any, Callable[[], int]]:
        """The file's bytes for pyarrow (gzip undone, a long separator rewritten) and a function giving how many of
        the file's own bytes have been consumed (for progress)."""
        gzipped = self.path.suffix.lower() == ".gz"
        if len(self.separator) == 1:
            raw = pa.OSFile(str(self.path), "rb")
            stream = pa.CompressedInputStream(raw, "gzip") if gzipped else raw
            return stream, raw.tell
        binary: IO[bytes] = open(self.path, "rb")
        inner: IO[bytes] = gzip.GzipFile(fileobj=binary, mode="rb") if gzipped else binary  # type: ignore[assignment]
        text = io.TextIOWrapper(inner, encoding="utf-8", newline="")
        return io.BufferedReader(_SeparatorRewrite(text, self.separator), _BLOCK_BYTES), binary.tell

    def _parse_options(self) -> pacsv.ParseOptions:
        delimiter = self.separator if len(self.separator) == 1 else _UNIT_SEPARATOR
        return pacsv.ParseOptions(delimiter=delimiter, quote_char='"', newlines_in_values=True,
                                  ignore_empty_lines=True)

    def _text_error(self, exc: BaseException) -> DataError:
        message = _first_line(exc)
        if isinstance(exc, UnicodeDecodeError) or "invalid UTF8" in message:
            return DataError(f"{self.path}: not UTF-8 text ({message})")
        if "Empty CSV file" in message:
            return DataError(f"{self.path}: file has no data rows")
        return DataError(f"{self.path}: cannot parse as delimited text ({message})")

    # ------------------------------------------------------------------------------------------ reading
    def _delimited_batches(self) -> Iterator[pa.RecordBatch]:
        stream, position = self._open_text_stream()
        self._position = position
        names = None if self.header else self.columns
        try:
            try:
                reader = pacsv.open_csv(
                    stream,
                    read_options=pacsv.ReadOptions(block_size=_BLOCK_BYTES, column_names=names),
                    parse_options=self._parse_options(),
                    convert_options=pacsv.ConvertOptions(
                        column_types={name: pa.string() for name in self.columns}, include_columns=self.select,
                        null_values=[""], strings_can_be_null=True, quoted_strings_can_be_null=False),
                )
            except Exception as exc:
                raise self._text_error(exc) from None
            while True:
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    return
                except Exception as exc:  # a ragged row, bad UTF-8, a damaged gzip stream
                    raise self._text_error(exc) from None
                yield batch
        finally:
            self._position = lambda: self._size  # the file is closed: it has been read, or reading has ended
            stream.close()

    def _parquet_batches(self) -> Iterator[pa.RecordBatch]:
        try:
            # pre_buffer would cache every row group read so far (memory grows with the file, not the chunk).
            parquet = pq.ParquetFile(self.path, pre_buffer=False)
        except Exception as exc:
            raise DataError(f"{self.path}: cannot read parquet file ({type(exc).__name__}: {_first_line(exc)})") \
                from None
        done = 0

        def rows_read() -> int:  # progress in the file's bytes, estimated from the share of rows read
            return int(self._size * done / max(self.rows or 1, 1))

        self._position = rows_read
        try:
            batches = parquet.iter_batches(batch_size=self.chunk_rows, columns=self.select)
            while True:
                try:
                    batch = next(batches)
                except StopIteration:
                    return
                except Exception as exc:
                    raise DataError(f"{self.path}: cannot read parquet file ({type(exc).__name__}: "
                                    f"{_first_line(exc)})") from None
                done += batch.num_rows
                yield batch
        finally:
            self._position = lambda: self._size
            parquet.close()

    def _tables(self) -> Iterator[pa.Table]:
        """The file's record batches regrouped into tables of exactly ``chunk_rows`` rows (the last one fewer)."""
        batches = self._parquet_batches() if self.format == "parquet" else self._delimited_batches()
        pending: list[pa.RecordBatch] = []
        count = 0
        for batch in batches:
            if batch.num_rows == 0:
                continue
            pending.append(batch)
            count += batch.num_rows
            while count >= self.chunk_rows:
                table = pa.Table.from_batches(pending)
                yield table.slice(0, self.chunk_rows)
                rest = table.slice(self.chunk_rows)
                pending, count = rest.to_batches(), rest.num_rows
        if count:
            yield pa.Table.from_batches(pending)

    def __iter__(self) -> Iterator[pl.DataFrame]:
        start = 0
        for table in self._tables():
            try:
                frame = pl.from_arrow(table)
            except Exception as exc:  # a type polars cannot hold
                raise DataError(f"{self.path}: rows {start + 1}-{start + table.num_rows} cannot be read "
                                f"({type(exc).__name__}: {_first_line(exc)})") from None
            assert isinstance(frame, pl.DataFrame)
            if self.select is not None:
                frame = frame.select(self.select)
            if self.row_numbers:
                frame = frame.with_columns(
                    pl.Series(ROW_COLUMN, np.arange(start + 1, start + 1 + frame.height, dtype=np.int64)))
            start += frame.height
            yield frame
        if start == 0:
            raise DataError(f"{self.path}: file has no data rows")

    def fraction_read(self) -> float:
        """How much of the file the current iteration has read, from 0 to 1 (for a progress bar; with text read a
        block or two ahead of the rows handed out)."""
        return min(1.0, self._position() / self._size) if self._size else 1.0

