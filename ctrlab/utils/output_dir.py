"""Which folders a ctrlab command may write into, decided before any work starts.

Every folder a command writes (a training run, a ranking, a sweep) carries a marker file, ``.ctrlab.json``, saying
which commands wrote it and from which recipe. The rules that follow from it:

* a folder that does not exist, or is empty, is free;
* a folder ctrlab did not make (no marker, and not just a holder of ctrlab-made folders) is never written into,
  whatever the flags: a one-line error asks for another location;
* the working directory, a folder above it, the home directory and the file-system root are never output folders;
* a training run replaces an earlier training run in the same folder only when both come from the same recipe (the
  digest of the recipe as given, less the keys that change nothing computed), or with ``--overwrite``; what other
  commands left in the folder (a ranking, a sweep's trials) is carried into the new run, never deleted;
* a folder that another live ctrlab process is writing right now is refused; what a dead one left is cleaned up.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctrlab.errors import RecipeError
from ctrlab.utils.io import atomic_directory, leftovers, remove_stale, write_json_atomic, writer_stamp

MARKER_FILE = ".ctrlab.json"
# Commands whose folders hold results of their own: another command's folder may sit inside a run (a ranking),
# but a run never swallows another run.
_RUN_COMMANDS = ("train", "sweep")
_NAME_MAX = 255  # bytes in one path component on Linux, macOS and Windows file systems


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The folder's marker (``{"entries": {command: {...}}}``), or None when it has none (or an unreadable one)."""
    try:
        data = json.loads((folder / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("entries"), dict) else None


def _is_ctrlab_made(entry: Path, depth: int = 0) -> bool:
    """A folder with a marker, or one that only holds such folders (the parents ctrlab creates on the way)."""
    if entry.is_symlink() or not entry.is_dir():
        return False
    if read_marker(entry) is not None:
        return True
    if depth >= 3:
        return False
    children = list(entry.iterdir())
    return bool(children) and all(_is_ctrlab_made(child, depth + 1) for child in children)


def _runs_inside(folder: Path) -> list[str]:
    names = []
    for entry in folder.iterdir():
        marker = read_marker(entry) if entry.is_dir() and not entry.is_symlink() else None
        if marker is not None and any(c in marker["entries"] for c in _RUN_COMMANDS):
            names.append(entry.name)
    return sorted(names)


def _listing(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


@dataclass
class OutputFolder:
    """The output folder of one command, checked against the rules above (:meth:`check`) and written either whole
    and atomically (:meth:`build`, a training run) or file by file (:meth:`open`, a ranking or a sweep).

    ``own_entries`` are the names the command writes; on replacement everything else in the folder is carried over.
    """

    path: str | Path
    command: str
    recipe_name: str
    recipe_digest: str
    overwrite: bool = False
    key: str = "output_dir"
    own_entries: frozenset[str] = field(default_factory=frozenset)

    @property
    def target(self) -> Path:
        return Path(self.path).expanduser()

    def _refuse(self, why: str) -> RecipeError:
        return RecipeError(f"{self.key}: '{self.path}' {why}")

    def check(self) -> None:
        """Raise a one-line :class:`RecipeError` unless this command may write the folder; clean up leftovers of
        dead writers of it. Writes nothing else, so it runs before any work."""
        text = str(self.path)
        if not text.strip() or any(ord(c) < 32 for c in text):
            raise self._refuse("is empty or holds control characters; name a folder, e.g. runs/"
                               f"{self.recipe_name}")
        target = self.target
        resolved = target.resolve()
        # Temporary siblings add ~40 characters to the folder's name; refuse a name the file system cannot take now
        # rather than after the work.
        if len(os.fsencode(resolved.name)) > _NAME_MAX - 48:
            raise self._refuse(f"has a folder name of {len(os.fsencode(resolved.name))} bytes; keep it under "
                               f"{_NAME_MAX - 48}")
        cwd = Path.cwd().resolve()
        if resolved == cwd or resolved in cwd.parents:
            raise self._refuse("is the working directory or a folder above it; name a folder for this "
                               f"{self.command}, e.g. runs/{self.recipe_name}")
        if resolved == Path(resolved.anchor) or resolved == Path.home().resolve():
            where = "the file-system root" if resolved == Path(resolved.anchor) else "the home directory"
            raise self._refuse(f"is {where}; name a folder for this {self.command}, e.g. runs/{self.recipe_name}")
        if resolved.parent.is_dir():
            remove_stale(resolved.parent, resolved.name)
            busy = [e for e, alive in leftovers(resolved.parent, resolved.name)
                    if alive and e.name.endswith(".partial") and f".p{os.getpid()}-" not in e.name]
            if busy:
                raise self._refuse(f"is being written by another ctrlab process right now ({busy[0].name}); wait "
                                   "for it or choose another location")
        if resolved.exists() and not resolved.is_dir():
            raise self._refuse("exists and is not a folder; choose another location")
        self._check_writable(resolved)
        if resolved.is_dir():
            self._check_existing(resolved)

    def _check_writable(self, resolved: Path) -> None:
        probe = resolved
        while not probe.exists():
            probe = probe.parent
        if not probe.is_dir():
            raise self._refuse(f"cannot be created: '{probe}' is a file")
        if not os.access(probe, os.W_OK | os.X_OK):
            raise self._refuse(f"cannot be written: no write permission on '{probe}'")
        # os.access says yes to root everywhere, /proc and read-only mounts included: try it for real (a folder
        # named like this run's own temporaries, removed at once), so that no work is done for nothing.
        try:
            os.rmdir(tempfile.mkdtemp(prefix=f".{resolved.name}.{writer_stamp()}.", suffix=".partial", dir=probe))
        except OSError as error:
            raise self._refuse(f"cannot be written: {error.strerror or error} in '{probe}'") from None

    def _check_existing(self, folder: Path) -> None:
        marker = read_marker(folder)
        if marker is not None:
            earlier = marker["entries"].get(self.command)
            if (self.command == "train" and isinstance(earlier, dict) and earlier.get("digest") != self.recipe_digest
                    and not self.overwrite):
                raise self._refuse(f"holds a run of another recipe ('{earlier.get('recipe', '?')}', or other "
                                   "settings); pass --overwrite to replace that run, or choose another location")
            return
        entries = [e for e in folder.iterdir()]
        if not entries:
            return
        names = {e.name for e in entries}
        earlier_run = ({"recipe.yaml", "processor.json", "model.safetensors", "metrics.json"} <= names and
                       all(e.name in self.own_entries or _is_ctrlab_made(e) for e in entries))
        if self.command == "train" and earlier_run:
            if self.overwrite:
                return
            raise self._refuse("holds an earlier ctrlab run; pass --overwrite to replace it, or choose another "
                               "location")
        foreign = sorted(e.name for e in entries if not _is_ctrlab_made(e))
        if foreign:
            raise self._refuse(f"exists and was not made by ctrlab (it holds {_listing(foreign)}); ctrlab never "
                               "writes into such a folder: choose another location")
        runs = _runs_inside(folder)
        if runs:
            raise self._refuse(f"holds other ctrlab runs ({_listing(runs)}); give this {self.command} a folder of "
                               "its own")

    def _marker(self, existing: Path) -> dict[str, Any]:
        previous = read_marker(existing) if existing.is_dir() else None
        entries = dict(previous["entries"]) if previous is not None else {}
        entries[self.command] = {"recipe": self.recipe_name, "digest": self.recipe_digest,
                                 "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        return {"written_by": "ctrlab", "entries": entries}

    @contextmanager
    def build(self) -> Iterator[Path]:
        """Check, then yield a temporary folder that replaces the target whole when the block succeeds (see
        :func:`~ctrlab.utils.io.atomic_directory`); entries that are not ``own_entries`` are carried over. The
        check runs again just before the swap, in case the target changed hands meanwhile."""
        self.check()
        with atomic_directory(self.target, carry=lambda name: name not in self.own_entries | {MARKER_FILE},
                              before_swap=self.check) as tmp:
            yield tmp
            write_json_atomic(tmp / MARKER_FILE, self._marker(self.target))

    def open(self) -> Path:
        """Check, create the folder if needed and mark it; the caller writes its files (each one atomically)."""
        self.check()
        target = self.target
        target.mkdir(parents=True, exist_ok=True)
        write_json_atomic(target / MARKER_FILE, self._marker(target))
        return target
