"""Explain a trained attention model: which fields attend to which (AutoInt, Song et al. 2019, eq. 5)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol, cast

import numpy as np
import polars as pl
import torch

from ctrlab.data.batches import FeatureBatch
from ctrlab.errors import CtrlabError
from ctrlab.serve.predictor import Predictor

if TYPE_CHECKING:
    from matplotlib.figure import Figure


class _AttentionBlock(Protocol):
    """A block that keeps its attention weights (AutoInt's)."""

    def record_attention(self, on: bool = True) -> None: ...

    def attention_maps(self) -> list[torch.Tensor]: ...


@torch.no_grad()
def attention_maps(predictor: Predictor, rows: pl.DataFrame) -> list[np.ndarray]:
    """Mean attention weights over ``rows`` and heads, one ``[F, F]`` matrix per attention layer
    (row i: how field i distributes its attention over all fields)."""
    model_block = predictor.model.block
    if model_block is None or not hasattr(model_block, "record_attention"):
        name = predictor.recipe.model.block
        raise CtrlabError(f"model.block '{name}' has no attention to explain (use autoint or autoint_plus)")
    block = cast(_AttentionBlock, model_block)
    encoded = predictor.processor.transform(rows, "explain rows", with_label=False)
    block.record_attention(True)
    try:
        predictor.model(FeatureBatch.from_encoded(encoded).to(predictor.device))
        maps = [m.mean(dim=(0, 1)).cpu().numpy() for m in block.attention_maps()]
    finally:
        block.record_attention(False)
    return maps


def attention_figure(maps: list[np.ndarray], field_names: list[str], title: str) -> Figure:
    """One heat map per attention layer (Agg backend: no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(maps)
    size = max(4.0, 0.45 * len(field_names) + 2)
    figure = Figure(figsize=(size * n, size))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, n, squeeze=False)[0]
    for i, (ax, matrix) in enumerate(zip(axes, maps)):
        image = ax.imshow(matrix, cmap="viridis")
        ax.set_xticks(range(len(field_names)), field_names, rotation=90, fontsize=8)
        ax.set_yticks(range(len(field_names)), field_names, fontsize=8)
        ax.set_xlabel("attended field")
        ax.set_ylabel("query field")
        ax.set_title(f"layer {i + 1}")
        figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def check_picture_path(output: Path) -> None:
    """Refuse an ``--output`` that is not a ``.png`` path, or that would replace anything but a PNG picture."""
    if output.suffix.lower() != ".png":
        raise CtrlabError(f"--output: '{output}' must be a .png file")
    if output.exists() and (not output.is_file() or output.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n"):
        raise CtrlabError(f"--output: '{output}' exists and is not a PNG picture; ctrlab never replaces it")


def explain_run(run_dir: Path, rows: pl.DataFrame, output: Path) -> list[np.ndarray]:
    """Write the attention heat map of a finished run, averaged over ``rows``, to ``output`` (PNG)."""
    from ctrlab.utils.io import atomic_path

    check_picture_path(output)
    predictor = Predictor.from_run(run_dir)
    maps = attention_maps(predictor, rows)
    figure = attention_figure(maps, predictor.processor.layout.names,
                              f"{predictor.recipe.name}: mean attention over {rows.height:,} rows")
    with atomic_path(output) as tmp:
        figure.savefig(tmp, dpi=110, format="png")
    return maps
