"""Batch scoring of a data file (``ctrlab predict``): raw rows in, one click probability per row out, streamed chunk
by chunk so that memory is bounded by the chunk size, not by the file.

Each chunk of the input (:mod:`ctrlab.data.chunks`) goes through the run's feature processor and model
(:meth:`Predictor.predict`), and the output gets the chosen id columns, copied unchanged, and a float64
``probability`` column. The output (parquet, one row group per chunk, or csv/tsv, optionally gzipped) is written
under a temporary name beside the target and renamed onto it only when every row is scored, so an error or Ctrl-C
half-way leaves no partial file. Errors name the file, the column and the row of the file.
"""

from __future__ import annotations

import gzip
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, cast

import numpy as np
import polars as pl
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ctrlab.data.chunks import DEFAULT_CHUNK_ROWS, MAX_CHUNK_ROWS, RawChunks
from ctrlab.data.processor import ROW_COLUMN
from ctrlab.data.readers import check_data_file, infer_format
from ctrlab.errors import CtrlabError, DataError
from ctrlab.serve.predictor import Predictor
from ctrlab.utils.io import atomic_path

SCORE_COLUMN = "probability"
OutputFormat = Literal["parquet", "csv", "tsv"]
_OUTPUT_SUFFIXES: dict[str, OutputFormat] = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "tsv",
                                            ".txt": "tsv"}
_MODELS_URI = "models:/"


@dataclass(frozen=True)
class PredictResult:
    """What :func:`predict_file` wrote: the output file, its row count and how long scoring took."""

    output: Path
    rows: int
    seconds: float
    chunks: int

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("nan")

    def summary(self) -> dict[str, Any]:
        """The CLI's JSON result."""
        return {"output": str(self.output), "rows": self.rows, "seconds": round(self.seconds, 3),
                "rows_per_second": round(self.rows_per_second, 1)}


# --------------------------------------------------------------------------------------------------- the model
def load_predictor(run_or_model: str, alias: str | None = None, version: str | None = None,
                   tracking_uri: str | None = None) -> Predictor:
    """The :class:`Predictor` of a run directory (``output_dir`` of ``ctrlab train``), of a registered model name
    (at ``alias``, default champion, or ``version``, found as ``ctrlab serve`` finds it), or of a
    ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` URI. Anything else is a one-line :class:`CtrlabError`."""
    path = Path(run_or_model)
    if path.is_dir():
        if alias is not None or version is not None:
            raise CtrlabError(f"{run_or_model}: is a run directory; --alias and --version choose a registered "
                              "model's version")
        return Predictor.from_run(path)
    if run_or_model.startswith(_MODELS_URI):
        name, alias, version = _parse_models_uri(run_or_model, alias, version)
    elif path.exists():
        raise CtrlabError(f"{run_or_model}: is not a directory; give a run directory (output_dir of ctrlab train) "
                          "or a registered model name")
    elif "/" in run_or_model or "\\" in run_or_model or run_or_model.startswith("."):
        raise CtrlabError(f"{run_or_model}: run directory not found")
    else:
        name = run_or_model
    return _load_registered(name, alias, version, tracking_uri)


def _parse_models_uri(uri: str, alias: str | None, version: str | None) -> tuple[str, str | None, str | None]:
    if alias is not None or version is not None:
        raise CtrlabError(f"{uri}: give the alias or version in the models:/ URI or as --alias/--version, not both")
    rest = uri[len(_MODELS_URI):]
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
    elif "/" in rest:
        name, version = rest.rsplit("/", 1)
    else:
        name = rest
    if not name or "/" in name:
        raise CtrlabError(f"{uri}: expected models:/NAME, models:/NAME@ALIAS or models:/NAME/VERSION")
    return name, alias, version


def _load_registered(name: str, alias: str | None, version: str | None, tracking_uri: str | None) -> Predictor:
    from ctrlab.serve.registry import download_model, load_registered, resolve_model

    model = resolve_model(name, alias, version, tracking_uri)
    # The predictor holds everything in memory once loaded (recipe, processor state, weights), so the downloaded
    # files need not outlive this call.
    with tempfile.TemporaryDirectory(prefix="ctrlab-predict-") as tmp:
        predictor = load_registered(download_model(model, Path(tmp)))
    assert isinstance(predictor, Predictor)
    return predictor


# ------------------------------------------------------------------------------------------------------- checks
def output_format(output: Path) -> tuple[OutputFormat, bool]:
    """The output's format from its name (``.parquet``/``.pq``, ``.csv``, ``.tsv``/``.txt``) and whether it is
    gzipped (``.csv.gz``, ``.tsv.gz``)."""
    suffixes = [s.lower() for s in output.suffixes]
    gzipped = bool(suffixes) and suffixes[-1] == ".gz"
    suffix = (suffixes[-2] if gzipped and len(suffixes) > 1 else suffixes[-1]) if suffixes and suffixes != [".gz"] \
        else ""
    fmt = _OUTPUT_SUFFIXES.get(suffix)
    if fmt is None:
        raise CtrlabError(f"--output: cannot tell the format from the name {output.name!r}; end it in .parquet, "
                          ".csv or .tsv (.csv.gz and .tsv.gz are gzipped)")
    if fmt == "parquet" and gzipped:
        raise CtrlabError(f"--output: {output.name!r}: parquet is compressed inside; drop the .gz")
    return fmt, gzipped


def check_predict(data: str | Path, output: str | Path, id_columns: Sequence[str] = (), *,
                  chunk_rows: int = DEFAULT_CHUNK_ROWS, overwrite: bool = False) -> RawChunks:
    """Everything about a scoring job that can be checked without the model, cheaply and before any work: the data
    file is readable (its header is read), the id columns are in it, the output's format is known, it is not the
    input, and it does not exist unless ``overwrite``. Returns the data's chunk reader; raises a one-line
    :class:`CtrlabError` naming the option, file or column otherwise."""
    if not 1 <= chunk_rows <= MAX_CHUNK_ROWS:
        raise CtrlabError(f"--chunk-rows: must be between 1 and {MAX_CHUNK_ROWS:,}, got {chunk_rows:,}")
    data, output = Path(data), Path(output)
    output_format(output)
    check_data_file(data)
    try:
        infer_format(data)
    except DataError:  # its own message points at a recipe key, which this command has not got
        raise CtrlabError(f"{data}: cannot tell the file format from its name; DATA must end in .csv, .tsv or "
                          ".parquet (.csv.gz and .tsv.gz for gzipped text)") from None
    chunks = RawChunks(data, chunk_rows=chunk_rows, row_numbers=True)
    if output.resolve() == data.resolve() or (output.exists() and os.path.samefile(output, data)):
        raise CtrlabError(f"--output: {output} is the input file; write the scores to another file")
    if output.is_dir():
        raise CtrlabError(f"--output: {output} is a directory; name a file")
    if output.exists() or output.is_symlink():
        if not overwrite:
            raise CtrlabError(f"--output: {output} exists; pass --overwrite to replace it")
        if not output.is_file():
            raise CtrlabError(f"--output: {output} is not a regular file; it is never replaced")
    seen: set[str] = set()
    for name in id_columns:
        if name in seen:
            raise CtrlabError(f"--id-columns: column '{name}' is named twice")
        seen.add(name)
        if name not in chunks.columns:
            shown = ", ".join(chunks.columns[:30]) + ("..." if len(chunks.columns) > 30 else "")
            raise CtrlabError(f"--id-columns: column '{name}' is not in {data} (columns: {shown})")
        if name == SCORE_COLUMN:
            raise CtrlabError(f"--id-columns: column '{SCORE_COLUMN}' would collide with the output's score column")
    return chunks


# ------------------------------------------------------------------------------------------------------ scoring
def predict_file(predictor: Predictor, data: str | Path, output: str | Path, id_columns: Sequence[str] = (),
                 chunk_rows: int = DEFAULT_CHUNK_ROWS, overwrite: bool = False,
                 console: Console | None = None) -> PredictResult:
    """Score every row of ``data`` (csv/tsv, plain or gzip, or parquet, with the training data's own columns) and
    write ``id_columns`` plus ``probability`` to ``output`` (format from its suffix), ``chunk_rows`` rows at a time.

    Memory is bounded by the chunk size: the input is streamed and each chunk's scores are written before the next
    chunk is read. The output appears only complete (atomic rename). A rich progress bar goes to ``console``
    (stderr by default). Errors are one-line :class:`CtrlabError` naming the file, the column and the file's row.
    """
    id_columns = list(id_columns)
    chunks = check_predict(data, output, id_columns, chunk_rows=chunk_rows, overwrite=overwrite)
    data, output = Path(data), Path(output)
    fmt, gzipped = output_format(output)
    needed = predictor.input_columns
    if all(name in chunks.columns for name in needed):
        # Parse only what is used; when a feature column is missing, read everything so that the processor's own
        # message lists the file's columns.
        chunks.select = list(dict.fromkeys([*needed, *id_columns]))
    console = console or Console(stderr=True)
    started = time.perf_counter()
    rows = count = 0
    progress = Progress(TextColumn("[bold]predict[/bold]"), BarColumn(), TaskProgressColumn(),
                        TextColumn("{task.fields[rows]:,} rows"), TimeElapsedColumn(), TimeRemainingColumn(),
                        console=console, transient=True)
    with progress, atomic_path(output) as tmp, _writer(tmp, fmt, gzipped) as write:
        task = progress.add_task("predict", total=1.0, rows=0)
        for frame in chunks:
            scores = _score(predictor, frame, str(data))
            write(pl.DataFrame([*(frame.get_column(name) for name in id_columns),
                                pl.Series(SCORE_COLUMN, scores, dtype=pl.Float64)]))
            rows += frame.height
            count += 1
            progress.update(task, completed=chunks.fraction_read(), rows=rows)
    return PredictResult(output, rows, time.perf_counter() - started, count)


_ROW_MESSAGE = re.compile(r"row (\d+): ")


def _score(predictor: Predictor, frame: pl.DataFrame, source: str) -> np.ndarray:
    """The chunk's probabilities. The processor names rows by the file's row numbers (ROW_COLUMN); the predictor's
    own check of the scores numbers the rows of the frame it was given, so that number is moved to the file's."""
    try:
        return predictor.predict(frame, source=source)
    except DataError as error:
        prefix = f"{source}: "
        found = _ROW_MESSAGE.match(error.message, len(prefix)) if error.message.startswith(prefix) else None
        if found is None or "the model's score" not in error.message:
            raise
        row = int(frame.get_column(ROW_COLUMN)[int(found.group(1)) - 1])
        raise DataError(f"{prefix}row {row}: {error.message[found.end():]}") from None


@contextmanager
def _writer(path: Path, fmt: OutputFormat, gzipped: bool) -> Iterator[Callable[[pl.DataFrame], None]]:
    """A function that appends one chunk's frame to ``path``: a parquet row group, or csv/tsv lines (header
    first)."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        state: dict[str, Any] = {}

        def write_parquet(frame: pl.DataFrame) -> None:
            table = frame.to_arrow()
            if "writer" not in state:
                state["schema"] = table.schema
                state["writer"] = pq.ParquetWriter(path, table.schema)
            elif table.schema != state["schema"]:  # every row group must have the file's schema
                table = table.cast(state["schema"])
            state["writer"].write_table(table, row_group_size=max(table.num_rows, 1))

        try:
            yield write_parquet
        finally:
            if "writer" in state:
                state["writer"].close()
        return
    separator = "," if fmt == "csv" else "\t"
    # zlib's usual level 6: gzip's default 9 takes several times longer for a file about 1% smaller
    handle = cast(IO[bytes], gzip.open(path, "wb", compresslevel=6) if gzipped else open(path, "wb"))
    first = [True]

    def write_text(frame: pl.DataFrame) -> None:
        nested = [name for name, dtype in frame.schema.items() if dtype.is_nested()]
        if nested:
            raise CtrlabError(f"--id-columns: column '{nested[0]}' holds {frame.schema[nested[0]]} values, which a "
                              f"{fmt} file cannot hold; write a .parquet output")
        frame.write_csv(handle, separator=separator, include_header=first[0])
        first[0] = False

    try:
        yield write_text
    finally:
        handle.close()
