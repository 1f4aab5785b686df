"""SSH targets against a real sshd on 127.0.0.1: connection pool, rsync sync/fetch, agent operations,
a non-root login, and a server that goes away and comes back mid-run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import sshd  # noqa: E402

from opskit import operations  # noqa: E402
from opskit.transport import ssh as ssh_connection  # noqa: E402
from opskit.errors import OpsError  # noqa: E402
from opskit.transport.ssh import Address  # noqa: E402
from opskit.store import Store  # noqa: E402
from opskit.targets import TargetUnreachable  # noqa: E402
from opskit.targets.ssh import SSHTarget, parse_ssh  # noqa: E402

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server():
    return sshd.server()


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "state.db") as s:
        yield s


def add_box(store, server, name="box", user="root", workdir=None, **extra) -> SSHTarget:
    operations.add_target(store, name, "ssh", server.target_options(user, workdir, **extra))
    return operations.get_target(store, name)


def address(server, user="root") -> Address:
    return Address("127.0.0.1", user, server.port, str(server.key), str(server.known_hosts))


# ------------------------------------------------------------------ config (pure)


def test_parse_ssh_and_config_validation(tmp_path):
    assert parse_ssh("ubuntu@203.0.113.7:2222") == ("ubuntu", "203.0.113.7", 2222)
    assert parse_ssh("gpu-box") == (None, "gpu-box", None)
    assert parse_ssh("root@[::1]:22") == ("root", "::1", 22)
    with pytest.raises(OpsError, match="expected USER@HOST"):
        parse_ssh("a@b@c")
    key = tmp_path / "id"
    key.write_text("not read by opskit")
    cfg = SSHTarget.config_from_options({"ssh": "me@box:2200", "key": str(key), "gpus": 2})
    assert cfg == {"host": "box", "user": "me", "port": 2200, "key": str(key), "workdir": "~/opskit", "gpus": 2}
    assert "not read" not in json.dumps(cfg)  # a key is stored by path only
    with pytest.raises(OpsError, match="no such file"):
        SSHTarget.config_from_options({"ssh": "me@box", "key": str(tmp_path / "missing")})
    with pytest.raises(OpsError, match="absolute path"):
        SSHTarget.config_from_options({"ssh": "me@box", "workdir": "relative/dir"})
    with pytest.raises(OpsError, match="exceeds"):
        SSHTarget.config_from_options({"ssh": "me@box", "gpus": 2, "gpus_per_run": 4})


def test_cli_targets_add_stores_ssh_config(tmp_path, server):
    state = tmp_path / "state.db"
    out = subprocess.run([sys.executable, "-m", "opskit.cli", "--state", str(state), "targets", "add", "box1",
                          "--ssh", server.ssh_spec(), "--key", str(server.key), "--workdir", "/srv/opskit",
                          "--gpus", "0"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    with Store(state) as s:
        rec = s.get_target("box1")
    assert rec["kind"] == "ssh"
    assert rec["config"] == {"host": "127.0.0.1", "user": "root", "port": server.port, "key": str(server.key),
                             "workdir": "/srv/opskit", "gpus": 0}


# ------------------------------------------------------------------ connection


def test_commands_share_one_fast_connection(server):
    addr = address(server)
    res = ssh_connection.run(addr, "cat; echo; echo oops >&2; echo $SHLVL; exit 3", stdin="from stdin")
    assert (res.exit_code, res.stdout, res.stderr) == (3, "from stdin\n2\n", "oops\n")  # SHLVL=1 arrived
    mux = ssh_connection.shared_connection(addr)
    assert mux is not None and mux.path.exists()  # OpenSSH's master, shared by every opskit process
    t0 = time.monotonic()
    for _ in range(10):
        assert ssh_connection.run(addr, "true").exit_code == 0
    per_command = (time.monotonic() - t0) / 10
    assert per_command < 0.25, f"{per_command * 1000:.0f} ms per command over a reused connection"
    lines = []
    ssh_connection.run(addr, "for i in 1 2 3; do echo line$i; done", on_line=lines.append)
    assert lines == ["line1", "line2", "line3"]


def test_a_second_process_reuses_the_connection_and_a_stale_socket_is_replaced(server):
    addr = address(server)
    mux = ssh_connection.shared_connection(addr)
    code = ("import sys, json; from opskit.transport import ssh; from opskit.transport.ssh import Address;"
            f"a = Address(*{json.dumps([addr.host, addr.user, addr.port, addr.key, addr.known_hosts])});"
            "print(ssh.run(a, 'echo $PPID').stdout.strip(), 'paramiko' in sys.modules)")
    children = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
                for _ in range(2)]
    assert all(c.returncode == 0 for c in children), children[0].stderr
    # the same sshd session (its master's) ran both commands: no new handshake, and no paramiko loaded
    assert children[0].stdout.split() == children[1].stdout.split() and children[0].stdout.split()[1] == "False"
    master = int(subprocess.run([*mux.base, "-o", f"ControlPath={mux.path}", "-O", "check", mux.dest],
                                capture_output=True, text=True).stderr.split("pid=")[1].split(")")[0])
    os.kill(master, signal.SIGKILL)  # the master dies and leaves its socket behind
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{master}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert mux.path.exists()
    again = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and again.stdout.split()[0] != children[0].stdout.split()[0]
    assert "Control socket" not in again.stderr


def test_without_openssh_masters_the_paramiko_pool_serves(server):
    from opskit.transport import ssh_pool
    addr = address(server)
    res = ssh_pool.run(addr, "cat; echo $SHLVL", stdin="pooled ")
    assert (res.exit_code, res.stdout) == (0, "pooled 2\n")
    conn = ssh_pool.connection(addr)
    assert ssh_pool.run(addr, "true").exit_code == 0 and ssh_pool.connection(addr) is conn
    conn.transport.close()  # e.g. a NAT dropped it overnight: replaced once
    assert ssh_pool.run(addr, "echo again").stdout == "again\n"
    env = {**os.environ, "OPSKIT_SSH_MUX": "0"}
    code = ("import sys; from opskit.transport import ssh; from opskit.transport.ssh import Address;"
            f"print(ssh.run(Address('127.0.0.1', 'root', {addr.port}, {addr.key!r}, {addr.known_hosts!r}), "
            "'echo hi').stdout.strip(), ssh.shared_connection(Address('127.0.0.1')) is None)")
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert child.stdout.split() == ["hi", "True"], child.stderr


def test_timeouts_refusals_and_bad_keys_are_target_unreachable(server, tmp_path):
    addr = address(server)
    t0 = time.monotonic()
    with pytest.raises(TargetUnreachable, match="timed out after 1s"):
        ssh_connection.run(addr, "sleep 10", timeout=1)
    assert time.monotonic() - t0 < 3
    nobody = Address("127.0.0.1", "root", sshd.free_port(), str(server.key))
    with pytest.raises(TargetUnreachable, match=rf"127.0.0.1:{nobody.port} unreachable: Connection refused"):
        ssh_connection.run(nobody, "true")
    other_key = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other_key)], check=True)
    stranger = Address("127.0.0.1", "root", server.port, str(other_key), str(server.known_hosts))
    with pytest.raises(TargetUnreachable, match="authentication failed"):
        ssh_connection.run(stranger, "true")


# ------------------------------------------------------------------ rsync


def test_sync_mirrors_only_code_and_is_fast_when_unchanged(server, store, tmp_path):
    box = add_box(store, server, workdir=str(tmp_path / "box"))
    box.sync()
    code = Path(box.code_dir)
    assert sorted(p.name for p in code.iterdir()) == ["configs", "opskit", "pyproject.toml", "remote", "train"]
    assert (code / "remote" / "agent.py").exists() and (code / "train" / "contract.py").exists()
    assert not list(code.rglob("__pycache__"))
    (code / "opskit" / "stale_module.py").write_text("# removed upstream\n")
    (code / "opskit.egg-info").mkdir()  # pip's, beside the mirrored folders: kept
    again = SSHTarget(box.name, box.config)
    t0 = time.monotonic()
    again.sync()
    assert time.monotonic() - t0 < 3
    assert not (code / "opskit" / "stale_module.py").exists()
    assert (code / "opskit.egg-info").is_dir()


# ------------------------------------------------------------------ agent operations


@pytest.fixture(scope="module")
def synced_box(server, tmp_path_factory):
    work = tmp_path_factory.mktemp("ssh-agent-box")
    box = SSHTarget("box", SSHTarget.config_from_options(server.target_options("root", str(work / "wd"))))
    box.sync()
    return box


def test_start_observe_signal_manifest_fetch(synced_box, tmp_path):
    box, run = synced_box, "t/sleeper/s1"
    started = box.start(run, ["bash", "-c", "echo hello; exec sleep 30"], attempt=1)
    assert started["pid"] > 0
    obs = box.observe([run])[0][run]
    assert obs.alive and obs.started and obs.exit_code is None
    run_dir = Path(box.run_dir(run))
    (run_dir / "results.json").write_text('{"ppl": {}}\n')
    (run_dir / "notes.txt").write_text("small text\n")
    (run_dir / "model.safetensors").write_bytes(b"\0" * 4096)
    (run_dir / "ckpt" / "step_50").mkdir(parents=True)
    (run_dir / "ckpt" / "step_50" / "shard.distcp").write_bytes(b"\0" * 4096)
    assert box.signal(run, "TERM")["signalled"]
    deadline = time.monotonic() + 10
    while (obs := box.observe([run])[0][run]).exit_code is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert obs.exit_code == 143 and not obs.alive
    names = sorted(f["path"] for f in box.manifest(run))
    assert names == ["notes.txt", "results.json", "run.log"]
    box.fetch(run, names, tmp_path / "pulled")
    assert sorted(p.name for p in (tmp_path / "pulled").iterdir()) == names
    assert "hello" in (tmp_path / "pulled" / "run.log").read_text()


def test_logs_follow_streams_until_the_run_ends(synced_box):
    box, run = synced_box, "t/talker/s1"
    box.start(run, ["bash", "-c", "for i in 1 2 3 4; do echo tick$i; sleep 0.3; done"], attempt=1)
    t0 = time.monotonic()
    text = "".join(box.logs(run, lines=5, follow=True))
    assert all(f"tick{i}" in text for i in range(1, 5)), text
    assert "ended" in text and time.monotonic() - t0 < 15


def test_logs_follow_stops_on_the_box_when_the_reader_goes_away(synced_box):
    """Ctrl-C on `opskit logs --follow` closes the channel; the box's tail must not keep running."""
    box, run = synced_box, "t/quiet/s1"
    box.start(run, ["bash", "-c", "echo first; exec sleep 60"], attempt=1)
    lines = box.logs(run, lines=5, follow=True)
    assert "first" in next(iter(lines))
    lines.close()

    def tails() -> list[str]:
        out = subprocess.run(["pgrep", "-f", f"agent.py tail .*{run}"], capture_output=True, text=True).stdout
        return out.split()

    deadline = time.monotonic() + 10
    while tails() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not tails(), "agent.py tail --follow still running on the box"
    box.signal(run, "KILL")


def test_non_root_user_with_home_workdir(server, store):
    user = sshd.ensure_user()
    box = add_box(store, server, name="userbox", user=sshd.TEST_USER, workdir="~/opskit-tests")
    assert box.workdir == f"{user.pw_dir}/opskit-tests"
    box.sync()
    facts = box.check()
    assert facts["reachable"] and facts["python3"].startswith("3.") and facts["gpus"] == 0
    assert facts["free_disk_gb"] > 0 and facts["prepared"] is False
    run = "t/as-user/s1"
    box.start(run, ["bash", "-c", "id -un"], attempt=1)
    deadline = time.monotonic() + 10
    while box.observe([run])[0][run].exit_code is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert box.observe([run])[0][run].exit_code == 0
    assert sshd.TEST_USER in next(iter(box.logs(run)))


def test_agent_before_sync_says_what_to_do(server, store, tmp_path):
    box = add_box(store, server, name="fresh", workdir=str(tmp_path / "never-synced"))
    with pytest.raises(OpsError, match="targets prepare fresh"):
        box.observe(["t/x/s1"])


# ------------------------------------------------------------------ a box that goes away mid-run

_FAKE_TRAINER = ("echo '{\"state\": \"training\", \"updated_at\": '$(date +%s)', \"step\": 1, \"total_steps\": 2}' "
                 "> status.json; sleep 4; "
                 "echo '{\"state\": \"done\", \"updated_at\": '$(date +%s)', \"step\": 2, \"total_steps\": 2}' "
                 "> status.json")


def test_run_survives_sshd_restart_and_status_marks_it_stale_meanwhile(server, store, tmp_path):
    box = add_box(store, server, name="flaky", workdir=str(tmp_path / "flaky"))
    box.sync()
    run = "t/survivor/s1"
    store.upsert_run({"name": run, "phase": "t", "config": "survivor", "seed": 1, "target": "flaky",
                      "attempt": 1, "state": "starting", "run_dir": box.run_dir(run)}, reason="test")
    box.start(run, ["bash", "-c", _FAKE_TRAINER], attempt=1)
    time.sleep(0.5)
    assert operations.refresh(store) == {"flaky": None}
    assert store.get_run(run)["state"] == "training"

    server.stop()
    try:
        t0 = time.monotonic()
        health = operations.refresh(store)
        assert time.monotonic() - t0 < ssh_connection.CONNECT_TIMEOUT_S + 2
        assert "unreachable" in health["flaky"]
        row = store.get_run(run)
        assert row["stale"] == 1 and row["state"] == "training"
        cli = subprocess.run([sys.executable, "-m", "opskit.cli", "--state", str(store.path), "status"],
                             capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0 and "Traceback" not in cli.stderr
        assert "unreachable" in cli.stdout and "stale" in cli.stdout
        time.sleep(4.5)  # the run finishes while nobody can look
    finally:
        server.start()
    assert operations.refresh(store) == {"flaky": None}
    row = store.get_run(run)
    assert (row["state"], row["stale"], row["exit_code"], row["step"]) == ("done", 0, 0, 2)


def test_a_hung_box_costs_a_bounded_wait_not_a_hang(server, store, tmp_path):
    box = add_box(store, server, name="hung", workdir=str(tmp_path / "hung"))
    box.sync()
    run = "t/hung/s1"
    store.upsert_run({"name": run, "phase": "t", "config": "hung", "seed": 1, "target": "hung",
                      "attempt": 1, "state": "starting", "run_dir": box.run_dir(run)}, reason="test")
    box.start(run, ["sleep", "30"], attempt=1)
    assert operations.refresh(store) == {"hung": None}
    server.freeze()
    try:
        t0 = time.monotonic()
        health = operations.refresh(store)
        waited = time.monotonic() - t0
    finally:
        server.freeze(False)
    assert health["hung"] and store.get_run(run)["stale"] == 1
    assert waited < 2 * ssh_connection.CONNECT_TIMEOUT_S + 3, f"refresh waited {waited:.1f}s"
    assert operations.refresh(store) == {"hung": None}
    assert store.get_run(run)["stale"] == 0
    box.signal(run, "TERM")
