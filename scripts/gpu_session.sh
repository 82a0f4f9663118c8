#!/usr/bin/env bash
# What a session with an H100/H200 runs, in steps that each fit the device tool's 10-minute limit:
#
#   bash scripts/gpu_session.sh first     # for a short device budget (15 min): the gpu-marked tests, then
#                                         # the quick bench of both suites (each part under a time limit)
#   bash scripts/gpu_session.sh tests     # install, every gpu-marked test (tests/test_cupy.py's CuPy arrays
#                                         # and GPU-size oracle among them), then the whole suite
#   bash scripts/gpu_session.sh optim     # python -m bench --suite optim (torch.compile and CuPy rows included)
#   bash scripts/gpu_session.sh bn        # python -m bench --suite bn --no-compile
#   bash scripts/gpu_session.sh bn-compile  # the torch.compile'd batch-norm rows (slow: one compile per shape)
#   bash scripts/gpu_session.sh bn-short-rows  # quick bn suite with short NCHW rows read as columns, then as
#                                         # channels-first tiles (GPUOPT_SHORT_ROWS=0): weigh (256, 2048, 7, 7)
#
# The machine's python3 already has torch, triton and cupy (no internet there), so gpuopt is
# installed into it without dependencies. Logs and bench files go to $OUT when it is set.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-runs/gpu}"
mkdir -p "$OUT"
python3 -m pip install --no-deps --no-build-isolation -q -e . > "$OUT/pip.log" 2>&1 || { cat "$OUT/pip.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
    | tee -a "$OUT/gpu.txt"
case "${1:-tests}" in
  first)
    timeout 300 python3 -m pytest -m gpu -q -rs 2>&1 | tee "$OUT/pytest-gpu.log" | tail -25 || true
    timeout 240 python3 -m bench --suite all --quick --no-compile --out-dir "$OUT" 2>&1 | tee "$OUT/bench-quick.log" \
        | tail -60 ;;
  tests)
    python3 -m pytest -m gpu -q -rs 2>&1 | tee "$OUT/pytest-gpu.log" | tail -25
    python3 -m pytest -q -x 2>&1 | tee "$OUT/pytest-all.log" | tail -25 ;;
  optim)
    python3 -m bench --suite optim --out-dir "$OUT" 2>&1 | tee "$OUT/bench-optim.log" ;;
  bn)
    python3 -m bench --suite bn --no-compile --out-dir "$OUT" 2>&1 | tee "$OUT/bench-bn.log" ;;
  bn-compile)
    python3 -m bench --suite bn --quick --out-dir "$OUT" 2>&1 | tee "$OUT/bench-bn-compile.log" ;;
  bn-short-rows)
    mkdir -p "$OUT/short-rows-on" "$OUT/short-rows-off"
    python3 -m bench --suite bn --quick --no-compile --out-dir "$OUT/short-rows-on" 2>&1 | tee "$OUT/bench-bn-short-rows-on.log"
    GPUOPT_SHORT_ROWS=0 python3 -m bench --suite bn --quick --no-compile --out-dir "$OUT/short-rows-off" 2>&1 \
        | tee "$OUT/bench-bn-short-rows-off.log" ;;
  *)
    echo "usage: bash scripts/gpu_session.sh first|tests|optim|bn|bn-compile|bn-short-rows" >&2; exit 2 ;;
esac
