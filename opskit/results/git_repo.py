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

    def unpushed(self, remote: str) -> list[str]:
        """Commits of HEAD on none of `remote`'s branches as this clone last saw them, newest first."""
        return self.git("rev-list", "HEAD", "--not", f"--remotes={remote}").split()

    def new_blobs(self, commits: list[str], pathspec: str) -> list[tuple[str, str, str, str]]:
        """(commit, path, mode, blob) of each file under pathspec that `commits` add or change."""
        out = []
        for commit in commits:
            raw = self.git("diff-tree", "-r", "-z", "--root", "--no-commit-id", "--diff-filter=AMRCT", commit, "--", pathspec)
            fields, i = raw.split("\0"), 0
            while i < len(fields) - 1:
                meta = fields[i].split()  # ":old_mode new_mode old_blob new_blob status"
                if len(meta) < 5:
                    break
                step = 3 if meta[4][0] in "RC" else 2  # a rename or copy names its source, then its path
                out.append((commit, fields[i + step - 1], meta[1], meta[3]))
                i += step
        return out

    def write_blob(self, blob: str, dest: Path) -> None:
        with open(dest, "wb") as f:
            out = subprocess.run(["git", "cat-file", "blob", blob], cwd=self.root, stdout=f, stderr=subprocess.PIPE)
        if out.returncode:
            raise GitError(f"git cat-file failed: {out.stderr.decode(errors='replace').strip()}")

    def push(self, remote: str, branch: str, pending: list[str]) -> int:
        """Push HEAD to remote's `branch`; the number of commits it sent (`pending`: what
        `unpushed` said before, for a branch the remote did not have)."""
        out = self.git("push", "--porcelain", remote, f"HEAD:refs/heads/{branch}")
        for line in out.splitlines():
            parts = line.split("\t")
            if len(parts) == 3 and parts[1].endswith(f"refs/heads/{branch}"):
                flag, summary = parts[0], parts[2]
                if flag == "=":
                    return 0
                if ".." in summary and flag in " +":
                    old, new = summary.replace("...", "..").split("..")
                    return int(self.git("rev-list", "--count", f"{old}..{new}").strip())
        return len(pending)
