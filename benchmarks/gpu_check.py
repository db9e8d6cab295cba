"""GPU check: ctrlab's CUDA training path end to end, its training throughput, and the blocks benchmark's missing
synthetic AutoInt row, in one time-boxed run for a lent GPU machine (see benchmarks/README.md, "gpu_check").

Parts (``--parts``, in this order):

* ``probes``: :func:`ctrlab.train.run.train_recipe` end to end (data, fit with early stopping, evaluation, weights,
  predictions) on the device, on the quickstart's synthetic data (``--probe-rows`` rows, 2 epochs) in fp32, bf16
  and fp16 autocast (fp16: GradScaler) and with sparse tables (SparseAdam) in fp32 and fp16. Each must finish with a
  finite test AUC above 0.5. If the fp32 probe fails because :meth:`Trainer.evaluate` reads labels of a split that
  :meth:`Trainer.fit` moved to the GPU with ``.numpy()`` (committed ctrlab before the distributed work), the check
  records that failure, wraps ``Trainer.evaluate`` to pass it CPU rows (predictions are unchanged: ``predict`` moves
  them to the device) and records ``workaround`` on every later result.
* ``blocks``: the row ``benchmarks/blocks.py`` could not fill on 2 CPU cores: suite ``synthetic``, block
  ``autoint`` (the BARS-sized AutoInt of ``recipes/frappe_autoint.yaml``, 6 layers x 4 heads x 128, on the
  generator's 300,000 rows; ~40 epochs of ~8 minutes each on one core), the recipe built by blocks.py's own
  ``_recipe`` and keyed by its ``_settings_key``, seeds ``--seed-start`` onwards, fp32 as the recipe says. Results
  go to ``OUT/blocks/synthetic_autoint.json`` in blocks.py's format; ``--merge-blocks`` merges them into
  ``benchmarks/results/blocks/`` (then ``python benchmarks/blocks.py --report`` shows the row). Seeds run until the
  time left for this part is spent; a seed cut off is recorded with its validation curve, not saved as a result.
* ``throughput``: training samples/s of DeepFM and AutoInt+ (their Frappe recipes' models) on Frappe x1 and on the
  synthetic suite's generated data (``--synthetic-rows``), batch 4096 and 65536, fp32 and bf16 autocast: the
  public :meth:`Trainer.train_epoch` (shuffle, forward, loss, backward, optimiser step) over rows already on the
  device, timed between ``torch.cuda.synchronize()`` calls after an untimed warm-up of 2 steps, repeated until
  ``--tp-seconds`` of timed training per configuration.

Every result is one JSON line in ``OUT/gpu_check.jsonl`` carrying the GPU's name, torch and CUDA versions and the
date; the run ends with a summary table (``--summarize FILE`` prints it again from the lines). The whole run keeps
to ``--budget-s`` seconds: the blocks part stops in time to leave the throughput part its share, and that part
skips what no longer fits.

Imports of mlflow, optuna, torchrec, fbgemm_gpu and matplotlib are refused (``--forbid-imports``): the GPU machine
lacks the first four, and training with ``tracking.enabled: false`` must not need them.

    bash benchmarks/gpu_check.sh                           # on the GPU machine (installs the carried wheels)
    bash benchmarks/gpu_check.sh --cpu-smoke               # here: every configuration, a few steps, tiny data
    python benchmarks/gpu_check.py --device cpu --smoke    # the same without the shell wrapper
    python benchmarks/gpu_check.py --summarize /work/.device/.../gpu_check.jsonl
    python benchmarks/gpu_check.py --merge-blocks /work/.device/.../blocks/synthetic_autoint.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import importlib.abc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

STARTED = time.time()  # the budget counts from the interpreter's start, torch's import included
REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = "mlflow,optuna,torchrec,fbgemm_gpu,matplotlib"
SEED = 2021
BLOCKS = ("deepfm", "autoint_plus")
DATASETS = ("frappe", "synthetic")
PRECISIONS = ("fp32", "bf16")
PROBES = (("fp32", False), ("bf16", False), ("fp16", False), ("fp32", True), ("fp16", True))
PARTS = ("probes", "blocks", "throughput")
SETUP_SECONDS = 3.0  # per throughput configuration besides its timed seconds: model, optimiser, warm-up


# ------------------------------------------------------------------------------------------- environment
class _Forbidden(importlib.abc.MetaPathFinder):
    """Refuses to import the named top-level packages, as if they were not installed."""

    def __init__(self, names: set[str]) -> None:
        self.names = names

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if fullname.partition(".")[0] in self.names:
            raise ImportError(f"import of {fullname!r} refused by gpu_check --forbid-imports (the GPU machine "
                              "lacks it; training with tracking off must not need it)")
        return None


def forbid_imports(names: set[str]) -> None:
    loaded = sorted(n for n in names if n in sys.modules)
    if loaded:
        raise SystemExit(f"already imported before the guard: {loaded}")
    sys.meta_path.insert(0, _Forbidden(names))


def make_ctrlab_importable() -> str:
    """ctrlab from this repo without ``pip install -e``: the repo root on sys.path, and its ``datasets/`` folder
    registered as ``ctrlab_datasets`` (what setup.py's package_dir does). Returns where ctrlab comes from."""
    if importlib.util.find_spec("ctrlab") is None:
        sys.path.insert(0, str(REPO))
    if importlib.util.find_spec("ctrlab_datasets") is None:
        spec = importlib.util.spec_from_file_location(
            "ctrlab_datasets", REPO / "datasets" / "__init__.py", submodule_search_locations=[str(REPO / "datasets")])
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["ctrlab_datasets"] = module
        spec.loader.exec_module(module)
    spec = importlib.util.find_spec("ctrlab")
    return str(Path(spec.origin).parent) if spec is not None and spec.origin else "?"


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    return str(_benchmark("throughput").cpu_model())


def _finite(value: Any) -> Any:
    """JSON-safe: non-finite floats become null (strict JSON, as ctrlab writes it)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def describe(exc: BaseException) -> str:
    """One line: the exception and the innermost frame inside ctrlab (or the innermost frame)."""
    frames = traceback.extract_tb(exc.__traceback__)
    inside = [f for f in frames if "/ctrlab/" in f.filename] or frames
    where = ""
    if inside:
        filename = Path(inside[-1].filename)
        shown = filename.relative_to(REPO) if filename.is_relative_to(REPO) else filename
        where = f" at {shown}:{inside[-1].lineno}"
    message = " ".join(str(exc).split())[:400]
    return f"{type(exc).__name__}: {message}{where}"


def _is_cuda_numpy_error(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, TypeError) and "numpy" in text and "cuda" in text


class OutOfTime(Exception):
    """Raised from an epoch callback when a blocks seed runs past its part's end."""


# ---------------------------------------------------------------------------------------------- the check
class Check:
    """Settings, the device, the clock and the results file of one run."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        self.args = args
        self.torch = torch
        self.started = STARTED
        self.deadline = self.started + args.budget_s
        self.smoke = args.smoke
        self.device = torch.device(args.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False)")
        self.out = args.out
        self.out.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.out / "gpu_check.jsonl"
        self.jsonl.write_text("")
        self.work = args.work_dir
        self.work.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("CTRLAB_CACHE_DIR", str(self.work / "cache"))
        self.workaround: str | None = None
        if self.device.type == "cuda":
            self.gpu = torch.cuda.get_device_name(self.device)
        else:
            self.gpu = f"none (CPU: {_cpu_name()}, {torch.get_num_threads()} threads)"
        self.common = {"gpu": self.gpu, "torch": torch.__version__, "cuda": torch.version.cuda,
                       "device": self.device.type, "smoke": self.smoke}

    # time
    def left(self, until: float | None = None) -> float:
        return (self.deadline if until is None else until) - time.time()

    def elapsed(self) -> float:
        return time.time() - self.started

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def free_memory(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        if self.device.type != "cuda":
            return None
        return round(self.torch.cuda.max_memory_allocated(self.device) / 2**30, 2)

    # output
    def emit(self, part: str, **record: Any) -> dict[str, Any]:
        line = {"part": part, **self.common, "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                "elapsed_s": round(self.elapsed(), 1), **record}
        if self.workaround and part != "env":
            line["workaround"] = self.workaround
        line = _finite(line)
        with self.jsonl.open("a", encoding="utf-8") as f:
            f.write(json.dumps(line, allow_nan=False) + "\n")
        return line

    def say(self, text: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {text}", flush=True)

    def enable_workaround(self) -> None:
        """Trainer.evaluate on CPU rows: its labels then convert with .numpy(); predict() moves the rows to the
        device itself, so the predictions and metrics are those of the unpatched method on a CPU-side split."""
        from ctrlab.train.trainer import Trainer

        original = Trainer.evaluate
        if getattr(original, "_gpu_check_workaround", False):
            return
        cpu = self.torch.device("cpu")

        def evaluate(trainer: Any, data: Any) -> Any:
            return original(trainer, data.to(cpu))

        evaluate._gpu_check_workaround = True  # type: ignore[attr-defined]
        Trainer.evaluate = evaluate  # type: ignore[method-assign]
        self.workaround = "Trainer.evaluate given CPU rows (labels .numpy() on a CUDA split)"


def environment(check: Check, ctrlab_from: str) -> None:
    torch = check.torch
    record: dict[str, Any] = {
        "python": platform.python_version(), "ctrlab_from": ctrlab_from, "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "packages": {n: _version(n) for n in ("numpy", "polars", "polars-runtime-32", "pydantic", "pydantic-core",
                                              "pyarrow", "rich", "pyyaml", "safetensors", "typing-extensions")},
        "budget_s": check.args.budget_s, "parts": check.args.parts,
        "forbidden_imports": sorted(check.args.forbid_imports),
    }
    if check.device.type == "cuda":
        props = torch.cuda.get_device_properties(check.device)
        record.update(capability=f"{props.major}.{props.minor}", gpu_memory_gib=round(props.total_memory / 2**30, 1),
                      multiprocessors=props.multi_processor_count)
    check.emit("env", **record)
    check.say(f"device {check.device}: {check.gpu}; torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN "
              f"{record['cudnn']}); python {record['python']}; ctrlab from {ctrlab_from}")
    check.say("packages: " + ", ".join(f"{k} {v}" for k, v in record["packages"].items()))


# -------------------------------------------------------------------------------------------------- probes
def _quiet_console() -> Any:
    from rich.console import Console

    return Console(quiet=True)


def _probe_recipe(check: Check, precision: str, sparse: bool) -> Any:
    from ctrlab.config.loader import read_recipe_file, validate_recipe

    raw = read_recipe_file(REPO / "recipes" / "quickstart.yaml")
    raw["dataset"]["synthetic"]["rows"] = check.args.probe_rows
    name = f"probe_{precision}{'_sparse' if sparse else ''}"
    raw.update(name=name, output_dir=str(check.work / "probes" / name), tracking={"enabled": False})
    raw["train"].update(epochs=2, progress=False, device=check.device.type, precision=precision)
    raw["embedding"] = {**raw["embedding"], "sparse": sparse}
    return validate_recipe(raw)


def _run_probe(check: Check, precision: str, sparse: bool) -> tuple[str, dict[str, Any], BaseException | None]:
    from ctrlab.train.run import train_recipe

    started = time.perf_counter()
    try:
        result = train_recipe(_probe_recipe(check, precision, sparse), console=_quiet_console(), overwrite=True)
    except Exception as exc:  # recorded, and the check goes on
        return "failed", {"error": describe(exc), "seconds": round(time.perf_counter() - started, 1)}, exc
    metrics = result.metrics
    test_auc = metrics["test"].get("auc")
    losses = [r.train_loss for r in result.fit.history]
    problems = []
    if not str(metrics.get("device", "")).startswith(check.device.type):
        problems.append(f"ran on {metrics.get('device')}")
    if test_auc is None or not math.isfinite(test_auc) or test_auc <= 0.5:
        problems.append(f"test auc {test_auc}")
    if not losses or not all(math.isfinite(x) for x in losses):
        problems.append(f"train losses {losses}")
    if not (result.output_dir / "model.safetensors").is_file():
        problems.append("no model.safetensors")
    info = {"test_auc": test_auc, "test_logloss": metrics["test"].get("logloss"), "epochs": len(losses),
            "train_losses": losses, "seconds": round(time.perf_counter() - started, 1),
            "samples_per_second": [round(r.samples_per_second) for r in result.fit.history]}
    if problems:
        info["error"] = "; ".join(problems)
        return "failed", info, None
    return "ok", info, None


def probes(check: Check) -> None:
    check.say(f"probes: train_recipe end to end, synthetic {check.args.probe_rows:,} rows, 2 epochs")
    for index, (precision, sparse) in enumerate(PROBES):
        config = {"precision": precision, "sparse": sparse}
        if check.device.type == "cpu" and precision == "fp16":
            status, info, _ = _run_probe(check, precision, sparse)
            expected = status == "failed" and "fp16 autocast needs a CUDA device" in info.get("error", "")
            status = "expected-error (CPU)" if expected else status
            check.emit("probe", **config, status=status, **info)
            check.say(f"probe {precision}{' sparse' if sparse else ''}: {status}")
            continue
        status, info, exc = _run_probe(check, precision, sparse)
        first = index == 0
        if first and ((exc is not None and _is_cuda_numpy_error(exc)) or check.args.force_workaround):
            check.emit("probe", **config, status=status if exc is not None else "ok (workaround forced)", **info,
                       note="before the evaluate workaround")
            check.say(f"probe {precision}: {status} ({info.get('error', 'forced')}); retrying with the workaround")
            check.enable_workaround()
            status, info, exc = _run_probe(check, precision, sparse)
        check.emit("probe", **config, status=status, **info)
        detail = (f"test auc {info['test_auc']:.4f}, {info['seconds']}s" if status == "ok" else info.get("error"))
        check.say(f"probe {precision}{' sparse' if sparse else ''}: {status} ({detail})")
        check.free_memory()


# -------------------------------------------------------------------------------------------------- blocks
def _benchmark(name: str) -> Any:
    """benchmarks/<name>.py as a module (blocks.py's recipe builder and settings key are the row's definition)."""
    import importlib

    path = str(REPO / "benchmarks")
    if path not in sys.path:
        sys.path.insert(0, path)
    return importlib.import_module(name)


def _blocks_file(check: Check) -> Path:
    return check.out / "blocks" / "synthetic_autoint.json"


def _cpu_bayes_auc(rows: int) -> dict[int, float]:
    """Bayes-optimal test AUC per seed of the synthetic suite's data as the CPU runs saved it (any block: the
    suite's data depend on seed and rows only), to confirm the GPU machine generated the same rows."""
    if rows != 300_000:  # the saved CPU runs are blocks.py's default size
        return {}
    found: dict[int, float] = {}
    for path in sorted((REPO / "benchmarks" / "results" / "blocks").glob("synthetic_*.json")):
        try:
            for run in json.loads(path.read_text())["runs"]:
                if run.get("bayes_optimal_auc") is not None:
                    found.setdefault(int(run["seed"]), float(run["bayes_optimal_auc"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return found


def blocks_row(check: Check, until: float) -> None:
    """The synthetic suite's AutoInt seeds, each saved in blocks.py's format as soon as it finishes."""
    import torch
    from rich.console import Console

    from ctrlab.config.loader import validate_recipe
    from ctrlab.train.run import train_recipe

    blocks = _benchmark("blocks")
    args = check.args
    rows = args.blocks_rows
    result_file = _blocks_file(check)
    result_file.parent.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.seed_start, args.seed_start + args.seeds))
    check.say(f"blocks: synthetic suite, autoint, {rows:,} rows, seeds {seeds}; {check.left(until):.0f}s for this "
              "part")
    console = Console(file=sys.stdout, highlight=False, soft_wrap=True)
    runs: list[dict[str, Any]] = []
    last_seconds = 0.0
    for seed in seeds:
        left = check.left(until)
        if left < max(3.0 if check.smoke else 30.0, 0.5 * last_seconds):
            check.emit("blocks", suite="synthetic", block="autoint", seed=seed, status="skipped",
                       error=f"{left:.0f}s left for the part")
            check.say(f"blocks seed {seed}: skipped ({left:.0f}s left)")
            continue
        raw = blocks._recipe("synthetic", "autoint", seed, check.work / "bench_blocks", rows)
        if check.smoke:
            raw["train"]["epochs"] = 2
        settings = blocks._settings_key(raw)  # what blocks.py keys the row by: before where-it-runs settings
        raw["train"]["device"] = check.device.type
        recipe = validate_recipe(raw)
        history: list[dict[str, Any]] = []

        def on_epoch(record: Any, seed: int = seed) -> None:
            history.append(record.as_dict())
            if time.time() > until:
                raise OutOfTime(f"seed {seed}: the part's time ran out after epoch {record.epoch}")

        started = time.perf_counter()
        try:
            result = train_recipe(recipe, console=console, callbacks=[on_epoch], overwrite=True)
        except (OutOfTime, Exception) as exc:
            status = "cut off (time)" if isinstance(exc, OutOfTime) else "failed"
            seconds = round(time.perf_counter() - started, 1)
            check.emit("blocks", suite="synthetic", block="autoint", seed=seed, status=status, error=describe(exc),
                       settings=settings, seconds=seconds, epochs=len(history),
                       valid_auc=[h.get("valid_auc") for h in history],
                       epoch_seconds=[round(h["seconds"], 2) for h in history])
            check.say(f"blocks seed {seed}: {status} after {len(history)} epochs, {seconds}s ({describe(exc)})")
            check.free_memory()
            if isinstance(exc, OutOfTime):
                break
            continue
        run = {**blocks.run_record(seed, result, settings, started),
               "device": check.device.type, "gpu": check.gpu, "precision": recipe.train.precision}
        if check.workaround:
            run["workaround"] = check.workaround
        runs.append(run)
        cpu_bayes = _cpu_bayes_auc(rows).get(seed)  # same generator, seed and rows: the same data as on the CPU?
        last_seconds = run["seconds"]
        document: dict[str, Any] = {"suite": "synthetic", "block": "autoint", "runs": runs, "torch": torch.__version__}
        if check.smoke:
            document["smoke"] = True  # tiny data and 2 epochs: never to be merged into benchmarks/results
        result_file.write_text(json.dumps(_finite(document), indent=2) + "\n")
        check.emit("blocks", suite="synthetic", block="autoint", status="ok", **run,
                   valid_auc=[h.get("valid_auc") for h in history], cpu_bayes_optimal_auc=cpu_bayes,
                   same_data_as_cpu=None if cpu_bayes is None else abs(cpu_bayes - run["bayes_optimal_auc"]) < 1e-9)
        check.say(f"blocks seed {seed}: test auc {run['auc']:.5f} (Bayes {run['bayes_optimal_auc']:.5f}), "
                  f"{run['epochs']} epochs (best {run['best_epoch']}), {run['seconds']}s -> {result_file}")
        check.free_memory()


# ---------------------------------------------------------------------------------------------- throughput
def _throughput_recipe(check: Check, dataset: str, block: str, batch: int, precision: str) -> Any:
    from ctrlab.config.loader import read_recipe_file, validate_recipe

    if dataset == "frappe":
        raw = read_recipe_file(REPO / "recipes" / f"frappe_{block}.yaml")
    else:
        raw = _benchmark("blocks")._recipe("synthetic", block, SEED, check.work / "throughput",
                                           check.args.synthetic_rows)
    name = f"throughput_{dataset}_{block}"
    raw.update(name=name, seed=SEED, output_dir=str(check.work / "throughput" / name), tracking={"enabled": False})
    raw["train"] = {**raw.get("train", {}), "batch_size": batch, "precision": precision,
                    "device": check.device.type, "progress": False}
    return validate_recipe(raw)


def _frappe_dir(check: Check) -> str | None:
    from ctrlab.datasets.cards import load_card

    candidates = [check.args.data_dir, os.environ.get("CTRLAB_DATA_DIR"), str(REPO / ".gpu_data"),
                  str(REPO.parent / "shared" / "datasets")]
    card = load_card("frappe_x1")
    for candidate in candidates:
        if candidate and Path(candidate).is_dir() and card.status(Path(candidate)).available:
            return candidate
    return None


def _timed_epochs(check: Check, trainer: Any, chunk: Any, seconds: float, max_steps: int, steps_per_call: int,
                  until: float) -> tuple[int, float, float]:
    """train_epoch over ``chunk`` until ``seconds`` of synchronised training time or ``max_steps`` steps; returns
    (steps, seconds, last mean loss)."""
    steps, spent, loss = 0, 0.0, float("nan")
    while True:
        check.sync()
        t0 = time.perf_counter()
        loss = trainer.train_epoch(chunk)
        check.sync()
        spent += time.perf_counter() - t0
        steps += steps_per_call
        if spent >= seconds or steps >= max_steps or time.time() > until:
            return steps, spent, loss


def _configurations(check: Check) -> Iterator[tuple[str, str, int, str]]:
    for dataset in DATASETS:
        for block in BLOCKS:
            for batch in check.args.batch_sizes:
                for precision in PRECISIONS:
                    yield dataset, block, batch, precision


def throughput(check: Check) -> None:
    from ctrlab.data.batches import FeatureBatch
    from ctrlab.data.pipeline import prepare_data
    from ctrlab.models import build_recipe_model
    from ctrlab.run_dir import seed_everything
    from ctrlab.train.trainer import Trainer

    args = check.args
    configs = list(_configurations(check))
    per_config = max(0.2, min(args.tp_seconds, (check.left() - 10) / max(len(configs), 1) - SETUP_SECONDS))
    check.say(f"throughput: {len(configs)} configurations, {per_config:.1f}s timed each (max {args.tp_max_steps} "
              f"steps), batch sizes {args.batch_sizes}")
    frappe_dir = _frappe_dir(check)
    data: dict[str, Any] = {}
    for dataset, block, batch, precision in configs:
        config = {"dataset": dataset, "block": block, "batch_size": batch, "precision": precision}
        label = f"{dataset:9s} {block:12s} batch {batch:6d} {precision}"
        if check.left() < per_config + SETUP_SECONDS:
            check.emit("throughput", **config, status="skipped", error="budget spent")
            check.say(f"{label}: skipped (budget spent)")
            continue
        if dataset == "frappe" and frappe_dir is None:
            check.emit("throughput", **config, status="skipped",
                       error="no Frappe x1 files (carry .gpu_data, or set CTRLAB_DATA_DIR / --data-dir)")
            check.say(f"{label}: skipped (no Frappe x1 data)")
            continue
        trainer = model = None
        try:
            recipe = _throughput_recipe(check, dataset, block, batch, precision)
            if dataset not in data:
                prepared = prepare_data(recipe.dataset, recipe.features, recipe.seed,
                                        frappe_dir if dataset == "frappe" else None, _quiet_console())
                train_cpu = FeatureBatch.from_encoded(prepared.splits["train"])
                data[dataset] = (prepared.processor.layout, train_cpu, train_cpu.to(check.device))
                check.say(f"data {dataset}: {len(train_cpu):,} training rows, "
                          f"{prepared.processor.layout.num_fields} fields")
            layout, train_cpu, train_device = data[dataset]
            if len(train_cpu) < batch:
                raise ValueError(f"{len(train_cpu)} training rows < batch {batch}")
            steps_per_call = max(1, min(len(train_cpu) // batch, args.tp_max_steps))
            check.free_memory()
            seed_everything(SEED)
            model = build_recipe_model(recipe, layout)
            trainer = Trainer(model, recipe.train, check.device, seed=SEED, console=_quiet_console())
            warm_steps = min(2, steps_per_call)
            rows_on = "device"
            source = train_device
            try:
                trainer.train_epoch(source.select(slice(0, warm_steps * batch)))
            except Exception as exc:  # e.g. a trainer that wants CPU rows (pinned memory): try them once
                if isinstance(exc, check.torch.cuda.OutOfMemoryError) or check.device.type == "cpu":
                    raise
                check.say(f"{label}: train_epoch on device rows failed ({describe(exc)}); trying CPU rows")
                rows_on, source = "cpu", train_cpu
                trainer.train_epoch(source.select(slice(0, warm_steps * batch)))
            chunk = source.select(slice(0, steps_per_call * batch))
            steps, seconds, loss = _timed_epochs(check, trainer, chunk, per_config, args.tp_max_steps,
                                                 steps_per_call, check.deadline)
            rate = steps * batch / seconds
            line = check.emit("throughput", **config, status="ok", samples_per_second=round(rate, 1),
                              ms_per_step=round(1000 * seconds / steps, 3), steps=steps, seconds=round(seconds, 3),
                              warmup_steps=warm_steps, steps_per_epoch_call=steps_per_call,
                              train_rows=len(train_cpu), peak_memory_gib=check.peak_gib(), final_loss=loss,
                              rows_on=rows_on)
            check.say(f"{label}: {rate:>12,.0f} samples/s  {line['ms_per_step']:8.2f} ms/step  {steps:5d} steps  "
                      f"peak {_num(line['peak_memory_gib'], '.2f')} GiB")
        except Exception as exc:
            status = "oom" if isinstance(exc, check.torch.cuda.OutOfMemoryError) else "failed"
            check.emit("throughput", **config, status=status, error=describe(exc), peak_memory_gib=check.peak_gib())
            check.say(f"{label}: {status} ({describe(exc)})")
        finally:
            del trainer, model
            check.free_memory()


# -------------------------------------------------------------------------------------------------- report
def _read_lines(path: Path) -> list[dict[str, Any]]:
    lines = []
    for text in path.read_text(encoding="utf-8").splitlines():
        if text.strip():
            try:
                lines.append(json.loads(text))
            except json.JSONDecodeError:
                pass  # a line cut by a kill
    return lines


def _num(value: Any, fmt: str, missing: str = "–") -> str:
    return missing if value is None else format(value, fmt)


def summarize(path: Path) -> str:
    """Markdown summary of a gpu_check.jsonl."""
    lines = _read_lines(path)
    if not lines:
        return f"{path}: no records"
    env = next((r for r in lines if r["part"] == "env"), lines[0])
    last = lines[-1]
    out = [f"# GPU check: {env['gpu']}, torch {env['torch']} (CUDA {env['cuda']}), {env['date']}"
           + (" — SMOKE (CPU, tiny data: not results)" if env.get("smoke") else ""),
           f"{last['elapsed_s']:.0f} s of a {env.get('budget_s', '?')} s budget; ctrlab from "
           f"{env.get('ctrlab_from')}; refused imports: {', '.join(env.get('forbidden_imports', [])) or 'none'}"]
    end = next((r["status"] for r in lines if r["part"] == "end"), "killed (no end record)")
    if end != "done":
        out.append(f"**run {end}**: the parts after the last record below did not run")
    workaround = next((r["workaround"] for r in lines if r.get("workaround")), None)
    if workaround:
        out.append(f"workaround in effect after the first probe: {workaround}")
    probes_ = [r for r in lines if r["part"] == "probe"]
    if probes_:
        out += ["", "## end to end (train_recipe: fit, evaluate, save), synthetic, 2 epochs", "",
                "| precision | sparse tables | status | test AUC | epochs | seconds | samples/s per epoch | error |",
                "|---|---|---|---:|---:|---:|---|---|"]
        for r in probes_:
            out.append(f"| {r['precision']} | {'yes' if r['sparse'] else 'no'} | {r['status']} | "
                       f"{_num(r.get('test_auc'), '.4f')} | {r.get('epochs', '–')} | {r.get('seconds', '–')} | "
                       f"{', '.join(f'{x:,}' for x in r.get('samples_per_second') or []) or '–'} | "
                       f"{r.get('error', '') or r.get('note', '')} |")
    blocks_ = [r for r in lines if r["part"] == "blocks"]
    if blocks_:
        out += ["", "## blocks.py row: synthetic suite, autoint (BARS-sized, fp32)", "",
                "| seed | status | test AUC | test logloss | Bayes AUC | gap | epochs (best) | seconds | note |",
                "|---:|---|---:|---:|---:|---:|---|---:|---|"]
        done = [r for r in blocks_ if r["status"] == "ok"]
        for r in blocks_:
            gap = (r["auc"] - r["bayes_optimal_auc"]) if r.get("auc") is not None and r.get("bayes_optimal_auc") \
                else None
            curve = r.get("valid_auc") or []
            note = r.get("error", "") if r["status"] != "ok" else ""
            if r.get("same_data_as_cpu") is not None:
                note += "data = the CPU runs' (same Bayes AUC)" if r["same_data_as_cpu"] else \
                    f"DATA DIFFER from the CPU runs' (Bayes AUC there {r['cpu_bayes_optimal_auc']:.5f})"
            if r["status"] != "ok" and curve:
                note += f"; valid auc {curve[0]:.4f} → {curve[-1]:.4f}" if curve[0] is not None else ""
            best = f" ({r['best_epoch']})" if r.get("best_epoch") is not None else ""
            out.append(f"| {r['seed']} | {r['status']} | {_num(r.get('auc'), '.5f')} | "
                       f"{_num(r.get('logloss'), '.5f')} | {_num(r.get('bayes_optimal_auc'), '.5f')} | "
                       f"{_num(gap, '+.4f')} | {r.get('epochs', '–')}{best} | {r.get('seconds', '–')} | {note} |")
        if done:
            aucs = [r["auc"] for r in done]
            out.append(f"\nmean test AUC over {len(done)} seed(s): {statistics.mean(aucs):.4f} (spread "
                       f"{max(aucs) - min(aucs):.4f}); merge: `python benchmarks/gpu_check.py --merge-blocks "
                       "OUT/blocks/synthetic_autoint.json`")
    speeds = [r for r in lines if r["part"] == "throughput"]
    if speeds:
        out += ["", "## training throughput (Trainer.train_epoch on device rows, warm-up excluded, synchronised)", "",
                "| data | block | batch | precision | samples/s | ms/step | steps | peak GiB | status |",
                "|---|---|---:|---|---:|---:|---:|---:|---|"]
        for r in speeds:
            status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('error', '')}"
            out.append(f"| {r['dataset']} | {r['block']} | {r['batch_size']} | {r['precision']} | "
                       f"{_num(r.get('samples_per_second'), ',.0f')} | {_num(r.get('ms_per_step'), '.2f')} | "
                       f"{r.get('steps', '–')} | {_num(r.get('peak_memory_gib'), '.2f')} | {status} |")
        ratios = []
        for r in speeds:
            if r["precision"] == "bf16" and r["status"] == "ok":
                base = next((s for s in speeds if s["precision"] == "fp32" and s["status"] == "ok" and
                             (s["dataset"], s["block"], s["batch_size"]) == (r["dataset"], r["block"],
                                                                             r["batch_size"])), None)
                if base:
                    ratios.append(f"{r['dataset']}/{r['block']}/{r['batch_size']} "
                                  f"{r['samples_per_second'] / base['samples_per_second']:.2f}x")
        if ratios:
            out.append("\nbf16 / fp32: " + ", ".join(ratios))
    failures = [r for r in lines if r.get("status") in ("failed", "oom")]
    out.append(f"\n{len(failures)} failure(s)" + (": " + "; ".join(
        f"{r['part']} {r.get('precision') or r.get('seed') or ''} {r.get('error', '')}"[:200] for r in failures)
        if failures else ""))
    return "\n".join(out)


def merge_blocks(source: Path, results: Path) -> str:
    """Merge a gpu_check blocks file into blocks.py's results folder: seeds of the same settings are replaced,
    the others kept (as blocks.py keeps the seeds of earlier runs)."""
    new = json.loads(source.read_text())
    if new.get("smoke"):
        raise SystemExit(f"{source}: a smoke run's file (tiny data, 2 epochs); not merged")
    target = results / f"{new['suite']}_{new['block']}.json"
    old = json.loads(target.read_text()) if target.exists() else {"runs": []}
    settings = {r["settings"] for r in new["runs"]}
    if len(settings) != 1:
        raise SystemExit(f"{source}: runs of {len(settings)} different settings")
    dropped = [r["seed"] for r in old["runs"] if r.get("settings") not in settings]
    seeds = {r["seed"] for r in new["runs"]}
    runs = sorted([r for r in old["runs"] if r.get("settings") in settings and r["seed"] not in seeds] + new["runs"],
                  key=lambda r: r["seed"])
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps({**old, **{k: v for k, v in new.items() if k != "runs"}, "runs": runs}, indent=2)
                      + "\n")
    note = f" (dropped seeds {dropped} of other settings)" if dropped else ""
    return f"{target}: seeds {[r['seed'] for r in runs]}{note}"


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--smoke", action="store_true",
                        help="every configuration for a few steps on tiny data (for testing this script on a CPU)")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--budget-s", type=float, default=None, help="seconds for the whole run (default 450; "
                        "smoke 170)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default $OUT, else runs/gpu_check or runs/gpu_check_smoke)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="run folders and data cache (default /tmp/ctrlab_gpu_check[_smoke])")
    parser.add_argument("--data-dir", default=None, help="folder holding frappe/x1 (default $CTRLAB_DATA_DIR, "
                        ".gpu_data, ../shared/datasets)")
    parser.add_argument("--probe-rows", type=int, default=None, help="synthetic rows of the probes (20000; smoke 4000)")
    parser.add_argument("--blocks-rows", type=int, default=None,
                        help="synthetic rows of the blocks row (300000, blocks.py's default; smoke 2000)")
    parser.add_argument("--seeds", type=int, default=None, help="blocks seeds (3; smoke 2)")
    parser.add_argument("--seed-start", type=int, default=2021)
    parser.add_argument("--synthetic-rows", type=int, default=None,
                        help="generated rows for the throughput part (1000000; smoke 6000)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="(4096 65536; smoke 128 512)")
    parser.add_argument("--tp-seconds", type=float, default=None,
                        help="timed seconds per throughput configuration (4; smoke 0.3)")
    parser.add_argument("--tp-max-steps", type=int, default=None, help="at most this many timed steps (3000; smoke 2)")
    parser.add_argument("--forbid-imports", default=FORBIDDEN,
                        help=f"comma-separated packages whose import is refused (default {FORBIDDEN}; '' for none)")
    parser.add_argument("--force-workaround", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--summarize", type=Path, metavar="JSONL", help="only print the summary of a results file")
    parser.add_argument("--merge-blocks", type=Path, metavar="JSON",
                        help="merge a blocks/synthetic_autoint.json into benchmarks/results/blocks/ and stop")
    args = parser.parse_args(argv)
    smoke = args.smoke

    def pick(value: Any, default: Any, smoke_default: Any) -> Any:
        return value if value is not None else (smoke_default if smoke else default)

    args.budget_s = pick(args.budget_s, 450.0, 170.0)
    env_out = os.environ.get("OUT")
    args.out = args.out or (Path(env_out) if env_out else REPO / "runs" / ("gpu_check_smoke" if smoke else "gpu_check"))
    args.work_dir = args.work_dir or Path("/tmp") / ("ctrlab_gpu_check_smoke" if smoke else "ctrlab_gpu_check")
    args.probe_rows = pick(args.probe_rows, 20_000, 4_000)
    args.blocks_rows = pick(args.blocks_rows, 300_000, 2_000)
    args.seeds = pick(args.seeds, 3, 2)
    args.synthetic_rows = pick(args.synthetic_rows, 1_000_000, 6_000)
    args.batch_sizes = pick(args.batch_sizes, [4096, 65536], [128, 512])
    args.tp_seconds = pick(args.tp_seconds, 4.0, 0.3)
    args.tp_max_steps = pick(args.tp_max_steps, 3000, 2)
    args.forbid_imports = {n.strip() for n in args.forbid_imports.split(",") if n.strip()}
    return args


def run_parts(check: Check) -> None:
    parts = check.args.parts
    if "probes" in parts:
        probes(check)
    if "blocks" in parts:
        reserve = 0.0
        if "throughput" in parts:
            n = len(list(_configurations(check)))
            reserve = n * (check.args.tp_seconds + SETUP_SECONDS) + 15
        blocks_row(check, until=check.deadline - reserve)
    if "throughput" in parts:
        throughput(check)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize))
        return 0
    if args.merge_blocks:
        print(merge_blocks(args.merge_blocks, REPO / "benchmarks" / "results" / "blocks"))
        return 0
    forbid_imports(args.forbid_imports)
    ctrlab_from = make_ctrlab_importable()
    check = Check(args)
    check.say(f"gpu_check: parts {args.parts}, budget {args.budget_s:.0f}s, results in {check.out}"
              + (" (SMOKE: tiny data, a few steps)" if args.smoke else ""))
    environment(check, ctrlab_from)
    code = 0
    try:
        run_parts(check)
        check.emit("end", status="done")
    except KeyboardInterrupt:
        check.say("interrupted (time limit?): summary of what was recorded")
        check.emit("end", status="interrupted")
        code = 130
    summary = summarize(check.jsonl)
    (check.out / "summary.md").write_text(summary + "\n")
    print("\n" + summary, flush=True)
    failed = any(r.get("status") in ("failed", "oom") for r in _read_lines(check.jsonl))
    return code or (1 if failed else 0)


if __name__ == "__main__":
    sys.exit(main())
