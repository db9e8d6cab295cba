"""Bad inputs: every user mistake ends in ONE line naming what to fix, exit status 2, no traceback, and nothing
half-written (no output directory, no partial cache entry).

Most cases run ``ctrlab.cli.main`` in-process; a few go through a real ``python -m ctrlab`` process to check the real
exit status and stderr. All data is tiny and made up in ``tmp_path``; no case trains for more than one small epoch.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from ctrlab.blocks import BLOCKS
from ctrlab.cli import main
from tiny import HEADER, one_line_error, write_tiny_splits
from tiny import tiny_recipe as _recipe
from tiny import tiny_rows as _rows
from tiny import write_csv as _write_csv

ANSI = re.compile(r"\x1b\[[0-9;]*m")
LEFTOVER_SUFFIXES = (".partial", ".tmp", ".old")


# ---------------------------------------------------------------------------------------------------- helpers
@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    """train/valid/test CSVs (label, categorical a, b, numeric x, time t) plus all.csv for a single-file split."""
    return write_tiny_splits(tmp_path / "data")


def _write_recipe(tmp_path: Path, recipe: dict[str, Any], name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, ANSI.sub("", captured.out), ANSI.sub("", captured.err)


_one_line_error = one_line_error


def _nothing_half_written(output_dir: Path, cache: Path) -> None:
    assert not output_dir.exists(), f"{output_dir} exists after a failed run"
    if output_dir.parent.exists():
        leftovers = [p.name for p in output_dir.parent.iterdir()
                     if p.name.startswith(f".{output_dir.name}.") or p.name.endswith(LEFTOVER_SUFFIXES)]
        assert not leftovers, f"half-written output left beside {output_dir}: {leftovers}"
    if cache.exists():
        partial = [str(p) for p in cache.rglob("*") if p.name.endswith(LEFTOVER_SUFFIXES)]
        assert not partial, f"partial cache entries: {partial}"
        for entry in (p for p in cache.iterdir() if p.is_dir()):
            assert (entry / "manifest.json").exists(), f"cache entry {entry} is incomplete"


def _train_fails(capsys: pytest.CaptureFixture[str], tmp_path: Path, cache: Path, recipe: dict[str, Any] | Path,
                 *needles: str, overrides: tuple[str, ...] = (), progress_before: bool = False) -> str:
    path = recipe if isinstance(recipe, Path) else _write_recipe(tmp_path, recipe)
    code, out, err = _cli(capsys, "train", path, *overrides)
    line = _one_line_error(code, err, *needles, progress_before=progress_before)
    assert out == "", out
    output_dir = Path(recipe["output_dir"]) if isinstance(recipe, dict) else tmp_path / "out"
    _nothing_half_written(output_dir, cache)
    return line


# ------------------------------------------------------------------------------------------------ recipe keys
def test_unknown_nested_key_names_full_path_and_closest_key(capsys, tmp_path, data_dir, cache_dir) -> None:
    recipe = _recipe(tmp_path, data_dir, model={"block": "deepfm", "mlp": {"hiden": [8]}})
    line = _train_fails(capsys, tmp_path, cache_dir, recipe, "'model.mlp.hiden'", "'model.mlp.hidden'",
                        str(tmp_path / "recipe.yaml"))
    assert "did you mean" in line


@pytest.mark.parametrize("block", ["deepfm", "mlp"])
def test_unknown_key_inside_any_block_is_caught(capsys, tmp_path, data_dir, block) -> None:
    path = _write_recipe(tmp_path, _recipe(tmp_path, data_dir, model={"block": block, "mlp": {"hidden": [8],
                                                                                             "dropuot": 0.1}}))
    code, _, err = _cli(capsys, "validate", path)
    _one_line_error(code, err, "'model.mlp.dropuot'", "'model.mlp.dropout'")


def test_unknown_key_in_a_list_item_names_its_index(capsys, tmp_path, data_dir, cache_dir) -> None:
    recipe = _recipe(tmp_path, data_dir, features={"categorical": ["a"],
                                                   "numeric": [{"name": "x", "transfrom": "log"}]})
    _train_fails(capsys, tmp_path, cache_dir, recipe, "features.numeric[0].transfrom",
                 "features.numeric[0].transform")


def test_unknown_key_as_override(capsys, tmp_path, data_dir, cache_dir) -> None:
    _train_fails(capsys, tmp_path, cache_dir, _recipe(tmp_path, data_dir), "'train.batchsize'",
                 "'train.batch_size'", overrides=("train.batchsize=4",))


def test_unknown_top_level_section(capsys, tmp_path, data_dir, cache_dir) -> None:
    recipe = _recipe(tmp_path, data_dir)
    recipe["trian"] = {"epochs": 1}
    _train_fails(capsys, tmp_path, cache_dir, recipe, "'trian'", "'train'")
    code, _, err = _cli(capsys, "validate", _write_recipe(tmp_path, _recipe(tmp_path, data_dir)), "zzz.q=1")
    _one_line_error(code, err, "unknown key 'zzz'")


# ------------------------------------------------------------------------------------------------ wrong types
@pytest.mark.parametrize(("section", "value", "needles"), [
    ("train", {"epochs": 1, "batch_size": "abc"}, ("train.batch_size", "'abc'")),
    ("model", {"block": "deepfm", "mlp": {"hidden": ["a"]}}, ("model.mlp.hidden", "'a'")),
    ("embedding", {"dim": 2.5}, ("embedding.dim", "2.5")),
])
def test_wrong_type_names_key_and_bad_value(capsys, tmp_path, data_dir, cache_dir, section, value, needles) -> None:
    recipe = _recipe(tmp_path, data_dir, **{section: value})
    _train_fails(capsys, tmp_path, cache_dir, recipe, *needles)


def test_wrong_type_from_override(capsys, tmp_path, data_dir, cache_dir) -> None:
    _train_fails(capsys, tmp_path, cache_dir, _recipe(tmp_path, data_dir), "train.epochs", "'many'",
                 overrides=("train.epochs=many",))


# ------------------------------------------------------------------------------------------------ data files
def test_missing_data_file_names_the_path(capsys, tmp_path, data_dir, cache_dir) -> None:
    recipe = _recipe(tmp_path, data_dir)
    recipe["dataset"]["valid"] = "no_such_valid.csv"
    _train_fails(capsys, tmp_path, cache_dir, recipe, str(data_dir / "no_such_valid.csv"), "not found")


@pytest.mark.parametrize("split", ["train", "valid"])
def test_column_absent_from_file_names_column_and_file(capsys, tmp_path, data_dir, cache_dir, split) -> None:
    # 'b' is dropped from one file only: the message must name that file, not another.
    _write_csv(data_dir / "no_b.csv", [",".join(r.split(",")[:2] + r.split(",")[3:]) for r in _rows(20, 9)],
               header="label,a,x,t")
    recipe = _recipe(tmp_path, data_dir)
    recipe["dataset"][split] = "no_b.csv"
    _train_fails(capsys, tmp_path, cache_dir, recipe, "'b'", str(data_dir / "no_b.csv"))


def test_recipe_column_missing_everywhere(capsys, tmp_path, data_dir, cache_dir) -> None:
    recipe = _recipe(tmp_path, data_dir, features={"categorical": ["a", "nope_col"]})
    _train_fails(capsys, tmp_path, cache_dir, recipe, "'nope_col'", str(data_dir / "train.csv"))


def test_label_column_absent(capsys, tmp_path, data_dir, cache_dir) -> None:
    recipe = _recipe(tmp_path, data_dir)
    recipe["dataset"]["label"] = "clicked"
    _train_fails(capsys, tmp_path, cache_dir, recipe, "'clicked'", str(data_dir / "train.csv"))


@pytest.mark.parametrize(("split", "row"), [("train", 1), ("valid", 7), ("test", 60)])
def test_non_numeric_value_names_column_file_and_row(capsys, tmp_path, data_dir, cache_dir, split, row) -> None:
    rows = _rows(60, 5)
    fields = rows[row - 1].split(",")
    fields[3] = "abc"
    rows[row - 1] = ",".join(fields)
    _write_csv(data_dir / "bad_x.csv", rows)
    recipe = _recipe(tmp_path, data_dir)
    recipe["dataset"][split] = "bad_x.csv"
    line = _train_fails(capsys, tmp_path, cache_dir, recipe, "'x'", str(data_dir / "bad_x.csv"), f"row {row}:",
                        "'abc'")
    assert f"row {row}:" in line and f"row {row + 1}" not in line


@pytest.mark.parametrize("split", [{"kind": "random"}, {"kind": "time", "time_column": "t"}])
def test_row_of_a_single_file_split_is_the_files_row(capsys, tmp_path, data_dir, cache_dir, split) -> None:
    # One file split into train/valid/test: the row named is the row in the file, not the row in the split.
    rows = _rows(300, 6)
    rows = [",".join(r.split(",")[:4] + [str(300 - i)]) for i, r in enumerate(rows)]  # time runs backwards
    for bad in (150, 240):
        fields = rows[bad - 1].split(",")
        fields[0] = "7"
        rows[bad - 1] = ",".join(fields)
    _write_csv(data_dir / "one.csv", rows)
    recipe = _recipe(tmp_path, data_dir)
    recipe["dataset"] = {"path": "one.csv", "data_dir": str(data_dir), "split": split}
    line = _train_fails(capsys, tmp_path, cache_dir, recipe, "'label'", str(data_dir / "one.csv"), "'7'")
    row = int(re.search(r"row (\d+):", line).group(1))  # type: ignore[union-attr]
    assert row in (150, 240), line


@pytest.mark.parametrize("content", ["", HEADER + "\n", HEADER], ids=["zero_bytes", "header_only", "header_no_newline"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_empty_or_header_only_file_names_the_file(capsys, tmp_path, data_dir, cache_dir, content, split) -> None:
    (data_dir / "empty.csv").write_text(content, encoding="utf-8")
    recipe = _recipe(tmp_path, data_dir)
    recipe["dataset"][split] = "empty.csv"
    line = _train_fails(capsys, tmp_path, cache_dir, recipe, str(data_dir / "empty.csv"))
    assert "empty" in line or "no data rows" in line


@pytest.mark.parametrize(("value", "split", "row"), [
    ("2", "train", 3), ("-1", "valid", 1), ("yes", "test", 12), ("0.5", "train", 40), ("", "valid", 5),
])
def test_label_outside_0_1_names_column_file_and_row(capsys, tmp_path, data_dir, cache_dir, value, split,
                                                     row) -> None:
    rows = _rows(40, 8)
    fields = rows[row - 1].split(",")
    fields[0] = value
    rows[row - 1] = ",".join(fields)
    _write_csv(data_dir / "bad_label.csv", rows)
    recipe = _recipe(tmp_path, data_dir)
    recipe["dataset"][split] = "bad_label.csv"
    line = _train_fails(capsys, tmp_path, cache_dir, recipe, "'label'", str(data_dir / "bad_label.csv"),
                        f"row {row}:")
    if value:
        assert repr(value) in line


def test_message_is_printed_literally_not_as_rich_markup(capsys, tmp_path, data_dir, cache_dir) -> None:
    # Values and paths are data: "[no]" must reach the user, not be swallowed as a rich markup tag.
    rows = _rows(10, 3)
    rows[1] = "[no]" + rows[1][1:]
    _write_csv(data_dir / "markup.csv", rows)
    recipe = _recipe(tmp_path, data_dir)
    recipe["dataset"]["test"] = "markup.csv"
    _train_fails(capsys, tmp_path, cache_dir, recipe, "'[no]'", "row 2:")


# ------------------------------------------------------------------------------------ recipe files and names
def test_invalid_yaml_names_file_and_line(capsys, tmp_path, cache_dir) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: t\nmodel: {block: deepfm\ntrain: {epochs: 1}\n", encoding="utf-8")
    for command in ("train", "validate"):
        code, out, err = _cli(capsys, command, path)
        _one_line_error(code, err, str(path), "invalid YAML", "line ")
        assert out == ""
    assert not (tmp_path / "runs").exists()


def test_missing_recipe_file_names_the_path(capsys, tmp_path) -> None:
    path = tmp_path / "nowhere" / "recipe.yaml"
    code, _, err = _cli(capsys, "train", path)
    _one_line_error(code, err, str(path), "not found")


def test_recipe_path_that_is_a_directory(capsys, tmp_path) -> None:
    code, _, err = _cli(capsys, "validate", tmp_path)
    _one_line_error(code, err, str(tmp_path), "directory")


def test_recipe_that_is_not_a_mapping(capsys, tmp_path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n", encoding="utf-8")
    code, _, err = _cli(capsys, "validate", path)
    _one_line_error(code, err, str(path), "mapping")


def test_unknown_block_lists_valid_names(capsys, tmp_path, data_dir, cache_dir) -> None:
    line = _train_fails(capsys, tmp_path, cache_dir, _recipe(tmp_path, data_dir), "model.block", "'nope'",
                        overrides=("model.block=nope",))
    for name in BLOCKS.names():
        assert name in line


def test_missing_block_name_names_the_key(capsys, tmp_path, data_dir) -> None:
    path = _write_recipe(tmp_path, _recipe(tmp_path, data_dir, model={"mlp": {"hidden": [8]}}))
    code, _, err = _cli(capsys, "validate", path)
    _one_line_error(code, err, "model.block", "missing")


def test_nonexistent_dataset_card(capsys, tmp_path, data_dir, cache_dir) -> None:
    recipe = _recipe(tmp_path, data_dir)
    recipe["dataset"] = {"card": "frappe_x9"}
    line = _train_fails(capsys, tmp_path, cache_dir, _write_recipe(tmp_path, recipe), "'frappe_x9'", "frappe_x1",
                        overrides=("--data-dir", str(data_dir)))
    assert "did you mean" in line


def test_unset_environment_variable_names_the_key(capsys, tmp_path, data_dir, cache_dir, monkeypatch) -> None:
    monkeypatch.delenv("CTRLAB_TEST_UNSET_VAR", raising=False)
    recipe = _recipe(tmp_path, data_dir)
    recipe["train"]["batch_size"] = "${env:CTRLAB_TEST_UNSET_VAR}"
    _train_fails(capsys, tmp_path, cache_dir, recipe, "train.batch_size", "CTRLAB_TEST_UNSET_VAR")


def test_failure_inside_the_run_leaves_no_partial_output(capsys, tmp_path, data_dir, cache_dir,
                                                         monkeypatch) -> None:
    # An error raised while the output directory is being built: its temporary directory must be removed,
    # and the cache entry written before it must be complete.
    from ctrlab.errors import DataError
    from ctrlab.train import run

    def boom(*args: object, **kwargs: object) -> None:
        raise DataError("simulated failure during fit")

    monkeypatch.setattr(run.Trainer, "fit", boom)
    _train_fails(capsys, tmp_path, cache_dir, _recipe(tmp_path, data_dir), "simulated failure during fit",
                 progress_before=True)
    assert any(cache_dir.iterdir()), "the encoded splits should have been cached before the failure"


# ------------------------------------------------------------------------------------------ real processes
def _subprocess(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, NO_COLOR="1", COLUMNS="60")  # a narrow console must not wrap the one line
    return subprocess.run([sys.executable, "-m", "ctrlab", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120)


def test_subprocess_bad_label_exit_status_and_clean_stderr(tmp_path, data_dir, cache_dir) -> None:
    rows = _rows(30, 11)
    rows[9] = "yes" + rows[9][1:]
    _write_csv(data_dir / "deep" / "directory" / "with_a_long_name" / "bad_label.csv", rows)
    recipe = _recipe(tmp_path, data_dir)
    recipe["dataset"]["valid"] = "deep/directory/with_a_long_name/bad_label.csv"
    path = _write_recipe(tmp_path, recipe)
    done = _subprocess("train", path)
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    _one_line_error(done.returncode, done.stderr, "'label'", "row 10:", "'yes'",
                    str(data_dir / "deep" / "directory" / "with_a_long_name" / "bad_label.csv"))
    _nothing_half_written(tmp_path / "out", cache_dir)


def test_subprocess_unknown_key_override(tmp_path, data_dir, cache_dir) -> None:
    path = _write_recipe(tmp_path, _recipe(tmp_path, data_dir))
    done = _subprocess("train", path, "model.mlp.hiden=[4]")
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    _one_line_error(done.returncode, done.stderr, "'model.mlp.hiden'", "'model.mlp.hidden'", str(path))
    _nothing_half_written(tmp_path / "out", cache_dir)
