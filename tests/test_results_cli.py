"""The results commands as a user runs them: real `opskit` processes, a real store and git repo."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures" / "results"


def opskit(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OPSKIT_STATE": str(cwd / "state.db"), "OMP_NUM_THREADS": "1", "COLUMNS": "200",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.org"}
    return subprocess.run([sys.executable, "-c", "from opskit.cli import main; main()", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", ["report", "gate", "publish", "import"])
def test_help_has_an_example(tmp_path, command):
    out = opskit(tmp_path, command, "--help")
    assert out.returncode == 0 and "Example: opskit " + command in out.stdout


def test_import_report_gate_publish(tmp_path):
    subprocess.run(["git", "init", "--quiet", "-b", "main"], cwd=tmp_path, check=True)
    (tmp_path / ".gitignore").write_text("state.db*\n")
    out = opskit(tmp_path, "import", str(FIXTURES / "legacy_search.json"), "--phase", "g0", "--json")
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["imported"]) == 9

    out = opskit(tmp_path, "report", "--json")
    assert out.returncode == 0, out.stderr
    summary = {r["config"]: r for r in json.loads(out.stdout)["summary"]}
    assert summary["geo_500k"]["ppl@2048_mean"] == pytest.approx((6.12 + 6.18 + 6.15) / 3)
    assert (tmp_path / "results/processed/figures/fig2_ppl_vs_length.png").stat().st_size > 0
    human = opskit(tmp_path, "report")
    assert "6.11 ± 0.02" in human.stdout and "fig1_train_loss: skipped" in human.stdout

    # the imported search as phase g0 of the fixture matrix: all three within 15 % of the best
    out = opskit(tmp_path, "gate", "g0", "--matrix", str(FIXTURES / "configs" / "fx.yaml"))
    assert out.returncode == 0, out.stderr
    assert "goes on: geo_500k, hybrid_a0.2_t100k, anchpoly_p3.9_omf0.3_t500k" in out.stdout
    decision = json.loads(opskit(tmp_path, "gate", "g0", "--matrix", str(FIXTURES / "configs" / "fx.yaml"), "--json").stdout)
    assert decision["best"] == "hybrid_a0.2_t100k"

    weight = tmp_path / "results/raw/g0/geo_500k/seed42/model.safetensors"
    weight.write_bytes(b"\0" * 100)
    out = opskit(tmp_path, "publish", "--no-push")
    assert out.returncode == 1 and out.stderr.startswith("error: refusing to publish")
    assert "Traceback" not in out.stderr and "model.safetensors: checkpoint/weight file (name)" in out.stderr
    weight.unlink()
    out = opskit(tmp_path, "publish", "--no-push", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["phases"] == ["g0"] and len(result["runs"]) == 9 and result["pushed_to"] is None

    out = opskit(tmp_path, "import", str(tmp_path / ".gitignore"), "--phase", "x")
    assert out.returncode == 1 and "not valid JSON" in out.stderr
