"""code.diff and environment.txt of a launch, on a real git repository with a dirty tree."""
import subprocess
import sys
from pathlib import Path

import pytest

from opskit.code_record import MAX_UNTRACKED_BYTES, environment_text, launched_dirty, read_record, record_code
from train.contract import CODE_DIFF, ENVIRONMENT, PULLABLE, PULLABLE_SUFFIXES


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def make_repo(path: Path) -> Path:
    path.mkdir()
    git(path, "init", "-q", "-b", "main")
    git(path, "config", "user.email", "t@example.com")
    git(path, "config", "user.name", "t")
    (path / "train").mkdir()
    (path / "train" / "model.py").write_text("WIDTH = 64\nDEPTH = 2\n")
    (path / "README.md").write_text("# project\n")
    (path / "gone.txt").write_text("to be deleted\n")
    (path / ".gitignore").write_text("*.log\n")
    git(path, "add", ".")
    git(path, "commit", "-q", "-m", "first")
    return path


def tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and ".git" not in p.relative_to(path).parts}


def test_dirty_tree_diff_applies_to_its_commit(tmp_path):
    repo = make_repo(tmp_path / "repo")
    head = git(repo, "rev-parse", "HEAD").strip()
    (repo / "train" / "model.py").write_text("WIDTH = 128\nDEPTH = 2\n")  # unstaged
    (repo / "README.md").write_text("# project\n\nstaged line\n")
    git(repo, "add", "README.md")  # staged
    (repo / "README.md").write_text("# project\n\nstaged line\nthen unstaged\n")  # and unstaged on top
    git(repo, "rm", "-q", "gone.txt")
    (repo / "train" / "new_spectrum.py").write_text("def f():\n    return 1\n")  # untracked
    (repo / "blob.bin").write_bytes(bytes(range(256)) * 4)  # untracked binary
    (repo / "run.log").write_text("ignored\n")
    (repo / "big.dat").write_bytes(b"x" * (MAX_UNTRACKED_BYTES + 1))

    rec = record_code(repo)
    assert rec.commit == head and rec.dirty
    first = rec.diff.splitlines()[0]
    assert head in first and "main" in first
    assert "run.log" not in rec.diff  # ignored files stay out
    assert f"untracked big.dat ({MAX_UNTRACKED_BYTES + 1} bytes) left out" in rec.diff

    # A fresh clone at the recorded commit plus the diff is the launched tree (less the ignored and big files).
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    git(clone, "checkout", "-q", rec.commit)
    (tmp_path / CODE_DIFF).write_text(rec.diff)
    git(clone, "apply", "--binary", str(tmp_path / CODE_DIFF))
    want = {k: v for k, v in tree(repo).items() if k not in ("run.log", "big.dat")}
    assert tree(clone) == want

    # The run directory tells `runs show` that it was launched dirty.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert launched_dirty(run_dir) is None  # no code.diff: launched before code was recorded
    (run_dir / CODE_DIFF).write_text(rec.diff)
    assert launched_dirty(run_dir) is True
    assert read_record(run_dir) == {"commit": head, "dirty": True}


def test_clean_tree_has_the_header_only(tmp_path):
    repo = make_repo(tmp_path / "repo")
    (repo / "x.log").write_text("ignored\n")
    rec = record_code(repo / "train")  # from a sub-directory: the whole work tree counts
    assert not rec.dirty and rec.commit == git(repo, "rev-parse", "HEAD").strip()
    assert rec.diff.count("\n") == 1 and rec.diff.startswith("# opskit code.diff")
    (tmp_path / CODE_DIFF).write_text(rec.diff)
    assert launched_dirty(tmp_path) is False
    assert read_record(tmp_path) == {"commit": rec.commit, "dirty": False}
    assert read_record(tmp_path / "nowhere") is None


def test_repository_without_commits_and_no_repository(tmp_path):
    repo = tmp_path / "fresh"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "a.py").write_text("x = 1\n")
    rec = record_code(repo)
    assert rec.commit is None and rec.dirty and "a.py" in rec.diff
    plain = tmp_path / "plain"
    plain.mkdir()
    rec = record_code(plain)
    assert rec.commit is None and not rec.dirty and "not a git work tree" in rec.diff


def test_environment_is_the_trainer_pythons_pip_freeze():
    text = environment_text(sys.executable)
    lines = text.splitlines()
    assert lines[0].startswith("# python ") and sys.executable in lines[0]
    assert "# pip freeze --all" in lines
    assert any(line.startswith("torch==2.13.0") for line in lines)
    assert any(line.startswith("pytest==") for line in lines)


def test_both_files_are_pullable():
    assert CODE_DIFF in PULLABLE
    assert ENVIRONMENT in PULLABLE or Path(ENVIRONMENT).suffix in PULLABLE_SUFFIXES


def test_environment_of_a_missing_python_is_one_line_error(tmp_path):
    from opskit.errors import OpsError
    with pytest.raises(OpsError, match="could not run"):
        environment_text(str(tmp_path / "no-python"))
