"""The architecture-search framework: OptEmbed and DNIS reproduce what they found before the move onto it, the
trainer's public hooks (loss terms, epoch-start callbacks, parameter groups and their lr_on_plateau rule), the
method registry, and the import graph (no cycle; the framework and serving import neither Optuna nor the trainer)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import record_search_outcomes as recorded
from ctrlab.blocks import BLOCKS
from ctrlab.config.train import TrainConfig
from ctrlab.embeddings import EMBEDDINGS
from ctrlab.gates import GATES
from ctrlab.interactions import INTERACTIONS
from ctrlab.models import build_model
from ctrlab.search.framework import SEARCH_METHODS, is_searching
from ctrlab.train.hooks import ParameterGroup, TrainingHooks
from ctrlab.train.trainer import Trainer
from embedding_search_recipe import LAYOUT, tiny_batch

PACKAGE = Path(__file__).resolve().parents[1] / "ctrlab"


# ------------------------------------------------------------------------------------- recorded outcomes
@pytest.fixture(scope="module")
def rerun(tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("recorded")
    return recorded.record(work / "cache", work)


@pytest.mark.parametrize("method", sorted(recorded.EMBEDDINGS))
def test_search_reproduces_the_outcome_recorded_before_the_framework(rerun: dict, method: str) -> None:
    """tests/recorded/search_outcomes.json was written by tests/record_search_outcomes.py with the code before
    OptEmbed and DNIS moved onto ctrlab.search.framework; the same recipes must find the same dims and row masks and
    predict the same test probabilities."""
    saved = json.loads(recorded.RECORDED.read_text(encoding="utf-8"))[method]
    now = rerun[method]
    assert saved["embedding"] == recorded.EMBEDDINGS[method]
    assert now["dims"] == saved["dims"]
    assert now["kept_rows"] == saved["kept_rows"]
    if method == "optembed":
        assert 0 < sum(map(len, saved["kept_rows"].values()))  # a mask that prunes: the comparison means something
    np.testing.assert_allclose(now["test_predictions"], saved["test_predictions"], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------- hooks
def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = BLOCKS.get("deepfm").config(mlp={"hidden": [8]}, linear=True)
    return build_model(EMBEDDINGS.get("per_field").config(dim=4), config, LAYOUT)


def test_loss_terms_and_epoch_start_hooks_reach_the_training_loop() -> None:
    model = _model()
    extra = torch.nn.Parameter(torch.tensor(2.0))
    started: list[int] = []
    hooks = TrainingHooks(loss_terms=[lambda batch: extra ** 2], before_epoch=[started.append],
                          parameter_groups=[ParameterGroup("extra", [extra], lr=0.1)])
    config = TrainConfig(progress=False, device="cpu", batch_size=8, epochs=3, early_stopping=None)
    trainer = Trainer(model, config, torch.device("cpu"), hooks=hooks)
    batch = tiny_batch(8)
    model.eval()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch.label)
    torch.testing.assert_close(trainer._loss(batch), bce + 4.0)
    trainer.fit(tiny_batch(16, seed=3), tiny_batch(8, seed=4))
    assert started == [1, 2, 3]
    assert float(extra.detach()) < 2.0 - 0.2  # three Adam steps of 0.1 against the gradient of extra**2


def test_lr_on_plateau_lowers_the_model_and_on_plateau_groups_only() -> None:
    model = _model()
    follows, keeps = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    hooks = TrainingHooks(parameter_groups=[ParameterGroup("follows", [follows], lr=0.1, on_plateau=True),
                                            ParameterGroup("keeps", [keeps], lr=0.1, on_plateau=False)])
    trainer = Trainer(model, TrainConfig(progress=False, device="cpu"), torch.device("cpu"), hooks=hooks)
    trainer.optimizers.scale_lr(0.1, 1e-6)
    lrs = {group.name: opt.param_groups[0]["lr"] for group, opt in trainer.optimizers.groups}
    assert trainer.optimizers.lr == pytest.approx(1e-4)
    assert lrs == {"follows": pytest.approx(0.01), "keeps": 0.1}


def test_an_architecture_parameter_without_a_group_is_refused() -> None:
    from ctrlab.gates.optfs import OptFSConfig, OptFSGate

    torch.manual_seed(0)
    config = BLOCKS.get("fm").config()
    model = build_model(EMBEDDINGS.get("per_field").config(dim=4), config, LAYOUT,
                        gate=OptFSGate(OptFSConfig(), LAYOUT))
    with pytest.raises(ValueError, match="gate.logits belong to no parameter group"):
        Trainer(model, TrainConfig(progress=False, device="cpu"), torch.device("cpu"))


# --------------------------------------------------------------------------------------------- registry
def test_every_searching_kind_has_a_registered_method_with_its_own_folder() -> None:
    kinds = [(registry, name) for registry in (EMBEDDINGS, GATES, INTERACTIONS) for name in registry.names()]
    searching = [name for registry, name in kinds
                 if "stages" in registry.get(name).config.model_fields]
    assert set(searching) == set(SEARCH_METHODS.names()) >= {"optembed", "dnis", "optfs", "optinter"}
    for name in searching:
        method = SEARCH_METHODS.get(name)
        assert method.name == name and method.directory and method.__doc__
    assert is_searching(GATES.get("optfs").config()) and not is_searching(EMBEDDINGS.get("per_field").config())
    with pytest.raises(KeyError, match="unknown search method 'nope'; known: dnis, optembed, optfs, optinter"):
        SEARCH_METHODS.get("nope")


# ---------------------------------------------------------------------------------------------- imports
def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """ctrlab modules ``path`` imports anywhere (module level or inside a function: a deferred import still ties two
    modules together), except under ``if TYPE_CHECKING``."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            if "TYPE_CHECKING" not in ast.unparse(node.test):
                self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:
            found.update(a.name for a in node.names)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)

    Visitor().visit(ast.parse(path.read_text(encoding="utf-8")))
    return {m for m in found if m in modules and m != name}


def test_the_package_has_no_import_cycle() -> None:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(p) for p in paths}
    graph = {_module_name(p): _imports(p, modules) for p in paths}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def walk(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node, [])
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("module", ["ctrlab.search.framework", "ctrlab.serve", "ctrlab.search"])
def test_the_framework_and_serving_import_neither_optuna_nor_the_trainer(module: str) -> None:
    code = (f"import sys, {module}; "
            "bad = [m for m in ('optuna', 'ctrlab.train.trainer', 'ctrlab.train.run', 'ctrlab.sweep') "
            "if m in sys.modules]; print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
