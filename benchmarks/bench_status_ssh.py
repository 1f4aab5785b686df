"""How long `opskit status` (operations.refresh) takes over many SSH targets versus one, in one
process and across processes (each `opskit status` is a new process).

10 SSH targets (each its own private sshd on 127.0.0.1 by default, or one shared sshd with
--shared-server) x 5 runs each: `sleep` processes started through agent.py start, with a
status.json heartbeat written by this script. Prints the wall time of refresh over all targets and
over one target alone (cold: first contact, new connections; warm: median of reused connections),
and opskit's own CPU time. Then the same across processes: `opskit status --json` as a new process
each time, cold (no shared connection: every box pays a handshake) and warm (the masters the first
process left, opskit/transport/ssh_mux.py), wall and CPU of the CLI process. Every "box" here shares
this machine's cores, so the remote agents' CPU (~0.1 s per agent call) adds up here as it would not
on real, separate boxes.

    OMP_NUM_THREADS=1 python benchmarks/bench_status_ssh.py [--targets 10] [--runs 5] [--repeat 7]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import sshd  # noqa: E402

from opskit import operations  # noqa: E402
from opskit.transport import ssh as ssh_connection  # noqa: E402
from opskit.store import Store  # noqa: E402
from train import contract as C  # noqa: E402


class SlowLink:
    """A TCP relay to 127.0.0.1:`port` that adds `rtt_ms` per round trip (half each way): a box across
    the internet instead of on this machine. Runs in its own thread with an asyncio loop."""

    def __init__(self, port: int, rtt_ms: float):
        import asyncio
        import socket
        import threading
        self.target, self.delay = port, rtt_ms / 2000
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def pipe(reader, writer):
            try:
                while data := await reader.read(65536):
                    await asyncio.sleep(self.delay)
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                writer.close()

        async def handle(client_r, client_w):
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target)
            await asyncio.gather(pipe(client_r, server_w), pipe(server_r, client_w))

        async def serve():
            await asyncio.start_server(handle, sock=sock)
            ready.set()

        threading.Thread(target=lambda: (self.loop.run_until_complete(serve()), self.loop.run_forever()),
                         daemon=True).start()
        ready.wait(5)


def setup(store: Store, servers: list, n_targets: int, n_runs: int, work: Path, rtt_ms: float = 0) -> list:
    """Targets and their runs; returns (target, run) pairs."""
    started = []
    for t in range(n_targets):
        server = servers[t % len(servers)]
        name = f"box{t}"
        # the agent runs with the interpreter itself (here `python3` is pyenv's 100 ms shell shim; a box's is not)
        options = server.target_options("root", str(work / name), agent_python=sys.executable)
        if rtt_ms:
            options["ssh"] = f"root@127.0.0.1:{SlowLink(server.port, rtt_ms).port}"
        operations.add_target(store, name, "ssh", options)
        box = operations.get_target(store, name)
        box.sync()
        for r in range(n_runs):
            run = f"bench/sleep{r}/s{t}"
            box.start(run, ["sleep", "600"], attempt=1)
            C.atomic_write_json(Path(box.run_dir(run)) / C.STATUS, {
                "state": "training", "attempt": 1, "updated_at": time.time() + 3600, "step": r, "total_steps": 100,
                "tokens": 0, "loss": 3.0, "tokens_per_s": 1000.0, "eta_s": 60.0})
            store.upsert_run({"name": run, "phase": "bench", "config": f"sleep{r}", "seed": t, "target": name,
                              "attempt": 1, "state": "starting", "run_dir": box.run_dir(run)}, reason="bench")
            started.append((box, run))
    return started


def own_cpu_s() -> float:
    """CPU seconds of this process and its children (the ssh clients that speak through the masters)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def machine_busy_s() -> float:
    """CPU seconds this whole machine (every core, every process: sshd, agents, opskit) has been busy."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def time_refresh(store: Store, repeat: int) -> dict[str, float]:
    """Cold (no pooled connection), then medians over `repeat` warm refreshes: wall, opskit's own CPU,
    the machine's CPU, and wall when the targets are refreshed one after another instead of at once."""
    ssh_connection.close_all()
    t0 = time.perf_counter()
    health = operations.refresh(store)
    cold = time.perf_counter() - t0
    assert all(v is None for v in health.values()), health
    by_target: dict[str, list[str]] = {}
    for r in store.list_runs():
        by_target.setdefault(r["target"], []).append(r["name"])
    warm, cpu, busy, sequential = [], [], [], []
    for _ in range(repeat):
        t0, c0, b0 = time.perf_counter(), own_cpu_s(), machine_busy_s()
        operations.refresh(store)
        warm.append(time.perf_counter() - t0)
        cpu.append(own_cpu_s() - c0)
        busy.append(machine_busy_s() - b0)
        t0 = time.perf_counter()
        for runs in by_target.values():
            operations.refresh(store, runs=runs)
        sequential.append(time.perf_counter() - t0)
    med = statistics.median
    return {"cold": cold, "warm": med(warm), "cpu": med(cpu), "busy": med(busy), "sequential": med(sequential)}


def time_cli_status(db: Path, repeat: int) -> dict[str, float]:
    """`opskit status --json` as new processes: cold (shared connections stopped first), then warm
    (medians over `repeat`): wall, and CPU of the CLI process (its ssh clients included)."""
    env = {**os.environ, "OPSKIT_STATE": str(db), "OMP_NUM_THREADS": "1"}

    def once() -> tuple[float, float]:
        before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "opskit.cli", "status", "--json"], env=env,
                              capture_output=True, text=True, timeout=300)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        assert proc.returncode == 0, proc.stderr
        rows = json.loads(proc.stdout)
        assert rows and all(r["state"] == "training" and not r["stale"] for r in rows), proc.stdout[-500:]
        return wall, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime

    ssh_connection.close_all()
    stop_masters(db)
    cold_wall, cold_cpu = once()
    warm = [once() for _ in range(repeat)]
    med = statistics.median
    return {"cold": cold_wall, "cold_cpu": cold_cpu, "warm": med(w for w, _ in warm),
            "warm_cpu": med(c for _, c in warm)}


def stop_masters(db: Path) -> None:
    """Stop the shared connections to every target of the store (as if none was used for minutes)."""
    from opskit.transport.ssh import Address, stop_shared_connection
    with Store(db) as store:
        for t in store.list_targets():
            c = t["config"]
            if c.get("host"):
                stop_shared_connection(Address(c["host"], c.get("user"), c.get("port"), c.get("key"),
                                               c.get("known_hosts")))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", type=int, default=10)
    p.add_argument("--runs", type=int, default=5, help="runs per target")
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--shared-server", action="store_true", help="every target on one sshd (one pooled connection)")
    p.add_argument("--rtt-ms", type=float, default=0,
                   help="reach each box through a relay adding this round-trip time (rented boxes: 20-100 ms)")
    a = p.parse_args()
    servers = [sshd.SSHServer() for _ in range(1 if a.shared_server else a.targets)]
    started: list = []
    with tempfile.TemporaryDirectory(prefix="opskit-bench-") as tmp:
        work = Path(tmp)
        try:
            for s in servers:
                s.start()
            with Store(work / "all.db") as all_store, Store(work / "one.db") as one_store:
                started = setup(all_store, servers, a.targets, a.runs, work / "all", a.rtt_ms)
                started += setup(one_store, servers[:1], 1, a.runs, work / "one", a.rtt_ms)
                t_all, t_one = time_refresh(all_store, a.repeat), time_refresh(one_store, a.repeat)
                states = {r["state"] for r in all_store.list_runs()}
                assert states == {"training"}, states
            cli_all, cli_one = time_cli_status(work / "all.db", a.repeat), time_cli_status(work / "one.db", a.repeat)
        finally:
            for box, run in started:
                box.signal(run, "TERM")  # detach.sh forwards TERM to the command (KILL would orphan it)
            ssh_connection.close_all()
            for s in servers:
                s.cleanup()
    layout = "one shared sshd" if a.shared_server else f"{len(servers)} sshd servers"
    layout += f", +{a.rtt_ms:g} ms round trip" if a.rtt_ms else ", loopback"
    cores = os.cpu_count() or 1
    print(json.dumps({"targets": a.targets, "runs_per_target": a.runs, "layout": layout, "cores": cores,
                      "refresh_all_cold_s": round(t_all["cold"], 3), "refresh_one_cold_s": round(t_one["cold"], 3),
                      "refresh_all_warm_s": round(t_all["warm"], 3), "refresh_one_warm_s": round(t_one["warm"], 3),
                      "refresh_all_one_after_another_s": round(t_all["sequential"], 3),
                      "ratio_cold": round(t_all["cold"] / t_one["cold"], 2),
                      "ratio_warm": round(t_all["warm"] / t_one["warm"], 2),
                      "opskit_cpu_all_warm_s": round(t_all["cpu"], 3), "opskit_cpu_one_warm_s": round(t_one["cpu"], 3),
                      "machine_cpu_all_warm_s": round(t_all["busy"], 3),
                      "machine_cpu_one_warm_s": round(t_one["busy"], 3),
                      "cli_status_all_cold_s": round(cli_all["cold"], 3), "cli_status_all_warm_s": round(cli_all["warm"], 3),
                      "cli_status_one_cold_s": round(cli_one["cold"], 3), "cli_status_one_warm_s": round(cli_one["warm"], 3),
                      "cli_cpu_all_cold_s": round(cli_all["cold_cpu"], 3), "cli_cpu_all_warm_s": round(cli_all["warm_cpu"], 3),
                      "cli_ratio_cold_vs_warm_all": round(cli_all["cold"] / cli_all["warm"], 2)}, indent=1))
    print(f"refresh over {a.targets} SSH targets x {a.runs} runs ({layout}): warm {t_all['warm'] * 1000:.0f} ms "
          f"vs one target {t_one['warm'] * 1000:.0f} ms (x{t_all['warm'] / t_one['warm']:.2f}); the same targets "
          f"one after another {t_all['sequential'] * 1000:.0f} ms; cold {t_all['cold'] * 1000:.0f} ms vs "
          f"{t_one['cold'] * 1000:.0f} ms (x{t_all['cold'] / t_one['cold']:.2f})")
    print(f"`opskit status` as a new process over {a.targets} targets: cold {cli_all['cold'] * 1000:.0f} ms "
          f"({cli_all['cold_cpu']:.2f} CPU-s), warm {cli_all['warm'] * 1000:.0f} ms ({cli_all['warm_cpu']:.2f} CPU-s; "
          f"x{cli_all['cold'] / cli_all['warm']:.2f} faster than cold); one target: cold {cli_one['cold'] * 1000:.0f} "
          f"ms, warm {cli_one['warm'] * 1000:.0f} ms")
    print(f"every simulated box runs on this machine's {cores} cores: one warm refresh of all targets keeps them "
          f"busy {t_all['busy']:.2f} CPU-s (at least {t_all['busy'] / cores * 1000:.0f} ms of wall on {cores} "
          f"cores), of which opskit itself (with its ssh clients) {t_all['cpu']:.2f} s")


if __name__ == "__main__":
    main()
