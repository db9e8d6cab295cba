"""AutoInt, AutoInt+ and DCN-V2: the layers match their equations computed by hand, the blocks give one logit per
row, and each learns planted pairwise interactions that logistic regression cannot."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from rich.console import Console

from ctrlab.blocks import BLOCKS
from ctrlab.blocks.base import BlockInput
from ctrlab.config.loader import validate_recipe
from ctrlab.data.batches import FeatureBatch
from ctrlab.data.layout import FeatureLayout, FieldSpec
from ctrlab.embeddings import EMBEDDINGS
from ctrlab.embeddings.base import EmbeddingOutput
from ctrlab.layers.attention import InteractingLayer
from ctrlab.layers.cross import CrossNetworkV2
from ctrlab.models import build_model
from ctrlab.train.run import train_recipe

LAYOUT = FeatureLayout((
    FieldSpec("a", "categorical", 7, "a"),
    FieldSpec("b", "categorical", 5, "b"),
    FieldSpec("x", "numeric"),
    FieldSpec("hist", "sequence", 7, "a", 4),
))

SMALL = {
    "autoint": {"layers": 2, "heads": 2, "attention_dim": 6},
    "autoint_plus": {"layers": 2, "heads": 2, "attention_dim": 6, "mlp": {"hidden": [8]}},
    "dcnv2": {"cross_layers": 2, "mlp": {"hidden": [8]}},
}


def _batch(n: int = 6) -> FeatureBatch:
    g = torch.Generator().manual_seed(0)
    return FeatureBatch(
        categorical=torch.stack([torch.randint(1, 7, (n,), generator=g), torch.randint(1, 5, (n,), generator=g)], 1),
        numeric=torch.randn(n, 1, generator=g),
        sequences={"hist": torch.randint(0, 7, (n, 4), generator=g)},
        label=torch.randint(0, 2, (n,), generator=g).float(),
    )


def _block(name: str, dim: int = 4, **overrides: object):
    config = BLOCKS.get(name).config(**{**SMALL.get(name, {}), **overrides})
    return BLOCKS.build(config, BlockInput(LAYOUT, dim))


# ------------------------------------------------------------------------------------------------ blocks
@pytest.mark.parametrize("extra", [{}, {"linear": True}], ids=["plain", "linear"])
@pytest.mark.parametrize("block", sorted(SMALL))
def test_blocks_give_one_logit_per_row_and_train(block: str, extra: dict) -> None:
    torch.manual_seed(0)
    config = BLOCKS.get(block).config(**SMALL[block], **extra)
    model = build_model(EMBEDDINGS.get("per_field").config(dim=4, init_std=0.1), config, LAYOUT)
    batch = _batch()
    logits = model(batch)
    assert logits.shape == (6,) and torch.isfinite(logits).all()
    assert (model.linear is not None) == config.linear
    torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.label).backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("structure", ["stacked", "parallel"])
def test_dcnv2_structures(structure: str) -> None:
    block = _block("dcnv2", structure=structure, mlp={"hidden": [8, 3]})
    width = LAYOUT.num_fields * 4
    # parallel: the output layer sees [x_L ; MLP(x_0)]; stacked: only MLP(x_L).
    assert block.output.in_features == (width + 3 if structure == "parallel" else 3)
    assert block(EmbeddingOutput(torch.randn(5, LAYOUT.num_fields, 4))).shape == (5,)
    # An MLP without hidden layers is allowed: parallel then reads [x_L ; x_0], stacked reads x_L.
    bare = _block("dcnv2", structure=structure, mlp={"hidden": []})
    assert bare(EmbeddingOutput(torch.randn(5, LAYOUT.num_fields, 4))).shape == (5,)


def test_autoint_plus_adds_an_mlp_over_raw_embeddings() -> None:
    plain, plus = _block("autoint"), _block("autoint_plus")
    assert not hasattr(plain, "mlp") and plus.mlp[0].in_features == LAYOUT.num_fields * 4
    assert plain.output.in_features == plus.output.in_features == LAYOUT.num_fields * 6


def test_attention_dim_must_split_into_heads() -> None:
    with pytest.raises(ValidationError, match="divisible by heads"):
        BLOCKS.get("autoint").config(heads=3, attention_dim=40)
    with pytest.raises(ValidationError):
        BLOCKS.get("autoint_plus").config(layers=0)
    recipe_model = {"block": "autoint", "heads": 4, "attention_dim": 128}
    assert BLOCKS.get("autoint").config(**recipe_model).attention_dim == 128


def test_attention_maps_are_kept_only_on_request_and_rows_sum_to_one() -> None:
    torch.manual_seed(0)
    block = _block("autoint", layers=3, heads=2, attention_dim=6).eval()
    fields = EmbeddingOutput(torch.randn(5, LAYOUT.num_fields, 4))
    block(fields)
    assert all(layer.last_attention is None for layer in block.attention)  # nothing kept by default
    with pytest.raises(RuntimeError, match="record_attention"):
        block.attention_maps()
    block.record_attention()
    out = block(fields)
    maps = block.attention_maps()
    assert len(maps) == 3
    for alpha in maps:
        assert alpha.shape == (5, 2, LAYOUT.num_fields, LAYOUT.num_fields)
        assert (alpha >= 0).all() and not alpha.requires_grad
        torch.testing.assert_close(alpha.sum(-1), torch.ones(5, 2, LAYOUT.num_fields))
    torch.testing.assert_close(block(fields), out)  # keeping the maps does not change the output
    block.record_attention(False)
    assert all(layer.last_attention is None for layer in block.attention)


@pytest.mark.parametrize("block", sorted(SMALL))
def test_blocks_are_deterministic_and_rows_independent(block: str) -> None:
    # No masking or cross-row mixing: in eval mode a row's logit does not depend on the rest of the batch.
    torch.manual_seed(0)
    net = _block(block, mlp={"hidden": [8], "batch_norm": True, "dropout": 0.3}) if block != "autoint" else _block(
        block)
    net.eval()
    fields = torch.randn(7, LAYOUT.num_fields, 4)
    full = net(EmbeddingOutput(fields))
    torch.testing.assert_close(net(EmbeddingOutput(fields)), full, rtol=0, atol=0)
    torch.testing.assert_close(net(EmbeddingOutput(fields[2:5])), full[2:5])
    torch.testing.assert_close(net(EmbeddingOutput(fields.flip(0))), full.flip(0))


# ------------------------------------------------------------------------------------------------ layers
def _naive_interacting(layer: InteractingLayer, e: torch.Tensor) -> torch.Tensor:
    """AutoInt eq. 5–8 with explicit loops over rows, heads and field pairs."""
    b, f, _ = e.shape
    d = layer.head_dim
    out = torch.zeros(b, f, layer.out_dim, dtype=e.dtype)
    for n in range(b):
        for h in range(layer.heads):
            rows = slice(h * d, (h + 1) * d)
            wq, wk, wv = layer.query.weight[rows], layer.key.weight[rows], layer.value.weight[rows]
            for m in range(f):
                psi = torch.stack([(wq @ e[n, m]) @ (wk @ e[n, k]) for k in range(f)])
                if layer.scaled:
                    psi = psi / math.sqrt(d)
                alpha = torch.exp(psi) / torch.exp(psi).sum()
                out[n, m, rows] = sum(alpha[k] * (wv @ e[n, k]) for k in range(f))
    if isinstance(layer.residual, torch.nn.Identity):
        out = out + e
    elif layer.residual is not None:
        out = out + torch.einsum("ij,bfj->bfi", layer.residual.weight, e)
    if layer.norm is not None:
        mean, var = out.mean(-1, keepdim=True), out.var(-1, unbiased=False, keepdim=True)
        out = (out - mean) / torch.sqrt(var + layer.norm.eps) * layer.norm.weight + layer.norm.bias
    return torch.relu(out)


@pytest.mark.parametrize("options", [
    {"residual": True, "layer_norm": False, "scaled": False},
    {"residual": False, "layer_norm": False, "scaled": True},
    {"residual": True, "layer_norm": True, "scaled": True},
], ids=["paper", "scaled-no-residual", "scaled-layernorm"])
def test_interacting_layer_matches_a_naive_per_head_loop(options: dict) -> None:
    torch.manual_seed(1)
    layer = InteractingLayer(3, 6, 3, **options).double()
    if layer.norm is not None:
        torch.nn.init.normal_(layer.norm.weight)
        torch.nn.init.normal_(layer.norm.bias)
    layer.keep_attention = True
    e = torch.randn(2, 4, 3, dtype=torch.float64)
    with torch.no_grad():
        out = layer(e)
        torch.testing.assert_close(out, _naive_interacting(layer, e))
    assert out.shape == (2, 4, 6) and layer.last_attention.shape == (2, 3, 4, 4)


def test_width_change_residual_projects_only_where_the_width_changes() -> None:
    torch.manual_seed(2)
    first = InteractingLayer(3, 6, 2, residual_projection="width_change").double()
    later = InteractingLayer(6, 6, 2, residual_projection="width_change").double()
    paper = InteractingLayer(6, 6, 2)  # every_layer: W_Res in every layer, as eq. 8
    assert isinstance(first.residual, torch.nn.Linear) and isinstance(later.residual, torch.nn.Identity)
    assert isinstance(paper.residual, torch.nn.Linear)
    # an identity skip saves the 6 x 6 W_Res matrix
    assert sum(p.numel() for p in paper.parameters()) - sum(p.numel() for p in later.parameters()) == 36
    e = torch.randn(2, 4, 3, dtype=torch.float64)
    with torch.no_grad():
        hidden = first(e)
        out = later(hidden)
        torch.testing.assert_close(out, _naive_interacting(later, hidden))
        torch.testing.assert_close(out, torch.relu(_attention_only(later, hidden) + hidden))  # identity skip


def _attention_only(layer: InteractingLayer, e: torch.Tensor) -> torch.Tensor:
    """The concatenated heads (eq. 5–7) without the skip or the ReLU."""
    q, k, v = (layer._split(proj(e)) for proj in (layer.query, layer.key, layer.value))
    heads = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
    return heads.transpose(1, 2).reshape(e.shape[0], e.shape[1], layer.out_dim)


def test_bars_autoint_settings_give_the_bars_parameter_count() -> None:
    """BARS's AutoInt_frappe_x1 log reports 306,051 parameters: 10 fields of Frappe's 5,389 embedding rows (53,890
    floats) plus 252,161 in the attention stack and output; W_Res in every layer would add 5 x 128 x 128."""
    frappe = FeatureLayout(tuple(FieldSpec(f"f{i}", "categorical", 10, f"f{i}") for i in range(10)))
    config = BLOCKS.get("autoint").config(layers=6, heads=4, attention_dim=128, residual_projection="width_change")
    block = BLOCKS.build(config, BlockInput(frappe, 10))
    assert sum(p.numel() for p in block.parameters()) == 252_161
    paper = BLOCKS.build(config.model_copy(update={"residual_projection": "every_layer"}), BlockInput(frappe, 10))
    assert sum(p.numel() for p in paper.parameters()) == 252_161 + 5 * 128 * 128


@pytest.mark.parametrize("block", sorted(SMALL))
def test_xavier_dense_init_resets_every_linear_layer(block: str) -> None:
    torch.manual_seed(0)
    config = BLOCKS.get(block).config(**SMALL[block], dense_init="xavier_normal")
    model = build_model(EMBEDDINGS.get("per_field").config(dim=4, init_std=0.1), config, LAYOUT)
    linears = [m for m in model.block.modules() if isinstance(m, torch.nn.Linear)]
    assert linears
    for linear in linears:
        assert linear.bias is None or torch.all(linear.bias == 0)
    torch.manual_seed(0)
    default = build_model(EMBEDDINGS.get("per_field").config(dim=4, init_std=0.1),
                          config.model_copy(update={"dense_init": "torch_default"}), LAYOUT)
    assert any(m.bias is not None and torch.any(m.bias != 0) for m in default.block.modules()
               if isinstance(m, torch.nn.Linear))


def test_xavier_dense_init_draws_weights_at_the_xavier_scale() -> None:
    torch.manual_seed(0)
    config = BLOCKS.get("autoint").config(layers=2, heads=4, attention_dim=256)
    block = BLOCKS.build(config, BlockInput(LAYOUT, 4))  # built with PyTorch's default; build_model resets it
    block.reset_dense_parameters("xavier_normal")
    weight = block.attention[1].query.weight  # 256 x 256: std sqrt(2 / (256 + 256)) = 0.0625
    assert abs(weight.std().item() - 0.0625) < 0.002
    default_std = BLOCKS.build(config, BlockInput(LAYOUT, 4)).attention[1].query.weight.std().item()
    assert abs(default_std - 1 / math.sqrt(3 * 256)) < 0.002  # Kaiming-uniform bound 1/sqrt(fan_in)


def test_interacting_layer_rejects_uneven_heads() -> None:
    with pytest.raises(ValueError, match="divisible"):
        InteractingLayer(4, 10, 3)


def test_cross_network_v2_matches_equation_1_by_hand() -> None:
    torch.manual_seed(2)
    x0 = torch.randn(3, 5, dtype=torch.float64)
    one = CrossNetworkV2(5, 1).double()
    w0, b0 = one.layers[0].weight, one.layers[0].bias
    x1 = torch.stack([x0[n] * (w0 @ x0[n] + b0) + x0[n] for n in range(3)])
    torch.testing.assert_close(one(x0), x1)

    two = CrossNetworkV2(5, 2).double()
    (w0, b0), (w1, b1) = [(layer.weight, layer.bias) for layer in two.layers]
    x1 = x0 * (x0 @ w0.T + b0) + x0
    x2 = torch.stack([x0[n] * (w1 @ x1[n] + b1) + x1[n] for n in range(3)])
    torch.testing.assert_close(two(x0), x2)
    # Degree check: with W = I and b = 0 one layer gives x0² + x0 element-wise.
    with torch.no_grad():
        one.layers[0].weight.copy_(torch.eye(5))
        one.layers[0].bias.zero_()
    torch.testing.assert_close(one(x0), x0 * x0 + x0)


# ------------------------------------------------------------------------------------------------ learning
# Five categorical fields with small vocabularies, two main effects and two planted pairwise interactions (strength
# 1.0): LR reaches ~0.65 test AUC, the interaction blocks 0.72–0.79 (Bayes ~0.80) after 4 short epochs (measured on
# seeds 1–3; the smallest gap seen was 0.077).
MARGIN = 0.03
LEARNING_MODELS = {
    "lr": {"block": "lr"},
    "autoint": {"block": "autoint", "layers": 2, "heads": 2, "attention_dim": 16},
    "autoint_plus": {"block": "autoint_plus", "layers": 2, "heads": 2, "attention_dim": 16,
                     "mlp": {"hidden": [32, 16]}},
    "dcnv2": {"block": "dcnv2", "cross_layers": 2, "mlp": {"hidden": [32, 16]}},
}


def _test_auc(block: str, out: Path) -> float:
    recipe = validate_recipe({
        "name": f"interactions_{block}", "seed": 2, "output_dir": str(out / block),
        "dataset": {"synthetic": {"rows": 20000, "categorical_fields": 5, "numeric_fields": 0,
                                   "informative_fields": 2, "interaction_pairs": 2, "numeric_informative": 0,
                                   "interaction_scale": 1.0, "cardinalities": [4, 6, 8, 10, 12],
                                   "time_column": False}},
        "features": {"categorical": ["C1", "C2", "C3", "C4", "C5"]},
        # A wider initialisation than the 1e-4 default escapes the flat start of product interactions sooner.
        "embedding": {"dim": 8, "init_std": 0.05},
        "model": LEARNING_MODELS[block],
        "train": {"epochs": 4, "batch_size": 512, "progress": False, "device": "cpu", "optimizer": {"lr": 1e-2},
                  "early_stopping": {"patience": 10}},
        "tracking": {"enabled": False},
    })
    return train_recipe(recipe, console=Console(quiet=True)).metrics["test"]["auc"]


@pytest.fixture(scope="module")
def interaction_data(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("interactions")
    mp = pytest.MonkeyPatch()
    mp.setenv("CTRLAB_CACHE_DIR", str(root / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add overhead (and contention on a shared machine)
    try:
        yield root, _test_auc("lr", root)
    finally:
        torch.set_num_threads(threads)
        mp.undo()


@pytest.mark.parametrize("block", ["autoint", "autoint_plus", "dcnv2"])
def test_block_learns_planted_interactions_beyond_lr(block: str, interaction_data) -> None:
    root, lr_auc = interaction_data
    block_auc = _test_auc(block, root)
    assert block_auc > lr_auc + MARGIN, (block, block_auc, lr_auc)
