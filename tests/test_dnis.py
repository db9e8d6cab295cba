"""DNIS: the soft selection layer, the first-order bi-level steps (alpha learns from validation batches only),
ranking and pruning by threshold or budget, and short runs on synthetic data."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F
from rich.console import Console

from ctrlab.blocks import BLOCKS
from ctrlab.config.loader import validate_recipe
from ctrlab.config.train import OptimizerConfig, TrainConfig
from ctrlab.embeddings import EMBEDDINGS
from ctrlab.embeddings.dnis import DNISSearchEmbedding, FrequencyBlocks, block_significance, training_row_counts
from ctrlab.embeddings.mixed_dim import EmbeddingArchitecture, EmbeddingUnits
from ctrlab.errors import RecipeError
from ctrlab.models import build_model
from ctrlab.search.dnis import (
    architecture_from_significance,
    bilevel_hooks,
    guarded_blocks,
    prune_by_budget,
    prune_by_threshold,
    pruned_alpha,
    rank_dimensions,
    validation_budget,
)
from ctrlab.search.tables import TableArchitecture, TableOutcome, apply_outcome
from ctrlab.train.hooks import ValidationStep
from ctrlab.train.metrics import auc
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
    return EMBEDDINGS.get("dnis").config(dim=D, init_std=0.5, **kw)


def _model(seed: int = 0, **kw: object):
    seed_everything(seed)
    config = BLOCKS.get("deepfm").config(mlp={"hidden": [8]}, linear=True)
    return build_model(_config(**kw), config, LAYOUT, DNISSearchEmbedding)


def test_soft_selection_layer_scales_each_fields_dims_by_its_alpha() -> None:
    model = _model()
    embedding = model.embedding
    batch = tiny_batch()
    plain = embedding(batch).fields
    with torch.no_grad():
        embedding.alpha.copy_(torch.tensor([[1.0, 0.5, 0.0, 2.0], [0.1, 0.2, 0.3, 0.4], [3.0, 3.0, 3.0, 3.0]]))
    out = embedding(batch)
    units = torch.tensor([0, 1, 2, 0])  # item, user, x, and the history shares the item table
    torch.testing.assert_close(out.fields, plain * embedding.alpha[units])
    torch.testing.assert_close(out.sequences["hist"][0][..., 2], torch.zeros(8, 4))
    # the network's effective table folds alpha in, row by row
    rows = EmbeddingUnits.from_layout(LAYOUT).rows
    expected = embedding.weight * embedding.alpha.repeat_interleave(torch.tensor(rows), dim=0)
    torch.testing.assert_close(embedding.effective_table(), expected.detach())


def test_alpha_learns_from_validation_batches_only() -> None:
    model = _model()
    alpha = model.embedding.alpha
    hooks = bilevel_hooks(model.embedding, arch_lr=0.05)
    with pytest.raises(ValueError, match="architecture parameters embedding.alpha belong to no parameter group"):
        build_optimizers(model, OptimizerConfig())
    optimizers = build_optimizers(model, OptimizerConfig(), hooks.parameter_groups)
    ids = {id(p) for opt in optimizers.training for g in opt.param_groups for p in g["params"]}
    assert id(alpha) not in ids  # no optimiser of a training step ever steps alpha
    train = tiny_batch(8, seed=1)
    valid = tiny_batch(8, seed=2)
    valid.label = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0])
    trainer = Trainer(model, TrainConfig(progress=False, device="cpu", batch_size=8), torch.device("cpu"),
                      hooks=hooks)
    step = ValidationStep(model, trainer.optimizers.validation, valid, 8, torch.device("cpu"))
    assert not alpha.requires_grad  # outside the architecture step, alpha is out of autograd
    alpha_before = alpha.detach().clone()
    weights_seen: dict[str, torch.Tensor] = {}

    def spy() -> None:  # runs right after the weights' step: record the weights the alpha step sees
        weights_seen.update({k: v.detach().clone() for k, v in model.named_parameters() if k != "embedding.alpha"})
        assert alpha.grad is None or torch.equal(alpha.detach(), alpha_before)  # the training step left alpha alone
        step()

    trainer.validation_step = spy  # type: ignore[assignment]
    trainer.train_epoch(train)  # one training step (batch 8) then one alpha step
    assert step.steps == 1
    # the weights are exactly those after the training step: the alpha step changed none of them
    for name, value in model.named_parameters():
        if name != "embedding.alpha":
            assert torch.equal(value, weights_seen[name]), name
    # alpha's gradient is the validation loss's, at those weights and the old alpha
    check = _model()
    check.load_state_dict({**weights_seen, "embedding.alpha": alpha_before}, strict=False)
    check.eval()
    check.embedding.alpha.requires_grad_(True)
    loss = F.binary_cross_entropy_with_logits(check(valid), valid.label)
    (expected,) = torch.autograd.grad(loss, [check.embedding.alpha])
    torch.testing.assert_close(alpha.grad, expected)
    train_loss = F.binary_cross_entropy_with_logits(check(train), train.label)
    (from_train,) = torch.autograd.grad(train_loss, [check.embedding.alpha])
    assert not torch.allclose(from_train, expected)  # a different gradient: the step used the validation batch
    # Adam's first step moves every coordinate by lr against the sign of its gradient
    moved = (alpha_before - alpha.detach())[expected != 0]
    torch.testing.assert_close(moved, 0.05 * torch.sign(expected[expected != 0]), rtol=0, atol=1e-5)


def test_ranking_orders_dims_by_significance() -> None:
    alpha = torch.tensor([[0.1, -0.9, 0.5, 0.5], [2.0, 1.0, -3.0, 0.0]])
    assert rank_dimensions(alpha) == [[1, 2, 3, 0], [2, 0, 1, 3]]  # by |alpha|, ties by index


def test_threshold_pruning_keeps_dims_above_a_fraction_of_the_largest_alpha() -> None:
    alpha = torch.tensor([[0.1, -0.9, 0.5, 0.5], [2.0, 1.0, -3.0, 0.0], [0.2, 0.1, 0.1, 0.0]])
    assert prune_by_threshold(alpha, 0.3) == [1, 3, 0]  # cut at 0.3 · 3 = 0.9: |-0.9|; 2, 1, |-3|; none
    assert prune_by_threshold(alpha, 1.0) == [0, 1, 0]


def test_budget_pruning_by_hand() -> None:
    alpha = torch.tensor([[0.9, 0.1], [0.8, 0.7], [0.5, 0.05]])
    rows = [10, 1, 5]
    # budget 0.5 of 16 rows x 2 dims = 16 floats: 0.9 (10), 0.8 (1), 0.7 (1) fit; 0.5 (5) would make 17
    assert prune_by_budget(alpha, rows, 0.5) == ([1, 2, 0], 12)
    assert prune_by_budget(alpha, rows, 1.0) == ([2, 2, 2], 32)
    # per float: 0.8 and 0.7 (cost 1) first, then 0.5/5 = 0.1 (5), 0.9/10 = 0.09 (10) would make 17, 0.05/5 fits
    assert prune_by_budget(alpha, rows, 0.5, per_parameter=True) == ([0, 2, 2], 12)


def test_min_dim_is_paid_for_first_then_the_budget_is_filled_greedily_by_hand() -> None:
    alpha = torch.tensor([[0.9, 0.1], [0.8, 0.7], [0.5, 0.05]])
    rows = [10, 1, 5]
    # budget 0.5 of 32 = 16 floats. Without min_dim unit 2 loses every dimension: ([1, 2, 0], 12) as above.
    # With min_dim 1 the three reserved dimensions cost 16 and unit 1's 0.7 (1 more) no longer fits.
    assert prune_by_budget(alpha, rows, 0.5, min_dim=1) == ([1, 1, 1], 16)
    # budget 0.75 (24 floats): 16 reserved, 0.7 (1) fits, 0.1 (10) would make 27, 0.05 (5) makes 22
    assert prune_by_budget(alpha, rows, 0.75, min_dim=1) == ([1, 2, 2], 22)
    with pytest.raises(ValueError, match="min_dim 2 needs 32 floats, more than the budget's 16"):
        prune_by_budget(alpha, rows, 0.5, min_dim=2)
    assert prune_by_threshold(alpha, 0.9) == [1, 0, 0]  # |alpha| >= 0.81
    assert prune_by_threshold(alpha, 0.9, min_dim=1) == [1, 1, 1]
    assert prune_by_threshold(alpha, 0.9, min_dim=5) == [2, 2, 2]  # capped at the width


def test_guard_keeps_one_dim_of_every_block_whose_significance_is_not_nil_by_hand() -> None:
    alpha = torch.tensor([[0.9, 0.1], [0.8, 0.7], [0.5, 0.05], [0.0005, 0.0]])
    rows = [10, 1, 5, 4]
    assert guarded_blocks(alpha, 1e-3) == [True, True, True, False]  # 0.0005 < 1e-3 · 0.9: nil
    assert guarded_blocks(alpha, None) == guarded_blocks(alpha, 1.0) == [False] * 4  # the paper's pruning
    # budget 0.5 of 20 rows x 2 = 20 floats: 0.9 (10), 0.8 (1), 0.7 (1), 0.5 (5) make 17; nothing else fits
    assert prune_by_budget(alpha, rows, 0.5) == ([1, 2, 1, 0], 17)
    assert prune_by_budget(alpha, rows, 0.5, nil=1e-3) == ([1, 2, 1, 0], 17)
    # budget 0.35 (14 floats): 0.5 (5) no longer fits after 12, and the guard does not break the budget for it:
    # units 0 and 1 reserve their best (11), unit 2's would make 16
    assert prune_by_budget(alpha, rows, 0.35) == ([1, 2, 0, 0], 12)
    assert prune_by_budget(alpha, rows, 0.35, nil=1e-3) == ([1, 2, 0, 0], 12)
    # with room for it, a guarded unit keeps a dimension the greedy fill would have given away
    alpha2 = torch.tensor([[0.9, 0.8], [0.3, 0.2]])
    assert prune_by_budget(alpha2, [5, 5], 0.5) == ([2, 0], 10)
    assert prune_by_budget(alpha2, [5, 5], 0.5, nil=1e-3) == ([1, 1], 10)
    assert prune_by_budget(alpha2, [5, 5], 0.5, nil=0.5) == ([2, 0], 10)  # 0.3 < 0.5 · 0.9: nil at this level
    # threshold 0.6 (cut 0.54): unit 2 keeps nothing, unless guarded; unit 3 is nil and keeps nothing
    assert prune_by_threshold(alpha, 0.6) == [1, 2, 0, 0]
    assert prune_by_threshold(alpha, 0.6, nil=1e-3) == [1, 2, 1, 0]


def test_validation_budget_is_the_smallest_within_tolerance_and_leaves_alpha_as_it_was() -> None:
    model = _model().eval()
    embedding = model.embedding
    units = EmbeddingUnits.from_layout(LAYOUT)
    valid = tiny_batch(256, seed=4)
    with torch.no_grad():  # make the item table matter: the labels follow its first dimension's sign
        valid.label = (embedding.weight[valid.categorical[:, 0], 0] > 0).float()
        embedding.alpha.copy_(torch.tensor([[4.0, 0.1, 0.1, 0.1], [0.2, 0.2, 0.2, 0.2], [0.3, 0.3, 0.3, 0.3]]))
    alpha = embedding.alpha.detach().clone()
    significance = embedding.significance()
    blocks = FrequencyBlocks.one_per_unit(units)
    loose = validation_budget(model, significance, blocks, _config(tolerance=1.0), valid, 64, torch.device("cpu"))
    assert loose.budget == 0.05 and list(loose.tried) == [0.05]  # anything passes: the smallest budget
    strict = validation_budget(model, significance, blocks, _config(tolerance=0.0), valid, 64, torch.device("cpu"),
                               steps=(0.25, 0.5, 0.75))
    assert torch.equal(embedding.alpha.detach(), alpha)  # the pruned alphas were only tried
    full = strict.full_auc
    for budget, score in strict.tried.items():  # every budget below the chosen one failed; the chosen one passed
        assert (score >= full) == (budget == strict.budget)
    # each tried score is the network's AUC with the pruned dimensions' alpha at 0
    for budget, score in strict.tried.items():
        dims, _ = prune_by_budget(significance, units.rows, budget, nil=1e-3)
        with torch.no_grad():
            embedding.alpha.copy_(pruned_alpha(alpha, significance, dims))
        probabilities = torch.sigmoid(model(valid)).detach().numpy()
        assert score == pytest.approx(auc(valid.label.numpy(), probabilities))
        assert all(int((embedding.alpha[u] != 0).sum()) == d for u, d in enumerate(dims))


def test_a_min_dim_the_budget_cannot_pay_for_is_a_recipe_error_naming_the_key() -> None:
    units = EmbeddingUnits(("a", "b"), (10, 6), 2, (0, 1), ())
    config = EMBEDDINGS.get("dnis").config(dim=4, budget=0.25, min_dim=2)  # 2 x 16 rows > 0.25 x 64
    with pytest.raises(RecipeError, match=r"embedding\.min_dim: min_dim 2 needs 32 floats, more than the budget's 16"):
        architecture_from_significance(torch.ones(2, 4), units, config)
    ok = architecture_from_significance(torch.ones(2, 4), units, config.model_copy(update={"min_dim": 1}))
    assert ok.kept_parameters(units) == 16


def test_effective_significance_weighs_alpha_by_the_blocks_root_mean_square_weights() -> None:
    units = EmbeddingUnits.from_layout(LAYOUT)  # 15 rows: item 9, user 5, x 1
    blocks = FrequencyBlocks.from_counts(units, torch.arange(15, 0, -1), 2)  # item rows 0-4 | 5-8, user 0-2 | 3-4
    weight = torch.zeros(15, 2)
    weight[0:5] = torch.tensor([3.0, 0.0])
    weight[5:9] = torch.tensor([0.0, 1.0])
    weight[9:12, 0] = torch.tensor([1.0, 2.0, 2.0])
    weight[14] = torch.tensor([-4.0, 0.5])
    alpha = torch.tensor([[1.0, 1.0], [2.0, -3.0], [0.5, 1.0], [1.0, 1.0], [1.0, 2.0]])
    effective = block_significance(weight, alpha, blocks, "effective")
    expected = torch.tensor([[3.0, 0.0], [0.0, 3.0], [0.5 * 3 ** 0.5, 0.0], [0.0, 0.0], [4.0, 1.0]])
    torch.testing.assert_close(effective, expected)
    torch.testing.assert_close(block_significance(weight, alpha, blocks), alpha.abs())


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("budget", [0.05, 0.25, 0.5, 0.9])
def test_budget_pruning_never_exceeds_the_budget_and_fills_it_greedily(seed: int, budget: float) -> None:
    g = torch.Generator().manual_seed(seed)
    alpha = torch.randn(7, 8, generator=g)
    rows = torch.randint(1, 300, (7,), generator=g).tolist()
    dims, spent = prune_by_budget(alpha, rows, budget, nil=1e-3)  # the recipe's default guard, as below
    allowed = math.floor(budget * sum(rows) * 8)
    assert spent == sum(r * d for r, d in zip(rows, dims)) <= allowed
    # greedy: every unit that could still grow would break the budget
    assert all(d == 8 or spent + r > allowed for r, d in zip(rows, dims))
    # and the kept dims of each unit are its most significant ones, in order
    units = EmbeddingUnits(tuple(f"u{i}" for i in range(7)), tuple(rows), 7, tuple(range(7)), ())
    config = EMBEDDINGS.get("dnis").config(dim=8, budget=budget)
    architecture = architecture_from_significance(alpha, units, config)
    assert architecture.kept_parameters(units) == spent
    ranks = rank_dimensions(alpha)
    assert all(architecture.order[f"u{i}"] == ranks[i][:dims[i]] for i in range(7))


def test_retrained_table_keeps_dims_in_significance_order() -> None:
    alpha = torch.tensor([[0.1, -0.9, 0.5, 0.2], [2.0, 0.2, -3.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    units = EmbeddingUnits.from_layout(LAYOUT)
    architecture = architecture_from_significance(alpha, units, _config(threshold=0.1))  # |alpha| >= 0.3
    assert architecture.dims == {"item": 2, "user": 2, "x": 4}
    assert architecture.order == {"item": [1, 2], "user": [2, 0], "x": [0, 1, 2, 3]}
    table = EMBEDDINGS.build(_config(), LAYOUT)
    full = table.dense_table()
    table.prune(architecture)
    dense = table.dense_table()
    torch.testing.assert_close(dense[:9, :2], full[:9][:, [1, 2]])
    torch.testing.assert_close(dense[9:14, :2], full[9:14][:, [2, 0]])
    assert table.parameter_count() == 9 * 2 + 5 * 2 + 4


def test_without_retraining_the_final_model_is_the_searched_network_with_alpha_folded_in() -> None:
    network = _model(seed=3).eval()
    with torch.no_grad():
        network.embedding.alpha.copy_(torch.rand(3, D, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    batch = tiny_batch(32, seed=2)
    expected = network(batch)
    seed_everything(4)
    config = BLOCKS.get("deepfm").config(mlp={"hidden": [8]}, linear=True)
    final = build_model(_config(), config, LAYOUT)
    units = EmbeddingUnits.from_layout(LAYOUT)
    pruned = architecture_from_significance(network.embedding.significance(), units, _config(budget=0.5))
    outcome = TableOutcome(TableArchitecture(pruned, units), retrain=False, network=network,
                           network_architecture=EmbeddingArchitecture(D))
    apply_outcome(final, outcome)
    # the kept dims are not each field's leading ones, so the network keeps its full table (alpha folded in)
    assert final.embedding.unit_dims == [D, D, D]
    assert torch.equal(final.eval()(batch), expected)


def test_frequency_blocks_cut_each_table_by_training_counts_by_hand() -> None:
    units = EmbeddingUnits.from_layout(LAYOUT)  # item 9 rows, user 5 rows, x numeric
    batch = tiny_batch(16, seed=2)
    counts = training_row_counts(LAYOUT, batch)
    # item rows are counted from the item field and from the histories' real items, user rows from the user field
    item = torch.bincount(torch.cat([batch.categorical[:, 0], batch.sequences["hist"][batch.sequences["hist"] > 0]]),
                          minlength=9)
    user = torch.bincount(batch.categorical[:, 1], minlength=5)
    assert torch.equal(counts[:9], item) and torch.equal(counts[9:14], user)
    by_hand = torch.tensor([5, 0, 3, 9, 1, 2, 2, 7, 4,   0, 6, 6, 1, 3,   0])
    blocks = FrequencyBlocks.from_counts(units, by_hand, 3)
    # item sorted by count: rows 3, 7, 0 | 8, 2, 5 | 6, 4, 1 (ties keep row order: 5 before 6)
    assert blocks.unit_blocks(units, 0).tolist() == [0, 2, 1, 0, 2, 1, 2, 0, 1]
    # user (5 rows, 3 blocks of sizes 2, 2, 1): rows 1, 2 | 4, 3 | 0
    assert blocks.unit_blocks(units, 1).tolist() == [2, 0, 0, 1, 1]
    assert blocks.block_unit == (0, 0, 0, 1, 1, 1, 2) and blocks.rows_per_block == [3, 3, 3, 2, 2, 1, 1]
    assert blocks.names(units) == ["item#0", "item#1", "item#2", "user#0", "user#1", "user#2", "x"]
    # at least 4 rows per block: item (9 rows) in 2 blocks (rows 3, 7, 0, 8, 2 | 5, 6, 4, 1), user (5 rows) in 1
    fewer = FrequencyBlocks.from_counts(units, by_hand, 3, min_rows=4)
    assert fewer.unit_blocks(units, 0).tolist() == [0, 1, 0, 0, 1, 1, 1, 0, 0] and fewer.block_unit == (0, 0, 1, 2)
    assert FrequencyBlocks.from_counts(units, by_hand, 1).row_block.tolist() == \
        FrequencyBlocks.one_per_unit(units).row_block.tolist()


def test_blocks_get_their_own_significance_and_budgeted_dims() -> None:
    units = EmbeddingUnits.from_layout(LAYOUT)
    blocks = FrequencyBlocks.from_counts(units, torch.tensor([5, 0, 3, 9, 1, 2, 2, 7, 4, 0, 6, 6, 1, 3, 0]), 3)
    seed_everything(0)
    config = BLOCKS.get("deepfm").config(mlp={"hidden": [8]}, linear=True)
    model = build_model(_config(), config, LAYOUT, lambda c, layout: DNISSearchEmbedding(c, layout, blocks=blocks))
    embedding = model.embedding
    assert embedding.alpha.shape == (7, D)
    with torch.no_grad():
        embedding.alpha.copy_(torch.arange(7 * D, dtype=torch.float).view(7, D))
    batch = tiny_batch()
    raw = F.embedding(batch.categorical[:, 0], embedding.weight)
    weights = embedding.alpha[blocks.row_block[batch.categorical[:, 0]]]
    torch.testing.assert_close(embedding(batch).fields[:, 0], raw * weights)
    # significance by hand: the frequent item block and the users matter, the rare item blocks less
    significance = torch.tensor([[4.0, 3.0, 2.0, 1.0], [0.5, 0.4, 0.3, 0.2], [0.1, 0.2, 0.05, 0.01],
                                 [3.0, 3.0, 0.1, 0.1], [2.5, 0.1, 0.1, 0.1], [0.2, 0.1, 0.1, 0.1],
                                 [9.0, 9.0, 9.0, 9.0]])
    # nil_significance 1: no block is guarded, the paper's rule
    architecture = architecture_from_significance(significance, units, _config(budget=0.5, nil_significance=1.0),
                                                  blocks)
    # budget floor(0.5 * 15 rows * 4) = 30 floats, pairs taken by |alpha| (a block costs its rows):
    # x 9.0 x4 (1 each), item#0 4.0, 3.0, user#0 3.0, 3.0, user#1 2.5, item#0 2.0, 1.0 -> 22; item#1 0.5, 0.4 -> 28;
    # item#1 0.3 (3) does not fit, user#2 0.2 (1) -> 29, then only user#2's first 0.1 (1) fits -> 30
    assert architecture.block_dims == {"item": [4, 2, 0], "user": [2, 1, 2]} and architecture.dims == {"x": 4}
    assert architecture.block_order["item"] == [[0, 1, 2, 3], [0, 1], []]
    assert architecture.block_order["user"] == [[0, 1], [0], [0, 1]]
    assert architecture.kept_parameters(units) == 3 * 4 + 3 * 2 + 2 * 2 + 2 * 1 + 1 * 2 + 4 == 30
    # the default guard first gives every block its best dimension, by decreasing best significance: x (1),
    # item#0 (3), user#0 (2), user#1 (2), item#1 (3), item#2 (3), user#2 (1) -> 15; then the fill: x 9.0 x3 -> 18,
    # item#0 3.0 -> 21, user#0 3.0 -> 23, item#0 2.0, 1.0 -> 29, item#1 0.4 (3) no longer fits, user#2 0.1 -> 30
    guarded = architecture_from_significance(significance, units, _config(budget=0.5), blocks)
    assert guarded.block_dims == {"item": [4, 1, 1], "user": [2, 1, 2]} and guarded.dims == {"x": 4}
    assert guarded.kept_parameters(units) == 30


def test_threshold_and_budget_are_alternatives() -> None:
    base = {"name": "v", "dataset": {"synthetic": {"rows": 100}}, "model": {"block": "deepfm"}}
    default = validate_recipe({**base, "embedding": {"kind": "dnis"}}).embedding
    assert default.budget is None and default.threshold is None  # neither: the budget is chosen on validation
    assert default.tolerance == pytest.approx(0.001)
    assert validate_recipe({**base, "embedding": {"kind": "dnis", "threshold": 0.2}}).embedding.budget is None
    with pytest.raises(RecipeError, match="embedding.threshold and embedding.budget"):
        validate_recipe({**base, "embedding": {"kind": "dnis", "threshold": 0.2, "budget": 0.3}})
    with pytest.raises(RecipeError, match="embedding.budget"):
        validate_recipe({**base, "embedding": {"kind": "dnis", "budget": 1.5}})


# ------------------------------------------------------------------------------------------------ runs
SEARCH = {"kind": "dnis", "search_epochs": 2, "arch_lr": 1e-2, "budget": 0.4}


@pytest.fixture(scope="module")
def dnis_run(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("dnis")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CTRLAB_CACHE_DIR", str(root / "cache"))
        recipe = validate_recipe(synthetic_recipe(root / "full", SEARCH))
        yield root, recipe, train_recipe(recipe, console=QUIET)


def test_dnis_run_learns_within_its_budget_and_writes_its_outputs(dnis_run) -> None:
    _, recipe, result = dnis_run
    metrics = json.loads((result.output_dir / "metrics.json").read_text())
    search = metrics["embedding_search"]
    assert metrics["test"]["auc"] > 0.65
    assert metrics["embedding_parameters"] == search["kept_parameters"] <= 0.4 * search["full_parameters"]
    assert search["kept_parameters"] > 0.35 * search["full_parameters"]  # the budget is used, not wasted
    assert search["search"]["architecture_steps"] == 2 * 16  # one alpha step per training step
    out = result.output_dir / "embedding_search"
    assert sorted(p.name for p in out.iterdir()) == ["dims.json", "search_model.safetensors", "significance.csv"]
    with (out / "significance.csv").open() as f:
        rows = list(csv.DictReader(f))
    dims = json.loads((out / "dims.json").read_text())["dims"]
    assert len(rows) == len(dims) * 8
    assert {u: sum(int(r["kept"]) for r in rows if r["unit"] == u) for u in dims} == dims
    assert embedding_floats(result.output_dir / "model.safetensors") == metrics["embedding_parameters"]
    reload_matches_saved_predictions(result.output_dir, recipe)


def test_retrain_from_an_earlier_search_reprunes_and_reproduces(dnis_run) -> None:
    root, recipe, result = dnis_run
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CTRLAB_CACHE_DIR", str(root / "cache"))
        same = train_recipe(validate_recipe(synthetic_recipe(
            root / "same", {**SEARCH, "stages": ["retrain"], "from_run": str(result.output_dir)})), console=QUIET)
        smaller = train_recipe(validate_recipe(synthetic_recipe(
            root / "smaller", {**SEARCH, "stages": ["retrain"], "from_run": str(result.output_dir), "budget": 0.1})),
            console=QUIET)
    saved = pl.read_parquet(result.output_dir / "test_predictions.parquet")["probability"].to_numpy()
    again = pl.read_parquet(same.output_dir / "test_predictions.parquet")["probability"].to_numpy()
    assert np.array_equal(saved, again)
    assert smaller.metrics["embedding_parameters"] <= 0.1 * result.metrics["embedding_search"]["full_parameters"]
    assert smaller.metrics["test"]["auc"] > 0.6


def test_default_rule_chooses_the_budget_on_validation_when_re_pruning_an_earlier_search(dnis_run) -> None:
    root, _, result = dnis_run
    default = {k: v for k, v in SEARCH.items() if k != "budget"}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CTRLAB_CACHE_DIR", str(root / "cache"))
        chosen = train_recipe(validate_recipe(synthetic_recipe(
            root / "chosen", {**default, "stages": ["retrain"], "from_run": str(result.output_dir)})),
            console=QUIET)
    search = chosen.metrics["embedding_search"]
    pruning = search["pruning"]
    tried = {float(b): a for b, a in pruning["budget_valid_auc"].items()}
    budget = pruning["budget"]
    assert pruning["rule"].startswith(f"budget {budget:g} (chosen on validation")
    # the smallest budget tried whose pruned searched network is within the tolerance; every smaller one was not
    if budget in tried:
        assert tried[budget] >= pruning["searched_valid_auc"] - 0.001
    else:  # none passed: every dimension is kept
        assert budget == 1.0 and search["kept_parameters"] == search["full_parameters"]
    assert all(a < pruning["searched_valid_auc"] - 0.001 for b, a in tried.items() if b < budget)
    assert search["kept_parameters"] <= budget * search["full_parameters"]
    assert chosen.metrics["embedding_parameters"] == search["kept_parameters"]


def test_an_interrupted_resumable_search_run_resumes_its_final_training_to_the_same_model(dnis_run) -> None:
    from ctrlab.train.state import state_path

    root, _, result = dnis_run

    class Interrupted(Exception):
        pass

    def interrupt(record) -> None:
        if record.epoch == 2:
            raise Interrupted

    data = synthetic_recipe(root / "resumed", SEARCH, resume=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CTRLAB_CACHE_DIR", str(root / "cache"))
        with pytest.raises(Interrupted):
            train_recipe(validate_recipe(data), console=QUIET, callbacks=[interrupt])
        assert state_path(root / "resumed").exists()
        resumed = train_recipe(validate_recipe(data), console=QUIET)  # the search runs again, training resumes
    saved = pl.read_parquet(result.output_dir / "test_predictions.parquet")["probability"].to_numpy()
    again = pl.read_parquet(resumed.output_dir / "test_predictions.parquet")["probability"].to_numpy()
    assert np.array_equal(saved, again)
    assert resumed.metrics["embedding_parameters"] == result.metrics["embedding_parameters"]


def test_a_run_with_frequency_blocks_stores_rows_at_their_blocks_widths(tmp_path: Path, cache_dir: Path) -> None:
    search = {**SEARCH, "blocks": 3}
    recipe = validate_recipe(synthetic_recipe(tmp_path / "blocks", search))
    result = train_recipe(recipe, console=QUIET)
    metrics = json.loads((result.output_dir / "metrics.json").read_text())
    found = metrics["embedding_search"]
    assert metrics["test"]["auc"] > 0.65
    assert metrics["embedding_parameters"] == found["kept_parameters"] <= 0.4 * found["full_parameters"]
    out = result.output_dir / "embedding_search"
    assert sorted(p.name for p in out.iterdir()) == ["dims.json", "row_blocks.safetensors",
                                                     "search_model.safetensors", "significance.csv"]
    saved = json.loads((out / "dims.json").read_text())
    # every table of 3+ values is cut into 3 blocks, each with its own kept dims; numeric fields stay one block
    # tables of at least 2 x block_min_rows (100) rows are cut: C4 (200 values) in 2, C5 and C6 in 3; the 5- to
    # 50-value fields and the bucketised I2 stay one block each, as do numeric fields
    assert {name: len(dims) for name, dims in saved["block_dims"].items()} == {"C4": 2, "C5": 3, "C6": 3}
    with (out / "significance.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["unit"] for r in rows} >= {"C6#0", "C6#1", "C6#2", "C1", "I1"}
    kept = {u: sum(int(r["kept"]) for r in rows if r["unit"] == u) for u in {r["unit"] for r in rows}}
    assert [kept[f"C6#{b}"] for b in range(3)] == saved["block_dims"]["C6"]
    assert embedding_floats(result.output_dir / "model.safetensors") == metrics["embedding_parameters"]
    reload_matches_saved_predictions(result.output_dir, recipe)
    # a retrain from this search recomputes the same blocks from the training data and reproduces the run
    again = train_recipe(validate_recipe(synthetic_recipe(
        tmp_path / "again", {**search, "stages": ["retrain"], "from_run": str(result.output_dir)})), console=QUIET)
    first = pl.read_parquet(result.output_dir / "test_predictions.parquet")["probability"].to_numpy()
    second = pl.read_parquet(again.output_dir / "test_predictions.parquet")["probability"].to_numpy()
    assert np.array_equal(first, second)
