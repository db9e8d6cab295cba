"""OptEmbed: the straight-through unit step, the threshold regulariser, row masks, supernet dimension sampling,
the thresholds' own optimiser, the evolutionary search, saved and reloaded architectures, and short runs on
synthetic data (full pipeline, and the same split over two runs with ``from_run``)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from rich.console import Console

from ctrlab.blocks import BLOCKS
from ctrlab.config.loader import validate_recipe
from ctrlab.config.train import OptimizerConfig, TrainConfig
from ctrlab.embeddings import EMBEDDINGS
from ctrlab.embeddings.mixed_dim import EmbeddingArchitecture, EmbeddingUnits
from ctrlab.embeddings.optembed import OptEmbedSupernet
from ctrlab.embeddings.searchable import binary_step
from ctrlab.errors import DataError, RecipeError
from ctrlab.models import build_model
from ctrlab.search import optembed as optembed_search
from ctrlab.search.optembed import EvolutionResult, evolutionary_search, keep_full_dims, supernet_hooks
from ctrlab.search.tables import TableArchitecture, TableOutcome, apply_outcome, load_architecture, save_architecture
from ctrlab.train.optim import build_optimizers
from ctrlab.train.run import seed_everything, train_recipe
from ctrlab.train.trainer import Trainer
from embedding_search_recipe import (
    LAYOUT,
    embedding_floats,
    reload_matches_saved_predictions,
    synthetic_recipe,
    tiny_batch,
)

QUIET = Console(quiet=True)
D = 4


def _config(**kw: object):
    return EMBEDDINGS.get("optembed").config(dim=D, init_std=0.5, **kw)


def _supernet(seed: int = 0, **kw: object) -> OptEmbedSupernet:
    torch.manual_seed(seed)
    return OptEmbedSupernet(_config(**kw), LAYOUT)


# ------------------------------------------------------------------------------------------------ unit step
def test_unit_step_forward_and_surrogate_gradient_match_hand_computed_values() -> None:
    x = torch.tensor([-1.5, -1.0, -0.7, -0.3, 0.0, 0.2, 0.4, 0.5, 1.0, 1.2], requires_grad=True)
    y = binary_step(x)
    assert y.tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]  # S(0) = 0: a row exactly at its threshold is pruned
    (y * 3.0).sum().backward()
    # S'(x) = 2 - 4|x| for |x| <= 0.4, 0.4 for 0.4 < |x| <= 1, 0 beyond; times the incoming gradient 3
    surrogate = [0.0, 0.4, 0.4, 2 - 4 * 0.3, 2.0, 2 - 4 * 0.2, 2 - 4 * 0.4, 0.4, 0.4, 0.0]
    torch.testing.assert_close(x.grad, 3.0 * torch.tensor(surrogate))


def test_row_mask_gradient_reaches_threshold_and_row_through_the_surrogate() -> None:
    supernet = _supernet()
    units = EmbeddingUnits.from_layout(LAYOUT)
    with torch.no_grad():
        supernet.weight.zero_()
        supernet.weight[units.offsets[1] + 2] = torch.tensor([0.1, -0.1, 0.05, 0.05])  # user row 2, L1 norm 0.3
        supernet.thresholds.copy_(torch.tensor([5.0, 0.1]))  # item, user
    supernet.eval()
    vectors = supernet.weight[units.offsets[1] + 2].view(1, 1, D)
    out = supernet.select(vectors, torch.tensor([1]), torch.tensor([[units.offsets[1] + 2]]))
    torch.testing.assert_close(out, vectors)  # 0.3 - 0.1 = 0.2 > 0: kept
    out.sum().backward()
    # d out.sum() / d t = -S'(0.2) · Σe = -(2 - 0.8) · 0.1
    torch.testing.assert_close(supernet.thresholds.grad, torch.tensor([0.0, -1.2 * 0.1]))
    # the row's own gradient: 1 (the mask) + S'(0.2) · Σe · sign(e)
    expected = 1 + 1.2 * 0.1 * torch.tensor([1.0, -1.0, 1.0, 1.0])
    torch.testing.assert_close(supernet.weight.grad[units.offsets[1] + 2], expected)


def test_threshold_regulariser_value_and_gradient() -> None:
    supernet = _supernet(sparsity_weight=0.1)
    with torch.no_grad():
        supernet.thresholds.copy_(torch.tensor([0.0, 1.0]))
    loss = supernet.sparsity_loss()
    assert loss.item() == pytest.approx(0.1 * (1 + math.exp(-1)))
    loss.backward()
    torch.testing.assert_close(supernet.thresholds.grad, -0.1 * torch.exp(-torch.tensor([0.0, 1.0])))  # pushes t up
    assert supernet.thresholds.shape == (2,)  # one per vocabulary table; numeric fields are never row-pruned


def test_rows_at_or_below_their_threshold_embed_as_zeros_in_evaluation() -> None:
    supernet = _supernet(threshold_init=1.2).eval()
    batch = tiny_batch(32, seed=2)
    out = supernet(batch)
    norms = supernet.weight.detach().abs().sum(1)
    units = EmbeddingUnits.from_layout(LAYOUT)
    kept = supernet.row_mask()
    assert 0 < int(kept["item"].sum()) < 9  # some rows pruned, some kept
    assert torch.equal(kept["item"], norms[:9] > 1.2)
    for field, unit in ((0, "item"), (1, "user")):
        ids = batch.categorical[:, field]
        zero = (out.fields[:, field] == 0).all(dim=1)
        assert torch.equal(zero, ~kept[unit][ids])
    # numeric vectors are never pruned
    x = units.offsets[2]
    torch.testing.assert_close(out.fields[:, 2], batch.numeric * supernet.weight[x])


# ------------------------------------------------------------------------------------------------ supernet
def test_supernet_sampling_masks_only_trailing_dims_and_shares_a_tables_dim() -> None:
    supernet = _supernet(threshold_init=-100.0)  # no row is pruned: only the dimension masks act
    batch = tiny_batch(256, seed=3)
    full = supernet.eval()(batch)
    torch.manual_seed(7)
    sampled = supernet.train()(batch)
    dims = []
    for b in range(len(batch)):
        row = []
        for f in range(3):
            kept = (sampled.fields[b, f] != 0).nonzero().flatten().tolist()
            d = max(kept) + 1
            assert kept == list(range(d))  # a prefix: the first d dims survive, the rest are zero
            torch.testing.assert_close(sampled.fields[b, f, :d], full.fields[b, f, :d])
            row.append(d)
        dims.append(row)
        # the history shares the item table, so it shares the item field's dimension
        vectors, mask = sampled.sequences["hist"]
        if bool(mask[b].any()):
            assert torch.all(vectors[b, :, row[0]:] == 0)
            torch.testing.assert_close(vectors[b, :, :row[0]], full.sequences["hist"][0][b, :, :row[0]])
    dims = np.array(dims)
    assert dims.min() == 1 and dims.max() == D  # uniform over 1..D: every value turns up in 256 x 3 draws
    assert len({tuple(r) for r in dims}) > 50  # drawn per example and field
    # evaluation: all dims, or the candidate's
    supernet.eval().use_dims([1, 3, 2])
    cand = supernet(batch).fields
    assert torch.all(cand[:, 0, 1:] == 0) and torch.all(cand[:, 1, 3:] == 0) and torch.all(cand[:, 2, 2:] == 0)
    torch.testing.assert_close(cand[:, 1, :3], full.fields[:, 1, :3])
    supernet.use_dims(None)
    torch.testing.assert_close(supernet(batch).fields, full.fields)


def test_warm_up_trains_at_all_dims_and_evaluation_can_sample_with_seeded_draws() -> None:
    supernet = _supernet(threshold_init=-100.0)
    batch = tiny_batch(256, seed=3)
    full = supernet.eval()(batch).fields
    supernet.sampling = False  # the warm-up: training at all dimensions
    torch.testing.assert_close(supernet.train()(batch).fields, full)
    supernet.sampling = True
    supernet.eval().sample_in_evaluation(5)
    first = supernet(batch).fields
    again = supernet(batch).fields  # the generator moved on: other draws
    supernet.sample_in_evaluation(5)  # re-seeded: the first draws again
    torch.testing.assert_close(supernet(batch).fields, first)
    assert not torch.equal(first, again)
    kept = (first[:, :2] != 0).sum(dim=2)  # per (example, categorical field) a prefix of 1..D dims, as in training
    assert kept.min() >= 1 and kept.max() == D and len({tuple(r) for r in kept.tolist()}) > 10
    torch.testing.assert_close(first[:, :2], full[:, :2] * (torch.arange(D) < kept.unsqueeze(-1)))
    supernet.use_dims([2, 2, 2])  # a candidate overrides the sampling
    assert int((supernet(batch).fields != 0).sum(dim=2).max()) == 2
    supernet.use_dims(None)
    supernet.sample_in_evaluation(None)
    torch.testing.assert_close(supernet(batch).fields, full)


def test_fallback_keeps_all_dims_only_when_the_best_candidate_is_worse_than_the_tolerance() -> None:
    assert keep_full_dims(0.70, 0.71, 0.0) and keep_full_dims(0.70, 0.71, 0.005)
    assert not keep_full_dims(0.70, 0.71, 0.01) and not keep_full_dims(0.72, 0.71, 0.0)
    assert not keep_full_dims(0.71, 0.71, 0.0)  # as good as all dims: the smaller table is kept
    assert keep_full_dims(-math.inf, 0.71, 0.0) and keep_full_dims(math.nan, 0.71, 0.0)
    assert not keep_full_dims(0.70, math.nan, 0.0)


def test_thresholds_get_their_own_optimiser_and_the_loss_their_regulariser() -> None:
    torch.manual_seed(0)
    config = BLOCKS.get("deepfm").config(mlp={"hidden": [8]}, linear=True)
    model = build_model(_config(sparsity_weight=0.5, threshold_lr=0.02), config, LAYOUT, OptEmbedSupernet)
    thresholds = model.embedding.thresholds
    hooks = supernet_hooks(model.embedding, threshold_lr=0.02)
    ids = {id(p) for opt in build_optimizers(model, OptimizerConfig(), hooks.parameter_groups).optimizers
           for g in opt.param_groups for p in g["params"]}
    assert id(thresholds) not in ids and id(model.embedding.weight) in ids
    trainer = Trainer(model, TrainConfig(progress=False, device="cpu", batch_size=4), torch.device("cpu"), hooks=hooks)
    last = trainer.optimizers.all[-1]
    assert last.param_groups[0]["params"] == [thresholds] and last.param_groups[0]["lr"] == 0.02
    model.eval()
    batch = tiny_batch()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch.label)
    torch.testing.assert_close(trainer._loss(batch), bce + 0.5 * torch.exp(-thresholds).sum())
    before = thresholds.detach().clone()
    trainer.train_epoch(tiny_batch(16))
    assert not torch.equal(thresholds, before)  # stepped by its own Adam


def test_supernet_starts_from_the_retrained_models_initial_values() -> None:
    config = BLOCKS.get("deepfm").config(mlp={"hidden": [8]}, linear=True)
    seed_everything(11)
    final = build_model(_config(), config, LAYOUT)
    seed_everything(11)
    supernet = build_model(_config(), config, LAYOUT, OptEmbedSupernet)
    assert torch.equal(final.embedding.dense_table(), supernet.embedding.weight.detach())
    for (name, a), (_, b) in zip(final.block.named_parameters(), supernet.block.named_parameters()):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------------------------------------ evolution
def _target_search(seed: int, **kw: object):
    target = (3, 1, 7, 5, 2, 8)
    return evolutionary_search(lambda c: -float(sum(abs(a - b) for a, b in zip(c, target))), 6, 8, lambda c: sum(c),
                               **{"generations": 12, "keep": 3, "mutation": 6, "crossover": 6, "parents": 6,
                                  "mutation_prob": 0.3, "seed": seed, **kw})


def test_evolution_is_deterministic_for_a_seed_and_keeps_improving_the_best() -> None:
    first, again, other = _target_search(0), _target_search(0), _target_search(1)
    assert first.history == again.history and first.best == again.best
    assert other.history != first.history
    per_generation = {}
    for row in first.history:
        per_generation.setdefault(row["generation"], []).append(row)
    best_so_far = [rows[0]["best_score"] for _, rows in sorted(per_generation.items())]
    generation_best = [max(r["score"] for r in rows) for _, rows in sorted(per_generation.items())]
    assert best_so_far == sorted(best_so_far)  # never gets worse
    assert generation_best == sorted(generation_best)  # with keep >= 1 the best candidate survives
    assert first.best_score > generation_best[0]  # and the search improves on the random start
    assert first.best_score == max(r["score"] for r in first.history)
    assert -first.best_score == sum(abs(a - b) for a, b in zip(first.best, (3, 1, 7, 5, 2, 8)))
    assert all(1 <= d <= 8 for row in first.history for d in row["dims"])
    assert first.evaluations <= 12 * 15  # scores are cached per candidate


def test_evolution_without_keep_still_returns_the_best_ever_seen() -> None:
    result = _target_search(2, keep=0)
    assert result.best_score == max(r["score"] for r in result.history)


# ------------------------------------------------------------------------------------------------ architecture
def test_saved_mask_and_dims_reload_to_identical_predictions(tmp_path: Path) -> None:
    config = BLOCKS.get("deepfm").config(mlp={"hidden": [8]})
    seed_everything(5)
    model = build_model(_config(), config, LAYOUT)
    rows = torch.tensor([True, True, False, True, True, True, False, True, True])
    architecture = EmbeddingArchitecture(D, {"item": 3, "user": 1, "x": 2}, {"item": rows, "user": torch.ones(5) > 0})
    save_architecture(architecture, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dims.json", "row_mask.safetensors"]
    assert json.loads((tmp_path / "dims.json").read_text())["dims"] == {"item": 3, "user": 1, "x": 2}
    model.embedding.prune(architecture)
    seed_everything(5)
    again = build_model(_config(), config, LAYOUT)
    again.embedding.prune(load_architecture(tmp_path, EmbeddingUnits.from_layout(LAYOUT), D))
    batch = tiny_batch(32)
    assert torch.equal(model.eval()(batch), again.eval()(batch))
    with pytest.raises(DataError, match="dims"):
        load_architecture(tmp_path, EmbeddingUnits.from_layout(LAYOUT), D + 1)


def test_without_retraining_the_final_model_is_the_searched_subnetwork() -> None:
    config = BLOCKS.get("deepfm").config(mlp={"hidden": [8]}, linear=True)
    seed_everything(3)
    network = build_model(_config(threshold_init=1.2), config, LAYOUT, OptEmbedSupernet).eval()
    supernet = network.embedding
    rows = supernet.row_mask()
    assert 0 < int(rows["item"].sum()) < 9
    supernet.use_dims([3, 2, 1])
    batch = tiny_batch(32, seed=2)
    expected = network(batch)
    seed_everything(4)  # other initial values: everything comes from the network
    final = build_model(_config(), config, LAYOUT)
    architecture = EmbeddingArchitecture(D, {"item": 3, "user": 2, "x": 1}, rows)
    units = EmbeddingUnits.from_layout(LAYOUT)
    apply_outcome(final, TableOutcome(TableArchitecture(architecture, units), retrain=False, network=network))
    assert final.embedding.parameter_count() == architecture.kept_parameters(EmbeddingUnits.from_layout(LAYOUT))
    assert torch.equal(final.eval()(batch), expected)


def test_stage_lists_are_checked_with_messages_naming_the_keys() -> None:
    base = {"name": "v", "dataset": {"synthetic": {"rows": 100}}, "model": {"block": "deepfm"}}
    for embedding, words in (({"stages": ["search", "retrain"]}, "embedding.from_run"),
                             ({"stages": ["retrain", "supernet"]}, "in the order supernet, search, retrain"),
                             ({"from_run": "runs/x"}, "embedding.from_run is set"),
                             ({"keep": 0, "mutation": 1, "crossover": 0}, "embedding.keep"),
                             ({"stages": ["supernet", "nope"]}, "embedding.stages")):
        with pytest.raises(RecipeError, match=words):
            validate_recipe({**base, "embedding": {"kind": "optembed", **embedding}})
    ok = validate_recipe({**base, "embedding": {"kind": "optembed", "stages": ["retrain"], "from_run": "runs/x"}})
    assert ok.embedding.stages == ["retrain"]


# ------------------------------------------------------------------------------------------------ runs
SEARCH = {"kind": "optembed", "warmup_epochs": 2, "supernet_epochs": 3, "threshold_lr": 1e-2, "sparsity_weight": 1e-3,
          "generations": 3, "keep": 2, "mutation": 2, "crossover": 2, "parents": 3}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("optembed")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CTRLAB_CACHE_DIR", str(root / "cache"))
        recipe = validate_recipe(synthetic_recipe(root / "full", SEARCH))
        yield root, recipe, train_recipe(recipe, console=QUIET)


def test_optembed_run_learns_with_a_smaller_table_and_writes_every_stage(full_run) -> None:
    _, recipe, result = full_run
    metrics = json.loads((result.output_dir / "metrics.json").read_text())
    search = metrics["embedding_search"]
    assert metrics["test"]["auc"] > 0.65 and search["supernet"]["best_valid"]["auc"] > 0.6
    warmup = search["supernet"]["warmup"]  # the warm-up at all dims ran first, then the sampling phase
    assert 1 <= warmup["epochs_run"] <= 2 and warmup["best_valid"]["auc"] > 0.6
    assert 1 <= search["supernet"]["epochs_run"] <= 3
    # the best candidate was compared with all dims on the same rows; it was kept, so it is within the tolerance
    assert search["search"]["fallback"] is False
    assert search["search"]["best_valid_auc"] >= search["search"]["full_dims_valid_auc"]
    assert metrics["embedding_parameters"] == search["kept_parameters"] < search["full_parameters"]
    assert metrics["embedding_bytes"] == 4 * metrics["embedding_parameters"]
    assert 0 < search["row_sparsity"] < 0.5 and 0 < search["sparsity"] < 1  # rows and dims pruned
    assert search["dims"] == dict(zip(search["dims"], json.loads((result.output_dir / "embedding_search" /
                                                                  "dims.json").read_text())["dims"].values()))
    assert len(metrics["history"]) == 3  # the re-training is the run's own training
    assert sorted(p.name for p in (result.output_dir / "embedding_search").iterdir()) == [
        "dims.json", "row_mask.safetensors", "search_history.csv", "search_progress.png", "supernet.safetensors"]
    with (result.output_dir / "embedding_search" / "search_history.csv").open() as f:
        history = list(csv.DictReader(f))
    assert len(history) == 3 * 6 and max(float(r["valid_auc"]) for r in history) == pytest.approx(
        search["search"]["best_valid_auc"], abs=1e-6)
    # the saved weights really hold fewer floats, and a fresh model built from the recipe serves them
    assert embedding_floats(result.output_dir / "model.safetensors") == metrics["embedding_parameters"]
    reload_matches_saved_predictions(result.output_dir, recipe)


def test_stages_split_over_two_runs_give_the_same_model(full_run) -> None:
    root, recipe, result = full_run
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CTRLAB_CACHE_DIR", str(root / "cache"))
        # supernet and search only: the searched network, pruned, is evaluated without re-training
        searched = train_recipe(validate_recipe(synthetic_recipe(
            root / "searched", {**SEARCH, "stages": ["supernet", "search"]})), console=QUIET)
        # re-training alone, from the mask and dims the first run saved
        retrained = train_recipe(validate_recipe(synthetic_recipe(
            root / "retrained", {**SEARCH, "stages": ["retrain"], "from_run": str(searched.output_dir)})),
            console=QUIET)
    assert searched.metrics["epochs_run"] == 0 and searched.metrics["test"]["auc"] > 0.6
    assert searched.metrics["embedding_parameters"] == result.metrics["embedding_parameters"]
    assert sorted(p.name for p in (retrained.output_dir / "embedding_search").iterdir()) == [
        "dims.json", "row_mask.safetensors"]
    saved = pl.read_parquet(result.output_dir / "test_predictions.parquet")["probability"].to_numpy()
    again = pl.read_parquet(retrained.output_dir / "test_predictions.parquet")["probability"].to_numpy()
    assert np.array_equal(saved, again)  # identical architecture, identical initial values, identical training
    reload_matches_saved_predictions(searched.output_dir, recipe)


def test_search_rows_scores_candidates_on_a_fixed_validation_sample(full_run) -> None:
    root, _, result = full_run
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CTRLAB_CACHE_DIR", str(root / "cache"))
        sampled = train_recipe(validate_recipe(synthetic_recipe(
            root / "sampled", {**SEARCH, "stages": ["supernet", "search"], "search_rows": 1000})), console=QUIET)

    def scores(run_dir: Path) -> list[float]:
        with (run_dir / "embedding_search" / "search_history.csv").open() as f:
            return [float(r["valid_auc"]) for r in csv.DictReader(f)]

    full, sample = scores(result.output_dir), scores(sampled.output_dir)
    assert result.metrics["rows"]["valid"] == 2000 and len(sample) == len(full)
    # the same supernet (same seed) scored on 1,000 of the 2,000 validation rows: other AUCs, same search length
    assert sample[0] != full[0] and all(0.5 < a < 1 for a in sample)


def test_from_run_without_stage_outputs_is_a_data_error(tmp_path: Path, cache_dir: Path) -> None:
    recipe = validate_recipe(synthetic_recipe(tmp_path / "out", {**SEARCH, "stages": ["search", "retrain"],
                                                                 "from_run": str(tmp_path / "nowhere")}))
    with pytest.raises(DataError, match="supernet.safetensors"):
        train_recipe(recipe, console=QUIET)
    assert not (tmp_path / "out").exists()


def test_max_parameters_keeps_the_searched_table_within_the_budget(full_run) -> None:
    root, _, result = full_run
    full = result.metrics["embedding_search"]["full_parameters"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CTRLAB_CACHE_DIR", str(root / "cache"))
        limited = train_recipe(validate_recipe(synthetic_recipe(
            # mutations redraw every dim (mean cost over half the table): some children exceed the budget
            root / "limited", {**SEARCH, "stages": ["supernet", "search"], "max_parameters": 0.3,
                               "mutation_prob": 1.0})), console=QUIET)
        with pytest.raises(RecipeError, match=r"embedding.max_parameters 0.001 is below the smallest candidate"):
            train_recipe(validate_recipe(synthetic_recipe(
                root / "tiny", {**SEARCH, "stages": ["supernet", "search"], "max_parameters": 0.001})), console=QUIET)
    search = limited.metrics["embedding_search"]
    assert search["kept_parameters"] <= 0.3 * full < result.metrics["embedding_parameters"]
    with (limited.output_dir / "embedding_search" / "search_history.csv").open() as f:
        history = list(csv.DictReader(f))
    # every candidate over the budget is scored -inf without evaluation, every one within it gets a real AUC
    assert any(float(r["valid_auc"]) == -math.inf for r in history)
    assert all((float(r["valid_auc"]) == -math.inf) == (int(r["kept_parameters"]) > 0.3 * full) for r in history)


def test_search_falls_back_to_all_dims_when_its_best_candidate_is_worse(full_run, monkeypatch) -> None:
    root, _, _ = full_run
    monkeypatch.setenv("CTRLAB_CACHE_DIR", str(root / "cache"))

    def poor_search(evaluate, num_units, max_dim, cost, **kw):  # the search "finds" one dim per field, scored 0.5
        best = (1,) * num_units
        return EvolutionResult(best=best, best_score=0.5, best_cost=cost(best), evaluations=1)

    monkeypatch.setattr(optembed_search, "evolutionary_search", poor_search)
    quick = {**SEARCH, "warmup_epochs": 0, "supernet_epochs": 1, "stages": ["supernet", "search"]}
    kept = train_recipe(validate_recipe(synthetic_recipe(root / "fallback", quick)), console=QUIET)
    search = kept.metrics["embedding_search"]
    assert search["search"]["fallback"] is True and search["search"]["full_dims_valid_auc"] > 0.5
    assert set(search["dims"].values()) == {8}  # every unit at all embedding.dim dims
    assert "warmup" not in search["supernet"]
    # the paper's rule (no fallback) keeps the search's candidate, however it scores
    paper = train_recipe(validate_recipe(synthetic_recipe(root / "paper", {**quick, "fallback_tolerance": None})),
                         console=QUIET)
    search = paper.metrics["embedding_search"]
    assert set(search["dims"].values()) == {1} and "fallback" not in search["search"]
