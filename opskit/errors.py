"""User-facing errors: one line each, printed by the CLI without a traceback."""
from __future__ import annotations

import difflib


class OpsError(Exception):
    """An error the user can act on; the message says what to do."""

    exit_code = 1


class NotFound(OpsError):
    exit_code = 2


class TargetUnreachable(OpsError):
    """A target (or its scheduler) did not answer, or not in time: its runs keep their last state."""


class CannotRun(OpsError):
    """A program could not be started on this machine (missing, not executable)."""

    def __init__(self, message: str, strerror: str | None = None):
        super().__init__(message)
        self.strerror = strerror


def unknown_name(kind: str, name: str, valid: list[str] | tuple[str, ...]) -> NotFound:
    """'unknown config 'hybrid_a0.2' (did you mean hybrid_a0.2_t100k?); valid: ...'"""
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.4)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return NotFound(f"unknown {kind} '{name}'{hint}; valid: {', '.join(valid) or '(none)'}")
