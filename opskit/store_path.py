"""Which run store (state.db) a command uses, and one-line errors that name it (README.md "Where
things live").

`--state PATH` or `OPSKIT_STATE` choose it; otherwise the nearest `state.db` in the working directory
or a folder above it (as git finds its repository, not crossing into another filesystem); with none,
`./state.db`, created by the commands that set a project up (`launch`, `targets ...`). A store is
never created in a directory that does not exist. Standard library only: `opskit --help` stays fast.
"""
from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from opskit.errors import OpsError

STORE_NAME = "state.db"
ENV = "OPSKIT_STATE"
SQLITE_HEADER = b"SQLite format 3\x00"


class StoreError(OpsError):
    """The store cannot be used as it is; the message names its file and what to do."""


@dataclass(frozen=True)
class StoreChoice:
    path: Path
    how: str  # "--state", "OPSKIT_STATE", "found" (here or above), "default" (./state.db, none found)

    @property
    def is_here(self) -> bool:
        return self.path.resolve().parent == Path.cwd().resolve()


def choose(option: str | None, cwd: Path | None = None) -> StoreChoice:
    """The store a command uses: `option` (--state), else OPSKIT_STATE, else the nearest state.db."""
    if option:
        return StoreChoice(Path(option), "--state")
    if os.environ.get(ENV):
        return StoreChoice(Path(os.environ[ENV]), ENV)
    start = (cwd or Path.cwd()).resolve()
    device = start.stat().st_dev
    for folder in (start, *start.parents):
        try:
            if folder.stat().st_dev != device:
                break  # another filesystem: as git, do not look past a mount point
        except OSError:
            break
        if (folder / STORE_NAME).exists():
            return StoreChoice(folder / STORE_NAME, "found")
    return StoreChoice(start / STORE_NAME, "default")


def check_file(choice: StoreChoice, create: bool) -> None:
    """Raise StoreError (one line, naming the path) unless the store file can be opened as one:
    a directory, a missing parent directory, an empty file, a file that is not SQLite; a store
    that does not exist yet is only created when `create`."""
    path, named = choice.path, _named(choice)
    if path.is_dir():
        raise StoreError(f"{named} is a directory, not a run store; give the store's file, e.g. {path / STORE_NAME}")
    if not path.exists():
        if not path.parent.is_dir():
            raise StoreError(f"{named}: the directory {path.parent} does not exist (a typo?); no store was created")
        if not create:
            where = (f"no {STORE_NAME} in {Path.cwd()} or a folder above it" if choice.how == "default"
                     else f"no run store at {path}")
            raise StoreError(f"{where}: `opskit launch` (or `opskit targets add`) creates one, or pass --state PATH")
        return
    try:
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_HEADER))
    except OSError as e:
        raise StoreError(f"cannot read the run store {path}: {e.strerror or e}") from None
    if not head:
        raise StoreError(f"the run store {path} is empty (0 bytes; a copy or a write cut short?): restore it "
                         f"from a backup, or move it aside to start a new store there")
    if head != SQLITE_HEADER:
        raise StoreError(f"{path} is not a run store (not an SQLite database): check --state, or move the file aside")


def describe(path: Path, error: sqlite3.Error) -> str:
    """What an SQLite error means for the store at `path`, and what to do, in one line."""
    text = str(error)
    low = text.lower()
    if "malformed" in low or "not a database" in low:
        return (f"the run store {path} is corrupt ({text}): restore it from a backup, or salvage it with "
                f"`sqlite3 {path} .recover | sqlite3 recovered.db` and use --state recovered.db")
    if "readonly" in low or "read-only" in low:
        return (f"the run store {path} cannot be written ({text}): opskit records every command there; "
                f"make it (and its directory) writable, or copy it somewhere writable and pass --state")
    if "unable to open" in low:
        why = "its directory is not writable" if not os.access(path.parent, os.W_OK) else "see its permissions"
        return f"cannot open the run store {path} ({text}; {why})"
    if "disk is full" in low or "disk i/o" in low:
        return f"the run store {path}: {text} (a full or failing disk): free some space and try again"
    if "locked" in low:
        return f"the run store {path} stayed locked ({text}): another opskit command holds it; try again"
    return f"the run store {path}: {text}"


def _named(choice: StoreChoice) -> str:
    return f"--state {choice.path}" if choice.how == "--state" else (
        f"{ENV}={choice.path}" if choice.how == ENV else str(choice.path))
