"""The settings every pipeline stage has (:class:`StageConfigBase`), apart from the stages' implementations so that
the recipe schema can hold the stage configs without importing the trainer."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from ctrlab.config.base import Section

#: What the model before the first stage (the plain recipe) provides to the stages.
PLAIN_PRODUCTS = frozenset({"model"})


class StageConfigBase(Section):
    """The settings every stage has: ``stage`` (its name) and ``minutes``, its time budget (default: its share of
    ``pipeline.hours``, in proportion to its estimate).

    Class attributes a stage's config sets: ``ORDER`` (stages run in ascending order), ``PRODUCES`` (what a later
    stage may need, e.g. ``final_model``) and ``NEEDS`` (what an earlier stage must produce)."""

    stage: str
    minutes: float | None = Field(None, gt=0, le=1e6, description="this stage's time budget in minutes (default: "
                                  "its share of pipeline.hours, in proportion to its estimate)")

    ORDER: ClassVar[int] = 0
    PRODUCES: ClassVar[frozenset[str]] = frozenset()
    NEEDS: ClassVar[dict[str, str]] = {}  # product -> the stage that makes it (for the message)

    def needs(self) -> dict[str, tuple[str, str]]:
        """What this stage needs from earlier stages: ``{product: (key that needs it, stage that makes it)}``
        (default: :attr:`NEEDS`, for the ``stage`` key)."""
        return {product: ("stage", maker) for product, maker in self.NEEDS.items()}
