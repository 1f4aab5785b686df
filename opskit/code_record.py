"""What code and packages a run was launched with: code.diff and environment.txt (docs/run-directory.md).

Git through subprocess, no torch. At launch opskit records, from the checkout it launches from:
- `code.diff`: a header naming the commit (HEAD), then every uncommitted change against it: staged and
  unstaged edits of tracked files and the content of untracked, not ignored files, as one patch that
  `git apply` applies to a checkout of that commit. A clean tree gives the header alone.
- `environment.txt`: the trainer python's `pip freeze` (run where the trainer runs: `environment_argv`).
"""
from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from opskit.errors import OpsError
from train.contract import CODE_DIFF, code_dirty

MAX_UNTRACKED_BYTES = 1 << 20  # an untracked file above this (data, a checkpoint) is named, not copied
HEADER = "# opskit code.diff: uncommitted changes against commit {commit} ({branch}); `git apply` it there"


@dataclass(frozen=True)
class CodeRecord:
    commit: str | None  # HEAD of the checkout; None outside a git repository
    dirty: bool
    diff: str  # the text of code.diff


def _git(repo: Path, *args: str, ok=(0,)) -> str:
    try:
        proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        raise OpsError(f"git {args[0]} in {repo} failed: {e}") from None
    if proc.returncode not in ok:
        why = proc.stderr.decode(errors="replace").strip().splitlines()
        raise OpsError(f"git {args[0]} in {repo} failed: {why[-1] if why else f'exit {proc.returncode}'}")
    return proc.stdout.decode(errors="replace")


def record_code(repo: str | Path, paths: tuple[str, ...] | list[str] = ()) -> CodeRecord:
    """The commit and code.diff of the work tree at `repo`, limited to `paths` under it when given
    (launch records the code a run uses, not pulled results). A checkout without commits, or no git
    repository (or no git) at all, records that in the header and is dirty only when it has files."""
    repo = Path(repo).resolve()
    spec = ["--", *(str(repo / p) for p in paths)] if paths else []
    try:
        inside = subprocess.run(["git", "-C", str(repo), "rev-parse", "--is-inside-work-tree"],
                                capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return CodeRecord(None, False, f"# opskit code.diff: git cannot run here; no code recorded for {repo}\n")
    if inside.returncode != 0 or inside.stdout.strip() != "true":
        return CodeRecord(None, False, f"# opskit code.diff: {repo} is not a git work tree; no code recorded\n")
    top = Path(_git(repo, "rev-parse", "--show-toplevel").strip())
    has_head = subprocess.run(["git", "-C", str(top), "rev-parse", "--verify", "-q", "HEAD"],
                              capture_output=True, text=True)
    commit = has_head.stdout.strip() if has_head.returncode == 0 else None
    branch = _git(top, "rev-parse", "--abbrev-ref", "HEAD", ok=(0, 128)).strip() or "no branch"
    parts = [HEADER.format(commit=commit or "(none yet)", branch=branch) + "\n"]
    if commit:  # staged + unstaged changes of tracked files, against HEAD, without touching the index
        parts.append(_git(top, "diff", "--binary", "--no-color", "--no-ext-diff", "HEAD", *spec))
    else:
        parts.append(_git(top, "diff", "--binary", "--no-color", "--no-ext-diff", "--cached", *spec))
    untracked = _git(top, "ls-files", "--others", "--exclude-standard", "-z", *spec).split("\0")
    for rel in sorted(p for p in untracked if p):
        path = top / rel
        if path.is_symlink() or not path.is_file():
            continue
        size = path.stat().st_size
        if size > MAX_UNTRACKED_BYTES:
            parts.insert(1, f"# opskit: untracked {rel} ({size} bytes) left out: over {MAX_UNTRACKED_BYTES} bytes\n")
            continue
        # --no-index exits 1 when the files differ, which they always do here
        parts.append(_git(top, "diff", "--binary", "--no-color", "--no-index", "--", "/dev/null", rel, ok=(0, 1)))
    diff = "".join(parts)
    return CodeRecord(commit, any(line.startswith("diff --git ") for line in diff.splitlines()), diff)


# ---------------------------------------------------------------- environment.txt

ENVIRONMENT_SCRIPT = """\
import subprocess, sys, platform
print(f"# python {platform.python_version()} at {sys.executable}")
try:
    out = subprocess.run([sys.executable, "-m", "pip", "freeze", "--all"], capture_output=True, text=True, timeout=120)
    ok = out.returncode == 0
except Exception:
    ok = False
if ok:
    print("# pip freeze --all")
    print(out.stdout, end="")
else:
    from importlib import metadata
    print("# pip is not installed here: the installed distributions (importlib.metadata)")
    for name, version in sorted({(d.metadata["Name"], d.version) for d in metadata.distributions()}):
        print(f"{name}=={version}")
"""


def environment_argv(python: str) -> list[str]:
    """The command that prints environment.txt for the trainer's `python` (run it where that python is)."""
    return [python, "-c", ENVIRONMENT_SCRIPT]


def environment_text(python: str | None = None) -> str:
    """environment.txt for a python on this machine (default: this one)."""
    argv = environment_argv(python or sys.executable)
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=180)
    except (OSError, subprocess.SubprocessError) as e:
        raise OpsError(f"could not run {argv[0]}: {e}") from None
    if proc.returncode != 0:
        why = proc.stderr.strip().splitlines()
        raise OpsError(f"{argv[0]} could not list its packages: {why[-1] if why else f'exit {proc.returncode}'}")
    return proc.stdout


def read_record(run_dir: str | Path) -> dict | None:
    """{"commit", "dirty"} from a run directory's code.diff (for `runs show`), None without one."""
    dirty = code_dirty(run_dir)
    if dirty is None:
        return None
    first = (Path(run_dir) / CODE_DIFF).open(errors="replace").readline()
    m = re.search(r"against commit ([0-9a-f]{7,64})\b", first)
    return {"commit": m.group(1) if m else None, "dirty": dirty}


def launched_dirty(run_dir: str | Path) -> bool | None:
    """For `runs show`: True when the run's code.diff holds uncommitted changes, False for a clean tree,
    None when the run has no code.diff (launched before opskit recorded code, or not pulled yet)."""
    return code_dirty(run_dir)
