"""Training on several processes on CPU (gloo): data parallelism through ``ctrlab train --nproc`` and torchrun,
torchrec-sharded tables, resuming, and the recipe errors of both. Every run here is real: worker processes,
a process group, collectives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch
import yaml

from ctrlab.cli import main
from ctrlab.data.pipeline import TRUE_PROBABILITY_COLUMN, load_raw_splits
from ctrlab.distributed.shards import ShardBatches, check_shards, shard_rows, shard_sizes
from ctrlab.errors import RecipeError
from ctrlab.serve import Predictor
from ctrlab.train.state import state_path
from tiny import one_line_error, terminate_once_saved

torchrec = pytest.importorskip("torchrec")

SMALL_VOCABULARIES = [3, 5, 8, 12, 20, 30, 50, 80, 120, 200, 300, 500]


def _recipe(out: Path, rows: int, **train: Any) -> dict[str, Any]:
    return {
        "name": "dist", "seed": 2021, "output_dir": str(out),
        "dataset": {"synthetic": {"rows": rows, "cardinalities": SMALL_VOCABULARIES}},
        "model": {"block": "deepfm", "mlp": {"hidden": [64, 32]}},
        "train": {"batch_size": 4096, "progress": False, "device": "cpu", "num_threads": 1, **train},
        "tracking": {"enabled": False},
    }


def _cli(tmp_path: Path, recipe: dict[str, Any], *args: str, wait: bool = True
         ) -> subprocess.CompletedProcess[str] | subprocess.Popen[str]:
    """``python -m ctrlab train RECIPE ARGS`` in a child process with its own cache directory."""
    path = tmp_path / f"recipe-{len(list(tmp_path.glob('recipe-*')))}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "CTRLAB_CACHE_DIR": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "ctrlab", "train", str(path), *args]
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)


def _metrics(out: Path) -> dict[str, Any]:
    return json.loads((out / "metrics.json").read_text())


# ------------------------------------------------------------------------------------------ shards (no processes)
@pytest.mark.parametrize("rows,world", [(10, 2), (11, 2), (1001, 3), (7, 7)])
def test_shards_are_disjoint_cover_the_split_and_differ_by_at_most_one_row(rows: int, world: int) -> None:
    shards = [shard_rows(rows, rank, world).tolist() for rank in range(world)]
    together = sorted(i for shard in shards for i in shard)
    assert together == list(range(rows))
    assert [len(s) for s in shards] == shard_sizes(rows, world)
    assert max(shard_sizes(rows, world)) - min(shard_sizes(rows, world)) <= 1


def test_every_rank_takes_the_same_number_of_non_empty_steps() -> None:
    from ctrlab.data.batches import FeatureBatch

    rows, world, batch = 1025, 2, 256  # shards of 513 and 512 rows: ceil(513 / 256) = 3 steps each
    steps = []
    for rank in range(world):
        index = shard_rows(rows, rank, world)
        shard = FeatureBatch(categorical=index.unsqueeze(1), numeric=torch.zeros(len(index), 0))
        batches = list(ShardBatches(shard, rows, world, batch, shuffle=True, generator=torch.Generator()))
        assert all(len(b) > 0 for b in batches)
        assert sorted(torch.cat([b.categorical[:, 0] for b in batches]).tolist()) == index.tolist()
        steps.append(len(batches))
    assert steps == [3, 3]


def test_a_split_smaller_than_one_batch_per_rank_and_step_is_refused() -> None:
    with pytest.raises(RecipeError, match=r"^distributed\.processes: 4 processes need at least 1 rows each in the "
                                          r"valid split to take a batch at every step; the smallest share has 0 of 3; "
                                          r"use fewer processes$"):
        check_shards("valid", shard_sizes(3, 4), 100)
    check_shards("valid", shard_sizes(4, 4), 100)
    with pytest.raises(RecipeError, match=r"^dataset\.chunk_rows: 2 processes need at least 2 rows each .* the "
                                          r"smallest share has 1 of 1,001; lower dataset\.chunk_rows"):
        check_shards("train", [1000, 1], 500, key="dataset.chunk_rows")
    check_shards("train", [1000, 2], 500, key="dataset.chunk_rows")


# ------------------------------------------------------------------------------------------ data parallelism
def test_the_ranks_train_on_disjoint_shards_that_cover_the_split_and_predictions_come_back_in_order(
        tmp_path: Path) -> None:
    worker = Path(__file__).with_name("distributed_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(worker), str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    rows = ranks[0]["train_rows"]
    assert [r["world_size"] for r in ranks] == [2, 2]
    for epoch in ("1", "2"):
        seen = [r["seen"][epoch] for r in ranks]
        assert len(set(seen[0])) == len(seen[0]) and len(set(seen[1])) == len(seen[1]), "a row twice in an epoch"
        assert not set(seen[0]) & set(seen[1]), "the ranks' shards overlap"
        assert sorted(seen[0] + seen[1]) == list(range(rows)), "the shards do not cover the training split"
    assert ranks[0]["seen"]["1"] != ranks[0]["seen"]["2"]  # reshuffled every epoch
    for rank in ranks:  # every rank holds every validation row's probability, in the split's order
        assert rank["predictions"] == rank["valid_rows"]
        assert rank["max_prediction_difference"] < 1e-6


@pytest.fixture(scope="module")
def one_and_two_processes(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any]]:
    """The same recipe on one process and on two (same global batch), trained to early stopping."""
    tmp = tmp_path_factory.mktemp("ddp")
    recipe = _recipe(tmp / "runs" / "one", 200_000, epochs=30, optimizer={"lr": 5e-3})
    one = _cli(tmp, recipe)
    assert one.returncode == 0, one.stderr[-2000:]
    recipe["output_dir"] = str(tmp / "runs" / "two")
    two = _cli(tmp, recipe, "--nproc", "2")
    assert two.returncode == 0, two.stderr[-2000:]
    return _metrics(tmp / "runs" / "one"), _metrics(tmp / "runs" / "two")


def test_two_processes_reach_the_test_auc_of_one_within_0_002(one_and_two_processes) -> None:
    one, two = one_and_two_processes
    assert "processes" not in one and two["processes"] == 2
    assert two["stopped_early"] and one["stopped_early"]
    assert abs(one["test"]["auc"] - two["test"]["auc"]) <= 0.002, (one["test"], two["test"])
    assert two["test"]["auc"] > 0.75  # both learnt (the Bayes-optimal AUC of this set is about 0.82)


def test_an_interrupted_two_process_run_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    """SIGTERM to ``ctrlab train --nproc 2`` mid-run: one line, exit 143, the state rank 0 saved kept; rerunning
    continues on both ranks (each its own shuffling stream) and ends exactly where an uninterrupted run ends."""
    recipe = _recipe(tmp_path / "whole", 60_000, epochs=8, early_stopping=None)
    recipe["model"]["mlp"]["dropout"] = 0.2
    whole = _cli(tmp_path, recipe, "--nproc", "2")
    assert whole.returncode == 0, whole.stderr[-2000:]

    out = tmp_path / "resumed"
    recipe = {**recipe, "output_dir": str(out), "train": {**recipe["train"], "resume": True}}
    process = _cli(tmp_path, recipe, "--nproc", "2", wait=False)
    assert isinstance(process, subprocess.Popen)
    stderr = terminate_once_saved(process, state_path(out))
    assert process.returncode == 143, stderr
    assert [line for line in stderr.splitlines() if "terminated" in line] == [
        "terminated; nothing half-written was left behind"]
    assert "Traceback" not in stderr and not out.exists()

    resumed = _cli(tmp_path, recipe, "--nproc", "2")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming after epoch" in resumed.stderr
    assert _metrics(out)["test"] == _metrics(tmp_path / "whole")["test"]
    assert [r["train_loss"] for r in _metrics(out)["history"]] == [
        r["train_loss"] for r in _metrics(tmp_path / "whole")["history"]]
    assert pl.read_parquet(out / "test_predictions.parquet").equals(
        pl.read_parquet(tmp_path / "whole" / "test_predictions.parquet"))
    assert not state_path(out).exists()


# ------------------------------------------------------------------------------------------ sharded tables
@pytest.mark.parametrize("sharding", ["table_wise", "column_wise", "auto"])
def test_a_sharded_two_process_run_reloads_into_one_process_with_identical_predictions(
        tmp_path: Path, sharding: str) -> None:
    out = tmp_path / "sharded"
    recipe = _recipe(out, 30_000, epochs=3, batch_size=1024, optimizer={"name": "adagrad", "lr": 0.05})
    recipe["embedding"] = {"kind": "per_field", "backend": "torchrec", "dim": 8}
    recipe["distributed"] = {"sharding": sharding}
    done = _cli(tmp_path, recipe, "--nproc", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = _metrics(out)
    placements = metrics["sharding"]
    assert sorted(placements) == sorted(f"C{i}" for i in range(1, 13))
    if sharding == "auto":
        # the planner's choice: small tables replicated (data_parallel), larger ones split
        assert {p.split(" on ")[0] for p in placements.values()} <= {
            "data_parallel", "table_wise", "column_wise", "table_column_wise"}
    else:
        assert all(p.startswith(f"{sharding} on ranks") for p in placements.values())
    if sharding == "table_wise":  # the planner spreads whole tables over both ranks
        assert {p.split(" on ranks ")[1] for p in placements.values()} == {"[0]", "[1]"}
    assert metrics["test"]["auc"] > 0.65  # it learnt (0.5 is chance; the Bayes-optimal AUC is about 0.82)

    predictor = Predictor.from_run(out)  # one process, unsharded torchrec tables
    assert not hasattr(predictor.model.embedding.ebc, "_plan")
    raw = load_raw_splits(predictor.recipe.dataset, predictor.recipe.seed).frames["test"]
    rows = raw.drop(["label", TRUE_PROBABILITY_COLUMN])
    saved = pl.read_parquet(out / "test_predictions.parquet")["probability"].to_numpy()
    # Scored as the two ranks scored it (rank r: rows r, r + 2, ...; one batch each) on one BLAS thread as they
    # ran, the unsharded model gives the very same bits. (Other batch sizes or thread counts move the last bit
    # of a float32 product, as they do for any model.)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        again = np.empty(len(rows))
        again[0::2], again[1::2] = predictor.predict(rows[0::2]), predictor.predict(rows[1::2])
        whole = predictor.predict(rows)
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(again, saved), np.abs(again - saved).max()
    assert np.abs(whole - saved).max() < 1e-6


# ------------------------------------------------------------------------------------------ recipe errors
def _fails(tmp_path: Path, capsys: pytest.CaptureFixture[str], recipe: dict[str, Any], *args: str) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code = main(["train", str(path), *args])
    return one_line_error(code, capsys.readouterr().err)


def test_sharding_without_the_torchrec_backend_names_the_key(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    recipe = _recipe(tmp_path / "out", 1000)
    recipe["distributed"] = {"sharding": "table_wise"}
    line = _fails(tmp_path, capsys, recipe)
    assert "distributed.sharding: table_wise places torchrec tables; set embedding.backend: torchrec" in line


@pytest.mark.parametrize("change,needle", [
    ({"train": {"batch_size": 1001}}, "train.batch_size: the global batch of 1001 rows does not split evenly over 2"),
    ({"gate": {"kind": "optfs"}}, "gate: searches run in one process"),
    ({"embedding": {"sparse": True}}, "embedding.sparse: DistributedDataParallel averages dense gradients only"),
])
def test_what_data_parallelism_cannot_do_is_refused_before_any_process_starts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], change: dict[str, Any], needle: str) -> None:
    recipe = _recipe(tmp_path / "out", 1000)
    for section, values in change.items():
        recipe[section] = {**recipe.get(section, {}), **values}
    line = _fails(tmp_path, capsys, recipe, "--nproc", "2")
    assert needle in line
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("change,needle", [
    ({"distributed": {"sharding": "row_wise"}}, "distributed.sharding: row_wise needs CUDA"),
    ({"train": {"optimizer": {"name": "adam"}}}, "train.optimizer.name: sharded tables are updated by fbgemm's fused"),
    ({"embedding": {"dim": 6}}, "embedding.dim: sharded tables need a width divisible by 4"),
    ({"train": {"resume": True}}, "train.resume: the training state of sharded tables"),
])
def test_what_sharding_cannot_do_on_cpu_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            change: dict[str, Any], needle: str) -> None:
    recipe = _recipe(tmp_path / "out", 2000, epochs=1, optimizer={"name": "adagrad"})
    recipe["embedding"] = {"kind": "per_field", "backend": "torchrec", "dim": 8}
    recipe["distributed"] = {"sharding": "table_wise"}
    for section, values in change.items():
        recipe[section] = {**recipe[section], **values}
    if section == "train" and "optimizer" in values:
        recipe["train"]["optimizer"] = values["optimizer"]
    line = _fails(tmp_path, capsys, recipe)  # one process: a group of one still shards (fused updates)
    assert needle in line


def test_more_processes_than_a_split_can_feed_is_one_line_from_rank_0(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path / "out", 30, batch_size=4)  # 3 test rows for 4 processes
    done = _cli(tmp_path, recipe, "--nproc", "4")
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: distributed.processes: 4 processes need at least"), \
        done.stderr
    assert not (tmp_path / "out").exists()


def test_a_recipe_asking_for_processes_outside_torchrun_is_launched(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path / "out", 5000, epochs=1)
    recipe["distributed"] = {"processes": 2}
    done = _cli(tmp_path, recipe)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["output_dir"] == str(tmp_path / "out")  # rank 0 alone reports
    assert _metrics(tmp_path / "out")["processes"] == 2


def test_a_model_with_parameters_it_never_uses_trains_on_two_processes(tmp_path: Path) -> None:
    """Every numeric field bucketized leaves the embedding's numeric table unused; DDP must not wait for its
    gradient (it did: 'Expected to have finished reduction in the prior iteration')."""
    recipe = _recipe(tmp_path / "out", 20_000, epochs=2)
    recipe["features"] = {"categorical": [f"C{i}" for i in range(1, 13)],
                          "numeric": [{"name": f"I{i}", "transform": "bucketize", "buckets": 8} for i in range(1, 5)]}
    done = _cli(tmp_path, recipe, "--nproc", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    assert _metrics(tmp_path / "out")["epochs_run"] == 2
