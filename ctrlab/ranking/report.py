"""Writing a ranking: ``ranking.csv``, ``pairs.csv``, ``ranking.json`` and the ``ranking.png`` plot, atomically."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ctrlab.ranking.rank import FeatureRanking
from ctrlab.utils.io import atomic_path, write_json_atomic

if TYPE_CHECKING:
    from matplotlib.figure import Figure

RANKING_FILE = "ranking.csv"
PAIRS_FILE = "pairs.csv"
SUMMARY_FILE = "ranking.json"
PLOT_FILE = "ranking.png"


def write_ranking(result: FeatureRanking, output_dir: Path, source: str) -> list[Path]:
    """Write the ranking's files into ``output_dir``; each file appears whole or not at all."""
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = [output_dir / RANKING_FILE, output_dir / PAIRS_FILE, output_dir / PLOT_FILE, output_dir / SUMMARY_FILE]
    with atomic_path(paths[0]) as tmp:
        result.table.write_csv(tmp)
    with atomic_path(paths[1]) as tmp:
        result.pairs.write_csv(tmp)
    figure = ranking_figure(result)
    with atomic_path(paths[2]) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(figure)
    write_json_atomic(paths[3], {"source": source, **result.summary()})
    return paths


def ranking_figure(result: FeatureRanking, limit: int = 40) -> Figure:
    """Bars of plain and normalised MI per feature in rank order; hatched bars carry a data-quality note."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = result.table.sort("rank").head(limit)
    names = [f"{f} ({c:,})" for f, c in zip(table["feature"], table["cardinality"])]
    y = list(range(table.height))[::-1]
    figure, axes = plt.subplots(1, 2, figsize=(11, 0.32 * table.height + 1.6), sharey=True)
    flagged = [bool(n) and not n.startswith("interacts") for n in table["notes"]]
    for axis, column, title in ((axes[0], "normalized_mi", "normalised MI (chance removed)"),
                                (axes[1], "mi", "plain MI")):
        bars = axis.barh(y, table[column].to_list(), color="#3b7dd8" if column == "normalized_mi" else "#999999")
        for bar, flag in zip(bars, flagged):
            if flag:
                bar.set_hatch("//")
        axis.set_title(f"{title}, nats", fontsize=10)
        axis.axvline(0, color="black", linewidth=0.6)
    axes[0].set_yticks(y, names, fontsize=8)
    figure.suptitle(f"feature ranking ({result.options.heuristic}, {result.rows:,} rows, label '{result.target}'): "
                    "rank order top to bottom; hatched = a note (redundant, missing, constant, ...)", fontsize=10)
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.5 / figure.get_figheight()))
    return figure
