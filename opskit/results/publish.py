"""`opskit publish`: commit results/ (raw artifacts, tables, figures) and push it, refusing weights,
big files and anything that looks like a secret. A refusal changes nothing: no file, no index entry."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from opskit.errors import OpsError
from opskit.results.git_repo import GitRepo
from train.contract import run_name

DEFAULT_MAX_MB = 5.0
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".distcp", ".pkl", ".pickle", ".npz", ".h5", ".gguf")
CHECKPOINT_DIRS = re.compile(r"^(ckpt|checkpoints?|step_\d+)$")
OPTIMIZER_NAME = re.compile(r"(^|[_.-])optim(izer)?([_.-]|$)", re.IGNORECASE)
SECRET_NAMES = re.compile(r"^(id_(rsa|dsa|ecdsa|ed25519)|\.env(\..*)?|\.netrc|credentials(\..*)?|.*\.(pem|key|p12|pfx))$")
SECRET_TEXT = [
    ("a private key", re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY( BLOCK)?-----")),
    ("a GitHub token", re.compile(r"\b(gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})")),
    ("a Hugging Face token", re.compile(r"\bhf_[A-Za-z0-9]{30,}")),
    ("an AWS access key", re.compile(r"\bAKIA[0-9A-Z]{16}\b")),
    ("a Slack token", re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}")),
    ("an API key", re.compile(r"\bsk-[A-Za-z0-9_-]{32,}")),
    ("a credential assignment", re.compile(r"(?i)\b(api[_-]?key|secret|token|password|passwd)[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9_\-/+=]{16,}")),
]
SCAN_BYTES = 2 << 20  # secrets are looked for in the first 2 MiB of each file


class PublishError(OpsError):
    pass


class PublishRefused(PublishError):
    pass


@dataclass
class PublishResult:
    commit: str
    files: list[str]
    runs: list[str]
    phases: list[str]
    pushed_to: str | None = None
    notes: list[str] = field(default_factory=list)


def problem(path: Path, rel: str, max_bytes: int) -> str | None:
    """Why `path` must not be published, or None."""
    parts = PurePosixPath(rel).parts
    name = parts[-1]
    if name.lower().endswith(WEIGHT_SUFFIXES):
        return "checkpoint/weight file"
    if any(CHECKPOINT_DIRS.match(p) for p in parts[:-1]):
        return "inside a checkpoint directory"
    if OPTIMIZER_NAME.search(PurePosixPath(name).stem):
        return "optimizer state"
    if SECRET_NAMES.match(name):
        return "looks like a secret (file name)"
    size = path.stat().st_size
    if size > max_bytes:
        return f"{size / 2**20:.1f} MB, over the {max_bytes / 2**20:g} MB limit"
    with open(path, "rb") as f:
        text = f.read(SCAN_BYTES).decode("utf-8", errors="ignore")
    for what, pattern in SECRET_TEXT:
        if pattern.search(text):
            return f"looks like a secret ({what})"
    return None


def runs_and_phases(files: list[str], results_rel: str) -> tuple[list[str], list[str]]:
    """Run names (phase/config/s<seed>) and phases of files under <results>/raw/."""
    runs, phases = set(), set()
    prefix = PurePosixPath(results_rel, "raw").parts
    for f in files:
        parts = PurePosixPath(f).parts
        if parts[:len(prefix)] != prefix or len(parts) < len(prefix) + 1:
            continue
        rest = parts[len(prefix):]
        phases.add(rest[0])
        if len(rest) >= 4 and rest[2].startswith("seed") and rest[2][4:].isdigit():
            runs.add(run_name(rest[0], rest[1], int(rest[2][4:])))
    return sorted(runs), sorted(phases)


def commit_message(subject: str | None, files: list[str], runs: list[str], phases: list[str]) -> str:
    head = subject or f"results: {len(runs)} run(s) of phase(s) {', '.join(phases) or '(none)'}"
    body = [f"Phases: {', '.join(phases) or '(none)'}", f"Files: {len(files)}", "", "Runs:"]
    body += [f"- {r}" for r in runs] or ["- (none: processed tables and figures only)"]
    return head + "\n\n" + "\n".join(body) + "\n"


def publish(results_dir: Path, message: str | None = None, push: bool = True, max_mb: float = DEFAULT_MAX_MB) -> PublishResult:
    results_dir = Path(results_dir).resolve()
    if not results_dir.is_dir():
        raise PublishError(f"{results_dir}: no results directory to publish")
    repo = GitRepo.containing(results_dir)
    rel = results_dir.relative_to(repo.root.resolve()).as_posix()
    changed = repo.changed_files(rel)
    max_bytes = int(max_mb * 2**20)
    offending = []
    for f in changed:
        path = repo.root / f
        if path.is_file() and not path.is_symlink() and (why := problem(path, f, max_bytes)):
            offending.append(f"{f} ({why})")
        elif path.is_symlink():
            offending.append(f"{f} (a symlink)")
    if offending:
        raise PublishRefused(f"refusing to publish, nothing was committed: {'; '.join(offending)}")
    if not changed:
        raise PublishError(f"nothing to publish: {rel}/ has no new or changed files")
    target = None
    if push:  # before committing, so a missing remote leaves everything as it was
        branch = repo.branch()
        target = (repo.remote_for(branch), branch)
    repo.add(rel)
    files = repo.staged(rel)
    if not files:
        raise PublishError(f"nothing to publish: {rel}/ has no new or changed files git would track")
    runs, phases = runs_and_phases(files, rel)
    try:
        commit = repo.commit(commit_message(message, files, runs, phases), rel)
    except OpsError:
        repo.unstage(rel)
        raise
    result = PublishResult(commit=commit, files=files, runs=runs, phases=phases)
    if target:
        remote, branch = target
        try:
            repo.push(remote, branch)
        except OpsError as e:
            raise PublishError(f"committed {commit[:10]} locally, but the push to {remote} failed ({e}); "
                               f"push later with: git push {remote} {branch}") from None
        result.pushed_to = f"{remote}/{branch}"
    return result
