"""The on-disk cache of encoded splits: one verified entry per (data, features, label, group column).

An entry is a directory ``<cache_dir>/<key>/`` holding ``processor.json`` and ``train/valid/test.parquet``, plus a
``manifest.json`` written last that records every file's size and SHA-256 checksum, each split's row count and the
key's inputs. A reader trusts an entry only when all of that checks out; anything else (a truncated or altered file,
a missing one, a manifest that does not parse, an entry of other data) is a one-line warning naming the entry, and
the caller rebuilds it. The cache is optional: when it cannot be read or written (full disk, file size limit,
permissions, ``cache_dir`` being a file) the run warns once and goes on with the splits it holds in memory.

The streamed pipeline writes the same files (its splits in row groups of ``dataset.chunk_rows`` rows, see
:mod:`ctrlab.data.stream`), and its entries are verified the same way without loading the splits
(:func:`verify_streamed_entry`). It encodes straight into the entry (:meth:`EncodedCache.build`); when the cache is
off or cannot be written, into a temporary folder instead, since streamed splits must live on disk.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from rich.console import Console

from ctrlab.config.dataset import DatasetConfig
from ctrlab.config.features import FeaturesConfig
from ctrlab.data.encoded import EncodedSplit
from ctrlab.data.processor import FORMAT_VERSION, FeatureProcessor
from ctrlab.data.splits import SPLITS
from ctrlab.utils.io import atomic_directory, write_json_atomic

# 2: manifest.json with sizes, checksums and row counts replaced complete.json. The version is part of the key, so
# entries of an older layout are never looked up again (and never misread).
CACHE_LAYOUT_VERSION = 2
MANIFEST = "manifest.json"
PROCESSOR_FILE = "processor.json"
_CHUNK = 1 << 20


def default_cache_dir(config: DatasetConfig) -> Path:
    """``dataset.cache_dir`` > ``$CTRLAB_CACHE_DIR`` > ``~/.cache/ctrlab``."""
    if config.cache_dir:
        return Path(config.cache_dir).expanduser()
    env = os.environ.get("CTRLAB_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ctrlab"


def key_payload(fingerprint: dict[str, Any], features: FeaturesConfig, label: str,
                group_by: str | None) -> dict[str, Any]:
    """Everything an entry's contents depend on, as JSON-ready data."""
    payload = {
        "layout": CACHE_LAYOUT_VERSION, "processor": FORMAT_VERSION, "data": fingerprint,
        "features": features.model_dump(mode="json"), "label": label, "group_by": group_by,
    }
    # A round trip through JSON makes it compare equal to the copy read back from a manifest.
    return json.loads(json.dumps(payload, sort_keys=True, default=str))


def cache_key(fingerprint: dict[str, Any], features: FeaturesConfig, label: str, group_by: str | None) -> str:
    """The entry name: a hash of :func:`key_payload`."""
    payload = key_payload(fingerprint, features, label, group_by)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def file_checksum(path: Path) -> str:
    """SHA-256 of the file's bytes, read in chunks so that a large split never sits in memory twice. (SHA-256, not
    BLAKE2b: with the CPUs' SHA instructions it hashes at about 1.5 GB/s, BLAKE2b at 0.65.)"""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


class CacheEntryDamaged(Exception):
    """An entry that exists but cannot be trusted; the message says which file and what is wrong."""


@dataclass
class CachedSplits:
    """What a verified entry holds."""

    processor: FeatureProcessor
    splits: dict[str, EncodedSplit]


@dataclass
class CachedStreams:
    """A verified entry of the streamed pipeline: its processor and the paths of its split files (not loaded)."""

    processor: FeatureProcessor
    paths: dict[str, Path]


def _os_reason(exc: OSError, entry: Path | None = None) -> str:
    """The OS's words for ``exc``; for a path through a regular file, which file (the OS says only "File exists" or
    "Not a directory", which does not tell the user what to fix)."""
    if entry is not None and exc.errno in (errno.EEXIST, errno.ENOTDIR):
        for parent in entry.parents:
            try:
                if parent.exists() and not parent.is_dir():
                    return f"{parent} is a file, not a directory"
            except OSError:
                break
    return exc.strerror or str(exc) or type(exc).__name__


def _excerpt(exc: BaseException, limit: int = 200) -> str:
    text = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _entry_files() -> list[str]:
    return [PROCESSOR_FILE, *(f"{s}.parquet" for s in SPLITS)]


def _read_manifest(entry: Path, key: str, payload: dict[str, Any]) -> dict[str, Any]:
    path = entry / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CacheEntryDamaged(f"{MANIFEST} is missing") from None
    except UnicodeDecodeError:
        raise CacheEntryDamaged(f"{MANIFEST} is not text") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CacheEntryDamaged(f"{MANIFEST} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    if not isinstance(manifest, dict):
        raise CacheEntryDamaged(f"{MANIFEST} is not a JSON object")
    if manifest.get("layout") != CACHE_LAYOUT_VERSION:
        raise CacheEntryDamaged(f"{MANIFEST} has layout {manifest.get('layout')!r}, expected {CACHE_LAYOUT_VERSION}")
    # The key is a hash; comparing what it was made of means an entry renamed or copied under another key (or a hash
    # collision) never serves another recipe's data.
    if manifest.get("key") != key or manifest.get("payload") != payload:
        raise CacheEntryDamaged(f"{MANIFEST} describes other data or features (key {manifest.get('key')!r})")
    files, rows = manifest.get("files"), manifest.get("rows")
    if not isinstance(files, dict) or sorted(files) != sorted(_entry_files()):
        raise CacheEntryDamaged(f"{MANIFEST} does not list the files {', '.join(_entry_files())}")
    for name, record in files.items():
        if not (isinstance(record, dict) and isinstance(record.get("bytes"), int)
                and isinstance(record.get("sha256"), str)):
            raise CacheEntryDamaged(f"{MANIFEST}: the record of {name} lacks its bytes or sha256")
    if not isinstance(rows, dict) or any(not isinstance(rows.get(s), int) for s in SPLITS):
        raise CacheEntryDamaged(f"{MANIFEST} lacks the row counts of {', '.join(SPLITS)}")
    return manifest


def _check_file(entry: Path, name: str, record: dict[str, Any]) -> None:
    path = entry / name
    try:
        info = path.stat()
    except FileNotFoundError:
        raise CacheEntryDamaged(f"{name} is missing") from None
    if not stat.S_ISREG(info.st_mode):
        raise CacheEntryDamaged(f"{name} is not a regular file")
    if info.st_size != record["bytes"]:
        raise CacheEntryDamaged(f"{name}: {info.st_size:,} bytes, manifest says {record['bytes']:,}")
    if file_checksum(path) != record["sha256"]:
        raise CacheEntryDamaged(f"{name}: checksum differs from the manifest's (same size, altered bytes)")


def _verify_files(entry: Path, key: str, payload: dict[str, Any]) -> tuple[dict[str, Any], FeatureProcessor]:
    """The entry's manifest and loaded processor, once every file matches the manifest."""
    try:
        is_dir = entry.is_dir()
    except OSError:
        is_dir = False
    if not is_dir:
        raise CacheEntryDamaged("it is not a directory")
    manifest = _read_manifest(entry, key, payload)
    for name in _entry_files():
        _check_file(entry, name, manifest["files"][name])
    # The checksums matched, so a failure below means the entry was written wrong (or by an incompatible version):
    # still a damaged entry, not the user's problem.
    try:
        processor = FeatureProcessor.load(entry / PROCESSOR_FILE)
        _ = processor.layout  # a processor whose layout cannot be built is damaged too
    except (MemoryError, OSError):
        raise
    except Exception as exc:  # noqa: BLE001 - any failure to load means the entry cannot be used
        raise CacheEntryDamaged(f"{PROCESSOR_FILE} does not load ({_excerpt(exc)})") from exc
    return manifest, processor


def verify_entry(entry: Path, key: str, payload: dict[str, Any]) -> CachedSplits:
    """Check an entry against its manifest and load it.

    Raises :class:`CacheEntryDamaged` when the entry cannot be trusted, and :class:`OSError` when the file system
    refuses to let it be read (permissions, I/O errors)."""
    manifest, processor = _verify_files(entry, key, payload)
    layout = processor.layout
    splits: dict[str, EncodedSplit] = {}
    for split in SPLITS:
        name = f"{split}.parquet"
        try:
            splits[split] = EncodedSplit.from_parquet(entry / name, layout)
        except (MemoryError, OSError):
            raise
        except Exception as exc:  # noqa: BLE001
            raise CacheEntryDamaged(f"{name} does not load ({_excerpt(exc)})") from exc
        if len(splits[split]) != manifest["rows"][split]:
            raise CacheEntryDamaged(f"{name}: {len(splits[split]):,} rows, manifest says {manifest['rows'][split]:,}")
    return CachedSplits(processor, splits)


def verify_streamed_entry(entry: Path, key: str, payload: dict[str, Any]) -> CachedStreams:
    """:func:`verify_entry` for an entry of the streamed pipeline: sizes, checksums, the processor and each split's
    row count (from its parquet footer) are checked; the splits are not loaded."""
    manifest, processor = _verify_files(entry, key, payload)
    paths: dict[str, Path] = {}
    for split in SPLITS:
        name = f"{split}.parquet"
        try:
            rows = pq.ParquetFile(entry / name).metadata.num_rows
        except (MemoryError, OSError):
            raise
        except Exception as exc:  # noqa: BLE001
            raise CacheEntryDamaged(f"{name} does not load ({_excerpt(exc)})") from exc
        if rows != manifest["rows"][split]:
            raise CacheEntryDamaged(f"{name}: {rows:,} rows, manifest says {manifest['rows'][split]:,}")
        paths[split] = entry / name
    return CachedStreams(processor, paths)


def fill_entry(folder: Path, key: str, payload: dict[str, Any], fill: Callable[[Path], dict[str, int]]) -> None:
    """Write an entry's files into ``folder``: ``fill(folder)`` writes ``processor.json`` and the split files and
    returns each split's row count; the manifest goes last."""
    rows = fill(folder)
    files = {name: {"bytes": (folder / name).stat().st_size, "sha256": file_checksum(folder / name)}
             for name in _entry_files()}
    write_json_atomic(folder / MANIFEST, {
        "layout": CACHE_LAYOUT_VERSION, "key": key, "files": files, "rows": {s: rows[s] for s in SPLITS},
        "payload": payload,
    })


def write_entry(entry: Path, key: str, payload: dict[str, Any], processor: FeatureProcessor,
                splits: dict[str, EncodedSplit]) -> None:
    """Write an entry whole (replacing any entry of that name); the manifest goes last, so an entry without one was
    never finished. Raises :class:`OSError` when the file system refuses; nothing half-written stays behind."""
    layout = processor.layout

    def fill(folder: Path) -> dict[str, int]:
        processor.save(folder / PROCESSOR_FILE)
        for split in SPLITS:
            splits[split].to_parquet(folder / f"{split}.parquet", layout)
        return {s: len(splits[s]) for s in SPLITS}

    with atomic_directory(entry) as tmp:
        fill_entry(tmp, key, payload, fill)


class EncodedCache:
    """The cache directory as the data pipeline uses it: :meth:`read` returns a verified entry or ``None`` (after a
    one-line warning when an entry was there but unusable), :meth:`write` stores one or warns that it could not.
    Neither ever fails the run."""

    def __init__(self, root: Path, console: Console) -> None:
        self.root = root
        self.console = console
        self._damaged: set[str] = set()

    def entry(self, key: str) -> Path:
        return self.root / key

    def _warn(self, message: str) -> None:
        # One line whatever the terminal width or the wrapped exception's text; markup off: paths may hold brackets.
        self.console.print(f"warning: {' '.join(message.split())}", highlight=False, markup=False, soft_wrap=True)

    def read(self, key: str, payload: dict[str, Any]) -> CachedSplits | None:
        return self._read(key, payload, verify_entry)

    def read_streamed(self, key: str, payload: dict[str, Any]) -> CachedStreams | None:
        """:meth:`read` for an entry of the streamed pipeline (verified, not loaded)."""
        return self._read(key, payload, verify_streamed_entry)

    def _read(self, key: str, payload: dict[str, Any],
              verify: Callable[[Path, str, dict[str, Any]], Any]) -> Any:
        entry = self.entry(key)
        try:
            os.lstat(entry)
        except (FileNotFoundError, NotADirectoryError):
            return None  # a plain miss; a cache_dir that is a file is reported once, when writing fails
        except OSError as exc:
            self._warn(f"cache: cannot read {entry}: {_os_reason(exc)}; encoding the data again")
            return None
        try:
            return verify(entry, key, payload)
        except CacheEntryDamaged as exc:
            self._damaged.add(key)
            self._warn(f"cache entry {entry} is damaged ({exc}); rebuilding it")
        except OSError as exc:
            where = exc.filename or entry
            self._warn(f"cache: cannot read {where}: {_os_reason(exc)}; encoding the data again")
        return None

    def write(self, key: str, payload: dict[str, Any], processor: FeatureProcessor,
              splits: dict[str, EncodedSplit]) -> bool:
        entry = self.entry(key)
        try:
            write_entry(entry, key, payload, processor, splits)
            return True
        except OSError as exc:
            self._warn(f"cache: cannot write {entry}: {_os_reason(exc, entry)}; continuing without the cache")
        self._forget_damaged(key)
        return False

    def build(self, key: str, payload: dict[str, Any], fill: Callable[[Path], dict[str, int]]) -> Path | None:
        """Build an entry in place with ``fill`` (see :func:`fill_entry`; the streamed pipeline encodes straight
        into it) and return it; None, after a one-line warning, when the file system refuses (the caller then
        builds elsewhere). Any other error of ``fill`` propagates, and nothing half-written stays behind."""
        entry = self.entry(key)
        try:
            with atomic_directory(entry) as tmp:
                fill_entry(tmp, key, payload, fill)
            return entry
        except OSError as exc:
            named = Path(exc.filename) if isinstance(exc.filename, str) else None
            if named is not None and self.root not in (named, *named.parents):
                raise  # the input, not the cache, failed: building elsewhere would fail the same way
            self._warn(f"cache: cannot write {entry}: {_os_reason(exc, entry)}; encoding into a temporary folder")
        self._forget_damaged(key)
        return None

    def _forget_damaged(self, key: str) -> None:
        entry = self.entry(key)
        if key in self._damaged:
            # A damaged entry that could not be replaced would warn on every run; without it the next run just
            # misses. Best effort: the same file system just refused a write.
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                try:
                    entry.unlink()
                except OSError:
                    pass
