"""The torchrec backend of the per-field embedding: selection by config, the KeyedJaggedTensor it builds, the same
outputs, logits and gradients as ``plain`` for the same weights, the regularisers, saving and reloading, and a
recipe-level run on synthetic data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from pydantic import ValidationError
from rich.console import Console

try:
    import torchrec
except Exception as exc:  # ImportError, or fbgemm failing to load its operators
    pytest.skip(f"torchrec cannot be imported ({exc}); the torchrec backend needs torchrec and fbgemm-gpu(-cpu)",
                allow_module_level=True)

from ctrlab.blocks import BLOCKS
from ctrlab.config.loader import read_recipe_file, validate_recipe
from ctrlab.config.train import OptimizerConfig, TrainConfig
from ctrlab.data.batches import FeatureBatch
from ctrlab.data.layout import FeatureLayout, FieldSpec
from ctrlab.data.pipeline import TRUE_PROBABILITY_COLUMN, load_raw_splits
from ctrlab.embeddings import EMBEDDINGS
from ctrlab.embeddings.per_field import PerFieldEmbedding
from ctrlab.embeddings.torchrec_backend import TorchrecEmbedding
from ctrlab.layers.regularizers import mini_batch_aware_l2
from ctrlab.models import CTRModel, build_model
from ctrlab.serve import Predictor
from ctrlab.train.run import train_recipe
from ctrlab.train.trainer import Trainer
from ctrlab.utils.checkpoint import load_weights, save_weights

REPO = Path(__file__).resolve().parents[1]
QUIET = Console(quiet=True)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
EXACT = {"rtol": 0.0, "atol": 1e-6}
# categorical, numeric and two sequences: "hist" shares the vocabulary of "item" (mean), "tags" has its own (sum).
LAYOUT = FeatureLayout((
    FieldSpec("item", "categorical", 9, "item"),
    FieldSpec("user", "categorical", 5, "user"),
    FieldSpec("x", "numeric"),
    FieldSpec("y", "numeric"),
    FieldSpec("hist", "sequence", 9, "item", 4, "mean"),
    FieldSpec("tags", "sequence", 6, "tags", 3, "sum"),
))


def _config(**kw: object):
    return EMBEDDINGS.get("per_field").config(**kw)


def _batch(n: int = 8, seed: int = 1, empty_tags: bool = False) -> FeatureBatch:
    g = torch.Generator().manual_seed(seed)
    hist = torch.randint(2, 9, (n, 4), generator=g)
    hist[0] = 0  # empty history
    hist[1, 1:] = 0
    hist[2, 3:] = 0
    hist[3, 1] = 0  # padding inside a history is dropped too
    tags = torch.randint(2, 6, (n, 3), generator=g)
    tags[0] = 0
    tags[2, 1:] = 0
    if empty_tags:
        tags[:] = 0
    return FeatureBatch(
        categorical=torch.stack([torch.randint(0, 9, (n,), generator=g), torch.randint(1, 5, (n,), generator=g)], 1),
        numeric=torch.randn(n, 2, generator=g),
        sequences={"hist": hist, "tags": tags},
        label=torch.tensor([0.0, 1.0] * (n // 2)),
    )


def _pair(layout: FeatureLayout = LAYOUT, dim: int = 4, **kw: object) -> tuple[PerFieldEmbedding, TorchrecEmbedding]:
    torch.manual_seed(0)
    plain = EMBEDDINGS.build(_config(dim=dim, init_std=0.5, **kw), layout)
    torchrec_emb = EMBEDDINGS.build(_config(dim=dim, init_std=0.5, backend="torchrec", **kw), layout)
    torchrec_emb.load_from_plain(plain)
    return plain, torchrec_emb


def _block(block: str):
    if block == "din":
        return BLOCKS.get("din").config(candidate="item", history="hist", mlp={"hidden": [8]},
                                        attention_hidden=[6], linear=True)
    return BLOCKS.get(block).config(mlp={"hidden": [8]})


def _model_pair(block: str, **kw: object) -> tuple[CTRModel, CTRModel]:
    """A plain and a torchrec model holding the same weights."""
    torch.manual_seed(0)
    plain = build_model(_config(dim=4, init_std=0.5, **kw), _block(block), LAYOUT)
    torch.manual_seed(1)
    other = build_model(_config(dim=4, init_std=0.5, backend="torchrec", **kw), _block(block), LAYOUT)
    shared = {k: v for k, v in plain.state_dict().items() if not k.startswith(("embedding.", "linear."))}
    missing, unexpected = other.load_state_dict(shared, strict=False)
    assert not unexpected and all(k.startswith(("embedding.", "linear.")) for k in missing)
    for mine, theirs in zip(other.embedding_modules(), plain.embedding_modules()):
        mine.load_from_plain(theirs)
    return plain, other


def _dense(grad: torch.Tensor) -> torch.Tensor:
    return grad.coalesce().to_dense() if grad.is_sparse else grad


# ------------------------------------------------------------------------------------------------ selection


def test_backend_is_chosen_by_config_and_defaults_to_plain() -> None:
    assert _config().backend == "plain"
    assert type(EMBEDDINGS.build(_config(dim=3), LAYOUT)) is PerFieldEmbedding
    emb = EMBEDDINGS.build(_config(dim=3, backend="torchrec"), LAYOUT)
    assert isinstance(emb, TorchrecEmbedding) and emb.dim == 3
    linear = EMBEDDINGS.build(_config(dim=3, backend="torchrec"), LAYOUT, dim=1)  # the first-order term
    assert isinstance(linear, TorchrecEmbedding) and linear(_batch()).fields.shape == (8, 6, 1)
    with pytest.raises(ValidationError, match="backend"):
        _config(backend="nope")
    # one EmbeddingBagConfig per vocabulary, listing every field that reads it
    configs = {c.name: c for c in emb.ebc.embedding_bag_configs()}
    assert {k: (c.num_embeddings, c.feature_names) for k, c in configs.items()} == {
        "item": (9, ["item", "hist"]), "user": (5, ["user"]), "tags": (6, ["tags"])}
    assert configs["item"].pooling == torchrec.PoolingType.MEAN and configs["tags"].pooling == torchrec.PoolingType.SUM
    assert emb.table_parameters() == [emb.ebc.embedding_bags[t].weight for t in ("item", "user", "tags")]


def test_a_recipe_naming_torchrec_fails_validation_where_it_is_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchrec" else real(name, *a))
    with pytest.raises(ValidationError, match="needs the torchrec package"):
        _config(backend="torchrec")
    assert _config(backend="plain").backend == "plain"


def test_tables_start_normal_with_init_std() -> None:
    emb = EMBEDDINGS.build(_config(dim=16, init_std=0.02, backend="torchrec"),
                           FeatureLayout((FieldSpec("a", "categorical", 5000, "a"),)))
    weight = emb.table_parameters()[0].detach()
    assert weight.shape == (5000, 16)
    assert abs(weight.mean().item()) < 1e-3 and weight.std().item() == pytest.approx(0.02, rel=0.02)


def test_odd_table_names_get_module_safe_names() -> None:
    layout = FeatureLayout((FieldSpec("a.b", "categorical", 4, "a.b"), FieldSpec("keys", "categorical", 3, "keys"),
                            FieldSpec("a_b", "categorical", 5, "a_b")))
    plain, emb = _pair(layout, dim=2)
    assert emb.module_names == {"a.b": "a_b_0", "keys": "keys_1", "a_b": "a_b"}
    batch = FeatureBatch(torch.tensor([[1, 2, 3], [3, 0, 4]]), torch.zeros(2, 0))
    torch.testing.assert_close(emb(batch).fields, plain(batch).fields, **EXACT)


# ------------------------------------------------------------------------------------------------ input


def test_keyed_jagged_tensor_of_a_hand_written_batch() -> None:
    layout = FeatureLayout((FieldSpec("a", "categorical", 5, "a"), FieldSpec("b", "categorical", 4, "b"),
                            FieldSpec("n", "numeric"), FieldSpec("s", "sequence", 5, "a", 3)))
    emb = EMBEDDINGS.build(_config(dim=2, backend="torchrec"), layout)
    batch = FeatureBatch(categorical=torch.tensor([[2, 3], [4, 1], [1, 2]]), numeric=torch.zeros(3, 1),
                         sequences={"s": torch.tensor([[3, 2, 0], [0, 0, 0], [0, 4, 0]])})
    kjt = emb.features(batch)
    assert kjt.keys() == ["a", "b", "s"] and kjt.stride() == 3
    assert kjt.lengths().tolist() == [1, 1, 1, 1, 1, 1, 2, 0, 1]  # key-major: a's rows, b's rows, s's rows
    assert kjt.values().tolist() == [2, 4, 1, 3, 1, 2, 3, 2, 4]  # padding dropped, the empty history an empty bag
    assert kjt.values().dtype == torch.long and kjt.offset_per_key() == [0, 3, 6, 9]
    per_key = kjt.to_dict()
    assert per_key["s"].lengths().tolist() == [2, 0, 1] and per_key["s"].values().tolist() == [3, 2, 4]


# ------------------------------------------------------------------------------------------------ outputs


@pytest.mark.parametrize("device", DEVICES)
def test_same_fields_and_sequences_as_plain_for_the_same_weights(device: str) -> None:
    plain, emb = _pair()
    plain, emb = plain.to(device), emb.to(device)
    batch = _batch().to(torch.device(device))
    want, got = plain(batch), emb(batch)
    assert got.fields.shape == want.fields.shape == (8, 6, 4)
    torch.testing.assert_close(got.fields, want.fields, **EXACT)
    assert list(got.sequences) == list(want.sequences) == ["hist", "tags"]
    for name, (vectors, mask) in want.sequences.items():
        torch.testing.assert_close(got.sequences[name][0], vectors, **EXACT)
        assert torch.equal(got.sequences[name][1], mask)
    assert torch.all(got.fields[0, 4:] == 0)  # empty histories pool to zero (mean and sum)
    assert torch.all(got.fields[2, 5] == got.sequences["tags"][0][2, 0])  # one real item: sum = that item


def test_sequences_of_one_vocabulary_with_different_pooling() -> None:
    layout = FeatureLayout((FieldSpec("item", "categorical", 9, "item"),
                            FieldSpec("hist", "sequence", 9, "item", 4, "mean"),
                            FieldSpec("clicks", "sequence", 9, "item", 4, "sum")))
    plain, emb = _pair(layout)
    assert emb.ebc.embedding_bag_configs()[0].pooling == torchrec.PoolingType.SUM and emb._divide == {"hist"}
    batch = _batch()
    batch = FeatureBatch(batch.categorical[:, :1], torch.zeros(8, 0),
                         {"hist": batch.sequences["hist"], "clicks": batch.sequences["hist"].flip(0)})
    torch.testing.assert_close(emb(batch).fields, plain(batch).fields, **EXACT)


@pytest.mark.parametrize("block", ["deepfm", "din"])
def test_same_logits_as_plain(block: str) -> None:
    plain, other = _model_pair(block)
    assert isinstance(other.embedding, TorchrecEmbedding) and isinstance(other.linear, TorchrecEmbedding)
    batch = _batch()
    for training in (False, True):
        plain.train(training)
        other.train(training)
        torch.testing.assert_close(other(batch), plain(batch), **EXACT)


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("block", ["deepfm", "din"])
def test_same_gradients_as_plain(block: str, sparse: bool) -> None:
    plain, other = _model_pair(block, sparse=sparse)
    batch = _batch()
    for model in (plain, other):
        torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch.label).backward()
    for mine, theirs in zip(other.embedding_modules(), plain.embedding_modules()):
        assert theirs.weight.grad.is_sparse == sparse
        for table, rows in mine.tables.items():
            grad = mine.table_weight(table).grad
            assert grad is not None and grad.is_sparse == sparse
            start = theirs.table_offsets[table]
            torch.testing.assert_close(_dense(grad), _dense(theirs.weight.grad)[start:start + rows], **EXACT)
        torch.testing.assert_close(mine.numeric_weight.grad, theirs.numeric_weight.grad, **EXACT)
    grads = {k: p.grad for k, p in plain.named_parameters() if not k.startswith(("embedding.", "linear."))}
    for k, p in other.named_parameters():
        if k in grads:
            torch.testing.assert_close(p.grad, grads[k], **EXACT)


# ------------------------------------------------------------------------------------------------ regularisers


@pytest.mark.parametrize("sparse", [False, True])
def test_row_ids_and_regularisers_match_plain(sparse: bool) -> None:
    plain, emb = _pair(sparse=sparse)
    batch = _batch()
    assert emb.row_ids(batch).tolist() == plain.row_ids(batch).tolist()
    assert emb.num_rows == plain.num_rows == 9 + 5 + 6
    counts = torch.arange(emb.num_rows) % 4
    for name in ("lazy", "mba"):
        values = []
        for module in (plain, emb):
            module.zero_grad()
            value = module.lazy_l2(batch) if name == "lazy" else module.mini_batch_aware_l2(batch, counts, 0.3)
            value.backward()
            values.append(value)
        torch.testing.assert_close(values[1], values[0], **EXACT)
        for table, rows in emb.tables.items():
            start = plain.table_offsets[table]
            grad = emb.table_weight(table).grad
            assert grad.is_sparse == sparse
            torch.testing.assert_close(_dense(grad), _dense(plain.weight.grad)[start:start + rows], **EXACT)
    # the plain layer's default is the shared function on its one table
    torch.testing.assert_close(plain.mini_batch_aware_l2(batch, counts, 0.3),
                               mini_batch_aware_l2(plain.weight, plain.row_ids(batch), counts, 0.3))
    # a table the batch does not touch adds nothing (no zero dense gradient for a sparse optimiser to reject)
    emb.zero_grad()
    emb.mini_batch_aware_l2(_batch(empty_tags=True), counts, 0.3).backward()
    assert emb.table_weight("tags").grad is None


@pytest.mark.parametrize("regularizer", ["weight_decay", "mini_batch_aware"])
@pytest.mark.parametrize("sparse", [False, True])
def test_trainer_loss_matches_plain_and_training_runs(sparse: bool, regularizer: str) -> None:
    plain, other = _model_pair("din", sparse=sparse)
    optimizer = OptimizerConfig(embedding_weight_decay=0.5, embedding_regularizer=regularizer)
    config = TrainConfig(optimizer=optimizer, progress=False, device="cpu", batch_size=4)
    trainers = [Trainer(m, config, torch.device("cpu")) for m in (plain, other)]
    train = _batch(16, seed=2)
    train.sequences["tags"][8:] = 0  # the last batch of 4 rows (no shuffling below) touches no tag row
    for trainer in trainers:
        trainer._count_rows(train)
        trainer.model.eval()
    assert [len(t.optimizers.optimizers) for t in trainers] == [2 if sparse else 1] * 2
    if regularizer == "mini_batch_aware":
        assert [c.tolist() for c in trainers[1]._row_counts] == [c.tolist() for c in trainers[0]._row_counts]
    batch = _batch(4, seed=3)
    torch.testing.assert_close(trainers[1]._loss(batch), trainers[0]._loss(batch), **EXACT)
    before = [p.detach().clone() for p in other.embedding.table_parameters()]
    other.train()
    for rows in (slice(0, 4), slice(12, 16)):  # includes a batch whose histories are all empty
        loss = trainers[1]._loss(train.select(rows))
        trainers[1].optimizers.zero_grad()
        loss.backward()
        trainers[1].optimizers.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, other.embedding.table_parameters()))
    assert np.isfinite(trainers[1].train_epoch(train))


# ------------------------------------------------------------------------------------------------ saving


def test_weights_save_and_reload_through_safetensors(tmp_path: Path) -> None:
    _, model = _model_pair("din", sparse=True)
    names = set(model.state_dict())
    assert {"embedding.ebc.embedding_bags.item.weight", "linear.ebc.embedding_bags.tags.weight",
            "embedding.numeric_weight"} <= names
    save_weights(model, tmp_path / "w.safetensors")
    torch.manual_seed(7)
    again = build_model(_config(dim=4, backend="torchrec", sparse=True), _block("din"), LAYOUT)
    batch = _batch()
    model.eval()
    again.eval()
    assert not torch.allclose(again(batch), model(batch))
    load_weights(again, tmp_path / "w.safetensors")
    assert torch.equal(again(batch), model(batch))


def _quickstart(out: Path, backend: str) -> dict:
    """The quickstart recipe on 20k synthetic rows, two short epochs."""
    data = read_recipe_file(REPO / "recipes" / "quickstart.yaml")
    data["dataset"]["synthetic"]["rows"] = 20_000
    data["output_dir"] = str(out)
    data["embedding"]["backend"] = backend
    data["model"]["mlp"] = {"hidden": [64, 32]}
    data["train"].update(epochs=2, batch_size=512, progress=False, device="cpu", num_threads=1,
                         optimizer={"name": "adam", "lr": 3e-3, "embedding_weight_decay": 1e-5})
    data["tracking"] = {"enabled": False}
    return data


def test_recipe_trains_with_the_torchrec_backend_and_reloads(tmp_path: Path, cache_dir: Path) -> None:
    recipe = validate_recipe(_quickstart(tmp_path / "torchrec", "torchrec"))
    assert recipe.embedding.backend == "torchrec"
    result = train_recipe(recipe, console=QUIET)
    test_auc, bayes = result.metrics["test"]["auc"], result.metrics["bayes_optimal_test_auc"]
    assert test_auc > 0.5 + 0.5 * (bayes - 0.5), (test_auc, bayes)  # about 0.72 of a Bayes-optimal 0.83
    plain = train_recipe(validate_recipe(_quickstart(tmp_path / "plain", "plain")), console=QUIET)
    assert test_auc == pytest.approx(plain.metrics["test"]["auc"], abs=0.02)  # learns as well as plain

    predictor = Predictor.from_run(result.output_dir)
    assert isinstance(predictor.model.embedding, TorchrecEmbedding)
    assert isinstance(predictor.model.linear, TorchrecEmbedding)
    raw_test = load_raw_splits(recipe.dataset, recipe.seed).frames["test"]
    again = predictor.predict(raw_test.drop(["label", TRUE_PROBABILITY_COLUMN]))
    saved = pl.read_parquet(result.output_dir / "test_predictions.parquet")["probability"].to_numpy()
    assert again.dtype == saved.dtype == np.float64
    np.testing.assert_allclose(again, saved, rtol=0, atol=1e-7)
    print(f"\nsynthetic test AUC: torchrec {test_auc:.4f}  plain {plain.metrics['test']['auc']:.4f}  "
          f"bayes {bayes:.4f}; reload max |diff| {np.abs(again - saved).max():.1e}")
