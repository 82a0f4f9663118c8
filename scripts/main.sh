#!/usr/bin/env bash
# The main job: sets up ./.venv if needed, then trains a small CNN on scikit-learn's digits with
# gpuopt and with PyTorch side by side. Extra arguments go to the script (see --help).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
exec python examples/train_digits.py "$@"
