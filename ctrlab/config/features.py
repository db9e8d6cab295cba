"""Recipe section ``features``: which columns become which kind of model input."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from ctrlab.config.base import MAX_COUNT, MAX_FIELDS, MAX_SEQUENCE_LEN, MAX_TABLE_ROWS, Int, Section


class FeatureDefaults(Section):
    """Defaults applied to every feature that does not set its own value."""

    min_count: Int = Field(1, ge=1, le=MAX_COUNT,
                           description="values seen fewer times in the training split map to OOV")


class CategoricalFeature(Section):
    """A categorical column: its values get a vocabulary fitted on the training split (0 = padding, 1 = OOV)."""

    name: str
    min_count: Int | None = Field(None, ge=1, le=MAX_COUNT)


class NumericFeature(Section):
    """A numeric column: missing values filled, then transformed.

    ``transform: bucketize`` turns it into a categorical field with ``buckets`` quantile bins fitted on the training
    split; every other transform keeps it numeric and it enters the model as a learned vector scaled by its value.
    """

    name: str
    fill: Literal["mean", "median", "zero"] | float = "mean"
    transform: Literal["none", "log", "standardize", "log_standardize", "bucketize"] = "none"
    buckets: Int = Field(16, ge=2, le=10_000)


class SequenceFeature(Section):
    """A list-of-ids column (behaviour history): ids are mapped with a vocabulary, truncated to the most recent
    ``max_len`` and right-padded with 0. The column holds ``separator``-joined strings or a polars list."""

    name: str
    share_vocab_with: str | None = Field(None,
                                         description="a categorical feature whose vocabulary (and table) to share")
    max_len: Int = Field(50, ge=1, le=MAX_SEQUENCE_LEN)
    separator: str = "|"
    min_count: Int | None = Field(None, ge=1, le=MAX_COUNT)
    pooling: Literal["mean", "sum"] = "mean"


class FeatureSelection(Section):
    """Keep only the ``top_k`` best-ranked features of a ranking file written by ``ctrlab rank``."""

    ranking: str = Field(description="path of a ranking.csv")
    top_k: Int = Field(ge=1, le=MAX_FIELDS,
                       description="how many of the best-ranked categorical and numeric features to keep")


class CrossRanking(Section):
    """The ``top`` pairs of a ``pairs.csv`` written by ``ctrlab rank``, by its (chance-corrected) ``interaction``
    score, among the candidate pairs."""

    path: str = Field(description="path of a pairs.csv")
    top: Int = Field(ge=1, le=MAX_FIELDS, description="how many of the best-scored candidate pairs to keep")


class CrossesConfig(Section):
    """Cross features: for each candidate pair of categorical fields (bucketised numerics included), a cross value
    = the pair of the two fields' values; its vocabulary is fitted on the training split (crosses seen at least
    ``min_count`` times, the rest out-of-vocabulary). A pair whose vocabulary would exceed ``max_rows`` table rows
    is hashed into ``max_rows`` rows instead (no vocabulary stored), so huge cross vocabularies stay bounded.

    Candidates: ``pairs`` (``all`` or a list of ``[a, b]``), narrowed to the pairs among the fields that keep values
    in ``kept_features`` (an OptFS run's ``feature_search/kept_features.csv``), then to the ``ranking.top``
    best-scored of ``ranking`` (a ``pairs.csv`` of ``ctrlab rank``). The files are read once, when the data is
    prepared, and the resolved list is what the processor (and the cache key) holds."""

    pairs: Literal["all"] | list[list[str]] = Field(
        "all", description="all pairs of categorical fields, or a list of [field_a, field_b]")
    kept_features: str | None = Field(None, description="an OptFS kept_features.csv: only pairs of fields that "
                                                        "keep at least one value")
    ranking: CrossRanking | None = Field(None, description="keep the top pairs of a ctrlab rank pairs.csv")
    min_count: Int = Field(2, ge=1, le=MAX_COUNT,
                           description="crosses seen fewer times in the training split map to the pair's OOV id")
    max_rows: Int = Field(100_000, ge=3, le=MAX_TABLE_ROWS,
                          description="most table rows of one pair; a larger cross vocabulary is hashed into this many")

    @field_validator("pairs")
    @classmethod
    def _two_distinct_fields(cls, value: object) -> object:
        if isinstance(value, list):
            seen: set[frozenset[str]] = set()
            for pair in value:
                if len(pair) != 2 or pair[0] == pair[1]:
                    raise ValueError(f"a cross pair names two different fields, got {pair}")
                key = frozenset(pair)
                if key in seen:
                    raise ValueError(f"cross pair {pair} is listed twice")
                seen.add(key)
        return value


class FeaturesConfig(Section):
    """All model inputs. Bare strings are shorthand for a feature with default settings."""

    defaults: FeatureDefaults = FeatureDefaults()
    categorical: list[CategoricalFeature] = Field([], max_length=MAX_FIELDS)
    numeric: list[NumericFeature] = Field([], max_length=MAX_FIELDS)
    sequence: list[SequenceFeature] = Field([], max_length=MAX_FIELDS)
    select: FeatureSelection | None = Field(None, description="keep the top_k features of a ranking")
    crosses: CrossesConfig | None = Field(None, description="cross features of pairs of categorical fields "
                                          "(what an interaction search chooses among)")

    @field_validator("categorical", "numeric", "sequence", mode="before")
    @classmethod
    def _names_as_shorthand(cls, value: object) -> object:
        if isinstance(value, list):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value

    @model_validator(mode="after")
    def _check_names(self) -> "FeaturesConfig":
        names = self.columns()
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"feature named more than once: {', '.join(duplicated)}")
        categorical = {f.name for f in self.categorical}
        for seq in self.sequence:
            if seq.share_vocab_with is not None and seq.share_vocab_with not in categorical:
                raise ValueError(
                    f"sequence feature {seq.name!r} shares the vocabulary of {seq.share_vocab_with!r}, "
                    "which is not a categorical feature"
                )
        return self

    @property
    def is_empty(self) -> bool:
        return not (self.categorical or self.numeric or self.sequence)

    def pairable(self) -> list[str]:
        """The fields a cross can pair, in model order: categorical features, then bucketised numeric ones."""
        return [f.name for f in self.categorical] + [f.name for f in self.numeric if f.transform == "bucketize"]

    def columns(self) -> list[str]:
        """Raw columns the features read, in recipe order."""
        return [f.name for f in self.categorical] + [f.name for f in self.numeric] + [f.name for f in self.sequence]
