"""Load a recipe file: YAML (safe), dotted overrides, ``${...}`` interpolation, strict validation.

Every failure is a :class:`~ctrlab.errors.RecipeError` with one line naming the file and the key path, and for an
unknown key the closest valid key.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import BaseModel, ValidationError

from ctrlab.errors import RecipeError

_INTERPOLATION = re.compile(r"\$\{([^}]+)\}")


# --------------------------------------------------------------------------------------------- overrides
def parse_override(text: str) -> tuple[list[str], Any]:
    """``model.mlp.hidden=[64,32]`` -> (["model", "mlp", "hidden"], [64, 32]); values are parsed as YAML."""
    if "=" not in text:
        raise RecipeError(f"override {text!r} is not of the form key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise RecipeError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def set_path(data: dict[str, Any], path: list[str], value: Any) -> None:
    """Set ``data[a][b][c] = value``, creating missing mappings (unknown keys are caught by validation)."""
    node: Any = data
    for i, part in enumerate(path[:-1]):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise RecipeError(f"override {'.'.join(path)}: {'.'.join(path[:i])} is not a mapping")
        if not isinstance(node.get(part), (dict, list)):
            node[part] = {}
        node = node[part]
    last = path[-1]
    if isinstance(node, list) and last.isdigit() and int(last) < len(node):
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise RecipeError(f"override {'.'.join(path)}: {'.'.join(path[:-1])} is not a mapping")


def get_path(data: Any, path: list[str]) -> Any:
    node = data
    for part in path:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise KeyError(".".join(path))
    return node


# ----------------------------------------------------------------------------------------- interpolation
def interpolate(data: Any, root: dict[str, Any] | None = None, where: str = "") -> Any:
    """Resolve ``${env:VAR}``, ``${env:VAR,default}`` and ``${dotted.key}`` inside string values."""
    root = data if root is None else root
    if isinstance(data, dict):
        return {k: interpolate(v, root, f"{where}.{k}" if where else str(k)) for k, v in data.items()}
    if isinstance(data, list):
        return [interpolate(v, root, f"{where}[{i}]") for i, v in enumerate(data)]
    if not isinstance(data, str) or "${" not in data:
        return data

    def replace(match: re.Match[str], depth: int = 0) -> str:
        expr = match.group(1).strip()
        if expr.startswith("env:"):
            name, comma, default = expr[4:].partition(",")
            value = os.environ.get(name.strip())
            if value is None:
                if not comma:
                    raise RecipeError(f"{where}: environment variable {name.strip()} is not set (used as ${{{expr}}})")
                value = default.strip()
            return value
        try:
            value = get_path(root, expr.split("."))
        except KeyError:
            raise RecipeError(f"{where}: ${{{expr}}} refers to a key that does not exist") from None
        if isinstance(value, (dict, list)):
            raise RecipeError(f"{where}: ${{{expr}}} refers to a section, not a value")
        text = str(value)
        if "${" in text:
            if depth > 10:
                raise RecipeError(f"{where}: interpolation of ${{{expr}}} does not terminate")
            text = _INTERPOLATION.sub(lambda m: replace(m, depth + 1), text)
        return text

    whole = _INTERPOLATION.fullmatch(data)
    if whole and not whole.group(1).startswith("env:"):
        # "${seed}" keeps the referenced value's type.
        try:
            value = get_path(root, whole.group(1).strip().split("."))
            if not isinstance(value, (dict, list, str)):
                return value
        except KeyError:
            pass
    return _INTERPOLATION.sub(replace, data)


# ------------------------------------------------------------------------------------------ unknown keys
def _unwrap(annotation: Any) -> Any:
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    annotation = _unwrap(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if typing.get_origin(annotation) in (Union, types.UnionType):
        found: list[type[BaseModel]] = []
        for arg in typing.get_args(annotation):
            found.extend(_models_in(arg))
        return found
    return []


def _discriminator(annotation: Any) -> str | None:
    if typing.get_origin(annotation) is typing.Annotated:
        for meta in typing.get_args(annotation)[1:]:
            disc = getattr(meta, "discriminator", None)
            if isinstance(disc, str):
                return disc
    return None


def _pick_model(annotation: Any, value: dict[str, Any], discriminator: str | None = None) -> type[BaseModel] | None:
    models = _models_in(annotation)
    if len(models) == 1:
        return models[0]
    # pydantic moves an Annotated field's discriminator off ``FieldInfo.annotation`` onto ``FieldInfo.discriminator``
    disc = discriminator if discriminator is not None else _discriminator(annotation)
    if disc is not None and disc in value:
        for model in models:
            literal = model.model_fields[disc].annotation
            if value[disc] in typing.get_args(literal):
                return model
    return None


def find_unknown_key(model: type[BaseModel], data: Any, path: str = "") -> tuple[str, str | None] | None:
    """The first key in ``data`` that ``model`` does not define, with the closest valid key at that level."""
    if not isinstance(data, dict):
        return None
    fields = model.model_fields
    for key, value in data.items():
        key_path = f"{path}.{key}" if path else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            return key_path, (f"{path}.{close[0]}" if path else close[0]) if close else None
        annotation = fields[key].annotation
        discriminator = fields[key].discriminator
        if isinstance(value, dict):
            sub = _pick_model(annotation, value, discriminator if isinstance(discriminator, str) else None)
            if sub is not None:
                found = find_unknown_key(sub, value, key_path)
                if found:
                    return found
        elif isinstance(value, list):
            inner = _unwrap(annotation)
            if typing.get_origin(inner) in (Union, types.UnionType):
                inner = next((a for a in typing.get_args(inner) if typing.get_origin(a) is list), inner)
            if typing.get_origin(inner) is list:
                (item_type,) = typing.get_args(inner)
                for i, item in enumerate(value):
                    if isinstance(item, dict):
                        sub = _pick_model(item_type, item)
                        if sub is not None:
                            found = find_unknown_key(sub, item, f"{key_path}[{i}]")
                            if found:
                                return found
    return None


# -------------------------------------------------------------------------------------------- validation
def _loc_to_path(loc: tuple[Any, ...], data: Any) -> str:
    parts: list[str] = []
    node = data
    for i, item in enumerate(loc):
        if isinstance(item, int):
            parts.append(f"[{item}]")
            node = node[item] if isinstance(node, list) and item < len(node) else None
            continue
        is_last = i == len(loc) - 1
        if isinstance(node, dict) and item not in node and not is_last:
            continue  # a discriminated-union tag or a validator name, not a key the user wrote
        if isinstance(node, dict) and item not in node and "[" in str(item):
            continue
        parts.append(("." if parts else "") + str(item))
        node = node.get(item) if isinstance(node, dict) else None
    return "".join(parts) or "(top level)"


def format_validation_error(error: ValidationError, data: Any, source: str) -> str:
    first = error.errors()[0]
    path = _loc_to_path(tuple(first["loc"]), data)
    message = first["msg"]
    detail = ""
    if first["type"] in ("union_tag_invalid", "union_tag_not_found"):
        # "model: Input tag 'nope' found using 'block' ..." -> "model.block: unknown value 'nope'; valid: ..."
        ctx = first.get("ctx") or {}
        tag_key = str(ctx.get("discriminator", "")).strip("'\"")
        path = f"{path}.{tag_key}" if path != "(top level)" else tag_key
        if first["type"] == "union_tag_invalid":
            valid = str(ctx.get("expected_tags", "")).replace("'", "")
            message = f"unknown value {ctx.get('tag')!r}; valid: {valid}"
        else:
            message = "required key is missing (it picks the kind of this section)"
    else:
        if message.startswith("Value error, "):
            message = message[len("Value error, "):]
        if first["type"] not in ("missing",) and "input" in first and not isinstance(first["input"], dict):
            shown = repr(first["input"])
            detail = f" (got {shown[:80]})"
    more = len(error.errors()) - 1
    suffix = f" [+{more} more error{'s' if more > 1 else ''}]" if more else ""
    return f"{source}: {path}: {message}{detail}{suffix}"


def validate_recipe(data: dict[str, Any], source: str = "recipe") -> Any:
    """Validate a recipe mapping (overrides already applied) into a ``Recipe``; ``${...}`` references are resolved
    here, defaults such as ``output_dir: runs/${name}`` included."""
    from ctrlab.config.schema import Recipe

    data = interpolate(fill_interpolated_defaults(Recipe, copy.deepcopy(data)))
    unknown = find_unknown_key(Recipe, data)
    if unknown:
        key, close = unknown
        hint = f" (did you mean '{close}'?)" if close else ""
        raise RecipeError(f"{source}: unknown key '{key}'{hint}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        raise RecipeError(format_validation_error(error, data, source)) from None


def read_recipe_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise RecipeError(f"{path}: recipe file not found")
    if path.is_dir():
        raise RecipeError(f"{path}: is a directory, expected a recipe file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"{path}: invalid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: recipe is not UTF-8 text") from None
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read recipe file ({exc.strerror or exc})") from None
    if data is None:
        raise RecipeError(f"{path}: recipe file is empty")
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    return data


def fill_interpolated_defaults(model: type[BaseModel], data: dict[str, Any]) -> dict[str, Any]:
    """Write into ``data`` the string defaults that contain ``${...}`` (e.g. ``output_dir: runs/${name}``) for keys
    the recipe leaves out, so that they are interpolated like written values instead of kept literally."""
    for key, info in model.model_fields.items():
        if key not in data:
            if isinstance(info.default, str) and "${" in info.default:
                data[key] = info.default
        elif isinstance(data[key], dict):
            discriminator = info.discriminator if isinstance(info.discriminator, str) else None
            sub = _pick_model(info.annotation, data[key], discriminator)
            if sub is not None:
                fill_interpolated_defaults(sub, data[key])
    return data


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Read, override, interpolate and validate a recipe file."""
    data = read_recipe_file(path)
    for text in overrides:
        keys, value = parse_override(text)
        set_path(data, keys, value)
    return validate_recipe(data, str(path))


def recipe_to_dict(recipe: BaseModel) -> dict[str, Any]:
    """The recipe as plain YAML-able data (tuples become lists)."""
    return recipe.model_dump(mode="json")


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values (for tracking params and search spaces)."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: data}
