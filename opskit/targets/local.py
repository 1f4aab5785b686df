"""The local target: this machine. Runs start in place from the project checkout."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

from opskit.errors import OpsError
from opskit.targets.base import Target, TargetUnreachable

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PROBE_TIMEOUT_S = 120


class LocalTarget(Target):
    kind = "local"

    @property
    def code_dir(self) -> str:
        return str(PROJECT_ROOT)

    @property
    def python(self) -> str:
        return self.config.get("python") or sys.executable

    def agent(self, args: list[str], stdin: str | None = None, timeout: float = 60) -> str:
        try:
            proc = subprocess.run([sys.executable, *self._agent_argv(), *args], input=stdin, capture_output=True,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            why = f"target {self.name}: local agent {args[0]} timed out after {timeout:g}s"
            raise TargetUnreachable(why) from None
        if proc.returncode != 0:
            raise OpsError(f"local agent failed: {(proc.stdout + proc.stderr).strip()[-500:]}")
        return proc.stdout

    def agent_stream(self, args: list[str]) -> Iterator[str]:
        proc = subprocess.Popen([sys.executable, *self._agent_argv(), *args], stdout=subprocess.PIPE, text=True)
        try:
            yield from proc.stdout
        finally:
            proc.terminate()

    def prepare(self, on_line=print) -> None:
        """Nothing to install here; make sure the trainer can start with this python."""
        try:
            probe = subprocess.run([self.python, "-c", "import torch, tokenizers, numpy"], capture_output=True,
                                   text=True, timeout=PROBE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise OpsError(f"target {self.name}: {self.python} took over {PROBE_TIMEOUT_S:g}s to import "
                           f"the trainer's packages") from None
        except OSError as e:
            raise OpsError(f"target {self.name}: cannot run python {self.python}: {e.strerror or e}; "
                           f"check the target's python setting") from None
        if probe.returncode != 0:
            raise OpsError(f"{self.python} cannot run the trainer ({probe.stderr.strip().splitlines()[-1:]}); "
                           f"install it with: pip install -e '.[train]'")

    def check(self) -> dict:
        existing = Path(self.workdir).absolute()
        while not existing.exists():  # a fresh setup: the free disk where the workdir will be made
            existing = existing.parent
        usage = shutil.disk_usage(existing)
        return {"reachable": True, "python": self.python, "free_disk_gb": round(usage.free / 2**30, 1),
                "gpus": self.gpus}

    def fetch(self, run: str, names: list[str], dest: Path) -> None:
        src = Path(self.run_dir(run))
        dest.mkdir(parents=True, exist_ok=True)
        for name in names:
            tmp = dest / f".{name}.partial"
            shutil.copyfile(src / name, tmp)
            tmp.replace(dest / name)
