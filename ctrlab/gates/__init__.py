"""Feature gates: the model slot between the embedding and the block (``CTRModel.gate``), where a feature-set
search scales every feature value's vector by a learned gate (OptFS, :mod:`ctrlab.gates.optfs`). A gate works on
the output of every embedding kind, so it needs nothing from the table behind it.

Each gate kind is one module that registers its config in :data:`GATES`; recipes select it with ``gate.kind``.
"""

from ctrlab.registry import Registry

GATES: Registry = Registry("gate", "kind", "ctrlab.gates")

from ctrlab.gates.base import FeatureGate  # noqa: E402

__all__ = ["GATES", "FeatureGate"]
