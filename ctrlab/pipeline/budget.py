"""The time budget: ``pipeline.hours`` split over the stages, and how a stage is judged.

Each stage's share is its own ``minutes`` when set, else the rest of the budget in proportion to the stage's
estimate (:meth:`~ctrlab.pipeline.base.PipelineStage.estimate`, from the plain model's training time). Shares are
worked out again before every stage from the time left, so a stage that ran long leaves less to the ones after it
and one that ran short leaves more.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ctrlab.pipeline.base import Candidate


def shares(total_seconds: float | None, estimates: Sequence[float],
           fixed: Sequence[float | None]) -> list[float | None]:
    """Each stage's budget in seconds: ``fixed`` (its own minutes, in seconds) where given, else its estimate's
    share of what ``total_seconds`` leaves; None everywhere without a total."""
    if total_seconds is None:
        return list(fixed)
    left = max(total_seconds - sum(f for f in fixed if f is not None), 0.0)
    weight = sum(e for e, f in zip(estimates, fixed) if f is None)
    open_count = sum(1 for f in fixed if f is None)
    out: list[float | None] = []
    for estimate, own in zip(estimates, fixed):
        if own is not None:
            out.append(own)
        elif weight > 0:
            out.append(left * estimate / weight)
        else:
            out.append(left / max(open_count, 1))
    return out


def maximize(metric: str) -> bool:
    return metric != "logloss"


def judge(candidate: Candidate, before: Candidate, plain: Candidate, metric: str,
          tolerance: float, min_saving: float = 0.01) -> tuple[bool, str]:
    """Keep ``candidate`` when its validation ``metric`` is at most ``tolerance`` worse than the model before it
    and than the plain recipe's model (so costs cannot add up over the stages), and, when it is worse at all, only
    if it stores at least ``min_saving`` fewer parameters: the tolerance buys a smaller model, never a worse one of
    (nearly) the same size. The reason, in words."""
    sign = 1.0 if maximize(metric) else -1.0
    value = candidate.valid(metric)
    if math.isnan(value):
        return False, f"its validation {metric} is undefined"
    against_before = sign * (value - before.valid(metric))
    against_plain = sign * (value - plain.valid(metric))
    if against_before < -tolerance:
        return False, (f"valid {metric} {value:.5f} is {-against_before:.5f} worse than the model before it "
                       f"({before.valid(metric):.5f}; tolerance {tolerance:g})")
    if against_plain < -tolerance:
        return False, (f"valid {metric} {value:.5f} is {-against_plain:.5f} worse than the plain recipe's model "
                       f"({plain.valid(metric):.5f}; tolerance {tolerance:g})")
    if against_before < 0 and candidate.parameters > (1.0 - min_saving) * before.parameters:
        return False, (f"valid {metric} {value:.5f} is {-against_before:.5f} worse than the model before it "
                       f"({before.valid(metric):.5f}) and not {min_saving:.0%} smaller ({candidate.parameters:,} "
                       f"parameters against {before.parameters:,})")
    smaller = (f"; {before.parameters:,} -> {candidate.parameters:,} parameters"
               if candidate.parameters != before.parameters else "")
    return True, f"valid {metric} {value:.5f} ({against_before:+.5f} against the model before it{smaller})"
