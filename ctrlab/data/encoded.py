"""Encoded splits: the numeric arrays a fitted processor produces, cached as parquet."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from ctrlab.data.layout import FeatureLayout
from ctrlab.utils.io import atomic_path


@dataclass
class EncodedSplit:
    """One split as arrays: categorical ids ``[N, Fc]`` (int32), numeric values ``[N, Fn]`` (float32), one padded
    id matrix ``[N, L]`` per sequence field, labels ``[N]`` (float32), optional group ids ``[N]`` (int64) and
    cross-feature ids ``[N, P]`` (int32; None without crosses)."""

    categorical: np.ndarray
    numeric: np.ndarray
    sequences: dict[str, np.ndarray] = field(default_factory=dict)
    label: np.ndarray | None = None
    group: np.ndarray | None = None
    crosses: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.categorical.shape[0])

    def select(self, index: np.ndarray | slice) -> "EncodedSplit":
        """The rows ``index`` picks (a slice is a view, an index array a copy)."""
        def pick(array: np.ndarray | None) -> np.ndarray | None:
            return None if array is None else array[index]

        return EncodedSplit(self.categorical[index], self.numeric[index],
                            {k: v[index] for k, v in self.sequences.items()}, pick(self.label), pick(self.group),
                            pick(self.crosses))

    @staticmethod
    def concat(parts: list["EncodedSplit"]) -> "EncodedSplit":
        """The rows of ``parts`` one after another (all encoded by one processor)."""
        if len(parts) == 1:
            return parts[0]

        def joined(arrays: list[np.ndarray | None]) -> np.ndarray | None:
            present = [a for a in arrays if a is not None]
            return np.concatenate(present) if len(present) == len(arrays) else None

        first = parts[0]
        return EncodedSplit(
            np.concatenate([p.categorical for p in parts]), np.concatenate([p.numeric for p in parts]),
            {k: np.concatenate([p.sequences[k] for p in parts]) for k in first.sequences},
            joined([p.label for p in parts]), joined([p.group for p in parts]), joined([p.crosses for p in parts]))

    def to_frame(self, layout: FeatureLayout) -> pl.DataFrame:
        """The split as the cache stores it: one column per field (``cat:``, ``num:``, ``seq:``, ``cross:``), then
        ``label`` and ``group`` where present."""
        columns: dict[str, pl.Series] = {}
        for i, spec in enumerate(layout.categorical):
            columns[f"cat:{spec.name}"] = pl.Series(self.categorical[:, i])
        for i, spec in enumerate(layout.numeric):
            columns[f"num:{spec.name}"] = pl.Series(self.numeric[:, i])
        for spec in layout.sequence:
            matrix = self.sequences[spec.name]
            columns[f"seq:{spec.name}"] = pl.Series(matrix).cast(pl.Array(pl.Int32, matrix.shape[1]))
        for i, cross in enumerate(layout.crosses):
            assert self.crosses is not None
            columns[f"cross:{cross.name}"] = pl.Series(self.crosses[:, i])
        if self.label is not None:
            columns["label"] = pl.Series(self.label)
        if self.group is not None:
            columns["group"] = pl.Series(self.group)
        return pl.DataFrame(columns)

    def to_parquet(self, path: Path, layout: FeatureLayout) -> None:
        frame = self.to_frame(layout)
        with atomic_path(path) as tmp:
            frame.write_parquet(tmp)

    @classmethod
    def from_parquet(cls, path: Path, layout: FeatureLayout) -> "EncodedSplit":
        return cls.from_frame(pl.read_parquet(path), layout)

    @classmethod
    def from_frame(cls, frame: pl.DataFrame, layout: FeatureLayout) -> "EncodedSplit":
        """The inverse of :meth:`to_frame`."""
        n = frame.height

        def matrix(names: list[str], dtype: type) -> np.ndarray:
            if not names:
                return np.zeros((n, 0), dtype=dtype)
            return np.ascontiguousarray(np.stack([frame[c].to_numpy() for c in names], axis=1).astype(dtype))

        sequences = {
            s.name: np.ascontiguousarray(frame[f"seq:{s.name}"].to_numpy().astype(np.int32)) for s in layout.sequence
        }
        return cls(
            categorical=matrix([f"cat:{s.name}" for s in layout.categorical], np.int32),
            numeric=matrix([f"num:{s.name}" for s in layout.numeric], np.float32),
            sequences=sequences,
            label=frame["label"].to_numpy().astype(np.float32) if "label" in frame.columns else None,
            group=frame["group"].to_numpy().astype(np.int64) if "group" in frame.columns else None,
            crosses=matrix([f"cross:{c.name}" for c in layout.crosses], np.int32) if layout.crosses else None,
        )
