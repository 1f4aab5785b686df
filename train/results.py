"""results.json of a finished training run (docs/run-directory.md)."""
from __future__ import annotations

from train.spec import TrainSpec


def results_record(spec: TrainSpec, plan, n_params: int, steps: int, tokens_seen: int,
                   progress, eval_result: dict, wall_time_s: float, dtype_name: str,
                   vers: dict, kernels: dict, world_size: int) -> dict:
    """results.json. tokens/s and MFU twice: `_steady` leaves out the first steps of every attempt
    (compile, warm-up; train.step.StepTimer), `_wall` is all the time in training steps."""
    from train import presets
    from train.mfu import mfu, peak_flops
    peak = peak_flops(vers["gpu"], dtype_name)
    flops = presets.flops_per_token(plan.cfg, spec.seq_len)
    gpus = max(1, vers["gpu_count"])
    tps_wall = tokens_seen / progress.train_time_s if progress.train_time_s > 0 else None
    tps_steady = (progress.steady_steps * spec.tokens_per_step(world_size) / progress.steady_time_s
                  if progress.steady_steps and progress.steady_time_s > 0 else None)
    ppl = {length: r["ppl"] for length, r in eval_result.get("lengths", {}).items() if not r.get("skipped")}
    return {
        "run": spec.run, "phase": spec.phase, "config": spec.config, "seed": spec.seed,
        "preset": spec.preset, "params": n_params, "tokens_seen": tokens_seen, "steps": steps,
        "final_train_loss": progress.last_loss, "ppl": ppl, "wall_time_s": wall_time_s,
        "tokens_per_s_steady": tps_steady, "tokens_per_s_wall": tps_wall,
        "mfu_steady": mfu(flops, tps_steady, peak, gpus) if tps_steady else None,
        "mfu_wall": mfu(flops, tps_wall, peak, gpus) if tps_wall else None,
        "steady_steps": progress.steady_steps, **kernels,
        "versions": vers,
    }
