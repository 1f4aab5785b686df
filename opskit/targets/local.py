"""The local target: this machine. Runs start in place from the project checkout."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

from opskit.errors import OpsError
from opskit.targets.base import Target

PROJECT_ROOT = Path(__file__).resolve().parents[2]


class LocalTarget(Target):
    kind = "local"

    @property
    def code_dir(self) -> str:
        return str(PROJECT_ROOT)

    @property
    def python(self) -> str:
        return self.config.get("python") or sys.executable

    def agent(self, args: list[str], stdin: str | None = None, timeout: float = 60) -> str:
        proc = subprocess.run([sys.executable, *self._agent_argv(), *args], input=stdin, capture_output=True,
                              text=True, timeout=timeout)
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
        probe = subprocess.run([self.python, "-c", "import torch, tokenizers, numpy"], capture_output=True,
                               text=True, timeout=120)
        if probe.returncode != 0:
            raise OpsError(f"{self.python} cannot run the trainer ({probe.stderr.strip().splitlines()[-1:]}); "
                           f"install it with: pip install -e '.[train]'")

    def check(self) -> dict:
        usage = shutil.disk_usage(Path(self.workdir).parent if not Path(self.workdir).exists() else self.workdir)
        return {"reachable": True, "python": self.python, "free_disk_gb": round(usage.free / 2**30, 1),
                "gpus": self.gpus}

    def fetch(self, run: str, names: list[str], dest: Path) -> None:
        src = Path(self.run_dir(run))
        dest.mkdir(parents=True, exist_ok=True)
        for name in names:
            tmp = dest / f".{name}.partial"
            shutil.copyfile(src / name, tmp)
            tmp.replace(dest / name)
