#!/usr/bin/env bash
# Provision a box to run the trainer; run on the box by `opskit targets prepare` (after the code sync).
#   prepare.sh --workdir W --code C [--python P] [--gpus N] [--base-python B] [--system-site-packages]
#              [--no-install] [--torch-index URL|DIR]
# Each step prints `step <name>: ...`; a failing step prints `prepare failed at step <name>: <reason>`
# and exits 1. A marker <workdir>/.prepared (hash of pyproject.toml, this script and the options)
# makes a repeated prepare skip the venv and package steps.
set -uo pipefail

workdir="" code="" python="" gpus=0 base_python=python3 system_site=0 install=1 torch_from=""
while [ $# -gt 0 ]; do
  case "$1" in
    --workdir) workdir=$2; shift 2 ;;
    --code) code=$2; shift 2 ;;
    --python) python=$2; shift 2 ;;
    --gpus) gpus=$2; shift 2 ;;
    --base-python) base_python=$2; shift 2 ;;
    --system-site-packages) system_site=1; shift ;;
    --no-install) install=0; shift ;;
    --torch-index) torch_from=$2; shift 2 ;;
    *) echo "prepare failed at step arguments: unknown option $1"; exit 1 ;;
  esac
done
[ -n "$workdir" ] && [ -n "$code" ] || { echo "prepare failed at step arguments: --workdir and --code are required"; exit 1; }
venv="$workdir/venv"
python=${python:-$venv/bin/python}
MIN_FREE_GB=${OPSKIT_MIN_FREE_GB:-5}
# Torch builds per CUDA version, newest first ("cuXY minimum-driver-CUDA"); the driver's CUDA
# version (nvidia-smi header) must be at least the build's.
TORCH_CUDA_BUILDS="cu130 13.0
cu128 12.8
cu126 12.6"

fail() { echo "prepare failed at step $1: $2"; exit 1; }
step() { echo "step $1: $2"; }

# -- python3: the agent needs only the standard library, the venv needs >= 3.10
command -v "$base_python" >/dev/null 2>&1 || fail python3 "$base_python not found on the box (install python3)"
pyver=$("$base_python" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])') || fail python3 "$base_python does not run"
"$base_python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || fail python3 "$base_python is $pyver; need >= 3.10"
step python3 "$base_python $pyver"

# -- workdir and free disk
mkdir -p "$workdir" 2>/dev/null && [ -w "$workdir" ] || fail workdir "cannot create or write $workdir"
free_gb=$(df -Pk "$workdir" | awk 'NR==2 {printf "%.1f", $4 / 1048576}')
step disk "$free_gb GB free in $workdir"
awk -v f="$free_gb" -v m="$MIN_FREE_GB" 'BEGIN {exit !(f < m)}' && fail disk "only $free_gb GB free in $workdir (need $MIN_FREE_GB)"

# -- GPUs: count, model, driver and the CUDA version the driver supports
cuda="" torch_index="https://download.pytorch.org/whl/cpu"
if command -v nvidia-smi >/dev/null 2>&1; then
  gpu_lines=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>&1) || fail gpu "nvidia-smi failed: $gpu_lines"
  found=$(printf '%s\n' "$gpu_lines" | grep -c .)
  cuda=$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -1)
  step gpu "$found x $(printf '%s\n' "$gpu_lines" | head -1) (driver CUDA $cuda)"
  [ "$found" -ge "$gpus" ] || fail gpu "the target is configured with $gpus GPUs but nvidia-smi shows $found"
  build=$(printf '%s\n' "$TORCH_CUDA_BUILDS" | awk -v c="$cuda" '{split($2, b, "."); split(c, d, ".");
          if (d[1] > b[1] || (d[1] == b[1] && d[2] >= b[2])) {print $1; exit}}')
  [ -n "$build" ] || fail gpu "driver supports CUDA $cuda, older than every torch build ($(echo $TORCH_CUDA_BUILDS | tr '\n' ' ')); update the NVIDIA driver"
  torch_index="https://download.pytorch.org/whl/$build"
  step gpu "torch wheels from $torch_index"
else
  [ "$gpus" -eq 0 ] || fail gpu "the target is configured with $gpus GPUs but nvidia-smi is missing"
  step gpu "none (CPU)"
fi

# -- a configured torch source (a mirror, or a folder of wheels on a box without internet) wins
if [ -n "$torch_from" ]; then
  torch_index=$torch_from
  step torch "torch wheels from $torch_index (configured)"
fi
if [ -d "$torch_index" ]; then
  torch_pip_args=(--find-links "$torch_index")  # its dependencies still come from the default index
else
  torch_pip_args=(--index-url "$torch_index")
fi

# -- marker: nothing below changed since the last successful prepare
hash=$(cat "$code/pyproject.toml" "$code/remote/prepare.sh" 2>/dev/null | { cat; echo "$python $base_python $system_site $torch_index"; } | sha256sum | cut -c1-16)
# (find_spec instead of import: a repeated prepare takes well under a second, importing torch takes seconds)
if [ "$(cat "$workdir/.prepared" 2>/dev/null)" = "$hash" ] && "$python" -c 'import importlib.util as u, sys
sys.exit(not all(u.find_spec(m) for m in ("torch", "tokenizers", "numpy")))' 2>/dev/null; then
  step done "already prepared ($hash)"
  exit 0
fi

# -- venv (only when the trainer's python is the default one)
if [ "$python" = "$venv/bin/python" ]; then
  if [ ! -x "$python" ]; then
    flags=""; [ "$system_site" = 1 ] && flags="--system-site-packages"
    out=$("$base_python" -m venv $flags "$venv" 2>&1) || fail venv "$base_python -m venv failed: $(echo "$out" | tail -1) (Debian/Ubuntu: apt-get install python3-venv)"
    step venv "created $venv${flags:+ ($flags)}"
    # A base python that is itself a venv: --system-site-packages alone would reach past it to the
    # interpreter it was made from, so point the new venv at the base venv's packages as well.
    [ "$system_site" = 1 ] && base_site=$("$base_python" -c 'import sys, sysconfig
print(sysconfig.get_paths()["purelib"] if sys.prefix != sys.base_prefix else "")')
    if [ -n "${base_site:-}" ]; then
      site=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
      echo "$base_site" > "$site/opskit-base-venv.pth"
      step venv "sees the packages of the base venv $base_site"
    fi
  else
    step venv "$venv exists"
  fi
else
  [ -x "$python" ] || command -v "$python" >/dev/null 2>&1 || fail venv "the configured python $python is missing"
  step venv "using the configured python $python"
fi

# -- trainer packages: installed only when the trainer cannot import them yet
if deps=$("$python" -c 'import torch, tokenizers, numpy; print("torch", torch.__version__)' 2>/dev/null); then
  step packages "present ($deps)"
else
  [ "$install" = 1 ] || fail packages "torch, tokenizers or numpy is not importable by $python and --no-install was given"
  reqs=$("$python" - "$code/pyproject.toml" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
try:
    import tomllib
    reqs = tomllib.loads(text)["project"]["optional-dependencies"]["train"]
except ImportError:  # python < 3.11: the list is simple enough to read by hand
    block = re.search(r"^train\s*=\s*\[(.*?)\]", text, re.S | re.M).group(1)
    reqs = re.findall(r'"([^"]+)"', block)
print("\n".join(reqs))
EOF
) || fail packages "cannot read the train extra from $code/pyproject.toml"
  torch_req=$(printf '%s\n' "$reqs" | grep '^torch' | head -1)
  step packages "installing $torch_req from $torch_index"
  "$python" -m pip install --quiet --upgrade pip >/dev/null 2>&1
  "$python" -m pip install --quiet "$torch_req" "${torch_pip_args[@]}" 2>&1 | tail -5 || true
  "$python" -c 'import torch' 2>/dev/null || fail packages "pip could not install $torch_req from $torch_index"
  step packages "installing $(printf '%s\n' "$reqs" | grep -v '^torch' | tr '\n' ' ')"
  # shellcheck disable=SC2046
  "$python" -m pip install --quiet $(printf '%s\n' "$reqs" | grep -v '^torch') 2>&1 | tail -5 || true
  deps=$("$python" -c 'import torch, tokenizers, numpy; print("torch", torch.__version__)' 2>&1) \
    || fail packages "still not importable after pip install: $(echo "$deps" | tail -1)"
  step packages "installed ($deps)"
fi

# -- CUDA and NCCL as torch sees them (GPU boxes only)
if [ -n "$cuda" ]; then
  seen=$("$python" -c 'import torch; assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
print(torch.cuda.device_count(), "GPUs, torch CUDA", torch.version.cuda)' 2>&1) || fail cuda "$(echo "$seen" | tail -1)"
  step cuda "$seen"
  nccl=$("$python" -c 'import torch; print(".".join(map(str, torch.cuda.nccl.version())))' 2>&1) \
    || fail nccl "torch has no NCCL: $(echo "$nccl" | tail -1)"
  step nccl "NCCL $nccl"
fi

echo "$hash" > "$workdir/.prepared.tmp" && mv "$workdir/.prepared.tmp" "$workdir/.prepared"
step done "prepared ($hash)"
