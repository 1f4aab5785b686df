"""The few git operations `opskit publish` needs, through the git command line."""
from __future__ import annotations

import subprocess
from pathlib import Path

from opskit.errors import OpsError


class GitError(OpsError):
    pass


class GitRepo:
    def __init__(self, root: Path):
        self.root = Path(root)

    @classmethod
    def containing(cls, path: Path) -> "GitRepo":
        out = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=path, capture_output=True, text=True)
        if out.returncode:
            raise GitError(f"{path} is not inside a git repository")
        return cls(Path(out.stdout.strip()))

    def git(self, *args: str, check: bool = True) -> str:
        out = subprocess.run(["git", *args], cwd=self.root, capture_output=True, text=True)
        if check and out.returncode:
            msg = (out.stderr.strip() or out.stdout.strip()).splitlines()
            raise GitError(f"git {args[0]} failed: {msg[-1] if msg else f'exit {out.returncode}'}")
        return out.stdout

    def changed_files(self, pathspec: str) -> list[str]:
        """Untracked (ignored ones too), modified and deleted files under pathspec, relative to the root."""
        out = self.git("status", "--porcelain=v1", "-z", "--untracked-files=all", "--ignored=matching", "--", pathspec)
        entries, paths, i = out.split("\0"), [], 0
        while i < len(entries):
            code, path = entries[i][:2], entries[i][3:]
            if path:
                paths.append(path)
            i += 2 if ("R" in code or "C" in code) else 1  # a rename's source follows it
        return paths

    def add(self, pathspec: str) -> None:
        self.git("add", "--all", "--", pathspec)

    def staged(self, pathspec: str) -> list[str]:
        return [p for p in self.git("diff", "--cached", "--name-only", "-z", "--", pathspec).split("\0") if p]

    def commit(self, message: str, pathspec: str) -> str:
        """Commit only the staged changes under pathspec (others stay staged); return the commit id."""
        self.git("commit", "--quiet", "-m", message, "--", pathspec)
        return self.git("rev-parse", "HEAD").strip()

    def unstage(self, pathspec: str) -> None:
        if self.git("rev-parse", "--verify", "--quiet", "HEAD", check=False).strip():
            self.git("reset", "--quiet", "--", pathspec)
        else:
            self.git("rm", "--cached", "-r", "--quiet", "--ignore-unmatch", "--", pathspec)

    def branch(self) -> str:
        name = self.git("rev-parse", "--abbrev-ref", "HEAD").strip()
        if name == "HEAD":
            raise GitError("detached HEAD: check out a branch before publishing")
        return name

    def remote_for(self, branch: str) -> str:
        """The branch's configured remote, else the only remote, else origin."""
        configured = self.git("config", "--get", f"branch.{branch}.remote", check=False).strip()
        if configured:
            return configured
        remotes = self.git("remote").split()
        if len(remotes) == 1:
            return remotes[0]
        if "origin" in remotes:
            return "origin"
        raise GitError("no git remote to push to: add one (git remote add origin URL) or pass --no-push")

    def push(self, remote: str, branch: str) -> None:
        self.git("push", "--quiet", remote, f"HEAD:refs/heads/{branch}")
