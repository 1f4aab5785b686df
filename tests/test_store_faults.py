"""The run store as users meet it (issues #20.6, #17 newcomer item 2): which state.db a command uses,
never a new one in a missing directory, one line naming the file for every broken store, and a copied
store that refuses to drive its original's runs. Real SQLite files, the CLI as a subprocess."""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from opskit.store import Store

ENV = {k: v for k, v in os.environ.items() if k != "OPSKIT_STATE"}


def cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "opskit.cli", *args], capture_output=True, text=True, timeout=60,
                          cwd=cwd, env=ENV)
    assert "Traceback" not in proc.stderr and "unexpected" not in proc.stderr, proc.stderr
    return proc


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def newer_schema(path: Path) -> None:
    Store(path).close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()


def corrupt_pages(path: Path) -> None:
    with Store(path) as store:
        for i in range(300):
            store.upsert_run({"name": f"c/x/s{i}", "phase": "c", "config": "x", "seed": i, "target": "local",
                              "state": "queued", "spec": {"note": "x" * 200}}, reason="test")
    data = bytearray(path.read_bytes())
    page = 4096
    for start in range(page, len(data), page):  # every page but the header's
        data[start:start + page] = bytes((i * 37 + 11) % 256 for i in range(min(page, len(data) - start)))
    path.write_bytes(bytes(data))


BROKEN = {
    "empty": (lambda p: p.write_bytes(b""), "is empty (0 bytes"),
    "random bytes": (lambda p: p.write_bytes(os.urandom(3000)), "is not a run store (not an SQLite database)"),
    "directory": (lambda p: p.mkdir(), "is a directory, not a run store"),
    "newer schema": (newer_schema, "has schema version 99, newer than this opskit"),
    "corrupt pages": (corrupt_pages, "is corrupt (database disk image is malformed)"),
}


@pytest.mark.parametrize("kind", BROKEN)
def test_a_broken_store_is_one_line_naming_the_file(tmp_path, kind):
    path = tmp_path / "state.db"
    make, says = BROKEN[kind]
    make(path)
    commands = [["status"], ["launch", "demo", "--dry-run"]] if kind == "empty" else [["status"]]
    for args in commands:  # a read and a writing command: the same one line
        line = one_error_line(cli(tmp_path, "--state", str(path), *args))
        assert str(path) in line and says in line, line


def test_a_store_on_a_read_only_mount_is_one_line(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a filesystem needs root")
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        with Store(mnt / "state.db") as store:
            store.add_target("box", "ssh", {"host": "h"})
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        line = one_error_line(cli(tmp_path, "--state", str(mnt / "state.db"), "status"))
        assert f"run store {mnt / 'state.db'}" in line and ("cannot be written" in line or "cannot open" in line), line
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def test_a_mistyped_state_never_creates_a_store(tmp_path):
    typo = tmp_path / "no-such-dir" / "state.db"
    line = one_error_line(cli(tmp_path, "--state", str(typo), "launch", "demo", "--dry-run"))
    assert f"the directory {typo.parent} does not exist" in line
    assert not typo.parent.exists()
    missing = tmp_path / "stat.db"  # the directory exists: read commands refuse, they never create
    line = one_error_line(cli(tmp_path, "--state", str(missing), "queue"))
    assert f"no run store at {missing}" in line and not missing.exists()


def test_the_store_is_found_upward_and_a_fresh_directory_gets_one_only_from_launch(tmp_path):
    project = tmp_path / "project"
    deep = project / "results" / "raw"
    deep.mkdir(parents=True)
    shown = cli(project, "status")  # nothing yet: a hint, and no store made by looking
    assert shown.returncode == 0 and "no run store here or in a folder above" in shown.stdout
    assert not (project / "state.db").exists()
    assert "no state.db in" in one_error_line(cli(project, "queue"))
    made = cli(project, "launch", "demo", "--dry-run")  # a project's first launch makes ./state.db
    assert made.returncode == 0 and f"note: created the run store {project / 'state.db'}" in made.stderr
    found = cli(deep, "targets", "list", "--json")  # from a folder below: the project's store, said on stderr
    assert found.returncode == 0 and f"note: using the run store {project / 'state.db'}" in found.stderr
    assert not (deep / "state.db").exists()
    local = next(t for t in json.loads(found.stdout) if t["name"] == "local")
    assert local["config"]["workdir"] == str(project / ".opskit" / "local")
    here = cli(project, "store", "show", "--json")
    assert json.loads(here.stdout)["path"] == str(project / "state.db") and here.stderr == ""


def test_a_copied_store_refuses_to_drive_the_originals_runs_until_adopted(tmp_path):
    original, elsewhere = tmp_path / "a", tmp_path / "b"
    original.mkdir()
    elsewhere.mkdir()
    assert cli(original, "targets", "list").returncode == 0
    shutil.copyfile(original / "state.db", elsewhere / "state.db")
    line = one_error_line(cli(elsewhere, "status"))
    assert (f"{elsewhere / 'state.db'} is a copy of the run store {original / 'state.db'}, which still exists "
            f"(its local runs live in {original / '.opskit' / 'local'})") in line and "opskit store adopt" in line
    adopted = cli(elsewhere, "store", "adopt", "--json")
    assert adopted.returncode == 0, adopted.stderr
    local = next(t for t in json.loads(cli(elsewhere, "targets", "list", "--json").stdout) if t["name"] == "local")
    assert local["config"]["workdir"] == str(elsewhere / ".opskit" / "local")
    assert cli(original, "status").returncode == 0  # the original is untouched


def test_a_moved_store_follows_itself(tmp_path):
    before, after = tmp_path / "old-name", tmp_path / "new-name"
    before.mkdir()
    assert cli(before, "targets", "list").returncode == 0
    before.rename(after)
    moved = cli(after, "targets", "list", "--json")
    assert moved.returncode == 0 and f"note: the run store was at {before / 'state.db'}" in moved.stderr
    local = next(t for t in json.loads(moved.stdout) if t["name"] == "local")
    assert local["config"]["workdir"] == str(after / ".opskit" / "local")
    assert "note:" not in cli(after, "targets", "list").stderr  # said once


def test_a_store_being_created_is_never_seen_half_made(tmp_path):
    """`status` while the first `launch` creates the store: either no store yet, or the whole store;
    never an empty file taken for a broken one."""
    for i in range(8):
        db = tmp_path / f"s{i}.db"
        creator = subprocess.Popen([sys.executable, "-c", f"from opskit.store import Store; Store({str(db)!r})"])
        lookers = [subprocess.Popen([sys.executable, "-m", "opskit.cli", "--state", str(db), "status", "--json"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
                   for _ in range(2)]
        assert creator.wait(timeout=60) == 0
        for p in lookers:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0 and json.loads(out) == [] or "no run store at" in err, (out, err)
        assert Store(db, create=False).count("runs") == 0
        assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".new")] == []
