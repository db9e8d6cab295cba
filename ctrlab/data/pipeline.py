"""From a recipe's ``dataset`` and ``features`` sections to encoded, cached train/valid/test splits (the cache itself:
:mod:`ctrlab.data.cache`)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
from rich.console import Console

from ctrlab.config.dataset import DatasetConfig, SplitConfig
from ctrlab.config.features import FeaturesConfig
from ctrlab.data.cache import EncodedCache, cache_key, default_cache_dir, key_payload
from ctrlab.data.crosses import resolve_crosses
from ctrlab.data.encoded import EncodedSplit
from ctrlab.data.processor import ROW_COLUMN, FeatureProcessor
from ctrlab.data.readers import read_table
from ctrlab.data.splits import SPLITS, split_frame
from ctrlab.errors import DataError, RecipeError
from ctrlab.ranking.select import apply_selection

TRUE_PROBABILITY_COLUMN = "__true_click_probability"


@dataclass
class RawSplits:
    """Raw train/valid/test frames plus what the source says about them (label, group column, default
    features, and a fingerprint that changes whenever the data does)."""

    frames: dict[str, pl.DataFrame]
    label: str
    group_by: str | None
    default_features: FeaturesConfig | None
    fingerprint: dict[str, Any]
    sources: dict[str, str] = field(default_factory=dict)


@dataclass
class PreparedData:
    """The fitted processor and the encoded splits; ``features`` is what was actually used."""

    processor: FeatureProcessor
    splits: dict[str, EncodedSplit]
    features: FeaturesConfig
    label: str
    group_by: str | None
    raw: RawSplits
    cache_hit: bool = False


# ----------------------------------------------------------------------------------------- fingerprints
_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def file_digest(path: Path) -> str:
    """BLAKE2b of the file's bytes, memoised per (path, size, mtime) within the process."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_HASHES:
        digest = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        _FILE_HASHES[key] = digest.hexdigest()
    return _FILE_HASHES[key]


def resolve_data_dir(config: DatasetConfig, explicit: str | Path | None = None) -> Path | None:
    """``--data-dir`` option > ``dataset.data_dir`` > ``$CTRLAB_DATA_DIR``."""
    for candidate in (explicit, config.data_dir, os.environ.get("CTRLAB_DATA_DIR")):
        if candidate:
            return Path(candidate).expanduser()
    return None


def _resolve_file(name: str, data_dir: Path | None) -> Path:
    path = Path(name).expanduser()
    if not path.is_absolute() and data_dir is not None:
        path = data_dir / path
    return path


# ---------------------------------------------------------------------------------------------- sources
def load_raw_splits(config: DatasetConfig, seed: int, data_dir: str | Path | None = None) -> RawSplits:
    """Read (or generate) the data a ``dataset`` section names and split it."""
    base = resolve_data_dir(config, data_dir)
    if config.synthetic is not None:
        return _synthetic_splits(config, seed)
    if config.card is not None:
        return _card_splits(config, seed, base)
    return _file_splits(config, seed, base)


def _synthetic_splits(config: DatasetConfig, seed: int) -> RawSplits:
    from ctrlab.datasets.synthetic import generate

    assert config.synthetic is not None
    data = generate(config.synthetic, seed)
    frame = data.frame.with_columns(pl.Series(TRUE_PROBABILITY_COLUMN, data.click_probability))
    split = config.split or SplitConfig(kind="random")
    frames = split_frame(frame, split, seed, "synthetic data")
    spec = data.feature_spec()
    return RawSplits(
        frames=frames, label="label", group_by=config.group_by, default_features=FeaturesConfig.model_validate(spec),
        fingerprint={"synthetic": config.synthetic.model_dump(mode="json"), "seed": seed,
                     "split": split.model_dump(mode="json")},
        sources={s: f"synthetic {s} split" for s in SPLITS},
    )


def _card_splits(config: DatasetConfig, seed: int, base: Path | None) -> RawSplits:
    from ctrlab.datasets.cards import load_card

    assert config.card is not None
    card = load_card(config.card)
    if base is None:
        raise DataError(f"dataset card '{card.name}' needs a data directory: set CTRLAB_DATA_DIR or pass --data-dir")
    loaded = card.load(base, verify=config.verify_checksums)
    split = config.split or card.split
    if split.kind == "given":
        if "all" in loaded and set(SPLITS) - set(loaded):
            raise RecipeError(f"dataset.split: card '{card.name}' has one table; choose a random or time split")
        frames = {s: loaded[s] for s in SPLITS}
    else:
        table = loaded["all"] if "all" in loaded else pl.concat([loaded[s] for s in SPLITS], how="vertical")
        frames = split_frame(table, split, seed, f"dataset card '{card.name}'")
    if card.drop_columns:
        frames = {s: f.drop([c for c in card.drop_columns if c in f.columns]) for s, f in frames.items()}
    files = {role: file_digest(_resolve_file(spec.path, base)) for role, spec in card.files.items()}
    return RawSplits(
        frames=frames, label=card.label, group_by=config.group_by or card.group_by, default_features=card.features,
        fingerprint={"card": card.model_dump(mode="json"), "files": files, "split": split.model_dump(mode="json"),
                     "seed": seed},
        sources={s: f"{card.name}:{s}" for s in SPLITS},
    )


def _read(config: DatasetConfig, name: str, base: Path | None) -> tuple[pl.DataFrame, Path]:
    path = _resolve_file(name, base)
    frame = read_table(path, config.format, separator=config.separator, header=config.header, columns=config.columns)
    return frame, path


def _file_splits(config: DatasetConfig, seed: int, base: Path | None) -> RawSplits:
    if config.train is not None:
        frames, paths = {}, {}
        for split_name in SPLITS:
            frames[split_name], paths[split_name] = _read(config, getattr(config, split_name), base)
        split = SplitConfig(kind="given")
    else:
        assert config.path is not None
        table, path = _read(config, config.path, base)
        if ROW_COLUMN in table.columns:
            raise DataError(f"{path}: column name '{ROW_COLUMN}' is reserved by ctrlab (it numbers the file's rows); "
                            "rename that column")
        split = config.split or SplitConfig(kind="random")
        if split.kind == "given":
            raise RecipeError("dataset.split: one data file needs a random or time split")
        # Remember each row's place in the file so that errors in a split name the file's row, not the split's.
        table = table.with_row_index(ROW_COLUMN, offset=1)
        frames = split_frame(table, split, seed, str(path))
        paths = {s: path for s in SPLITS}
    fingerprint = {
        "files": {s: file_digest(p) for s, p in paths.items()},
        "read": config.model_dump(mode="json", include={"format", "separator", "header", "columns"}),
        "split": split.model_dump(mode="json"), "seed": seed,
    }
    sources = {s: str(p) if split.kind == "given" else f"{p} ({s} split)" for s, p in paths.items()}
    return RawSplits(frames, config.label, config.group_by, None, fingerprint, sources)


# ----------------------------------------------------------------------------------------------- encode
def resolve_features(features: FeaturesConfig, raw: RawSplits) -> FeaturesConfig:
    """The recipe's features, or the data source's defaults (keeping the recipe's ``select`` and ``crosses``) when it
    names none."""
    if not features.is_empty:
        return features
    if raw.default_features is None:
        raise RecipeError("features: the recipe names no features and the data source has no defaults")
    return raw.default_features.model_copy(update={"select": features.select, "crosses": features.crosses})


def prepare_data(config: DatasetConfig, features: FeaturesConfig, seed: int, data_dir: str | Path | None = None,
                 console: Console | None = None) -> PreparedData:
    """Load, split, fit the processor on train, encode all splits; reuse the cache when data and schema match."""
    console = console or Console(stderr=True)
    raw = load_raw_splits(config, seed, data_dir)
    features = resolve_crosses(apply_selection(resolve_features(features, raw)))
    label, group_by = raw.label, raw.group_by
    store = EncodedCache(default_cache_dir(config), console) if config.cache else None
    if store is not None:
        payload = key_payload(raw.fingerprint, features, label, group_by)
        key = cache_key(raw.fingerprint, features, label, group_by)
        cached = store.read(key, payload)
        if cached is not None:
            console.print(f"data: encoded splits from cache {store.entry(key)}", highlight=False, markup=False,
                          soft_wrap=True)
            return PreparedData(cached.processor, cached.splits, features, label, group_by, raw, cache_hit=True)

    processor = FeatureProcessor(features, label, group_by).fit(raw.frames["train"], raw.sources["train"])
    splits = {s: processor.transform(raw.frames[s], raw.sources[s]) for s in SPLITS}
    if store is not None:
        store.write(key, payload, processor, splits)
    return PreparedData(processor, splits, features, label, group_by, raw)
