"""`pull` over a real sshd dropped mid-transfer (issue #20.5): the pulled folder and its manifest change
together or not at all, and the command exits non-zero when a run was not pulled."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import sshd  # noqa: E402

from opskit import operations, states  # noqa: E402
from opskit.operations import staging  # noqa: E402
from opskit.store import Store  # noqa: E402
from train import contract as C  # noqa: E402

RUN = "pull/geo_500k/s1"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pull(tmp_path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "opskit.cli", "--state", str(tmp_path / "state.db"), "pull", RUN,
                             "--results-dir", str(tmp_path / "results")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)


def test_a_pull_cut_mid_transfer_leaves_folder_and_manifest_as_they_were(tmp_path):
    server = sshd.server()
    box = tmp_path / "box"
    with Store(tmp_path / "state.db") as store:
        operations.add_target(store, "box", "ssh", server.target_options("root", str(box)))
        tgt = operations.get_target(store, "box")
        tgt.sync()  # the agent's code on the box; nothing else is needed to pull
        store.upsert_run({"name": RUN, "phase": "pull", "config": "geo_500k", "seed": 1, "target": "box",
                          "attempt": 1, "state": states.DONE, "run_dir": tgt.run_dir(RUN), "spec": {"attempt": 1}},
                         reason="test")
    run_dir = C.run_dir(box, RUN)
    run_dir.mkdir(parents=True)
    (run_dir / C.RESULTS).write_text(json.dumps({"ppl": {"128": 10.0}}))
    (run_dir / C.LOG).write_text("first pull\n")
    first = pull(tmp_path)
    assert first.wait(120) == 0, first.stderr.read()
    dest = tmp_path / "results" / "raw" / "pull" / "geo_500k" / "seed1"
    before = {p.name: sha(p) for p in dest.iterdir()}
    manifest = json.loads((dest / "manifest.json").read_text())
    assert {f["path"]: f["sha256"] for f in manifest["files"]} == {k: v for k, v in before.items() if k != "manifest.json"}

    # The box has a newer result and a big log; the link drops while the log is on its way.
    (run_dir / C.RESULTS).write_text(json.dumps({"ppl": {"128": 9.0}}))
    with open(run_dir / C.LOG, "wb") as f:
        for _ in range(16):  # 128 MB: long enough on the wire to be cut halfway
            f.write(os.urandom(8 << 20))
    cut = pull(tmp_path)
    stage = staging.staging_dir(dest)
    deadline = time.monotonic() + 60
    while not any(p.name.startswith(f".{C.LOG}.") and p.stat().st_size > (1 << 20)
                  for p in (stage.iterdir() if stage.exists() else [])):
        assert cut.poll() is None and time.monotonic() < deadline, "the transfer never got under way"
        time.sleep(0.005)
    server.stop()
    try:
        assert cut.wait(60) == 3
        err = cut.stderr.read()
        assert f"{RUN}: not pulled" in err and "error: 1 of 1 runs not pulled" in err, err
        assert {p.name: sha(p) for p in dest.iterdir()} == before  # not one file changed, manifest included
        assert json.loads((dest / C.RESULTS).read_text()) == {"ppl": {"128": 10.0}}
    finally:
        server.start()
    again = pull(tmp_path)
    assert again.wait(120) == 0, again.stderr.read()
    manifest = json.loads((dest / "manifest.json").read_text())
    assert {f["path"]: f["sha256"] for f in manifest["files"]} == {
        name: sha(dest / name) for name in (C.RESULTS, C.LOG)} == {name: sha(run_dir / name) for name in (C.RESULTS, C.LOG)}
    assert not stage.exists() and not staging.old_dir(dest).exists()
