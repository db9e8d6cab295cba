"""Atomic file and directory writes: a crash or an error never leaves a half-written artefact behind, and whatever a
killed process (``kill -9``, a power cut) did leave is recognised and removed by the next writer of the same path.

Temporary names carry their writer's identity (``.NAME.p<pid>-<start time>.<random>.partial`` / ``.old`` / ``.tmp``),
so a later writer can tell a leftover of a dead process, which it removes (or, for a swap cut short, restores), from
the work of a live one, which it leaves alone.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_STAMP = re.compile(r"p(\d+)-(\d+)\.[^.]+\.(partial|old|tmp)")
_CARRY_FILE = "carry.json"
_PREVIOUS = "previous"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _start_time(pid: int) -> int:
    """The process's start time in clock ticks since boot (Linux), 0 where /proc is not available."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            # Field 22; the command name (field 2) may hold spaces and parentheses, so count from the last ')'.
            return int(handle.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return 0


def writer_stamp() -> str:
    """``p<pid>-<start time>``: this process, in a way that survives pid reuse."""
    pid = os.getpid()
    return f"p{pid}-{_start_time(pid)}"


def _is_alive(pid: int, start: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, belongs to someone else
        pass
    return start == 0 or _start_time(pid) in (0, start)


def leftovers(parent: Path, name: str) -> list[tuple[Path, bool]]:
    """Temporaries beside ``parent / name`` written by ctrlab for that name, each with whether its writer is alive."""
    found: list[tuple[Path, bool]] = []
    prefix = f".{name}."
    try:
        entries = list(parent.iterdir())
    except OSError:
        return found
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        match = _STAMP.fullmatch(entry.name[len(prefix):])
        if match:
            found.append((entry, _is_alive(int(match.group(1)), int(match.group(2)))))
    return found


def remove_stale(parent: Path, name: str) -> list[Path]:
    """Clean up what dead writers of ``parent / name`` left: half-built ``.partial`` folders and ``.tmp`` files are
    removed; an ``.old`` folder (a swap cut short) is first put back: the previous folder is restored when ``name``
    is missing, else the entries it was carrying over are moved into ``name``. Returns what was removed."""
    removed: list[Path] = []
    for entry, alive in leftovers(parent, name):
        if alive:
            continue
        if entry.name.endswith(".old"):
            _finish_swap(entry, parent / name)
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


_ANY_STAMPED = re.compile(r"\.(.+)\.p\d+-\d+\.[^.]+\.(partial|old|tmp)")


def remove_stale_in(parent: Path) -> list[Path]:
    """:func:`remove_stale` for every name in ``parent`` that has leftovers (a sweep's trial folders, whose numbers
    are not reused, so no later writer of the same name would ever clean them up)."""
    try:
        names = {m.group(1) for e in parent.iterdir() if (m := _ANY_STAMPED.fullmatch(e.name))}
    except OSError:
        return []
    return [removed for name in sorted(names) for removed in remove_stale(parent, name)]


def _finish_swap(old: Path, target: Path) -> None:
    previous = old / _PREVIOUS
    if not previous.exists():
        return
    if not target.exists():
        os.replace(previous, target)
        return
    try:
        carry = json.loads((old / _CARRY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        carry = []
    for name in carry if isinstance(carry, list) else []:
        source, destination = previous / str(name), target / str(name)
        if source.exists() and not destination.exists():
            os.replace(source, destination)


def _make_parents(path: Path) -> list[Path]:
    """Create the missing ancestors of ``path``; returns those created, deepest first (to undo on failure)."""
    missing: list[Path] = []
    parent = path.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    path.parent.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_empty(directories: list[Path]) -> None:
    for directory in directories:
        try:
            directory.rmdir()
        except OSError:
            break


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, on error removed."""
    path = Path(path)
    created = _make_parents(path)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.{writer_stamp()}.", suffix=".tmp", dir=path.parent)
    except BaseException:
        _remove_empty(created)
        raise
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; artefacts get the usual permissions
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        _remove_empty(created)
        as_os = os_error(error, path)
        if as_os is not None and as_os is not error:
            raise as_os from None
        raise


_OS_ERROR_NUMBER = re.compile(r"os error (\d+)")


def os_error(error: BaseException, path: Path) -> OSError | None:
    """The operating-system failure behind ``error`` as an ``OSError`` naming ``path``, or None when it is not one.

    polars and safetensors report a full disk as their own exception types ("... (os error 28)"); turning those
    into ``OSError`` lets one handler (the CLI's, the cache's) deal with every writer the same way."""
    if isinstance(error, OSError):
        return error if error.filename else OSError(error.errno, error.strerror or str(error), str(path))
    if not isinstance(error, Exception):
        return None
    match = _OS_ERROR_NUMBER.search(str(error))
    if match is None:
        return None
    number = int(match.group(1))
    return OSError(number, os.strerror(number), str(path))


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def finite_json(data: Any) -> Any:
    """``data`` with every NaN or infinite float replaced by ``None``: JSON has no such numbers (Python writes a bare
    ``NaN`` that other parsers reject), and an undefined metric is better read as null than as a crash."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: finite_json(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_json(value) for value in data]
    if hasattr(data, "item") and callable(data.item) and getattr(data, "ndim", None) == 0:  # numpy / torch scalars
        return finite_json(data.item())
    return data


def json_text(data: Any, indent: int | None = 2) -> str:
    """Strict JSON (no NaN or Infinity, see :func:`finite_json`)."""
    return json.dumps(finite_json(data), indent=indent, sort_keys=False, allow_nan=False)


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json_text(data) + "\n")


@contextmanager
def atomic_directory(path: str | Path, carry: Callable[[str], bool] | None = None,
                     before_swap: Callable[[], None] | None = None) -> Iterator[Path]:
    """Build a directory under a temporary name; on success it replaces ``path``, on error it is removed (with any
    parent folders this call created).

    ``carry(name)`` picks entries of an existing ``path`` that belong to someone else (a ranking, a sweep's trials)
    and move into the new directory instead of being discarded; the new directory's own entries win. ``before_swap``
    runs just before the swap and may raise to abort it (a last check that the target is still ours to replace).
    Leftovers of dead writers of ``path`` are cleaned up first (:func:`remove_stale`)."""
    path = Path(path)
    created = _make_parents(path)
    remove_stale(path.parent, path.name)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{writer_stamp()}.", suffix=".partial", dir=path.parent))
    except BaseException:
        _remove_empty(created)
        raise
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if before_swap is not None:
            before_swap()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise
    if not path.exists():
        os.replace(tmp, path)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.{writer_stamp()}.", suffix=".old", dir=path.parent))
    try:
        kept = sorted(e.name for e in path.iterdir() if carry is not None and carry(e.name) and
                      not (tmp / e.name).exists())
        # Written before anything moves: a crash from here on is finished by the next writer (remove_stale).
        (old / _CARRY_FILE).write_text(json.dumps(kept), encoding="utf-8")
        os.replace(path, old / _PREVIOUS)
        os.replace(tmp, path)
    except BaseException:
        if not path.exists() and (old / _PREVIOUS).exists():
            os.replace(old / _PREVIOUS, path)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
        raise
    _finish_swap(old, path)
    shutil.rmtree(old, ignore_errors=True)
