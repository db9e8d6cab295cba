"""`ctrlab predict`: a data file scored chunk by chunk equals `Predictor.predict` on the whole file, whatever the
chunk size, input format and output format; id columns come through unchanged and in the order asked; the reader
never hands out more than a chunk of rows; every user error is one line naming the file, column or row, exit status
2, and leaves no output file (nor a temporary one) behind."""

from __future__ import annotations

import gzip
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from rich.console import Console

from ctrlab.cli import main
from ctrlab.data.chunks import RawChunks
from ctrlab.data.processor import ROW_COLUMN
from ctrlab.data.readers import read_table
from ctrlab.errors import DataError
from ctrlab.serve import Predictor
from ctrlab.serve.batch_predict import _score, predict_file
from tiny import HEADER, one_line_error, tiny_recipe, tiny_rows, write_csv, write_tiny_splits

QUIET = Console(quiet=True)
ANSI = re.compile(r"\x1b\[[0-9;]*m")
ROWS = 50


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run (categorical a, b; numeric x with a log transform), trained for one small epoch."""
    from ctrlab.config.loader import validate_recipe
    from ctrlab.train.run import train_recipe

    root = tmp_path_factory.mktemp("predict")
    previous = os.environ.get("CTRLAB_CACHE_DIR")
    os.environ["CTRLAB_CACHE_DIR"] = str(root / "cache")
    try:
        recipe = validate_recipe(tiny_recipe(root, write_tiny_splits(root / "data"), tracking={"enabled": False}))
        return Path(train_recipe(recipe, console=QUIET).output_dir)
    finally:
        if previous is None:
            os.environ.pop("CTRLAB_CACHE_DIR", None)
        else:
            os.environ["CTRLAB_CACHE_DIR"] = previous


@pytest.fixture(scope="module")
def predictor(run: Path) -> Predictor:
    return Predictor.from_run(run)


@pytest.fixture()
def data_csv(tmp_path: Path) -> Path:
    """50 raw rows (label, a, b, x, t) with unseen categories and missing values among them."""
    rows = tiny_rows(ROWS, 9)
    rows[3] = "1,a_never_seen,b1,2.5,3"
    rows[10] = "0,,b2,,10"
    return write_csv(tmp_path / "in" / "score.csv", rows)


def _write_input(csv: Path, kind: str) -> Path:
    """The same rows as ``kind``: csv, csv.gz, tsv or parquet (typed columns: x float, t integer)."""
    if kind == "csv":
        return csv
    frame = read_table(csv)
    if kind == "csv.gz":
        path = csv.with_name("score.csv.gz")
        path.write_bytes(gzip.compress(csv.read_bytes()))
    elif kind == "tsv":
        path = csv.with_name("score.tsv")
        frame.write_csv(path, separator="\t")
    else:
        path = csv.with_name("score.parquet")
        frame.with_columns(pl.col("x").cast(pl.Float64), pl.col("t").cast(pl.Int64)).write_parquet(
            path, row_group_size=9)
    return path


def _read_output(path: Path) -> pl.DataFrame:
    name = path.name
    if name.endswith(".parquet"):
        return pl.read_parquet(path)
    separator = "\t" if ".tsv" in name else ","
    return pl.read_csv(path.read_bytes() if not name.endswith(".gz") else gzip.decompress(path.read_bytes()),
                       separator=separator, infer_schema=False).with_columns(pl.col("probability").cast(pl.Float64))


def _assert_scores(scores: np.ndarray, predictor: Predictor, whole: pl.DataFrame, chunk_rows: int) -> None:
    """``scores`` are exactly what :meth:`Predictor.predict` gives for the same rows, chunk by chunk; against one
    call on the whole file they agree to float32 rounding (the model's matrix products may round the last bit
    differently for another batch size, as Predictor.predict's own 65,536-row batches do)."""
    by_chunk = np.concatenate([predictor.predict(whole.slice(start, chunk_rows))
                               for start in range(0, whole.height, chunk_rows)])
    np.testing.assert_allclose(scores, by_chunk, rtol=0, atol=1e-12)
    np.testing.assert_allclose(scores, predictor.predict(whole), rtol=0, atol=1e-6)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------------------------------- equality
@pytest.mark.parametrize("kind,out_name", [("csv", "scores.parquet"), ("csv", "scores.csv"),
                                           ("parquet", "scores.parquet"), ("parquet", "scores.csv"),
                                           ("csv.gz", "scores.tsv.gz"), ("tsv", "scores.tsv")])
@pytest.mark.parametrize("chunk_rows", [7, 50, 1000])
def test_chunked_scores_equal_the_predictor_on_the_whole_file(predictor: Predictor, data_csv: Path, tmp_path: Path,
                                                               kind: str, out_name: str, chunk_rows: int) -> None:
    data = _write_input(data_csv, kind)
    output = tmp_path / "out" / out_name
    result = predict_file(predictor, data, output, ["t", "a"], chunk_rows=chunk_rows, console=QUIET)
    assert result.rows == ROWS and result.output == output
    assert result.chunks == -(-ROWS // chunk_rows)
    whole = read_table(data)
    written = _read_output(output)
    assert written.columns == ["t", "a", "probability"]
    assert written.schema["probability"] == pl.Float64
    _assert_scores(written["probability"].to_numpy(), predictor, whole, chunk_rows)
    # id values come through unchanged, in the file's order (a parquet input keeps its integer type)
    ids = written.select("t", "a")
    if out_name.endswith(".parquet"):
        assert ids.equals(whole.select("t", "a"))
        if kind == "parquet":
            assert written.schema["t"] == pl.Int64
        assert pq.ParquetFile(output).num_row_groups == result.chunks
    else:
        assert ids.equals(whole.select(pl.col("t").cast(pl.String), "a"))
    assert _leftovers(output.parent) == []


def test_no_id_columns_gives_only_probabilities(predictor: Predictor, data_csv: Path, tmp_path: Path) -> None:
    output = tmp_path / "p.csv"
    predict_file(predictor, data_csv, output, chunk_rows=7, console=QUIET)
    written = _read_output(output)
    assert written.columns == ["probability"]
    _assert_scores(written["probability"].to_numpy(), predictor, read_table(data_csv), 7)


# ---------------------------------------------------------------------------------------------- the reader
@pytest.mark.parametrize("kind", ["csv", "csv.gz", "tsv", "parquet"])
@pytest.mark.parametrize("chunk_rows", [1, 7, 50, 64])
def test_the_reader_never_yields_more_than_chunk_rows(data_csv: Path, kind: str, chunk_rows: int) -> None:
    data = _write_input(data_csv, kind)
    chunks = list(RawChunks(data, chunk_rows=chunk_rows, row_numbers=True))
    sizes = [frame.height for frame in chunks]
    # every chunk but the last is full, whatever the file's own blocks or row groups (9 rows here) are
    assert all(size == chunk_rows for size in sizes[:-1]) and 0 < sizes[-1] <= chunk_rows
    whole = pl.concat(chunks)
    assert whole[ROW_COLUMN].to_list() == list(range(1, ROWS + 1))
    assert whole.drop(ROW_COLUMN).equals(read_table(data))


def test_the_reader_reads_delimited_text_as_read_table_does(tmp_path: Path) -> None:
    cases = {
        "quotes.csv": b'a,b\n"",x\n,y\n"p,q","m\nn"\r\n 1 ,NA\n',
        "crlf.csv": b"a,b\r\n1,2\r\n3,4\r\n",
        "bom.csv": b"\xef\xbb\xbfa,b\n1,2\n",
        "last_line.tsv": b"a\tb\n1\t2\n3\t4",
    }
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        for chunk_rows in (1, 2, 100):
            chunks = list(RawChunks(path, chunk_rows=chunk_rows))
            assert pl.concat(chunks).equals(read_table(path)), name
    movielens = tmp_path / "ratings.dat"
    movielens.write_text("1::10::5\n2::11::3\n3::12::4\n", encoding="utf-8")
    names = ["user", "item", "rating"]
    chunks = list(RawChunks(movielens, "csv", separator="::", header=False, columns=names, chunk_rows=2))
    assert [c.height for c in chunks] == [2, 1]
    assert pl.concat(chunks).equals(read_table(movielens, "csv", separator="::", header=False, columns=names))


def test_the_reader_selects_columns_and_checks_the_file_first(data_csv: Path, tmp_path: Path) -> None:
    chunks = RawChunks(data_csv, chunk_rows=20, select=["t", "a"])
    assert chunks.columns == HEADER.split(",")
    assert [frame.columns for frame in chunks] == [["t", "a"]] * 3
    with pytest.raises(DataError, match="column 'zz' is not in the data"):
        RawChunks(data_csv, select=["zz"])
    with pytest.raises(DataError, match="data file not found"):
        RawChunks(tmp_path / "nowhere.csv")  # checked when called, not at the first chunk
    (tmp_path / "header_only.csv").write_text(HEADER + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="header_only.csv: file has no data rows"):
        list(RawChunks(tmp_path / "header_only.csv"))
    (tmp_path / "short.csv").write_text("a,b,c\n1,2,3\n4,5\n", encoding="utf-8")
    with pytest.raises(DataError, match="short.csv: cannot parse as delimited text .*Expected 3 columns, got 2"):
        list(RawChunks(tmp_path / "short.csv"))
    (tmp_path / "reserved.csv").write_text(f"a,{ROW_COLUMN}\n1,2\n", encoding="utf-8")
    with pytest.raises(DataError, match="is reserved by ctrlab"):
        RawChunks(tmp_path / "reserved.csv", row_numbers=True)


# -------------------------------------------------------------------------------------------------- the CLI
def _cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main(["predict", *(str(a) for a in args)])
    captured = capsys.readouterr()
    return code, captured.out, ANSI.sub("", captured.err)


def test_command_writes_the_scores_and_prints_json(run: Path, predictor: Predictor, data_csv: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "scores.parquet"
    code, out, err = _cli(capsys, run, data_csv, "--output", output, "--id-columns", "t,label", "--chunk-rows", 7)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["output"] == str(output) and summary["rows"] == ROWS
    assert summary["seconds"] >= 0 and summary["rows_per_second"] > 0
    written = pl.read_parquet(output)
    assert written.columns == ["t", "label", "probability"]
    _assert_scores(written["probability"].to_numpy(), predictor, read_table(data_csv), 7)
    # an existing output is replaced only with --overwrite
    code, out, err = _cli(capsys, run, data_csv, "-o", output, "--overwrite")
    assert code == 0, err
    assert pl.read_parquet(output).columns == ["probability"]


def _file_without_b(tmp_path: Path) -> Path:
    return write_csv(tmp_path / "no_b.csv", [",".join(r.split(",")[i] for i in (0, 1, 3, 4))
                                             for r in tiny_rows(5, 1)], header="label,a,x,t")


FAILURES: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "unknown id column": (["--id-columns", "t,nope"],
                          ("--id-columns: column 'nope' is not in", "score.csv", "(columns: label, a, b, x, t)")),
    "id column named twice": (["--id-columns", "t,t"], ("--id-columns: column 't' is named twice",)),
    "output exists": (["--output", "{existing}"], ("existing.csv exists; pass --overwrite",)),
    "output is the input": (["--output", "{data}"], ("is the input file",)),
    "unknown output format": (["--output", "{tmp}/scores.json"], ("--output: cannot tell the format",)),
    "chunk rows": (["--chunk-rows", "0"], ("--chunk-rows: must be between 1",)),
    "missing input": (["--data", "{tmp}/nowhere.csv"], ("nowhere.csv: data file not found",)),
    "empty input": (["--data", "{empty}"], ("empty.csv: file is empty",)),
    "unknown input format": (["--data", "{json}"], ("rows.json: cannot tell the file format", "DATA must end in")),
    "header only": (["--data", "{header_only}"], ("header_only.csv: file has no data rows",)),
    "missing feature column": (["--data", "{no_b}"], ("no_b.csv: column 'b' named in features.categorical is not in "
                                                      "the data (columns: label, a, x, t)",)),
    "missing run": (["--run", "runs/nowhere"], ("runs/nowhere: run directory not found",)),
    "alias with a run directory": (["--alias", "champion"], ("is a run directory; --alias and --version",)),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_user_errors_are_one_line_and_leave_no_file(run: Path, data_csv: Path, tmp_path: Path, case: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    args, needles = FAILURES[case]
    existing = tmp_path / "existing.csv"
    existing.write_text("keep me\n", encoding="utf-8")
    (tmp_path / "empty.csv").write_bytes(b"")
    (tmp_path / "rows.json").write_text("[]\n", encoding="utf-8")
    (tmp_path / "header_only.csv").write_text(HEADER + "\n", encoding="utf-8")
    places = {"existing": existing, "data": data_csv, "tmp": tmp_path, "empty": tmp_path / "empty.csv",
              "header_only": tmp_path / "header_only.csv", "no_b": _file_without_b(tmp_path),
              "json": tmp_path / "rows.json"}
    args = [a.format(**places) for a in args]
    options: dict[str, Any] = {"--run": str(run), "--data": str(data_csv), "--output": str(tmp_path / "out.csv")}
    rest: list[str] = []
    for i in range(0, len(args), 2):
        if args[i] in options:
            options[args[i]] = args[i + 1]
        else:
            rest += args[i:i + 2]
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = _cli(capsys, options["--run"], options["--data"], "--output", options["--output"], *rest)
    one_line_error(code, err, *needles)
    assert out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temporary file
    assert existing.read_text(encoding="utf-8") == "keep me\n"


@pytest.mark.parametrize("chunk_rows", [7, 1000])
@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_a_bad_value_names_the_row_of_the_file(run: Path, tmp_path: Path, chunk_rows: int, kind: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    rows = tiny_rows(ROWS, 5)
    bad_row = 23  # the 23rd data row: the 2nd row of the 4th chunk of 7
    fields = rows[bad_row - 1].split(",")
    fields[3] = "not-a-number"
    rows[bad_row - 1] = ",".join(fields)
    data = write_csv(tmp_path / "bad.csv", rows)
    if kind == "parquet":
        data = tmp_path / "bad.parquet"
        read_table(tmp_path / "bad.csv").write_parquet(data, row_group_size=10)
    output = tmp_path / "out" / "scores.parquet"
    code, out, err = _cli(capsys, run, data, "--output", output, "--chunk-rows", chunk_rows)
    # one line: the progress bar is transient and draws nothing when stderr is not a terminal
    one_line_error(code, err, f"{data.name}: column 'x' row {bad_row}: value 'not-a-number' is not a number")
    assert not output.parent.exists()  # the folder atomic_path made for it is gone too


def test_an_interrupt_midway_leaves_no_partial_file(predictor: Predictor, data_csv: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    output = tmp_path / "scores.csv"
    output.write_text("earlier scores\n", encoding="utf-8")
    calls = {"n": 0}
    real = Predictor.predict

    def interrupted(self: Predictor, rows: Any, source: str = "request") -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, rows, source)

    monkeypatch.setattr(Predictor, "predict", interrupted)
    with pytest.raises(KeyboardInterrupt):
        predict_file(predictor, data_csv, output, ["t"], chunk_rows=7, overwrite=True, console=QUIET)
    assert output.read_text(encoding="utf-8") == "earlier scores\n"  # the old file is untouched
    assert _leftovers(tmp_path) == []


def test_a_non_finite_score_names_the_row_of_the_file() -> None:
    class Diverging:
        def predict(self, rows: pl.DataFrame, source: str = "request") -> np.ndarray:
            raise DataError(f"{source}: row 3: the model's score is not a finite number (are its numeric values far "
                            "outside the range seen in training?)")

    frame = pl.DataFrame({"a": ["x", "y", "z"], ROW_COLUMN: [15, 16, 17]})
    with pytest.raises(DataError, match=r"^data.csv: row 17: the model's score is not a finite number"):
        _score(Diverging(), frame, "data.csv")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ registered models
def test_a_registered_model_scores_like_its_run(run: Path, data_csv: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("mlflow")
    from ctrlab.serve.registry import register_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    register_run(str(run), "predict_t", alias="champion", tracking_uri=uri)
    expected = tmp_path / "from_run.parquet"
    assert _cli(capsys, run, data_csv, "-o", expected, "--id-columns", "t", "--chunk-rows", 7)[0] == 0
    for model, options in (("predict_t", []), ("predict_t", ["--version", "1"]), ("models:/predict_t@champion", []),
                           ("models:/predict_t/1", [])):
        output = tmp_path / "registered.parquet"
        code, out, err = _cli(capsys, model, data_csv, "-o", output, "--id-columns", "t", "--chunk-rows", 7,
                              "--tracking-uri", uri, "--overwrite", *options)
        assert code == 0, err
        assert pl.read_parquet(output).equals(pl.read_parquet(expected)), model
    code, _, err = _cli(capsys, "predict_t", data_csv, "-o", tmp_path / "x.csv", "--alias", "nope",
                        "--tracking-uri", uri)
    one_line_error(code, err, "model 'predict_t' has no alias 'nope'")
    code, _, err = _cli(capsys, "models:/predict_t@champion", data_csv, "-o", tmp_path / "x.csv", "--version", "1",
                        "--tracking-uri", uri)
    one_line_error(code, err, "not both")
    assert not (tmp_path / "x.csv").exists()
