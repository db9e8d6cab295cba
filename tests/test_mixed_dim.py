"""The shared mixed-dimension table: output against a hand-built reference, one lookup per width group, stored
floats, self-describing state dicts (a pruned state loads into a full-shape module), pruning, gradients and the
per-run embedding accounting."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from safetensors.torch import load_file

from ctrlab.blocks import BLOCKS
from ctrlab.config.loader import validate_recipe
from ctrlab.data.layout import FeatureLayout
from ctrlab.data.processor import FeatureProcessor
from ctrlab.embeddings import EMBEDDINGS
from ctrlab.embeddings.mixed_dim import EmbeddingArchitecture, EmbeddingUnits, MixedDimEmbedding
from ctrlab.models import build_model
from ctrlab.train.run import train_recipe
from ctrlab.utils.checkpoint import load_weights, save_weights
from embedding_search_recipe import LAYOUT, synthetic_recipe, tiny_batch

QUIET = Console(quiet=True)
D = 4


def _table(seed: int = 0, **kw: object) -> MixedDimEmbedding:
    torch.manual_seed(seed)
    table = EMBEDDINGS.build(EMBEDDINGS.get("dnis").config(dim=D, init_std=0.5, **kw), LAYOUT)
    assert isinstance(table, MixedDimEmbedding)
    return table


def _architecture() -> EmbeddingArchitecture:
    # item: 2 dims, rows 3 and 6 pruned; user: 3 dims in the order 2, 0, 1; x (numeric): 1 dim
    item_rows = torch.ones(9, dtype=torch.bool)
    item_rows[[3, 6]] = False
    return EmbeddingArchitecture(D, {"item": 2, "user": 3, "x": 1}, {"item": item_rows}, {"user": [2, 0, 1]})


def _reference(dense: torch.Tensor, batch, keep_item: torch.Tensor, dims: dict[str, int]) -> torch.Tensor:
    """The expected fields from the full table ``dense`` (already reordered/truncated per unit), by hand."""
    units = EmbeddingUnits.from_layout(LAYOUT)
    off = dict(zip(units.names, units.offsets))

    def row(unit: str, ids: torch.Tensor) -> torch.Tensor:
        vectors = dense[ids + off[unit]].clone()
        vectors[..., dims[unit]:] = 0
        if unit == "item":
            vectors = vectors * keep_item[ids].unsqueeze(-1)
        return vectors

    item = row("item", batch.categorical[:, 0])
    user = row("user", batch.categorical[:, 1])
    x = row("x", torch.zeros(len(batch), dtype=torch.long)) * batch.numeric
    hist_ids = batch.sequences["hist"]
    mask = hist_ids > 0
    hist = (row("item", hist_ids) * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    return torch.stack([item, user, x, hist], dim=1)


def test_full_table_output_is_per_field_lookup_and_pooling() -> None:
    table = _table()
    batch = tiny_batch()
    dense = table.dense_table()
    out = table(batch)
    all_rows = torch.ones(9, dtype=torch.bool)
    torch.testing.assert_close(out.fields, _reference(dense, batch, all_rows, {"item": D, "user": D, "x": D}))
    vectors, mask = out.sequences["hist"]
    assert vectors.shape == (8, 4, D) and torch.equal(mask, batch.sequences["hist"] > 0)
    assert torch.all(vectors[~mask] == 0) and torch.all(out.fields[0, 3] == 0)  # padding and an empty history
    assert table.parameter_count() == (9 + 5 + 1) * D


def test_pruned_table_keeps_rows_and_leading_dims_zero_padded() -> None:
    table = _table()
    full = table.dense_table()
    table.prune(_architecture())
    assert table.unit_dims == [2, 3, 1]
    # stored: item 7 rows x 2, user 5 rows x 3, x 1 row x 1
    assert table.parameter_count() == 7 * 2 + 5 * 3 + 1 == sum(p.numel() for p in table.parameters())
    assert table.parameter_bytes() == 4 * table.parameter_count()
    assert {w: tuple(p.shape) for w, p in table.group_weights().items()} == {3: (5, 3), 2: (7, 2), 1: (1, 1)}
    # the user table keeps dims 2, 0, 1 of the source, in that order
    units = EmbeddingUnits.from_layout(LAYOUT)
    expected = full.clone()
    user = slice(units.offsets[1], units.offsets[1] + 5)
    expected[user, :3] = full[user][:, [2, 0, 1]]
    keep = _architecture().rows["item"]
    batch = tiny_batch(16, seed=4)
    assert bool((~keep[batch.categorical[:, 0]]).any())  # the batch hits a pruned row
    out = table(batch)
    torch.testing.assert_close(out.fields, _reference(expected, batch, keep, {"item": 2, "user": 3, "x": 1}))
    assert torch.all(out.fields[:, 0][~keep[batch.categorical[:, 0]]] == 0)  # a pruned row embeds as zeros
    assert torch.all(out.fields[:, :, 3] == 0)  # nobody keeps the last dim: the padding is zeros


def test_one_lookup_per_width_group_not_per_field(monkeypatch: pytest.MonkeyPatch) -> None:
    table = _table()
    table.prune(_architecture())  # widths 2, 3, 1 over the flat fields, plus the history
    calls: list[tuple[int, ...]] = []
    original = F.embedding

    def counting(ids: torch.Tensor, weight: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        calls.append(tuple(weight.shape))
        return original(ids, weight, *args, **kwargs)

    monkeypatch.setattr(F, "embedding", counting)
    table(tiny_batch(64))
    assert sorted(calls) == sorted([(5, 3), (7, 2), (1, 1), (7, 2)])  # 3 width groups + the history's table


def test_a_dropped_unit_embeds_as_zeros_and_stores_nothing() -> None:
    table = _table()
    table.prune(EmbeddingArchitecture(D, {"user": 0}))
    out = table(tiny_batch())
    assert torch.all(out.fields[:, 1] == 0) and not torch.all(out.fields[:, 0] == 0)
    assert table.parameter_count() == (9 + 1) * D


def test_pruning_twice_composes_and_rows_never_come_back() -> None:
    table = _table()
    full = table.dense_table()
    table.prune(_architecture())
    table.prune(EmbeddingArchitecture(D, {"item": 1, "user": 3, "x": 1}, {"item": torch.ones(9, dtype=torch.bool)},
                                      {"user": [1, 0, 2]}))
    dense = table.dense_table()
    units = EmbeddingUnits.from_layout(LAYOUT)
    u = units.offsets[1]
    torch.testing.assert_close(dense[u:u + 5, :3], full[u:u + 5][:, [0, 2, 1]])
    assert torch.all(dense[[3, 6]] == 0)  # rows pruned before stay pruned
    torch.testing.assert_close(dense[0, :1], full[0, :1])


def test_pruned_state_dict_holds_fewer_floats_and_reloads_into_a_full_module(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = BLOCKS.get("deepfm").config(mlp={"hidden": [8]}, linear=True)
    embedding = EMBEDDINGS.get("dnis").config(dim=D, init_std=0.5)
    model = build_model(embedding, config, LAYOUT)
    full_path = tmp_path / "full.safetensors"
    save_weights(model, full_path)
    model.embedding.prune(_architecture())
    pruned_path = tmp_path / "pruned.safetensors"
    save_weights(model, pruned_path)

    def floats(path: Path, prefix: str) -> int:
        return sum(t.numel() for k, t in load_file(str(path)).items() if k.startswith(prefix) and t.is_floating_point())

    assert floats(full_path, "embedding.") == 15 * D
    assert floats(pruned_path, "embedding.") == 7 * 2 + 5 * 3 + 1 == model.embedding.parameter_count()
    assert floats(pruned_path, "linear.") == floats(full_path, "linear.")  # the first-order term is not pruned
    # a model built from the recipe alone (full shapes, other initial values) takes the pruned weights
    torch.manual_seed(99)
    fresh = build_model(embedding, config, LAYOUT)
    load_weights(fresh, pruned_path)
    assert fresh.embedding.unit_dims == [2, 3, 1]
    model.eval()
    fresh.eval()
    batch = tiny_batch(16, seed=4)
    assert torch.equal(fresh(batch), model(batch))
    # loading a state of the same structure copies in place: the parameters stay the same objects
    before = [id(p) for p in fresh.parameters()]
    fresh.load_state_dict(model.state_dict())
    assert [id(p) for p in fresh.parameters()] == before


def _blocked_architecture() -> EmbeddingArchitecture:
    # item rows in three blocks: rows 1, 2, 5 keep dims [3, 1, 0]; rows 0, 4, 7, 8 keep [1]; rows 3, 6 nothing
    block = torch.tensor([1, 0, 0, 2, 1, 0, 2, 1, 1])
    return EmbeddingArchitecture(D, {"user": 2}, {}, {}, {"item": block}, {"item": [3, 1, 0]},
                                 {"item": [[3, 1, 0], [1], []]})


def test_blocks_give_rows_of_one_table_their_own_widths_and_orders(tmp_path: Path) -> None:
    table = _table()
    full = table.dense_table()
    table.prune(_blocked_architecture())
    # item: 3 rows x 3 + 4 rows x 1; user 5 x 2; x 1 x 4
    assert table.parameter_count() == 3 * 3 + 4 * 1 + 5 * 2 + 4 == _blocked_architecture().kept_parameters(
        EmbeddingUnits.from_layout(LAYOUT))
    assert table.unit_dims == [3, 2, 4]
    expected = torch.zeros_like(full)
    for row in (1, 2, 5):
        expected[row, :3] = full[row, [3, 1, 0]]
    for row in (0, 4, 7, 8):
        expected[row, 0] = full[row, 1]
    units = EmbeddingUnits.from_layout(LAYOUT)
    user, x = units.offsets[1], units.offsets[2]
    expected[user:user + 5, :2] = full[user:user + 5, :2]
    expected[x] = full[x]
    torch.testing.assert_close(table.dense_table(), expected)
    batch = tiny_batch(32, seed=5)
    out = table(batch)
    ids = batch.categorical[:, 0]
    torch.testing.assert_close(out.fields[:, 0], expected[ids])
    torch.testing.assert_close(out.fields[:, 1], expected[batch.categorical[:, 1] + user])
    hist = batch.sequences["hist"]
    mask = (hist > 0).unsqueeze(-1)
    pooled = (expected[hist] * mask).sum(1) / mask.sum(1).clamp(min=1)
    torch.testing.assert_close(out.fields[:, 3], pooled)
    # the state dict describes the blocks: a full-shape module built from the recipe takes it
    torch.manual_seed(7)
    fresh = _table(seed=7)
    fresh.load_state_dict(table.state_dict())
    assert torch.equal(fresh(batch).fields, out.fields) and fresh.parameter_count() == table.parameter_count()
    again = fresh.architecture()
    assert again.block_dims == {"item": [3, 1]} and again.kept_parameters(units) == table.parameter_count()
    # gradients reach exactly the stored rows the batch looks up, at their own width
    out.fields.sum().backward()
    grads = {w: p.grad for w, p in table.group_weights().items()}
    looked_up = set(ids.tolist()) | set(hist[hist > 0].tolist())
    wide = [r for r in (1, 2, 5)]
    for position, row in enumerate(wide):
        assert bool(grads[3][position].abs().sum() > 0) == (row in looked_up)
    rows = torch.unique(table.row_ids(batch))
    torch.testing.assert_close(table.lazy_l2(batch), 0.5 * sum(expected[r].pow(2).sum() for r in rows.tolist()))


def test_weights_for_other_features_are_refused_with_a_message() -> None:
    table = _table()
    other = FeatureLayout(tuple(replace(f, vocab_size=7) if f.name == "user" else f for f in LAYOUT.fields))
    big = EMBEDDINGS.build(EMBEDDINGS.get("dnis").config(dim=D), other)
    with pytest.raises(RuntimeError, match="different features or vocabularies"):
        table.load_state_dict(big.state_dict())


@pytest.mark.parametrize("sparse", [False, True])
def test_gradients_reach_only_the_stored_rows_the_batch_uses(sparse: bool) -> None:
    table = _table(sparse=sparse)
    table.prune(_architecture())
    batch = tiny_batch()
    table(batch).fields.sum().backward()
    grads = {w: p.grad.to_dense() if p.grad.is_sparse else p.grad for w, p in table.group_weights().items()}
    assert set(grads) == {1, 2, 3} and all(g is not None for g in grads.values())
    # user rows (width 3) not in the batch get no gradient
    used = set(batch.categorical[:, 1].tolist())
    for row in range(5):
        assert bool(grads[3][row].abs().sum() > 0) == (row in used)
    if sparse:
        rows = torch.unique(table.row_ids(batch))
        expected = 0.5 * sum(table.dense_table()[r].pow(2).sum() for r in rows.tolist())
        torch.testing.assert_close(table.lazy_l2(batch), expected)


def test_mini_batch_aware_l2_counts_stored_rows_of_the_full_row_space() -> None:
    table = _table()
    table.prune(_architecture())
    batch = tiny_batch()
    counts = torch.arange(1, table.num_rows + 1)
    rows = torch.unique(table.row_ids(batch))
    dense = table.dense_table()
    expected = 0.1 * 0.5 * sum(dense[r].pow(2).sum() / counts[r] for r in rows.tolist())
    torch.testing.assert_close(table.mini_batch_aware_l2(batch, counts, 0.1), expected)


@pytest.mark.parametrize("block", ["deepfm", "dcnv2", "autoint_plus", "din"])
def test_interaction_blocks_take_the_zero_padded_output(block: str) -> None:
    torch.manual_seed(0)
    extra = {"candidate": "item", "history": "hist"} if block == "din" else {}
    config = BLOCKS.get(block).config(mlp={"hidden": [8]}, **extra)
    model = build_model(EMBEDDINGS.get("optembed").config(dim=D), config, LAYOUT)
    model.embedding.prune(_architecture())
    logits = model(tiny_batch())
    assert logits.shape == (8,) and torch.isfinite(logits).all()


def test_every_run_reports_the_stored_size_of_its_embedding(tmp_path: Path, cache_dir: Path) -> None:
    recipe = validate_recipe(synthetic_recipe(tmp_path / "plain", {"kind": "per_field"}, epochs=1))
    result = train_recipe(recipe, console=QUIET)
    metrics = json.loads((result.output_dir / "metrics.json").read_text())
    layout = FeatureProcessor.load(result.output_dir / "processor.json").layout
    rows = sum(layout.tables().values())
    assert metrics["embedding_parameters"] == 8 * (rows + len(layout.numeric)) > 8 * 1000  # tables + numeric vectors
    assert metrics["embedding_bytes"] == 4 * metrics["embedding_parameters"]
    assert "embedding_search" not in metrics
    assert not (result.output_dir / "embedding_search").exists()
