"""Embedding layer and blocks: shapes, numeric/sequence inputs, the linear term, sparse gradients."""

from __future__ import annotations

import pytest
import torch

from ctrlab.blocks import BLOCKS
from ctrlab.config.train import OptimizerConfig
from ctrlab.data.batches import FeatureBatch
from ctrlab.data.layout import FeatureLayout, FieldSpec
from ctrlab.embeddings import EMBEDDINGS
from ctrlab.models import build_model
from ctrlab.train.optim import build_optimizers

LAYOUT = FeatureLayout((
    FieldSpec("a", "categorical", 7, "a"),
    FieldSpec("b", "categorical", 5, "b"),
    FieldSpec("x", "numeric"),
    FieldSpec("hist", "sequence", 7, "a", 4),
))


def _batch(n: int = 6) -> FeatureBatch:
    g = torch.Generator().manual_seed(0)
    hist = torch.randint(2, 7, (n, 4), generator=g)
    hist[0] = 0  # empty history
    hist[1, 2:] = 0
    return FeatureBatch(
        categorical=torch.stack([torch.randint(1, 7, (n,), generator=g), torch.randint(1, 5, (n,), generator=g)], 1),
        numeric=torch.randn(n, 1, generator=g),
        sequences={"hist": hist},
        label=torch.randint(0, 2, (n,), generator=g).float(),
    )


def _embedding(dim: int = 3, **kw: object):
    config = EMBEDDINGS.get("per_field").config(dim=dim, **kw)
    return EMBEDDINGS.build(config, LAYOUT)


def test_per_field_embedding_shapes_and_numeric_scaling() -> None:
    emb = _embedding()
    batch = _batch()
    out = emb(batch)
    assert out.fields.shape == (6, 4, 3)
    torch.testing.assert_close(out.fields[:, 2], batch.numeric[:, :1] * emb.numeric_weight[0])
    vectors, mask = out.sequences["hist"]
    assert vectors.shape == (6, 4, 3) and mask[1].tolist() == [True, True, False, False]


def test_sequence_pooling_ignores_padding_and_shares_the_table() -> None:
    emb = _embedding()
    batch = _batch()
    out = emb(batch)
    assert torch.all(out.fields[0, 3] == 0)  # empty history pools to zero
    offset = emb.table_offsets["a"]
    expected = emb.weight[batch.sequences["hist"][1, :2] + offset].mean(0)
    torch.testing.assert_close(out.fields[1, 3], expected)
    # The history indexes field a's table: the same id gives the same vector.
    same = emb.weight[batch.categorical[2, 0] + offset]
    torch.testing.assert_close(emb(batch).fields[2, 0], same)


@pytest.mark.parametrize("block", ["lr", "fm", "mlp", "deepfm"])
def test_blocks_give_one_logit_per_row_and_train(block: str) -> None:
    config = BLOCKS.get(block).config(**({"mlp": {"hidden": [8]}} if block in ("mlp", "deepfm") else {}))
    embedding = EMBEDDINGS.get("per_field").config(dim=4)
    model = build_model(embedding, config, LAYOUT)
    batch = _batch()
    logits = model(batch)
    assert logits.shape == (6,)
    assert (model.linear is not None) == config.linear
    assert (model.embedding is None) == (block == "lr")
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.label)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_fm_equals_sum_of_pairwise_inner_products() -> None:
    from ctrlab.layers.fm import FMInteraction

    v = torch.randn(2, 4, 3)
    brute = sum((v[:, i] * v[:, j]).sum(-1) for i in range(4) for j in range(i + 1, 4))
    torch.testing.assert_close(FMInteraction()(v), brute)


def test_sparse_tables_get_sparse_gradients_and_their_own_optimiser() -> None:
    embedding = EMBEDDINGS.get("per_field").config(dim=4, sparse=True)
    model = build_model(embedding, BLOCKS.get("deepfm").config(mlp={"hidden": [8]}), LAYOUT)
    opts = build_optimizers(model, OptimizerConfig(embedding_weight_decay=0.1))
    assert len(opts.optimizers) == 2 and isinstance(opts.optimizers[1], torch.optim.SparseAdam)
    assert opts.lazy_embedding_decay == 0.1
    batch = _batch()
    before = model.embedding.weight.detach().clone()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch.label)
    loss = loss + 0.1 * model.embedding.lazy_l2(batch)
    opts.zero_grad()
    loss.backward()
    assert model.embedding.weight.grad.is_sparse
    opts.step()
    touched = torch.unique(torch.cat([(batch.categorical + model.embedding.categorical_offsets).flatten(),
                                      (batch.sequences["hist"] + model.embedding.sequence_offsets["hist"])[
                                          batch.sequences["hist"] > 0]]))
    changed = (model.embedding.weight.detach() != before).any(dim=1).nonzero().flatten()
    assert set(changed.tolist()) == set(touched.tolist())  # untouched rows are not updated


def test_dense_optimiser_groups_have_separate_weight_decay() -> None:
    model = build_model(EMBEDDINGS.get("per_field").config(dim=4), BLOCKS.get("deepfm").config(mlp={"hidden": [8]}),
                        LAYOUT)
    opts = build_optimizers(model, OptimizerConfig(embedding_weight_decay=0.5, dense_weight_decay=0.01))
    (adam,) = opts.optimizers
    decays = {g["weight_decay"]: {id(p) for p in g["params"]} for g in adam.param_groups}
    assert id(model.embedding.weight) in decays[0.5] and id(model.linear.weight) in decays[0.5]
    assert id(model.bias) in decays[0.01]
