"""The training job: `python -m train.run --spec PATH`, or under `torchrun --nproc_per_node=N`.

Sections: spec -> process group -> data -> model (FSDP2) -> resume -> train loop (checkpoints,
heartbeat, signals) -> evaluation by length -> results.json. Exit codes per docs/run-directory.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from train import contract as C
from train.contract import (CKPT_DIR, EVAL_PER_LENGTH, EXIT_BAD_SPEC, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK,
                            RESULTS, atomic_write_json)
from train.spec import SpecError, TrainSpec, check_world, load_spec

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Interrupted(Exception):
    """A stop signal arrived outside the train loop (tokenizing, building, evaluating)."""


class StopSignals:
    """SIGTERM/SIGUSR1 set a flag. Outside the train loop they also raise Interrupted at once, since
    there is no step boundary to wait for; inside it (`deferred()`) the loop checks the flag itself."""

    def __init__(self):
        self.received: str | None = None
        self._raise = True

    def install(self) -> "StopSignals":
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        if self._raise:
            raise Interrupted(self.received)

    @contextmanager
    def deferred(self):
        self._raise = False
        try:
            yield
        finally:
            self._raise = True


_LOG_RANK = {"rank": 0}  # set once the process group exists; only rank 0 logs progress


def log(msg: str) -> None:
    if _LOG_RANK["rank"] != 0:
        return
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- resolving the spec against the code

@dataclass(frozen=True)
class ModelPlan:
    cfg: object  # train.presets.ModelConfig
    inv_freq: list
    attention_factor: float


def plan_model(spec: TrainSpec) -> ModelPlan:
    """Preset and RoPE spectrum of the spec, or SpecError naming the field that does not resolve."""
    from train import presets, spectra
    try:
        cfg = presets.get_preset(spec.preset)
    except (KeyError, ValueError) as e:
        raise SpecError(f"spec field 'preset': {_reason(e)}") from None
    try:
        inv = spectra.inv_freq(spec.spectrum, cfg.head_dim)
    except ValueError as e:
        raise SpecError(f"spec field 'rope.spectrum': {_reason(e)}") from None
    scaling = None
    if spec.scaling is not None:
        s = spec.scaling
        scaling = spectra.Scaling(s["type"], s["factor"], s["original_max"])
    try:
        inv, attention_factor = spectra.apply_scaling(inv, scaling, cfg.head_dim, length=spec.seq_len)
    except ValueError as e:
        raise SpecError(f"spec field 'rope.scaling': {_reason(e)}") from None
    return ModelPlan(cfg, list(inv), float(attention_factor))


def check_datasets(spec: TrainSpec) -> None:
    """Every dataset of the spec is known and has the split asked for, or SpecError naming the field."""
    from train.data.registry import DataError, get_dataset
    wanted = [(f"data.train[{i}].dataset", part["dataset"], "train") for i, part in enumerate(spec.train_data)]
    wanted.append(("data.validation.dataset", spec.validation["dataset"], spec.validation["split"]))
    for field, name, split in wanted:
        try:
            info = get_dataset(name)
        except DataError as e:
            raise SpecError(f"spec field '{field}': {_reason(e)}") from None
        if not info.has_split(split):
            raise SpecError(f"spec field '{field}': dataset '{name}' has no split '{split}'")


def _reason(e: Exception) -> str:
    return str(e.args[0]) if e.args else type(e).__name__


# ---------------------------------------------------------------- data

def prepare_data(spec: TrainSpec, dist_info, heartbeat):
    """Node-local rank 0 builds (or finds) the token cache while the others wait; then all open it."""
    from train.data import prepare_data as prepare
    from train.distributed import barrier_polling
    from train.heartbeat import STATUS_FIELDS

    def on_progress(info: dict) -> None:
        heartbeat.update(state=C.HB_TOKENIZING, **{k: v for k, v in info.items() if k in STATUS_FIELDS})

    heartbeat.update(state=C.HB_TOKENIZING, message="preparing data")
    if dist_info.local_rank == 0:
        data = prepare(spec.raw, on_progress=on_progress if dist_info.is_main else None)
        barrier_polling()
    else:
        barrier_polling()
        data = prepare(spec.raw)
    heartbeat.update(cache_bytes=getattr(data, "cache_bytes", None), message="data ready")
    return data


# ---------------------------------------------------------------- model and optimizer

def build_model(plan: ModelPlan, spec: TrainSpec, dist_info, on_meta: bool | None = None):
    """The FSDP2 model of the spec: (model, n_params, compute dtype, kernels that run).

    Built on the meta device and materialised already sharded on the GPU (`on_meta`, default on
    CUDA), or built on the CPU from the seed and moved (bitwise the same weights as before sharding).
    """
    import torch
    from train.attention import describe, select_backend
    from train.distributed import compile_enabled, compute_dtype, parallelize
    from train.loss import select_impl
    from train.model import GPT

    device, cfg = dist_info.device, plan.cfg
    on_meta = device.type == "cuda" if on_meta is None else on_meta
    torch.manual_seed(spec.seed)  # same spec, same initial weights (on the same device type and world size)
    with torch.device("meta" if on_meta else "cpu"):
        model = GPT(cfg, plan.inv_freq, attention_factor=plan.attention_factor)
    n_params = sum(p.numel() for p in model.parameters())
    dtype = compute_dtype(spec.dtype, device)
    compiled = compile_enabled(spec.compile, device)
    shape = (spec.micro_batch, spec.seq_len, cfg.n_heads, cfg.head_dim)
    backend = select_backend(device, dtype, shape)
    model.set_attention_backend(backend)
    model.loss_impl = select_impl(device, dtype, compiled, cfg.hidden, cfg.vocab_size)
    if not on_meta:
        model.to(device)
    parallelize(model, dtype, spec.activation_checkpointing, compiled)
    if on_meta:
        model.to_empty(device=device)
        model.init_weights()
    kernels = {"attention_backend": describe(backend, device, dtype, shape), "loss_impl": model.loss_impl,
               "compile": compiled}
    return model, n_params, dtype, kernels


def build_optimizer(model, spec: TrainSpec, device):
    return adamw(model, spec.lr, spec.weight_decay, fused=device.type == "cuda")


def adamw(model, lr: float, weight_decay: float, fused: bool):
    """AdamW(0.9, 0.95); weight decay on matrices only (not norms, biases or other vectors)."""
    import torch
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


# ---------------------------------------------------------------- the train loop

@dataclass
class Progress:
    step: int = 0
    train_time_s: float = 0.0   # time spent in training steps over all attempts (compile, warm-up included)
    wall_time_s: float = 0.0    # whole-process time over all finished attempts
    last_loss: float | None = None
    steady_time_s: float = 0.0  # train.step.StepTimer's steady part, over all attempts
    steady_steps: int = 0


def _grad_norm(value) -> float:
    from torch.distributed.tensor import DTensor
    if isinstance(value, DTensor):
        value = value.full_tensor()
    return float(value)


def train_loop(spec, dist_info, model, optimizer, data, progress: Progress, total_steps: int,
               heartbeat, curve, signals: StopSignals, started: float) -> bool:
    """Runs steps progress.step..total_steps-1. Returns False when stopped by a signal (checkpoint saved)."""
    import torch
    from train.checkpoint import AsyncSaver
    from train.data.loader import ChunkSampler
    from train.distributed import StopAgreement, mean_over_ranks
    from train.schedule import lr_at, warmup_steps
    from train.step import StepTimer, collect_now, gc_controlled, train_step

    device = dist_info.device
    world = dist_info.world_size
    tokens_per_step = spec.tokens_per_step(world)
    warmup = warmup_steps(total_steps, spec.warmup_frac)
    sampler = ChunkSampler(len(data.train), spec.seq_len, spec.seed, dist_info.rank, world)
    saver = AsyncSaver(Path(spec.out_dir) / CKPT_DIR, spec.keep_checkpoints)
    stop = StopAgreement()
    timer = StepTimer(device, total_s=progress.train_time_s, steady_s=progress.steady_time_s,
                      steady_steps=progress.steady_steps)
    saving_since = {}

    def saved(step) -> None:
        if step is not None:
            heartbeat.update(checkpoint_step=step, message=f"checkpoint step {step} saved")
            log(f"checkpoint step {step} saved ({time.perf_counter() - saving_since.pop(step):.1f}s after it began)")

    def save(step: int, wait: bool) -> None:
        """In the background unless `wait`; the previous save is finished first either way."""
        saved(saver.wait())
        heartbeat.update(message=f"saving checkpoint step {step}")
        saving_since[step] = time.perf_counter()
        meta = {"tokens": step * tokens_per_step, "data_position": step, "train_time_s": timer.total_s,
                "steady_time_s": timer.steady_s, "steady_steps": timer.steady_steps,
                "wall_time_s": progress.wall_time_s + (time.time() - started), "last_loss": progress.last_loss}
        saver.start(step, model, optimizer, meta)
        if saver.pending_step is None:  # step_<N> was complete already (a stop right after resuming)
            saved(step)
        elif wait:
            saved(saver.wait())

    def micro_batches(step: int):
        for micro in range(spec.grad_accum):
            x, y = sampler.batch(data.train, step, micro, spec.micro_batch, spec.grad_accum)
            yield (torch.from_numpy(x).to(device, non_blocking=True), torch.from_numpy(y).to(device, non_blocking=True))

    model.train()
    window_s, window_steps = 0.0, 0  # time in steps since the last log line (checkpoint saves excluded)
    with gc_controlled():
        while progress.step < total_steps:
            saved(saver.poll())
            if stop.any_stop(signals.received is not None):
                log(f"stop signal ({signals.received or 'on another rank'}): saving a checkpoint at step {progress.step}")
                save(progress.step, wait=True)
                return False
            timer.begin()
            step = progress.step
            lr = lr_at(step, total_steps, spec.lr, warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum, norm = train_step(model, optimizer, micro_batches(step), spec.grad_accum, spec.grad_clip)
            progress.step = step + 1
            logging = progress.step % spec.log_every == 0 or progress.step == total_steps
            if logging:  # inside the step's time: .item() waits for the device
                loss_value = mean_over_ranks(loss_sum.item(), device)
                grad_norm = _grad_norm(norm)
            window_s += timer.end()
            window_steps += 1
            collect_now(progress.step)

            if logging:
                tps = window_steps * tokens_per_step / max(window_s, 1e-9)
                progress.last_loss = loss_value
                eta = (total_steps - progress.step) * tokens_per_step / tps
                tokens = progress.step * tokens_per_step
                curve.append(progress.step, tokens, loss_value, lr, grad_norm, tps)
                heartbeat.update(step=progress.step, tokens=tokens, loss=loss_value, tokens_per_s=tps, eta_s=eta,
                                 message="training")
                log(f"step {progress.step}/{total_steps} loss {loss_value:.4f} lr {lr:.2e} "
                    f"grad_norm {grad_norm:.3f} tok/s {tps:,.0f} ({window_s / window_steps * 1e3:.0f} ms/step)")
                window_s, window_steps = 0.0, 0
            progress.train_time_s, progress.steady_time_s = timer.total_s, timer.steady_s
            progress.steady_steps = timer.steady_steps

            if progress.step % spec.checkpoint_every == 0 or progress.step == total_steps:
                save(progress.step, wait=progress.step == total_steps)
    saved(saver.wait())
    stop.close()
    return True


# ---------------------------------------------------------------- results

def git_commit(code_dir: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(code_dir), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def versions(dist_info, launched_from: str | None = None) -> dict:
    """`launched_from`: the commit opskit recorded at launch (spec `code_commit`); the synced code on a
    box has no .git, so it is the one that names the code."""
    import torch
    cuda = dist_info.device.type == "cuda"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "gpu": torch.cuda.get_device_name(dist_info.device) if cuda else None,
        "gpu_count": dist_info.world_size if cuda else 0,
        "git_commit": launched_from or git_commit(Path(__file__).resolve().parent.parent),
    }


# ---------------------------------------------------------------- the run

def run(spec: TrainSpec, dist_info, heartbeat, curve, signals: StopSignals, started: float) -> int:
    import torch
    from train import checkpoint
    from train.distributed import barrier_polling

    out_dir = Path(spec.out_dir)
    total_steps = check_world(spec, dist_info.world_size)
    heartbeat.update(total_steps=total_steps)
    plan = plan_model(spec)
    check_datasets(spec)
    data = prepare_data(spec, dist_info, heartbeat)
    if data.vocab_size > plan.cfg.vocab_size:
        raise SpecError(f"spec field 'tokenizer': vocabulary {data.vocab_size} does not fit preset "
                        f"'{spec.preset}' (vocab_size {plan.cfg.vocab_size})")

    heartbeat.update(message="building model")
    model, n_params, dtype, kernels = build_model(plan, spec, dist_info)
    optimizer = build_optimizer(model, spec, dist_info.device)
    dtype_name = "bf16" if dtype == torch.bfloat16 else "fp32"
    log(f"model {spec.preset}: {n_params:,} parameters, {dtype_name} compute, world size "
        f"{dist_info.world_size} on {dist_info.device.type}, {total_steps} steps of "
        f"{spec.tokens_per_step(dist_info.world_size):,} tokens; attention {kernels['attention_backend']}, "
        f"loss {kernels['loss_impl']}, compile {'on' if kernels['compile'] else 'off'}")

    ckpt_dir = out_dir / CKPT_DIR
    if dist_info.is_main:
        checkpoint.remove_partial(ckpt_dir)
    barrier_polling()
    progress = Progress()
    latest = checkpoint.latest_complete(ckpt_dir)
    if latest is not None:
        meta = checkpoint.load(latest, model, optimizer)
        progress = Progress(step=meta["step"], train_time_s=meta.get("train_time_s", 0.0),
                            wall_time_s=meta.get("wall_time_s", 0.0), last_loss=meta.get("last_loss"),
                            steady_time_s=meta.get("steady_time_s", 0.0), steady_steps=meta.get("steady_steps", 0))
        log(f"resumed from {latest.name} (step {progress.step}, {meta['tokens']:,} tokens)")
        heartbeat.update(checkpoint_step=progress.step)
    dropped = curve.truncate_after(progress.step)
    if dropped:
        log(f"loss curve: dropped {dropped} lines after step {progress.step}")

    heartbeat.update(state=C.HB_TRAINING, step=progress.step, message="training", loss=progress.last_loss,
                     tokens=progress.step * spec.tokens_per_step(dist_info.world_size), tokens_per_s=None,
                     eta_s=None)
    log(f"phase training (from step {progress.step})")
    with signals.deferred():
        finished = train_loop(spec, dist_info, model, optimizer, data, progress, total_steps,
                              heartbeat, curve, signals, started)
    if not finished or signals.received:
        heartbeat.update(state=C.HB_INTERRUPTED, checkpoint_step=progress.step,
                         message=f"{signals.received or 'stop signal'}: checkpoint at step {progress.step}")
        log(f"interrupted: checkpoint at step {progress.step}, exit {EXIT_INTERRUPTED}")
        return EXIT_INTERRUPTED

    heartbeat.update(state=C.HB_EVALUATING, message=f"evaluating lengths {spec.eval_lengths}")
    log("phase evaluating")
    from train.eval_spec import evaluate_spec
    model.eval()
    # fp32 here means "no autocast": FSDP2's policy already computes in `dtype`, as in training.
    eval_result = evaluate_spec(model, data.val, spec, dist_info.device, torch.float32)
    tokens_seen = total_steps * spec.tokens_per_step(dist_info.world_size)
    wall = progress.wall_time_s + (time.time() - started)
    if dist_info.is_main:
        atomic_write_json(out_dir / EVAL_PER_LENGTH, eval_result)
        from train.results import results_record
        record = results_record(spec, plan, n_params, total_steps, tokens_seen, progress, eval_result, wall,
                                dtype_name, versions(dist_info, spec.raw.get("code_commit")), kernels, dist_info.world_size)
        atomic_write_json(out_dir / RESULTS, record)
        log(f"results: final loss {record['final_train_loss']:.4f}, ppl {record['ppl']}, "
            f"tok/s steady {record['tokens_per_s_steady'] or 0:,.0f} (wall {record['tokens_per_s_wall'] or 0:,.0f}), "
            f"mfu steady {record['mfu_steady']}")
    barrier_polling()
    heartbeat.update(state=C.HB_DONE, step=total_steps, tokens=tokens_seen, eta_s=0, message="done")
    log("phase done")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.run", description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, help="path of the run's spec.json")
    args = parser.parse_args(argv)
    started = time.time()
    signals = StopSignals().install()
    try:
        spec = load_spec(args.spec)
    except SpecError as e:
        print(f"error: invalid spec: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_SPEC
    except Interrupted:
        return EXIT_INTERRUPTED

    from train import checkpoint, tracking
    from train.distributed import init_distributed, shutdown
    from train.heartbeat import Heartbeat, LossCurve

    try:
        Path(spec.out_dir).mkdir(parents=True, exist_ok=True)
        dist_info = init_distributed()  # under torchrun this waits for the rendezvous
    except Interrupted as e:
        print(f"interrupted by {e.args[0]} before the process group formed, exit {EXIT_INTERRUPTED}", flush=True)
        return EXIT_INTERRUPTED
    _LOG_RANK["rank"] = dist_info.rank
    heartbeat = Heartbeat(spec.out_dir, spec.attempt, enabled=dist_info.is_main)
    from train.gpu_monitor import GpuMonitor
    gpu_monitor = None
    curve = LossCurve(spec.out_dir, enabled=dist_info.is_main)
    code, clean = EXIT_FAILED, True
    tracker = tracking.Tracker([])
    try:
        heartbeat.start()  # inside: a disk already full fails the run with no_space, not a traceback
        gpu_monitor = GpuMonitor.for_run(heartbeat, on_gpu=dist_info.device.type == "cuda")
        log(f"==== attempt {spec.attempt} of {spec.run}: pid {os.getpid()}, world size {dist_info.world_size} ====")
        tracker = tracking.open_tracker(spec, dist_info.is_main, curve, reraise=(Interrupted,))  # docs/trackers.md
        code = run(spec, dist_info, heartbeat, curve, signals, started)
    except SpecError as e:
        print(f"error: invalid spec: {e}", file=sys.stderr, flush=True)
        heartbeat.update(state=C.HB_FAILED, message=f"invalid spec: {e}")
        code = EXIT_BAD_SPEC
    except Interrupted as e:
        # Mid-phase: no step boundary to save at; the newest complete checkpoint is what a resume uses.
        latest = checkpoint.complete_steps(Path(spec.out_dir) / CKPT_DIR)
        step = latest[-1] if latest else None
        phase = heartbeat.status.get("state")
        heartbeat.update(state=C.HB_INTERRUPTED, checkpoint_step=step,
                         message=f"{e.args[0]} while {phase}; resume from checkpoint {step}")
        log(f"interrupted by {e.args[0]} while {phase}: checkpoint_step {step}, exit {EXIT_INTERRUPTED}")
        code, clean = EXIT_INTERRUPTED, False
    except BaseException as e:  # torch's CheckpointException is a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        summary = f"{type(e).__name__}: {e}".splitlines()[0]
        no_space = C.is_no_space(e, spec.out_dir)
        if no_space:
            summary = f"no space left on device in {spec.out_dir} ({summary})"
        if no_space and dist_info.is_main:  # give back what a half-written checkpoint took
            checkpoint.remove_partial(Path(spec.out_dir) / CKPT_DIR)
        try:  # the log is on the same disk: a full one must not hide the heartbeat's verdict
            print(f"error: training failed: {summary}", file=sys.stderr, flush=True)
            traceback.print_exc()
        except OSError:
            pass
        try:
            heartbeat.update(state=C.HB_FAILED, message=summary,
                             **({"failure": C.FAILURE_NO_SPACE} if no_space else {}))
        except OSError:
            pass
        code, clean = (C.EXIT_NO_SPACE if no_space else EXIT_FAILED), False
    finally:
        if gpu_monitor is not None:
            gpu_monitor.stop()
        heartbeat.stop()
        tracker.close(code)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:  # the log's disk is full: what is left goes nowhere (else Python exits 120)
            os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
    if not clean and dist_info.world_size > 1:
        os._exit(code)  # other ranks may be stuck in a collective; don't wait on them
    shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
