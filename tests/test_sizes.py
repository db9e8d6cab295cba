"""Sizes are validated before anything is allocated, and recipe expansion is bounded.

Absurd sizes are refused by the schema (every size-like integer has a lower and an upper bound, every float must be
finite), products of in-bound sizes by the footprint estimate (:mod:`ctrlab.train.footprint`), and hostile documents
(``${...}`` fan-out, YAML alias bombs, deep nesting, huge files) by the loader's bounds. Each ends in one
``error: ...`` line and exit status 2, quickly, with no output directory.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from ctrlab.blocks import BLOCKS
from ctrlab.cli import main
from ctrlab.config.loader import MAX_RECIPE_BYTES, load_recipe, validate_recipe
from ctrlab.config.schema import Recipe
from ctrlab.data.layout import FeatureLayout
from ctrlab.datasets.synthetic import SyntheticConfig
from ctrlab.embeddings import EMBEDDINGS
from ctrlab.errors import RecipeError
from ctrlab.train.footprint import LIMIT_ENV, MemoryLimit, check_model_footprint, estimate_model
from tiny import one_line_error, tiny_recipe, write_tiny_splits

REPO = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[[0-9;]*m")
QUICK_SECONDS = 10.0  # generous for a 2-core CI machine; the failures themselves take well under a second


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    return write_tiny_splits(tmp_path / "data")


def _recipe(tmp_path: Path, data_dir: Path, **sections: Any) -> dict[str, Any]:
    return tiny_recipe(tmp_path, data_dir, tracking={"enabled": False}, **sections)


def _synthetic_recipe(tmp_path: Path, rows: int = 500) -> dict[str, Any]:
    return {
        "name": "s", "output_dir": str(tmp_path / "out"),
        "dataset": {"synthetic": {"rows": rows, "numeric_fields": 1, "categorical_fields": 2,
                                  "cardinalities": [5, 7], "informative_fields": 1, "interaction_pairs": 0,
                                  "numeric_informative": 1}, "split": {"kind": "random"}},
        "features": {"categorical": ["C1", "C2"], "numeric": ["I1"]},
        "model": {"block": "fm"}, "embedding": {"dim": 4},
        "train": {"epochs": 1, "batch_size": 256, "progress": False, "device": "cpu"},
        "tracking": {"enabled": False},
    }


def _write(tmp_path: Path, recipe: dict[str, Any] | str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    text = recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False)
    path.write_text(text, encoding="utf-8")
    return path


def _cli(capsys: pytest.CaptureFixture[str], *args: Any) -> tuple[int, str, str, float]:
    started = time.perf_counter()
    code = main([str(a) for a in args])
    elapsed = time.perf_counter() - started
    captured = capsys.readouterr()
    return code, ANSI.sub("", captured.out), ANSI.sub("", captured.err), elapsed


_one_line_error = one_line_error


def _refused_quickly(capsys: pytest.CaptureFixture[str], tmp_path: Path, args: list[Any], *needles: str,
                     progress_before: bool = False) -> str:
    code, out, err, elapsed = _cli(capsys, *args)
    line = _one_line_error(code, err, *needles, progress_before=progress_before)
    assert elapsed < QUICK_SECONDS, f"took {elapsed:.1f}s: {line}"
    assert not (tmp_path / "out").exists(), "a refused run created its output directory"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert not leftovers, leftovers
    return line


# --------------------------------------------------------------------------------------- the schema's bounds
def _leaf_types(annotation: Any) -> list[tuple[Any, list[Any]]]:
    """(type, constraints) of every leaf of an annotation: Optional, unions, lists and tuples looked through."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        inner, *meta = typing.get_args(annotation)
        constraints = [m for info in meta for m in getattr(info, "metadata", [info])]
        return [(t, c + constraints) for t, c in _leaf_types(inner)]
    if origin is typing.Literal:
        return []
    if origin in (typing.Union, types.UnionType, list, tuple, dict):
        return [leaf for arg in typing.get_args(annotation) if arg is not Ellipsis for leaf in _leaf_types(arg)]
    return [(annotation, [])]


def _models() -> list[type[BaseModel]]:
    """Every model reachable from the recipe, every registered block and embedding config included."""
    found: list[type[BaseModel]] = []
    todo: list[Any] = [Recipe, SyntheticConfig, *BLOCKS.configs(), *EMBEDDINGS.configs()]
    while todo:
        model = todo.pop()
        if model in found:
            continue
        found.append(model)
        for info in model.model_fields.values():
            for leaf, _ in _leaf_types(info.annotation):
                if isinstance(leaf, type) and issubclass(leaf, BaseModel):
                    todo.append(leaf)
    return found


def test_every_integer_of_every_section_is_bounded_on_both_sides() -> None:
    unbounded = []
    for model in _models():
        for name, info in model.model_fields.items():
            for leaf, constraints in _leaf_types(info.annotation):
                if leaf is not int:
                    continue
                everything = constraints + list(info.metadata)
                has_low = any(hasattr(c, "ge") or hasattr(c, "gt") for c in everything)
                has_high = any(hasattr(c, "le") or hasattr(c, "lt") for c in everything)
                if not (has_low and has_high):
                    unbounded.append(f"{model.__name__}.{name}")
    assert not unbounded, f"integer fields without a lower and an upper bound: {unbounded}"


def test_every_section_refuses_non_finite_floats() -> None:
    for model in _models():
        assert model.model_config.get("allow_inf_nan") is False, f"{model.__name__} accepts inf / nan"


@pytest.mark.parametrize("override", ["train.optimizer.lr=.inf", "train.optimizer.lr=.nan", "train.optimizer.lr=1e400",
                                      "model.mlp.dropout=-.inf", "features.numeric.0.fill=.nan"])
def test_non_finite_floats_are_refused(capsys, tmp_path, data_dir, override) -> None:
    key = override.split("=")[0].replace(".0.", "[0].")
    _refused_quickly(capsys, tmp_path, ["validate", _write(tmp_path, _recipe(tmp_path, data_dir)), override], key)


# ------------------------------------------------------------------------------ the three reported examples
def test_huge_embedding_dim_is_refused_before_data(capsys, tmp_path, data_dir, cache_dir) -> None:
    path = _write(tmp_path, _recipe(tmp_path, data_dir))
    line = _refused_quickly(capsys, tmp_path, ["train", path, "embedding.dim=10000000"], "embedding.dim", "8192")
    assert "10000000" in line
    assert not cache_dir.exists(), "the data was read although the recipe is invalid"


def test_negative_hidden_width_is_refused(capsys, tmp_path, data_dir, cache_dir) -> None:
    path = _write(tmp_path, _recipe(tmp_path, data_dir))
    _refused_quickly(capsys, tmp_path, ["train", path, "model.mlp.hidden=[-4]"], "model.mlp.hidden[0]",
                     "greater than or equal to 1", "-4")


@pytest.mark.parametrize("rows", ["1e13", "1.0e+13", "10000000000000", "2.5e0"])
def test_synthetic_rows_out_of_bounds_or_not_integral(capsys, tmp_path, cache_dir, rows) -> None:
    # PyYAML reads 1e13 as a string and 1.0e+13 as a float: both are numbers to the schema.
    path = _write(tmp_path, _synthetic_recipe(tmp_path))
    needle = "fractional part" if rows == "2.5e0" else "less than or equal to 10000000000"
    _refused_quickly(capsys, tmp_path, ["train", path, f"dataset.synthetic.rows={rows}"],
                     "dataset.synthetic.rows", needle)


def test_scientific_notation_is_read_as_a_number(tmp_path) -> None:
    recipe = load_recipe(_write(tmp_path, _synthetic_recipe(tmp_path)), ["dataset.synthetic.rows=2e3",
                                                                        "train.batch_size=1.0e+3"])
    assert recipe.dataset.synthetic.rows == 2000 and recipe.train.batch_size == 1000


@pytest.mark.parametrize(("override", "key"), [
    ("model.mlp.hidden=[100000]", "model.mlp.hidden[0]"),
    ("model.mlp.hidden=[" + ",".join(["8"] * 200) + "]", "model.mlp.hidden"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.batch_size=100000000000", "train.batch_size"),
    ("train.epochs=1e9", "train.epochs"),
    ("features.numeric.0.buckets=1e6", "features.numeric[0].buckets"),
    ("seed=-1", "seed"),
    ("seed=1e30", "seed"),
    ("embedding.dim=0", "embedding.dim"),
])
def test_other_sizes_are_bounded(capsys, tmp_path, data_dir, override, key) -> None:
    path = _write(tmp_path, _recipe(tmp_path, data_dir))
    _refused_quickly(capsys, tmp_path, ["train", path, override], key)


@pytest.mark.parametrize(("block", "override", "key"), [
    ("autoint", "model.heads=100000", "model.heads"),
    ("autoint", "model.layers=1000", "model.layers"),
    ("dcnv2", "model.cross_layers=-1", "model.cross_layers"),
    ("fgcnn", "model.channels=[1000000,2,2,2]", "model.channels[0]"),
    ("fgcnn", "model.kernel_heights=[7,7,7,100000]", "model.kernel_heights[3]"),
])
def test_block_sizes_are_bounded(capsys, tmp_path, data_dir, block, override, key) -> None:
    path = _write(tmp_path, _recipe(tmp_path, data_dir, model={"block": block}))
    _refused_quickly(capsys, tmp_path, ["validate", path, override], key)


def test_synthetic_sizes_are_bounded(capsys, tmp_path) -> None:
    path = _write(tmp_path, _synthetic_recipe(tmp_path))
    _refused_quickly(capsys, tmp_path, ["validate", path, "dataset.synthetic.cardinalities=[5,1e12]"],
                     "dataset.synthetic.cardinalities[1]")
    _refused_quickly(capsys, tmp_path, ["validate", path, "dataset.synthetic.signal_scale=1e300"],
                     "dataset.synthetic.signal_scale")


def test_subprocess_huge_embedding_dim(tmp_path, data_dir, cache_dir) -> None:
    path = _write(tmp_path, _recipe(tmp_path, data_dir))
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ctrlab", "train", str(path), "embedding.dim=10000000"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={**__import__("os").environ, "NO_COLOR": "1", "CTRLAB_CACHE_DIR": str(cache_dir)})
    assert time.perf_counter() - started < 60
    _one_line_error(proc.returncode, ANSI.sub("", proc.stderr), "embedding.dim", "8192")
    assert proc.stdout == ""
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ the footprint estimate
def test_synthetic_data_too_large_for_memory_is_refused_before_generating(capsys, tmp_path, cache_dir,
                                                                          monkeypatch) -> None:
    # Small enough that generating it anyway would cost seconds, not the machine: the limit makes it "too large".
    monkeypatch.setenv(LIMIT_ENV, str(10**7))
    path = _write(tmp_path, _synthetic_recipe(tmp_path))
    line = _refused_quickly(capsys, tmp_path, ["train", path, "dataset.synthetic.rows=200000"],
                            "dataset.synthetic", "200,000 rows", "10.0 MB", LIMIT_ENV, "dataset.synthetic.rows")
    assert re.search(r"about [0-9.,]+ MB to generate", line), line
    assert not cache_dir.exists()


def _tiny_layout(tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]) -> FeatureLayout:
    """The layout of the tiny data, from a normal run (which must pass under the same memory limit)."""
    path = _write(tmp_path, _recipe(tmp_path, data_dir), "normal.yaml")
    code, out, err, _ = _cli(capsys, "train", path)
    assert code == 0, err
    processor = json.loads((tmp_path / "out" / "processor.json").read_text(encoding="utf-8"))
    layout = FeatureLayout.from_dict(processor["layout"])
    import shutil

    shutil.rmtree(tmp_path / "out")
    return layout


def test_model_just_over_the_limit_is_refused_and_a_normal_one_passes(capsys, tmp_path, data_dir, cache_dir,
                                                                       monkeypatch) -> None:
    big = {"block": "deepfm", "mlp": {"hidden": [2048, 2048]}}
    recipe = Recipe.model_validate(_recipe(tmp_path, data_dir, model=big))
    monkeypatch.setenv(LIMIT_ENV, str(10**8))  # 100 MB: the tiny model needs a few MB, the big one about 300 MB
    layout = _tiny_layout(tmp_path, data_dir, capsys)
    needed = estimate_model(recipe.embedding, recipe.model, layout, recipe.train.batch_size).bytes
    assert 10**8 < needed < 10**9

    monkeypatch.setenv(LIMIT_ENV, str(needed - 1))
    path = _write(tmp_path, _recipe(tmp_path, data_dir, model=big))
    line = _refused_quickly(capsys, tmp_path, ["train", path], "model: about", "to train", "parameters",
                            "block", LIMIT_ENV, f"{needed:,} bytes", f"{needed - 1:,} bytes", progress_before=True)
    assert f"{estimate_model(recipe.embedding, recipe.model, layout, 256).total_parameters:,} parameters" in line

    monkeypatch.setenv(LIMIT_ENV, str(needed + 1))  # the same recipe fits once the limit is one byte higher
    check_model_footprint(recipe, layout, limit=MemoryLimit(needed + 1, LIMIT_ENV))


def test_wide_embedding_over_a_large_vocabulary_states_estimate_and_limit(tmp_path, data_dir) -> None:
    from ctrlab.data.layout import FieldSpec

    layout = FeatureLayout((FieldSpec("a", "categorical", 10_000_000, "a"), FieldSpec("x", "numeric")))
    recipe = Recipe.model_validate(_recipe(tmp_path, data_dir, embedding={"dim": 8192}))
    started = time.perf_counter()
    with pytest.raises(RecipeError) as caught:
        check_model_footprint(recipe, layout, limit=MemoryLimit(16 * 10**9, "available on this machine"))
    assert time.perf_counter() - started < QUICK_SECONDS  # built on the meta device: nothing allocated
    message = caught.value.message
    assert "\n" not in message
    assert "81,920,016,384" in message or "embedding 81,920" in message, message  # 10M x 8192 (+ numeric)
    assert "TB to train" in message and "16.0 GB" in message and "embedding.dim (now 8,192)" in message


@pytest.mark.parametrize("kind", EMBEDDINGS.names())
@pytest.mark.parametrize("block", BLOCKS.names())
def test_every_embedding_and_block_is_estimated_without_allocating(tmp_path, data_dir, kind, block) -> None:
    from ctrlab.data.layout import FieldSpec

    layout = FeatureLayout((FieldSpec("item", "categorical", 50_000_000, "item"), FieldSpec("b", "categorical", 9, "b"),
                            FieldSpec("x", "numeric"), FieldSpec("hist", "sequence", 50_000_000, "item", 20)))
    model: dict[str, Any] = {"block": block}
    if block in ("din", "history_pooling"):
        model.update(candidate="item", history="hist")
    if block == "lr":
        model["linear"] = True
    embedding: dict[str, Any] = {"kind": kind, "dim": 64}
    recipe = Recipe.model_validate(_recipe(tmp_path, data_dir, model=model, embedding=embedding))
    estimate = estimate_model(recipe.embedding, recipe.model, layout, recipe.train.batch_size)
    stored = 1 if block == "lr" else 64
    assert estimate.total_parameters >= 50_000_000 * stored
    assert estimate.activation_bytes > 0


# ------------------------------------------------------------------------------- bounded recipe expansion
def test_interpolation_fan_out_is_bounded(capsys, tmp_path, data_dir) -> None:
    recipe = _recipe(tmp_path, data_dir)
    recipe["tracking"].update(run_name="q" * 8, experiment="${tracking.run_name}" * 16)
    assert load_recipe(_write(tmp_path, recipe, "small.yaml")).tracking.experiment == "q" * 8 * 16  # small: fine
    # Each level refers 16 times to the last: 8 * 16**4 characters, 16**4 substitutions, from 1.3 KB of YAML.
    recipe["tracking"]["uri"] = "${tracking.experiment}" * 16
    recipe["dataset"]["label"] = "${tracking.uri}" * 16
    recipe["output_dir"] = "${dataset.label}" * 16
    path = _write(tmp_path, recipe, "fanout.yaml")
    assert path.stat().st_size < 2000
    for args in (["validate", path], ["train", path]):
        _refused_quickly(capsys, tmp_path, args, str(path))


def test_exponential_interpolation_names_the_key_within_bounds(tmp_path, data_dir) -> None:
    recipe = _recipe(tmp_path, data_dir)
    recipe["tracking"]["run_name"] = "x" * 16
    recipe["tracking"]["experiment"] = "${tracking.run_name}" * 64
    recipe["tracking"]["uri"] = "${tracking.experiment}" * 64
    recipe["output_dir"] = "${tracking.uri}" * 64
    path = _write(tmp_path, recipe)
    started = time.perf_counter()
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    assert time.perf_counter() - started < QUICK_SECONDS
    message = caught.value.message
    assert str(path) in message and ("output_dir" in message or "tracking.uri" in message), message
    assert "65,536 characters" in message or "substitutions" in message, message


def test_override_interpolation_bomb(capsys, tmp_path, data_dir) -> None:
    path = _write(tmp_path, _recipe(tmp_path, data_dir))
    _refused_quickly(capsys, tmp_path, ["validate", path, "tracking.run_name=" + "x" * 1000,
                                        "tracking.experiment=" + "${tracking.run_name}" * 100,
                                        "output_dir=" + "${tracking.experiment}" * 100], "output_dir")


def _billion_laughs(levels: int = 10, width: int = 10) -> str:
    lines = ['lol0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"lol{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]")
    return "\n".join(lines)


def test_yaml_alias_bomb_is_refused_quickly(capsys, tmp_path, data_dir) -> None:
    text = _billion_laughs() + "\n" + yaml.safe_dump(_recipe(tmp_path, data_dir), sort_keys=False)
    path = _write(tmp_path, text)
    line = _refused_quickly(capsys, tmp_path, ["validate", path], str(path), "YAML aliases")
    assert "200,000" in line
    # Inside a real key too (the list would be validated element by element).
    recipe = _recipe(tmp_path, data_dir)
    text = _billion_laughs() + "\n" + yaml.safe_dump(recipe, sort_keys=False).replace(
        "categorical:\n  - a\n  - b", "categorical: *l9")
    _refused_quickly(capsys, tmp_path, ["train", _write(tmp_path, text, "inner.yaml")], "YAML aliases")


def test_yaml_alias_bomb_in_an_override(capsys, tmp_path, data_dir) -> None:
    path = _write(tmp_path, _recipe(tmp_path, data_dir))
    bomb = "{" + ", ".join([f"a{i}: &x{i} [" + (", ".join([f"*x{i - 1}"] * 12) if i else "1, 2, 3") + "]"
                            for i in range(8)]) + "}"
    _refused_quickly(capsys, tmp_path, ["validate", path, f"train.metrics={bomb}"], "override", "YAML aliases")


@pytest.mark.parametrize("name", ["self_reference", "deep_flow", "deep_block", "huge_int", "big_file"])
def test_hostile_documents_end_in_one_line(capsys, tmp_path, data_dir, name) -> None:
    base = yaml.safe_dump(_recipe(tmp_path, data_dir), sort_keys=False)
    text = {
        "self_reference": base + "loop: &loop [1, *loop]\n",
        "deep_flow": base + "deep: " + "[" * 50_000 + "]" * 50_000 + "\n",
        "deep_block": base + "deep:\n" + "".join(" " * i + f"k{i}:\n" for i in range(1, 120)) + " " * 120 + "v: 1\n",
        "huge_int": base + "seed: " + "9" * 20_000 + "\n",
        "big_file": base + "# " + "x" * MAX_RECIPE_BYTES + "\n",
    }[name]
    _refused_quickly(capsys, tmp_path, ["validate", _write(tmp_path, text)], str(tmp_path / "recipe.yaml"))


def test_validate_recipe_wraps_any_failure_in_one_line() -> None:
    nested: dict[str, Any] = {}
    node = nested
    for _ in range(5000):  # deeper than the interpreter's recursion limit would allow a recursive walk
        node["a"] = {}
        node = node["a"]
    with pytest.raises(RecipeError, match="nests deeper than"):
        validate_recipe({"dataset": nested}, "made-up")
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(RecipeError, match="contains itself"):
        validate_recipe({"dataset": {"columns": loop}}, "made-up")
