"""ComfyUI as a library next to this pack: the one place that edits sys.path (ComfyUI first, the repo root off it),
the CPU flag, and the pack imported as ComfyUI imports it."""
import importlib.util
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACK = "deltaconv_pack"


def setup_comfy(comfy_path: str, cpu: bool):
    """ComfyUI first on sys.path (its top-level `nodes` module); the repo root off it (it has a `nodes/` too)."""
    comfy_path = os.path.abspath(comfy_path)
    if not os.path.isfile(os.path.join(comfy_path, "comfy", "model_patcher.py")):
        raise SystemExit(f"No ComfyUI at {comfy_path}: set COMFYUI_PATH (scripts/setup_env.sh prints one)")
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != REPO]
    sys.path.insert(0, comfy_path)
    from comfy.cli_args import args

    args.cpu = cpu


def load_pack():
    """Import this repository as ComfyUI imports a custom node pack; `deltaconv_core` aliases the pack's copy."""
    if PACK not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK, os.path.join(REPO, "__init__.py"),
                                                      submodule_search_locations=[REPO])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK] = module
        spec.loader.exec_module(module)
        for name in [n for n in sys.modules if n.startswith(f"{PACK}.deltaconv_core")]:
            sys.modules[name.replace(f"{PACK}.", "", 1)] = sys.modules[name]
    return sys.modules[PACK]


def import_core():
    """`deltaconv_core` alone (pure PyTorch, no ComfyUI), for benchmarks: imported from its folder, so the repo
    root (whose `nodes/` would shadow ComfyUI's) never goes on sys.path."""
    if "deltaconv_core" not in sys.modules:
        folder = os.path.join(REPO, "deltaconv_core")
        spec = importlib.util.spec_from_file_location("deltaconv_core", os.path.join(folder, "__init__.py"),
                                                      submodule_search_locations=[folder])
        module = importlib.util.module_from_spec(spec)
        sys.modules["deltaconv_core"] = module
        spec.loader.exec_module(module)
    return sys.modules["deltaconv_core"]
