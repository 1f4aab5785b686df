#!/usr/bin/env python3
"""Notifications from the box (docs/cost-and-notifications.md): a JSON POST to each URL of the
target's `notify` setting when a run ends or stalls and when the queue drains.

The supervisor writes each message into <workdir>/queue/notify/outbox/ (one file per URL) and a
thread of its own sends them, retrying with backoff; the queue loop never waits on a URL, and one
that does not answer is logged and given up on after the last retry. The log names a URL by its
scheme, host and path only. Nothing but the message is sent: no credentials, no cookies, no redirects
followed. Standard library only. On SLURM the job's finish step sends its run's message itself:

    notify.py run-ended RUN_DIR --conf slurm/notify.json
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from opskit import states  # noqa: E402  (pure, standard library only)
from remote import processes  # noqa: E402
from remote.queue_dir import log  # noqa: E402
from train import contract as C  # noqa: E402

NOTIFY_DIR = "notify"  # in <workdir>/queue/
OUTBOX, GIVEN_UP = "outbox", "given_up"
TIMEOUT_S = 10.0
BACKOFF_S = (5, 15, 60, 300, 900, 1800)  # wait after each failed try; after the last, give up
SCAN_S = 0.5
EVENT_ENDED, EVENT_STALLED, EVENT_DRAINED = "run_ended", "run_stalled", "queue_drained"


def display_url(url: str) -> str:
    """A URL as the log shows it: scheme, host, port and path (no user info, query or fragment)."""
    u = urllib.parse.urlsplit(url)
    port = f":{u.port}" if u.port else ""
    return f"{u.scheme}://{u.hostname or ''}{port}{u.path}"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # a 3xx ends as an HTTPError: the message never goes anywhere else


_OPENER = urllib.request.build_opener(_NoRedirect)


def post(url: str, payload: dict, timeout: float = TIMEOUT_S) -> tuple[bool, str]:
    """POST `payload` as JSON; (delivered, what happened), without the URL in the detail."""
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "User-Agent": "opskit-notify"})
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            return 200 <= resp.status < 300, f"HTTP {resp.status}"
    except urllib.error.HTTPError as e:
        return False, f"HTTP {e.code}"
    except urllib.error.URLError as e:
        return False, str(e.reason)
    except ValueError:
        return False, "not a URL opskit can post to"
    except OSError as e:  # a timeout while reading the answer, a reset connection
        return False, type(e).__name__ + (f": {e.strerror}" if getattr(e, "strerror", None) else "")


# ------------------------------------------------------------------ the messages


def _length(n: str) -> str:
    n = int(n)
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def run_message(event: str, target: str, run: str, attempt: int, state: str, reason: str, run_dir: Path,
                now: float | None = None) -> dict:
    """The message of a run that ended or stalled: a Slack-compatible `text` and the fields."""
    try:
        hb = C.read_json(run_dir / C.STATUS)
    except ValueError:  # a heartbeat that is not JSON says nothing
        hb = None
    hb = hb if isinstance(hb, dict) and hb.get("attempt", attempt) == attempt else {}
    ppl = None
    if state == states.DONE:
        try:
            ppl = (C.read_json(run_dir / C.RESULTS) or {}).get("ppl")
        except ValueError:
            ppl = None
    msg = {"text": "", "event": event, "target": target, "host": socket.gethostname(), "run": run,
           "attempt": attempt, "state": state, "reason": reason, "step": hb.get("step"),
           "total_steps": hb.get("total_steps"), "loss": hb.get("loss"), "ppl": ppl,
           "at": round(time.time() if now is None else now, 3)}
    detail = []
    if msg["step"] is not None:
        detail.append(f"step {msg['step']}" + (f"/{msg['total_steps']}" if msg["total_steps"] else ""))
    if msg["loss"] is not None:
        detail.append(f"loss {msg['loss']:.3f}")
    detail += [f"PPL@{_length(k)} {v:.2f}" for k, v in sorted((ppl or {}).items(), key=lambda kv: int(kv[0]))]
    msg["text"] = f"opskit: {run} {state} on {target}: {reason}" + (f" ({', '.join(detail)})" if detail else "")
    return msg


def drained_message(target: str, ended: dict[str, int], waiting: int, now: float | None = None) -> dict:
    """The message of a queue with nothing left to run: how its runs ended, what waits on a user."""
    counts = ", ".join(f"{n} {state}" for state, n in sorted(ended.items()))
    tail = f"; {waiting} queued run(s) cannot start on their own" if waiting else ""
    return {"text": f"opskit: the queue of {target} is empty ({counts}){tail}", "event": EVENT_DRAINED,
            "target": target, "host": socket.gethostname(), "ended": dict(sorted(ended.items())),
            "blocked": waiting, "at": round(time.time() if now is None else now, 3)}


# ------------------------------------------------------------------ the outbox and its sender


class Outbox:
    def __init__(self, workdir: str):
        self.dir = Path(workdir) / "queue" / NOTIFY_DIR / OUTBOX
        self.given_up = Path(workdir) / "queue" / NOTIFY_DIR / GIVEN_UP

    def add(self, urls: list[str], payload: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        for i, url in enumerate(urls):
            C.atomic_write_json(self.dir / f"{time.time_ns()}-{i}.json",
                                {"url": url, "payload": payload, "tries": 0, "next_at": 0.0, "created_at": time.time()})

    def pending(self) -> int:
        return len(list(self.dir.glob("*.json"))) if self.dir.exists() else 0

    def send_due(self, now: float | None = None) -> None:
        """Try every message whose time has come, once; each URL in a thread of its own, in order, so a
        URL that hangs delays none of the others (and its later messages wait for its next retry)."""
        by_url: dict[str, list[tuple[Path, dict]]] = {}
        for path in sorted(self.dir.glob("*.json")) if self.dir.exists() else []:
            try:
                item = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            by_url.setdefault(item["url"], []).append((path, item))
        now = time.time() if now is None else now
        threads = [threading.Thread(target=self._send_url, args=(items, now), daemon=True) for items in by_url.values()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _send_url(self, items: list[tuple[Path, dict]], now: float) -> None:
        for i, (path, item) in enumerate(items):
            if item["next_at"] > now:
                return  # an earlier message to this URL waits for its retry: keep the order
            what = f"{item['payload'].get('event')} {item['payload'].get('run') or item['payload'].get('target')}"
            ok, detail = post(item["url"], item["payload"])
            shown = display_url(item["url"])
            if ok:
                path.unlink(missing_ok=True)
                log(f"notified {shown}: {what} ({detail})")
                continue
            item["tries"] += 1
            if item["tries"] > len(BACKOFF_S):  # this URL is gone: so are the messages queued behind it
                self.given_up.mkdir(parents=True, exist_ok=True)
                for gone, rest in items[i:]:
                    C.atomic_write_json(self.given_up / gone.name, item if gone == path else rest)
                    gone.unlink(missing_ok=True)
                log(f"notification to {shown} not delivered after {item['tries']} tries ({detail}); gave up on "
                    f"{len(items) - i} message(s) to it, the first: {what}")
                return
            wait = BACKOFF_S[item["tries"] - 1]
            item["next_at"] = time.time() + wait
            C.atomic_write_json(path, item)
            log(f"notification to {shown} failed ({detail}); retry in {wait}s: {what}")
            return


class Sender:
    """A daemon thread sending the outbox, so no URL ever holds up the queue loop."""

    def __init__(self, outbox: Outbox):
        self.outbox = outbox
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="notify", daemon=True)

    def start(self) -> "Sender":
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.outbox.send_due()
            except OSError as e:  # a full disk: try again later, never take the supervisor down
                log(f"notifications: {e}")
            self._stop.wait(SCAN_S)

    def stop(self, wait_s: float = TIMEOUT_S + 1) -> None:
        self._stop.set()
        self._thread.join(timeout=wait_s)


# ------------------------------------------------------------------ SLURM: the job's finish step


def send_now(urls: list[str], payload: dict, tries: int = 3) -> None:
    """Deliver at once with a short retry (a SLURM job must end soon); log each URL's outcome."""
    for url in urls:
        for i in range(tries):
            ok, detail = post(url, payload)
            if ok or i == tries - 1:
                log(f"{'notified' if ok else 'could not notify'} {display_url(url)}: {payload['event']} "
                    f"{payload.get('run')} ({detail})")
                break
            time.sleep(2 * (i + 1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="notify.py")
    p.add_argument("op", choices=["run-ended"])
    p.add_argument("run_dir")
    p.add_argument("--conf", required=True, help="the notify settings, relative to RUN_DIR")
    a = p.parse_args(argv)
    run_dir = Path(a.run_dir)
    try:
        conf = C.read_json(run_dir / a.conf)
    except ValueError:
        conf = None
    if not conf or not conf.get("urls"):
        return 0
    facts = {**processes.run_facts(run_dir), "alive": False, "started": True}  # the job's step has ended
    state, reason = states.derive_state(states.observed(facts, time.time()))
    if state not in states.ENDED:
        return 0
    send_now(conf["urls"], run_message(EVENT_ENDED, conf.get("target", "?"), conf["run"],
                                       int(os.environ.get("OPSKIT_ATTEMPT") or conf.get("attempt") or 1),
                                       state, reason, run_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
