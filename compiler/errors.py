"""The one tree of kernform errors.

Every failure a user can see is one of these, and the class says who must act:
the author of the intent file, the operator of the host (kernel state,
permissions, a transient condition), or kernform's developers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class KernformError(Exception):
    """Base of every error kernform raises on purpose."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong in an intent file, with where it is (1-based line and column)."""

    file: str
    line: int
    column: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}: {self.message}"


class IntentError(KernformError):
    """The intent file is wrong: its author must fix it. Carries every problem found, each at file:line:col."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = sorted(problems, key=lambda p: (p.file, p.line, p.column, p.message))
        super().__init__("\n".join(str(p) for p in self.problems))


DocPath = tuple[str | int, ...]


def dotted(path: DocPath) -> str:
    """A document path as people write it: spec.interception.rules[2].sources."""
    text = ""
    for step in path:
        text += f"[{step}]" if isinstance(step, int) else f".{step}" if text else str(step)
    return text


class BackendUnavailable(KernformError):
    """The chosen backend cannot express this intent: the user must change the intent or pick the other backend.

    Carries every refusal as a (document path, message) finding, so that whoever holds the file's positions
    (LoadedIntent.problems_at) can report each at FILE:LINE:COL; str() names the paths instead.
    """

    def __init__(self, reason: str | Sequence[tuple[DocPath, str]]) -> None:
        self.findings: list[tuple[DocPath, str]] = [((), reason)] if isinstance(reason, str) else list(reason)
        super().__init__("\n".join(f"{dotted(path)}: {message}" if path else message
                                   for path, message in self.findings))


class KernelError(KernformError):
    """The kernel refused or failed an operation: the operator must look (permissions, missing feature, a conflict)."""


class TemporaryError(KernelError):
    """A transient kernel condition (busy, interrupted): retrying the whole pass may help."""


class ApplyError(KernelError):
    """An apply did not reach the desired state; the previous state was restored. Carries the residual diff."""

    def __init__(self, message: str, residual: object | None = None) -> None:
        self.residual = residual
        super().__init__(message)


class InternalError(KernformError):
    """A bug in kernform: its developers must fix it. Please report it with the intent that triggered it."""
