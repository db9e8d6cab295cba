"""The search space of a sweep: sample one trial's recipe overrides from ``sweep.space``, and check the space's
keys against the recipe schema before any trial runs.

Every key of ``sweep.space`` is a dotted recipe key (``train.optimizer.lr``); a trial's parameters are returned as
``{dotted key: value}`` overrides that :func:`apply_params` writes into the raw recipe mapping. A parameter with
``when: {other.key: value}`` is sampled only when every named key has that value, read from the parameters already
sampled for the trial or else from the (validated) base recipe; keys that other parameters' conditions name are
sampled first.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import optuna

from ctrlab.config.loader import get_path, set_path, validate_recipe
from ctrlab.config.sweep import ParamSpace
from ctrlab.errors import RecipeError

_PRIMITIVE = (type(None), bool, int, float, str)


def sample_order(space: dict[str, ParamSpace]) -> list[str]:
    """The keys of ``space`` ordered so that a key named in another key's ``when`` comes before it (stable
    otherwise). A cycle of conditions is a :class:`RecipeError`."""
    order: list[str] = []
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(key: str, chain: list[str]) -> None:
        if state.get(key) == 2:
            return
        if state.get(key) == 1:
            cycle = " -> ".join([*chain[chain.index(key):], key])
            raise RecipeError(f"sweep.space: the when conditions form a cycle ({cycle})")
        state[key] = 1
        for dep in space[key].when:
            if dep in space:
                visit(dep, [*chain, key])
        state[key] = 2
        order.append(key)

    for key in space:
        visit(key, [])
    return order


def _encode_choice(value: Any) -> Any:
    """Optuna stores categorical choices that are None/bool/int/float/str; other choices (lists such as
    ``model.mlp.hidden: [[64, 32], [128]]``) are stored as their JSON text and decoded after sampling."""
    return value if isinstance(value, _PRIMITIVE) else json.dumps(value)


def _choices(spec: ParamSpace) -> tuple[list[Any], dict[Any, Any]]:
    encoded = [_encode_choice(c) for c in spec.choices or []]
    return encoded, {e: c for e, c in zip(encoded, spec.choices or [])}


def suggest(trial: optuna.trial.BaseTrial, key: str, spec: ParamSpace) -> Any:
    """Sample one parameter from its range with the trial's sampler."""
    if spec.type == "categorical":
        encoded, decode = _choices(spec)
        return decode[trial.suggest_categorical(key, encoded)]
    assert spec.low is not None and spec.high is not None
    if spec.type == "int":
        step = int(spec.step) if spec.step is not None else 1
        return trial.suggest_int(key, int(spec.low), int(spec.high), step=step, log=spec.log)
    return trial.suggest_float(key, float(spec.low), float(spec.high), step=spec.step, log=spec.log)


def _matches(actual: Any, expected: Any) -> bool:
    if actual == expected:
        return True
    # ``when: {model.block: [deepfm, dcn]}`` means "any of" (unless the field itself holds a list)
    return isinstance(expected, list) and not isinstance(actual, list) and actual in expected


def condition_holds(when: dict[str, Any], base: dict[str, Any], params: dict[str, Any]) -> bool:
    """Whether every ``when`` key has its required value (from ``params`` first, else from ``base``)."""
    for key, expected in when.items():
        if key in params:
            actual = params[key]
        else:
            try:
                actual = get_path(base, key.split("."))
            except KeyError:
                return False
        if not _matches(actual, expected):
            return False
    return True


def sample_params(trial: optuna.trial.BaseTrial, space: dict[str, ParamSpace],
                  base: dict[str, Any]) -> dict[str, Any]:
    """One trial's overrides ``{dotted key: value}``; ``base`` is the validated base recipe as a dict (defaults
    included), used for the ``when`` conditions that name keys outside the space."""
    params: dict[str, Any] = {}
    for key in sample_order(space):
        spec = space[key]
        if spec.when and not condition_holds(spec.when, base, params):
            continue
        params[key] = suggest(trial, key, spec)
    return params


def baseline_params(space: dict[str, ParamSpace], base: dict[str, Any]) -> dict[str, Any] | None:
    """The recipe's own values of the space's keys as Optuna's fixed parameters (categorical choices encoded as
    :func:`suggest` stores them), or None when one lies outside its range or choices (the recipe is then no point
    of the space)."""
    fixed: dict[str, Any] = {}
    overrides: dict[str, Any] = {}
    for key in sample_order(space):
        spec = space[key]
        if spec.when and not condition_holds(spec.when, base, overrides):
            continue
        try:
            value = get_path(base, key.split("."))
        except KeyError:
            return None
        if spec.type == "categorical":
            if value not in (spec.choices or []):
                return None
            fixed[key] = _encode_choice(value)
        else:
            assert spec.low is not None and spec.high is not None
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not spec.low <= value <= spec.high:
                return None
            if spec.type == "int" and value != int(value):
                return None
            steps = (value - spec.low) / spec.step if spec.step is not None else 0.0
            if abs(steps - round(steps)) > 1e-9:
                return None
            fixed[key] = int(value) if spec.type == "int" else float(value)
        overrides[key] = value
    return fixed


def apply_params(raw: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A copy of the raw recipe mapping with the overrides written in."""
    data = copy.deepcopy(raw)
    for key, value in params.items():
        set_path(data, key.split("."), value)
    return data


def _probe_values(spec: ParamSpace) -> list[Any]:
    if spec.type == "categorical":
        return list(spec.choices or [])
    assert spec.low is not None and spec.high is not None
    if spec.type == "int":
        return [int(spec.low), int(spec.high)]
    return [float(spec.low), float(spec.high)]


def check_space(raw: dict[str, Any], space: dict[str, ParamSpace], source: str = "recipe") -> None:
    """Validate the recipe with each key of the space set to its bounds (``low``, ``high``) or each of its
    choices, with its ``when`` conditions made true, so that a key the schema does not know (or a range the schema
    rejects) is a one-line :class:`RecipeError` naming the key before any trial runs."""
    sample_order(space)  # rejects condition cycles
    base = {k: v for k, v in raw.items() if k != "sweep"}
    for key, spec in space.items():
        for value in _probe_values(spec):
            conditions = {k: (v[0] if isinstance(v, list) and v else v) for k, v in spec.when.items()}
            data = apply_params(base, {**conditions, key: value})
            try:
                validate_recipe(data, source)
            except RecipeError as error:
                detail = error.message
                prefix = f"{source}: "
                if detail.startswith(prefix):
                    detail = detail[len(prefix):]
                raise RecipeError(f"{source}: sweep.space key '{key}' (value {value!r}): {detail}") from None
