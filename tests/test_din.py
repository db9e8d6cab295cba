"""DIN: Dice, the local activation unit, the DIN and history-pooling blocks (one history or several aligned ones),
the mini-batch aware L2 and its wiring into training, the MovieLens behaviour histories, and a tiny synthetic run."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from rich.console import Console

from ctrlab.blocks import BLOCKS
from ctrlab.blocks.base import BlockInput
from ctrlab.config.train import OptimizerConfig, TrainConfig
from ctrlab.data.batches import FeatureBatch
from ctrlab.data.layout import FeatureLayout, FieldSpec
from ctrlab.embeddings import EMBEDDINGS
from ctrlab.layers.din import AttentionPooling, Dice, LocalActivationUnit
from ctrlab.layers.regularizers import mini_batch_aware_l2
from ctrlab.models import build_model
from ctrlab.train.optim import build_optimizers
from ctrlab.train.trainer import Trainer

QUIET = Console(quiet=True)
LAYOUT = FeatureLayout((
    FieldSpec("item", "categorical", 9, "item"),
    FieldSpec("user", "categorical", 5, "user"),
    FieldSpec("x", "numeric"),
    FieldSpec("hist", "sequence", 9, "item", 4, "sum"),
))
HIST = 3  # the history's slot in LAYOUT


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _batch(n: int = 8, extra_padding: int = 0) -> FeatureBatch:
    g = torch.Generator().manual_seed(1)
    hist = torch.randint(2, 9, (n, 4), generator=g)
    hist[0] = 0  # empty history
    hist[1, 1:] = 0
    hist[2, 3:] = 0
    if extra_padding:
        hist = torch.cat([hist, torch.zeros(n, extra_padding, dtype=hist.dtype)], dim=1)
    return FeatureBatch(
        categorical=torch.stack([torch.randint(1, 9, (n,), generator=g), torch.randint(1, 5, (n,), generator=g)], 1),
        numeric=torch.randn(n, 1, generator=g),
        sequences={"hist": hist},
        label=torch.tensor([0.0, 1.0] * (n // 2)),
    )


def _model(block: str = "din", dim: int = 4, seed: int = 0, **kw: object):
    torch.manual_seed(seed)
    config = BLOCKS.get(block).config(candidate="item", history="hist", mlp={"hidden": [8]}, **kw)
    model = build_model(EMBEDDINGS.get("per_field").config(dim=dim, init_std=0.5), config, LAYOUT)
    return model


# ------------------------------------------------------------------------------------------------ Dice


def test_dice_matches_hand_computed_values_in_train_and_eval() -> None:
    dice = Dice(1, eps=0.0, momentum=0.1)
    with torch.no_grad():
        dice.alpha.fill_(0.25)
    x = torch.tensor([[1.0], [3.0]])  # batch mean 2, biased variance 1 -> p = sigmoid(-1), sigmoid(1)
    out = dice.train()(x)
    s = _sigmoid(1.0)
    expected = [(1 - s) * 1 + s * 0.25 * 1, s * 3 + (1 - s) * 0.25 * 3]  # 0.451706, 2.394882
    torch.testing.assert_close(out.squeeze(1), torch.tensor(expected))
    assert expected[0] == pytest.approx(0.451706, abs=1e-6) and expected[1] == pytest.approx(2.394882, abs=1e-6)
    # running stats: mean 0.9*0 + 0.1*2 = 0.2; variance 0.9*1 + 0.1*2 (unbiased variance of 1, 3) = 1.1
    torch.testing.assert_close(dice.running_mean, torch.tensor([0.2]))
    torch.testing.assert_close(dice.running_var, torch.tensor([1.1]))
    # eval uses the running statistics: set mean 1, variance 4 -> p(3) = sigmoid(1), p(-1) = sigmoid(-1)
    dice.running_mean.fill_(1.0)
    dice.running_var.fill_(4.0)
    out = dice.eval()(torch.tensor([[3.0], [-1.0]]))
    torch.testing.assert_close(out.squeeze(1), torch.tensor([s * 3 + (1 - s) * 0.25 * 3,
                                                              (1 - s) * -1 + s * 0.25 * -1]))
    # eval output of one row does not depend on the rest of the batch
    torch.testing.assert_close(dice(torch.tensor([[3.0]])), out[:1])


def test_dice_alpha_is_per_unit_and_learnable() -> None:
    dice = Dice(3)
    assert dice.alpha.shape == (3,) and dice.alpha.requires_grad
    dice(torch.randn(5, 3)).sum().backward()
    assert dice.alpha.grad is not None and dice.alpha.grad.shape == (3,)


# ------------------------------------------------------------------------------------------------ attention


def test_attention_weights_are_not_normalised_and_padding_gets_zero() -> None:
    torch.manual_seed(0)
    pool = AttentionPooling(3, [6, 4], "prelu")
    behaviours = torch.randn(4, 5, 3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    behaviours = behaviours * mask.unsqueeze(-1)
    candidate = torch.randn(4, 3)
    pooled, weights = pool.eval()(behaviours, candidate, mask, return_weights=True)
    assert torch.all(weights[~mask] == 0)
    sums = weights.sum(dim=1)
    assert not torch.allclose(sums[[0, 1, 3]], torch.ones(3), atol=1e-3)  # no softmax: sums are free
    torch.testing.assert_close(pooled, (weights.unsqueeze(-1) * behaviours).sum(1))
    assert torch.all(pooled[2] == 0)  # empty history -> zero vector
    # the unit's input is [e_j, e_c, e_j - e_c, e_j * e_c]
    unit = pool.unit
    assert isinstance(unit, LocalActivationUnit) and unit.net[0].in_features == 4 * 3


def test_mean_reduce_divides_the_weighted_sum_by_the_number_of_real_behaviours() -> None:
    torch.manual_seed(0)
    summed = AttentionPooling(3, [6, 4], "prelu").eval()
    averaged = AttentionPooling(3, [6, 4], "prelu", reduce="mean").eval()
    averaged.load_state_dict(summed.state_dict())
    behaviours = torch.randn(3, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    candidate = torch.randn(3, 3)
    total, weights = summed(behaviours, candidate, mask, return_weights=True)
    mean, same_weights = averaged(behaviours, candidate, mask, return_weights=True)
    torch.testing.assert_close(same_weights, weights)  # the same unnormalised weights
    torch.testing.assert_close(mean[0], total[0] / 3)
    torch.testing.assert_close(mean[1], total[1])
    assert torch.all(mean[2] == 0)  # an empty history stays a zero vector (no division by zero)


def test_output_bias_one_starts_the_attention_from_plain_pooling() -> None:
    torch.manual_seed(0)
    pooling = AttentionPooling(3, [6, 4], "dice", reduce="mean", output_bias=1.0).eval()
    output = pooling.unit.net[-1]
    assert torch.all(output.bias == 1.0)
    assert torch.all(AttentionPooling(3, [6, 4], "dice").unit.net[-1].bias == 0.0)  # the default: 0
    behaviours = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        output.weight.zero_()  # what the unit learns on top of the bias
    pooled, weights = pooling(behaviours, torch.randn(2, 3), mask, return_weights=True)
    torch.testing.assert_close(weights, mask.float())  # weight 1 on every real behaviour, 0 on padding
    torch.testing.assert_close(pooled[0], behaviours[0, :2].mean(dim=0))  # = the mean-pooling baseline
    torch.testing.assert_close(pooled[1], behaviours[1].mean(dim=0))
    din = _model("din", attention_output_bias=1.0)  # the block passes the recipe key to its activation unit
    assert torch.all(din.block.attention.unit.net[-1].bias == 1.0)
    xavier = _model("din", attention_output_bias=1.0, dense_init="xavier_normal")  # zeroes other biases, not it
    assert torch.all(xavier.block.attention.unit.net[-1].bias == 1.0)
    assert torch.all(xavier.block.attention.unit.net[0].bias == 0.0)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", ["dice", "prelu"])
def test_padding_never_changes_a_din_score(training: bool, activation: str) -> None:
    model = _model("din", attention_activation=activation, mlp_activation="dice" if activation == "dice" else None)
    model.train(training)
    batch = _batch()
    reference = model(batch)
    # more padding columns at the end of every history
    padded = _batch(extra_padding=3)
    torch.testing.assert_close(model(padded), reference, rtol=0, atol=0)
    # garbage in the vectors of padded positions (the padding row of the shared table) changes nothing
    with torch.no_grad():
        model.embedding.weight[model.embedding.table_offsets["item"]] = 123.0
    torch.testing.assert_close(model(padded), reference, rtol=0, atol=0)
    # and the attention unit itself ignores whatever sits at masked positions
    pool = model.block.attention
    pool.train(training)
    vectors, mask = model.embedding(padded).sequences["hist"]
    candidate = model.embedding(padded).fields[:, 0]
    a = pool(vectors, candidate, mask)
    b = pool(vectors + 50.0 * (~mask).unsqueeze(-1), candidate, mask)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_din_and_baseline_shapes_and_the_only_difference_is_the_pooling() -> None:
    batch = _batch()
    din, base = _model("din"), _model("history_pooling")
    assert din(batch).shape == (8,) and base(batch).shape == (8,)
    din.eval()
    base.eval()
    embedded = base.embedding(batch)
    torch.testing.assert_close(base.block.mlp_input(embedded), embedded.fields.flatten(1))  # baseline: own pooling
    embedded = din.embedding(batch)
    x = din.block.mlp_input(embedded).view(8, 4, 4)
    torch.testing.assert_close(x[:, [0, 1, 2]], embedded.fields[:, [0, 1, 2]])
    vectors, mask = embedded.sequences["hist"]
    torch.testing.assert_close(x[:, HIST], din.block.attention(vectors, embedded.fields[:, 0], mask))
    assert not torch.allclose(x[:, HIST], embedded.fields[:, HIST])
    # both train end to end: every parameter gets a gradient
    din.train()
    torch.nn.functional.binary_cross_entropy_with_logits(din(batch), batch.label).backward()
    assert all(p.grad is not None for p in din.parameters())
    assert sum(p.numel() for p in din.parameters()) > sum(p.numel() for p in base.parameters())


def test_baseline_pools_the_history_by_mean_or_sum_over_real_items_only() -> None:
    batch = _batch()
    vectors = {}
    for pooling in ("mean", "sum"):
        model = _model("history_pooling", pooling=pooling).eval()
        embedded = model.embedding(batch)
        table = model.embedding.weight.detach()
        hist = batch.sequences["hist"]
        rows = table[hist + model.embedding.sequence_offsets["hist"]] * (hist > 0).unsqueeze(-1)
        expected = rows.sum(1)
        if pooling == "mean":
            expected = expected / (hist > 0).sum(1, keepdim=True).clamp(min=1)
        got = model.block.mlp_input(embedded).view(8, 4, 4)[:, HIST]
        torch.testing.assert_close(got, expected)
        assert torch.equal(got[0], torch.zeros(4))  # an empty history pools to zero
        vectors[pooling] = got
    # row 1 has one real item: mean == sum; row 3 has four: mean == sum / 4
    torch.testing.assert_close(vectors["mean"][1], vectors["sum"][1])
    torch.testing.assert_close(vectors["mean"][3] * 4, vectors["sum"][3])
    # padding appended to every history changes nothing
    model = _model("history_pooling", pooling="mean").eval()
    torch.testing.assert_close(model(_batch(extra_padding=3)), model(batch))


def test_candidate_and_history_are_checked_by_name() -> None:
    config = BLOCKS.get("din").config
    for kw, word in (({"candidate": "nope", "history": "hist"}, "candidate"),
                     ({"candidate": "item", "history": "x"}, "history"),
                     ({"candidate": "user", "history": "hist"}, "share the vocabulary")):
        with pytest.raises(ValueError, match=word):
            BLOCKS.build(config(**kw), BlockInput(LAYOUT, 4))


# ------------------------------------------------------------------------------------------------ several histories

# Two aligned histories (a behaviour = an item and its category), a third sequence that is not a history, and the
# histories' slots in the opposite order to the candidate list: `history: [hist, hist_cate]` puts chunk 0 in slot
# 5 and chunk 1 in slot 4.
LAYOUT2 = FeatureLayout((
    FieldSpec("item", "categorical", 9, "item"),
    FieldSpec("user", "categorical", 5, "user"),
    FieldSpec("cate", "categorical", 4, "cate"),
    FieldSpec("x", "numeric"),
    FieldSpec("hist_cate", "sequence", 4, "cate", 4, "mean"),
    FieldSpec("hist", "sequence", 9, "item", 4, "sum"),
    FieldSpec("short", "sequence", 4, "cate", 3, "sum"),
))
SLOT = {"item": 0, "cate": 2, "hist_cate": 4, "hist": 5, "short": 6}
CATE_OF = torch.tensor([0, 1, 2, 3, 2, 3, 2, 3, 2])  # item id -> category id (padding 0 -> 0, OOV 1 -> 1)
PAIRS = {"candidate": ["item", "cate"], "history": ["hist", "hist_cate"]}


def _batch2(n: int = 8, extra_padding: int = 0) -> FeatureBatch:
    base = _batch(n, extra_padding)
    hist = base.sequences["hist"]
    g = torch.Generator().manual_seed(2)
    short = torch.randint(1, 4, (n, 3), generator=g)
    short[0] = 0
    short[1, 2:] = 0
    if extra_padding:
        short = torch.cat([short, torch.zeros(n, extra_padding, dtype=short.dtype)], dim=1)
    item = base.categorical[:, :1]
    return FeatureBatch(
        categorical=torch.cat([base.categorical, CATE_OF[item]], dim=1),
        numeric=base.numeric,
        sequences={"hist_cate": CATE_OF[hist], "hist": hist, "short": short},
        label=base.label,
    )


def _model2(block: str = "din", dim: int = 4, seed: int = 0, **kw: object):
    torch.manual_seed(seed)
    config = BLOCKS.get(block).config(**{**PAIRS, "mlp": {"hidden": [8]}, **kw})
    return build_model(EMBEDDINGS.get("per_field").config(dim=dim, init_std=0.5), config, LAYOUT2)


def test_two_histories_shapes_and_the_attention_unit_sees_the_concatenated_behaviours() -> None:
    batch = _batch2()
    din, base = _model2("din"), _model2("history_pooling")
    assert din(batch).shape == (8,) and base(batch).shape == (8,)
    d, k = 4, 2
    unit = din.block.attention.unit
    assert unit.net[0].in_features == 4 * k * d  # [e_j, e_c, e_j - e_c, e_j * e_c], each k·D wide
    assert din.block.mlp[0].in_features == base.block.mlp[0].in_features == LAYOUT2.num_fields * d  # unchanged
    din.eval()
    embedded = din.embedding(batch)
    seen = []
    handle = unit.net[0].register_forward_hook(lambda module, args, out: seen.append(args[0]))
    din.block.mlp_input(embedded)
    handle.remove()
    (rows,) = seen
    items, mask = embedded.sequences["hist"]
    cates, cate_mask = embedded.sequences["hist_cate"]
    assert torch.equal(mask, cate_mask)  # aligned histories, padded alike
    keys = torch.cat([items, cates], dim=-1)[mask]  # real behaviours only, row-major
    query = torch.cat([embedded.fields[:, 0], embedded.fields[:, 2]], dim=-1)
    query = query.unsqueeze(1).expand(-1, mask.shape[1], -1)[mask]
    assert rows.shape == (int(mask.sum()), 4 * k * d)
    torch.testing.assert_close(rows, torch.cat([keys, query, keys - query, keys * query], dim=-1))


def test_two_histories_mlp_input_holds_each_history_chunk_in_its_own_slot() -> None:
    batch = _batch2()
    din = _model2("din", attention_reduce="mean").eval()
    embedded = din.embedding(batch)
    d = 4
    x = din.block.mlp_input(embedded).view(8, LAYOUT2.num_fields, d)
    others = [i for i in range(LAYOUT2.num_fields) if i not in (SLOT["hist"], SLOT["hist_cate"])]
    torch.testing.assert_close(x[:, others], embedded.fields[:, others])  # every other field as it is
    items, mask = embedded.sequences["hist"]
    cates, _ = embedded.sequences["hist_cate"]
    candidate = torch.cat([embedded.fields[:, SLOT["item"]], embedded.fields[:, SLOT["cate"]]], dim=-1)
    pooled = din.block.attention(torch.cat([items, cates], dim=-1), candidate, mask)
    assert pooled.shape == (8, 2 * d)
    torch.testing.assert_close(x[:, SLOT["hist"]], pooled[:, :d])  # chunk 0: history[0] = hist
    torch.testing.assert_close(x[:, SLOT["hist_cate"]], pooled[:, d:])  # chunk 1: history[1] = hist_cate
    # one attention weight per behaviour scales both of its features
    _, weights = din.block.attention(torch.cat([items, cates], dim=-1), candidate, mask, return_weights=True)
    count = mask.sum(1, keepdim=True).clamp(min=1)
    torch.testing.assert_close(pooled[:, :d], (weights.unsqueeze(-1) * items).sum(1) / count)
    torch.testing.assert_close(pooled[:, d:], (weights.unsqueeze(-1) * cates).sum(1) / count)
    assert torch.all(x[0, [SLOT["hist"], SLOT["hist_cate"]]] == 0)  # an empty history: zero vectors
    # end to end: every parameter gets a gradient
    din.train()
    torch.nn.functional.binary_cross_entropy_with_logits(din(batch), batch.label).backward()
    assert all(p.grad is not None for p in din.parameters())


@pytest.mark.parametrize("training", [True, False])
def test_padding_never_changes_a_din_score_with_two_histories(training: bool) -> None:
    model = _model2("din", mlp_activation="dice")
    model.train(training)
    reference = model(_batch2())
    padded = _batch2(extra_padding=3)
    torch.testing.assert_close(model(padded), reference, rtol=0, atol=0)
    with torch.no_grad():  # garbage in both tables' padding rows
        for table in ("item", "cate"):
            model.embedding.weight[model.embedding.table_offsets[table]] = 123.0
    torch.testing.assert_close(model(padded), reference, rtol=0, atol=0)
    # the mask is the first history's: whatever the second holds where the first is padding is ignored
    noisy = _batch2(extra_padding=3)
    hist_cate = noisy.sequences["hist_cate"]
    hist_cate[noisy.sequences["hist"] == 0] = 3
    torch.testing.assert_close(model(noisy), reference, rtol=0, atol=0)


def test_one_name_and_a_list_of_one_build_the_same_model() -> None:
    batch = _batch()
    torch.manual_seed(0)
    listed = build_model(EMBEDDINGS.get("per_field").config(dim=4, init_std=0.5),
                         BLOCKS.get("din").config(candidate=["item"], history=["hist"], mlp={"hidden": [8]}), LAYOUT)
    single = _model("din")
    assert listed.state_dict().keys() == single.state_dict().keys()
    listed.load_state_dict(single.state_dict())
    torch.testing.assert_close(listed.eval()(batch), single.eval()(batch), rtol=0, atol=0)


@pytest.mark.parametrize("pooling", [None, "sum", "mean"])
def test_baseline_pools_each_of_two_histories_into_its_own_slot(pooling: str | None) -> None:
    batch = _batch2()
    model = _model2("history_pooling", pooling=pooling).eval()
    embedded = model.embedding(batch)
    x = model.block.mlp_input(embedded).view(8, LAYOUT2.num_fields, 4)
    if pooling is None:  # each history keeps its own feature's pooling (sum for hist, mean for hist_cate)
        torch.testing.assert_close(x, embedded.fields)
        return
    table = model.embedding.weight.detach()
    for name in ("hist", "hist_cate"):
        ids = batch.sequences[name]
        rows = table[ids + model.embedding.sequence_offsets[name]] * (ids > 0).unsqueeze(-1)
        expected = rows.sum(1)
        if pooling == "mean":
            expected = expected / (ids > 0).sum(1, keepdim=True).clamp(min=1)
        torch.testing.assert_close(x[:, SLOT[name]], expected)
    others = [i for i in range(LAYOUT2.num_fields) if i not in (SLOT["hist"], SLOT["hist_cate"])]
    torch.testing.assert_close(x[:, others], embedded.fields[:, others])


@pytest.mark.parametrize("block", ["din", "history_pooling"])
def test_paired_candidates_and_histories_are_validated(block: str) -> None:
    config = BLOCKS.get(block).config
    for kw, message in (
        ({"candidate": ["item", "cate"], "history": ["hist"]},
         r"candidate names 2 field\(s\) \(item, cate\) but history names 1 \(hist\)"),
        ({"candidate": "item", "history": ["hist", "hist_cate"]}, "candidate names 1"),
        ({"candidate": [], "history": []}, "at least one field"),
        ({"candidate": ["item", "cate"], "history": ["hist", "hist"]}, "history names 'hist' more than once"),
    ):
        with pytest.raises(ValueError, match=message):
            config(**kw)
    for kw, message in (
        ({"candidate": ["item", "cate"], "history": ["hist_cate", "hist"]},
         r"history 'hist_cate' must share the vocabulary of its candidate 'item' \(share_vocab_with: item\)"),
        ({"candidate": ["item", "user"], "history": ["hist", "hist_cate"]},
         "history 'hist_cate' must share the vocabulary of its candidate 'user'"),
        ({"candidate": ["item", "cate"], "history": ["hist", "short"]},
         "history 'short' has max_len 3 but 'hist' has 4.*same max_len"),
        ({"candidate": ["item", "x"], "history": ["hist", "hist_cate"]}, "candidate 'x' is not a categorical"),
        ({"candidate": ["item", "cate"], "history": ["hist", "cate"]}, "history 'cate' is not a sequence"),
    ):
        with pytest.raises(ValueError, match=message):
            BLOCKS.build(config(**kw), BlockInput(LAYOUT2, 4))


# ------------------------------------------------------------------------------------------------ MBA L2


def test_mini_batch_aware_l2_matches_hand_computed_value() -> None:
    weight = torch.tensor([[0.0, 0.0], [1.0, 2.0], [3.0, 0.0], [1.0, 1.0]], requires_grad=True)
    counts = torch.tensor([0, 5, 2, 4])
    ids = torch.tensor([1, 2, 2, 1, 2])  # rows 1 and 2 in the batch (each once, whatever the repeats); 3 is not
    value = mini_batch_aware_l2(weight, ids, counts, coefficient=0.1)
    # 0.1 * 0.5 * (|w1|^2 / 5 + |w2|^2 / 2) = 0.05 * (5/5 + 9/2) = 0.275
    assert value.item() == pytest.approx(0.275)
    value.backward()
    # gradient = coefficient * w_j / n_j on rows in the batch (DIN eq. 7), 0 elsewhere
    torch.testing.assert_close(weight.grad, torch.tensor([[0, 0], [0.02, 0.04], [0.15, 0], [0, 0]]))
    assert mini_batch_aware_l2(weight, torch.tensor([], dtype=torch.long), counts, 0.1).item() == 0.0


def test_row_ids_are_the_rows_the_embedding_looks_up() -> None:
    emb = EMBEDDINGS.build(EMBEDDINGS.get("per_field").config(dim=2), LAYOUT)
    batch = _batch()
    rows = emb.row_ids(batch)
    item, user = emb.table_offsets["item"], emb.table_offsets["user"]
    hist = batch.sequences["hist"]
    expected = torch.cat([(batch.categorical + torch.tensor([item, user])).reshape(-1), hist[hist > 0] + item])
    assert sorted(rows.tolist()) == sorted(expected.tolist())
    assert emb.lazy_l2(batch).item() == pytest.approx(0.5 * emb.weight[torch.unique(rows)].pow(2).sum().item())


@pytest.mark.parametrize("sparse", [False, True])
def test_mini_batch_aware_regulariser_is_wired_into_training(sparse: bool) -> None:
    torch.manual_seed(0)
    config = BLOCKS.get("din").config(candidate="item", history="hist", mlp={"hidden": [8]}, linear=True)
    model = build_model(EMBEDDINGS.get("per_field").config(dim=4, sparse=sparse), config, LAYOUT)
    optimizer = OptimizerConfig(embedding_weight_decay=0.5, embedding_regularizer="mini_batch_aware")
    opts = build_optimizers(model, optimizer)
    assert opts.mini_batch_aware_decay == 0.5 and opts.lazy_embedding_decay == 0.0
    for opt in opts.optimizers:  # the tables get no weight decay besides the MBA term
        for group in opt.param_groups:
            if any(p is model.embedding.weight or p is model.linear.weight for p in group["params"]):
                assert group.get("weight_decay", 0.0) == 0.0
    trainer = Trainer(model, TrainConfig(optimizer=optimizer, progress=False, device="cpu", batch_size=4),
                      torch.device("cpu"))
    train = _batch()
    trainer._count_rows(train)
    counts = trainer._row_counts
    assert counts is not None and len(counts) == 2
    ids = model.embedding.row_ids(train).numpy()
    assert counts[0].tolist() == np.bincount(ids, minlength=model.embedding.weight.shape[0]).tolist()
    model.eval()
    batch = _batch(4)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch.label)
    penalty = sum(mini_batch_aware_l2(m.weight, m.row_ids(batch), c, 0.5) for m, c in
                  zip(model.embedding_modules(), counts))
    torch.testing.assert_close(trainer._loss(batch), bce + penalty)
    trainer.train_epoch(train)  # runs with sparse and dense tables alike
    # weight decay stays the default regulariser: no MBA term
    default = build_optimizers(model, OptimizerConfig(embedding_weight_decay=0.5))
    assert default.mini_batch_aware_decay == 0.0


# ------------------------------------------------------------------------------------------------ synthetic run


def test_din_trains_end_to_end_on_synthetic_histories(tmp_path: Path, cache_dir: Path) -> None:
    from ctrlab.config.loader import validate_recipe
    from ctrlab.train.run import train_recipe

    aucs = {}
    for block in ("din", "history_pooling"):
        recipe = validate_recipe({
            "name": block, "seed": 5, "output_dir": str(tmp_path / block),
            "dataset": {"synthetic": {"rows": 30000, "sequence": True, "categorical_fields": 2, "numeric_fields": 0,
                                      "informative_fields": 1, "interaction_pairs": 0, "numeric_informative": 0,
                                      "cardinalities": [10, 50], "num_items": 300, "item_clusters": 6,
                                      "sequence_scale": 1.5, "max_history": 10}},
            "embedding": {"dim": 8},
            "model": {"block": block, "candidate": "item", "history": "hist", "mlp": {"hidden": [32]},
                      **({"attention_hidden": [16]} if block == "din" else {})},
            "train": {"epochs": 4, "batch_size": 256, "progress": False, "device": "cpu", "num_threads": 1,
                      "optimizer": {"lr": 5e-3, "embedding_weight_decay": 1e-3,
                                    "embedding_regularizer": "mini_batch_aware"}},
        })
        result = train_recipe(recipe, console=QUIET)
        aucs[block] = result.metrics["test"]["auc"]
    print(f"\nsynthetic test AUC: DIN {aucs['din']:.4f}  history pooling {aucs['history_pooling']:.4f}")
    assert aucs["din"] > 0.62  # learns the history affinity (the Bayes-optimal AUC of this data is about 0.85)


# ------------------------------------------------------------------------------------------------ real histories


@pytest.mark.parametrize("name", ["ml100k_seq", "ml1m_seq"])
def test_movielens_histories_hold_only_earlier_positives(name: str, shared_data_dir: Path) -> None:
    from ctrlab.datasets.cards import load_card

    card = load_card(name)
    frame = card.load(shared_data_dir, verify=False)["all"]
    assert frame.height == {"ml100k_seq": 100_000, "ml1m_seq": 487_650}[name]
    assert frame.columns[-1] == "hist_movies" and frame["hist_movies"].null_count() == 0
    rng = np.random.default_rng(0)
    users = rng.choice(frame["user_id"].unique().sort().to_numpy(), size=40, replace=False).tolist()
    sample = frame.filter(pl.col("user_id").is_in(users)).with_columns(
        pl.col("timestamp").cast(pl.Int64).alias("ts"), pl.int_range(pl.len()).alias("row"))
    ratings = sample.select("user_id", "movie_id", pl.col("ts").alias("hist_ts"), pl.col("label").alias("hist_label"))
    assert ratings.select("user_id", "movie_id").is_duplicated().sum() == 0  # (user, movie) identifies a rating
    items = (sample.select("row", "user_id", "ts", pl.col("hist_movies").str.split("|").alias("movie_id"))
             .explode("movie_id").filter(pl.col("movie_id") != "")
             .with_columns(pl.int_range(pl.len()).over("row").alias("pos")))
    joined = items.join(ratings, on=["user_id", "movie_id"], how="left")
    assert joined["hist_ts"].null_count() == 0  # every history item is one of the user's own ratings
    assert (joined["hist_ts"] < joined["ts"]).all()  # strictly before: nothing at or after the row's time
    assert (joined["hist_label"] == "1").all()  # only positives
    # most recent last, and complete: min(50, number of earlier positives) items
    ordered = joined.sort("row", "pos").group_by("row", maintain_order=True).agg(
        (pl.col("hist_ts").diff().drop_nulls() >= 0).all().alias("ordered"), pl.len().alias("n"))
    assert ordered["ordered"].all()
    earlier = (sample.join(ratings.filter(pl.col("hist_label") == "1"), on="user_id")
               .filter(pl.col("hist_ts") < pl.col("ts")).group_by("row").agg(pl.len().alias("earlier")))
    counts = (sample.select("row").join(earlier, on="row", how="left").join(ordered, on="row", how="left")
              .fill_null(0))
    assert (counts["n"] == counts["earlier"].clip(upper_bound=50)).all()
    assert counts["n"].max() == 50


@pytest.mark.parametrize("name", ["ml100k_seq", "ml1m_seq"])
def test_movielens_genre_histories_are_aligned_with_the_movie_histories(name: str, shared_data_dir: Path) -> None:
    from ctrlab.data.processor import FeatureProcessor
    from ctrlab.datasets.cards import load_card

    card = load_card(name)
    features = {f.name: f for f in card.features.sequence}
    assert "genre" in [f.name for f in card.features.categorical]
    assert features["hist_genres"].share_vocab_with == "genre"
    assert features["hist_genres"].max_len == features["hist_movies"].max_len == 50
    assert features["hist_genres"].pooling == features["hist_movies"].pooling
    frame = card.load(shared_data_dir, verify=False)["all"]
    first = pl.col("genres").str.split("|").list.first()
    assert (frame["genre"] == frame.select(first)["genres"]).all()  # the first listed genre
    # hist_genres, rebuilt from hist_movies with each movie's first genre, on every row
    movies = frame.select("movie_id", first.alias("first")).unique()
    assert movies["movie_id"].is_duplicated().sum() == 0
    genre_of = dict(zip(movies["movie_id"].to_list(), movies["first"].to_list())) | {"": ""}
    rebuilt = frame.select(pl.col("hist_movies").str.split("|")
                           .list.eval(pl.element().replace_strict(genre_of)).list.join("|"))["hist_movies"]
    assert (rebuilt == frame["hist_genres"]).all()
    assert (frame["hist_genres"] != "").sum() == (frame["hist_movies"] != "").sum() > 0
    # encoded, both histories are padded alike: the first history's mask is the second's
    processor = FeatureProcessor(card.features, card.label, card.group_by).fit(frame)
    encoded = processor.transform(frame)
    assert np.array_equal(encoded.sequences["hist_movies"] > 0, encoded.sequences["hist_genres"] > 0)
