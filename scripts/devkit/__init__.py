"""Development helpers shared by the tests, the scripts and the benchmarks.

- `comfy_env`: ComfyUI as a library next to this pack (the one place that edits `sys.path`);
- `comfy_server`: a real headless ComfyUI server driven over its HTTP API;
- `tiny_models`: tiny random models that ComfyUI's own detection accepts;
- `triton_interpreter`: the fused kernels run by Triton's CPU interpreter when there is no GPU;
- `device_info`: the benchmarks' names for the device they ran on, and how busy the host was meanwhile.

`scripts/` is on the tests' path through tests/pytest.ini and on the benchmarks' through bench/devkit_path.py; scripts
run directly have their own folder on the path already.
"""
