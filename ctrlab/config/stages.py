"""The stage list every searching section shares (``embedding`` kinds that search their table, ``gate`` kinds that
search the feature set, ``interaction`` kinds that search the pairs): which of the method's stages this run runs, and
an earlier run to start from."""

from __future__ import annotations

from collections.abc import Sequence


def check_stages(section: str, stages: Sequence[str], canonical: Sequence[str], from_run: str | None) -> None:
    """``stages`` must list distinct stages of ``canonical`` in its order; stages left out at the front must come
    from ``from_run``, which is set only then. A ``ValueError`` names ``section``'s keys."""
    stages, canonical = list(stages), list(canonical)
    if not stages:
        raise ValueError(f"{section}.stages is empty; list at least one of {', '.join(canonical)}")
    if len(set(stages)) != len(stages) or stages != sorted(stages, key=canonical.index):
        raise ValueError(f"{section}.stages {stages} must list distinct stages in the order {', '.join(canonical)}")
    skipped = canonical[:canonical.index(stages[0])]
    if skipped and from_run is None:
        raise ValueError(f"{section}.stages {stages} skip {', '.join(skipped)}; set {section}.from_run to a run "
                         f"directory that ran {skipped[-1]}, or list {skipped[-1]} in {section}.stages")
    if not skipped and from_run is not None:
        raise ValueError(f"{section}.from_run is set but {section}.stages {stages} start with {stages[0]}, which "
                         "reads nothing from an earlier run; remove from_run or leave the first stages out")


def check_ends_with_retrain(section: str, stages: Sequence[str], what: str) -> None:
    """A search whose searched network is no model to serve (``what`` it holds) must end with ``retrain``."""
    if "retrain" not in stages:
        raise ValueError(f"{section}.stages must end with retrain: the searched network's {what} are not a model to "
                         f"serve (to re-train with other settings later, run [retrain] with {section}.from_run)")
