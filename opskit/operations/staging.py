"""A pulled run's folder changes as a whole or not at all: files arrive in a staging folder beside it
(hard links of what is already there, then the new files), the manifest is written there last, and
the two folders are swapped in one rename. An interrupted pull leaves the folder and its manifest as
they were; its staging folder (with rsync's partial files, so the next pull resumes) is picked up
next time."""
from __future__ import annotations

import ctypes
import os
import shutil
from pathlib import Path

PARTIAL_DIR = ".rsync-partial"  # opskit/transport/rsync.py fetch_argv
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def staging_dir(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.pulling"


def old_dir(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.old"


def recover(dest: Path) -> None:
    """Finish what a pull killed during a (non-atomic) swap left: the old folder back, or away."""
    old = old_dir(dest)
    if old.exists():
        if dest.exists():
            shutil.rmtree(old)
        else:
            old.rename(dest)


def begin(dest: Path) -> Path:
    """A staging folder holding hard links of everything in `dest` (which stays untouched: every
    fetch replaces a file by a rename, never writes into a linked one); a previous interrupted
    pull's partial files are kept."""
    recover(dest)
    staging = staging_dir(dest)
    staging.mkdir(parents=True, exist_ok=True)
    for entry in staging.iterdir():
        if entry.name == PARTIAL_DIR:
            continue
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    (staging / ".gitignore").write_text("*\n")  # never published, should a pull die here
    if dest.exists():
        for src in dest.rglob("*"):
            target = staging / src.relative_to(dest)
            if src.is_dir() and not src.is_symlink():
                target.mkdir(exist_ok=True)
            elif src.name != ".gitignore" or src.parent != dest:
                try:
                    os.link(src, target, follow_symlinks=False)
                except OSError:  # a filesystem without hard links
                    shutil.copy2(src, target, follow_symlinks=False)
    return staging


def commit(staging: Path, dest: Path) -> None:
    """Swap the staging folder in for `dest`, atomically where the kernel can exchange two names."""
    shutil.rmtree(staging / PARTIAL_DIR, ignore_errors=True)
    (staging / ".gitignore").unlink(missing_ok=True)
    if (dest / ".gitignore").exists():  # the user's own: keep it
        os.link(dest / ".gitignore", staging / ".gitignore")
    if not dest.exists():
        staging.rename(dest)
        return
    if _exchange(staging, dest):
        shutil.rmtree(staging)
        return
    old = old_dir(dest)
    dest.rename(old)
    staging.rename(dest)
    shutil.rmtree(old)


def _exchange(a: Path, b: Path) -> bool:
    """renameat2(RENAME_EXCHANGE): both names swapped at once (Linux 3.15+, most filesystems)."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0
