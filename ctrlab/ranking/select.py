"""``features.select``: keep a recipe's ``top_k`` features of a ranking written by ``ctrlab rank``."""

from __future__ import annotations

import csv
from pathlib import Path

from ctrlab.config.features import FeaturesConfig
from ctrlab.errors import DataError, RecipeError


def read_ranking(path: str | Path) -> list[str]:
    """Feature names of a ``ranking.csv`` in rank order."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"features.select.ranking: no ranking file {path} (write one with `ctrlab rank`)")
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or not {"feature", "rank"} <= set(reader.fieldnames):
                raise DataError(f"{path}: not a ranking file (needs columns feature and rank)")
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{path}: not a ranking file ({type(error).__name__})") from None
    if not rows:
        raise DataError(f"{path}: ranking file has no features")
    try:
        rows.sort(key=lambda row: int(row["rank"]))
    except ValueError:
        raise DataError(f"{path}: column rank must hold integers") from None
    return [row["feature"] for row in rows]


def apply_selection(features: FeaturesConfig) -> FeaturesConfig:
    """The features with only the ``top_k`` best-ranked categorical and numeric ones kept (sequence features are
    not ranked and always kept); without ``select`` the features unchanged."""
    select = features.select
    if select is None:
        return features
    ranked = read_ranking(select.ranking)
    rankable = [f.name for f in features.categorical] + [f.name for f in features.numeric]
    unranked = [name for name in rankable if name not in ranked]
    if unranked:
        raise RecipeError(f"features.select: feature '{unranked[0]}' is not in the ranking {select.ranking}; "
                          "rank the same features the recipe uses")
    if select.top_k > len(rankable):
        raise RecipeError(f"features.select.top_k: {select.top_k} is more than the {len(rankable)} ranked features")
    keep = set([name for name in ranked if name in rankable][: select.top_k])
    # a kept history must keep the categorical feature whose vocabulary (and table) it shares
    keep |= {s.share_vocab_with for s in features.sequence if s.share_vocab_with}
    return features.model_copy(update={
        "categorical": [f for f in features.categorical if f.name in keep],
        "numeric": [f for f in features.numeric if f.name in keep],
        "select": None,
    })
