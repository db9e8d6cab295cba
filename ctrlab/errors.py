"""User-facing errors.

Every problem a user can fix (bad recipe, missing file or column, wrong dtype, bad labels) is raised as a
:class:`CtrlabError` whose message is one line naming the file, column, key and row where it applies. The CLI
prints that line and exits with status 2, with no traceback.
"""

from __future__ import annotations


class CtrlabError(Exception):
    """An error caused by the user's input, with a one-line message that says what to fix."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split("\n")))
        self.message = self.args[0]


class RecipeError(CtrlabError):
    """The recipe (or an override) is invalid: unknown key, wrong type, bad value."""


class DataError(CtrlabError):
    """A data file is missing, empty, malformed, or disagrees with the recipe."""


class TrainingDiverged(CtrlabError):
    """The loss became NaN or infinite; the message suggests what to change in the recipe."""


class StoppedByRankZero(CtrlabError):
    """A training process other than rank 0 stops because rank 0 met a user error, which rank 0 reports; this one
    exits with the same status and says nothing (one line for the run, not one per process)."""

    def __init__(self) -> None:
        super().__init__("")
