"""The run state machine (docs/states.md), the only one, on the laptop and on the box.

`derive_state` turns what a target observed of a run (the trainer's heartbeat, whether its process
lives, its exit code; never log text) into a state; `next_state` applies it to the store's row of the
run (launch-side states, ended attempts, requeues). Pure and standard library only: the target's
queue supervisor (remote/supervisor.py) imports it too.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from train import contract as C
from train.contract import EXIT_OK

# Launch-side states (written by opskit) and derived states.
QUEUED, PREPARING, SYNCING, STARTING = "queued", "preparing", "syncing", "starting"
TOKENIZING, TRAINING, EVALUATING = "tokenizing", "training", "evaluating"
DONE, FAILED, LOST, STALLED, CANCELLED = "done", "failed", "lost", "stalled", "cancelled"

ALL_STATES = (QUEUED, PREPARING, SYNCING, STARTING, TOKENIZING, TRAINING, EVALUATING, DONE, FAILED,
              LOST, STALLED, CANCELLED)
ENDED = frozenset({DONE, FAILED, LOST, CANCELLED})
ACTIVE = frozenset({PREPARING, SYNCING, STARTING, TOKENIZING, TRAINING, EVALUATING, STALLED})
NOT_HANDED = frozenset({QUEUED, PREPARING, SYNCING})  # launch-side states: the target has no process yet
# Trainer heartbeat states that map one to one.
_LIVE_FROM_HEARTBEAT = {C.HB_STARTING: STARTING, C.HB_TOKENIZING: TOKENIZING, C.HB_TRAINING: TRAINING,
                        C.HB_EVALUATING: EVALUATING}

# A scheduler's verdict on an ended job, for what the run directory cannot tell (docs/targets-slurm.md).
SCHEDULER_ENDED = {"CANCELLED": CANCELLED, "TIMEOUT": FAILED, "OUT_OF_MEMORY": FAILED, "DEADLINE": FAILED,
                   "BOOT_FAIL": FAILED, "NODE_FAIL": LOST, "PREEMPTED": LOST}

DEFAULT_STALL_AFTER_S = 300.0  # ten missed heartbeats (the trainer beats at least every 30 s)
# A training run whose GPUs all stay below this utilisation (%) for this long is stalled ("GPUs idle");
# target settings `gpu_idle_pct` (0: never) and `gpu_idle_window_s` (docs/cost-and-notifications.md).
DEFAULT_GPU_IDLE_PCT = 10.0
DEFAULT_GPU_IDLE_WINDOW_S = 600.0
MAX_GPU_IDLE_WINDOW_S = C.GPU_BUCKET_S * C.GPU_BUCKETS  # what the heartbeat's buckets cover
DISK_FULL_BYTES = C.DISK_FULL_BYTES  # a run that died with less free than this on its disk: the disk killed it
DISK_LOW_BYTES = 2 * 2**30  # `status` shows a target's free space below this

# Heartbeat fields and the types a reader relies on (docs/run-directory.md); None is always allowed.
_HB_NUMBERS = ("updated_at", "progress_at", "loss", "tokens_per_s", "eta_s", "gpu_util", "gpu_mem_mb",
               "gpu_power_w", "gpu_at")
_HB_INTEGERS = ("attempt", "pid", "step", "total_steps", "tokens", "cache_bytes", "cache_tokens",
                "cache_target_tokens", "checkpoint_step")
_HB_TEXTS = ("message", "failure")


@dataclass(frozen=True)
class Observation:
    """What a target saw of one run's directory and process, at `now`."""

    status: dict | None  # parsed status.json, None if absent
    exit_code: int | None  # None if the process has not ended (or never wrote one)
    alive: bool  # is the launched process group still running?
    now: float
    started: bool = True  # has the launcher started it (False: still queued on the target)
    # Targets with a scheduler (SLURM): the job's state there, how often it was requeued, and the log's
    # last lines once it ended (shown with a failure).
    scheduler_state: str | None = None
    restarts: int = 0
    log_tail: str | None = None
    # What is wrong with status.json when it cannot be read as a heartbeat (`status` is None then),
    # and when it was last written (its mtime): a hung trainer with a garbage heartbeat still stalls.
    status_error: str | None = None
    status_written_at: float | None = None
    # The run's disk: {"where": "<target>:<workdir>", "free_bytes": N, "total_bytes": M}.
    disk: dict | None = None


def heartbeat_problem(status) -> str | None:
    """What makes a parsed status.json unusable as a heartbeat, or None when it is one."""
    if not isinstance(status, dict):
        return f"{C.STATUS} is not a JSON object (it holds {type(status).__name__} {str(status)[:40]})"
    state = status.get("state")
    if state is not None and state not in C.TRAINER_STATES:
        return f"{C.STATUS} state {str(state)[:40]!r} is not a trainer state"
    for key in _HB_NUMBERS + _HB_INTEGERS + _HB_TEXTS:
        value = status.get(key)
        if value is None:
            continue
        if key in _HB_TEXTS:
            ok = isinstance(value, str)
        else:
            kinds = (int, float) if key in _HB_NUMBERS else int
            ok = isinstance(value, kinds) and not isinstance(value, bool)
        if not ok:
            want = "a number" if key in _HB_NUMBERS else "an integer" if key in _HB_INTEGERS else "text"
            return f"{C.STATUS} {key} is {str(value)[:40]!r}, not {want}"
    buckets = status.get("gpu_util_max")
    if buckets is not None and not (isinstance(buckets, list) and all(
            isinstance(b, list) and len(b) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                        for x in b) for b in buckets)):
        return f"{C.STATUS} gpu_util_max is {str(buckets)[:40]!r}, not a list of [time, utilisation] pairs"
    return None


def heartbeat_fields(facts: dict) -> dict:
    """The Observation fields of a run's heartbeat from run-directory facts; a heartbeat that is not
    one (a writer that broke the contract) becomes status None with what is wrong with it."""
    status, problem = facts.get("status"), facts.get("status_error")
    problem = problem or (heartbeat_problem(status) if status is not None else None)
    return {"status": None if problem else status, "status_error": problem,
            "status_written_at": facts.get("status_written_at")}


def observed(facts: dict, now: float, disk: dict | None = None) -> Observation:
    """The Observation of one run from its run-directory facts (remote/processes.py run_facts, as
    `agent.py observe` reports them)."""
    return Observation(exit_code=facts["exit_code"], alive=facts["alive"], now=now, started=facts["started"],
                       disk=disk, **heartbeat_fields(facts))


def disk_full(disk: dict | None) -> bool:
    return bool(disk) and disk.get("free_bytes") is not None and disk["free_bytes"] < DISK_FULL_BYTES


def disk_low(disk: dict | None) -> bool:
    return bool(disk) and disk.get("free_bytes") is not None and disk["free_bytes"] < DISK_LOW_BYTES


def free_space(disk: dict | None) -> str:
    """'on box1:/data/opskit (3 MB free)' for messages."""
    disk = disk or {}
    free = f" ({disk['free_bytes'] / 1e6:.0f} MB free)" if disk.get("free_bytes") is not None else ""
    return f"on {disk.get('where') or 'the target'}{free}"


def no_space_reason(obs: Observation) -> str:
    return f"no space left on device {free_space(obs.disk)}"


def report_interval_s(status: dict | None, log_every: int | None) -> float | None:
    """Seconds between the trainer's progress reports (one per `log_every` steps) at its current pace."""
    hb = status or {}
    step, tokens, tps = hb.get("step"), hb.get("tokens"), hb.get("tokens_per_s")
    if not (log_every and step and tokens and tps):
        return None
    return log_every * (tokens / step) / tps


def stall_rules(config: dict) -> dict:
    """A target config's stall settings as keyword arguments of derive_state / next_state."""
    return {"stall_after_s": float(config.get("stall_after_s") or DEFAULT_STALL_AFTER_S),
            "gpu_idle_pct": float(config.get("gpu_idle_pct", DEFAULT_GPU_IDLE_PCT)),
            "gpu_idle_window_s": float(config.get("gpu_idle_window_s") or DEFAULT_GPU_IDLE_WINDOW_S)}


def gpus_idle_s(hb: dict, now: float, pct: float, window_s: float) -> float | None:
    """How long the run's GPUs have stayed below `pct` % utilisation, from the heartbeat's buckets
    (train/gpu_monitor.py), when that is at least `window_s`; None otherwise, or with no fresh samples
    (a CPU run, a monitor that stopped)."""
    buckets = hb.get("gpu_util_max") or []
    if not pct or not buckets or now - float(buckets[-1][0]) > 3 * C.GPU_BUCKET_S:
        return None
    since = None
    for start, highest in reversed(buckets):
        if float(highest) >= pct:
            break
        since = float(start)
    if since is None or now - since < window_s:
        return None
    return now - since


def derive_state(obs: Observation, stall_after_s: float = DEFAULT_STALL_AFTER_S,
                 log_every: int | None = None, gpu_idle_pct: float = DEFAULT_GPU_IDLE_PCT,
                 gpu_idle_window_s: float = DEFAULT_GPU_IDLE_WINDOW_S) -> tuple[str, str]:
    """(state, reason) for one observation. `log_every` (the spec's) lets a training run whose
    progress reports are further apart than `stall_after_s` wait three of its own intervals; a
    training run whose GPUs stay under `gpu_idle_pct` for `gpu_idle_window_s` is stalled too."""
    hb = obs.status or {}
    hb_state = hb.get("state")
    tail = f"; log: {obs.log_tail}" if obs.log_tail else ""
    forced = SCHEDULER_ENDED.get(obs.scheduler_state or "")
    if forced and not (obs.exit_code == EXIT_OK and hb_state == C.HB_DONE):
        ckpt = f" (checkpoint at step {hb['checkpoint_step']})" if hb.get("checkpoint_step") is not None else ""
        return forced, f"SLURM {obs.scheduler_state}{ckpt}" + (tail if forced == FAILED else "")
    if obs.exit_code is not None:
        if obs.exit_code == EXIT_OK and hb_state == C.HB_DONE:
            return DONE, "exit code 0"
        if obs.exit_code == EXIT_OK:
            return FAILED, (f"exit code 0 but {obs.status_error}" if obs.status_error
                            else f"exit code 0 but heartbeat says {hb_state!r}")
        if obs.exit_code == C.EXIT_NO_SPACE or hb.get("failure") == C.FAILURE_NO_SPACE:
            return FAILED, no_space_reason(obs)
        if hb_state == C.HB_INTERRUPTED:
            return CANCELLED, f"stopped by signal after checkpoint at step {hb.get('checkpoint_step')}"
        detail = f": {hb['message']}" if hb_state == C.HB_FAILED and hb.get("message") else ""
        return FAILED, f"exit code {obs.exit_code}{detail}{tail}"
    if not obs.started:
        if obs.scheduler_state:
            return QUEUED, f"SLURM {obs.scheduler_state}" + (f" (requeued {obs.restarts}x)" if obs.restarts else "")
        return QUEUED, "waiting on the target's queue"
    if not obs.alive:
        if disk_full(obs.disk):  # detach.sh could not even write the exit code
            return FAILED, f"process gone without an exit code; {no_space_reason(obs)}"
        return LOST, "process gone without an exit code"
    if obs.status_error:  # judged by when the file was last written; next_state keeps the live phase
        age = obs.now - float(obs.status_written_at or obs.now)
        if age > stall_after_s:
            return STALLED, f"alive, heartbeat unreadable and not rewritten for {age:.0f}s ({obs.status_error})"
        return STARTING, f"heartbeat unreadable: {obs.status_error}"
    if not hb:
        return STARTING, "process alive, no heartbeat yet"
    age = obs.now - float(hb.get("updated_at") or 0)
    if age > stall_after_s:
        return STALLED, f"alive, heartbeat {age:.0f}s old"
    quiet = obs.now - float(hb.get("progress_at") or obs.now)
    allowed = max(stall_after_s, 3 * (report_interval_s(hb, log_every) or 0))
    if hb_state == C.HB_TRAINING and quiet > allowed:  # the beat goes on but no step is reported
        return STALLED, f"alive, no training progress for {quiet:.0f}s"
    idle_s = gpus_idle_s(hb, obs.now, gpu_idle_pct, gpu_idle_window_s) if hb_state == C.HB_TRAINING else None
    if idle_s is not None:
        return STALLED, f"GPUs idle: utilisation under {gpu_idle_pct:g}% for {idle_s:.0f}s"
    state = _LIVE_FROM_HEARTBEAT.get(hb_state)
    if state:
        return state, "heartbeat"
    # done/interrupted/failed written but the process has not exited yet: still finishing up
    return (EVALUATING if hb_state == C.HB_DONE else STARTING), f"heartbeat {hb_state}, process exiting"


def next_state(row: dict, obs: Observation, stall_after_s: float = DEFAULT_STALL_AFTER_S,
               queue_fields: dict | None = None, now: float | None = None,
               gpu_idle_pct: float = DEFAULT_GPU_IDLE_PCT,
               gpu_idle_window_s: float = DEFAULT_GPU_IDLE_WINDOW_S) -> tuple[str, str | None, dict]:
    """(state, reason, fields) for the store's `row` of a run after its target observed `obs`.

    `queue_fields`: what the target's queue says of this attempt (opskit.queue.queue_fields), with
    `start_error` when its supervisor could not start it. On top of `derive_state`:
    a heartbeat of another attempt says nothing of this one; a run launch has not handed over yet
    keeps its launch-side state; a queue start error fails the run; an ended attempt stays ended
    until a new one starts (resume, rerun, a scheduler's requeue, which counts as an attempt).
    The reason is None when the state is kept as it was."""
    now = obs.now if now is None else now
    spec = row.get("spec") or {}
    hb_attempt = (obs.status or {}).get("attempt")
    if spec and hb_attempt is not None and hb_attempt != spec["attempt"]:
        obs = dataclasses.replace(obs, status=None)
    fields = dict(queue_fields or {})
    start_error = fields.pop("start_error", None)
    start_no_space = fields.pop("start_no_space", False)
    missing = fields.pop("entry_missing", None)
    state, reason = derive_state(obs, stall_after_s, spec.get("log_every"), gpu_idle_pct, gpu_idle_window_s)
    if obs.status_error and state == STARTING and row["state"] in (TOKENIZING, TRAINING, EVALUATING):
        state = row["state"]  # a garbage heartbeat says nothing of the phase: keep the last one known
    if obs.status_error:
        fields["message"] = reason
    if row["state"] in NOT_HANDED and not obs.started:
        state = row["state"]
    if start_error and not obs.started:
        state, reason = FAILED, (no_space_reason(obs) if start_no_space or disk_full(obs.disk)
                                 else f"the target's queue could not start it: {start_error}")
    elif missing and not obs.started and row["state"] == QUEUED:
        state, reason = FAILED, f"its entry is gone from the target's queue{missing if isinstance(missing, str) else ''}"
    requeued = bool(spec) and spec["attempt"] + obs.restarts > row["attempt"]
    if row["state"] in ENDED and state not in ENDED and not requeued:
        state, reason = row["state"], None
    fields.update(progress_fields(obs.status), stale=0, exit_code=obs.exit_code)
    if not obs.started:
        fields.pop("started_at", None)
    elif not row.get("started_at") and not fields.get("started_at"):
        fields["started_at"] = now
    if state in ENDED and row["state"] not in ENDED:
        fields["ended_at"] = now
    if obs.restarts and spec:
        fields["attempt"] = spec["attempt"] + obs.restarts
    return state, reason, fields


def progress_fields(status: dict | None) -> dict:
    """The heartbeat's progress numbers as run-row fields."""
    if not status:
        return {}
    out = {k: status.get(k) for k in ("step", "total_steps", "tokens", "loss", "tokens_per_s", "eta_s",
                                      "cache_bytes", "cache_tokens", "cache_target_tokens",
                                      "checkpoint_step", "message", "gpu_util", "gpu_mem_mb", "gpu_power_w")}
    out["heartbeat_at"] = status.get("updated_at")
    return {k: v for k, v in out.items() if v is not None}
