# Sourced by scripts/main.sh and scripts/test.sh: makes or reuses ./.venv with gpuopt installed.
#
# - A Python that already has a CUDA build of torch keeps it: the venv sees its site-packages.
# - Otherwise torch is installed into the venv: torch==2.13.0 (the CPU build) when there is no
#   NVIDIA GPU, so no CUDA packages are pulled; plain `torch` when there is one.
# - gpuopt is installed editable with the extras needed to test and to run the main job.
# Re-running is cheap: a stamp records what was installed and is compared with pyproject.toml.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
have_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

if [ ! -x .venv/bin/python ]; then
    if "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)' >/dev/null 2>&1; then
        echo "[setup] reusing the CUDA torch of $PYTHON (venv with system site-packages)"
        "$PYTHON" -m venv --system-site-packages .venv
    else
        "$PYTHON" -m venv .venv
    fi
fi
VENV_PY="$ROOT/.venv/bin/python"
stamp=".venv/.gpuopt-stamp"
want="$(cat pyproject.toml scripts/setup_env.sh | "$VENV_PY" -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    "$VENV_PY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    if ! "$VENV_PY" -c 'import torch' >/dev/null 2>&1; then
        if have_gpu; then
            "$VENV_PY" -m pip install -q torch
        else
            echo "[setup] no GPU: installing the CPU build torch==2.13.0"
            "$VENV_PY" -m pip install -q torch==2.13.0
        fi
    fi
    "$VENV_PY" -m pip install -q -e ".[test,main,bench]"
    echo "$want" > "$stamp"
fi
export PATH="$ROOT/.venv/bin:$PATH"
