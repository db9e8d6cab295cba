"""Property: whatever recipe document and overrides the loader is given, the outcome is a valid ``Recipe`` or a
``RecipeError`` whose message is one line, quickly; never another exception, a traceback or a hang.

Documents are random YAML (nested mappings, lists and hostile scalars: huge integers, negative numbers, inf/nan,
long strings, ``${...}`` references, anchors and aliases, raw text) and mutations of a valid tiny recipe (random
values at random keys, random new keys); overrides are random ``key.path=value`` strings.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctrlab.cli import main
from ctrlab.config.loader import flatten, load_recipe, validate_recipe
from ctrlab.config.schema import Recipe
from ctrlab.errors import RecipeError

CASE_SECONDS = 5.0  # per example; a bounded loader answers in milliseconds
FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

VALID: dict[str, Any] = {
    "name": "fuzz",
    "output_dir": "/nonexistent/fuzz-out",
    "dataset": {"synthetic": {"rows": 1000, "numeric_fields": 1, "categorical_fields": 2, "cardinalities": [5, 7],
                              "informative_fields": 1, "interaction_pairs": 0, "numeric_informative": 1},
                "split": {"kind": "random"}},
    "features": {"categorical": ["C1", {"name": "C2", "min_count": 2}], "numeric": [{"name": "I1", "buckets": 8}]},
    "embedding": {"dim": 4},
    "model": {"block": "deepfm", "mlp": {"hidden": [8, 4]}},
    "train": {"epochs": 1, "batch_size": 64, "optimizer": {"lr": 0.01}},
    "tracking": {"enabled": False},
}
PATHS = sorted(flatten(VALID)) + ["model.block", "embedding.kind", "model.heads", "model.cross_layers",
                                  "dataset.synthetic.rows", "train.optimizer.betas", "sweep.n_trials",
                                  "model.channels", "embedding.rows", "features.sequence"]

_counter = itertools.count()

# ------------------------------------------------------------------------------------------------ strategies
huge_ints = st.sampled_from([2**31, 2**53 + 1, 2**63, 2**64, 10**30, -(10**30), 10**4000])
numbers = st.one_of(st.integers(-(2**40), 2**40), huge_ints, st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0, -1, -4, 1, 10_000_000, 1e13, 1e300, -0.0]))
references = st.builds(lambda path, n: ("${" + path + "}") * n,
                       st.sampled_from(PATHS + ["env:HOME", "env:CTRLAB_FUZZ_UNSET", "nope", "a..b", ""]),
                       st.integers(1, 40))
texts = st.one_of(st.text(max_size=20), st.text(alphabet="x$}{.\\\n\r\t\x00\u2028[]:&*!", max_size=40),
                  st.sampled_from(["1e13", "1.0e+13", ".inf", ".nan", "-1e400", "1e-3", "0x10", "yes", "~", ""]),
                  st.integers(1000, 70_000).map(lambda n: "x" * n), references)
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)
keys = st.one_of(st.sampled_from([p.split(".")[-1] for p in PATHS]), st.text(max_size=12))
documents = st.recursive(scalars, lambda children: st.one_of(st.lists(children, max_size=6),
                                                             st.dictionaries(keys, children, max_size=6)),
                         max_leaves=40)


def _set(data: dict[str, Any], path: list[str], value: Any) -> None:
    node: Any = data
    for part in path[:-1]:
        if not isinstance(node, dict):
            return
        node = node.setdefault(part, {})
    if isinstance(node, dict):
        node[path[-1]] = value


@st.composite
def mutated_recipes(draw: st.DrawFn) -> dict[str, Any]:
    """The valid recipe with a few values replaced (at known keys, or at new random keys)."""
    data = yaml.safe_load(yaml.safe_dump(VALID))
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.booleans()):
            path = draw(st.sampled_from(PATHS)).split(".")
        else:
            path = draw(st.lists(keys, min_size=1, max_size=4))
        _set(data, path, draw(st.one_of(scalars, documents)))
    return data


@st.composite
def alias_documents(draw: st.DrawFn) -> str:
    """YAML text whose anchors and aliases fan out (``billion laughs``), in a random place of a valid recipe."""
    levels, width = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    lines = ['l0: &l0 ["lol", "lol", "lol"]'] + [
        f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]" for i in range(1, levels)]
    body = yaml.safe_dump(VALID, sort_keys=False)
    where = draw(st.sampled_from(["top", "features", "hidden", "metrics"]))
    last = f"*l{levels - 1}"
    if where == "features":
        body = body.replace("categorical:\n  - C1", f"categorical: {last}\n  _x:\n  - C1")
    elif where == "hidden":
        body = body.replace("hidden:\n    - 8\n    - 4", f"hidden: {last}")
    elif where == "metrics":
        body += f"x: {{a: {last}, b: {last}}}\n"
    return "\n".join(lines) + "\n" + body


overrides = st.lists(st.builds(lambda key, value: f"{key}={value}",
                               st.one_of(st.sampled_from(PATHS), st.text(max_size=15)),
                               st.one_of(texts, st.builds(lambda d: yaml.safe_dump(d, default_flow_style=True)
                                                          .strip(), documents))),
                     max_size=3)
yaml_texts = st.one_of(
    st.builds(lambda d: yaml.safe_dump(d, sort_keys=False), documents),
    st.builds(lambda d: yaml.safe_dump(d, sort_keys=False), mutated_recipes()),
    alias_documents(),
    st.text(max_size=200),
    st.text(alphabet="[]{}:-&*!|>'\"#%@` \n\tab1", max_size=300),
)


# ----------------------------------------------------------------------------------------------- properties
@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _check(outcome: Any, started: float) -> None:
    elapsed = time.perf_counter() - started
    assert elapsed < CASE_SECONDS, f"took {elapsed:.1f}s"
    if isinstance(outcome, RecipeError):
        message = outcome.message
        assert message and len(message.splitlines()) == 1, repr(message)
        assert len(message) < 2000, f"message of {len(message)} characters"
    else:
        assert isinstance(outcome, Recipe)


def _load(path: Path, extra: list[str]) -> Any:
    try:
        return load_recipe(path, extra)
    except RecipeError as error:
        return error


def _write(workdir: Path, text: str) -> Path:
    path = workdir / f"r{next(_counter)}.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    return path


@FUZZ
@given(text=yaml_texts, extra=overrides)
def test_load_recipe_is_a_recipe_or_one_line_error(workdir: Path, text: str, extra: list[str]) -> None:
    try:
        path = _write(workdir, text)
    except UnicodeEncodeError:  # lone surrogates cannot be written as UTF-8; the loader never sees them
        return
    started = time.perf_counter()
    _check(_load(path, extra), started)


@FUZZ
@given(data=st.one_of(mutated_recipes(), st.dictionaries(keys, documents, max_size=6)))
def test_validate_recipe_is_a_recipe_or_one_line_error(data: dict[str, Any]) -> None:
    started = time.perf_counter()
    try:
        outcome: Any = validate_recipe(data, "fuzz")
    except RecipeError as error:
        outcome = error
    _check(outcome, started)


@settings(FUZZ, max_examples=30)
@given(text=st.one_of(st.builds(lambda d: yaml.safe_dump(d, sort_keys=False), mutated_recipes()), alias_documents()),
       extra=overrides)
def test_cli_validate_exits_0_or_2_without_traceback(workdir: Path, text: str, extra: list[str]) -> None:
    path = _write(workdir, text)
    extra = [e for e in extra if not e.startswith("-")]  # an argument starting with "-" is an option to click
    out, err = io.StringIO(), io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["validate", str(path), *extra])
    assert time.perf_counter() - started < CASE_SECONDS
    assert code in (0, 2), (code, err.getvalue())
    assert "Traceback" not in err.getvalue()
    if code == 2:
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), err.getvalue()


def test_the_valid_recipe_is_valid(workdir: Path) -> None:
    assert isinstance(load_recipe(_write(workdir, yaml.safe_dump(VALID))), Recipe)
