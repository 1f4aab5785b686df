"""The house rules, checked: docs/architecture.md's import table holds for every module; modules stay
short; the control plane never imports torch; only the CLI imports typer/rich; target kinds are
siblings; the box derives states through opskit.states; the shell scripts use the contract's names."""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from opskit import states
from opskit.targets.slurm import script as slurm_script
from train import contract as C

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("opskit", "train", "remote")
MAX_LINES = 500


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imports(path: Path) -> set[str]:
    """The modules `path` imports (absolute imports; `from pkg import mod` counts as pkg.mod)."""
    project = set(modules())
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                out.add(full if full in project else node.module)
    return out


def allowed_imports() -> dict[str, list[str]]:
    """The import table of docs/architecture.md: module prefix -> prefixes it may import."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## Who may import whom", 1)[1].split("\n## ", 1)[0]
    table = {}
    for line in section.splitlines():
        m = re.match(r"\|\s*`([\w.]+)`\s*\|(.*)\|\s*$", line)
        if m:
            table[m.group(1)] = re.findall(r"`([\w.]+)`", m.group(2))
    assert {"opskit.cli", "opskit.operations", "remote", "train"} <= set(table), "import table not found"
    return table


def is_under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_every_module_imports_only_what_docs_architecture_allows():
    table = allowed_imports()
    wrong = []
    for mod, path in modules().items():
        rule = max((p for p in table if is_under(mod, p)), key=len, default=None)
        assert rule is not None, f"{mod} is in no row of docs/architecture.md's import table"
        for name in imports(path):
            if name.split(".")[0] not in PACKAGES or is_under(name, mod):
                continue
            if not any(is_under(name, ok) for ok in table[rule]):
                wrong.append(f"{path.relative_to(ROOT)}: imports {name} (row {rule} allows {table[rule]})")
    assert not wrong, "\n".join(wrong)


def test_no_module_is_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in modules().values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these modules: {long}"


def test_importing_every_opskit_module_pulls_no_torch():
    names = [m for m in modules() if m.startswith("opskit") and not m.endswith("__main__")]
    code = ("import importlib, json, sys\n"
            f"for m in {names!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted(k for k in sys.modules if k.split('.')[0] == 'torch')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


def test_only_the_cli_imports_typer_or_rich():
    offenders = [f"{mod}: {name}" for mod, path in modules().items() if not is_under(mod, "opskit.cli")
                 for name in imports(path) if name.split(".")[0] in ("typer", "rich", "click")]
    assert not offenders, offenders


@pytest.mark.parametrize("kind", ["local", "ssh", "slurm"])
def test_no_target_kind_imports_another(kind):
    others = [k for k in ("local", "ssh", "slurm") if k != kind]
    for mod, path in modules().items():
        if is_under(mod, f"opskit.targets.{kind}"):
            bad = [n for n in imports(path) for o in others if is_under(n, f"opskit.targets.{o}")]
            assert not bad, f"{mod} imports {bad}"


def test_the_box_derives_run_states_through_opskit_states():
    queue_dir = ROOT / "remote" / "queue_dir.py"
    assert "opskit.states" in imports(queue_dir)
    calls = {n.func.attr for n in ast.walk(ast.parse(queue_dir.read_text()))
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
    assert "derive_state" in calls
    for path in (ROOT / "remote").glob("*.py"):  # no state names spelled out on the box
        literals = {n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant)}
        assert not literals & set(states.ALL_STATES), f"{path.name} spells states {literals & set(states.ALL_STATES)}"


def test_the_store_refuses_a_state_that_is_not_one(tmp_path):
    from opskit.store import Store
    with Store(tmp_path / "state.db") as store:
        store.upsert_run({"name": "a/b/s1", "phase": "a", "config": "b", "seed": 1, "target": "local",
                          "state": states.QUEUED}, reason="test")
        with pytest.raises(ValueError, match="unknown run state 'finished'"):
            store.update_run("a/b/s1", state="finished")


CONTRACT_NAMES = {"LOG": C.LOG, "EXIT_CODE": C.EXIT_CODE, "STATUS": C.STATUS, "HB_INTERRUPTED": C.HB_INTERRUPTED,
                  "SLURM_DIR": slurm_script.SLURM_DIR, "CANCEL_MARKER": slurm_script.CANCEL_MARKER,
                  "NOTIFY_FILE": slurm_script.NOTIFY_FILE}


@pytest.mark.parametrize("script", ["detach.sh", "slurm_job.sh"])
def test_shell_scripts_declare_the_contracts_names_once(script):
    text = (ROOT / "remote" / script).read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("LOG="))
    declared = dict(pair.split("=", 1) for pair in line.split())
    assert declared == {k: CONTRACT_NAMES[k] for k in declared}, declared
    code = "\n".join(ln.split("#", 1)[0] for ln in text.splitlines() if ln != line)  # comments aside
    for value in declared.values():  # every other use goes through the variable
        assert not re.search(rf"(?<![\w$.-]){re.escape(value)}(?![\w-])", code), f"{script} spells {value!r}"
