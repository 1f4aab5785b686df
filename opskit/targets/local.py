"""Local targets: this machine. Runs start in place from the project checkout. The built-in `local`
target (opskit/operations/targets.py) keeps its workdir beside state.db; `opskit targets add NAME
--local` adds others (another workdir, a GPU count, a price), e.g. a GPU workstation's queue."""
from __future__ import annotations

import os
import sys

from opskit.errors import CannotRun, OpsError, TargetUnreachable
from opskit.targets.base import Target
from opskit.transport import Shell
from opskit.transport.local import LocalShell
from train.gpu_monitor import parse_list

GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/kfd")  # an NVIDIA or a ROCm driver is loaded
TORCH_PROBE_TIMEOUT_S = 120


def detect_gpus(python: str, shell: Shell | None = None) -> int:
    """GPUs of this machine: `nvidia-smi -L`, else the trainer python's torch.cuda.device_count() (in
    a subprocess: the control plane never imports torch); 0 when neither answers. Without a GPU
    driver's device node torch could only say 0, so it is not asked."""
    shell = shell or LocalShell()
    try:
        res = shell.run(["nvidia-smi", "-L"], timeout=30)
        if res.exit_code == 0:
            return parse_list(res.stdout)
    except (CannotRun, TargetUnreachable):
        pass
    if not any(os.path.exists(node) for node in GPU_DEVICE_NODES):
        return 0
    return torch_device_count(python, shell)


def torch_device_count(python: str, shell: Shell | None = None) -> int:
    """torch.cuda.device_count() as `python` sees it; 0 when it cannot tell."""
    try:
        res = (shell or LocalShell()).run([python, "-c", "import torch; print(torch.cuda.device_count())"],
                                          timeout=TORCH_PROBE_TIMEOUT_S)
    except (CannotRun, TargetUnreachable):
        return 0
    lines = res.stdout.strip().splitlines()
    return int(lines[-1]) if res.exit_code == 0 and lines and lines[-1].isdigit() else 0


class LocalTarget(Target):
    kind = "local"

    def __init__(self, name: str, config: dict, shell=None):
        super().__init__(name, config, shell or LocalShell())

    @classmethod
    def config_from_options(cls, options: dict) -> dict:
        workdir = os.path.expanduser(options.get("workdir") or "")
        if not workdir:  # opskit.operations.add_target gives it one beside state.db
            raise OpsError("a local target needs --workdir")
        config: dict = {"workdir": os.path.abspath(workdir)}
        if options.get("python"):
            config["python"] = str(options["python"])
        for k in ("gpus", "gpus_per_run", "max_parallel"):
            if options.get(k) is not None:
                if int(options[k]) < (0 if k == "gpus" else 1):
                    raise OpsError(f"--{k.replace('_', '-')} {options[k]} is too small")
                config[k] = int(options[k])
        if "gpus" in config:
            config["gpus_detected"] = False  # the user's count stands
        else:
            config.update(gpus=detect_gpus(config.get("python") or sys.executable), gpus_detected=True)
        if config.get("gpus_per_run") and config["gpus_per_run"] > config["gpus"]:
            raise OpsError(f"--gpus-per-run {config['gpus_per_run']} exceeds the target's {config['gpus']} GPUs")
        return config
