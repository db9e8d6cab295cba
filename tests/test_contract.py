"""The contract every interaction block and every embedding kind keeps, run over every (block, embedding) pair the
registries hold: a newly registered block or kind is in the contract without editing this file.

* shape: one finite logit per row, finite gradients, gradients reaching the block and the embedding tables;
* masking: padding (id 0) contributes nothing (the unpooled vectors are zero there, and dropping trailing padding
  columns changes no logit); the out-of-vocabulary id (1) and the largest ids are valid inputs; in eval mode a
  row's logit does not depend on the other rows of its batch (each row alone, or the batch permuted, scores the
  same: catches batch statistics used in eval and cross-row leaks);
* reload: safetensors weights saved with ``save_weights`` load with ``load_weights`` into a model built from the
  same configs after another seed and give the same logits (mixed-dimension tables also after pruning them, which
  the fresh full-shape table must re-shape to).

Blocks are configured only through what they declare: ``needs_embedding`` and ``embedding_width`` (read by
``build_model``) and their config's required fields, filled with whichever fields of the layout the block accepts
(DIN's ``candidate``/``history`` become the categorical item and the behaviour history sharing its vocabulary). A
block that no assignment of a layout's fields satisfies is skipped on that layout, with the block's own reason.
Embedding variants come from the registry too: every kind with its defaults, plus one variant per value of a
``Literal`` ``backend`` field (``per_field`` on ``torchrec``, skipped with the config's reason when absent).
"""

from __future__ import annotations

import functools
import itertools
import re
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ValidationError

from ctrlab.blocks import BLOCKS
from ctrlab.data.batches import FeatureBatch
from ctrlab.data.layout import FIRST_VALUE_ID, OOV_ID, PADDING_ID, CrossSpec, FeatureLayout, FieldSpec
from ctrlab.embeddings import EMBEDDINGS
from ctrlab.errors import RecipeError
from ctrlab.gates import GATES
from ctrlab.interactions import INTERACTIONS
from ctrlab.models import build_model
from ctrlab.models.ctr_model import CTRModel
from ctrlab.utils.checkpoint import load_weights, save_weights

B = 8
DIM = 4
MAX_LEN = 6  # the history's max_len; batches fill at most REAL_LEN positions, the rest is trailing padding
REAL_LEN = 4

LAYOUTS = {
    # two tables (the item's shared by a behaviour history), a numeric field, a mean-pooled sequence
    "full": FeatureLayout((
        FieldSpec("item", "categorical", 9, "item"),
        FieldSpec("user", "categorical", 5, "user"),
        FieldSpec("x", "numeric"),
        FieldSpec("hist", "sequence", 9, "item", MAX_LEN, "mean"),
    )),
    # no sequence: blocks that need one are skipped here by their own validation
    "flat": FeatureLayout((
        FieldSpec("item", "categorical", 9, "item"),
        FieldSpec("user", "categorical", 5, "user"),
        FieldSpec("x", "numeric"),
    )),
}

# Small values for config fields of these names, applied to whichever registered config has the field (a new
# block with other fields runs on its defaults). Batch norm, dropout and Dice make the eval-mode checks bite.
SMALL_BLOCK: dict[str, Any] = {
    "mlp": {"hidden": [8], "batch_norm": True, "dropout": 0.1},
    "mlp_activation": "dice",
    "attention_hidden": [8],
    "layers": 2,
    "heads": 2,
    "attention_dim": 4,
    "cross_layers": 2,
    "channels": [2, 2],
    "kernel_heights": [3, 3],
    "pooling_sizes": [2, 2],
    "recombined_maps": [2, 1],
}
# init_std large enough that every embedding moves the logits (the default 1e-4 would make most checks vacuous)
SMALL_EMBEDDING: dict[str, Any] = {"dim": DIM, "init_std": 0.5}

CITATION = re.compile(r"[A-Z][A-Za-z-]+(?: et al\.| and [A-Z][A-Za-z-]+)?,? \(?(?:19|20)\d\d")


# ------------------------------------------------------------------------------------------------ cases
def _embedding_variants() -> list[tuple[str, dict[str, Any]]]:
    """Every registered kind with its defaults, plus every other value of a ``Literal`` ``backend`` field."""
    variants: list[tuple[str, dict[str, Any]]] = []
    for kind in EMBEDDINGS.names():
        config = EMBEDDINGS.get(kind).config
        variants.append((kind, {}))
        backend = config.model_fields.get("backend")
        if backend is not None and typing.get_origin(backend.annotation) is typing.Literal:
            variants += [(kind, {"backend": value}) for value in typing.get_args(backend.annotation)
                         if value != backend.default]
    return variants


def _variant_id(kind: str, overrides: dict[str, Any]) -> str:
    return kind + "".join(f"[{k}={v}]" for k, v in overrides.items())


VARIANTS = _embedding_variants()
PAIRS = [pytest.param(block, kind, overrides, id=f"{block}-{_variant_id(kind, overrides)}")
         for block in BLOCKS.names() for kind, overrides in VARIANTS]
PAIRS_ON_LAYOUTS = [pytest.param(layout, *p.values, id=f"{layout}-{p.id}") for layout in LAYOUTS for p in PAIRS]


def _embedding_config(kind: str, overrides: dict[str, Any]) -> BaseModel:
    """The variant's config; skips when the config refuses it (a backend whose package is absent)."""
    try:
        return EMBEDDINGS.get(kind).config(**SMALL_EMBEDDING, **overrides)
    except ValidationError as exc:
        pytest.skip(f"embedding {_variant_id(kind, overrides)} unavailable: {exc.errors()[0]['msg']}")


@functools.cache
def _block_config(block: str, layout_name: str) -> BaseModel | str:
    """The block's small config for the layout, or why the block cannot run on it.

    The config's required fields (those without a default) are filled with names of the layout's fields, trying
    every assignment until ``build_model`` accepts one: the block's own validation says what it needs."""
    layout = LAYOUTS[layout_name]
    config_class = BLOCKS.get(block).config
    small = {k: v for k, v in SMALL_BLOCK.items() if k in config_class.model_fields}
    required = [k for k, f in config_class.model_fields.items() if f.is_required()]
    embedding = EMBEDDINGS.get(EMBEDDINGS.names()[0]).config(**SMALL_EMBEDDING)  # any kind: the block decides
    reasons: list[str] = []
    for names in itertools.product(layout.names, repeat=len(required)):
        try:
            config = config_class(**small, **dict(zip(required, names)))
            build_model(embedding, config, layout)
            return config
        except (ValueError, TypeError) as exc:
            reasons.append(exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc).splitlines()[0])
    distinct = list(dict.fromkeys(reasons))
    return (f"block {block} does not run on layout {layout_name!r}: no assignment of its fields to the required "
            f"{required} is accepted ({'; '.join(distinct[:3]) or 'no fields'})")


def _model(block: str, kind: str, overrides: dict[str, Any], layout_name: str = "full", seed: int = 0,
           gate: str | None = None) -> CTRModel:
    config = _block_config(block, layout_name)
    if isinstance(config, str):
        pytest.skip(config)
    embedding = _embedding_config(kind, overrides)
    torch.manual_seed(seed)
    gate_module = GATES.build(GATES.get(gate).config(), LAYOUTS[layout_name]) if gate is not None else None
    try:
        return build_model(embedding, config, LAYOUTS[layout_name], gate=gate_module)
    except RecipeError as exc:  # a backend whose package is installed but does not import (e.g. torchrec)
        if not overrides:
            raise
        pytest.skip(f"embedding {_variant_id(kind, overrides)} unavailable: {exc}")


# ------------------------------------------------------------------------------------------------ batches
def _batch(layout: FeatureLayout, n: int = B, seed: int = 1, ids: str = "random") -> FeatureBatch:
    """Ids over ``layout``: per-field random values (``ids="oov"``: every id the OOV id; ``"max"``: every id the
    field's largest), numeric values, and histories of ``MAX_LEN`` with at most ``REAL_LEN`` real items: row 0
    empty, row 1 one item, row 2 three, then random lengths; the OOV id appears among random ids."""
    g = torch.Generator().manual_seed(seed)

    def values(vocab: int, shape: tuple[int, ...]) -> torch.Tensor:
        if ids == "oov":
            return torch.full(shape, OOV_ID, dtype=torch.long)
        if ids == "max":
            return torch.full(shape, vocab - 1, dtype=torch.long)
        return torch.randint(OOV_ID, vocab, shape, generator=g)

    categorical = [values(f.vocab_size, (n,)) for f in layout.categorical]
    sequences = {}
    for spec in layout.sequence:
        seq = values(spec.vocab_size, (n, spec.max_len))
        lengths = torch.randint(0, min(REAL_LEN, spec.max_len) + 1, (n,), generator=g)
        lengths[:3] = torch.tensor([0, 1, 3]).clamp(max=spec.max_len)
        seq[torch.arange(spec.max_len).expand(n, -1) >= lengths.unsqueeze(1)] = PADDING_ID
        sequences[spec.name] = seq
    return FeatureBatch(
        categorical=torch.stack(categorical, 1) if categorical else torch.zeros(n, 0, dtype=torch.long),
        numeric=torch.randn(n, len(layout.numeric), generator=g),
        sequences=sequences,
        label=(torch.arange(n) % 2).float(),
    )


def _trimmed(batch: FeatureBatch, length: int) -> FeatureBatch:
    """The batch with every sequence cut to its first ``length`` positions (all that is cut is padding)."""
    for seq in batch.sequences.values():
        assert bool((seq[:, length:] == PADDING_ID).all())
    return FeatureBatch(batch.categorical, batch.numeric, {k: v[:, :length] for k, v in batch.sequences.items()},
                        batch.label, batch.group)


def _warm_up(model: CTRModel, layout: FeatureLayout) -> None:
    """A few train-mode passes without gradients: running statistics (batch norm, Dice) leave their initial
    values, so eval mode and reloads exercise them."""
    model.train()
    with torch.no_grad():
        for seed in range(3):
            model(_batch(layout, seed=10 + seed))


# ------------------------------------------------------------------------------------------------ coverage
def _own_doc(obj: Any) -> str:
    """A class's own docstring (``__doc__`` is not inherited, but read it from the class itself), a function's."""
    return (vars(obj).get("__doc__") if isinstance(obj, type) else obj.__doc__) or ""


def test_cases_cover_every_registered_block_and_embedding_kind() -> None:
    assert {p.values[0] for p in PAIRS} == set(BLOCKS.names())
    assert {p.values[1] for p in PAIRS} == set(EMBEDDINGS.names())
    assert len(PAIRS) == len(BLOCKS.names()) * len(VARIANTS)
    # every block runs on the full layout: none escapes the contract by being skipped everywhere
    for block in BLOCKS.names():
        config = _block_config(block, "full")
        assert not isinstance(config, str), config


def test_every_registered_config_and_implementation_is_documented() -> None:
    undocumented = [f"{registry.what} {name}: {part.__name__}"
                    for registry in (BLOCKS, EMBEDDINGS, GATES, INTERACTIONS) for name in registry.names()
                    for part in (registry.get(name).config, registry.get(name).impl)
                    if not _own_doc(part).strip()]
    assert not undocumented, f"no docstring: {undocumented}"


def _cites_a_source(impl: Any) -> bool:
    """An author-year citation in the implementation's docstring, or in its module's when the docstring points
    into that paper (e.g. DIN's baseline: "Base model of DIN (§4.2, Fig. 2 left)")."""
    module = sys.modules.get(impl.__module__)
    texts = [_own_doc(impl), (module.__doc__ if module is not None else None) or ""]
    return any(CITATION.search(" ".join(text.split())) for text in texts)


def test_every_registered_implementation_cites_its_source() -> None:
    uncited = [f"{registry.what} {name} ({registry.get(name).impl.__name__})"
               for registry in (BLOCKS, EMBEDDINGS, GATES, INTERACTIONS) for name in registry.names()
               if not _cites_a_source(registry.get(name).impl)]
    assert uncited == [], f"implementations whose docstring (and module docstring) cite no source: {uncited}"


# ------------------------------------------------------------------------------------------------ 1. shape
@pytest.mark.parametrize(("layout_name", "block", "kind", "overrides"), PAIRS_ON_LAYOUTS)
def test_shape_and_gradients(layout_name: str, block: str, kind: str, overrides: dict[str, Any]) -> None:
    layout = LAYOUTS[layout_name]
    model = _model(block, kind, overrides, layout_name)
    batch = _batch(layout)
    model.train()
    logits = model(batch)
    assert logits.shape == (B,) and logits.dtype == torch.float32
    assert bool(torch.isfinite(logits).all())
    F.binary_cross_entropy_with_logits(logits, batch.label).backward()
    named = dict(model.named_parameters())
    bad = [n for n, p in named.items() if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
    assert not bad, f"non-finite gradients: {bad}"
    if model.block is not None and any(True for _ in model.block.parameters()):  # FM's block has none
        assert any(p.grad is not None and bool(p.grad.any()) for p in model.block.parameters()), "block gets no grad"
    assert model.embedding_modules(), "the model embeds nothing"
    for embedding in model.embedding_modules():
        for table in embedding.table_parameters():
            assert table.grad is not None and bool(table.grad.any()), "an embedding table gets no gradient"


# ------------------------------------------------------------------------------------------------ 2. masking
@pytest.mark.parametrize(("block", "kind", "overrides"), PAIRS)
def test_padding_is_masked_and_oov_ids_are_valid(block: str, kind: str, overrides: dict[str, Any]) -> None:
    layout = LAYOUTS["full"]
    model = _model(block, kind, overrides)
    batch = _batch(layout)
    assert bool((batch.sequences["hist"] == OOV_ID).any()) and bool((batch.sequences["hist"][0] == 0).all())
    # The embedding output: every field, unpooled vectors zero at padding, the mask exactly the non-padding ids.
    for embedding in model.embedding_modules():
        out = embedding(batch)
        assert out.fields.shape == (B, layout.num_fields, embedding.dim)
        for spec in layout.sequence:
            vectors, mask = out.sequences[spec.name]
            assert vectors.shape == (B, spec.max_len, embedding.dim)
            assert torch.equal(mask, batch.sequences[spec.name] != PADDING_ID)
            assert bool((vectors[~mask] == 0).all()), "padding positions carry non-zero vectors"
        assert bool((out.fields[0, layout.names.index("hist")] == 0).all()), "an empty history pools to non-zero"
    _warm_up(model, layout)
    model.eval()
    with torch.no_grad():
        logits = model(batch)
        # trailing padding columns change nothing
        torch.testing.assert_close(model(_trimmed(batch, REAL_LEN)), logits, atol=1e-5, rtol=0)
        # the OOV id and the largest ids are valid everywhere, history included
        for ids in ("oov", "max"):
            assert bool(torch.isfinite(model(_batch(layout, ids=ids))).all())
    model.train()
    oov = _batch(layout, ids="oov")
    F.binary_cross_entropy_with_logits(model(oov), oov.label).backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize(("block", "kind", "overrides"), PAIRS)
def test_eval_logit_of_a_row_ignores_the_rest_of_its_batch(block: str, kind: str, overrides: dict[str, Any]) -> None:
    layout = LAYOUTS["full"]
    model = _model(block, kind, overrides)
    _warm_up(model, layout)
    model.eval()
    batch = _batch(layout)
    perm = torch.randperm(B, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(batch)
        alone = torch.cat([model(batch.select(slice(i, i + 1))) for i in range(B)])
        permuted = model(batch.select(perm))
    torch.testing.assert_close(alone, logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(permuted, logits[perm], atol=1e-5, rtol=0)
    assert logits.std() > 1e-3, "logits barely vary: the checks above would be vacuous"


# ------------------------------------------------------------------------------------------------ 3. reload
def _pruned_architecture(embedding: Any) -> Any:
    """A mixed-dimension table's architecture keeping fewer dims per unit, one real row fewer in each table, and
    two frequency blocks of different widths in the first table."""
    from ctrlab.embeddings.mixed_dim import EmbeddingArchitecture

    units, dim = embedding.units, embedding.dim
    architecture = EmbeddingArchitecture(dim)
    for i, (name, rows) in enumerate(zip(units.names, units.rows)):
        architecture.dims[name] = max(1, dim - 1 - i)
        if units.is_table(i) and rows > FIRST_VALUE_ID + 1:
            mask = torch.ones(rows, dtype=torch.bool)
            mask[FIRST_VALUE_ID] = False
            architecture.rows[name] = mask
        if i == 0:
            architecture.blocks[name] = (torch.arange(rows) >= rows // 2).long()
            architecture.block_dims[name] = [max(1, dim - 1), 1]
    return architecture


def _assert_reloads(model: CTRModel, block: str, kind: str, overrides: dict[str, Any], path: Path) -> None:
    layout = LAYOUTS["full"]
    batch = _batch(layout)
    model.eval()
    save_weights(model, path)
    fresh = _model(block, kind, overrides, seed=12345)
    fresh.eval()
    with torch.no_grad():
        expected = model(batch)
        assert not torch.equal(fresh(batch), expected), "the fresh model already scores alike: vacuous check"
        load_weights(fresh, path)
        torch.testing.assert_close(fresh(batch), expected, atol=1e-6, rtol=0)
    fresh_state = fresh.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(fresh_state[key], value), key


@pytest.mark.parametrize(("block", "kind", "overrides"), PAIRS)
def test_safetensors_reload_gives_identical_logits(block: str, kind: str, overrides: dict[str, Any],
                                                   tmp_path: Path) -> None:
    layout = LAYOUTS["full"]
    model = _model(block, kind, overrides)
    _warm_up(model, layout)
    _assert_reloads(model, block, kind, overrides, tmp_path / "model.safetensors")
    # Tables that can be pruned (mixed-dimension): the pruned weights re-shape a fresh full-shape model.
    prunable = [m for m in model.embedding_modules() if hasattr(m, "prune") and hasattr(m, "units")]
    if prunable:
        for embedding in prunable:
            embedding.prune(_pruned_architecture(embedding))
        _warm_up(model, layout)
        _assert_reloads(model, block, kind, overrides, tmp_path / "pruned.safetensors")


GATE_CASES = [pytest.param(gate, *p.values, id=f"{gate}-{p.id}") for gate in GATES.names() for p in PAIRS]


@pytest.mark.parametrize(("gate", "block", "kind", "overrides"), GATE_CASES)
def test_a_gate_sits_between_every_embedding_and_block(gate: str, block: str, kind: str,
                                                       overrides: dict[str, Any]) -> None:
    """Every registered gate in the slot between embedding and block: a fresh gate is the identity (the gated
    model scores exactly as the ungated one built from the same seed), and the gate's parameters get a gradient."""
    layout = LAYOUTS["full"]
    plain = _model(block, kind, overrides).eval()
    gated = _model(block, kind, overrides, gate=gate).eval()
    assert gated.gate is not None and gated.architecture_parameters()
    batch = _batch(layout)
    torch.testing.assert_close(gated(batch), plain(batch), rtol=0, atol=1e-6)
    gated.train()
    gated(batch).sum().backward()
    grads = [p.grad for p in gated.gate.architecture_parameters()]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


# ------------------------------------------------------------------------------------------------ 5. pair layers
PAIR_LAYOUT = FeatureLayout((
    FieldSpec("item", "categorical", 9, "item"),
    FieldSpec("user", "categorical", 5, "user"),
    FieldSpec("ctx", "categorical", 4, "ctx"),
    FieldSpec("x", "numeric"),
), (
    CrossSpec("item:user", "item", "user", 20, method="memorize"),
    CrossSpec("item:ctx", "item", "ctx", 7, method="factorize"),
    CrossSpec("user:ctx", "user", "ctx", 6, hashed=True, method="memorize"),
))


def _interaction_variants() -> list[tuple[str, dict[str, Any]]]:
    """Every registered pair-layer kind, one variant per value of each required ``Literal`` field (``method``)."""
    variants = []
    for kind in INTERACTIONS.names():
        config = INTERACTIONS.get(kind).config
        literals = {name: typing.get_args(field.annotation) for name, field in config.model_fields.items()
                    if field.is_required() and typing.get_origin(field.annotation) is typing.Literal}
        for values in itertools.product(*literals.values()):
            variants.append((kind, dict(zip(literals, values))))
    return variants


PAIR_BLOCKS = [b for b in BLOCKS.names() if getattr(BLOCKS.get(b).impl, "needs_embedding", True)
               and BLOCKS.get(b).impl.takes_pair_vectors]
PAIR_CASES = [pytest.param(block, kind, settings, id=f"{block}-{kind}" + "".join(f"[{v}]" for v in settings.values()))
              for block in PAIR_BLOCKS for kind, settings in _interaction_variants()]


def _pair_model(block: str, kind: str, settings: dict[str, Any], seed: int = 0) -> CTRModel:
    config = BLOCKS.get(block).config(**{k: v for k, v in SMALL_BLOCK.items()
                                         if k in BLOCKS.get(block).config.model_fields})
    torch.manual_seed(seed)
    return build_model(EMBEDDINGS.get("per_field").config(**SMALL_EMBEDDING), config, PAIR_LAYOUT,
                       interaction_config=INTERACTIONS.get(kind).config(**settings))


def _pair_batch(n: int = B, seed: int = 1) -> FeatureBatch:
    batch = _batch(PAIR_LAYOUT, n, seed)
    g = torch.Generator().manual_seed(seed + 100)
    batch.crosses = torch.stack([torch.randint(OOV_ID, c.rows, (n,), generator=g) for c in PAIR_LAYOUT.crosses], 1)
    return batch


def test_pair_cases_cover_every_registered_pair_layer() -> None:
    assert {p.values[1] for p in PAIR_CASES} == set(INTERACTIONS.names())
    assert {"mlp", "deepfm"} <= set(PAIR_BLOCKS) and "din" not in PAIR_BLOCKS


@pytest.mark.parametrize(("block", "kind", "settings"), PAIR_CASES)
def test_a_pair_layer_feeds_every_block_that_reads_field_vectors(block: str, kind: str, settings: dict[str, Any],
                                                                 tmp_path: Path) -> None:
    """Every registered pair layer with every block that takes pair vectors: one finite logit per row, gradients
    reaching the pair tables, row-independent eval logits, and an identical reload of the saved weights."""
    model = _pair_model(block, kind, settings)
    assert model.interaction is not None
    batch = _pair_batch()
    model.train()
    logits = model(batch)
    assert logits.shape == (B,) and bool(torch.isfinite(logits).all())
    F.binary_cross_entropy_with_logits(logits, batch.label).backward()
    for table in model.interaction.table_parameters():
        assert table.grad is not None and bool(table.grad.any()), "a pair table gets no gradient"
    if model.interaction.extra_fields == 0:
        assert settings.get("method") == "naive" and not model.interaction.table_parameters()
    model.eval()
    with torch.no_grad():
        whole = model(batch)
        alone = torch.cat([model(batch.select(slice(i, i + 1))) for i in range(B)])
        torch.testing.assert_close(alone, whole, atol=1e-5, rtol=0)
        save_weights(model, tmp_path / "pairs.safetensors")
        fresh = _pair_model(block, kind, settings, seed=12345).eval()
        if model.interaction.extra_fields:
            assert not torch.equal(fresh(batch), whole), "the fresh model already scores alike: vacuous check"
        load_weights(fresh, tmp_path / "pairs.safetensors")
        torch.testing.assert_close(fresh(batch), whole, atol=1e-6, rtol=0)
