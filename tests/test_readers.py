"""Readers: CSV/TSV with and without header, gzip, parquet, libFM/libFFM."""

from __future__ import annotations

import gzip
from pathlib import Path

import polars as pl
import pytest

from ctrlab.data.readers import infer_format, read_table
from ctrlab.errors import DataError


def test_csv_with_header_reads_all_columns_as_strings(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_text('label,city,price\n1,"New York, NY",3.5\n0,Paris,\n')
    frame = read_table(path)
    assert frame.columns == ["label", "city", "price"]
    assert frame.dtypes == [pl.String] * 3
    assert frame["city"].to_list() == ["New York, NY", "Paris"]
    assert frame["price"].to_list() == ["3.5", None]


def test_tsv_without_header_needs_and_uses_column_names(tmp_path: Path) -> None:
    path = tmp_path / "a.tsv.gz"
    with gzip.open(path, "wt") as handle:
        handle.write("1\tx\t7\n0\ty\t8\n")
    assert infer_format(path) == "tsv"
    frame = read_table(path, header=False, columns=["label", "c", "n"])
    assert frame.shape == (2, 3) and frame["c"].to_list() == ["x", "y"]
    with pytest.raises(DataError, match="no header; name its columns"):
        read_table(path, header=False)
    with pytest.raises(DataError, match="has 3 columns but dataset.columns names 2"):
        read_table(path, header=False, columns=["label", "c"])


def test_multi_character_separator(tmp_path: Path) -> None:
    path = tmp_path / "r.dat"
    path.write_text("1::10::5\n2::11::3\n")
    frame = read_table(path, "tsv", separator="::", header=False, columns=["u", "m", "r"])
    assert frame.rows() == [("1", "10", "5"), ("2", "11", "3")]


def test_parquet_keeps_types(tmp_path: Path) -> None:
    path = tmp_path / "a.parquet"
    pl.DataFrame({"label": [0, 1], "x": [1.5, 2.5], "c": ["a", "b"]}).write_parquet(path)
    frame = read_table(path)
    assert frame.dtypes == [pl.Int64, pl.Float64, pl.String]


def test_libfm_and_libffm(tmp_path: Path) -> None:
    path = tmp_path / "a.libfm"
    path.write_text("1 3:1 10:1\r\n-1 4:1 11:1\r\n")
    frame = read_table(path)
    assert frame.rows() == [("1", "3", "10"), ("0", "4", "11")]
    ffm = tmp_path / "b.libffm"
    ffm.write_text("0 0:5:1 1:9:0.5\n")
    assert read_table(ffm, "libfm").rows() == [("0", "5", "9")]
    ragged = tmp_path / "c.libfm"
    ragged.write_text("1 3:1 10:1\n0 4:1\n")
    with pytest.raises(DataError, match=r"line 2 has 1 features, earlier lines have 2"):
        read_table(ragged)


def test_unknown_extension_asks_for_format(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    path.write_text("x")
    with pytest.raises(DataError, match="set dataset.format"):
        read_table(path)
