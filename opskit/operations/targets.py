"""The targets the store knows: the built-in `local` one, those added by hand, and their Target objects."""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from opskit import states
from opskit.errors import OpsError, unknown_name
from opskit.store import Store

if TYPE_CHECKING:  # the target kinds load when a target is opened: `status` of ended runs needs none
    from opskit.targets import Target

MIN_STALL_AFTER_S = 30  # the trainer beats every 10-30 s
MIN_GPU_IDLE_WINDOW_S = 60


def workdir_beside_store(store: Store, target: str) -> str:
    """A target on this machine keeps its runs in .opskit/<target>/ beside state.db."""
    return str(store.path.resolve().parent / ".opskit" / target)


def local_target_record(store: Store) -> dict:
    """The `local` target, created on first use with its workdir beside state.db and this machine's
    GPUs (detected once; an earlier opskit's record, which always said 0, is detected again)."""
    rec = store.get_target("local")
    if rec is None or set(rec["config"]) == {"workdir", "gpus"} and not rec["config"]["gpus"]:
        from opskit.targets.local import detect_gpus
        config = {"workdir": workdir_beside_store(store, "local"), **(rec["config"] if rec else {}),
                  "gpus": detect_gpus(sys.executable), "gpus_detected": True}
        store.add_target("local", "local", config, replace=True)
        rec = store.get_target("local")
    return rec


def target_names(store: Store) -> list[str]:
    return ["local", *[t["name"] for t in store.list_targets() if t["name"] != "local"]]


def list_targets(store: Store) -> list[dict]:
    local_target_record(store)
    return store.list_targets()


def add_target(store: Store, name: str, kind: str, options: dict, replace: bool = False) -> dict:
    """Validate a target's options through its kind's class and store it (no secrets: keys by path).
    `local` itself may be configured again as a local target (its GPUs, a price)."""
    if name == "local" and kind != "local":
        raise OpsError("'local' is the built-in local target; pick another name")
    options = dict(options)
    if kind in ("slurm", "local") and not options.get("login") and not options.get("workdir"):
        options["workdir"] = workdir_beside_store(store, name)  # a target on this machine
    common = {k: options.pop(k) for k in COMMON_OPTIONS if options.get(k) is not None}
    from opskit.targets import target_class
    config = target_class(kind).config_from_options({**options, "name": name})
    config.update(common_settings(kind, common))
    store.add_target(name, kind, config, replace=replace or name == "local")
    return store.get_target(name)


COMMON_OPTIONS = ("stall_after_s", "price_per_hour", "notify", "idle_after_s", "on_idle", "idle_even_unpulled",
                  "gpu_idle_pct", "gpu_idle_window_s")


def common_settings(kind: str, options: dict) -> dict:
    """Settings every kind has: stalls (docs/states.md), price, notifications, the idle action
    (docs/cost-and-notifications.md). Validated here; the box's supervisor reads them."""
    out: dict = {}
    if options.get("stall_after_s") is not None:
        if float(options["stall_after_s"]) < MIN_STALL_AFTER_S:
            raise OpsError(f"--stall-after {options['stall_after_s']}: at least {MIN_STALL_AFTER_S} s "
                           f"(the trainer beats every 10-30 s)")
        out["stall_after_s"] = float(options["stall_after_s"])
    if options.get("price_per_hour") is not None:
        if float(options["price_per_hour"]) < 0:
            raise OpsError(f"--price-per-hour {options['price_per_hour']}: a price is not negative")
        out["price_per_hour"] = float(options["price_per_hour"])
    if options.get("notify"):
        out["notify"] = [check_notify_url(u) for u in options["notify"]]
    if options.get("gpu_idle_pct") is not None:
        if not 0 <= float(options["gpu_idle_pct"]) <= 100:
            raise OpsError(f"--gpu-idle-pct {options['gpu_idle_pct']}: a utilisation between 0 (off) and 100")
        out["gpu_idle_pct"] = float(options["gpu_idle_pct"])
    if options.get("gpu_idle_window_s") is not None:
        window = float(options["gpu_idle_window_s"])
        if not MIN_GPU_IDLE_WINDOW_S <= window <= states.MAX_GPU_IDLE_WINDOW_S:
            raise OpsError(f"--gpu-idle-window {window:g}: between {MIN_GPU_IDLE_WINDOW_S} and "
                           f"{states.MAX_GPU_IDLE_WINDOW_S:g} s (what the heartbeat keeps of GPU samples)")
        out["gpu_idle_window_s"] = window
    idle = {k: options[k] for k in ("idle_after_s", "on_idle", "idle_even_unpulled") if options.get(k) is not None}
    if idle and kind == "slurm":
        raise OpsError("--on-idle/--idle-after: SLURM holds a cluster's machines, there is no box to stop")
    if bool(idle.get("on_idle")) != bool(idle.get("idle_after_s")):
        raise OpsError("--on-idle CMD and --idle-after SECONDS go together")
    if idle.get("on_idle"):
        if float(idle["idle_after_s"]) <= 0:
            raise OpsError(f"--idle-after {idle['idle_after_s']}: a number of seconds above 0")
        out.update(on_idle=str(idle["on_idle"]), idle_after_s=float(idle["idle_after_s"]))
        if idle.get("idle_even_unpulled"):
            out["idle_even_unpulled"] = True
    return out


def check_notify_url(url: str) -> str:
    """An http(s) URL with a host and no user or password in it (nothing secret is ever sent)."""
    u = urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise OpsError(f"--notify {url}: give an http:// or https:// URL, e.g. a Slack incoming webhook")
    if u.username or u.password:
        raise OpsError("--notify: a URL with a user or password in it is refused; opskit sends no credentials")
    return url


def remove_target(store: Store, name: str) -> dict:
    if name == "local":  # built in: it comes back at once, so removing it resets it
        if store.get_target("local") is not None:
            store.remove_target("local")
        return {"reset": "local", "config": local_target_record(store)["config"]}
    store.remove_target(name)
    return {"removed": name}


def get_target(store: Store, name: str) -> Target:
    from opskit.targets import open_target
    if name == "local":
        return open_target(local_target_record(store))
    rec = store.get_target(name)
    if rec is None:
        raise unknown_name("target", name, target_names(store))
    return open_target(rec)


def check_target(store: Store, name: str) -> dict:
    """Is it reachable, with python, GPUs and free disk? An unreachable one answers reachable: False."""
    from opskit.errors import TargetUnreachable
    try:
        return get_target(store, name).check()
    except TargetUnreachable as e:
        return {"reachable": False, "error": str(e)}


def prepare_target(store: Store, name: str, on_line=print) -> dict:
    """Provision the target, sync the code, and restart its queue's supervisor if it died with work left.
    The box gets the target's settings now (price, notifications, idle action; else at the next launch)
    and a watched one a supervisor that keeps its ledger from now on."""
    tgt = get_target(store, name)
    with tgt.setting_up():
        tgt.prepare(on_line=on_line)
        tgt.sync()
    tgt.ensure_supervisor()
    if tgt.kind != "slurm":
        tgt.box_state()
    return {"target": name, "ready": True}
