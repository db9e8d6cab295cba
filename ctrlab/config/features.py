"""Recipe section ``features``: which columns become which kind of model input."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from ctrlab.config.base import MAX_COUNT, MAX_FIELDS, MAX_SEQUENCE_LEN, Int, Section


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


class FeaturesConfig(Section):
    """All model inputs. Bare strings are shorthand for a feature with default settings."""

    defaults: FeatureDefaults = FeatureDefaults()
    categorical: list[CategoricalFeature] = Field([], max_length=MAX_FIELDS)
    numeric: list[NumericFeature] = Field([], max_length=MAX_FIELDS)
    sequence: list[SequenceFeature] = Field([], max_length=MAX_FIELDS)
    select: FeatureSelection | None = Field(None, description="keep the top_k features of a ranking")

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

    def columns(self) -> list[str]:
        """Raw columns the features read, in recipe order."""
        return [f.name for f in self.categorical] + [f.name for f in self.numeric] + [f.name for f in self.sequence]
