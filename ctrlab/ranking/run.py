"""``ctrlab rank``: read, rank with progress, write the files and log them to MLflow when tracking is on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from ctrlab.ranking.rank import FeatureRanking, RankingOptions, rank_features
from ctrlab.ranking.report import write_ranking
from ctrlab.ranking.source import load_rank_input
from ctrlab.utils.output_dir import OutputFolder


@dataclass
class RankResult:
    """A finished ranking and the files written for it."""

    ranking: FeatureRanking
    output_dir: Path
    files: list[Path]
    run_id: str | None = None


def run_rank(path: Path, overrides: list[str], options: RankingOptions, *, target: str | None = None,
             sample: int | None = None, output_dir: Path | None = None, data_dir: str | Path | None = None,
             track: bool | None = None, console: Console | None = None) -> RankResult:
    """Rank the features of a recipe's training split or of a data file and write ``ranking.csv`` and friends.

    ``output_dir`` defaults to ``<recipe output_dir>/ranking`` for a recipe and ``runs/rank/<file stem>`` for a file.
    ``track`` defaults to the recipe's ``tracking.enabled`` (off for a bare data file).
    """
    console = console or Console(stderr=True)
    loaded = load_rank_input(path, overrides, target, sample, options.seed, data_dir)
    recipe = loaded.recipe
    if output_dir is None:
        output_dir = Path(recipe.output_dir) / "ranking" if recipe is not None else Path("runs/rank") / path.stem
    folder = OutputFolder(output_dir, "rank", recipe.name if recipe is not None else path.stem,
                          loaded.source, key="--output")
    folder.check()  # before the ranking's work: a folder ctrlab did not make is refused now, not after it
    console.print(f"rank: {loaded.frame.height:,} rows x {len(loaded.kinds)} features from {loaded.source}",
                  highlight=False)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        tasks: dict[str, TaskID] = {}

        def step(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done)

        ranking = rank_features(loaded.frame, loaded.target, loaded.kinds, options, step, loaded.source)
    files = write_ranking(ranking, folder.open(), loaded.source)
    console.print(f"rank: {ranking.seconds:.1f} s; wrote {output_dir / 'ranking.csv'}", highlight=False)

    enabled = track if track is not None else bool(recipe is not None and recipe.tracking.enabled)
    run_id = _log(ranking, files, recipe, path, enabled)
    return RankResult(ranking, output_dir, files, run_id)


def _log(ranking: FeatureRanking, files: list[Path], recipe: object, path: Path, enabled: bool) -> str | None:
    if not enabled:
        return None
    from ctrlab.config.tracking import TrackingConfig
    from ctrlab.tracking import mlflow_run

    tracking = getattr(recipe, "tracking", None) or TrackingConfig()
    tracking = tracking.model_copy(update={"enabled": True})
    experiment = tracking.experiment or getattr(recipe, "name", None) or path.stem
    with mlflow_run(tracking, experiment, run_name=f"rank-{path.stem}", tags={"ctrlab.kind": "ranking"}) as run:
        assert run is not None
        options = ranking.options
        run.log_params({"rank.source": str(path), "rank.target": ranking.target, "rank.rows": ranking.rows,
                        **{f"rank.{k}": v for k, v in vars(options).items()}})
        run.log_metrics({"rank.seconds": ranking.seconds, "rank.rows_per_second": ranking.rows / ranking.seconds})
        for file in files:
            run.log_artifact(file, "ranking")
        return run.run_id
