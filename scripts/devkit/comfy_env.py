"""ComfyUI as a library next to this pack: which ComfyUI (found as a user has it), the one place that edits sys.path
(ComfyUI first, the repo root off it), the CPU flag, and the pack imported as ComfyUI imports it."""
import importlib.util
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACK = "deltaconv_pack"


def is_comfyui(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "comfy", "model_patcher.py"))


def installed_in() -> str | None:
    """The ComfyUI this pack is installed in (`ComfyUI/custom_nodes/<this pack>`, as git clone or ComfyUI-Manager
    put it), or None."""
    custom_nodes = os.path.dirname(REPO)
    comfy = os.path.dirname(custom_nodes)
    return comfy if os.path.basename(custom_nodes) == "custom_nodes" and is_comfyui(comfy) else None


def find_comfyui(explicit: str | None = None) -> str:
    """The ComfyUI to use: `explicit` (a command-line flag), else $COMFYUI_PATH, else the one this pack is installed
    in. Raises SystemExit saying what to do when there is none."""
    path = explicit or os.environ.get("COMFYUI_PATH") or installed_in()
    if not path:
        raise SystemExit("No ComfyUI found: this pack is not inside ComfyUI/custom_nodes and COMFYUI_PATH is unset. "
                         "Set COMFYUI_PATH=/path/to/ComfyUI (scripts/setup_env.sh prints one).")
    path = os.path.abspath(path)
    if not is_comfyui(path):
        raise SystemExit(f"No ComfyUI at {path}: COMFYUI_PATH (or --comfyui) must name a ComfyUI folder, the one "
                         "with main.py and comfy/ in it")
    return path


def setup_comfy(comfy_path: str | None, cpu: bool) -> str:
    """ComfyUI first on sys.path (its top-level `nodes` module); the repo root off it (it has a `nodes/` too).
    `comfy_path` None: find_comfyui(). Returns the ComfyUI folder."""
    comfy_path = find_comfyui(comfy_path)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != REPO]
    sys.path.insert(0, comfy_path)
    from comfy.cli_args import args

    args.cpu = cpu
    return comfy_path


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


def child_env(**extra: str) -> dict:
    """os.environ for a `python -c` child of the tests: scripts/ (devkit) and bench/ importable, as tests/pytest.ini
    makes them for the tests themselves. Never for a user-facing script: those must find their helpers alone."""
    paths = [os.path.join(REPO, "scripts"), os.path.join(REPO, "bench")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), **extra}


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
