"""Named crash points for tests: a process that reaches one SIGKILLs itself, once.

`OPSKIT_TEST_KILL_AT` names a file that holds a point's name (e.g. `moved`). The first process that
reaches that point removes the file and kills itself with SIGKILL, as a power cut or the OOM killer
would at exactly that instruction; nothing happens when the variable is unset (every real run).
Points: supervisor `moved` (entry renamed to started/), `start-fields` (slots and port recorded),
`forked` (run process started, pid file not written), `pid-written` (pid file written, entry not
updated), `finished-fields` (exit code recorded in the entry, not yet moved to finished/).
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

ENV = "OPSKIT_TEST_KILL_AT"


def kill_point(name: str) -> None:
    path = os.environ.get(ENV)
    if not path:
        return
    try:
        if Path(path).read_text().strip() != name:
            return
        os.unlink(path)
    except OSError:  # absent, or another process took this point first
        return
    os.kill(os.getpid(), signal.SIGKILL)
