"""The paths a new user walks (issue #17), as they walk them: real `opskit` processes, a real store,
the real local target and its agent, a real git repository, a real TCP port that sends no SSH banner.
Every input mistake is one line on stderr, never "unexpected", and says what to do."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from opskit.store import Store
from train import contract as C

ROOT = Path(__file__).resolve().parent.parent
MATRIX = str(ROOT / "tests" / "fixtures" / "matrix_e2e.yaml")
FIXTURE_RUN = ROOT / "tests" / "fixtures" / "results" / "raw" / "fx" / "geo_500k" / "seed42"
RUN = "e2e/geo_500k/s42"


@pytest.fixture
def cli(tmp_path):
    hf_home = tmp_path / "hf-home"  # an empty hub cache, and no hub: nothing is downloaded
    env = {**os.environ, "OPSKIT_STATE": str(tmp_path / "state.db"), "OMP_NUM_THREADS": "1", "COLUMNS": "250",
           "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "OPSKIT_HEARTBEAT_S": "1",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.org"}

    def run(*args, extra_env=None, timeout=120):
        return subprocess.run([sys.executable, "-m", "opskit.cli", *args], capture_output=True, text=True,
                              env={**env, **(extra_env or {})}, cwd=tmp_path, timeout=timeout)

    run.tmp, run.env = tmp_path, env
    return run


def one_line_error(out, *words):
    """A refusal: non-zero, one error line on stderr with every word in it, no traceback, never
    'unexpected' (`note:` lines say which store is used, or that launch created it)."""
    lines = [line for line in out.stderr.strip().splitlines() if not line.startswith("note: ")]
    assert out.returncode != 0, out.stdout
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert "unexpected" not in out.stderr and "Traceback" not in out.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def done_run_on_local(cli, name=RUN) -> Path:
    """A finished run on the local target: its row in the store and the files the trainer leaves."""
    phase, config, seed = name.split("/")[0], name.split("/")[1], int(name.split("/s")[-1])
    with Store(cli.tmp / "state.db") as store:
        from opskit import operations
        run_dir = Path(operations.get_target(store, "local").run_dir(name))
        store.upsert_run({"name": name, "matrix": "e2e", "phase": phase, "config": config, "seed": seed,
                          "target": "local", "attempt": 1, "state": "queued", "run_dir": str(run_dir)}, reason="new")
        store.update_run(name, state="done", reason="exit code 0", ended_at=time.time(), exit_code=0)
    run_dir.mkdir(parents=True)
    for f in ("results.json", "loss_curve.jsonl", "eval_per_length.json", "run.log"):
        shutil.copyfile(FIXTURE_RUN / f, run_dir / f)
    C.atomic_write_json(run_dir / C.STATUS, {"state": "done", "attempt": 1, "updated_at": time.time()})
    (run_dir / C.EXIT_CODE).write_text("0\n")
    return run_dir


# ---------------------------------------------------------------- 1, 8: report


def test_report_of_an_unpulled_run_and_of_a_downstream_phase(cli):
    done_run_on_local(cli)  # done on its target, never pulled
    p2 = cli.tmp / "results" / "raw" / "demo_p2" / "geo_500k" / "seed42"
    p2.mkdir(parents=True)
    shutil.copyfile(FIXTURE_RUN / "downstream.json", p2 / "downstream.json")  # a p2 run writes no results.json
    out = cli("report")
    assert out.returncode == 0, out.stderr
    assert f"{RUN}: done, not pulled (opskit pull {RUN})" in out.stdout
    assert (cli.tmp / "results/processed/figures/fig5_downstream.png").stat().st_size > 5000  # figure 5 drawn
    out = cli("pull")
    assert out.returncode == 0, out.stderr
    out = cli("report", "--phase", "e2e")
    assert out.returncode == 0 and "not pulled" not in out.stdout, out.stdout
    assert "tokens/s (run avg)" in out.stdout  # the run average (status shows the last interval: tok/s last)


# ---------------------------------------------------------------- 5, 9: pull, a done run


def test_pull_with_nothing_new_says_so_and_leaves_results_unchanged(cli):
    done_run_on_local(cli)
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=cli.tmp, check=True)
    first = cli("pull")
    assert first.returncode == 0 and f"pulled {RUN}: 5 new of 5 files" in first.stdout, first.stdout + first.stderr
    subprocess.run(["git", "add", "results"], cwd=cli.tmp, check=True)
    subprocess.run(["git", "commit", "-qm", "pulled"], cwd=cli.tmp, check=True, env=cli.env)
    for args in (["pull"], ["pull", RUN]):  # every run (the ended one is skipped), and the run by name
        again = cli(*args)
        assert again.returncode == 0 and "nothing new to pull: 1 run up to date" in again.stdout, again.stdout
        diff = subprocess.run(["git", "status", "--porcelain", "results"], cwd=cli.tmp, capture_output=True, text=True)
        assert diff.stdout == "", diff.stdout  # manifest.json (pulled_at) not rewritten
    launch = cli("launch", "e2e", "--matrix", MATRIX, "--config", "geo_500k", "--seed", "42")
    assert launch.returncode == 3 and "already done" in launch.stdout and "--rerun" in launch.stdout


# ---------------------------------------------------------------- 3: what a run needs


def test_launch_refuses_what_its_target_cannot_run_in_one_line(cli):
    line = one_line_error(cli("launch", "p0"), "p0/geo_500k/s42 (and 2 more runs)", "needs GPUs",
                          "bf16 on a CPU", "Hugging Face hub", "--force")
    assert "EleutherAI/gpt-neox-20b" in line
    assert json.loads(cli("status", "--json").stdout) == []  # nothing was recorded
    plan = cli("launch", "p0", "--config", "geo_500k", "--dry-run")
    assert plan.returncode == 0, plan.stderr
    assert re.search(r"preset 1\.5B \(1,3\d\d\.\dM params\), 1\.0G tokens, 15,258 steps, bf16, "
                     r"data fineweb\+slimpajama\+pg19, tokenizer EleutherAI/gpt-neox-20b, CPU, ~\d+\.\d GB per process, "
                     r"~\d+\.\d GPU-hours", plan.stdout), plan.stdout
    assert "would refuse" in plan.stdout and "needs GPUs" in plan.stdout
    needs = json.loads(cli("launch", "demo", "--dry-run", "--json").stdout)[0]["needs"]
    assert needs["preset"] == "tiny" and needs["dtype"] == "fp32" and needs["gpus"] == 0 and needs["steps"] > 0
    assert json.loads(cli("launch", "demo", "--dry-run", "--json").stdout)[0]["problems"] == []


def test_forced_launch_runs_and_status_says_why_it_failed(cli):
    matrix = cli.tmp / "hub.yaml"  # the e2e matrix with a hub tokenizer this machine does not have
    matrix.write_text(Path(MATRIX).read_text().replace("name: e2e", "name: hubtok")
                      .replace("tokenizer: opskit-demo-bpe", "tokenizer: EleutherAI/gpt-neox-20b"))
    one_line_error(cli("launch", "e2e", "--matrix", str(matrix), "--config", "geo_500k"),
                   "EleutherAI/gpt-neox-20b from the Hugging Face hub", "--force")
    out = cli("launch", "e2e", "--matrix", str(matrix), "--config", "geo_500k", "--force")
    assert out.returncode == 0 and "queued" in out.stdout, out.stdout + out.stderr
    deadline = time.time() + 180
    while time.time() < deadline:
        row = json.loads(cli("status", "--json").stdout)[0]
        if row["state"] in ("failed", "done", "lost"):
            break
        time.sleep(1)
    assert row["state"] == "failed", row
    table = cli("status").stdout
    failed = next(line for line in table.splitlines() if RUN in line)
    assert "exit code" in failed and "tokenizer" in failed, table  # why, in the status table


# ---------------------------------------------------------------- 4: a port that sends no banner


@pytest.fixture
def silent_port():
    """A TCP port that accepts connections and never says anything (no SSH banner)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    held, stop = [], threading.Event()

    def accept():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                pass

    threading.Thread(target=accept, daemon=True).start()
    yield listener.getsockname()[1]
    stop.set()
    for s in held:
        s.close()
    listener.close()


def test_an_ssh_port_without_a_banner_is_one_line_and_a_failure(cli, silent_port):
    key = cli.tmp / "id_test"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    assert cli("targets", "add", "mute", "--ssh", f"root@127.0.0.1:{silent_port}", "--key", str(key)).returncode == 0
    for out in (cli("targets", "check", "mute"), cli("queue", "mute")):
        one_line_error(out, "target mute", "unreachable", "banner")
        assert out.returncode == 4  # EXIT_UNREACHABLE
    # without OpenSSH's shared connections (the paramiko pool): the same one line, no traceback
    one_line_error(cli("targets", "check", "mute", extra_env={"OPSKIT_SSH_MUX": "0"}), "target mute", "banner")


# ---------------------------------------------------------------- 9, 10, 12: input mistakes


def test_input_mistakes_are_one_line(cli):
    done_run_on_local(cli)
    one_line_error(cli("logs", RUN, "--lines", "-5"), "--lines", "-5")
    one_line_error(cli("rope", "show", "geo_500k", "--scaling", "foo", "--factor", "2", "--original-max", "2048"),
                   "unknown scaling 'foo'", "pi, ntk, yarn")
    one_line_error(cli("rope", "show", "geo_500k", "--scaling", "yarn", "--factor", "-2", "--original-max", "2048"),
                   "factor must be >= 1")
    one_line_error(cli("rope", "show", "geo_5oo"), "unknown spectrum", "--help")
    one_line_error(cli("status", "--interval", "0"), "--interval")
    one_line_error(cli("launch"), "Missing argument", "opskit launch --help")
    one_line_error(cli("queue", "move", RUN, "--top"), f"{RUN} is done, not waiting in a queue")
    with Store(cli.tmp / "state.db") as store:  # queued in the store, but not in the target's queue
        store.upsert_run({"name": "e2e/geo_500k/s1", "phase": "e2e", "config": "geo_500k", "seed": 1,
                          "target": "local", "state": "queued"}, reason="new")
    line = one_line_error(cli("queue", "move", "e2e/geo_500k/s1", "--top"), "target local",
                          "not waiting in this target's queue")
    assert "{" not in line  # the agent's words, not its JSON
    assert cli("targets", "add", "local", "--local", "--gpus", "0", "--max-parallel", "2").returncode == 0
    reset = cli("targets", "remove", "local")
    assert reset.returncode == 0 and "cannot be removed: reset it to its defaults" in reset.stdout, reset.stdout
    assert "removed target" not in reset.stdout and "max_parallel" not in reset.stdout
    assert "local" in cli("targets", "list").stdout
    assert cli("targets", "add", "b1", "--ssh", "u@203.0.113.9").returncode == 0
    one_line_error(cli("targets", "add", "b1", "--ssh", "u@203.0.113.9"), "exists", "--replace")
    assert cli("--version").stdout.strip() == "opskit 0.1.0"
    assert "head_dim 16 (preset tiny)" in cli("rope", "show", "geo_500k", "--preset", "tiny").stdout
    assert "head_dim 64 (the default;" in cli("rope", "show", "geo_500k").stdout


def test_export_refuses_a_run_in_training_and_leaves_nothing_for_one_without_checkpoint(cli):
    run_dir = done_run_on_local(cli)
    with Store(cli.tmp / "state.db") as store:
        store.update_run(RUN, state="training", reason="heartbeat", checkpoint_step=40, ended_at=None)
    one_line_error(cli("export", RUN, "--hf", "out"), f"{RUN} is still training", "--step 40")
    with Store(cli.tmp / "state.db") as store:
        store.update_run(RUN, state="failed", reason="exit code 1")
    shutil.copyfile(FIXTURE_RUN / "spec.json", run_dir / "spec.json")
    out = cli("export", RUN, "--hf", "out", timeout=300)
    assert out.returncode == 1 and "no complete checkpoint" in out.stderr, out.stderr
    assert not (cli.tmp / "out").exists()


# ---------------------------------------------------------------- 11: --help


def _commands():
    import typer.main

    from opskit.cli import app
    root = typer.main.get_command(app)
    out = [[]]
    for name, cmd in root.commands.items():
        out.append([name])
        out += [[name, sub] for sub in getattr(cmd, "commands", {})]
    return out


@pytest.mark.parametrize("words", _commands(), ids=lambda w: " ".join(w) or "opskit")
def test_every_help_has_examples_on_their_own_lines_and_no_placeholders(cli, words):
    out = cli(*words, "--help")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    examples = [line for line in text.splitlines() if "Example:" in line]
    assert examples, f"no example in `opskit {' '.join(words)} --help`"
    assert all(line.lstrip().startswith("Example: opskit") and line.count("Example:") == 1 for line in examples), text
    assert not re.search(r"<(str|int|float|bool|list\[[^\]]*\]|path)>", text, re.I), text
    for line in text.splitlines():
        if line.strip().startswith("--json"):
            assert len(line.split("--json", 1)[1].strip()) > 10, line  # it says what it does
