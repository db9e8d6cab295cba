"""Hostile data: non-finite numbers and degenerate labels are refused up front with one line naming the file, column,
split and row, instead of a NaN loss many steps later or a run that "succeeds" with AUC NaN; at serving no score is
ever NaN."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch
import yaml

from ctrlab.cli import main
from ctrlab.errors import DataError
from tiny import HEADER, tiny_recipe, tiny_rows, write_csv, write_tiny_splits

ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    return write_tiny_splits(tmp_path / "data")


def _train(capsys: pytest.CaptureFixture[str], tmp_path: Path, data_dir: Path, *overrides: str,
           **sections: Any) -> tuple[int, str]:
    recipe = tiny_recipe(tmp_path, data_dir, tracking={"enabled": False}, **sections)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    code = main(["train", str(path), *overrides])
    return code, ANSI.sub("", capsys.readouterr().err)


def _error_line(code: int, err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err, err
    assert lines[-1].startswith("error: ") and sum(line.startswith("error") for line in lines) == 1, err
    return lines[-1]


def _with_value(data_dir: Path, split: str, row: int, value: str) -> None:
    """Put ``value`` into column x of data row ``row`` (1-based) of ``split``.csv."""
    rows = tiny_rows({"train": 200, "valid": 60, "test": 60}[split], {"train": 1, "valid": 2, "test": 3}[split])
    label, a, b, _, t = rows[row - 1].split(",")
    rows[row - 1] = ",".join([label, a, b, value, t])
    write_csv(data_dir / f"{split}.csv", rows)


@pytest.mark.parametrize("value", ["inf", "-inf", "1e400", "Infinity"])
@pytest.mark.parametrize("split, row", [("train", 7), ("test", 3)])
def test_non_finite_numbers_name_file_column_and_row(capsys, tmp_path, data_dir, cache_dir, value, split,
                                                     row) -> None:
    _with_value(data_dir, split, row, value)
    line = _error_line(*_train(capsys, tmp_path, data_dir))
    assert f"{split}.csv" in line and "column 'x'" in line and f"row {row}" in line, line
    assert "not a finite number" in line
    assert not (tmp_path / "out").exists()


def test_a_number_beyond_float32_after_its_transform_is_named(capsys, tmp_path, data_dir, cache_dir) -> None:
    _with_value(data_dir, "train", 11, "1e39")
    features = {"categorical": ["a", "b"], "numeric": [{"name": "x", "transform": "none"}]}
    line = _error_line(*_train(capsys, tmp_path, data_dir, features=features))
    assert "column 'x' row 11" in line and "float32" in line and "transform: log" in line, line
    # The same value is fine once the transform brings it into range.
    code, err = _train(capsys, tmp_path, data_dir, "features.numeric.0.transform=log")
    assert code == 0, err


def test_nan_stays_a_missing_value(capsys, tmp_path, data_dir, cache_dir) -> None:
    _with_value(data_dir, "train", 4, "nan")
    code, err = _train(capsys, tmp_path, data_dir)
    assert code == 0, err


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_a_split_of_one_class_is_refused_before_training(capsys, tmp_path, data_dir, cache_dir, split) -> None:
    n = {"train": 200, "valid": 60, "test": 60}[split]
    write_csv(data_dir / f"{split}.csv", ["1" + r[1:] for r in tiny_rows(n, 9)], HEADER)
    line = _error_line(*_train(capsys, tmp_path, data_dir))
    assert f"{split}.csv" in line and f"every label in the {split} split is 1" in line, line
    assert "epoch" not in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_one_class_valid_split_is_fine_when_no_metric_needs_both(capsys, tmp_path, data_dir, cache_dir) -> None:
    write_csv(data_dir / "valid.csv", ["0" + r[1:] for r in tiny_rows(60, 9)], HEADER)
    code, err = _train(capsys, tmp_path, data_dir, "train.metrics=[logloss]", "train.early_stopping.monitor=logloss")
    assert code == 0, err
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())  # strict JSON: no NaN anywhere
    assert metrics["valid"]["logloss"] > 0


def test_gauc_without_any_mixed_group_is_refused(capsys, tmp_path, data_dir, cache_dir) -> None:
    # Group by the label itself: every group holds one class, so gAUC is undefined on every split.
    dataset = {"train": "train.csv", "valid": "valid.csv", "test": "test.csv", "data_dir": str(data_dir),
               "label": "label", "group_by": "t"}
    line = _error_line(*_train(capsys, tmp_path, data_dir, "train.metrics=[gauc,logloss]",
                               "train.early_stopping.monitor=gauc", dataset=dataset))
    assert "no group of dataset.group_by holds both labels in the valid split" in line, line


def test_the_predictor_never_returns_a_non_finite_score(tmp_path, data_dir, cache_dir) -> None:
    from rich.console import Console

    from ctrlab.config.loader import validate_recipe
    from ctrlab.serve import Predictor
    from ctrlab.train.run import train_recipe

    recipe = validate_recipe(tiny_recipe(tmp_path, data_dir, tracking={"enabled": False}))
    run = train_recipe(recipe, console=Console(quiet=True)).output_dir
    predictor = Predictor.from_run(run)
    rows = pl.read_csv(data_dir / "test.csv", infer_schema=False).head(5)
    assert np.isfinite(predictor.predict(rows)).all()
    with pytest.raises(DataError, match=r"request: column 'x' row 2: value 'inf' is not a finite number"):
        predictor.predict(rows.with_columns(pl.Series("x", ["1", "inf", "2", "3", "4"])))
    with pytest.raises(DataError, match=r"column 'x' row 1: value .* is not a finite number"):
        predictor.predict(pl.DataFrame({"a": ["a1"], "b": ["b1"], "x": [float("-inf")]}))

    original = predictor.model.forward

    def overflowing(batch: Any) -> torch.Tensor:
        logits = original(batch)
        return torch.where(torch.arange(len(logits)) == 3, torch.tensor(float("nan")), logits)

    predictor.model.forward = overflowing  # type: ignore[method-assign]
    with pytest.raises(DataError, match=r"request: row 4: the model's score is not a finite number"):
        predictor.predict(rows)


def test_a_column_named_like_ctrlabs_row_numbers_is_refused(capsys, tmp_path, data_dir, cache_dir) -> None:
    write_csv(data_dir / "all.csv", tiny_rows(300, 4), "label,a,b,x,__ctrlab_source_row")
    dataset = {"path": "all.csv", "data_dir": str(data_dir), "label": "label", "split": {"kind": "random"}}
    line = _error_line(*_train(capsys, tmp_path, data_dir, dataset=dataset))
    assert "all.csv" in line and "'__ctrlab_source_row' is reserved" in line, line


@pytest.mark.parametrize("column, value, kind", [("a", [1, 2], "categorical"), ("x", {"q": 1.0}, "numeric")])
def test_nested_values_in_a_scalar_feature_are_named(capsys, tmp_path, data_dir, cache_dir, column, value,
                                                     kind) -> None:
    frame = pl.read_csv(data_dir / "all.csv", infer_schema=False)
    frame = frame.with_columns(pl.Series(column, [value] * frame.height))
    frame.write_parquet(data_dir / "nested.parquet")
    dataset = {"path": "nested.parquet", "data_dir": str(data_dir), "label": "label", "split": {"kind": "random"}}
    line = _error_line(*_train(capsys, tmp_path, data_dir, dataset=dataset))
    assert f"column '{column}' named in features.{kind} holds" in line and "one value per row" in line, line


def test_time_and_duration_columns_that_cannot_be_read_are_named(capsys, tmp_path, data_dir, cache_dir) -> None:
    import datetime

    frame = pl.read_csv(data_dir / "all.csv", infer_schema=False)
    frame = frame.with_columns(pl.Series("a", [datetime.timedelta(seconds=i % 4) for i in range(frame.height)]))
    frame.write_parquet(data_dir / "durations.parquet")
    dataset = {"path": "durations.parquet", "data_dir": str(data_dir), "label": "label", "split": {"kind": "random"}}
    line = _error_line(*_train(capsys, tmp_path, data_dir, dataset=dataset))
    assert "column 'a' named in features.categorical holds Duration" in line, line
    dataset = {"path": "all.csv", "data_dir": str(data_dir), "label": "label",
               "split": {"kind": "time", "time_column": "a"}}
    line = _error_line(*_train(capsys, tmp_path, data_dir, dataset=dataset))
    assert "time column 'a' holds text that is neither numbers nor dates" in line, line


def test_a_huge_but_finite_number_that_makes_the_loss_nan_is_named(capsys, tmp_path, data_dir, cache_dir) -> None:
    """3e38 fits float32, so it passes the input checks; the NaN loss it causes names the column instead of only
    advising a lower learning rate."""
    rows = tiny_rows(200, 1)
    rows = [",".join([*r.split(",")[:3], "3e38", r.split(",")[4]]) for r in rows]
    write_csv(data_dir / "train.csv", rows)
    features = {"categorical": ["a", "b"], "numeric": [{"name": "x", "transform": "none"}]}
    code, err = _train(capsys, tmp_path, data_dir, features=features)
    line = [line for line in err.splitlines() if line.strip()][-1]
    assert code == 2 and "Traceback" not in err and line.startswith("error: training loss became"), err
    assert "numeric column 'x' reaches 3e+38 after transform 'none'" in line and "transform: log" in line, line
    assert not (tmp_path / "out").exists()
