#!/usr/bin/env bash
# The test command: sets up ./.venv if needed, then runs the whole suite. Extra arguments go to pytest.
# Without a GPU, tests/conftest.py runs every kernel through Triton's interpreter on the CPU.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
exec python -m pytest "$@"
