"""publish into a real git repository with a bare remote: clean publishes commit and push exactly
results/; weights, big files and private keys are refused with nothing committed or staged; commits
left by --no-push are pushed by the next publish. What the guard refuses by content:
tests/test_publish_guard.py."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from opskit.errors import OpsError
from opskit.results.publish import PublishError, PublishRefused, publish

FIXTURES = Path(__file__).parent / "fixtures" / "results"
ENV = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org",
       "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org"}


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, env=ENV, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def repo(tmp_path, monkeypatch):
    for k in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL"):
        monkeypatch.setenv(k, ENV[k])
    remote, work = tmp_path / "remote.git", tmp_path / "work"
    git(tmp_path, "init", "--quiet", "--bare", "-b", "main", str(remote))
    git(tmp_path, "init", "--quiet", "-b", "main", str(work))
    (work / "README.md").write_text("project\n")
    (work / ".gitignore").write_text("*.pt\nstate.db\n")
    git(work, "add", ".")
    git(work, "commit", "--quiet", "-m", "init")
    git(work, "remote", "add", "origin", str(remote))
    git(work, "push", "--quiet", "-u", "origin", "main")
    shutil.copytree(FIXTURES / "raw", work / "results" / "raw")
    (work / "results" / "processed").mkdir()
    (work / "results" / "processed" / "summary.md").write_text("# Results summary\n")
    (work / "notes.txt").write_text("not results\n")  # untracked outside results/: must stay out
    (work / "README.md").write_text("project, edited\n")  # modified outside results/: must stay out
    return work, remote


def tree(cwd: Path, ref: str) -> set[str]:
    return set(git(cwd, "ls-tree", "-r", "--name-only", ref).split())


def snapshot(work: Path) -> tuple[str, str, str]:
    return git(work, "rev-parse", "HEAD"), git(work, "status", "--porcelain", "--untracked-files=all"), git(work, "diff", "--cached")


def test_clean_publish_commits_and_pushes_exactly_results(repo):
    work, remote = repo
    result = publish(work / "results", message="p0 pilot")
    on_disk = {p.relative_to(work).as_posix() for p in (work / "results").rglob("*") if p.is_file()}
    assert set(result.files) == on_disk and len(on_disk) == 38
    assert tree(remote, "main") == on_disk | {"README.md", ".gitignore"}  # pushed, and nothing else
    assert git(remote, "rev-parse", "main") == git(work, "rev-parse", "HEAD")
    msg = git(work, "log", "-1", "--format=%B")
    assert msg.startswith("p0 pilot\n") and "Phases: fx" in msg
    assert "- fx/hybrid_a0.2_t100k/s7" in msg and "- fx/anchpoly_p3.9_omf0.3_t500k/s42" in msg
    status = git(work, "status", "--porcelain")
    assert " M README.md" in status and "?? notes.txt" in status and "results" not in status
    assert result.pushed_to == "origin/main"
    assert result.pushed_commits == 1 and result.summary.endswith("pushed 1 commit to origin/main")
    with pytest.raises(PublishError, match="nothing to publish: results/ has no new or changed files and origin/main has every commit"):
        publish(work / "results")


def test_no_push_commits_locally(repo):
    work, remote = repo
    result = publish(work / "results", push=False)
    assert result.pushed_to is None and result.commit == git(work, "rev-parse", "HEAD").strip()
    assert git(remote, "rev-parse", "main") != git(work, "rev-parse", "HEAD")
    assert "results: 5 run(s)" not in git(work, "log", "-1", "--format=%s")  # 6 runs have files: 5 done, 1 failed
    assert git(work, "log", "-1", "--format=%s").startswith("results: 6 run(s) of phase(s) fx")


def _weight(work: Path) -> str:
    p = work / "results/raw/fx/geo_500k/seed42/model.pt"
    p.write_bytes(b"\0" * 1024)
    return "results/raw/fx/geo_500k/seed42/model.pt: checkpoint/weight file (name)"


def _big(work: Path) -> str:
    p = work / "results/processed/big.csv"
    p.write_bytes(b"1," * (3 * 2**20))  # 6 MiB
    return "results/processed/big.csv: 6.0 MB, over the 5 MB limit"


def _key(work: Path) -> str:
    p = work / "results/raw/fx/geo_500k/seed42/run.log"
    p.write_text(p.read_text() + "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n")
    return "results/raw/fx/geo_500k/seed42/run.log: what looks like a private key (line 4)"


def _optimizer(work: Path) -> str:
    p = work / "results/raw/fx/geo_500k/seed42/ckpt/step_4/__0_0.distcp"
    p.parent.mkdir(parents=True)
    p.write_bytes(b"\0" * 10)
    return "ckpt/step_4/__0_0.distcp: checkpoint/weight file (name)"


@pytest.mark.parametrize("plant", [_weight, _big, _key, _optimizer])
def test_refusals_name_the_file_and_commit_nothing(repo, plant):
    work, remote = repo
    expected = plant(work)
    before = snapshot(work)
    with pytest.raises(PublishRefused) as err:
        publish(work / "results")
    lines = str(err.value).splitlines()
    assert lines[0] == "refusing to publish 1 file (nothing was committed or staged):"
    assert len(lines) == 2 and expected in lines[1]
    assert snapshot(work) == before  # same HEAD, same status, nothing staged
    assert tree(remote, "main") == {"README.md", ".gitignore"}


def test_every_offender_is_named(repo):
    work, _ = repo
    names = [_weight(work), _big(work), _key(work)]
    with pytest.raises(PublishRefused) as err:
        publish(work / "results", max_mb=5)
    for name in names:
        assert name in str(err.value)


def test_token_in_a_file_is_refused(repo):
    work, _ = repo
    (work / "results/processed/env.txt").write_text("HF_TOKEN=hf_" + "a1B2" * 9 + "\n")
    with pytest.raises(PublishRefused, match="env.txt: what looks like a HF_TOKEN \\(line 1\\)"):
        publish(work / "results")


def test_push_without_remote_is_a_clear_error(repo):
    work, _ = repo
    git(work, "remote", "remove", "origin")
    before = snapshot(work)
    with pytest.raises(OpsError, match="no git remote to push to"):
        publish(work / "results")
    assert snapshot(work) == before


def test_failed_push_keeps_the_commit_and_says_so(repo):
    work, remote = repo
    git(work, "remote", "set-url", "origin", str(remote.parent / "gone.git"))
    with pytest.raises(PublishError, match="committed [0-9a-f]{10} locally, but the push to origin failed"):
        publish(work / "results")
    assert "results/processed/summary.md" in tree(work, "HEAD")


def test_publish_after_no_push_pushes_the_earlier_commits(repo):
    work, remote = repo
    first = publish(work / "results", push=False)
    assert git(remote, "rev-parse", "main") != first.commit + "\n"
    again = publish(work / "results")  # nothing new: the earlier commit still goes out
    assert again.summary == "nothing new to commit; pushed 1 earlier commit to origin"
    assert again.pushed_commits == 1 and again.files == [] and again.commit == first.commit
    assert git(remote, "rev-parse", "main").strip() == first.commit
    for name in ("a.csv", "b.csv"):  # two more --no-push commits, then a publish with something new
        (work / "results/processed" / name).write_text("x,y\n1,2\n")
        publish(work / "results", push=False)
    (work / "results/processed/c.csv").write_text("x,y\n3,4\n")
    last = publish(work / "results")
    assert last.pushed_commits == 3 and last.summary.endswith("; pushed 3 commits (2 earlier) to origin/main")
    assert git(remote, "rev-parse", "main").strip() == last.commit
    assert {"results/processed/a.csv", "results/processed/b.csv", "results/processed/c.csv"} <= tree(remote, "main")
    with pytest.raises(PublishError, match="origin/main has every commit"):
        publish(work / "results")


def test_an_earlier_unpushed_commit_is_checked_before_it_is_pushed(repo):
    work, remote = repo
    publish(work / "results")
    weights = work / "results/raw/fx/geo_500k/seed42/weights.dat"  # committed by hand, past the guard
    weights.write_bytes(b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (4,), }" + b" " * 47 + b"\n" + b"\0" * 16)
    git(work, "add", str(weights))
    git(work, "commit", "--quiet", "-m", "by hand")
    bad = git(work, "rev-parse", "HEAD").strip()
    weights.unlink()
    git(work, "commit", "--quiet", "-am", "removed again, but still in the history")
    before = snapshot(work)
    with pytest.raises(PublishRefused) as err:
        publish(work / "results")
    lines = str(err.value).splitlines()
    assert lines[0] == ("refusing to push: 1 file in earlier commits not on origin yet (nothing was committed, staged "
                        "or pushed); take them out of the branch first (git rebase -i origin/main):")
    assert lines[1] == f"  results/raw/fx/geo_500k/seed42/weights.dat in commit {bad[:10]}: numpy .npy array"
    assert snapshot(work) == before and git(remote, "rev-parse", "main").strip() != before[0].strip()
