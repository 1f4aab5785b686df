"""User-facing errors: one line each, printed by the CLI without a traceback."""
from __future__ import annotations

import difflib


# The exit codes of every command (README.md "Exit codes"): scripts can tell these apart.
EXIT_OK = 0
EXIT_ERROR = 1  # it did not do what was asked; one line on stderr says why
EXIT_USAGE = 2  # a mistake in the command: unknown run/target/phase name, bad option (Typer's own too)
EXIT_INCOMPLETE = 3  # part of it was not done: launch refused a run, pull missed a run
EXIT_UNREACHABLE = 4  # a target (or its scheduler) did not answer
EXIT_INTERRUPTED = 130  # Ctrl-C


class OpsError(Exception):
    """An error the user can act on; the message says what to do."""

    exit_code = EXIT_ERROR


class NotFound(OpsError):
    exit_code = EXIT_USAGE


class Incomplete(OpsError):
    """Some of what a command was asked to do was not done (the output above says which and why)."""

    exit_code = EXIT_INCOMPLETE


class NoSpace(OpsError):
    """A target's disk is full: the message names the target, the path and the free space."""


class TargetUnreachable(OpsError):
    """A target (or its scheduler) did not answer, or not in time: its runs keep their last state."""

    exit_code = EXIT_UNREACHABLE


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
