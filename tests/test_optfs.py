"""OptFS (Lyu et al. 2023): the per-value gate by hand (gate 1 at the start, sigmoid(tau m) / sigmoid(m0) after,
padding and OOV never gated, sequences gated before pooling), the temperature schedule and the recipe's errors,
the gates' own optimiser and loss term, kept sets applied by the processor (a dropped value is OOV), the rewind's
row copy, and short runs on synthetic data: the written files and figures, the smaller table, reloads, a split
search/retrain, and serving a registered OptFS model over HTTP."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from safetensors.torch import load_file

from ctrlab.blocks import BLOCKS
from ctrlab.config.features import FeaturesConfig
from ctrlab.config.loader import validate_recipe
from ctrlab.config.train import OptimizerConfig, TrainConfig
from ctrlab.data.batches import FeatureBatch
from ctrlab.data.kept_values import KeptValues
from ctrlab.data.layout import OOV_ID, FeatureLayout
from ctrlab.data.pipeline import TRUE_PROBABILITY_COLUMN, load_raw_splits
from ctrlab.data.processor import FeatureProcessor
from ctrlab.embeddings import EMBEDDINGS
from ctrlab.errors import DataError, RecipeError
from ctrlab.gates.optfs import OptFSConfig, OptFSGate
from ctrlab.models import build_model
from ctrlab.search.optfs import KeptFeatureSet, OptFSOutcome, kept_values, search_hooks, weights_without_gate
from ctrlab.train.optim import build_optimizers
from ctrlab.train.run import seed_everything, train_recipe
from ctrlab.train.trainer import Trainer
from embedding_search_recipe import (
    LAYOUT,
    embedding_floats,
    reload_matches_saved_predictions,
    synthetic_recipe,
    three_epochs_under_plateau,
    tiny_batch,
)

QUIET = Console(quiet=True)
D = 4
CSV_COLUMNS = ["field", "kind", "values_total", "values_kept", "kept_share", "kept_occurrence_share"]


def _embedding_config(kind: str = "per_field", **kw: Any):
    return EMBEDDINGS.get(kind).config(dim=D, init_std=0.5, **kw)


def _block_config():
    return BLOCKS.get("deepfm").config(mlp={"hidden": [8]}, linear=True)


def _gated_model(seed: int = 0, layout: FeatureLayout = LAYOUT, **gate: Any):
    """The DeepFM of these tests with an OptFS gate, built after ``seed``."""
    config = OptFSConfig(**gate)
    seed_everything(seed)
    return build_model(_embedding_config(), _block_config(), layout, gate=OptFSGate(config, layout)), config


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ------------------------------------------------------------------------------------------------ the gate
def test_a_fresh_gate_is_one_everywhere_and_the_gated_model_is_the_ungated_one() -> None:
    gated, _ = _gated_model(seed=7)
    gate = gated.gate
    assert gate.logits.shape == (9 + 5 + 1,)  # item 9 rows, user 5 rows, numeric x one row
    assert torch.equal(gate.logits.detach(), torch.full((15,), 0.5))
    assert torch.equal(gate.gates().detach(), torch.ones(15))  # exactly 1, not merely close
    # padding and OOV of both tables are not searched; every value and the numeric field are
    assert gate.searched.tolist() == [False, False] + [True] * 7 + [False, False] + [True] * 3 + [True]
    assert bool(gate.kept().all())
    seed_everything(7)
    plain = build_model(_embedding_config(), _block_config(), LAYOUT)
    assert gated.state_dict().keys() - plain.state_dict().keys() == {"gate.logits"}
    for key, value in plain.state_dict().items():
        assert torch.equal(value, gated.state_dict()[key]), key  # the gate draws nothing from the RNG
    batch = tiny_batch(32, seed=3)
    assert torch.equal(gated.eval()(batch), plain.eval()(batch))


def test_gated_vectors_by_hand_padding_and_oov_never_gated_sequences_gated_before_pooling() -> None:
    torch.manual_seed(0)
    embedding = EMBEDDINGS.build(_embedding_config(), LAYOUT)
    gate = OptFSGate(OptFSConfig(), LAYOUT)
    logits = torch.linspace(-2.0, 2.5, 15)
    logits[[0, 1, 9, 10]] = -7.0  # padding/OOV logits: must never matter
    with torch.no_grad():
        gate.logits.copy_(logits)
    gate.temperature = 3.0
    batch = tiny_batch(16, seed=5)
    batch.categorical[:3, 0] = OOV_ID  # some OOV ids in every table, a sequence's included
    batch.categorical[3:5, 1] = OOV_ID
    batch.sequences["hist"][4, 0] = OOV_ID
    out = gate(embedding(batch), batch)
    table = embedding.weight.detach()  # item rows 0-8, user rows 9-13
    x_vector = embedding.numeric_weight.detach()[0]

    def g(row: int, local_id: int) -> float:
        if local_id < 2:
            return 1.0
        return _sigmoid(3.0 * float(logits[row])) / _sigmoid(0.5)

    expected = torch.zeros(16, 4, D)
    for b in range(16):
        item, user = (int(v) for v in batch.categorical[b])
        expected[b, 0] = table[item] * g(item, item)
        expected[b, 1] = table[9 + user] * g(9 + user, user)
        expected[b, 2] = float(batch.numeric[b, 0]) * x_vector * (_sigmoid(3.0 * float(logits[14])) / _sigmoid(0.5))
        items = [int(i) for i in batch.sequences["hist"][b] if int(i) > 0]
        if items:  # mean over the real items of the gated vectors
            expected[b, 3] = sum(table[i] * g(i, i) for i in items) / len(items)
    torch.testing.assert_close(out.fields, expected, rtol=1e-5, atol=1e-6)
    assert torch.all(out.fields[0, 3] == 0)  # an empty history pools to zero
    # the unpooled sequence vectors are gated item by item, padding stays zero
    vectors, mask = out.sequences["hist"]
    ids = batch.sequences["hist"]
    for b in range(16):
        for j in range(4):
            want = table[int(ids[b, j])] * g(int(ids[b, j]), int(ids[b, j])) if ids[b, j] > 0 else torch.zeros(D)
            torch.testing.assert_close(vectors[b, j], want, rtol=1e-5, atol=1e-6)
    # the OOV id of either table keeps its vector untouched whatever its logit
    assert torch.equal(out.fields[:3, 0], table[OOV_ID].expand(3, D))
    assert torch.equal(out.fields[3:5, 1], table[9 + OOV_ID].expand(2, D))
    assert torch.equal(vectors[4, 0], table[OOV_ID])
    # the penalty is the sum of the searched values' gates only (11 of 15 rows), and padding/OOV get no gradient
    by_hand = sum(_sigmoid(3.0 * float(logits[r])) / _sigmoid(0.5) for r in range(15) if r not in (0, 1, 9, 10))
    penalty = gate.penalty()
    assert penalty.item() == pytest.approx(by_hand, rel=1e-6)
    penalty.backward()
    assert gate.logits.grad[[0, 1, 9, 10]].abs().sum() == 0 and bool((gate.logits.grad[2:9] > 0).all())
    # kept: logit > 0 for searched rows, always for padding/OOV
    assert gate.kept().tolist() == [True, True] + [bool(v > 0) for v in logits[2:9]] + [True, True] + \
        [bool(v > 0) for v in logits[11:]]


def test_the_gate_scales_the_first_order_term_too() -> None:
    gated, _ = _gated_model(seed=2)
    with torch.no_grad():
        gated.gate.logits.copy_(torch.linspace(-1, 1, 15))
        gated.bias.fill_(0.3)
    gated.gate.temperature = 5.0
    batch = tiny_batch(8, seed=4)
    gated.eval()
    block = gated.block(gated.gate(gated.embedding(batch), batch))
    linear = gated.gate(gated.linear(batch), batch).fields.sum(dim=(1, 2))
    torch.testing.assert_close(gated(batch), 0.3 + block + linear)
    # the first-order weights are gated value by value as the vectors are
    ungated_linear = gated.linear(batch).fields.sum(dim=(1, 2))
    assert not torch.allclose(linear, ungated_linear)


# ------------------------------------------------------------------------------------------------ config
def test_temperature_rises_geometrically_from_one_to_the_final_temperature() -> None:
    config = OptFSConfig(search_epochs=5, final_temperature=200.0)
    assert config.temperature(1) == 1.0
    assert config.temperature(3) == pytest.approx(200.0 ** 0.5)  # the middle epoch: sqrt(200) ~ 14.14
    assert config.temperature(2) == pytest.approx(200.0 ** 0.25)
    assert config.temperature(5) == pytest.approx(200.0)
    ratios = [config.temperature(e + 1) / config.temperature(e) for e in range(1, 5)]
    assert ratios == pytest.approx([200.0 ** 0.25] * 4)  # geometric: a constant factor per epoch
    assert OptFSConfig(search_epochs=1, final_temperature=50.0).temperature(1) == 50.0
    assert OptFSConfig(search_epochs=3, final_temperature=1.0).temperature(2) == 1.0


def test_gate_errors_are_one_line_recipe_errors_naming_the_key() -> None:
    base = {"name": "v", "dataset": {"synthetic": {"rows": 100}}, "model": {"block": "deepfm"}}
    cases = [
        ({"stages": ["search"]}, "gate.stages must end with retrain"),
        ({"search_epochs": 3, "rewind_epoch": 4}, "gate.rewind_epoch 4 is beyond gate.search_epochs 3"),
        ({"stages": ["retrain"]}, "gate.stages ['retrain'] skip search; set gate.from_run"),
        ({"stages": ["retrain", "search"]}, "gate.stages ['retrain', 'search'] must list distinct stages"),
        ({"from_run": "runs/x"}, "gate.from_run is set"),
        ({"sparsity_weight": -1}, "gate.sparsity_weight"),
        ({"final_temperature": 0.5}, "gate.final_temperature"),
        ({"gate_init": 0}, "gate.gate_init"),
    ]
    for gate, words in cases:
        with pytest.raises(RecipeError) as error:
            validate_recipe({**base, "gate": {"kind": "optfs", **gate}})
        message = str(error.value)
        assert words in message and "\n" not in message, (gate, message)
    ok = validate_recipe({**base, "gate": {"kind": "optfs", "stages": ["retrain"], "from_run": "runs/x"}})
    assert ok.gate.stages == ["retrain"] and ok.gate.from_run == "runs/x"
    default = validate_recipe({**base, "gate": {"kind": "optfs"}}).gate
    assert (default.stages, default.search_epochs, default.final_temperature, default.gate_init,
            default.rewind_epoch) == (["search", "retrain"], 10, 200.0, 0.5, 1)


# ------------------------------------------------------------------------------------------------ hooks
def test_gates_get_their_own_adam_without_weight_decay_and_the_loss_the_sparsity_term() -> None:
    model, config = _gated_model(seed=1, sparsity_weight=0.25, gate_lr=0.03)
    gate = model.gate
    hooks = search_hooks(gate, config)
    with pytest.raises(ValueError, match="gate.logits belong to no parameter group"):
        build_optimizers(model, OptimizerConfig())
    decayed = OptimizerConfig(embedding_weight_decay=0.1, dense_weight_decay=0.1)
    train = TrainConfig(progress=False, device="cpu", batch_size=4, optimizer=decayed)
    trainer = Trainer(model, train, torch.device("cpu"), hooks=hooks)
    model_params = {id(p) for opt in trainer.optimizers.optimizers for g in opt.param_groups for p in g["params"]}
    assert id(gate.logits) not in model_params and id(model.embedding.weight) in model_params
    ((group, optimizer),) = trainer.optimizers.groups
    assert group.name == "gates" and group.on_plateau is False and group.step == "train"
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.param_groups[0]["params"] == [gate.logits]
    assert optimizer.param_groups[0]["lr"] == 0.03 and optimizer.param_groups[0]["weight_decay"] == 0.0
    # the loss adds sparsity_weight x the sum of the searched gates
    gate.temperature = 2.0
    with torch.no_grad():
        gate.logits.copy_(torch.linspace(-1, 1, 15))
    model.eval()
    batch = tiny_batch()
    bce = F.binary_cross_entropy_with_logits(model(batch), batch.label)
    torch.testing.assert_close(trainer._loss(batch), bce + 0.25 * gate.penalty())
    assert trainer._loss(batch).item() != pytest.approx(bce.item())
    # without a sparsity weight there is no term
    assert search_hooks(gate, OptFSConfig(sparsity_weight=0.0)).loss_terms == []


def test_before_each_epoch_the_temperature_is_set_and_a_plateau_leaves_gate_lr_alone() -> None:
    model, config = _gated_model(seed=2, search_epochs=3, final_temperature=100.0, gate_lr=0.02)
    gate = model.gate
    before = gate.logits.detach().clone()
    seen = three_epochs_under_plateau(model, search_hooks(gate, config), lambda: gate.temperature,
                                      tiny_batch(32, seed=1), tiny_batch(16, seed=2))
    assert [s[0] for s in seen] == [1, 2, 3]
    assert [s[1] for s in seen] == pytest.approx([1.0, 10.0, 100.0])  # 100 ** ((epoch - 1) / 2)
    # the model's lr halves after epochs 1 and 2... (no improvement at epochs 2 and 3), the gates' never
    assert [s[2] for s in seen] == pytest.approx([0.01, 0.005, 0.0025])
    assert [s[3] for s in seen] == [0.02, 0.02, 0.02]
    assert not torch.equal(gate.logits.detach(), before)  # the gates did train


# ------------------------------------------------------------------------------------------------ kept values
def _frame() -> pl.DataFrame:
    return pl.DataFrame({
        "label": ["1", "0", "0", "1", "0", "1", "0"],
        "city": ["a", "b", "a", "c", "b", "a", None],
        "price": ["1", "10", "", "100", "1000", "3", "7"],
        "item": ["x", "y", "x", "z", "x", "y", "w"],
        "hist": ["x|y", "", "z|z", "y", None, "q", "x"],
    })


def _processor() -> FeatureProcessor:
    features = FeaturesConfig.model_validate({
        "categorical": ["city", "item"], "numeric": [{"name": "price", "transform": "log"}],
        "sequence": [{"name": "hist", "share_vocab_with": "item", "max_len": 3}]})
    return FeatureProcessor(features, "label").fit(_frame())


# city: a x3, b x2, then __null__ and c once each -> ids a 2, b 3, __null__ 4, c 5 (6 rows)
# item (with hist's tokens): x 5, y 4, z 3, q 1, w 1 -> ids x 2, y 3, z 4, q 5, w 6 (7 rows)
KEPT = KeptValues({"city": np.array([1, 1, 1, 0, 0, 1], bool),      # keep a, c
                   "item": np.array([0, 0, 0, 1, 0, 1, 0], bool)},   # keep y, q (padding/OOV forced kept)
                  {"price": False})
PROBE = pl.DataFrame({"label": ["0"] * 5, "city": ["b", "unseen", "a", "c", None],
                      "price": ["5", "", "1", "2", "3"], "item": ["x", "y", "q", "w", "never"],
                      "hist": ["x|y|q", "z", "", "q|q|w|y", "never|y"]})


def test_a_restricted_processor_encodes_dropped_values_as_oov_and_renumbers_kept_ones_densely() -> None:
    processor = _processor()
    assert processor.vocabularies["city"].values == ["a", "b", "__null__", "c"]
    assert processor.vocabularies["item"].values == ["x", "y", "z", "q", "w"]
    full = processor.transform(PROBE)
    assert full.categorical[:, 0].tolist() == [3, 1, 2, 5, 4] and full.categorical[:, 1].tolist() == [2, 3, 5, 6, 1]
    assert KEPT.tables["item"][:2].all()  # padding and OOV are always kept
    processor.restrict(KEPT)
    out = processor.transform(PROBE)
    # city: b and __null__ dropped -> OOV like "unseen"; a stays 2, c becomes 3
    assert out.categorical[:, 0].tolist() == [1, 1, 2, 3, 1]
    # item: y -> 2, q -> 3, x / w dropped and "never" unseen -> OOV
    assert out.categorical[:, 1].tolist() == [1, 2, 3, 1, 1]
    # the history shares item's (restricted) table; padding stays 0, the last max_len (3) tokens are kept
    assert out.sequences["hist"].tolist() == [[1, 2, 3], [1, 0, 0], [0, 0, 0], [3, 1, 2], [1, 2, 0]]
    assert out.numeric[:, 0].tolist() == [0.0] * 5  # a dropped numeric field encodes as 0
    # a dropped value encodes exactly like an unseen one
    dropped = processor.transform(PROBE.with_columns(pl.lit("b").alias("city"), pl.lit("x").alias("item")))
    unseen = processor.transform(PROBE.with_columns(pl.lit("zzz").alias("city"), pl.lit("zzz").alias("item")))
    assert np.array_equal(dropped.categorical, unseen.categorical)
    # the layout reports the kept rows (+ padding and OOV); the full layout is unchanged
    assert processor.full_layout.tables() == {"city": 6, "item": 7}
    assert processor.layout.tables() == {"city": 4, "item": 4}
    assert [f.vocab_size for f in processor.layout.fields] == [4, 4, 0, 4]  # city, item, price (numeric), hist
    # the tensor path that training uses gives the same ids as the processor that serving uses
    restricted = KEPT.apply_to_batch(FeatureBatch.from_encoded(full), processor.full_layout)
    assert torch.equal(restricted.categorical, torch.from_numpy(out.categorical.astype(np.int64)))
    assert torch.equal(restricted.sequences["hist"], torch.from_numpy(out.sequences["hist"].astype(np.int64)))
    assert torch.equal(restricted.numeric, torch.from_numpy(out.numeric))
    with pytest.raises(ValueError, match="already keeps"):
        processor.restrict(KEPT)


def test_the_restriction_round_trips_through_to_dict_and_the_processor_file(tmp_path: Path) -> None:
    processor = _processor()
    processor.restrict(KEPT)
    state = processor.to_dict()
    assert state["kept"] == {"tables": {"city": {"ids": 6, "kept": [2, 5]}, "item": {"ids": 7, "kept": [3, 5]}},
                             "numeric": {"price": False}}
    assert FeatureLayout.from_dict(state["layout"]).tables() == {"city": 4, "item": 4}
    again = FeatureProcessor.from_dict(json.loads(json.dumps(state)))
    processor.save(tmp_path / "processor.json")
    loaded = FeatureProcessor.load(tmp_path / "processor.json")
    expected = processor.transform(PROBE)
    for other in (again, loaded):
        assert other.layout == processor.layout and other.full_layout == processor.full_layout
        assert other.to_dict() == state
        out = other.transform(PROBE)
        assert np.array_equal(out.categorical, expected.categorical)
        assert np.array_equal(out.numeric, expected.numeric)
        assert np.array_equal(out.sequences["hist"], expected.sequences["hist"])
    # an unrestricted processor writes no "kept" and reads back unrestricted
    plain = _processor()
    assert "kept" not in plain.to_dict() and FeatureProcessor.from_dict(plain.to_dict()).kept is None


def test_a_kept_set_that_does_not_fit_the_tables_is_an_error(tmp_path: Path) -> None:
    processor = _processor()
    with pytest.raises(ValueError, match="kept values of table 'city' cover 5 ids, the table has 6"):
        processor.restrict(KeptValues({"city": np.ones(5, bool)}))
    assert processor.kept is None  # a refused restriction leaves the processor as it was
    with pytest.raises(ValueError, match=r"kept ids of table 'city' outside 2\.\.5"):
        KeptValues.from_dict({"tables": {"city": {"ids": 6, "kept": [2, 6]}}})
    with pytest.raises(ValueError, match="at least 2 ids"):
        KeptValues({"city": np.ones(1, bool)})
    # a processor file whose kept set does not fit is a DataError naming the file
    processor.restrict(KEPT)
    state = processor.to_dict()
    state["kept"]["tables"]["item"]["ids"] = 9
    (tmp_path / "processor.json").write_text(json.dumps(state))
    with pytest.raises(DataError, match="processor.json"):
        FeatureProcessor.load(tmp_path / "processor.json")
    # and so is a kept feature set read back for a search's retrain
    (tmp_path / "kept_values.json").write_text(json.dumps(state["kept"]))
    with pytest.raises(DataError, match="kept_values.json: not a kept feature set"):
        KeptFeatureSet.load_kept(tmp_path / "kept_values.json", processor.full_layout)


def test_a_kept_set_naming_a_table_or_field_the_features_lack_is_an_error() -> None:
    processor = _processor()
    stranger = KeptValues({"city": np.ones(6, bool), "country": np.array([1, 1, 0, 1], bool)}, {"weight": False})
    with pytest.raises(ValueError, match="kept values name 'country', 'weight', which the features do not have"):
        processor.restrict(stranger)
    assert processor.kept is None


# ------------------------------------------------------------------------------------------------ rewind rows
ITEM_MASK = np.array([1, 1, 0, 1, 0, 0, 1, 1, 0], bool)  # keep item ids 3, 6, 7
USER_MASK = np.array([1, 1, 1, 0, 1], bool)              # keep user ids 2, 4
LAYOUT_KEPT = KeptValues({"item": ITEM_MASK, "user": USER_MASK})


def test_load_kept_rows_copies_exactly_the_kept_rows_and_the_numeric_vectors() -> None:
    restricted = LAYOUT_KEPT.restrict_layout(LAYOUT)
    assert restricted.tables() == {"item": 5, "user": 4}
    torch.manual_seed(0)
    source = EMBEDDINGS.build(_embedding_config(), LAYOUT)
    torch.manual_seed(1)
    target = EMBEDDINGS.build(_embedding_config(), restricted)
    assert target.weight.shape == (9, D)  # 5 + 4 rows
    assert target.load_kept_rows(source, LAYOUT_KEPT) is True
    weight = source.weight.detach()
    torch.testing.assert_close(target.weight[:5], weight[[0, 1, 3, 6, 7]], rtol=0, atol=0)
    torch.testing.assert_close(target.weight[5:], weight[9 + np.array([0, 1, 2, 4])], rtol=0, atol=0)
    assert torch.equal(target.numeric_weight, source.numeric_weight)
    # so the restricted embedding of the restricted batch is the source's embedding of the batch with every
    # dropped id replaced by OOV
    batch = tiny_batch(32, seed=6)
    oov = FeatureBatch(batch.categorical.clone(), batch.numeric, {"hist": batch.sequences["hist"].clone()},
                       batch.label)
    oov.categorical[:, 0][~torch.from_numpy(ITEM_MASK)[oov.categorical[:, 0]]] = OOV_ID
    oov.categorical[:, 1][~torch.from_numpy(USER_MASK)[oov.categorical[:, 1]]] = OOV_ID
    hist = oov.sequences["hist"]
    hist[~torch.from_numpy(ITEM_MASK)[hist]] = OOV_ID
    assert torch.equal(target(LAYOUT_KEPT.apply_to_batch(batch, LAYOUT)).fields, source(oov).fields)


def test_a_hashed_table_keeps_its_own_values() -> None:
    restricted = LAYOUT_KEPT.restrict_layout(LAYOUT)
    torch.manual_seed(0)
    source = EMBEDDINGS.build(_embedding_config("hashed", rows=6), LAYOUT)
    torch.manual_seed(1)
    target = EMBEDDINGS.build(_embedding_config("hashed", rows=6), restricted)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    assert target.value_tables() is None
    assert target.load_kept_rows(source, LAYOUT_KEPT) is False
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
    # and a per-field table cannot take rows from a hashed one either
    plain = EMBEDDINGS.build(_embedding_config(), restricted)
    assert plain.load_kept_rows(source, LAYOUT_KEPT) is False


def test_the_outcome_rewinds_the_final_model_to_the_searched_weights_of_the_kept_values() -> None:
    searched, config = _gated_model(seed=5)
    with torch.no_grad():
        searched.gate.logits.copy_(torch.tensor(np.concatenate([ITEM_MASK, USER_MASK, [True]]), dtype=torch.float)
                                   * 2 - 1)
    kept = kept_values(searched.gate.kept(), LAYOUT)
    assert [kept.tables[t].tolist() for t in ("item", "user")] == [ITEM_MASK.tolist(), USER_MASK.tolist()]
    assert kept.numeric == {"x": True}
    rewind = weights_without_gate(searched)
    assert not any(k.startswith("gate.") for k in rewind)
    restricted = kept.restrict_layout(LAYOUT)
    seed_everything(9)  # other initial values: everything must come from the rewound weights
    final = build_model(_embedding_config(), _block_config(), restricted)
    outcome = OptFSOutcome(KeptFeatureSet(kept, []), retrain=True, full_layout=LAYOUT, rewind=rewind,
                           build_source=lambda: build_model(_embedding_config(), _block_config(), LAYOUT,
                                                            gate=OptFSGate(config, LAYOUT)))
    outcome.prepare_model(final)
    assert outcome.summary["rewind"] == {"embedding": "rewound rows", "linear": "rewound rows"}
    for name, value in final.state_dict().items():
        if not name.startswith(("embedding.", "linear.")):
            assert torch.equal(value, rewind[name]), name
    # the final model on the restricted data scores as the searched (ungated) model with dropped values as OOV
    searched.gate = None
    batch = tiny_batch(32, seed=8)
    oov = FeatureBatch(batch.categorical.clone(), batch.numeric, {"hist": batch.sequences["hist"].clone()})
    oov.categorical[:, 0][~torch.from_numpy(ITEM_MASK)[oov.categorical[:, 0]]] = OOV_ID
    oov.categorical[:, 1][~torch.from_numpy(USER_MASK)[oov.categorical[:, 1]]] = OOV_ID
    oov.sequences["hist"][~torch.from_numpy(ITEM_MASK)[oov.sequences["hist"]]] = OOV_ID
    assert torch.equal(final.eval()(kept.apply_to_batch(batch, LAYOUT)), searched.eval()(oov))
    # A model changed since the search (a later pipeline stage): what fits is rewound, the rest starts from the
    # recipe's initial values, and the summary names it.
    wider = {**{k: v for k, v in rewind.items() if not k.startswith("embedding.")}, "nonsense.weight": torch.zeros(1),
             **{k: torch.cat([v, v], dim=-1) for k, v in rewind.items() if k.startswith("embedding.")}}
    seed_everything(9)
    other = build_model(_embedding_config(), _block_config(), restricted)
    initial = {k: v.clone() for k, v in other.state_dict().items()}
    changed = OptFSOutcome(KeptFeatureSet(kept, []), retrain=True, full_layout=LAYOUT, rewind=wider,
                           build_source=outcome.build_source)
    changed.prepare_model(other)
    fresh = changed.summary["rewind"]["initial values (the model changed since the search)"]
    assert "nonsense.weight" in fresh and "embedding." in fresh
    assert changed.summary["rewind"]["embedding"] == "initial values"
    assert changed.summary["rewind"]["linear"] == "rewound rows"
    for name, value in other.state_dict().items():
        if name.startswith("embedding."):
            assert torch.equal(value, initial[name]), name
        elif not name.startswith("linear."):
            assert torch.equal(value, rewind[name]), name


# ------------------------------------------------------------------------------------------------ runs
GATE = {"kind": "optfs", "search_epochs": 2, "sparsity_weight": 1e-5, "gate_lr": 0.05, "final_temperature": 50.0}
SERVE_NAME = "optfs_serve"


def _recipe(root: Path, name: str, gate: dict[str, Any] | None) -> Any:
    raw = synthetic_recipe(root / name, {}, epochs=2)
    if gate is not None:
        raw["gate"] = gate
    return validate_recipe(raw)


def _predictions(run_dir: Path) -> np.ndarray:
    return pl.read_parquet(run_dir / "test_predictions.parquet")["probability"].to_numpy()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory):
    """The OptFS run (searched and retrained) and an ungated run of the same recipe."""
    root = tmp_path_factory.mktemp("optfs")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CTRLAB_CACHE_DIR", str(root / "cache"))
        recipe = _recipe(root, "optfs", GATE)
        result = train_recipe(recipe, console=QUIET)
        plain = train_recipe(_recipe(root, "plain", None), console=QUIET)
        yield root, recipe, result, plain


def test_an_optfs_run_writes_its_feature_search_files_and_figures(runs) -> None:
    _, recipe, result, _ = runs
    out = result.output_dir / "feature_search"
    assert sorted(p.name for p in out.iterdir()) == ["gates.safetensors", "kept_features.csv", "kept_features.png",
                                                     "kept_values.json", "rewind.safetensors"]
    assert (out / "kept_features.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((result.output_dir / "metrics.json").read_text())
    found = metrics["feature_search"]
    assert found["method"] == "optfs" and found["stages"] == ["search", "retrain"] and found["from_run"] is None
    assert found["rewind"] == {"embedding": "rewound rows", "linear": "rewound rows"}
    assert found["search"]["epochs_run"] == 2 and len(metrics["history"]) == 2
    assert metrics["test"]["auc"] > 0.65
    kept = json.loads((out / "kept_values.json").read_text())
    processor = json.loads((result.output_dir / "processor.json").read_text())
    assert processor["kept"] == kept  # serving applies the same kept set
    vocabularies = processor["vocabularies"]
    # the kept set by hand: per table its size, kept ids; kept share over tables and numeric fields
    tables = kept["tables"]
    assert set(tables) == {"C1", "C2", "C3", "C4", "C5", "C6", "I2"} and set(kept["numeric"]) == {"I1"}
    for name, entry in tables.items():
        size = len(vocabularies[name]) + 2 if name != "I2" else len(processor["numeric_stats"]["I2"]["edges"]) + 3
        assert entry["ids"] == size and all(2 <= i < size for i in entry["kept"])
        assert entry["kept"] == sorted(set(entry["kept"]))
    values_total = sum(e["ids"] - 2 for e in tables.values()) + len(kept["numeric"])
    values_kept = sum(len(e["kept"]) for e in tables.values()) + sum(kept["numeric"].values())
    assert (found["values_total"], found["values_kept"]) == (values_total, values_kept)
    assert found["kept_share"] == pytest.approx(values_kept / values_total)
    assert 0.02 < found["kept_share"] < 0.5  # this sparsity weight drops most values, but not all
    # the CSV: documented columns, one row per field, figures from the kept set and the training split
    with (out / "kept_features.csv").open() as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == CSV_COLUMNS
        rows = {r["field"]: r for r in reader}
    assert list(rows) == ["C1", "C2", "C3", "C4", "C5", "C6", "I2", "I1"]
    full = FeatureProcessor.from_dict({k: v for k, v in processor.items() if k != "kept"})
    train = full.transform(load_raw_splits(recipe.dataset, recipe.seed).frames["train"])
    for i, spec in enumerate(full.full_layout.categorical):
        row, entry = rows[spec.name], tables[spec.name]
        assert row["kind"] == "categorical"
        assert (int(row["values_total"]), int(row["values_kept"])) == (entry["ids"] - 2, len(entry["kept"]))
        assert float(row["kept_share"]) == pytest.approx(len(entry["kept"]) / (entry["ids"] - 2), abs=1e-6)
        ids = train.categorical[:, i]
        seen = ids[ids >= 2]
        share = np.isin(seen, entry["kept"]).mean()
        assert float(row["kept_occurrence_share"]) == pytest.approx(share, abs=1e-6), spec.name
        assert found["fields"][spec.name]["kept_occurrence_share"] == pytest.approx(share)
    assert rows["I1"]["kind"] == "numeric" and int(rows["I1"]["values_total"]) == 1
    assert int(rows["I1"]["values_kept"]) == int(kept["numeric"]["I1"])
    # the gates saved are the search's last logits: kept <=> logit > 0 (padding/OOV aside)
    logits = load_file(str(out / "gates.safetensors"))["logits"]
    assert logits.shape == (sum(e["ids"] for e in tables.values()) + 1,)
    start = 0
    for spec in full.full_layout.categorical:
        entry = tables[spec.name]
        positive = (torch.nonzero(logits[start + 2:start + entry["ids"]] > 0).flatten() + 2).tolist()
        assert positive == entry["kept"], spec.name
        start += entry["ids"]
    assert bool(logits[start] > 0) == kept["numeric"]["I1"]
    # the rewound weights are the full (unrestricted) model without the gate
    rewind = load_file(str(out / "rewind.safetensors"))
    assert not any(k.startswith("gate.") for k in rewind)
    assert rewind["embedding.weight"].shape == (sum(e["ids"] for e in tables.values()), 8)


def test_an_optfs_run_stores_only_the_kept_rows_and_reloads_to_the_same_predictions(runs) -> None:
    _, recipe, result, plain = runs
    processor = json.loads((result.output_dir / "processor.json").read_text())
    layout = FeatureLayout.from_dict(processor["layout"])
    kept = processor["kept"]
    rows = sum(layout.tables().values())
    # every table: its kept values + padding + OOV
    assert layout.tables() == {name: len(entry["kept"]) + 2 for name, entry in kept["tables"].items()}
    dim = 8
    expected = (rows + len(layout.numeric)) * dim
    assert result.metrics["embedding_parameters"] == expected
    assert result.metrics["embedding_bytes"] == 4 * expected
    assert embedding_floats(result.output_dir / "model.safetensors") == expected
    full = FeatureLayout.from_dict(json.loads((plain.output_dir / "processor.json").read_text())["layout"])
    assert plain.metrics["embedding_parameters"] == (sum(full.tables().values()) + len(full.numeric)) * dim
    assert FeatureProcessor.load(result.output_dir / "processor.json").full_layout == full
    assert result.metrics["embedding_parameters"] < 0.5 * plain.metrics["embedding_parameters"]
    reload_matches_saved_predictions(result.output_dir, recipe)


def test_a_larger_sparsity_weight_keeps_fewer_values(runs) -> None:
    root, _, result, _ = runs
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CTRLAB_CACHE_DIR", str(root / "cache"))
        sparser = train_recipe(_recipe(root, "sparser", {**GATE, "sparsity_weight": 1e-4}), console=QUIET)
    small, large = result.metrics["feature_search"], sparser.metrics["feature_search"]
    assert large["values_total"] == small["values_total"]
    assert 0 < large["values_kept"] < small["values_kept"]
    assert sparser.metrics["embedding_parameters"] < result.metrics["embedding_parameters"]


def test_a_retrain_from_an_earlier_search_reproduces_its_predictions(runs) -> None:
    root, recipe, result, _ = runs
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CTRLAB_CACHE_DIR", str(root / "cache"))
        again = train_recipe(_recipe(root, "retrained", {**GATE, "stages": ["retrain"],
                                                          "from_run": str(result.output_dir)}), console=QUIET)
    out = again.output_dir / "feature_search"
    assert sorted(p.name for p in out.iterdir()) == ["kept_features.csv", "kept_features.png", "kept_values.json",
                                                     "rewind.safetensors"]
    first = result.output_dir / "feature_search"
    for name in ("kept_values.json", "kept_features.csv", "rewind.safetensors"):
        assert (out / name).read_bytes() == (first / name).read_bytes(), name
    assert again.metrics["feature_search"]["stages"] == ["retrain"]
    assert again.metrics["feature_search"]["from_run"] == str(result.output_dir)
    assert "search" not in again.metrics["feature_search"]
    assert again.metrics["embedding_parameters"] == result.metrics["embedding_parameters"]
    assert np.array_equal(_predictions(again.output_dir), _predictions(result.output_dir))
    reload_matches_saved_predictions(again.output_dir, recipe)


def test_a_retrain_from_a_run_without_a_search_is_a_data_error(runs, tmp_path: Path) -> None:
    root, _, _, plain = runs
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CTRLAB_CACHE_DIR", str(root / "cache"))
        with pytest.raises(DataError, match="feature_search/kept_values.json: not found"):
            train_recipe(_recipe(tmp_path, "nowhere", {**GATE, "stages": ["retrain"],
                                                        "from_run": str(plain.output_dir)}), console=QUIET)
    assert not (tmp_path / "nowhere").exists()


def test_a_retrain_whose_model_changed_since_the_search_rewinds_what_fits_and_names_the_rest(runs,
                                                                                              tmp_path: Path) -> None:
    """A "[retrain] with gate.from_run" under other shapes (a pipeline's later stage widened the table): the kept
    feature set still applies; the weights that no longer fit start from the recipe's initial values, and the
    run's summary says which."""
    root, _, result, _ = runs
    raw = synthetic_recipe(tmp_path / "wider", {"dim": 16}, epochs=2)
    raw["gate"] = {**GATE, "stages": ["retrain"], "from_run": str(result.output_dir)}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CTRLAB_CACHE_DIR", str(root / "cache"))
        wider = train_recipe(validate_recipe(raw), console=QUIET)
    found = wider.metrics["feature_search"]
    assert found["values_kept"] == result.metrics["feature_search"]["values_kept"]
    assert found["rewind"]["embedding"] == "initial values"
    assert "embedding." in found["rewind"]["initial values (the model changed since the search)"]
    assert wider.metrics["test"]["auc"] > 0.6


def test_a_hashed_table_retrains_from_its_initial_values_and_reloads(runs) -> None:
    root, _, _, _ = runs
    raw = synthetic_recipe(root / "hashed", {"kind": "hashed", "rows": 500}, epochs=2)
    raw["gate"] = GATE
    recipe = validate_recipe(raw)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CTRLAB_CACHE_DIR", str(root / "cache"))
        hashed = train_recipe(recipe, console=QUIET)
    found = hashed.metrics["feature_search"]
    assert found["rewind"] == {"embedding": "initial values", "linear": "initial values"}
    assert 0 < found["values_kept"] < found["values_total"]
    assert hashed.metrics["test"]["auc"] > 0.6
    reload_matches_saved_predictions(hashed.output_dir, recipe)


# ------------------------------------------------------------------------------------------------ serving
def _dropped_values(run_dir: Path) -> dict[str, list[str]]:
    """Per categorical field, the raw strings that are in the fitted vocabulary but not in the kept set."""
    processor = json.loads((run_dir / "processor.json").read_text())
    kept = json.loads((run_dir / "feature_search" / "kept_values.json").read_text())
    dropped = {}
    for name, entry in kept["tables"].items():
        if name in processor["vocabularies"]:
            values = processor["vocabularies"][name]
            keep = set(entry["kept"])
            dropped[name] = [v for i, v in enumerate(values) if i + 2 not in keep]
    return dropped


def test_a_served_optfs_model_scores_dropped_values_as_unseen_ones(runs) -> None:
    mlflow = pytest.importorskip("mlflow")
    from ctrlab.serve import Predictor
    from ctrlab.serve.registry import register_run
    from ctrlab.serve.server import serve_registered

    root, recipe, result, _ = runs
    uri = f"sqlite:///{root / 'mlflow.db'}"
    register_run(str(result.output_dir), SERVE_NAME, alias="champion", tracking_uri=uri)
    assert str(mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_by_alias(
        SERVE_NAME, "champion").version) == "1"
    predictor = Predictor.from_run(result.output_dir)
    columns = predictor.input_columns
    test = load_raw_splits(recipe.dataset, recipe.seed).frames["test"].drop(["label", TRUE_PROBABILITY_COLUMN])
    dropped = _dropped_values(result.output_dir)
    # rows whose C4 (200 values, most dropped) value was in the vocabulary and then dropped
    rows = test.filter(pl.col("C4").is_in(dropped["C4"])).head(40).select(columns)
    assert rows.height == 40
    state = json.loads((result.output_dir / "processor.json").read_text())
    unrestricted = FeatureProcessor.from_dict({k: v for k, v in state.items() if k != "kept"})
    c4 = columns.index("C4")
    assert (unrestricted.transform(rows, with_label=False).categorical[:, c4] >= 2).all()  # seen in training
    replaced = rows.with_columns(pl.lit("C4_never_seen").alias("C4"))
    in_process = predictor.predict(rows)
    assert np.array_equal(in_process, predictor.predict(replaced))  # a dropped value is OOV
    encoded = predictor.processor.transform(rows, with_label=False)
    assert (encoded.categorical[:, c4] == OOV_ID).all()
    # the run's own saved test predictions agree with the predictor for these rows
    index = test.with_row_index("row").filter(pl.col("C4").is_in(dropped["C4"])).head(40)["row"].to_numpy()
    assert np.array_equal(_predictions(result.output_dir)[index], in_process)
    # rows with a dropped value in every field that has any, mixed with untouched rows
    mixed = test.head(30).select(columns).with_columns(
        *(pl.when(pl.int_range(pl.len()) % 2 == 0).then(pl.lit(values[0])).otherwise(pl.col(name)).alias(name)
          for name, values in dropped.items() if values and name in columns))
    with serve_registered(SERVE_NAME, "champion", tracking_uri=uri) as server:
        for frame in (rows, replaced, mixed):
            status, reply = server.predict_records(frame.to_dicts())
            assert status == 200, reply
            served = np.array([p["probability"] for p in reply["predictions"]])
            np.testing.assert_allclose(served, predictor.predict(frame), rtol=0, atol=1e-12)
        status, dropped_reply = server.predict_records(rows.to_dicts())
        status2, unseen_reply = server.predict_records(replaced.to_dicts())
        assert status == status2 == 200 and dropped_reply == unseen_reply

