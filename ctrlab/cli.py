"""The ``ctrlab`` command line. Every command takes a recipe plus ``key.path=value`` overrides.

User errors print one line (``error: ...``) and exit with status 2, with no traceback; see :func:`main` for every
exit status.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
import yaml
from rich.console import Console
from rich.markup import escape

from ctrlab.errors import CtrlabError, StoppedByRankZero
from ctrlab.utils.signals import EXIT_INTERRUPTED, EXIT_TERMINATED, Interrupted, Terminated, signals_raise

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="CTR prediction from YAML recipes: train, sweep, run a pipeline, rank features, register, serve, inspect "
    "datasets.",
)
datasets_app = typer.Typer(no_args_is_help=True, help="Dataset cards and what is available locally.")
app.add_typer(datasets_app, name="datasets")

err = Console(stderr=True)
out = Console()

RecipeArg = Annotated[Path, typer.Argument(help="recipe YAML file", show_default=False)]
OverridesArg = Annotated[Optional[list[str]], typer.Argument(help="overrides: key.path=value ...",
                                                             show_default=False)]
DataDirOpt = Annotated[Optional[Path], typer.Option("--data-dir", help="data directory (default $CTRLAB_DATA_DIR)")]


OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="replace an earlier run of another recipe in "
                                            "output_dir (a folder ctrlab did not make is never replaced)")]


NprocOpt = Annotated[Optional[int], typer.Option("--nproc", help="train on N processes of this machine, started "
                                                   "with torchrun (sets distributed.processes)")]


@app.command()
def train(recipe: RecipeArg, overrides: OverridesArg = None, data_dir: DataDirOpt = None,
          overwrite: OverwriteOpt = False, nproc: NprocOpt = None) -> None:
    """Train RECIPE, evaluate on the test split and write the run's artefacts to its output_dir."""
    from ctrlab.config.loader import load_recipe
    from ctrlab.distributed.processes import Processes, launched_world_size
    from ctrlab.train.device import resolve_device
    from ctrlab.train.run import check_distributed, output_folder, train_recipe

    overrides = list(overrides or [])
    if nproc is not None:
        if nproc < 1:
            raise CtrlabError(f"--nproc: must be at least 1, got {nproc}")
        overrides.append(f"distributed.processes={nproc}")
    loaded = load_recipe(recipe, overrides)
    processes = loaded.distributed.processes
    if processes > 1 and launched_world_size() == 1:
        from ctrlab.distributed.launch import launch_workers

        # Everything that can be checked before the workers start is checked here, once.
        check_distributed(loaded, Processes(world_size=processes), resolve_device(loaded.train.device))
        output_folder(loaded, overwrite).check()
        arguments = ["train", str(recipe), *overrides, *(["--data-dir", str(data_dir)] if data_dir else []),
                     *(["--overwrite"] if overwrite else [])]
        code = launch_workers(processes, arguments)
        if code:
            raise typer.Exit(code)
        return
    result = train_recipe(loaded, data_dir=data_dir, console=err, overwrite=overwrite)
    if os.environ.get("RANK", "0") != "0":
        return  # rank 0 reports the run
    _print_json({"output_dir": str(result.output_dir), "test": result.metrics["test"],
                         **({"bayes_optimal_test_auc": result.metrics["bayes_optimal_test_auc"]}
                            if "bayes_optimal_test_auc" in result.metrics else {})})


@app.command()
def validate(recipe: RecipeArg, overrides: OverridesArg = None) -> None:
    """Check RECIPE (with overrides) and print it fully resolved, defaults included."""
    from ctrlab.config.loader import load_recipe, recipe_to_dict

    loaded = load_recipe(recipe, overrides or [])
    # Plain write, not rich: rich would wrap long lines at the console width and break the YAML.
    sys.stdout.write(yaml.safe_dump(recipe_to_dict(loaded), sort_keys=False))
    sys.stdout.flush()
    err.print(f"{escape(str(recipe))}: valid", highlight=False)


@app.command()
def sweep(recipe: RecipeArg, overrides: OverridesArg = None, data_dir: DataDirOpt = None) -> None:
    """Run RECIPE's sweep section as an Optuna study (rerun to resume; run several to share the study)."""
    from ctrlab.sweep.study import run_sweep

    result = run_sweep(recipe, overrides or [], data_dir=data_dir, console=err)
    _print_json(result.summary())


@app.command()
def pipeline(recipe: RecipeArg, overrides: OverridesArg = None, data_dir: DataDirOpt = None,
             overwrite: Annotated[bool, typer.Option("--overwrite", help="start again when output_dir holds a "
                                                     "pipeline of another recipe")] = False) -> None:
    """Run RECIPE's pipeline: the plain model, then each stage (rank, optfs, optinter, embedding, sweep, retrain,
    register), each kept only when it does not cost validation AUC; rerun to resume after a stop."""
    from ctrlab.pipeline.runner import run_pipeline

    result = run_pipeline(recipe, overrides or [], data_dir=data_dir, console=err, overwrite=overwrite)
    _print_json(result.summary())


TrackingUriOpt = Annotated[Optional[str], typer.Option("--tracking-uri", help="MLflow tracking URI "
                                                      "(default: the run's recipe, $MLFLOW_TRACKING_URI, ~/.ctrlab)")]


@app.command()
def register(
    run: Annotated[str, typer.Argument(help="a run directory (output_dir of ctrlab train) or an MLflow run id")],
    name: Annotated[str, typer.Option("--name", help="registered model name")],
    alias: Annotated[Optional[str], typer.Option("--alias", help="alias to point at this version")] = None,
    tracking_uri: TrackingUriOpt = None,
) -> None:
    """Register RUN as an MLflow pyfunc model that takes raw rows and returns click probabilities."""
    from ctrlab.serve.registry import register_run

    result = register_run(run, name, alias=alias, tracking_uri=tracking_uri)
    _print_json({"name": result.name, "version": result.version, "alias": result.alias,
                         "model_uri": result.model_uri, "run_id": result.run_id})


@app.command()
def serve(
    name: Annotated[str, typer.Argument(help="registered model name")],
    alias: Annotated[Optional[str], typer.Option("--alias", help="serve this alias (default champion)")] = None,
    version: Annotated[Optional[str], typer.Option("--version", help="serve this version instead")] = None,
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port")] = 5000,
    workers: Annotated[int, typer.Option("--workers", help="server processes")] = 1,
    max_body_bytes: Annotated[Optional[int], typer.Option(
        "--max-body-bytes", help="largest request body accepted, larger ones get 413 (default 16 MiB; ctrlab "
        "backend)")] = None,
    backend: Annotated[str, typer.Option("--backend", help="ctrlab (ctrlab's own server) or mlflow "
                                         "(`mlflow models serve --env-manager local`)")] = "ctrlab",
    tracking_uri: TrackingUriOpt = None,
) -> None:
    """Serve a registered model over HTTP in MLflow's scoring protocol (POST /invocations; GET /ping, /health,
    /version). The model is found and loaded before the port is bound: a missing model, alias or version is an
    error, not a server that fails later."""
    from ctrlab.serve.registry import resolve_model
    from ctrlab.serve.scoring import DEFAULT_MAX_BODY_BYTES

    if backend not in ("ctrlab", "mlflow"):
        raise CtrlabError(f"--backend: must be ctrlab or mlflow, got {backend[:40]!r}")
    if not 0 < port < 65536:
        raise CtrlabError(f"--port: must be between 1 and 65535, got {port}")
    most = 4 * (os.cpu_count() or 1)  # each worker loads its own model copy: more than this only thrashes
    if not 1 <= workers <= most:
        raise CtrlabError(f"--workers: must be between 1 and {most} (4 per CPU core), got {workers}")
    if max_body_bytes is not None and max_body_bytes < 1:
        raise CtrlabError(f"--max-body-bytes: must be at least 1, got {max_body_bytes}")
    # The same store `ctrlab register` wrote to: --tracking-uri, $MLFLOW_TRACKING_URI, else ~/.ctrlab/mlflow.db.
    model = resolve_model(name, alias, version, tracking_uri)
    if backend == "mlflow":
        import subprocess

        from ctrlab.serve.registry import serve_command
        from ctrlab.serve.server import venv_env

        if max_body_bytes is not None:
            err.print("warning: --max-body-bytes is not enforced by --backend mlflow", highlight=False)
        command = serve_command(model, host, port, workers)
        err.print(escape(" ".join(command)), highlight=False, soft_wrap=True)
        code = subprocess.call(command, env=venv_env(MLFLOW_TRACKING_URI=model.tracking_uri))
        if code:
            raise typer.Exit(code)
        return

    import tempfile

    import mlflow

    from ctrlab import __version__
    from ctrlab.serve import scoring
    from ctrlab.serve.registry import download_model, load_registered

    with tempfile.TemporaryDirectory(prefix="ctrlab-serve-") as tmp:
        model_dir = download_model(model, Path(tmp))
        predictor = load_registered(model_dir)
        info = {"model_uri": model.uri, "name": model.name, "version": model.version, "ctrlab": __version__,
                "mlflow": mlflow.__version__}
        scoring.run(predictor, model_dir, host, port, workers, max_body_bytes or DEFAULT_MAX_BODY_BYTES, info,
                    announce=lambda line: err.print(escape(line), highlight=False, soft_wrap=True))


@app.command()
def explain(
    run: Annotated[Path, typer.Argument(help="a run directory of an attention model (autoint, autoint_plus)")],
    rows: Annotated[int, typer.Option("--rows", help="test rows to average the attention over")] = 2000,
    output: Annotated[Optional[Path], typer.Option("--output", help="PNG path (default RUN/attention.png)")] = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Draw which fields attend to which (a heat map per attention layer, averaged over test rows)."""
    from ctrlab.config.loader import read_recipe_file, validate_recipe
    from ctrlab.data.pipeline import load_raw_splits
    from ctrlab.serve.explain import check_picture_path, explain_run
    from ctrlab.train.run import RECIPE_FILE

    if rows < 1:
        raise CtrlabError(f"--rows: must be at least 1, got {rows}")
    if output is not None:
        check_picture_path(output)
    recipe = validate_recipe(read_recipe_file(run / RECIPE_FILE), str(run / RECIPE_FILE))
    test = load_raw_splits(recipe.dataset, recipe.seed, data_dir).frames["test"].head(rows)
    target = output or run / "attention.png"
    maps = explain_run(run, test, target)
    _print_json({"output": str(target), "layers": len(maps), "rows": test.height})


@app.command()
def rank(
    source: Annotated[Path, typer.Argument(help="a recipe YAML (ranks its training split) or a csv/tsv/parquet file",
                                           show_default=False)],
    overrides: OverridesArg = None,
    target: Annotated[Optional[str], typer.Option("--target", help="label column (default: the recipe's, "
                                                  "else 'label')")] = None,
    heuristic: Annotated[str, typer.Option("--heuristic", help="3mr | normalized_mi | mi")] = "3mr",
    sample: Annotated[Optional[int], typer.Option("--sample", help="rank a uniform sample of N rows")] = None,
    bins: Annotated[int, typer.Option("--bins", help="quantile bins for numeric features")] = 32,
    pair_candidates: Annotated[int, typer.Option("--pair-candidates", help="pairs are scored among this many "
                                                 "most relevant features (0: none)")] = 20,
    pair_rows: Annotated[int, typer.Option("--pair-rows", help="rows used for pair scores")] = 250_000,
    seed: Annotated[int, typer.Option("--seed")] = 2021,
    output: Annotated[Optional[Path], typer.Option("--output", help="output directory")] = None,
    track: Annotated[Optional[bool], typer.Option("--track/--no-track", help="log to MLflow (default: the "
                                                  "recipe's tracking.enabled; off for data files)")] = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Rank features by chance-corrected mutual information with the label (OutRank-style): ranking.csv + PNG."""
    from ctrlab.errors import RecipeError
    from ctrlab.ranking.rank import HEURISTICS, RankingOptions
    from ctrlab.ranking.run import run_rank

    if heuristic not in HEURISTICS:
        raise RecipeError(f"--heuristic: must be one of {', '.join(HEURISTICS)}, got '{heuristic}'")
    if not 2 <= bins <= 10_000 or pair_candidates < 0 or pair_rows < 1 or seed < 0 or (sample is not None and
                                                                                        sample < 1):
        raise RecipeError("--bins must be 2..10,000, --pair-candidates at least 0, --pair-rows and --sample at least "
                          "1 and --seed at least 0")
    options = RankingOptions(heuristic=heuristic, bins=bins, seed=seed,  # type: ignore[arg-type]
                             pair_candidates=pair_candidates, pair_rows=pair_rows)
    result = run_rank(source, overrides or [], options, target=target, sample=sample, output_dir=output,
                      data_dir=data_dir, track=track, console=err)
    _print_json({"output_dir": str(result.output_dir), "rows": result.ranking.rows,
                         "seconds": round(result.ranking.seconds, 3), "top": result.ranking.top(10),
                         **({"mlflow_run_id": result.run_id} if result.run_id else {})})


@app.command()
def predict(
    run_or_model: Annotated[str, typer.Argument(
        help="a run directory (output_dir of ctrlab train), a registered model name, or models:/NAME@ALIAS or "
        "models:/NAME/VERSION", show_default=False)],
    data: Annotated[Path, typer.Argument(help="csv/tsv (plain or .gz) or parquet file of raw rows",
                                         show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="scores file: .parquet, .csv or .tsv (.gz allowed "
                                         "for csv/tsv)", show_default=False)],
    id_columns: Annotated[Optional[str], typer.Option("--id-columns", help="comma-separated columns of DATA copied "
                                                      "to the output beside the probability")] = None,
    chunk_rows: Annotated[Optional[int], typer.Option("--chunk-rows", help="rows read, scored and written at a time; "
                                                      "bounds memory (default 262,144)")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing --output file")] = False,
    alias: Annotated[Optional[str], typer.Option("--alias", help="registered model: use this alias (default "
                                                 "champion)")] = None,
    version: Annotated[Optional[str], typer.Option("--version", help="registered model: use this version")] = None,
    tracking_uri: TrackingUriOpt = None,
) -> None:
    """Score every row of DATA with a run or a registered model, streamed in chunks (bounded memory), and write the
    id columns plus a probability column to --output, atomically."""
    from ctrlab.data.chunks import DEFAULT_CHUNK_ROWS
    from ctrlab.serve.batch_predict import check_predict, load_predictor, predict_file

    ids = [name for name in (id_columns or "").split(",") if name]
    rows = DEFAULT_CHUNK_ROWS if chunk_rows is None else chunk_rows
    check_predict(data, output, ids, chunk_rows=rows, overwrite=overwrite)  # before the model is downloaded
    predictor = load_predictor(run_or_model, alias, version, tracking_uri)
    result = predict_file(predictor, data, output, ids, chunk_rows=rows, overwrite=overwrite, console=err)
    _print_json(result.summary())


@datasets_app.command("list")
def datasets_list(data_dir: DataDirOpt = None) -> None:
    """List the dataset cards and whether their files are present in the data directory."""
    from ctrlab.datasets.cards import datasets_table, resolve_data_dir

    resolved = resolve_data_dir(data_dir)
    out.print(datasets_table(resolved))
    if resolved is None:
        err.print("no data directory: set CTRLAB_DATA_DIR or pass --data-dir to check local files")


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the app and returns the process exit status. Every way a command can end maps to one status
    and at most one line on stderr, never a traceback: 0 done; 2 a user error (:class:`CtrlabError`, usage); 1 the
    system failed us (an OSError such as a full disk, or an internal error); 130 SIGINT; 143 SIGTERM; a command's own
    status (``ctrlab serve --backend mlflow`` passes its server's through)."""
    try:
        with signals_raise():
            result = app(args=argv, standalone_mode=False)
    except CtrlabError as error:
        return _fail(error.message, error.exit_code, quiet=isinstance(error, StoppedByRankZero))
    except (Interrupted, KeyboardInterrupt):
        return _fail("interrupted; nothing half-written was left behind", EXIT_INTERRUPTED, prefix="",
                     quiet=_other_rank())
    except Terminated:
        return _fail("terminated; nothing half-written was left behind", EXIT_TERMINATED, prefix="",
                     quiet=_other_rank())
    except typer.Exit as done:
        return int(done.exit_code or 0)
    except typer.Abort:
        return _fail("aborted", EXIT_INTERRUPTED, prefix="")
    except typer.TyperException as error:  # usage errors (typer's own copy of click's exceptions)
        message = " ".join(error.format_message().split())
        context = getattr(error, "ctx", None)
        if context is not None:
            message += f" (see '{context.command_path} --help')"
        return _fail(message, int(getattr(error, "exit_code", 2)))
    except OSError as error:
        return _fail(_os_error_line(error), 1)
    except Exception as error:
        if os.environ.get("CTRLAB_DEBUG"):
            raise
        first = " ".join(str(error).split())[:300]
        return _fail(f"internal error ({type(error).__name__}: {first}); rerun with CTRLAB_DEBUG=1 for the "
                     "traceback and please report it", 1)
    # typer hands an Exit raised inside a command back as a plain return value when not in standalone mode.
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def _print_json(data: object) -> None:
    """The command's result on stdout as strict JSON (an undefined metric is null, never a bare NaN)."""
    from ctrlab.utils.io import json_text

    out.print_json(json_text(data))


def _other_rank() -> bool:
    """A torchrun worker other than rank 0: a signal reaches every worker, and rank 0 alone says so."""
    return os.environ.get("RANK", "0") != "0"


def _fail(message: str, code: int, prefix: str = "[bold red]error:[/bold red] ", quiet: bool = False) -> int:
    if quiet:
        return code
    # The message is data (paths, values from the file): escape it so rich prints "[no]" instead of eating it.
    err.print(f"{prefix}{escape(message)}", highlight=False, soft_wrap=True)
    return code


def _os_error_line(error: OSError) -> str:
    """``/path: No space left on device`` (both paths for a failed rename), whatever raised it."""
    reason = error.strerror or str(error) or type(error).__name__
    paths = [str(p) for p in (error.filename, error.filename2) if p]
    return f"{' -> '.join(paths)}: {reason}" if paths else reason


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
