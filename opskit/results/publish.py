"""`opskit publish`: commit results/ (raw artifacts, tables, figures) and push it, refusing weights,
big files and anything that looks like a secret, judged by each file's bytes as well as its name
(opskit/results/content_guard.py). A refusal changes nothing: no commit, no index entry."""
from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from opskit.errors import OpsError
from opskit.results.content_guard import scan_file
from opskit.results.git_repo import GitRepo
from train.contract import run_name

DEFAULT_MAX_MB = 5.0
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".distcp", ".pkl", ".pickle", ".npy", ".npz",
                   ".h5", ".hdf5", ".gguf", ".ggml", ".onnx", ".tflite", ".keras", ".joblib", ".msgpack")
CHECKPOINT_DIRS = re.compile(r"^(ckpt|checkpoints?|step_\d+)$")
OPTIMIZER_NAME = re.compile(r"(^|[_.-])optim(izer)?([_.-]|$)", re.IGNORECASE)
SECRET_NAMES = re.compile(r"^(id_(rsa|dsa|ecdsa|ed25519)|\.env(\..*)?|.*\.env|\.envrc|\.netrc|_netrc|\.pgpass|"
                          r"\.git-credentials|\.pypirc|credentials(\..*)?|.*\.(pem|key|p12|pfx|jks|keystore))$", re.IGNORECASE)
MAX_REASONS = 3  # credential lines named per file


class PublishError(OpsError):
    pass


class PublishRefused(PublishError):
    def __init__(self, message: str, refused: dict[str, list[str]]):
        super().__init__(message)
        self.refused = refused  # path -> reasons


@dataclass
class PublishResult:
    commit: str
    files: list[str]
    runs: list[str]
    phases: list[str]
    pushed_to: str | None = None
    pushed_commits: int = 0  # commits the push sent: this one and earlier unpushed ones
    summary: str = ""        # the one line to show
    notes: list[str] = field(default_factory=list)


def problems(path: Path, rel: str, max_bytes: int) -> list[str]:
    """Why `path` (shown as `rel`) must not be published: its name, its format, its size, the
    credentials in it. Empty when it may be published."""
    parts = PurePosixPath(rel).parts
    name = parts[-1]
    if path.is_symlink():
        return ["a symlink"]
    reasons = []
    if name.lower().endswith(WEIGHT_SUFFIXES):
        reasons.append("checkpoint/weight file (name)")
    elif any(CHECKPOINT_DIRS.match(p) for p in parts[:-1]):
        reasons.append("inside a checkpoint directory")
    elif OPTIMIZER_NAME.search(PurePosixPath(name).stem):
        reasons.append("optimizer state")
    if SECRET_NAMES.match(name):
        reasons.append("looks like a secret (file name)")
    size = path.stat().st_size
    too_big = size > max_bytes
    found = scan_file(path, limit=MAX_REASONS + 1, credentials=not (reasons or too_big))
    reasons += [str(f) for f in found[:MAX_REASONS]] + (["and more"] if len(found) > MAX_REASONS else [])
    if too_big:
        reasons.append(f"{size / 2**20:.1f} MB, over the {max_bytes / 2**20:g} MB limit")
    return reasons


def refusal(refused: dict[str, list[str]], head: str | None = None) -> PublishRefused:
    """One line saying what was refused, then one line per file: `path: reason; reason`."""
    n = f"{len(refused)} file{'s' if len(refused) > 1 else ''}"
    head = head.format(n=n) if head else f"refusing to publish {n} (nothing was committed or staged):"
    return PublishRefused("\n".join([head, *(f"  {rel}: {'; '.join(why)}" for rel, why in refused.items())]), refused)


def check_worktree(repo: GitRepo, files: list[str], max_bytes: int) -> dict[str, list[str]]:
    refused = {}
    for f in files:
        path = repo.root / f
        if (path.is_file() or path.is_symlink()) and (why := problems(path, f, max_bytes)):
            refused[f] = why
    return refused


def check_unpushed(repo: GitRepo, commits: list[str], rel: str, max_bytes: int) -> dict[str, list[str]]:
    """The same check over what earlier unpushed commits (--no-push, by hand) hold under `rel`."""
    refused, seen = {}, set()
    with tempfile.TemporaryDirectory(prefix="opskit-publish-") as tmp:
        for commit, path, mode, blob in repo.new_blobs(commits, rel):
            if blob in seen or mode == "160000":  # a submodule is no file of ours
                continue
            seen.add(blob)
            shown = f"{path} in commit {commit[:10]}"
            if mode == "120000":
                refused[shown] = ["a symlink"]
                continue
            copy = Path(tmp) / PurePosixPath(path).name
            repo.write_blob(blob, copy)
            if why := problems(copy, path, max_bytes):
                refused[shown] = why
            copy.unlink()
    return refused


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
    if refused := check_worktree(repo, changed, max_bytes):
        raise refusal(refused)
    remote = branch = None
    pending: list[str] = []
    if push:  # before committing, so a missing remote or a bad earlier commit leaves everything as it was
        branch = repo.branch()
        remote = repo.remote_for(branch)
        pending = repo.unpushed(remote)
        if refused := check_unpushed(repo, pending, rel, max_bytes):
            raise refusal(refused, f"refusing to push: {{n}} in earlier commits not on {remote} yet (nothing was "
                                   f"committed, staged or pushed); take them out of the branch first "
                                   f"(git rebase -i {remote}/{branch}):")
    if not changed:
        if not pending:
            where = f" and {remote}/{branch} has every commit" if push else ""
            raise PublishError(f"nothing to publish: {rel}/ has no new or changed files{where}")
        return _push_only(repo, remote, branch, pending)
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
    result.summary = (f"committed {commit[:10]}: {len(files)} files, {len(runs)} runs, "
                      f"phases {', '.join(phases) or '-'}")
    if remote:
        result.pushed_commits = _push(repo, remote, branch, [commit, *pending], f"committed {commit[:10]} locally, but")
        result.pushed_to = f"{remote}/{branch}"
        earlier = f" ({result.pushed_commits - 1} earlier)" if result.pushed_commits > 1 else ""
        result.summary += f"; pushed {_commits(result.pushed_commits)}{earlier} to {result.pushed_to}"
    return result


def _commits(n: int) -> str:
    return f"{n} commit{'s' if n != 1 else ''}"


def _push(repo: GitRepo, remote: str, branch: str, pending: list[str], done: str) -> int:
    try:
        return repo.push(remote, branch, pending)
    except OpsError as e:
        raise PublishError(f"{done} the push to {remote} failed ({e}); push later with: git push {remote} {branch}") from None


def _push_only(repo: GitRepo, remote: str, branch: str, pending: list[str]) -> PublishResult:
    """Nothing new to commit, but earlier commits (publish --no-push) are not on the remote yet."""
    n = _push(repo, remote, branch, pending, f"nothing new to commit and {_commits(len(pending))} to push, but")
    summary = f"nothing new to commit; pushed {n} earlier commit{'s' if n != 1 else ''} to {remote}"
    return PublishResult(commit=pending[0], files=[], runs=[], phases=[], pushed_to=f"{remote}/{branch}",
                         pushed_commits=n, summary=summary)
