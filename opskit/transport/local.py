"""This machine as a Shell: subprocesses and file copies (no rsync needed here)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Callable, Iterator

from opskit.errors import CannotRun, TargetUnreachable
from opskit.transport import Result, Shell


class LocalShell(Shell):
    local = True

    def __str__(self) -> str:
        return "this machine"

    def run(self, argv: list[str] | str, stdin: str | None = None, timeout: float = 60,
            on_line: Callable[[str], None] | None = None, env: dict[str, str] | None = None,
            label: str | None = None) -> Result:
        args = ["bash", "-c", argv] if isinstance(argv, str) else list(argv)
        full_env = {**os.environ, **env} if env else None
        label = label or ("bash script" if isinstance(argv, str) else " ".join(args[:2]) + " on this machine")
        try:
            if on_line is None:
                proc = subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=timeout,
                                      env=full_env)
                return Result(proc.returncode, proc.stdout, proc.stderr)
            return self._run_streaming(args, stdin, timeout, on_line, full_env)
        except subprocess.TimeoutExpired:
            raise TargetUnreachable(f"{label} timed out after {timeout:g}s") from None
        except OSError as e:
            raise CannotRun(f"cannot run {args[0]}: {e.strerror or e}", e.strerror) from None

    @staticmethod
    def _run_streaming(args, stdin, timeout, on_line, env) -> Result:
        proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env)
        if stdin:
            proc.stdin.write(stdin)
        proc.stdin.close()
        out = []
        for line in proc.stdout:  # prepare's progress; the timeout is checked when it ends
            out.append(line)
            on_line(line.rstrip("\n"))
        err = proc.stderr.read()
        code = proc.wait(timeout=timeout)
        return Result(code, "".join(out), err)

    def stream(self, argv: list[str]) -> Iterator[str]:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        try:
            yield from proc.stdout
        finally:
            proc.terminate()

    def fetch(self, src_dir: str, names: list[str], dest: Path) -> None:
        dest.mkdir(parents=True, exist_ok=True)
        for name in names:  # a name may be nested (tb/events...): its folder first
            final = dest / name
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.with_name(f".{final.name}.partial")
            shutil.copyfile(Path(src_dir) / name, tmp)
            tmp.replace(final)

    def expand_home(self, path: str) -> str:
        return os.path.expanduser(path)

    def rsync_endpoint(self, path: str) -> tuple[str, list[str]]:
        return path, []
