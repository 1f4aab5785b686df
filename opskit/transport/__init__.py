"""How opskit reaches a machine: one Shell passed in (as fabric passes a Connection), this machine's
(local.py) or a box's over SSH (ssh.py). Targets speak to their agent through a shell; rsync asks it
for its endpoint (rsync.py). `shell_for` is the one place that decides "here or over SSH".
"""
from __future__ import annotations

import shlex
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator


@dataclass(frozen=True)
class Result:
    exit_code: int
    stdout: str
    stderr: str


def quote(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


class Shell(ABC):
    """Runs commands and moves files on one machine. Failures to reach it raise TargetUnreachable
    (opskit/errors.py); a command that ran and failed is a Result with a non-zero exit code."""

    local: bool  # this machine: code runs in place, no copy needed

    @abstractmethod
    def run(self, argv: list[str] | str, stdin: str | None = None, timeout: float = 60,
            on_line: Callable[[str], None] | None = None, env: dict[str, str] | None = None,
            label: str | None = None) -> Result:
        """Run an argv (or a bash script, given as one string) and wait at most `timeout` seconds.
        With `on_line`, stdout lines are passed on as they arrive; `label` names the command in errors."""

    @abstractmethod
    def stream(self, argv: list[str]) -> Iterator[str]:
        """Yield the command's stdout as it arrives; closing the generator stops the command."""

    @abstractmethod
    def fetch(self, src_dir: str, names: list[str], dest: Path) -> None:
        """Copy the named files of `src_dir` on the machine into `dest` here (partial files resume)."""

    @abstractmethod
    def expand_home(self, path: str) -> str:
        """`~` and `~/...` as absolute paths on the machine."""

    @abstractmethod
    def rsync_endpoint(self, path: str) -> tuple[str, list[str]]:
        """rsync's name for `path` on the machine and the options it needs (`-e ssh ...`, or none)."""


def shell_for(config: dict) -> Shell:
    """The shell of a target's stored config: over SSH when it names a host, else this machine."""
    if config.get("host"):
        from opskit.transport.ssh import Address, SSHShell
        return SSHShell(Address(config["host"], config.get("user"), config.get("port"), config.get("key"),
                                config.get("known_hosts")))
    from opskit.transport.local import LocalShell
    return LocalShell()
