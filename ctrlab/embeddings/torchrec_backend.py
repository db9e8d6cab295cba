"""The per-field embedding on torchrec: one ``EmbeddingBagCollection`` fed one ``KeyedJaggedTensor`` per batch.

Selected with ``embedding: {kind: per_field, backend: torchrec}`` (see
:func:`~ctrlab.embeddings.per_field.build_per_field`); it computes what
:class:`~ctrlab.embeddings.per_field.PerFieldEmbedding` computes, from the same kind of tables:

* one ``EmbeddingBagConfig`` per vocabulary (:meth:`FeatureLayout.tables`), listing every field that indexes it
  (a categorical field and the sequences sharing its vocabulary) in ``feature_names``;
* categorical fields are bags of one id; sequences are jagged bags of their real items (padding id 0 dropped),
  pooled by the field's ``pooling`` (an empty history pools to the zero vector, as in ``plain``);
* numeric fields are ``x · v`` with their own vectors, as in ``plain``.

torchrec pools per *table*, so a table is created with the pooling of its sequences (``mean`` or ``sum``; a
categorical bag of one id pools the same either way). If sequences of one vocabulary disagree, the table sums and
the mean-pooled ones are divided by their lengths here.

The unpooled sequence vectors (``EmbeddingOutput.sequences``, which DIN attends over) are looked up with
``F.embedding`` directly in the *same* table parameter the bag collection pools from: the EBC only returns pooled
vectors, and a separate torchrec ``EmbeddingCollection`` would hold separate tables. So pooled and unpooled vectors
of a sequence always agree and share gradients; this direct lookup assumes the unsharded module (torchrec's
model-parallel sharding would need an ``EmbeddingCollection`` for them).

``sparse: true`` makes the tables' gradients sparse (the bag modules' own ``sparse`` flag), so the trainer's
SparseAdam / sparse Adagrad and lazy L2 work as with ``plain``.

torchrec is imported when the layer is built, never when this module is imported (the embedding registry imports
every module of the package; importing torchrec takes seconds).
"""

from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ctrlab.data.batches import FeatureBatch
from ctrlab.data.layout import FeatureLayout
from ctrlab.embeddings.base import EmbeddingOutput, FeatureEmbedding, concatenated_row_ids
from ctrlab.errors import RecipeError
from ctrlab.layers.regularizers import mini_batch_aware_l2

if TYPE_CHECKING:  # pragma: no cover
    from torchrec import KeyedJaggedTensor

    from ctrlab.embeddings.per_field import PerFieldConfig, PerFieldEmbedding


def _torchrec() -> Any:
    try:
        import torchrec
    except Exception as exc:  # ImportError, or fbgemm failing to load its operators
        raise RecipeError(f"embedding.backend: torchrec cannot be used: importing torchrec failed ({exc}); "
                          "install torchrec and fbgemm-gpu(-cpu) as the README's Installing section says, or use "
                          "backend plain") from exc
    return torchrec


def _module_names(tables: list[str]) -> dict[str, str]:
    """A ``ModuleDict``-safe, unique name for each vocabulary table: the table name where it is one (no dots, not
    an attribute of ``ModuleDict``), otherwise the name with odd characters replaced plus its position."""
    reserved = set(dir(nn.ModuleDict()))
    names: dict[str, str] = {}
    for i, table in enumerate(tables):
        name = re.sub(r"[^0-9A-Za-z_]", "_", table)
        if name != table or not name or name in reserved or name in names.values():
            name = f"{name}_{i}"
        names[table] = name
    return names


class TorchrecEmbedding(FeatureEmbedding):
    """Per-field embedding tables in one torchrec ``EmbeddingBagCollection`` (:attr:`ebc`).

    Gives the same :class:`~ctrlab.embeddings.base.EmbeddingOutput` as ``PerFieldEmbedding`` for the same weights
    (:meth:`load_from_plain` copies them over). :meth:`row_ids` numbers rows as ``plain`` does (tables
    concatenated in :meth:`FeatureLayout.tables` order), so row counts and regularisers carry over.
    """

    # Buffers, declared for the type checker (``nn.Module.__getattr__`` is typed ``Tensor | Module``).
    categorical_offsets: torch.Tensor

    def __init__(self, config: PerFieldConfig, layout: FeatureLayout, dim: int | None = None) -> None:
        super().__init__()
        torchrec = _torchrec()
        self.layout = layout
        self.dim = dim if dim is not None else config.dim
        self.sparse = config.sparse
        self.tables = layout.tables()  # vocabulary -> rows, in the row order of row_ids
        self.table_offsets: dict[str, int] = {}
        total = 0
        for name, rows in self.tables.items():
            self.table_offsets[name] = total
            total += rows
        self.module_names = _module_names(list(self.tables))

        # Which fields read each table, and how the table pools.
        features: dict[str, list[str]] = {t: [] for t in self.tables}
        poolings: dict[str, set[str]] = {t: set() for t in self.tables}
        for spec in layout.categorical + layout.sequence:
            features[spec.table].append(spec.name)  # type: ignore[index]
            if spec.kind == "sequence":
                poolings[spec.table].add(spec.pooling)  # type: ignore[index]
        table_pooling = {t: "mean" if p == {"mean"} else "sum" for t, p in poolings.items()}
        # Mean-pooled sequences on a summing table (their vocabulary's sequences disagree): divided here.
        self._divide = {s.name for s in layout.sequence
                        if s.pooling == "mean" and table_pooling[s.table] == "sum"}  # type: ignore[index]

        init = functools.partial(nn.init.normal_, mean=0.0, std=config.init_std)
        configs = [
            torchrec.EmbeddingBagConfig(
                num_embeddings=rows, embedding_dim=self.dim, name=self.module_names[table],
                feature_names=features[table], init_fn=init,
                pooling=torchrec.PoolingType.MEAN if table_pooling[table] == "mean" else torchrec.PoolingType.SUM)
            for table, rows in self.tables.items()
        ]
        self.ebc = torchrec.EmbeddingBagCollection(tables=configs) if configs else None
        if self.ebc is not None:
            for bag in self.ebc.embedding_bags.values():
                bag.sparse = self.sparse  # nn.EmbeddingBag passes its flag to F.embedding_bag on every call

        # The KJT's keys: categorical fields then sequences (the order FeatureBatch holds them in). The EBC returns
        # one pooled vector per feature in its own order (table-major; a sharded EBC's depends on where the planner
        # put each table), permuted back by the keys it reports (:meth:`_permutation`).
        self.kjt_keys = [f.name for f in layout.categorical] + [s.name for s in layout.sequence]
        self._orders: dict[tuple[str, ...], torch.Tensor | None] = {}
        offsets = [self.table_offsets[f.table] for f in layout.categorical]  # type: ignore[index]
        self.register_buffer("categorical_offsets", torch.tensor(offsets, dtype=torch.long), persistent=False)
        self.sequence_offsets = {s.name: self.table_offsets[s.table] for s in layout.sequence}  # type: ignore[index]
        self.numeric_weight = nn.Parameter(torch.randn(len(layout.numeric), self.dim) * config.init_std)

    # ------------------------------------------------------------------------------------------ tables
    def table_weight(self, table: str) -> nn.Parameter:
        """The ``[rows, D]`` parameter of vocabulary ``table`` (a layout table name)."""
        assert self.ebc is not None
        return self.ebc.embedding_bags[self.module_names[table]].weight

    def table_parameters(self) -> list[nn.Parameter]:
        return [self.table_weight(t) for t in self.tables]

    def value_tables(self) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        return ({t: self.table_weight(t) for t in self.tables},
                self.numeric_weight if self.layout.numeric else None)

    @property
    def num_rows(self) -> int:
        return sum(self.tables.values())

    @torch.no_grad()
    def load_from_plain(self, plain: PerFieldEmbedding) -> None:
        """Copy the weights of a ``plain`` per-field embedding of the same layout and width into this one."""
        if plain.layout != self.layout or plain.dim != self.dim:
            raise ValueError("load_from_plain needs an embedding of the same layout and width")
        for table, rows in self.tables.items():
            start = plain.table_offsets[table]
            self.table_weight(table).copy_(plain.weight[start:start + rows])
        self.numeric_weight.copy_(plain.numeric_weight)

    # ------------------------------------------------------------------------------------------ input
    def features(self, batch: FeatureBatch) -> KeyedJaggedTensor:
        """The batch as one ``KeyedJaggedTensor`` (keys :attr:`kjt_keys`, each with one bag per row)."""
        return self._features(batch, {s.name: batch.sequences[s.name] > 0 for s in self.layout.sequence})

    def _features(self, batch: FeatureBatch, masks: dict[str, torch.Tensor]) -> KeyedJaggedTensor:
        from torchrec import KeyedJaggedTensor

        values: list[torch.Tensor] = []
        lengths: list[torch.Tensor] = []
        if self.layout.categorical:
            ids = batch.categorical
            values.append(ids.t().reshape(-1))  # key-major: all rows of field 0, then field 1, ...
            lengths.append(torch.ones(ids.numel(), dtype=torch.long, device=ids.device))
        for spec in self.layout.sequence:
            ids, mask = batch.sequences[spec.name], masks[spec.name]
            values.append(ids[mask])  # each row's real items, rows in order
            lengths.append(mask.sum(dim=1))
        return KeyedJaggedTensor.from_lengths_sync(keys=self.kjt_keys, values=torch.cat(values).long(),
                                                   lengths=torch.cat(lengths).long())

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, batch: FeatureBatch) -> EmbeddingOutput:
        n = len(batch)
        num_categorical = len(self.layout.categorical)
        masks = {s.name: batch.sequences[s.name] > 0 for s in self.layout.sequence}
        pooled = None
        if self.ebc is not None:
            keyed = self.ebc(self._features(batch, masks))
            pooled = keyed.values().view(n, -1, self.dim)
            order = self._permutation(tuple(keyed.keys()), pooled.device)
            if order is not None:
                pooled = pooled.index_select(1, order)
        parts: list[torch.Tensor] = []
        if num_categorical:
            parts.append(pooled[:, :num_categorical])  # type: ignore[index]
        if self.layout.numeric:
            parts.append(batch.numeric.unsqueeze(-1) * self.numeric_weight)
        sequences: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if self.layout.sequence:
            pooled_sequences = pooled[:, num_categorical:]  # type: ignore[index]
            if self._divide:
                pooled_sequences = torch.stack([
                    pooled_sequences[:, i] / masks[s.name].sum(dim=1, keepdim=True).clamp(min=1)
                    if s.name in self._divide else pooled_sequences[:, i]
                    for i, s in enumerate(self.layout.sequence)], dim=1)
            parts.append(pooled_sequences)
            for spec in self.layout.sequence:
                ids, mask = batch.sequences[spec.name], masks[spec.name]
                vectors = F.embedding(ids, self.table_weight(spec.table), sparse=self.sparse)  # type: ignore[arg-type]
                sequences[spec.name] = (vectors * mask.unsqueeze(-1), mask)
        fields = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return EmbeddingOutput(fields, sequences)

    def _permutation(self, keys: tuple[str, ...], device: torch.device) -> torch.Tensor | None:
        """The index that puts pooled vectors given in ``keys`` order into :attr:`kjt_keys` order (None: already
        are); one small tensor per key order met."""
        if keys not in self._orders:
            order = [keys.index(name) for name in self.kjt_keys]
            self._orders[keys] = (None if order == list(range(len(order)))
                                  else torch.tensor(order, dtype=torch.long, device=device))
        return self._orders[keys]

    # ------------------------------------------------------------------------------------------ regularisers
    def row_ids(self, batch: FeatureBatch) -> torch.Tensor:
        """Rows in ``plain``'s numbering (tables concatenated in layout order), one entry per lookup: every
        categorical id and every non-padding sequence id."""
        return concatenated_row_ids(self.layout, batch, self.categorical_offsets, self.sequence_offsets)

    def _ids_by_table(self, batch: FeatureBatch) -> dict[str, torch.Tensor]:
        """Each table's row ids (local to the table) that the batch looks up; tables it does not touch left out."""
        ids: dict[str, list[torch.Tensor]] = {t: [] for t in self.tables}
        for j, spec in enumerate(self.layout.categorical):
            ids[spec.table].append(batch.categorical[:, j])  # type: ignore[index]
        for spec in self.layout.sequence:
            seq = batch.sequences[spec.name]
            ids[spec.table].append(seq[seq > 0])  # type: ignore[index]
        joined = {t: torch.cat(parts).long() for t, parts in ids.items() if parts}
        return {t: i for t, i in joined.items() if i.numel() > 0}

    def lazy_l2(self, batch: FeatureBatch) -> torch.Tensor:
        total = self.numeric_weight.new_zeros(())
        for table, ids in self._ids_by_table(batch).items():
            rows = torch.unique(ids)
            total = total + 0.5 * F.embedding(rows, self.table_weight(table), sparse=self.sparse).pow(2).sum()
        return total

    def mini_batch_aware_l2(self, batch: FeatureBatch, counts: torch.Tensor, coefficient: float) -> torch.Tensor:
        """The base class's regulariser table by table (``counts`` in :meth:`row_ids` numbering). A table the
        batch does not touch adds nothing, not even a zero dense gradient (which a sparse optimiser rejects)."""
        total = self.numeric_weight.new_zeros(())
        for table, ids in self._ids_by_table(batch).items():
            start = self.table_offsets[table]
            total = total + mini_batch_aware_l2(self.table_weight(table), ids,
                                                counts[start:start + self.tables[table]], coefficient,
                                                sparse=self.sparse)
        return total
