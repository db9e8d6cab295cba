"""OptInter (Lyu et al. 2022, "Memorize, Factorize, or be Naive"): the pair vectors by hand, a one-hot mixture is
exactly the single-method layer (and model), naive pairs are dropped, the temperature schedule, alpha's own
optimiser (one-level and bi-level), short runs on generated data with planted pair kinds (the written files, the
pair layer's size, reloads, a retrain from an earlier search, the uniform architectures), the blocks that cannot take
pair vectors, and serving a registered OptInter model over HTTP."""

from __future__ import annotations

import copy
import csv
import io
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from safetensors.torch import load_file

from ctrlab.blocks import BLOCKS
from ctrlab.config.loader import validate_recipe
from ctrlab.config.train import OptimizerConfig, TrainConfig
from ctrlab.data.batches import FeatureBatch
from ctrlab.data.layout import OOV_ID, CrossSpec, FeatureLayout, FieldSpec
from ctrlab.data.pipeline import TRUE_PROBABILITY_COLUMN, load_raw_splits
from ctrlab.data.processor import FeatureProcessor
from ctrlab.embeddings import EMBEDDINGS
from ctrlab.embeddings.base import EmbeddingOutput
from ctrlab.errors import DataError, RecipeError
from ctrlab.interactions import INTERACTIONS
from ctrlab.interactions.base import PairVectors
from ctrlab.interactions.optinter import OptInterConfig, PairMixture, decided_pairs
from ctrlab.models import build_model
from ctrlab.search import optinter as optinter_search
from ctrlab.search.optinter import search_hooks
from ctrlab.train.optim import build_optimizers
from ctrlab.train.run import seed_everything, train_recipe
from ctrlab.train.trainer import Trainer
from embedding_search_recipe import reload_matches_saved_predictions, synthetic_recipe, three_epochs_under_plateau

QUIET = Console(quiet=True)
D = 4
METHODS = ["memorize", "factorize", "naive"]

# three categorical fields and a numeric one; three crosses (a:c hashed)
FIELDS = (FieldSpec("a", "categorical", 6, "a"), FieldSpec("b", "categorical", 5, "b"),
          FieldSpec("c", "categorical", 4, "c"), FieldSpec("x", "numeric"))
CROSSES = (CrossSpec("a:b", "a", "b", 10), CrossSpec("a:c", "a", "c", 7, hashed=True), CrossSpec("b:c", "b", "c", 5))
LAYOUT = FeatureLayout(FIELDS, CROSSES)


def _batch(n: int = 16, seed: int = 1, flip: bool = False) -> FeatureBatch:
    g = torch.Generator().manual_seed(seed)
    categorical = torch.stack([torch.randint(1, size, (n,), generator=g) for size in (6, 5, 4)], 1)
    crosses = torch.stack([torch.randint(1, rows, (n,), generator=g) for rows in (10, 7, 5)], 1)
    label = (torch.rand(n, generator=g) < 0.4).float()
    return FeatureBatch(categorical, torch.randn(n, 1, generator=g), {}, 1 - label if flip else label,
                        crosses=crosses)


def _embedding_config():
    return EMBEDDINGS.get("per_field").config(dim=D, init_std=0.5)


def _block_config(block: str = "deepfm"):
    return BLOCKS.get(block).config(mlp={"hidden": [8]}, **({"linear": True} if block == "deepfm" else {}))


def _mixture(layout: FeatureLayout, dim: int, init_std: float) -> PairMixture:
    return PairMixture(layout, dim, init_std)


def _mixture_model(seed: int = 0, block: str = "deepfm"):
    seed_everything(seed)
    return build_model(_embedding_config(), _block_config(block), LAYOUT, interaction=_mixture)


def _uniform(method: str):
    return INTERACTIONS.get("pairs").config(method=method)


def _one_hot(mixture: PairMixture, method: int) -> None:
    """alpha = the method's one-hot row for every pair, at a temperature where softmax gives exactly 1 and 0."""
    with torch.no_grad():
        mixture.alpha.zero_()
        mixture.alpha[:, method] = 1.0
    mixture.temperature = 1e-3


# ------------------------------------------------------------------------------------------------ pair vectors
def test_pair_vectors_by_hand_memorised_first_naive_pairs_left_out() -> None:
    torch.manual_seed(0)
    layer = PairVectors(LAYOUT, D, 0.5, ["factorize", "naive", "memorize"])
    assert layer.extra_fields == 2 and layer.pair_names == ["b:c", "a:b"]  # memorised first, then factorised
    assert layer.memorized is not None and layer.memorized.weight.shape == (5, D)  # b:c's 5 ids only
    assert layer.factors is not None and layer.factors.weight.shape == (6 + 5, D)  # a and b, c is in no such pair
    assert layer.stored_parameters() == (5 + 11) * D
    assert [p.shape for p in layer.table_parameters()] == [(5, D), (11, D)]
    batch = _batch()
    vectors = layer.pair_vectors(batch)
    assert vectors.shape == (16, 2, D)
    memorized, factors = layer.memorized.weight.detach(), layer.factors.weight.detach()
    for row in range(16):
        a, b, _ = (int(v) for v in batch.categorical[row])
        assert torch.equal(vectors[row, 0], memorized[int(batch.crosses[row, 2])])
        assert torch.equal(vectors[row, 1], factors[a] * factors[6 + b])
    # the layer appends them to the field vectors
    fields = torch.randn(16, 4, D)
    out = layer(EmbeddingOutput(fields, {}), batch)
    assert out.fields.shape == (16, 6, D) and torch.equal(out.fields[:, :4], fields)
    assert torch.equal(out.fields[:, 4:], vectors)
    # every pair naive: no vectors, no parameters, the input unchanged
    naive = PairVectors(LAYOUT, D, 0.5, ["naive"] * 3)
    assert naive.extra_fields == 0 and naive.stored_parameters() == 0 and naive.table_parameters() == []
    given = EmbeddingOutput(fields, {})
    assert naive(given, batch) is given
    # memorise and naive only: one table over the memorised pairs' ids, no factor table
    mixed = PairVectors(LAYOUT, D, 0.5, ["memorize", "naive", "memorize"])
    assert mixed.extra_fields == 2 and mixed.factors is None and mixed.memorized.rows == [10, 5]
    assert mixed.stored_parameters() == 15 * D
    assert torch.equal(mixed.pair_vectors(batch)[:, 1], mixed.memorized.weight[10 + batch.crosses[:, 2]])
    with pytest.raises(ValueError, match="2 pair methods for 3 crosses"):
        PairVectors(LAYOUT, D, 0.5, ["memorize", "naive"])
    with pytest.raises(ValueError, match="pair method 'hash' is not one of memorize, factorize, naive"):
        PairVectors(LAYOUT, D, 0.5, ["memorize", "hash", "naive"])


def test_a_fresh_mixture_weights_every_method_equally_and_gumbel_noise_only_in_training() -> None:
    torch.manual_seed(0)
    mixture = PairMixture(LAYOUT, D, 0.5)
    assert mixture.extra_fields == 3 and mixture.architecture_parameters() == [mixture.alpha]
    assert torch.equal(mixture.alpha.detach(), torch.zeros(3, 3))
    torch.testing.assert_close(mixture.weights(), torch.full((3, 3), 1 / 3))
    batch = _batch()
    by_hand = (mixture.memorize.pair_vectors(batch) + mixture.factorize.pair_vectors(batch)) / 3
    torch.testing.assert_close(mixture.pair_vectors(batch), by_hand)
    assert mixture.choices() == {"a:b": "memorize", "a:c": "memorize", "b:c": "memorize"}  # ties: memorize
    with torch.no_grad():
        mixture.alpha.copy_(torch.tensor([[0.0, 0.2, 0.1], [0.3, 0.0, 0.4], [0.5, 0.6, 0.0]]))
    assert mixture.choices() == {"a:b": "factorize", "a:c": "naive", "b:c": "factorize"}
    mixture.temperature = 0.5
    torch.testing.assert_close(mixture.weights(), F.softmax(mixture.alpha.detach() / 0.5, dim=1))
    # stored: every pair's table and the factor tables, never alpha
    assert mixture.stored_parameters() == (10 + 7 + 5) * D + (6 + 5 + 4) * D
    noisy = PairMixture(LAYOUT, D, 0.5, gumbel=True)
    noisy.train()
    assert not torch.equal(noisy.weights(), noisy.weights())
    noisy.eval()
    assert torch.equal(noisy.weights(), torch.full((3, 3), 1 / 3))


def test_a_one_hot_mixture_gives_exactly_the_single_method_vectors() -> None:
    torch.manual_seed(0)
    mixture = PairMixture(LAYOUT, D, 0.5)
    batch = _batch(32, seed=2)
    for k, method in enumerate(METHODS):
        _one_hot(mixture, k)
        weights = mixture.weights()
        assert torch.equal(weights, F.one_hot(torch.full((3,), k), 3).float())  # exactly one-hot
        torch.manual_seed(9)  # other initial values: the vectors must come from the copied tables
        single = PairVectors(LAYOUT, D, 0.5, [method] * 3)
        if method == "naive":
            assert torch.equal(mixture.pair_vectors(batch), torch.zeros(32, 3, D))
            continue
        source = mixture.memorize if method == "memorize" else mixture.factorize
        assert not torch.equal(single.pair_vectors(batch), source.pair_vectors(batch))
        single.load_state_dict(source.state_dict())
        assert torch.equal(mixture.pair_vectors(batch), single.pair_vectors(batch)), method
    # the memorised vectors by hand: pair p's table starts after the earlier pairs' ids
    _one_hot(mixture, 0)
    table = mixture.memorize.memorized.weight.detach()
    offsets = torch.tensor([0, 10, 17])
    assert torch.equal(mixture.pair_vectors(batch), table[batch.crosses + offsets])
    # and the factorised ones: a, b, c rows at 0, 6, 11 of the factor table
    _one_hot(mixture, 1)
    f = mixture.factorize.factors.weight.detach()
    a, b, c = batch.categorical[:, 0], batch.categorical[:, 1] + 6, batch.categorical[:, 2] + 11
    assert torch.equal(mixture.pair_vectors(batch), torch.stack([f[a] * f[b], f[a] * f[c], f[b] * f[c]], 1))


@pytest.mark.parametrize("method", ["memorize", "factorize"])
def test_a_model_with_a_one_hot_mixture_is_the_uniform_model(method: str) -> None:
    mixed = _mixture_model(seed=0)
    _one_hot(mixed.interaction, METHODS.index(method))
    seed_everything(1)
    plain = build_model(_embedding_config(), _block_config(), LAYOUT, interaction_config=_uniform(method))
    part = f"interaction.{method}."
    state = {k.replace(part, "interaction."): v for k, v in mixed.state_dict().items()
             if not k.startswith("interaction.") or k.startswith(part)}
    plain.load_state_dict(state)  # strict: every key of the uniform model comes from the mixture model
    batch = _batch(64, seed=3)
    assert torch.equal(mixed.eval()(batch), plain.eval()(batch))
    # a non-one-hot mixture is another model
    mixed.interaction.temperature = 1.0
    assert not torch.allclose(mixed(batch), plain(batch))


def test_the_decided_layer_is_built_from_the_layout_methods_and_refuses_undecided_pairs() -> None:
    decided = FeatureLayout(FIELDS, (CrossSpec("a:b", "a", "b", 10, method="factorize"),
                                     CrossSpec("b:c", "b", "c", 5, method="memorize")))
    layer = decided_pairs(OptInterConfig(), decided, D, 0.5)
    assert layer.methods == ["factorize", "memorize"] and layer.pair_names == ["b:c", "a:b"]
    assert layer.stored_parameters() == (5 + 6 + 5) * D
    with pytest.raises(RecipeError, match="interaction.kind optinter: pairs a:b, a:c, b:c are not decided yet"):
        build_model(_embedding_config(), _block_config(), LAYOUT, interaction_config=OptInterConfig())
    model = build_model(_embedding_config(), _block_config("mlp"), decided, interaction_config=OptInterConfig())
    assert isinstance(model.interaction, PairVectors) and model.interaction.extra_fields == 2
    # the block reads the 3 categorical + 1 numeric fields and the 2 pair vectors
    assert model.block.mlp[0].in_features == (4 + 2) * D


# ------------------------------------------------------------------------------------------------ schedule
def test_the_temperature_falls_geometrically_from_initial_to_final() -> None:
    config = OptInterConfig(search_epochs=3, initial_temperature=1.0, final_temperature=0.01)
    assert [config.temperature(e) for e in (1, 2, 3)] == pytest.approx([1.0, 0.1, 0.01])
    five = OptInterConfig(search_epochs=5, initial_temperature=2.0, final_temperature=0.02)
    assert [five.temperature(e) for e in range(1, 6)] == pytest.approx([2.0, 2 * 10 ** -0.5, 0.2, 2 * 10 ** -1.5,
                                                                        0.02])
    assert OptInterConfig(search_epochs=1, final_temperature=0.3).temperature(1) == 0.3
    default = OptInterConfig()
    assert (default.stages, default.search_epochs, default.initial_temperature, default.final_temperature,
            default.arch_lr, default.bilevel, default.gumbel) == (["search", "retrain"], 10, 1.0, 0.01, 3e-3,
                                                                  True, False)


def test_before_each_epoch_the_temperature_is_set_and_a_plateau_leaves_arch_lr_alone() -> None:
    model = _mixture_model(seed=2)
    mixture = model.interaction
    config = OptInterConfig(search_epochs=3, initial_temperature=1.0, final_temperature=0.01, arch_lr=0.02)
    before = mixture.alpha.detach().clone()
    seen = three_epochs_under_plateau(model, search_hooks(mixture, config), lambda: mixture.temperature,
                                      _batch(32, seed=1), _batch(16, seed=2))
    assert [s[0] for s in seen] == [1, 2, 3]
    assert [s[1] for s in seen] == pytest.approx([1.0, 0.1, 0.01])
    assert [s[2] for s in seen] == pytest.approx([0.01, 0.005, 0.0025])  # the model's lr halves
    assert [s[3] for s in seen] == [0.02, 0.02, 0.02]  # alpha's never
    assert not torch.equal(mixture.alpha.detach(), before)  # alpha did train


# ------------------------------------------------------------------------------------------------ alpha's group
def test_alpha_gets_its_own_adam_without_weight_decay_outside_the_models_optimiser() -> None:
    model = _mixture_model(seed=1)
    mixture = model.interaction
    with pytest.raises(ValueError, match="interaction.alpha belong to no parameter group"):
        build_optimizers(model, OptimizerConfig())
    decayed = OptimizerConfig(embedding_weight_decay=0.1, dense_weight_decay=0.2)
    train = TrainConfig(progress=False, device="cpu", batch_size=4, optimizer=decayed)
    for bilevel, step in ((False, "train"), (True, "validation")):
        hooks = search_hooks(mixture, OptInterConfig(arch_lr=0.03, bilevel=bilevel))
        trainer = Trainer(model, train, torch.device("cpu"), hooks=hooks)
        decay = {id(p): g["weight_decay"] for opt in trainer.optimizers.optimizers for g in opt.param_groups
                 for p in g["params"]}
        assert id(mixture.alpha) not in decay
        # the pair tables are embedding tables: the embedding weight decay, not the dense one
        for table in (mixture.memorize.memorized.weight, mixture.factorize.factors.weight):
            assert decay[id(table)] == 0.1
        ((group, optimizer),) = trainer.optimizers.groups
        assert (group.name, group.on_plateau, group.step, group.weight_decay) == ("alpha", False, step, 0.0)
        assert isinstance(optimizer, torch.optim.Adam)
        assert optimizer.param_groups[0]["params"] == [mixture.alpha]
        assert optimizer.param_groups[0]["lr"] == 0.03 and optimizer.param_groups[0]["weight_decay"] == 0.0
        stepped_on_train = optimizer in trainer.optimizers.training
        assert stepped_on_train is not bilevel
        assert (trainer.optimizers.validation == [(group, optimizer)]) is bilevel


def _adam_first_step(grad: torch.Tensor, lr: float) -> torch.Tensor:
    """Adam's first update from 0: m^ = g, v^ = g^2, so -lr g / (|g| + eps)."""
    return -lr * grad / (grad.abs() + 1e-8)


@pytest.mark.parametrize("bilevel", [False, True])
def test_alpha_steps_on_the_training_loss_or_with_bilevel_on_validation_batches(bilevel: bool) -> None:
    model = _mixture_model(seed=4, block="mlp")
    mixture = model.interaction
    mixture.temperature = 1.0
    train_batch, valid_batch = _batch(32, seed=5), _batch(32, seed=5, flip=True)  # same rows, labels flipped
    gradients = {}
    for name, batch in (("train", train_batch), ("valid", valid_batch)):
        probe = copy.deepcopy(model).eval()
        loss = F.binary_cross_entropy_with_logits(probe(batch), batch.label)
        (gradients[name],) = torch.autograd.grad(loss, [probe.interaction.alpha])
    assert not torch.allclose(gradients["train"].sign(), gradients["valid"].sign())
    # one training step per epoch (batch_size > rows), the model's own lr so small that its weights stay put
    train = TrainConfig(progress=False, device="cpu", batch_size=64, epochs=1, optimizer={"lr": 1e-12})
    config = OptInterConfig(search_epochs=1, initial_temperature=1.0, final_temperature=1.0, arch_lr=0.05,
                            bilevel=bilevel)
    trainer = Trainer(model, train, torch.device("cpu"), hooks=search_hooks(mixture, config), console=QUIET)
    trainer.fit(train_batch, valid_batch)
    assert trainer.validation_steps == (1 if bilevel else 0)
    used, other = ("valid", "train") if bilevel else ("train", "valid")
    alpha = mixture.alpha.detach()
    torch.testing.assert_close(alpha, _adam_first_step(gradients[used], 0.05), rtol=0, atol=1e-5)
    assert not torch.allclose(alpha, _adam_first_step(gradients[other], 0.05), rtol=0, atol=1e-3)
    assert mixture.alpha.requires_grad  # given back after a bi-level fit


# ------------------------------------------------------------------------------------------------ runs
OPTINTER = {"kind": "optinter", "search_epochs": 2, "initial_temperature": 1.0, "final_temperature": 0.1,
            "arch_lr": 0.1, "bilevel": True}
PAIRABLE = ["C1", "C2", "C3", "C4", "C5", "I1"]
PAIRS = [f"{a}:{b}" for i, a in enumerate(PAIRABLE) for b in PAIRABLE[i + 1:]]
CSV_COLUMNS = ["field_a", "field_b", "method", "weight_memorize", "weight_factorize", "weight_naive", "table_rows",
               "hashed"]
SERVE_NAME = "optinter_serve"
# a hand-made decision with every method, the large fields' pair memorised (most of its crosses are rare: OOV)
CHOSEN = {**{name: "naive" for name in PAIRS}, "C1:C3": "memorize", "C4:C5": "memorize", "C1:C2": "factorize",
          "C2:I1": "factorize", "C3:C4": "factorize"}


def _recipe(root: Path, name: str, interaction: dict[str, Any] | None, block: str = "mlp") -> Any:
    """6,000 generated rows (4,800 train): 5 categorical fields, two small ones planted as a memorise-type pair,
    two large ones (300 and 400 values) as a factorise-type pair, one bucketised numeric field; every pair of the
    six pairable fields a candidate; a small MLP, dim 4, 2 epochs."""
    raw = synthetic_recipe(root / name, {"dim": D, "init_std": 0.05}, epochs=2, batch_size=512,
                           optimizer={"lr": 3e-2})
    raw["seed"] = 5
    raw["dataset"] = {"synthetic": {"rows": 6000, "categorical_fields": 5, "numeric_fields": 1,
                                    "cardinalities": [6, 10, 12, 300, 400], "informative_fields": 2,
                                    "interaction_pairs": 0, "memorize_pairs": 1, "factorize_pairs": 1,
                                    "factorize_min_cardinality": 200, "numeric_informative": 1}}
    raw["features"] = {"categorical": PAIRABLE[:5], "numeric": [{"name": "I1", "transform": "bucketize",
                                                                 "buckets": 4}],
                       "crosses": {"pairs": "all", "min_count": 2}}
    raw["model"] = {"block": block, "mlp": {"hidden": [8]}}
    if interaction is not None:
        raw["interaction"] = interaction
    return validate_recipe(raw)


def _predictions(run_dir: Path) -> np.ndarray:
    return pl.read_parquet(run_dir / "test_predictions.parquet")["probability"].to_numpy()


def _processor_layout(run_dir: Path) -> FeatureLayout:
    return FeatureLayout.from_dict(json.loads((run_dir / "processor.json").read_text())["layout"])


def _pair_floats(layout: FeatureLayout, methods: list[str | None]) -> int:
    """Floats of the pair layer by hand: each memorised cross's ids, each field of a factorised pair's ids, x dim."""
    memorized = sum(c.rows for c, m in zip(layout.crosses, methods) if m == "memorize")
    factored = {n for c, m in zip(layout.crosses, methods) if m == "factorize" for n in (c.first, c.second)}
    return (memorized + sum(f.vocab_size for f in layout.categorical if f.name in factored)) * D


def _choices_run(root: Path, choices: dict[str, str]) -> Path:
    """A directory holding only interaction_search/pair_choices.json (what interaction.from_run reads)."""
    folder = root / "interaction_search"
    folder.mkdir(parents=True)
    (folder / "pair_choices.json").write_text(json.dumps({"choices": choices}))
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory):
    """The OptInter run (searched and retrained; its console recorded, its search layer kept) and a retrain from a
    hand-made decision."""
    root = tmp_path_factory.mktemp("optinter")
    mixtures: list[PairMixture] = []

    class Recorded(PairMixture):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            mixtures.append(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CTRLAB_CACHE_DIR", str(root / "cache"))
        recipe = _recipe(root, "searched", OPTINTER)
        console = Console(file=io.StringIO(), record=True, width=200)
        with pytest.MonkeyPatch.context() as recording:
            recording.setattr(optinter_search, "PairMixture", Recorded)
            searched = train_recipe(recipe, console=console)
        chosen_recipe = _recipe(root, "chosen", {"kind": "optinter", "stages": ["retrain"],
                                                 "from_run": str(_choices_run(root / "hand", CHOSEN))})
        chosen = train_recipe(chosen_recipe, console=QUIET)
        assert len(mixtures) == 1
        yield SimpleNamespace(root=root, recipe=recipe, searched=searched, text=console.export_text(),
                              mixture=mixtures[0], chosen_recipe=chosen_recipe, chosen=chosen)


@pytest.fixture(scope="module")
def uniform(runs):
    """The three uniform architectures of the same recipe."""
    root = runs.root
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CTRLAB_CACHE_DIR", str(root / "cache"))
        yield {method: train_recipe(_recipe(root, method, {"kind": "pairs", "method": method}), console=QUIET)
               for method in METHODS}


def test_an_optinter_run_writes_its_pair_choices_table_and_figure(runs) -> None:
    result, text = runs.searched, runs.text
    out = result.output_dir / "interaction_search"
    assert sorted(p.name for p in out.iterdir()) == ["pair_choices.json", "pairs.csv", "pairs.png"]
    assert (out / "pairs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "pair_choices.json").read_text())
    choices, weights = saved["choices"], saved["weights"]
    assert list(choices) == PAIRS and list(weights) == PAIRS and set(choices.values()) <= set(METHODS)
    with (out / "pairs.csv").open() as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == CSV_COLUMNS
        rows = list(reader)
    assert [f"{r['field_a']}:{r['field_b']}" for r in rows] == PAIRS  # one row per candidate pair, model order
    state = json.loads((result.output_dir / "processor.json").read_text())
    full = {c["first"] + ":" + c["second"]: c for c in state["crosses"]}
    for row in rows:
        name = f"{row['field_a']}:{row['field_b']}"
        w = [float(row[f"weight_{m}"]) for m in METHODS]
        assert sum(w) == pytest.approx(1.0, abs=3e-6) and w == pytest.approx(weights[name], abs=1e-6)
        assert row["method"] == choices[name] == METHODS[int(np.argmax(w))], name
        assert row["hashed"] == "False"
        if row["method"] == "memorize":
            assert int(row["table_rows"]) == full[name]["rows"] > 2
        else:
            assert int(row["table_rows"]) == 0
    # the processor keeps the non-naive pairs, with their methods, in the layout and in its crosses
    decided = {name: m for name, m in choices.items() if m != "naive"}
    assert {name: c["method"] for name, c in full.items()} == decided
    layout = _processor_layout(result.output_dir)
    assert [(c.name, c.method) for c in layout.crosses] == list(decided.items())
    # the summary
    metrics = json.loads((result.output_dir / "metrics.json").read_text())
    found = metrics["interaction_search"]
    assert (found["method"], found["stages"], found["from_run"]) == ("optinter", ["search", "retrain"], None)
    counts = {m: sum(1 for c in choices.values() if c == m) for m in METHODS}
    assert found["pairs"] == 15 == found["pairs_memorize"] + found["pairs_factorize"] + found["pairs_naive"]
    assert (found["pairs_memorize"], found["pairs_factorize"], found["pairs_naive"]) == tuple(counts.values())
    assert found["memorized_rows"] == sum(int(r["table_rows"]) for r in rows)
    assert found["search"]["epochs_run"] == 2 and len(found["search"]["history"]) == 2
    kept = found["search"]["kept_epoch"]
    assert kept in (1, 2) and found["search"]["history"][kept - 1]["improved"]
    # the weights: softmax(alpha / t) at the kept epoch's alpha and temperature; each choice alpha's argmax there
    mixture = runs.mixture
    alpha = mixture.alpha.detach()
    assert mixture.temperature == pytest.approx(OptInterConfig(**OPTINTER).temperature(kept))
    expected = F.softmax(alpha / OptInterConfig(**OPTINTER).temperature(kept), dim=1)
    for p, name in enumerate(PAIRS):
        assert weights[name] == pytest.approx(expected[p].tolist(), abs=1e-6), name
        assert choices[name] == METHODS[int(alpha[p].argmax())]
    assert not torch.allclose(alpha, torch.zeros_like(alpha))  # the search moved alpha
    # the search announced each epoch's temperature (geometric 1 -> 0.1)
    assert "optinter epoch 1: temperature 1, argmax" in text and "optinter epoch 2: temperature 0.1, argmax" in text
    assert "stage search: 15 pairs, at most 2 epochs, temperature 1 -> 0.1, arch lr 0.1, bi-level" in text
    assert metrics["test"]["auc"] > 0.6


def test_the_pair_layer_stores_the_memorised_crosses_and_the_factor_tables_and_reloads(runs) -> None:
    recipe, result, chosen_recipe, chosen = runs.recipe, runs.searched, runs.chosen_recipe, runs.chosen
    for run, run_recipe in ((result, recipe), (chosen, chosen_recipe)):
        layout = _processor_layout(run.output_dir)
        methods = [c.method for c in layout.crosses]
        expected = _pair_floats(layout, methods)
        assert run.metrics["interaction_parameters"] == expected
        weights = load_file(str(run.output_dir / "model.safetensors"))
        pair_floats = sum(v.numel() for k, v in weights.items() if k.startswith("interaction."))
        assert pair_floats == expected
        assert run.metrics["model_parameters"] == sum(v.numel() for v in weights.values())
        reload_matches_saved_predictions(run.output_dir, run_recipe)
    # the hand-made decision: C1:C3 and C4:C5 memorised, C1:C2, C2:I1 and C3:C4 factorised (fields C1..C4, I1)
    layout = _processor_layout(chosen.output_dir)
    assert [(c.name, c.method) for c in layout.crosses] == [("C1:C2", "factorize"), ("C1:C3", "memorize"),
                                                            ("C2:I1", "factorize"), ("C3:C4", "factorize"),
                                                            ("C4:C5", "memorize")]
    size = {f.name: f.vocab_size for f in layout.categorical}
    rows = {c.name: c.rows for c in layout.crosses}
    assert chosen.metrics["interaction_parameters"] == (
        rows["C1:C3"] + rows["C4:C5"] + size["C1"] + size["C2"] + size["C3"] + size["C4"] + size["I1"]) * D
    weights = load_file(str(chosen.output_dir / "model.safetensors"))
    assert weights["interaction.memorized.weight"].shape == (rows["C1:C3"] + rows["C4:C5"], D)
    assert weights["interaction.factors.weight"].shape == (sum(size[n] for n in ("C1", "C2", "C3", "C4", "I1")), D)
    summary = chosen.metrics["interaction_search"]
    assert (summary["pairs_memorize"], summary["pairs_factorize"], summary["pairs_naive"]) == (2, 3, 10)
    assert "search" not in summary
    # naive pairs' crosses are not encoded: the test split carries the 5 decided columns
    processor = FeatureProcessor.load(chosen.output_dir / "processor.json")
    raw_test = load_raw_splits(chosen_recipe.dataset, chosen_recipe.seed).frames["test"]
    assert processor.transform(raw_test).crosses.shape == (raw_test.height, 5)


def test_a_retrain_from_an_earlier_search_reuses_its_choices_and_reproduces_its_predictions(runs) -> None:
    root, recipe, result = runs.root, runs.recipe, runs.searched
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CTRLAB_CACHE_DIR", str(root / "cache"))
        again = train_recipe(_recipe(root, "retrained", {**OPTINTER, "stages": ["retrain"],
                                                          "from_run": str(result.output_dir)}), console=QUIET)
    out, first = again.output_dir / "interaction_search", result.output_dir / "interaction_search"
    assert sorted(p.name for p in out.iterdir()) == ["pair_choices.json", "pairs.csv", "pairs.png"]
    for name in ("pair_choices.json", "pairs.csv"):
        assert (out / name).read_bytes() == (first / name).read_bytes(), name
    found = again.metrics["interaction_search"]
    assert found["stages"] == ["retrain"] and found["from_run"] == str(result.output_dir)
    assert "search" not in found
    assert {k: v for k, v in found.items() if k not in ("stages", "from_run")} == {
        k: v for k, v in result.metrics["interaction_search"].items() if k not in ("stages", "from_run", "search")}
    assert _processor_layout(again.output_dir) == _processor_layout(result.output_dir)
    assert again.metrics["interaction_parameters"] == result.metrics["interaction_parameters"]
    assert np.array_equal(_predictions(again.output_dir), _predictions(result.output_dir))
    reload_matches_saved_predictions(again.output_dir, recipe)


def test_a_retrain_from_a_run_without_a_search_or_with_other_pairs_is_a_data_error(runs, uniform,
                                                                                   tmp_path: Path) -> None:
    root = runs.root
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CTRLAB_CACHE_DIR", str(root / "cache"))
        with pytest.raises(DataError) as raised:
            train_recipe(_recipe(tmp_path, "nowhere", {"kind": "optinter", "stages": ["retrain"],
                                                       "from_run": str(uniform["memorize"].output_dir)}),
                         console=QUIET)
        message = raised.value.message
        assert "interaction_search/pair_choices.json: not found; interaction.from_run must be a run directory " \
               "whose stages wrote interaction_search/pair_choices.json" in message, message
        assert not (tmp_path / "nowhere").exists()
        fewer = _choices_run(tmp_path / "from" / "fewer", {name: "memorize" for name in PAIRS[:-1]})
        with pytest.raises(DataError, match=r"pair_choices.json: not pair choices for this recipe's crosses"):
            train_recipe(_recipe(tmp_path, "other", {"kind": "optinter", "stages": ["retrain"],
                                                     "from_run": str(fewer)}), console=QUIET)
        wrong = _choices_run(tmp_path / "from" / "wrong", {name: "hash" for name in PAIRS})
        with pytest.raises(DataError, match="method 'hash' is not one of memorize, factorize, naive"):
            train_recipe(_recipe(tmp_path, "wrong", {"kind": "optinter", "stages": ["retrain"],
                                                     "from_run": str(wrong)}), console=QUIET)
    assert not (tmp_path / "other").exists() and not (tmp_path / "wrong").exists()


def test_a_decision_of_every_pair_naive_trains_the_model_without_pair_vectors(runs, tmp_path: Path) -> None:
    root = runs.root
    naive = _choices_run(tmp_path / "naive", {name: "naive" for name in PAIRS})
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CTRLAB_CACHE_DIR", str(root / "cache"))
        result = train_recipe(_recipe(tmp_path, "all_naive", {"kind": "optinter", "stages": ["retrain"],
                                                              "from_run": str(naive)}), console=QUIET)
    assert result.metrics["interaction_parameters"] == 0
    assert _processor_layout(result.output_dir).crosses == ()
    reload_matches_saved_predictions(result.output_dir, _recipe(tmp_path, "all_naive", {
        "kind": "optinter", "stages": ["retrain"], "from_run": str(naive)}))


def test_the_uniform_architectures_train_and_store_what_they_memorise_or_factorise(uniform) -> None:
    layout = _processor_layout(uniform["memorize"].output_dir)
    assert [c.name for c in layout.crosses] == PAIRS and all(c.method is None for c in layout.crosses)
    floats = {m: uniform[m].metrics["interaction_parameters"] for m in METHODS}
    assert floats["naive"] == 0
    assert floats["memorize"] == sum(c.rows for c in layout.crosses) * D
    assert floats["factorize"] == sum(f.vocab_size for f in layout.categorical) * D  # every field is in a pair
    assert floats["memorize"] > floats["factorize"] > 0
    # beside the tables, memorise and factorise add the 15 pair vectors to the MLP's input (x 8 hidden units)
    params = {m: uniform[m].metrics["model_parameters"] for m in METHODS}
    for method in ("memorize", "factorize"):
        assert params[method] - params["naive"] == floats[method] + 15 * D * 8
    for method in METHODS:
        assert uniform[method].metrics["test"]["auc"] > 0.55
        assert "interaction_search" not in uniform[method].metrics
        assert not (uniform[method].output_dir / "interaction_search").exists()
    reload_matches_saved_predictions(uniform["factorize"].output_dir,
                                     _recipe(uniform["factorize"].output_dir.parent, "factorize",
                                             {"kind": "pairs", "method": "factorize"}))


# ------------------------------------------------------------------------------------------------ blocks
def test_a_block_that_cannot_take_pair_vectors_is_a_recipe_error(tmp_path: Path) -> None:
    for block, settings in (("din", {"candidate": "a", "history": "h"}), ("fgcnn", {}), ("lr", {})):
        config = BLOCKS.get(block).config(**settings)
        for kwargs in ({"interaction_config": _uniform("memorize")}, {"interaction": _mixture}):
            with pytest.raises(RecipeError) as error:
                build_model(_embedding_config(), config, LAYOUT, **kwargs)
            assert str(error.value) == (f"interaction: model.block {block} does not read pair vectors; use a block "
                                        "that reads any number of field vectors (mlp, deepfm, dcnv2, autoint, fm)")
    # a layout without crosses under a pair layer (every pair decided naive) gets a layer that adds nothing
    no_crosses = FeatureLayout(FIELDS)
    model = build_model(_embedding_config(), _block_config(), no_crosses, interaction_config=_uniform("factorize"))
    assert model.interaction is not None and model.interaction.extra_fields == 0
    # a run with such a block stops before it writes anything
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CTRLAB_CACHE_DIR", str(tmp_path / "cache"))
        with pytest.raises(RecipeError, match="interaction: model.block fgcnn does not read pair vectors"):
            train_recipe(_recipe(tmp_path, "fgcnn", OPTINTER, block="fgcnn"), console=QUIET)
    assert not (tmp_path / "fgcnn").exists()


# ------------------------------------------------------------------------------------------------ serving
def test_a_served_optinter_model_scores_as_in_process_unseen_crosses_included(runs) -> None:
    mlflow = pytest.importorskip("mlflow")
    from ctrlab.serve import Predictor
    from ctrlab.serve.registry import register_run
    from ctrlab.serve.server import serve_registered

    root, recipe, result = runs.root, runs.chosen_recipe, runs.chosen
    uri = f"sqlite:///{root / 'mlflow.db'}"
    register_run(str(result.output_dir), SERVE_NAME, alias="champion", tracking_uri=uri)
    assert str(mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_by_alias(
        SERVE_NAME, "champion").version) == "1"
    predictor = Predictor.from_run(result.output_dir)
    columns = predictor.input_columns
    test = load_raw_splits(recipe.dataset, recipe.seed).frames["test"].drop(["label", TRUE_PROBABILITY_COLUMN])
    test = test.select(columns)
    encoded = predictor.processor.transform(test, with_label=False)
    names = [c.name for c in predictor.processor.layout.crosses]
    large = names.index("C4:C5")  # memorised
    c4, c5 = (predictor.processor.layout.categorical_position(n) for n in ("C4", "C5"))
    # rows whose C4 and C5 values were both seen in training but never together (min_count 2): the pair's OOV id
    unseen = (encoded.crosses[:, large] == OOV_ID) & (encoded.categorical[:, c4] >= 2) & (
        encoded.categorical[:, c5] >= 2)
    index = np.flatnonzero(unseen)[:40]
    assert len(index) == 40
    rows = test[index.tolist()]
    in_process = predictor.predict(rows)
    assert np.array_equal(_predictions(result.output_dir)[index], in_process)  # as the run scored them
    # unseen values: every cross holding them is its pair's OOV
    replaced = test.head(20).with_columns(pl.lit("C4_never_seen").alias("C4"))
    replaced_crosses = predictor.processor.transform(replaced, with_label=False).crosses
    for j, name in enumerate(names):
        if "C4" in name.split(":") and predictor.processor.layout.crosses[j].method == "memorize":
            assert (replaced_crosses[:, j] == OOV_ID).all(), name
    mixed = test.head(30)
    with serve_registered(SERVE_NAME, "champion", tracking_uri=uri) as server:
        for frame in (rows, replaced, mixed, rows.head(1)):
            status, reply = server.predict_records(frame.to_dicts())
            assert status == 200, reply
            served = np.array([p["probability"] for p in reply["predictions"]])
            np.testing.assert_allclose(served, predictor.predict(frame), rtol=0, atol=1e-6)
        status, reply = server.predict_records(rows.to_dicts())
        assert status == 200
        np.testing.assert_allclose([p["probability"] for p in reply["predictions"]], in_process, rtol=0, atol=1e-6)


def test_a_feature_set_search_then_a_pair_search_chain_and_serve(tmp_path: Path) -> None:
    """OptFS then OptInter in one run: the pair search sees the kept feature set, the final model has the decided
    pair layer, the dense part OptFS rewinds starts afresh where the pair vectors changed its shape (said in the
    summary), and the run reloads to its own predictions."""
    recipe = _recipe(tmp_path, "both", OPTINTER)
    raw = recipe.model_dump(mode="json")
    raw["gate"] = {"kind": "optfs", "search_epochs": 1, "rewind_epoch": 1, "sparsity_weight": 1e-4}
    both = validate_recipe(raw)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CTRLAB_CACHE_DIR", str(tmp_path / "cache"))
        result = train_recipe(both, console=QUIET)
    metrics = result.metrics
    assert {"feature_search", "interaction_search"} <= set(metrics)
    assert (result.output_dir / "feature_search" / "kept_values.json").is_file()
    layout = _processor_layout(result.output_dir)
    assert all(c.method in ("memorize", "factorize") for c in layout.crosses)
    assert len(layout.crosses) == metrics["interaction_search"]["pairs"] - metrics["interaction_search"]["pairs_naive"]
    rewind = metrics["feature_search"]["rewind"]
    assert rewind["embedding"] == "rewound rows"
    if layout.crosses:
        assert "block.mlp.0.weight" in rewind["initial values (the model changed since the search)"]
    reload_matches_saved_predictions(result.output_dir, both)
