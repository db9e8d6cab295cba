"""A benchmark's results file: one JSON object a line, one line per measured piece (one training in its own
process), identified by a key made of the piece's identity fields. Pieces run side by side write through an
exclusive lock and an atomic rewrite, so no record is ever lost or half-written."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


class ResultsFile:
    """The records at ``path``; ``identity`` names the fields whose values identify a piece; ``lock`` names the
    benchmark in the lock file's name."""

    def __init__(self, path: Path, identity: Sequence[str], lock: str) -> None:
        self.path = path
        self.identity = tuple(identity)
        self.lock = lock

    def key(self, record: dict[str, Any]) -> str:
        return json.dumps([record[name] for name in self.identity], sort_keys=True)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """An exclusive lock (a lock file in the temp folder, not beside the results)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha1(str(self.path).encode()).hexdigest()[:12]
        with open(Path(tempfile.gettempdir()) / f"ctrlab-bench-{self.lock}-{digest}.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def load(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def append(self, record: dict[str, Any]) -> None:
        """Add ``record``, replacing one with the same key, by rewriting the file atomically."""
        with self.locked():
            records = [r for r in self.load() if self.key(r) != self.key(record)]
            records.append(record)
            tmp = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
            tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records), encoding="utf-8")
            os.replace(tmp, self.path)

    def find(self, key: str) -> dict[str, Any] | None:
        with self.locked():
            return next((r for r in self.load() if self.key(r) == key), None)
