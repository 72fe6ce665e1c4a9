"""One hierarchy for errors a user can fix (exit 2) as opposed to bugs (exit 1)."""
from __future__ import annotations


class PtqError(Exception):
    """A problem with the user's input: the message names the culprit and a fix."""

    exit_code = 2


class ModelError(PtqError):
    """The model spec, its weights or its architecture cannot be used."""


class WeightsMissingError(ModelError):
    """Pretrained weights were asked for but are not on this machine."""


class DataError(PtqError):
    """Calibration or evaluation data is missing, empty or malformed."""


class RecipeError(PtqError):
    """A recipe file or override is invalid."""


class ManifestError(PtqError):
    """A manifest directory is missing, corrupt or of an unsupported version."""


class UnsupportedOpError(PtqError):
    """The captured graph contains an op outside the integer op set."""


class BudgetError(PtqError):
    """A budget or constraint cannot be met; `key` and `least` say which budget binds and what would work."""

    def __init__(self, message: str, key: str | None = None, least: float | None = None):
        super().__init__(message)
        self.key, self.least = key, least


class OutputError(PtqError):
    """An output location cannot be written safely, or an exported file cannot be read."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type's name: third-party errors
    (torch, PIL, numpy) often run to many lines, and a PtqError message is one."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
