"""Dataset cards: named, checksummed descriptions of the real datasets a recipe can use with ``dataset.card``.

A card is a YAML file in the repository's top-level ``datasets/`` folder (installed as the import package
``ctrlab_datasets``). It says which files make up the dataset (paths relative to a data directory, with the sha256 of
the stored bytes and their row counts), how to read them, which column is the label, the default features and how
the rows are split. The data files themselves are never part of the repository or the package: their terms forbid
redistribution, so they are read in place from the data directory (``--data-dir`` or ``$CTRLAB_DATA_DIR``).

Public API: :class:`DatasetCard` (with :meth:`DatasetCard.load` and :meth:`DatasetCard.status`), :func:`list_cards`,
:func:`load_card`, :func:`resolve_data_dir` and :func:`datasets_table`.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import polars as pl
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from rich.table import Table

from ctrlab.config.dataset import SplitConfig
from ctrlab.config.features import FeaturesConfig
from ctrlab.data.readers import read_table
from ctrlab.errors import CtrlabError, DataError

__all__ = [
    "CardFile",
    "CardStatus",
    "DatasetCard",
    "datasets_table",
    "file_sha256",
    "list_cards",
    "load_card",
    "resolve_data_dir",
]

DATA_DIR_ENV = "CTRLAB_DATA_DIR"
_GIVEN_ROLES = ("train", "valid", "test")
_CHUNK = 1 << 20  # 1 MiB


class CardFile(BaseModel):
    """One file of a dataset card, with how to read it and what it should hash to."""

    model_config = ConfigDict(extra="forbid")

    path: str
    """Path relative to the data directory, e.g. ``frappe/x1/train.csv.gz``."""
    sha256: str | None = None
    """sha256 of the stored file bytes (the ``.gz`` as it lies on disk); ``None`` skips verification."""
    rows: int | None = None
    """Number of data rows (shown by ``ctrlab datasets list``; checked by the tests)."""
    format: Literal["csv", "tsv", "parquet", "libfm"] | None = None
    """File format; ``None`` infers it from the file name."""
    header: bool = True
    separator: str | None = None
    columns: list[str] | None = None
    """Column names for a header-less file (label first for libFM)."""

    @model_validator(mode="after")
    def _check(self) -> "CardFile":
        if Path(self.path).is_absolute() or ".." in Path(self.path).parts:
            raise ValueError(f"file path {self.path!r} must be relative to the data directory, without '..'")
        if self.sha256 is not None:
            digest = self.sha256.lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(f"sha256 of {self.path!r} must be 64 hex digits")
            self.sha256 = digest
        if not self.header and self.format != "libfm" and self.columns is None:
            raise ValueError(f"{self.path!r} has no header; name its columns")
        return self


@dataclass
class CardStatus:
    """Whether a card's files are present in a data directory (existence only; checksums are checked on load)."""

    available: bool
    missing: list[str] = field(default_factory=list)
    """Relative paths of the card's files that are absent (all of them when there is no data directory)."""
    rows: dict[str, int | None] = field(default_factory=dict)
    """Documented data rows per file role."""


class DatasetCard(BaseModel):
    """A named real dataset: its files, label, default features and split.

    Files are read in place from a data directory. ``load`` returns ``{"train", "valid", "test"}`` frames for a
    ``given`` split and ``{"all": frame}`` for a ``random`` or ``time`` split (the caller splits it as ``split``
    says). Datasets that need joins name a ``loader`` (``"module:function"`` inside ``ctrlab_datasets``), called
    as ``function(card, data_dir)``; then ``files`` may use any role names.
    """

    model_config = ConfigDict(extra="forbid")

    name: str
    title: str
    description: str
    source_url: str
    terms: str
    label: str
    """The label column in the loaded frames (values 0/1, as strings)."""
    label_map: dict[str, str] = {}
    """Raw label value -> ``"0"``/``"1"`` (e.g. ``{"-1": "0"}`` for libFM-style labels); applied on load."""
    files: dict[str, CardFile]
    features: FeaturesConfig
    """The features a recipe gets when it names this card and gives none of its own."""
    split: SplitConfig
    group_by: str | None = None
    """Column whose values group rows for gAUC (e.g. a user id)."""
    drop_columns: list[str] = []
    loader: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "DatasetCard":
        if not self.files:
            raise ValueError("a card needs at least one file")
        if self.loader is None:
            roles = set(self.files)
            if self.split.kind == "given" and roles != set(_GIVEN_ROLES):
                raise ValueError(f"a given split needs files train, valid and test; got {', '.join(sorted(roles))}")
            if self.split.kind != "given" and roles != {"all"}:
                got = ", ".join(sorted(roles))
                raise ValueError(f"a {self.split.kind} split needs one file with role 'all'; got {got}")
        else:
            module, sep, function = self.loader.partition(":")
            if not sep or not module or not function:
                raise ValueError(f"loader must look like 'module:function', got {self.loader!r}")
            if self.split.kind == "given":
                raise ValueError("a card with a loader must use a random or time split (the loader returns one frame)")
        for key, value in self.label_map.items():
            if value not in ("0", "1"):
                raise ValueError(f"label_map must map to '0' or '1', got {key!r}: {value!r}")
        if self.label in self.drop_columns or (self.group_by is not None and self.group_by in self.drop_columns):
            raise ValueError("drop_columns must not name the label or group_by column")
        dropped = sorted(set(self.drop_columns) & set(self.features.columns()))
        if dropped:
            raise ValueError(f"drop_columns names feature columns: {', '.join(dropped)}")
        return self

    # ------------------------------------------------------------------ files

    def file_paths(self, data_dir: Path) -> dict[str, Path]:
        """Absolute path of every file role under ``data_dir``."""
        return {role: Path(data_dir) / spec.path for role, spec in self.files.items()}

    def status(self, data_dir: Path | None) -> CardStatus:
        """Which of this card's files exist under ``data_dir`` (no checksums; cheap)."""
        rows = {role: spec.rows for role, spec in self.files.items()}
        if data_dir is None:
            return CardStatus(available=False, missing=[f.path for f in self.files.values()], rows=rows)
        missing = [spec.path for spec in self.files.values() if not (Path(data_dir) / spec.path).is_file()]
        return CardStatus(available=not missing, missing=missing, rows=rows)

    def verify(self, data_dir: Path) -> None:
        """Check that every file exists and hashes to its documented sha256; raise :class:`DataError` if not."""
        paths = self._existing_paths(data_dir)
        for role, path in paths.items():
            expected = self.files[role].sha256
            if expected is None:
                continue
            actual = file_sha256(path)
            if actual != expected:
                raise DataError(
                    f"{path}: sha256 mismatch (dataset card '{self.name}' expects {expected[:12]}..., "
                    f"file has {actual[:12]}...); the file is corrupt or a different version, restore the original"
                )

    def _existing_paths(self, data_dir: Path | None) -> dict[str, Path]:
        if data_dir is None:
            raise DataError(
                f"dataset card '{self.name}' needs a data directory; set {DATA_DIR_ENV} or --data-dir"
            )
        paths = self.file_paths(Path(data_dir))
        for path in paths.values():
            if not path.is_file():
                raise DataError(
                    f"{path}: data file not found (dataset card '{self.name}'; set {DATA_DIR_ENV} or --data-dir)"
                )
        return paths

    def read_file(self, role: str, data_dir: Path) -> pl.DataFrame:
        """Read one file of the card with its declared format, header, separator and columns (all strings)."""
        spec = self.files[role]
        return read_table(
            Path(data_dir) / spec.path,
            spec.format,
            separator=spec.separator,
            header=spec.header,
            columns=spec.columns,
        )

    # ------------------------------------------------------------------ loading

    def load(self, data_dir: Path | None, *, verify: bool = True) -> dict[str, pl.DataFrame]:
        """Read the dataset: ``{"train","valid","test"}`` for a given split, else ``{"all"}``.

        Every file's sha256 is verified first (unless ``verify=False``). The label is mapped through
        ``label_map`` and must then be 0/1 on every row: rows are never dropped, a bad label is an error.
        ``drop_columns`` are removed; the label, ``group_by``, feature and time-split columns must be present.
        """
        paths = self._existing_paths(data_dir)
        assert data_dir is not None
        data_dir = Path(data_dir)
        if verify:
            self.verify(data_dir)
        if self.loader is not None:
            frames = self._call_loader(data_dir)
            sources = {role: f"dataset card '{self.name}' ({role} frame of loader {self.loader})" for role in frames}
        else:
            frames = {role: self.read_file(role, data_dir) for role in self.files}
            sources = {role: str(path) for role, path in paths.items()}
        expected = set(_GIVEN_ROLES) if self.split.kind == "given" else {"all"}
        if set(frames) != expected:
            raise DataError(
                f"dataset card '{self.name}': loading gave frames {', '.join(sorted(frames))}, "
                f"expected {', '.join(sorted(expected))}"
            )
        return {role: self._finish(frames[role], sources[role]) for role in sorted(frames, key=_role_order)}

    def _call_loader(self, data_dir: Path) -> dict[str, pl.DataFrame]:
        assert self.loader is not None
        module_name, _, function_name = self.loader.partition(":")
        try:
            module = importlib.import_module(f"ctrlab_datasets.{module_name}")
        except ModuleNotFoundError:
            raise CtrlabError(
                f"dataset card '{self.name}': loader module 'ctrlab_datasets.{module_name}' not found; "
                "check the card's loader or reinstall ctrlab"
            ) from None
        function: Callable[[DatasetCard, Path], dict[str, pl.DataFrame]] | None = getattr(module, function_name, None)
        if function is None:
            raise CtrlabError(
                f"dataset card '{self.name}': loader function '{function_name}' not found "
                f"in ctrlab_datasets.{module_name}"
            )
        return function(self, data_dir)

    def _finish(self, frame: pl.DataFrame, source: str) -> pl.DataFrame:
        if self.label not in frame.columns:
            raise DataError(f"{source}: label column '{self.label}' not found (dataset card '{self.name}')")
        label = pl.col(self.label).cast(pl.String).str.strip_chars()
        if self.label_map:
            label = label.replace(self.label_map)
        frame = frame.with_columns(label.alias(self.label))
        bad = frame.filter(~pl.col(self.label).is_in(["0", "1"]) | pl.col(self.label).is_null())
        if bad.height:
            values = bad.get_column(self.label).unique().head(5).to_list()
            raise DataError(
                f"{source}: {bad.height} rows have a label outside 0/1 in column '{self.label}' "
                f"(e.g. {', '.join(repr(v) for v in values)}); add a label_map to dataset card '{self.name}'"
            )
        drop = [c for c in self.drop_columns if c in frame.columns]
        frame = frame.drop(drop)
        needed = [*self.features.columns()]
        if self.group_by:
            needed.append(self.group_by)
        if self.split.time_column:
            needed.append(self.split.time_column)
        absent = [c for c in dict.fromkeys(needed) if c not in frame.columns]
        if absent:
            raise DataError(
                f"{source}: columns {', '.join(absent)} named by dataset card '{self.name}' are not in the data"
            )
        return frame

    # ------------------------------------------------------------------ display

    def split_summary(self) -> str:
        """A short human description of the split, e.g. ``random 0.8/0.1/0.1 (seed 2021)``."""
        if self.split.kind == "given":
            return "given (" + "/".join(r for r in _GIVEN_ROLES if r in self.files) + ")"
        fractions = "/".join(f"{f:g}" for f in self.split.fractions)
        if self.split.kind == "time":
            return f"time by {self.split.time_column} {fractions}"
        seed = f" (seed {self.split.seed})" if self.split.seed is not None else ""
        return f"random {fractions}{seed}"


def _role_order(role: str) -> tuple[int, str]:
    order = {"train": 0, "valid": 1, "test": 2, "all": 3}
    return (order.get(role, 9), role)


# ---------------------------------------------------------------------- checksums

_HASH_MEMO: dict[tuple[str, int, int], str] = {}
_HASH_LOCK = threading.Lock()


def file_sha256(path: str | Path) -> str:
    """sha256 (hex) of a file's bytes, read in 1 MiB chunks; memoised per (path, size, mtime_ns) in this process."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _HASH_LOCK:
        cached = _HASH_MEMO.get(key)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    value = digest.hexdigest()
    with _HASH_LOCK:
        _HASH_MEMO[key] = value
    return value


# ---------------------------------------------------------------------- registry of cards


def cards_dir() -> Path:
    """The folder holding the card YAML files (the ``ctrlab_datasets`` package)."""
    import ctrlab_datasets

    directory = getattr(ctrlab_datasets, "CARDS_DIR", None)
    if directory is not None:
        return Path(directory)
    return Path(next(iter(ctrlab_datasets.__path__)))  # namespace package fallback


def _read_card(path: Path) -> DatasetCard:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise CtrlabError(f"{path}: dataset card is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise CtrlabError(f"{path}: dataset card must be a mapping of keys to values")
    try:
        card = DatasetCard.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(card)"
        raise CtrlabError(f"{path}: invalid dataset card at '{where}': {first['msg']}") from None
    if card.name != path.stem:
        raise CtrlabError(f"{path}: card name '{card.name}' must equal the file name '{path.stem}'")
    return card


def list_cards() -> list[DatasetCard]:
    """Every dataset card shipped with ctrlab, sorted by name."""
    return [_read_card(path) for path in sorted(cards_dir().glob("*.yaml"))]


def card_names() -> list[str]:
    """Names of the shipped dataset cards, sorted."""
    return sorted(path.stem for path in cards_dir().glob("*.yaml"))


def load_card(name: str) -> DatasetCard:
    """The dataset card called ``name``; :class:`CtrlabError` listing the known cards (and a close match) if none."""
    path = cards_dir() / f"{name}.yaml"
    if not name or "/" in name or "\\" in name or not path.is_file():
        known = card_names()
        message = f"unknown dataset card '{name}'; known: {', '.join(known) or '(none)'}"
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
        if close:
            message += f"; did you mean '{close[0]}'?"
        raise CtrlabError(message)
    return _read_card(path)


def resolve_data_dir(explicit: str | Path | None) -> Path | None:
    """The data directory: the explicit argument, else ``$CTRLAB_DATA_DIR``, else ``None``."""
    if explicit is not None and str(explicit) != "":
        return Path(explicit).expanduser()
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return None


def datasets_table(data_dir: Path | None) -> Table:
    """A table of all cards for ``ctrlab datasets list``: name, title, rows per file, local availability, split."""
    where = str(data_dir) if data_dir is not None else f"no data dir (set {DATA_DIR_ENV} or --data-dir)"
    table = Table(title=f"Dataset cards (data dir: {where})")
    table.add_column("name", style="bold")
    table.add_column("title")
    table.add_column("rows per file", justify="right")
    table.add_column("available")
    table.add_column("split")
    for card in list_cards():
        status = card.status(data_dir)
        rows = "\n".join(
            f"{role} {count:,}" if count is not None else f"{role} ?" for role, count in status.rows.items()
        )
        if status.available:
            available = "yes"
        elif data_dir is None:
            available = "no (no data dir)"
        elif len(status.missing) == len(card.files):
            available = "no (all files missing)"
        else:
            available = "no (missing " + ", ".join(status.missing) + ")"
        table.add_row(card.name, card.title, rows, available, card.split_summary())
    return table
