"""Development helpers shared by the tests, the scripts and the benchmarks.

- `comfy_env`: ComfyUI as a library next to this pack (the one place that edits `sys.path`);
- `comfy_server`: a real headless ComfyUI server driven over its HTTP API;
- `tiny_models`: tiny random models that ComfyUI's own detection accepts;
- `triton_interpreter`: the fused kernels run by Triton's CPU interpreter when there is no GPU.

`scripts/` is importable from the tests and benchmarks through `deltaconv-dev.pth`, which `scripts/setup_env.sh`
writes into the virtual environment; scripts run directly have their own folder on the path already.
"""
