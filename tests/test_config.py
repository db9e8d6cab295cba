"""Recipe loading: dotted overrides, ``${...}`` interpolation, ``ctrlab validate`` and the resolved recipe a run
writes, and ``flatten``. Data is tiny and made up in ``tmp_path``; the one training run is a single small epoch."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from ctrlab.cli import main
from ctrlab.config.loader import flatten, interpolate, load_recipe, recipe_to_dict
from ctrlab.errors import RecipeError
from tiny import tiny_recipe, write_tiny_splits

ANSI = re.compile(r"\x1b\[[0-9;]*m")


# ---------------------------------------------------------------------------------------------------- helpers
@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    return write_tiny_splits(tmp_path / "data")


def _write(tmp_path: Path, recipe: dict[str, Any] | str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    text = recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture()
def recipe_path(tmp_path: Path, data_dir: Path) -> Path:
    return _write(tmp_path, tiny_recipe(tmp_path, data_dir))


def _cli(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, ANSI.sub("", captured.out), ANSI.sub("", captured.err)


# -------------------------------------------------------------------------------------------------- overrides
def test_dotted_overrides_reach_nested_fields_with_their_types(recipe_path: Path) -> None:
    recipe = load_recipe(recipe_path, [
        "model.mlp.hidden=[8,4]", "train.optimizer.lr=0.01", "train.progress=true", "embedding.dim=6",
        "train.early_stopping.patience=5", "model.mlp.dropout=0.25", "model.mlp.batch_norm=false",
        "train.lr_on_plateau=null", "name=other_name",
    ])
    assert recipe.model.mlp.hidden == [8, 4]
    assert recipe.train.optimizer.lr == pytest.approx(0.01) and isinstance(recipe.train.optimizer.lr, float)
    assert recipe.train.progress is True
    assert recipe.embedding.dim == 6
    assert recipe.train.early_stopping.patience == 5
    assert recipe.model.mlp.dropout == pytest.approx(0.25)
    assert recipe.model.mlp.batch_norm is False
    assert recipe.train.lr_on_plateau is None
    assert recipe.name == "other_name"
    # Untouched keys keep the file's values.
    assert recipe.train.batch_size == 256 and recipe.train.epochs == 1


def test_override_of_a_list_item_by_index(recipe_path: Path) -> None:
    recipe = load_recipe(recipe_path, ["features.numeric.0.transform=standardize", "features.numeric.0.fill=1.5",
                                       "features.categorical.1={name: b, min_count: 3}"])
    assert recipe.features.numeric[0].transform == "standardize"
    assert recipe.features.numeric[0].fill == pytest.approx(1.5)
    assert recipe.features.categorical[1].min_count == 3


def test_later_override_wins_and_whole_section_overrides_compose(recipe_path: Path) -> None:
    recipe = load_recipe(recipe_path, ["train.epochs=3", "train.epochs=5"])
    assert recipe.train.epochs == 5
    # A whole section, then a dotted key into that new section.
    recipe = load_recipe(recipe_path, ["model={block: mlp, mlp: {hidden: [4]}}", "model.mlp.hidden=[6,2]"])
    assert recipe.model.block == "mlp"
    assert recipe.model.mlp.hidden == [6, 2]


def test_override_into_a_section_the_file_leaves_out(tmp_path: Path, data_dir: Path) -> None:
    data = tiny_recipe(tmp_path, data_dir)
    del data["train"]
    recipe = load_recipe(_write(tmp_path, data), ["train.epochs=2", "train.optimizer.name=adagrad"])
    assert recipe.train.epochs == 2
    assert recipe.train.optimizer.name == "adagrad"
    assert recipe.train.batch_size == 4096  # the rest of the section keeps its defaults


def test_override_is_seen_by_interpolation_elsewhere(tmp_path: Path, data_dir: Path) -> None:
    # Overrides are applied before interpolation, so a key that refers to an overridden one sees the new value,
    # whichever section comes first in the file.
    data = tiny_recipe(tmp_path, data_dir)
    data["output_dir"] = str(tmp_path / "runs" / "${name}-${train.batch_size}")
    recipe = load_recipe(_write(tmp_path, data), ["name=renamed", "train.batch_size=64"])
    assert recipe.output_dir == str(tmp_path / "runs" / "renamed-64")


def test_override_without_equals_is_an_error(recipe_path: Path) -> None:
    with pytest.raises(RecipeError, match="train.epochs"):
        load_recipe(recipe_path, ["train.epochs"])


# ---------------------------------------------------------------------------------------------- interpolation
def test_interpolation_of_names_and_whole_string_references_keep_their_type() -> None:
    data = {"seed": 7, "rate": 0.5, "flag": True, "name": "n", "a": "${seed}", "b": "x${seed}", "c": "${rate}",
            "d": "${flag}", "e": "${name}/${seed}", "nested": {"f": "${nested.g}", "g": 3}}
    out = interpolate(data)
    assert out["a"] == 7 and isinstance(out["a"], int)
    assert out["b"] == "x7"
    assert out["c"] == 0.5 and isinstance(out["c"], float)
    assert out["d"] is True
    assert out["e"] == "n/7"
    assert out["nested"]["f"] == 3


def test_whole_string_reference_in_a_recipe(tmp_path: Path, data_dir: Path) -> None:
    data = tiny_recipe(tmp_path, data_dir)
    data["seed"] = 11
    data["dataset"] = {"path": "train.csv", "data_dir": str(data_dir), "split": {"kind": "random", "seed": "${seed}"}}
    data["output_dir"] = str(tmp_path / "runs" / "${name}")
    recipe = load_recipe(_write(tmp_path, data))
    assert recipe.dataset.split.seed == 11 and isinstance(recipe.dataset.split.seed, int)
    assert recipe.output_dir == str(tmp_path / "runs" / "t")


def test_default_output_dir_is_interpolated(tmp_path: Path, data_dir: Path) -> None:
    # The schema's default is "runs/${name}": a recipe without output_dir must not get a literal "${name}".
    data = tiny_recipe(tmp_path, data_dir)
    del data["output_dir"]
    data["name"] = "my_run"
    recipe = load_recipe(_write(tmp_path, data))
    assert recipe.output_dir == "runs/my_run"
    assert load_recipe(_write(tmp_path, data), ["name=x2"]).output_dir == "runs/x2"


def test_environment_variables(tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CTRLAB_TEST_DIM", "6")
    monkeypatch.setenv("CTRLAB_TEST_OUT", str(tmp_path / "env_out"))
    monkeypatch.delenv("CTRLAB_TEST_UNSET", raising=False)
    data = tiny_recipe(tmp_path, data_dir)
    data["embedding"]["dim"] = "${env:CTRLAB_TEST_DIM}"
    data["output_dir"] = "${env:CTRLAB_TEST_OUT}/${name}"
    data["train"]["batch_size"] = "${env:CTRLAB_TEST_UNSET,128}"
    data["train"]["epochs"] = "${env:CTRLAB_TEST_DIM, 9}"  # set: the variable wins over the default
    recipe = load_recipe(_write(tmp_path, data))
    assert recipe.embedding.dim == 6
    assert recipe.output_dir == str(tmp_path / "env_out" / "t")
    assert recipe.train.batch_size == 128
    assert recipe.train.epochs == 6


def test_unset_environment_variable_without_default_names_the_key(
        capsys, tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CTRLAB_TEST_UNSET", raising=False)
    data = tiny_recipe(tmp_path, data_dir)
    data["model"]["mlp"]["dropout"] = "${env:CTRLAB_TEST_UNSET}"
    path = _write(tmp_path, data)
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    assert "model.mlp.dropout" in caught.value.message and "CTRLAB_TEST_UNSET" in caught.value.message
    code, out, err = _cli(capsys, "validate", path)
    assert code == 2 and out == ""
    assert "model.mlp.dropout" in err and "Traceback" not in err
    # An override can supply it instead.
    assert load_recipe(path, ["model.mlp.dropout=0.1"]).model.mlp.dropout == pytest.approx(0.1)


def test_reference_to_a_missing_key_names_both(recipe_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"output_dir.*\$\{nope\.key\}"):
        load_recipe(recipe_path, ["output_dir=/tmp/${nope.key}"])


# --------------------------------------------------------------------------------------------------- validate
def test_validate_prints_the_resolved_recipe_with_defaults(capsys, tmp_path: Path, data_dir: Path) -> None:
    path = _write(tmp_path, tiny_recipe(tmp_path, data_dir))
    long_dir = str(tmp_path / ("a_rather_long_directory_name_" * 4) / "out")  # longer than any console width
    code, out, err = _cli(capsys, "validate", path, "model.mlp.hidden=[8,4]", f"output_dir={long_dir}")
    assert code == 0, err
    assert "valid" in err
    printed = yaml.safe_load(out)
    assert printed["model"]["mlp"]["hidden"] == [8, 4]
    assert printed["output_dir"] == long_dir
    # Defaults the file never wrote are filled in.
    assert printed["seed"] == 2021
    assert printed["train"]["optimizer"] == {"name": "adam", "lr": 1e-3, "embedding_weight_decay": 0.0,
                                             "dense_weight_decay": 0.0, "embedding_regularizer": "weight_decay",
                                             "betas": [0.9, 0.999], "eps": 1e-8}
    assert printed["train"]["early_stopping"]["patience"] == 2
    assert printed["features"]["numeric"][0]["fill"] == "mean"
    assert printed["embedding"]["kind"] == "per_field"
    assert printed == recipe_to_dict(load_recipe(path, ["model.mlp.hidden=[8,4]", f"output_dir={long_dir}"]))

    # The printed recipe is itself a valid recipe that resolves to the same thing.
    again = _write(tmp_path, out, "printed.yaml")
    code, out2, err = _cli(capsys, "validate", again)
    assert code == 0, err
    assert yaml.safe_load(out2) == printed


def test_recipe_written_by_a_run_is_accepted_by_validate(capsys, tmp_path: Path, data_dir: Path,
                                                         cache_dir: Path) -> None:
    data = tiny_recipe(tmp_path, data_dir)
    data["output_dir"] = str(tmp_path / "runs" / "${name}")
    path = _write(tmp_path, data)
    code, out, err = _cli(capsys, "train", path, "model.mlp.hidden=[8,4]", "train.batch_size=128")
    assert code == 0, err
    output_dir = tmp_path / "runs" / "t"
    assert (output_dir / "recipe.yaml").exists()
    written = yaml.safe_load((output_dir / "recipe.yaml").read_text(encoding="utf-8"))
    assert written["output_dir"] == str(output_dir)
    assert written["model"]["mlp"]["hidden"] == [8, 4] and written["train"]["batch_size"] == 128

    code, out, err = _cli(capsys, "validate", output_dir / "recipe.yaml")
    assert code == 0, err
    assert yaml.safe_load(out) == written


# ---------------------------------------------------------------------------------------------------- flatten
def test_flatten_gives_dotted_keys(recipe_path: Path) -> None:
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {"a.b": 1, "a.c.d": [1, 2], "e": None}
    assert flatten({}) == {}
    flat = flatten(recipe_to_dict(load_recipe(recipe_path)))
    assert flat["model.mlp.hidden"] == [8]
    assert flat["train.optimizer.lr"] == pytest.approx(1e-3)
    assert flat["dataset.train"] == "train.csv"
    assert flat["name"] == "t"
    assert all(not isinstance(v, dict) for v in flat.values())
