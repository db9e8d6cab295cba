"""Load a recipe file: YAML (safe), dotted overrides, ``${...}`` interpolation, strict validation.

Every failure is a :class:`~ctrlab.errors.RecipeError` with one line naming the file and the key path, and for an
unknown key the closest valid key.

Loading is bounded, so a hostile recipe fails fast instead of hanging or exhausting memory: the file's size
(:data:`MAX_RECIPE_BYTES`), the document's nesting depth and the number of nodes and characters it expands to once
YAML aliases are followed as copies (:func:`check_document`), and the work of ``${...}`` interpolation (characters per
value and substitutions per recipe, :class:`InterpolationBudget`). Overrides go through the same bounds. Any other
exception while loading or validating (a RecursionError, say) also becomes a one-line ``RecipeError`` naming the file.
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

MAX_RECIPE_BYTES = 1024 * 1024  # a recipe is a few KB; PyYAML (pure Python) parses 1 MiB in about a second
MAX_OVERRIDE_CHARS = 64 * 1024
MAX_DEPTH = 64  # nesting of mappings and lists (a recipe uses about 5)
MAX_NODES = 200_000  # mappings, lists and scalars once aliases are expanded (a recipe has a few hundred)
MAX_TEXT_CHARS = 8 * 1024 * 1024  # characters of keys and strings once aliases are expanded
MAX_VALUE_CHARS = 64 * 1024  # characters of one value after ${...} interpolation
MAX_SUBSTITUTIONS = 10_000  # ${...} substitutions in one recipe, nested ones included
MAX_REFERENCE_DEPTH = 10  # a ${...} whose value holds a ${...} ...
_SHOWN_CHARS = 80  # of a key or value quoted in an error message


# --------------------------------------------------------------------------------------------- overrides
def parse_override(text: str) -> tuple[list[str], Any]:
    """``model.mlp.hidden=[64,32]`` -> (["model", "mlp", "hidden"], [64, 32]); values are parsed as YAML."""
    if len(text) > MAX_OVERRIDE_CHARS:
        raise RecipeError(f"override {shorten(text)} is {len(text):,} characters long; the limit is "
                          f"{MAX_OVERRIDE_CHARS:,}")
    if "=" not in text:
        raise RecipeError(f"override {shorten(text)} is not of the form key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise RecipeError(f"override {shorten(text)} has an empty key")
    if key.count(".") >= MAX_DEPTH:
        raise RecipeError(f"override {shorten(key)}: the key nests deeper than {MAX_DEPTH} levels")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    except (RecursionError, MemoryError, ValueError, TypeError, OverflowError):
        raise RecipeError(f"override {shorten(key)}: the value cannot be read (nested too deeply or too "
                          "large)") from None
    check_document(value, f"override {shorten(key)}")
    return key.split("."), value


def _is_index(part: str, node: list[Any]) -> bool:
    # ASCII digits only: str.isdigit() is also true for "²", which int() refuses.
    return part.isascii() and part.isdigit() and len(part) < 19 and int(part) < len(node)


def set_path(data: dict[str, Any], path: list[str], value: Any) -> None:
    """Set ``data[a][b][c] = value``, creating missing mappings (unknown keys are caught by validation)."""
    node: Any = data
    for i, part in enumerate(path[:-1]):
        if isinstance(node, list) and _is_index(part, node):
            node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise RecipeError(f"override {shorten('.'.join(path), quote=False)}: "
                              f"{shorten('.'.join(path[:i]), quote=False)} is not a mapping")
        if not isinstance(node.get(part), (dict, list)):
            node[part] = {}
        node = node[part]
    last = path[-1]
    if isinstance(node, list) and _is_index(last, node):
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise RecipeError(f"override {shorten('.'.join(path), quote=False)}: "
                          f"{shorten('.'.join(path[:-1]), quote=False)} is not a mapping")


def get_path(data: Any, path: list[str]) -> Any:
    node = data
    for part in path:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and _is_index(part, node):
            node = node[int(part)]
        else:
            raise KeyError(".".join(path))
    return node


# ----------------------------------------------------------------------------------------- interpolation
class InterpolationBudget:
    """The work one recipe's interpolation may do: ``${...}`` substitutions (nested ones included).

    A few hundred bytes of references that fan out (``b: ${a}${a}${a}``, ``c: ${b}${b}${b}``, ...) expand
    exponentially; counting every substitution against one budget, and bounding every value's length as it is
    built, keeps the work linear in :data:`MAX_SUBSTITUTIONS` and the memory in :data:`MAX_VALUE_CHARS`."""

    def __init__(self, substitutions: int = MAX_SUBSTITUTIONS, value_chars: int = MAX_VALUE_CHARS) -> None:
        self.substitutions_left = substitutions
        self.value_chars = value_chars

    def spend(self, where: str, expr: str) -> None:
        self.substitutions_left -= 1
        if self.substitutions_left < 0:
            raise RecipeError(f"{where}: ${{{shorten(expr, quote=False)}}}: interpolation expands too much (more than "
                              f"{MAX_SUBSTITUTIONS:,} substitutions in the recipe)")

    def check_length(self, where: str, expr: str, length: int) -> None:
        if length > self.value_chars:
            raise RecipeError(f"{where}: ${{{shorten(expr, quote=False)}}}: the interpolated value is longer than "
                              f"{self.value_chars:,} characters")


def interpolate(data: Any, root: dict[str, Any] | None = None, where: str = "",
                budget: InterpolationBudget | None = None) -> Any:
    """Resolve ``${env:VAR}``, ``${env:VAR,default}`` and ``${dotted.key}`` inside string values, within
    ``budget`` (one fresh :class:`InterpolationBudget` for the whole document when not given)."""
    root = data if root is None else root
    budget = InterpolationBudget() if budget is None else budget
    if isinstance(data, dict):
        return {k: interpolate(v, root, f"{where}.{k}" if where else str(k), budget) for k, v in data.items()}
    if isinstance(data, list):
        return [interpolate(v, root, f"{where}[{i}]", budget) for i, v in enumerate(data)]
    if not isinstance(data, str) or "${" not in data:
        return data
    where = shorten(where, quote=False)

    whole = _INTERPOLATION.fullmatch(data)
    if whole and not whole.group(1).startswith("env:"):
        # "${seed}" keeps the referenced value's type.
        try:
            value = get_path(root, whole.group(1).strip().split("."))
            if not isinstance(value, (dict, list, str)):
                budget.spend(where, whole.group(1))
                return value
        except KeyError:
            pass
    return _expand(data, root, where, budget, 0)


def _expand(text: str, root: dict[str, Any], where: str, budget: InterpolationBudget, depth: int) -> str:
    """``text`` with every ``${...}`` replaced, built piece by piece so that neither the number of substitutions
    nor the length of the result can run past the budget before it is noticed."""
    parts: list[str] = []
    length = 0
    last = 0
    for match in _INTERPOLATION.finditer(text):
        expr = match.group(1).strip()
        budget.spend(where, expr)
        piece = _resolve(expr, root, where, budget, depth)
        parts.append(text[last:match.start()])
        parts.append(piece)
        length += match.start() - last + len(piece)
        budget.check_length(where, expr, length)
        last = match.end()
    parts.append(text[last:])
    length += len(text) - last
    budget.check_length(where, text, length)
    return "".join(parts)


def _resolve(expr: str, root: dict[str, Any], where: str, budget: InterpolationBudget, depth: int) -> str:
    """The text one ``${expr}`` stands for (its own references resolved)."""
    if expr.startswith("env:"):
        name, comma, default = expr[4:].partition(",")
        value = os.environ.get(name.strip())
        if value is None:
            if not comma:
                raise RecipeError(f"{where}: environment variable {shorten(name.strip(), quote=False)} is not set "
                                  f"(used as ${{{shorten(expr, quote=False)}}})")
            value = default.strip()
        budget.check_length(where, expr, len(value))
        return value
    try:
        found = get_path(root, expr.split("."))
    except KeyError:
        raise RecipeError(f"{where}: ${{{shorten(expr, quote=False)}}} refers to a key that does not exist") from None
    if isinstance(found, (dict, list)):
        raise RecipeError(f"{where}: ${{{shorten(expr, quote=False)}}} refers to a section, not a value")
    text = str(found)
    budget.check_length(where, expr, len(text))
    if "${" in text:
        if depth >= MAX_REFERENCE_DEPTH:
            raise RecipeError(f"{where}: interpolation of ${{{shorten(expr, quote=False)}}} does not terminate")
        text = _expand(text, root, where, budget, depth + 1)
    return text


# ------------------------------------------------------------------------------------------------ bounds
def shorten(text: Any, limit: int = _SHOWN_CHARS, quote: bool = True) -> str:
    """``text`` for an error message: at most ``limit`` characters, control characters and line breaks escaped
    (a key or value from the file must not break the one-line message), quoted unless ``quote`` is false."""
    text = str(text)
    cut = len(text) > limit
    text = text[:limit]
    shown = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    if cut:
        shown += "..."
    return f"'{shown}'" if quote else shown


def check_document(data: Any, source: str) -> None:
    """Refuse a document nested deeper than :data:`MAX_DEPTH`, or expanding to more than :data:`MAX_NODES` nodes
    or :data:`MAX_TEXT_CHARS` characters, or containing itself.

    ``yaml.safe_load`` shares the object an alias points to, so a "billion laughs" document is small in memory,
    but copying, interpolation and validation walk it as a tree. Sizes are memoised by object id, so the count is
    linear in the number of distinct objects, and the walk is iterative (no RecursionError on deep input)."""
    sizes: dict[int, tuple[int, int, int]] = {}  # id -> (nodes, characters, depth) of the expanded subtree
    on_path: set[int] = set()
    keep_alive: list[Any] = []  # ids are only unique while the objects live; scalars made here must not be freed
    stack: list[tuple[Any, bool]] = [(data, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if not children_done:
            if key in sizes:
                continue
            if isinstance(node, (dict, list, tuple, set, frozenset)):
                if key in on_path:
                    raise RecipeError(f"{source}: the document contains itself (a YAML alias inside its own anchor)")
                on_path.add(key)
                stack.append((node, True))
                children = [*node.keys(), *node.values()] if isinstance(node, dict) else list(node)
                keep_alive.append(children)
                stack.extend((child, False) for child in children if id(child) not in sizes)
                if len(on_path) > MAX_DEPTH:
                    raise RecipeError(f"{source}: the document nests deeper than {MAX_DEPTH} levels")
            else:
                chars = len(node) if isinstance(node, (str, bytes)) else 0
                sizes[key] = (1, chars, 0)
            continue
        on_path.discard(key)
        children = [*node.keys(), *node.values()] if isinstance(node, dict) else list(node)
        nodes, chars, depth = 1, 0, 0
        for child in children:
            n, c, d = sizes[id(child)]
            nodes, chars, depth = nodes + n, chars + c, max(depth, d)
        depth += 1
        if nodes > MAX_NODES:
            raise RecipeError(f"{source}: the document expands to more than {MAX_NODES:,} values (YAML aliases "
                              "count as copies)")
        if chars > MAX_TEXT_CHARS:
            raise RecipeError(f"{source}: the document expands to more than {MAX_TEXT_CHARS:,} characters of text "
                              "(YAML aliases count as copies)")
        if depth > MAX_DEPTH:
            raise RecipeError(f"{source}: the document nests deeper than {MAX_DEPTH} levels")
        sizes[key] = (nodes, chars, depth)


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
        parts.append(("." if parts else "") + shorten(item, quote=False))
        node = node.get(item) if isinstance(node, dict) else None
    return "".join(parts) or "(top level)"


_KEY_FIRST = re.compile(r"^([A-Za-z_][\w]*(?:\[\d+\]|\.[A-Za-z_][\w]*)*): ")


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
            message = f"unknown value {shorten(ctx.get('tag'))}; valid: {valid}"
        else:
            message = "required key is missing (it picks the kind of this section)"
    else:
        if message.startswith("Value error, "):
            message = message[len("Value error, "):]
        message = shorten(message, limit=500, quote=False)
        # A section's own check names the key inside the section ("stages[1].stage: ..."): one path, not two.
        named = _KEY_FIRST.match(message)
        if first["type"] == "value_error" and named:
            inner = named.group(1)
            path = inner if path == "(top level)" or inner.startswith(f"{path}.") else (
                f"{path}{inner}" if inner.startswith("[") else f"{path}.{inner}")
            message = message[named.end():]
        if first["type"] not in ("missing",) and "input" in first and not isinstance(first["input"], dict):
            detail = f" (got {shorten(repr(first['input']), quote=False)})"
    more = len(error.errors()) - 1
    suffix = f" [+{more} more error{'s' if more > 1 else ''}]" if more else ""
    return f"{source}: {path}: {message}{detail}{suffix}"


def validate_recipe(data: dict[str, Any], source: str = "recipe") -> Any:
    """Validate a recipe mapping (overrides already applied) into a ``Recipe``; ``${...}`` references are resolved
    here, defaults such as ``output_dir: runs/${name}`` included. Every failure is a one-line ``RecipeError``."""
    try:
        return _validate(data, source)
    except RecipeError:
        raise
    except (RecursionError, MemoryError) as exc:
        raise RecipeError(f"{source}: the recipe is too large or too deeply nested to validate "
                          f"({type(exc).__name__})") from None
    except Exception as exc:  # noqa: BLE001 - whatever a hostile document provokes is still the recipe's fault
        raise RecipeError(f"{source}: invalid recipe ({type(exc).__name__}: {shorten(exc, quote=False)})") from None


def _validate(data: dict[str, Any], source: str) -> Any:
    from ctrlab.config.schema import Recipe

    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a mapping of sections, got {type(data).__name__}")
    check_document(data, source)  # again: overrides may have added to the file's document
    try:
        data = interpolate(fill_interpolated_defaults(Recipe, copy.deepcopy(data)))
    except RecipeError as error:  # interpolation names the key; add the file, as every other message does
        raise RecipeError(f"{source}: {error.message}") from None
    unknown = find_unknown_key(Recipe, data)
    if unknown:
        key, close = unknown
        hint = f" (did you mean {shorten(close)}?)" if close else ""
        raise RecipeError(f"{source}: unknown key {shorten(key)}{hint}")
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
    if not path.is_file():  # a FIFO or a device would block the read forever
        raise RecipeError(f"{path}: is not a regular file (a pipe or a device?), expected a recipe file")
    try:
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise RecipeError(f"{path}: the recipe file is {size:,} bytes; the limit is {MAX_RECIPE_BYTES:,}")
        with path.open("rb") as handle:
            raw = handle.read(MAX_RECIPE_BYTES + 1)  # the file may grow after stat (or be a pipe)
        if len(raw) > MAX_RECIPE_BYTES:
            raise RecipeError(f"{path}: the recipe file is over {MAX_RECIPE_BYTES:,} bytes")
        data = yaml.safe_load(raw.decode("utf-8"))
    except RecipeError:
        raise
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or exc
        raise RecipeError(f"{path}: invalid YAML{where}: {shorten(problem, limit=200, quote=False)}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: recipe is not UTF-8 text") from None
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read recipe file ({exc.strerror or exc})") from None
    except (RecursionError, MemoryError) as exc:
        raise RecipeError(f"{path}: the YAML is nested too deeply or too large to read "
                          f"({type(exc).__name__})") from None
    except Exception as exc:  # noqa: BLE001 - e.g. an integer of 10,000 digits (ValueError from int())
        raise RecipeError(f"{path}: invalid YAML ({type(exc).__name__}: {shorten(exc, quote=False)})") from None
    if data is None:
        raise RecipeError(f"{path}: recipe file is empty")
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    check_document(data, str(path))
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
    """Read, override, interpolate and validate a recipe file; every failure is a one-line ``RecipeError``."""
    data = read_recipe_file(path)
    try:
        for text in overrides:
            keys, value = parse_override(str(text))
            set_path(data, keys, value)
    except RecipeError:
        raise
    except Exception as exc:  # noqa: BLE001 - a hostile override is still a user error
        raise RecipeError(f"{path}: cannot apply the overrides ({type(exc).__name__}: "
                          f"{shorten(exc, quote=False)})") from None
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
