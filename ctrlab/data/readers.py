"""Readers for the raw table formats: CSV/TSV (with or without header, plain or gzip), parquet and libFM.

Every reader returns a :class:`polars.DataFrame`. Delimited text is read with every column as a string so that the
feature processor, not a type guess, decides what a column is, and can report the exact line of a bad value.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Literal

import polars as pl

from ctrlab.errors import DataError

Format = Literal["csv", "tsv", "parquet", "libfm"]

_SUFFIX_FORMATS: dict[str, Format] = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".txt": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".libfm": "libfm",
    ".svm": "libfm",
}


def infer_format(path: Path) -> Format:
    """Guess the format from the file name, ignoring a trailing ``.gz``."""
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    for suffix in reversed(suffixes):
        if suffix in _SUFFIX_FORMATS:
            return _SUFFIX_FORMATS[suffix]
    raise DataError(f"{path}: cannot tell the file format from its name; set dataset.format (csv, tsv, parquet, libfm)")


def check_data_file(path: Path) -> None:
    """Refuse a data path that is missing, a directory, not a regular file (a pipe or a device) or empty, with a
    one-line :class:`DataError` naming it: every reader, whole-file or chunked, checks this before opening."""
    if not path.exists():
        raise DataError(f"{path}: data file not found")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a data file")
    if not path.is_file():  # a FIFO or a device would block the reader forever or never end
        raise DataError(f"{path}: is not a regular file (a pipe or a device?), expected a data file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")


def _open_text(path: Path):
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, "rt", encoding="utf-8", newline="")


def read_table(
    path: str | Path,
    fmt: Format | None = None,
    *,
    separator: str | None = None,
    header: bool = True,
    columns: list[str] | None = None,
) -> pl.DataFrame:
    """Read one raw data file.

    ``columns`` names the columns of a header-less file (and must match the count); with a header it is ignored
    for naming. libFM files give a ``label`` column (``-1`` read as 0) and one string column per feature position,
    named ``f0``, ``f1``, ... unless ``columns`` names them (label first).
    """
    path = Path(path)
    check_data_file(path)
    fmt = fmt or infer_format(path)
    if fmt == "parquet":
        frame = _read_parquet(path)
    elif fmt == "libfm":
        frame = _read_libfm(path, columns)
    else:
        frame = _read_delimited(path, separator or ("," if fmt == "csv" else "\t"), header, columns)
    if frame.height == 0:
        raise DataError(f"{path}: file has no data rows")
    return frame


def _read_parquet(path: Path) -> pl.DataFrame:
    try:
        return pl.read_parquet(path)
    except Exception as exc:  # polars raises several error types for corrupt files
        raise DataError(f"{path}: cannot read parquet file ({type(exc).__name__}: {exc})".splitlines()[0]) from None


def _read_delimited(path: Path, separator: str, header: bool, columns: list[str] | None) -> pl.DataFrame:
    if len(separator) != 1:
        # polars needs a one-byte separator; MovieLens-style '::' goes through a byte-level replacement.
        text = _open_text(path).read().replace(separator, "\x1f")
        source: object = text.encode("utf-8")
        separator = "\x1f"
    else:
        source = path
    try:
        frame = pl.read_csv(
            source,  # type: ignore[arg-type]
            separator=separator,
            has_header=header,
            infer_schema=False,
            quote_char='"',
            truncate_ragged_lines=False,
        )
    except pl.exceptions.NoDataError:
        raise DataError(f"{path}: file has no data rows") from None
    except Exception as exc:
        raise DataError(f"{path}: cannot parse as delimited text ({str(exc).splitlines()[0]})") from None
    if not header:
        if columns is None:
            raise DataError(f"{path}: file has no header; name its columns in dataset.columns")
        if len(columns) != frame.width:
            raise DataError(f"{path}: file has {frame.width} columns but dataset.columns names {len(columns)}")
        frame.columns = list(columns)
    return frame


def _read_libfm(path: Path, columns: list[str] | None) -> pl.DataFrame:
    """libFM (``label idx:val ...``) or libFFM (``label field:idx:val ...``) rows with one feature per field."""
    try:
        lines = pl.read_csv(path, has_header=False, separator="\x1f", quote_char=None, new_columns=["line"],
                            infer_schema=False)
    except pl.exceptions.NoDataError:
        raise DataError(f"{path}: file has no data rows") from None
    tokens = lines.get_column("line").str.extract_all(r"\S+")
    tokens = tokens.filter(tokens.list.len() > 0)
    if len(tokens) == 0:
        raise DataError(f"{path}: file has no data rows")
    widths = tokens.list.len()
    width = int(widths[0]) - 1
    bad = (widths != width + 1).arg_true()
    if len(bad):
        raise DataError(f"{path}: line {int(bad[0]) + 1} has {int(widths[int(bad[0])]) - 1} features, "
                        f"earlier lines have {width}")
    names = columns or ["label"] + [f"f{i}" for i in range(width)]
    if len(names) != width + 1:
        raise DataError(f"{path}: libFM rows have {width} features but dataset.columns names {len(names) - 1}")
    frame = tokens.list.to_struct(fields=names).struct.unnest()
    index = pl.col(names[1:]).str.replace(r":[^:]*$", "").str.replace(r"^[^:]*:", "")
    return frame.with_columns(index, pl.col(names[0]).replace("-1", "0"))
